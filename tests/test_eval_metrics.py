"""Retrieval, hard-negative and classification metrics on embeddings whose answers are known."""

import math

import pytest
import torch

from fineviti.data.positions import build_positions_ref
from fineviti.eval import metrics
from fineviti.eval.metrics import (
    classification_accuracy,
    hard_negative_accuracy,
    retrieval_metrics,
    retrieval_metrics_multi,
    retrieval_ranks,
)
from fineviti.eval.regions import pool_boxes, region_classification
from fineviti.eval.zeroshot import SIMPLE_IMAGENET_TEMPLATES, build_classifier, class_embeddings, prompts


def _ring(n: int, offset: float, dim: int = 6) -> torch.Tensor:
    """Unit vectors at angles 2*pi*(i + offset)/n in the first two coordinates (zeros elsewhere)."""
    angle = 2 * math.pi * (torch.arange(n, dtype=torch.float64) + offset) / n
    out = torch.zeros(n, dim, dtype=torch.float64)
    out[:, 0], out[:, 1] = angle.cos(), angle.sin()
    return out.float()


def _ranks_brute(img, txt, txt_image):
    """Full-matrix reference: loops, no chunking, the same tie rule (ties count against)."""
    img = torch.nn.functional.normalize(img.double(), dim=-1)
    txt = torch.nn.functional.normalize(txt.double(), dim=-1)
    sim = img @ txt.T
    i2t = []
    for i in range(img.shape[0]):
        own = [j for j in range(txt.shape[0]) if txt_image[j] == i]
        best = max(sim[i, j] for j in own)
        i2t.append(sum(1 for j in range(txt.shape[0]) if j not in own and sim[i, j] >= best))
    t2i = []
    for j in range(txt.shape[0]):
        true = sim[txt_image[j], j]
        t2i.append(sum(1 for i in range(img.shape[0]) if i != txt_image[j] and sim[i, j] >= true))
    return torch.tensor(i2t), torch.tensor(t2i)


def test_identical_embeddings_recall_everything():
    emb = torch.randn(50, 32)
    out = retrieval_metrics(emb, emb.clone())
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert out[key] == 1.0, key
    assert out["n"] == 50 and out["chance_r1"] == pytest.approx(1 / 50)


@pytest.mark.parametrize("shift,rank", [(1, 1), (3, 5)])
def test_shifted_captions_have_known_ranks(shift, rank):
    # Caption i sits just short of image i + shift on a ring, so 2 * shift - 1 wrong captions (and images)
    # are closer than the true one, for every query.
    n = 40
    img, txt = _ring(n, 0.0), _ring(n, shift - 0.1)
    i2t, t2i = retrieval_ranks(img, txt)
    assert i2t.tolist() == [rank] * n and t2i.tolist() == [rank] * n
    out = retrieval_metrics(img, txt)
    if shift == 1:
        assert out["i2t_r1"] == 0.0 and out["t2i_r1"] == 0.0
        assert out["i2t_r5"] == 1.0 and out["t2i_r5"] == 1.0
    else:
        assert out["i2t_r5"] == 0.0 and out["t2i_r5"] == 0.0
        assert out["i2t_r10"] == 1.0 and out["t2i_r10"] == 1.0


def test_random_embeddings_are_near_chance():
    gen = torch.Generator().manual_seed(1)
    n = 2000
    out = retrieval_metrics(torch.randn(n, 64, generator=gen), torch.randn(n, 64, generator=gen))
    # Expected R@1 = 1/2000, R@10 = 0.005 (binomial std ~0.0016 on 2000 queries): loose bounds.
    for direction in ("i2t", "t2i"):
        assert out[f"{direction}_r1"] < 0.006
        assert 0.0 < out[f"{direction}_r10"] < 0.02
    assert out["chance_r1"] == pytest.approx(1 / n)


def test_ties_count_as_misses():
    # A collapsed model (every embedding equal) must score 0, not 1.
    emb = torch.ones(20, 8)
    out = retrieval_metrics(emb, emb)
    assert all(out[k] == 0.0 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"))
    # One exact tie with the true caption: rank 1, a miss at 1 and a hit at 5.
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    i2t, t2i = retrieval_ranks(img, txt)
    assert i2t.tolist() == [1, 2, 0]  # image 0: caption 1 ties its true caption; image 1: all three score 0
    assert t2i.tolist() == [0, 2, 0]  # caption 1 = e0: image 0 scores 1, image 2 ties the true image's 0


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_ranks_match_brute_force_with_several_captions(chunk_size):
    gen = torch.Generator().manual_seed(2)
    n_img, per = 23, 3
    img = torch.randn(n_img, 16, generator=gen)
    txt_image = torch.arange(n_img).repeat_interleave(per)
    txt = img[txt_image] + 1.5 * torch.randn(n_img * per, 16, generator=gen)
    txt_image = txt_image[torch.randperm(n_img * per, generator=gen)]  # captions in any order
    txt = img[txt_image] + 1.5 * torch.randn(n_img * per, 16, generator=gen)
    i2t, t2i = retrieval_ranks(img, txt, txt_image, chunk_size=chunk_size)
    ref_i2t, ref_t2i = _ranks_brute(img, txt, txt_image.tolist())
    assert torch.equal(i2t, ref_i2t) and torch.equal(t2i, ref_t2i)
    assert 0 < int(i2t.max()) and 0 < int(t2i.max())  # not trivially perfect


def test_multi_caption_any_caption_counts_for_i2t():
    # Each image has one exact caption and one far-away caption (the negated image).
    gen = torch.Generator().manual_seed(3)
    img = torch.randn(30, 24, generator=gen)
    txt = torch.cat([img, -img])
    txt_image = torch.cat([torch.arange(30), torch.arange(30)])
    out = retrieval_metrics_multi(img, txt, txt_image)
    assert out["i2t_r1"] == 1.0  # the exact caption is in the top 1
    assert out["t2i_r1"] == pytest.approx(0.5)  # the negated captions rank their image last
    assert out["t2i_r10"] == pytest.approx(0.5)
    assert out["n"] == 30 and out["n_texts"] == 60 and out["chance_r1"] == pytest.approx(1 / 30)


def test_chunking_never_builds_the_full_matrix(monkeypatch):
    shapes = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    emb = torch.randn(300, 8)
    out = retrieval_metrics(emb, emb + 0.01 * torch.randn(300, 8))
    assert shapes and max(a * b for a, b in shapes) <= 1000
    assert out["i2t_r10"] > 0.9
    assert metrics._chunk_rows(100_000, None) * 100_000 <= 1 << 24


@pytest.mark.slow
def test_retrieval_at_60k_fits_in_memory():
    import resource

    n = 60_000
    gen = torch.Generator().manual_seed(4)
    emb = torch.randn(n, 16, generator=gen)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = retrieval_metrics(emb, emb + 0.05 * torch.randn(n, 16, generator=gen))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 2 * 1024 * 1024  # the n x n matrix would be 14 GB
    assert out["n"] == n and 0 < out["i2t_r1"] <= 1


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="img_emb has 3 rows and txt_emb 4"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="txt_emb has dim 5"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="non-finite.*row 1"):
        retrieval_metrics(torch.randn(3, 4), torch.tensor([[1.0] * 4, [float("nan")] * 4, [1.0] * 4]))
    with pytest.raises(ValueError, match="image 2 has no caption"):
        retrieval_metrics_multi(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"txt_image\[1\] = 7"):
        retrieval_metrics_multi(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 7]))


def test_hard_negative_accuracy():
    gen = torch.Generator().manual_seed(5)
    img = torch.randn(6, 16, generator=gen)
    pos = img.clone()
    # Images 0-2: negatives that differ a little (the true caption wins); image 3: a negative equal to the true
    # caption (a tie is a loss); image 4: a negative closer than the true caption; image 5: no negatives.
    pos[4] = img[4] + 2.0 * torch.randn(16, generator=gen)
    neg = torch.stack([img[0] + 0.3 * torch.randn(16, generator=gen),
                       img[0] + 0.3 * torch.randn(16, generator=gen),
                       img[1] + 0.3 * torch.randn(16, generator=gen),
                       img[2] + 0.3 * torch.randn(16, generator=gen),
                       img[3].clone(),
                       img[4].clone()])
    neg_image = torch.tensor([0, 0, 1, 2, 3, 4])
    out = hard_negative_accuracy(img, pos, neg, neg_image)
    assert out["n"] == 5 and out["n_without_negatives"] == 1 and out["n_negatives"] == 6
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["chance_exchangeable"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2 + 1 / 2 + 1 / 2) / 5)
    # pairs: image 0's two and images 1, 2 win; image 3's tie and image 4's closer negative lose
    assert out["pair_accuracy"] == pytest.approx(4 / 6) and out["pair_chance"] == 0.5
    assert out["chance"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 2 + 1 / 2 + 1 / 2) / 5)
    with pytest.raises(ValueError, match="no image has a hard negative"):
        hard_negative_accuracy(img, pos, neg[:0], neg_image[:0])


def test_hard_negative_chance_is_what_a_model_blind_to_the_edits_gets():
    """One-edit negatives: each is the true caption with one edit, which a model blind to edits sees as noise around
    the true caption's embedding. Such a model's accuracy is 0.5 ** k (the reported chance), not 1 / (1 + k): the
    demo once compared its 0.10 with 0.20. (Were the true caption one more noisy draw, not the centre, the k + 1
    scores would be exchangeable and 1 / (1 + k) would hold: `chance_exchangeable`.)"""
    gen = torch.Generator().manual_seed(0)
    n, k, dim = 4000, 4, 64
    img = torch.randn(n, dim, generator=gen)
    pos = img + 3.0 * torch.randn(n, dim, generator=gen)  # the true caption, as the model sees it
    neg = pos.repeat_interleave(k, 0) + 0.1 * torch.randn(n * k, dim, generator=gen)  # an edit it cannot see
    out = hard_negative_accuracy(img, pos, neg, torch.arange(n).repeat_interleave(k))
    assert out["chance"] == pytest.approx(0.5 ** k) and out["chance_exchangeable"] == pytest.approx(1 / (1 + k))
    assert abs(out["accuracy"] - out["chance"]) < 0.015  # 4 standard errors at n = 4000
    assert abs(out["pair_accuracy"] - 0.5) < 0.02


def test_classification_accuracy_known_answers():
    classes = torch.eye(8)[:6]  # 6 classes, orthogonal
    # Row r points at class r % 6 with a small pull toward class (r + 1) % 6.
    labels = torch.arange(12) % 6
    emb = classes[labels] + 0.3 * classes[(labels + 1) % 6]
    out = classification_accuracy(emb, classes, labels)
    assert out["top1"] == 1.0 and out["top5"] == 1.0 and out["n"] == 12 and out["n_classes"] == 6
    # Labelled as the runner-up class: rank 1, a miss at top-1 and a hit at top-5.
    out = classification_accuracy(emb, classes, (labels + 1) % 6)
    assert out["top1"] == 0.0 and out["top5"] == 1.0
    # Labelled as a class with score 0, tied with three others: rank 2 + 3 = 5 (ties count against).
    out = classification_accuracy(emb, classes, (labels + 3) % 6, ks=(1, 5, 6))
    assert out["top5"] == 0.0 and math.isnan(out["top6"])  # (6 of 6 classes: every row a hit, not a measurement)
    assert out["chance_top1"] == pytest.approx(1 / 6)


def test_a_k_every_query_reaches_is_nan_and_k_must_be_a_positive_integer():
    """A recall whose k is at or above the candidates each query ranks was 1.0 whatever the model (top5 of three
    classes, R@10 of eight images): NaN now. A k of 0, -1 or 1.5 gave keys like i2t_r0 = 0.0: an error now."""
    gen = torch.Generator().manual_seed(2)
    img, txt = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    out = retrieval_metrics(img, txt, ks=(1, 7, 8, 10))
    assert not math.isnan(out["i2t_r7"]) and not math.isnan(out["t2i_r7"])
    assert all(math.isnan(out[f"{d}_r{k}"]) for d in ("i2t", "t2i") for k in (8, 10))
    # several captions: an image ranks its best own caption among the other images' captions, plus one
    txt_image = torch.tensor([0, 0, 0, 1, 2, 3, 4, 5, 6, 7])  # image 1 has the most others' captions: 9
    out = retrieval_metrics_multi(img, torch.randn(10, 4, generator=gen), txt_image, ks=(8, 9, 10))
    assert not math.isnan(out["i2t_r9"]) and math.isnan(out["i2t_r10"]) and math.isnan(out["t2i_r8"])
    i2t, _ = retrieval_ranks(img, torch.randn(10, 4, generator=gen), txt_image)
    assert int(i2t.max()) <= 9
    out = classification_accuracy(img, torch.randn(3, 4, generator=gen), torch.arange(8) % 3)
    assert 0 <= out["top1"] <= 1 and math.isnan(out["top5"])
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"k must be an integer >= 1, got {k!r}"):
            retrieval_metrics(img, txt, ks=(1, k))


def test_huge_finite_embeddings_are_normalised_not_zeroed():
    """fp32's norm overflows from about 1e19: the rows became zeros, every score tied, and recall was 0."""
    emb = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)) * 1e20
    out = retrieval_metrics(emb, emb.clone(), ks=(1,))
    assert out["i2t_r1"] == 1.0 and out["t2i_r1"] == 1.0


# ---- region pooling -------------------------------------------------------------------------------------------


def _packed_grid(grids, merge, width, gen):
    """Tokens of several images in merge order: token i holds table[image][pos[i]] (tables are row-major)."""
    grid_hw = torch.tensor(grids, dtype=torch.int32)
    cu, pos = build_positions_ref(grid_hw, merge)
    tables = [torch.randn(r, c, width, generator=gen) for r, c in grids]
    tokens = torch.cat([tables[i][pos[cu[i]:cu[i + 1], 0].long(), pos[cu[i]:cu[i + 1], 1].long()]
                        for i in range(len(grids))])
    return tokens, cu, grid_hw, pos, tables


def _direct_mean(table, box, cell):
    """Area-weighted mean over a row-major (rows, cols, width) table, by loops over the cells."""
    rows, cols = table.shape[:2]
    x0, y0, x1, y1 = (min(max(v, 0.0), lim) for v, lim in zip(box, (cols * cell, rows * cell) * 2, strict=True))
    acc, total = torch.zeros(table.shape[2], dtype=torch.float64), 0.0
    for r in range(rows):
        for c in range(cols):
            ox = max(0.0, min(x1, (c + 1) * cell) - max(x0, c * cell))
            oy = max(0.0, min(y1, (r + 1) * cell) - max(y0, r * cell))
            acc += ox * oy * table[r, c].double()
            total += ox * oy
    return acc / total


@pytest.mark.parametrize("merge", [1, 2])
def test_pool_boxes_mean_matches_direct_computation(merge):
    gen = torch.Generator().manual_seed(6)
    patch = 4
    grids = [(4, 6), (6, 2), (2, 8)]
    tokens, cu, grid_hw, pos, tables = _packed_grid(grids, merge, 5, gen)
    boxes = torch.tensor([[0.0, 0.0, 24.0, 16.0],  # the whole first image
                          [3.5, 2.25, 9.0, 13.75],  # fractional cells
                          [1.0, 1.0, 2.0, 2.0],  # inside one cell
                          [-5.0, 10.0, 7.0, 40.0],  # partly outside: clipped
                          [4.0, 4.0, 8.0, 8.0],  # exactly one cell
                          [30.0, 1.0, 31.5, 7.0]])
    box_image = torch.tensor([0, 0, 1, 1, 2, 2])
    out = pool_boxes(tokens, cu, grid_hw, pos, boxes, box_image, patch, merge)
    for b in range(boxes.shape[0]):
        ref = _direct_mean(tables[int(box_image[b])], boxes[b].tolist(), patch)
        torch.testing.assert_close(out[b].double(), ref, rtol=1e-5, atol=1e-6)
    # The whole image is the plain mean; a box on cell boundaries is the plain masked mean.
    torch.testing.assert_close(out[0], tables[0].reshape(-1, 5).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[4], tables[2][1, 1], rtol=1e-5, atol=1e-6)


def test_pool_boxes_on_merged_tokens():
    gen = torch.Generator().manual_seed(7)
    patch, merge = 3, 2
    grid_hw = torch.tensor([[4, 6], [2, 2]], dtype=torch.int32)
    cu, pos = build_positions_ref(grid_hw, merge)
    groups = [torch.randn(2, 3, 4, generator=gen), torch.randn(1, 1, 4, generator=gen)]
    # Merged tokens: one per 2x2 group, groups in row-major order (Qwen2-VL's merger output).
    merged = torch.cat([g.reshape(-1, 4) for g in groups])
    boxes = torch.tensor([[1.0, 2.0, 13.0, 11.0], [0.0, 0.0, 6.0, 6.0]])
    out = pool_boxes(merged, cu, grid_hw, pos, boxes, torch.tensor([0, 1]), patch, merge)
    torch.testing.assert_close(out[0].double(), _direct_mean(groups[0], boxes[0].tolist(), patch * merge))
    torch.testing.assert_close(out[1], groups[1][0, 0])


def _roi_align_loops(table, box, cell, output_size, sampling_ratio):
    """A transcription of torchvision's roi_align_forward_kernel (aligned=True) for one box, then the bin mean."""
    rows, cols, width = table.shape
    x0, y0, x1, y1 = (v / cell - 0.5 for v in box)
    bin_h, bin_w = (y1 - y0) / output_size, (x1 - x0) / output_size

    def bilinear(y, x):
        if y < -1.0 or y > rows or x < -1.0 or x > cols:
            return torch.zeros(width, dtype=torch.float64)
        y, x = max(y, 0.0), max(x, 0.0)
        yl, xl = int(y), int(x)
        if yl >= rows - 1:
            yl = yh = rows - 1
            y = float(yl)
        else:
            yh = yl + 1
        if xl >= cols - 1:
            xl = xh = cols - 1
            x = float(xl)
        else:
            xh = xl + 1
        ly, lx = y - yl, x - xl
        t = table.double()
        top = (1 - lx) * t[yl, xl] + lx * t[yl, xh]
        bottom = (1 - lx) * t[yh, xl] + lx * t[yh, xh]
        return (1 - ly) * top + ly * bottom

    bins = []
    for ph in range(output_size):
        for pw in range(output_size):
            acc = torch.zeros(width, dtype=torch.float64)
            for iy in range(sampling_ratio):
                for ix in range(sampling_ratio):
                    y = y0 + ph * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                    x = x0 + pw * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                    acc += bilinear(y, x)
            bins.append(acc / sampling_ratio**2)
    return torch.stack(bins).mean(0)


@pytest.mark.parametrize("merge", [1, 2])
def test_pool_boxes_roi_align_matches_torchvision_kernel(merge):
    gen = torch.Generator().manual_seed(8)
    patch = 4
    grids = [(4, 6), (2, 2)]
    tokens, cu, grid_hw, pos, tables = _packed_grid(grids, merge, 3, gen)
    boxes = torch.tensor([[0.0, 0.0, 24.0, 16.0], [3.5, 2.25, 9.0, 13.75], [0.5, 0.5, 2.0, 7.9], [1.0, 2.0, 7.0, 3.0]])
    box_image = torch.tensor([0, 0, 0, 1])
    out = pool_boxes(tokens, cu, grid_hw, pos, boxes, box_image, patch, merge, method="roi_align",
                     output_size=3, sampling_ratio=2)
    for b in range(boxes.shape[0]):
        ref = _roi_align_loops(tables[int(box_image[b])], boxes[b].tolist(), patch, 3, 2)
        torch.testing.assert_close(out[b].double(), ref, rtol=1e-5, atol=1e-6)


def test_pool_boxes_roi_align_of_a_linear_map_is_its_value_at_the_box_centre():
    # Bilinear interpolation is exact on a linear map; away from the border nothing is clamped.
    rows, cols, patch = 8, 10, 2
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                          indexing="ij")
    table = torch.stack([0.5 * r - 0.25 * c + 1.0, 2.0 * c], dim=-1)
    grid_hw = torch.tensor([[rows, cols]], dtype=torch.int32)
    cu, pos = build_positions_ref(grid_hw, 1)
    tokens = table[pos[:, 0].long(), pos[:, 1].long()]
    box = torch.tensor([[3.0, 4.0, 13.0, 11.0]])
    out = pool_boxes(tokens, cu, grid_hw, pos, box, torch.tensor([0]), patch, method="roi_align")
    cy, cx = (4.0 + 11.0) / 2 / patch - 0.5, (3.0 + 13.0) / 2 / patch - 0.5  # centre in cell-centre coordinates
    torch.testing.assert_close(out[0], torch.tensor([0.5 * cy - 0.25 * cx + 1.0, 2.0 * cx]))


def test_pool_boxes_roi_align_against_torchvision():
    ops = pytest.importorskip("torchvision.ops")
    gen = torch.Generator().manual_seed(9)
    patch = 4
    tokens, cu, grid_hw, pos, tables = _packed_grid([(5, 7)], 1, 3, gen)
    boxes = torch.tensor([[0.0, 0.0, 28.0, 20.0], [3.5, 2.25, 9.0, 13.75]])
    out = pool_boxes(tokens, cu, grid_hw, pos, boxes, torch.tensor([0, 0]), patch, method="roi_align",
                     output_size=4, sampling_ratio=2)
    feature = tables[0].permute(2, 0, 1)[None]
    ref = ops.roi_align(feature, [boxes], output_size=4, spatial_scale=1 / patch, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(out, ref.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)


def test_pool_boxes_bad_inputs():
    gen = torch.Generator().manual_seed(10)
    tokens, cu, grid_hw, pos, _ = _packed_grid([(2, 2)], 1, 3, gen)
    with pytest.raises(ValueError, match=r"boxes\[1\].*no area inside its 8x8 image"):
        pool_boxes(tokens, cu, grid_hw, pos, torch.tensor([[0.0, 0, 4, 4], [9.0, 0, 12, 4]]),
                   torch.tensor([0, 0]), 4)
    two, cu2, grid2, pos2, _ = _packed_grid([(2, 2), (2, 2)], 1, 3, gen)
    with pytest.raises(ValueError, match=r"boxes\[3\].*no area inside its 8x8 image"):  # not contiguous per image
        pool_boxes(two, cu2, grid2, pos2, torch.tensor([[0.0, 0, 4, 4], [0, 0, 4, 4], [0, 0, 4, 4], [9, 0, 12, 4]]),
                   torch.tensor([1, 0, 1, 1]), 4)
    with pytest.raises(ValueError, match="tokens has 3 rows"):
        pool_boxes(tokens[:3], cu, grid_hw, pos, torch.tensor([[0.0, 0, 4, 4]]), torch.tensor([0]), 4)
    with pytest.raises(ValueError, match=r"box_image\[0\] = 1"):
        pool_boxes(tokens, cu, grid_hw, pos, torch.tensor([[0.0, 0, 4, 4]]), torch.tensor([1]), 4)


def test_region_classification_with_a_projection():
    # Box features are class embeddings rotated by a fixed matrix; the projection undoes it.
    gen = torch.Generator().manual_seed(11)
    rot, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    classes = torch.nn.functional.normalize(torch.randn(4, 6, generator=gen), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 2, 1])
    feats = classes[labels] @ rot.T
    out = region_classification(feats, lambda f: f @ rot, classes, labels)
    assert out["top1"] == 1.0 and out["n"] == 6
    out = region_classification(feats, lambda f: f, classes, labels)  # without the projection: not all right
    assert out["top1"] < 1.0


# ---- zero-shot classifier -------------------------------------------------------------------------------------


def test_class_embeddings_need_a_positive_class_count():
    with pytest.raises(ValueError, match="n_classes must be an integer >= 1, got 0"):
        class_embeddings(torch.randn(4, 3), 0)


def test_class_embeddings_average_normalised_template_embeddings():
    names = ["cat", "dog", "red circle"]
    texts = prompts(names, SIMPLE_IMAGENET_TEMPLATES[:2])
    assert texts[:3] == ["itap of a cat.", "a bad photo of the cat.", "itap of a dog."]
    assert prompts(["x"], [lambda c: f"<{c}>"]) == ["<x>"]
    gen = torch.Generator().manual_seed(12)
    emb = torch.randn(6, 8, generator=gen)
    weights = class_embeddings(emb, 3)
    for k in range(3):
        a, b = torch.nn.functional.normalize(emb[2 * k : 2 * k + 2], dim=-1)
        ref = (a + b) / (a + b).norm()
        torch.testing.assert_close(weights[k], ref)
    calls = []

    def encode(batch):
        calls.append(list(batch))
        return torch.randn(len(batch), 8, generator=gen)

    assert build_classifier(encode, names, ("a {}",)).shape == (3, 8) and calls == [["a cat", "a dog", "a red circle"]]
    with pytest.raises(ValueError, match="no '\\{\\}' placeholder"):
        prompts(names, ["a photo"])


@pytest.mark.gpu
def test_gpu_metrics_and_pooling_match_the_cpu():
    gen = torch.Generator().manual_seed(13)
    img, txt = torch.randn(300, 16, generator=gen), torch.randn(300, 16, generator=gen)
    txt = img + txt
    for a, b in zip(retrieval_ranks(img, txt), retrieval_ranks(img.cuda(), txt.cuda()), strict=True):
        assert torch.equal(a, b.cpu())
    tokens, cu, grid_hw, pos, _ = _packed_grid([(4, 6), (6, 2)], 2, 5, gen)
    boxes, box_image = torch.tensor([[3.5, 2.25, 9.0, 13.75], [1.0, 1.0, 7.0, 20.0]]), torch.tensor([0, 1])
    for method in ("mean", "roi_align"):
        ref = pool_boxes(tokens, cu, grid_hw, pos, boxes, box_image, 4, 2, method=method)
        out = pool_boxes(tokens.cuda(), cu.cuda(), grid_hw.cuda(), pos.cuda(), boxes, box_image, 4, 2, method=method)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)

"""Retrieval, hard-negative and classification metrics on embeddings whose answers are known."""

import math

import pytest
import torch

from fineviti.eval import metrics
from fineviti.eval.metrics import (
    classification_accuracy,
    hard_negative_accuracy,
    retrieval_metrics,
    retrieval_metrics_multi,
    retrieval_ranks,
)


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
    assert out["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2 + 1 / 2 + 1 / 2) / 5)
    with pytest.raises(ValueError, match="no image has a hard negative"):
        hard_negative_accuracy(img, pos, neg[:0], neg_image[:0])


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
    assert out["top5"] == 0.0 and out["top6"] == 1.0
    assert out["chance_top1"] == pytest.approx(1 / 6)

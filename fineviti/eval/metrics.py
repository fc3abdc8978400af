"""Retrieval, hard-negative and classification metrics on embeddings.

Every metric is a fraction in [0, 1] (not a percentage). Scores are cosine similarities (both sides
L2-normalised first unless `normalize=False`), computed in fp32 in row chunks so that no n x n matrix is ever
held: memory is O(chunk * n), and n = 100k runs on a CPU.

Ties count against the model. The rank of the true candidate is the number of *other* (wrong) candidates whose
score is greater than or equal to the true one's, and a query is a hit at k when rank < k. A model that maps
every input to the same embedding therefore scores 0, never 1; random continuous embeddings have no ties. A tie
is between the computed fp32 scores: two scores equal in exact arithmetic may round apart, and which way can
depend on the matmul's shape (chunk_size), so exact ties are only guaranteed for identical embeddings.

A k at or above the number of candidates a query ranks (images for text-to-image, classes, the captions of the
other images plus one for image-to-text) makes every query a hit: such a recall is NaN, not 1.0 (e.g. top5 with
fewer than five classes), as clip_benchmark reports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_KS = (1, 5, 10)
# Elements of one similarity chunk (fp32): 2^24 = 64 MiB, plus a bool mask of the same shape.
_CHUNK_ELEMENTS = 1 << 24


def _matrix(x: torch.Tensor, name: str, allow_empty: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] < (0 if allow_empty else 1) or x.shape[1] < 1:
        least = 0 if allow_empty else 1
        raise ValueError(f"{name} must have shape (n, dim) with n >= {least} and dim >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    x = x.detach().float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name} holds a non-finite value (first in row {bad}); expected finite embeddings")
    return x


def _prepare(x: torch.Tensor, name: str, normalize: bool, allow_empty: bool = False) -> torch.Tensor:
    x = _matrix(x, name, allow_empty)
    if normalize:  # each row scaled by its largest magnitude first: an fp32 norm overflows from about 1e19 and
        # zeroed the row (no fp64 copy of the whole matrix)
        x = torch.nn.functional.normalize(x / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30), dim=-1)
    return x


def _index_vector(index: torch.Tensor, name: str, length: int, upper: int, upper_name: str) -> torch.Tensor:
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index)
    if index.dim() != 1 or index.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(index.shape)}")
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {index.dtype}")
    index = index.long()
    if length and (int(index.min()) < 0 or int(index.max()) >= upper):
        bad = int(((index < 0) | (index >= upper)).nonzero()[0, 0])
        raise ValueError(
            f"{name}[{bad}] = {int(index[bad])} is out of range; expected 0 <= value < {upper_name} = {upper}"
        )
    return index


def _chunk_rows(n_cols: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, _CHUNK_ELEMENTS // max(1, n_cols))


def _count(mask: torch.Tensor) -> torch.Tensor:
    # int32 accumulation: about 1.5x faster than the default int64 sum of a bool matrix on a CPU.
    return mask.sum(dim=1, dtype=torch.int32)


def _check_dims(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{a_name} has dim {a.shape[1]} but {b_name} has dim {b.shape[1]}; expected the same")
    if a.device != b.device:
        raise ValueError(f"{a_name} is on {a.device} but {b_name} on {b.device}; expected one device")


def retrieval_ranks(img_emb: torch.Tensor, txt_emb: torch.Tensor, txt_image: torch.Tensor | None = None, *,
                    normalize: bool = True, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of the true matches: (i2t (n_images,), t2i (n_texts,)), int64, 0 = ranked first.

    txt_image (n_texts,) says which image each caption belongs to; None means caption i belongs to image i
    (then n_texts must equal n_images). i2t: rank of the image's best-scoring own caption among the captions of
    other images; t2i: rank of the caption's image among all images. Ties count against (see the module doc).
    """
    img = _prepare(img_emb, "img_emb", normalize)
    txt = _prepare(txt_emb, "txt_emb", normalize)
    _check_dims(img, txt, "img_emb", "txt_emb")
    n_img, n_txt = img.shape[0], txt.shape[0]
    if txt_image is None:
        if n_img != n_txt:
            raise ValueError(
                f"img_emb has {n_img} rows and txt_emb {n_txt}; without txt_image row i of each must match, "
                "so expected equal counts (pass txt_image for several captions per image)"
            )
        txt_image = torch.arange(n_txt, device=img.device)
    else:
        txt_image = _index_vector(txt_image, "txt_image", n_txt, n_img, "n_images").to(img.device)
        counts = torch.bincount(txt_image, minlength=n_img)
        if bool((counts == 0).any()):
            bad = int((counts == 0).nonzero()[0, 0])
            raise ValueError(f"image {bad} has no caption in txt_image; expected every image to have at least one")

    # Each image's own captions as a padded (n_img, most captions) index table, so that the true scores are
    # gathered from the same similarity chunk they are compared with (bit-identical values, exact ties).
    order = torch.argsort(txt_image, stable=True)
    counts = torch.bincount(txt_image, minlength=n_img)  # all ones without txt_image
    slot = torch.arange(n_txt, device=img.device) - (torch.cumsum(counts, 0) - counts)[txt_image[order]]
    own = torch.zeros(n_img, int(counts.max()), dtype=torch.long, device=img.device)
    own[txt_image[order], slot] = order
    pad = torch.arange(own.shape[1], device=img.device)[None, :] >= counts[:, None]

    i2t = torch.empty(n_img, dtype=torch.long, device=img.device)
    rows = _chunk_rows(n_txt, chunk_size)
    for start in range(0, n_img, rows):
        stop = min(start + rows, n_img)
        sim = img[start:stop] @ txt.T  # (c, n_txt)
        own_score = sim.gather(1, own[start:stop]).masked_fill(pad[start:stop], float("-inf"))
        best_own = own_score.amax(dim=1, keepdim=True)
        # Everything at or above the best own caption, less the own captions among them.
        i2t[start:stop] = _count(sim >= best_own) - _count(own_score >= best_own)

    t2i = torch.empty(n_txt, dtype=torch.long, device=img.device)
    rows = _chunk_rows(n_img, chunk_size)
    for start in range(0, n_txt, rows):
        stop = min(start + rows, n_txt)
        sim = txt[start:stop] @ img.T  # (c, n_img)
        true = sim.gather(1, txt_image[start:stop, None])
        t2i[start:stop] = _count(sim >= true) - 1  # minus the true image itself
    return i2t, t2i


def recall_at(ranks: torch.Tensor, k: int, candidates: int | None = None) -> float:
    """Fraction of queries whose true match has rank < k; NaN when k >= `candidates` (each query ranks that many,
    so every one is a hit: see the module doc)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if candidates is not None and k >= candidates:
        return float("nan")
    return float((ranks < k).double().mean())


def _recalls(i2t: torch.Tensor, t2i: torch.Tensor, ks: Sequence[int], i2t_candidates: int,
             t2i_candidates: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = recall_at(i2t, k, i2t_candidates)
    for k in ks:
        out[f"t2i_r{k}"] = recall_at(t2i, k, t2i_candidates)
    return out


def retrieval_metrics(img_emb: torch.Tensor, txt_emb: torch.Tensor, *, ks: Sequence[int] = DEFAULT_KS,
                      normalize: bool = True, chunk_size: int | None = None) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k for pairs where row i of each matches.

    img_emb, txt_emb: (n, dim) float. Returns `i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10` as fractions in
    [0, 1], `chance_r1` = 1/n (expected R@1 of random embeddings) and `n`. Ties count as misses.
    """
    i2t, t2i = retrieval_ranks(img_emb, txt_emb, None, normalize=normalize, chunk_size=chunk_size)
    n = int(i2t.shape[0])
    return {**_recalls(i2t, t2i, ks, n, n), "chance_r1": 1.0 / n, "n": n}


def retrieval_metrics_multi(img_emb: torch.Tensor, txt_emb: torch.Tensor, txt_image: torch.Tensor, *,
                            ks: Sequence[int] = DEFAULT_KS, normalize: bool = True,
                            chunk_size: int | None = None) -> dict[str, float]:
    """Recall@k with several captions per image (COCO and Flickr30k have five).

    txt_image (n_texts,) int: the image of each caption. i2t: a hit at k when any of the image's own captions is
    in the top k; t2i: a hit when the caption's image is in the top k. Returns the recalls, `chance_r1` =
    1/n_images (random t2i R@1), `n` = n_images and `n_texts`.
    """
    i2t, t2i = retrieval_ranks(img_emb, txt_emb, txt_image, normalize=normalize, chunk_size=chunk_size)
    n, n_texts = int(i2t.shape[0]), int(t2i.shape[0])
    # an image ranks its best own caption among the others' captions: at most n_texts - (its captions) + 1
    fewest_own = int(torch.bincount(torch.as_tensor(txt_image).long(), minlength=n).min())
    recalls = _recalls(i2t, t2i, ks, n_texts - fewest_own + 1, n)
    return {**recalls, "chance_r1": 1.0 / n, "n": n, "n_texts": n_texts}


def hard_negative_accuracy(img_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor,
                           neg_image: torch.Tensor, *, normalize: bool = True) -> dict[str, float]:
    """For each image, does its true caption score strictly above every one of its hard negatives?

    img_emb (n, dim), pos_emb (n, dim): image i and its true caption; neg_emb (m, dim) with neg_image (m,) naming
    the image each negative caption belongs to. Images without negatives are left out (and counted).
    Returns `accuracy` (fraction of images where the true caption wins; a tie is a loss), `n` (images scored),
    `n_negatives` (m), `chance` (mean of 0.5 ** negatives of the image), `chance_exchangeable` (mean of
    1 / (1 + negatives of the image)), `pair_accuracy` (fraction of (image, negative) pairs where the true caption
    scores strictly higher), `pair_chance` (0.5) and `n_without_negatives`.

    Two chance levels. Hard negatives are one-edit variants of the true caption, so a model blind to the edits
    scores each negative as the true caption plus independent symmetric noise: the true caption beats all k with
    probability 0.5 ** k (`chance`; 0.0625 at k = 4). Untrained towers land there on fineviti's synthetic split
    (0.058-0.088 over three seeds, k = 4, n = 500), not at 1 / (1 + k), which holds only when the k + 1 captions'
    scores are exchangeable (independent captions; `chance_exchangeable`, 0.2 at k = 4). `pair_accuracy` has
    chance 0.5 under both.
    """
    img = _prepare(img_emb, "img_emb", normalize)
    pos = _prepare(pos_emb, "pos_emb", normalize)
    neg = _prepare(neg_emb, "neg_emb", normalize, allow_empty=True)
    _check_dims(img, pos, "img_emb", "pos_emb")
    _check_dims(img, neg, "img_emb", "neg_emb")
    if pos.shape[0] != img.shape[0]:
        raise ValueError(f"pos_emb has {pos.shape[0]} rows, expected one per image ({img.shape[0]})")
    n = img.shape[0]
    neg_image = _index_vector(neg_image, "neg_image", neg.shape[0], n, "n_images").to(img.device)
    # one product for both, so that a negative identical to its true caption scores bit-equal (a tie, a loss) on
    # any device (two launches of different lengths may sum in different orders)
    scores = (img[torch.cat([torch.arange(n, device=img.device), neg_image])] * torch.cat([pos, neg])).sum(dim=1)
    pos_score, neg_score = scores[:n], scores[n:]
    best_neg = torch.full((n,), float("-inf"), device=img.device)
    best_neg = best_neg.scatter_reduce(0, neg_image, neg_score, reduce="amax", include_self=True)
    count = torch.bincount(neg_image, minlength=n)
    scored = count > 0
    n_scored = int(scored.sum())
    if n_scored == 0:
        raise ValueError("no image has a hard negative (neg_image is empty); expected at least one")
    wins = (pos_score > best_neg) & scored
    return {
        "accuracy": float(wins.sum()) / n_scored,
        "n": n_scored,
        "n_negatives": int(neg.shape[0]),
        "chance": float((0.5 ** count[scored].double()).mean()),
        "chance_exchangeable": float((1.0 / (1.0 + count[scored].double())).mean()),
        "pair_accuracy": float((pos_score[neg_image] > neg_score).double().mean()),
        "pair_chance": 0.5,
        "n_without_negatives": int(n - n_scored),
    }


def classification_ranks(emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor, *,
                         normalize: bool = True, chunk_size: int | None = None) -> torch.Tensor:
    """Rank of the true class among all classes for each row of `emb` (ties count against), int64 (n,)."""
    x = _prepare(emb, "emb", normalize)
    w = _prepare(class_emb, "class_emb", normalize)
    _check_dims(x, w, "emb", "class_emb")
    labels = _index_vector(labels, "labels", x.shape[0], w.shape[0], "n_classes").to(x.device)
    ranks = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    rows = _chunk_rows(w.shape[0], chunk_size)
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        sim = x[start:stop] @ w.T
        true = sim.gather(1, labels[start:stop, None])
        ranks[start:stop] = _count(sim >= true) - 1
    return ranks


def classification_accuracy(emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor, *,
                            ks: Sequence[int] = (1, 5), normalize: bool = True,
                            chunk_size: int | None = None) -> dict[str, float]:
    """Top-k accuracy of nearest-class-embedding classification (zero-shot and region-level).

    emb (n, dim), class_emb (n_classes, dim), labels (n,) int in [0, n_classes). Returns `top1`, `top5` (one
    key per k) as fractions, `n`, `n_classes` and `chance_top1` = 1/n_classes. Ties count as misses.
    """
    ranks = classification_ranks(emb, class_emb, labels, normalize=normalize, chunk_size=chunk_size)
    n_classes = int(class_emb.shape[0])
    out = {f"top{k}": recall_at(ranks, k, n_classes) for k in ks}
    return {**out, "n": int(ranks.shape[0]), "n_classes": n_classes, "chance_top1": 1.0 / n_classes}

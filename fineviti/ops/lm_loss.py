"""Cross-entropy of a linear output head without the (rows, vocab) logits: the stage-2 LM loss.

`linear_cross_entropy(hidden, weight, targets)` is `F.cross_entropy(F.linear(hidden, weight, bias).float(),
targets, ignore_index=-100, reduction="sum")` without the (rows, vocab) logits: the forward runs blocks of
`chunk_rows` rows over all classes and saves only the (rows,) log-sum-exps; the backward recomputes the logits
block by block and turns them into the gradients of hidden, weight and bias. With fewer rows than classes (the
aligner's case) its blocks are of classes over all rows, about as many elements as a forward block: each slice of
the weight's gradient is then one product written once, and the hidden states' gradient, the smaller tensor, is
what sums over blocks (in fp32); with more rows than classes it is the other way round. Peak memory beyond the
inputs, a 16-bit copy of the weight (cast once, in the forward, and kept for the backward, as F.linear under
autocast keeps its cast) and the gradients: a few (chunk_rows, vocab) fp32 blocks, against rows x vocab
x (2 + 4 + 4 + 2) bytes for the logits, their fp32 copy, its gradient and the logits' gradient when the logits
exist (9.8 GB of fp32 logits alone for 16k tokens of a 150k vocabulary). The products run as F.linear would run
them: in the autocast dtype when autocast is on (bf16 logits with the bias added before the rounding, then the
fp32 softmax, as the plain expression does), else in the inputs' dtype; fp64 inputs run in fp64 throughout.

Pure torch (cuBLAS does the products; a fused kernel would save the recomputation's extra pass over the logits,
not memory). The aligner gathers the answer positions first, so the head never runs on image or prompt tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_BYTES = 256 * 2**20  # the fp32 (chunk, vocab) block the default chunk size aims at


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                             reduction: str = "sum") -> torch.Tensor:
    """Plain torch: the whole logits, cast to fp32 (fp64 ones kept), then cross-entropy."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.to(_loss_dtype(logits.dtype)), targets, ignore_index=ignore_index,
                           reduction=reduction)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax runs in fp32, or fp64 for fp64 logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk: a (rows, vocab) fp32 block of about CHUNK_BYTES, at least 128 rows, at most 8192."""
    return max(128, min(8192, CHUNK_BYTES // (4 * max(vocab, 1))))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What F.linear would multiply in: the autocast dtype when autocast is on (it leaves fp64 alone), else the
    promoted input dtype."""
    device = hidden.device.type
    fp64 = torch.float64 in (hidden.dtype, weight.dtype)
    if torch.is_autocast_enabled(device) and not fp64:
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, chunk, dtype, mean):
        rows = hidden.shape[0]
        h, w, b = hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        lse = torch.empty(rows, dtype=_loss_dtype(dtype), device=hidden.device)
        total = torch.zeros((), dtype=lse.dtype, device=hidden.device)
        valid = targets != ignore_index
        count = valid.sum()
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            logits = _logits(h[part], w, b)
            lse[part] = torch.logsumexp(logits, dim=1)
            # ignored rows gather class 0 (any ignore_index, negative or past the vocabulary), then count as 0
            picked = logits.gather(1, torch.where(valid[part], targets[part], 0)[:, None])[:, 0]
            total += torch.where(valid[part], lse[part] - picked, 0.0).sum()
        # The operands as multiplied (the casts, where there are any: F.linear under autocast keeps its cast
        # weight for the backward too), so that the backward does not cast the (vocab, features) weight again.
        ctx.save_for_backward(h, w, b, targets, lse, count)
        ctx.args = (ignore_index, chunk, mean, hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(count)
        return (total / count.clamp(min=1) if mean else total), count

    @staticmethod
    def backward(ctx, grad, _grad_count):
        if torch.is_grad_enabled():
            raise RuntimeError("linear_cross_entropy does not support a double backward (create_graph=True): its "
                               "backward recomputes the logits without a graph; use linear_cross_entropy_ref")
        h, w, b, targets, lse, count = ctx.saved_tensors
        ignore_index, chunk, mean, hidden_dtype, weight_dtype, bias_dtype = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        scale = grad / count.clamp(min=1) if mean else grad
        rows, vocab = h.shape[0], w.shape[0]
        valid = targets != ignore_index
        row_scale = (valid.to(lse.dtype) * scale)[:, None]
        if rows <= vocab:
            dh, dw, db = _grads_by_vocab_blocks(h, w, b, targets, valid, lse, row_scale, chunk * vocab,
                                                need_h, need_w, need_b, weight_dtype)
        else:
            dh, dw, db = _grads_by_row_blocks(h, w, b, targets, valid, lse, row_scale, chunk, need_h, need_w,
                                              need_b)
        return (None if dh is None else dh.to(hidden_dtype), None if dw is None else dw.to(weight_dtype),
                None if db is None else db.to(bias_dtype), None, None, None, None, None)


def _dlogits(logits, lse, targets, valid, row_scale, col0: int):
    """d loss / d logits of a (rows, cols) block whose columns start at class col0, in place: (softmax -
    onehot(target)) times the row's upstream factor (0 on ignored rows)."""
    g = torch.exp(logits.sub_(lse[:, None]))
    hit = valid & (targets >= col0) & (targets < col0 + g.shape[1])
    g.scatter_add_(1, (targets - col0).clamp(0, g.shape[1] - 1)[:, None], -hit[:, None].to(g.dtype))
    return g.mul_(row_scale)


def _grads_by_vocab_blocks(h, w, b, targets, valid, lse, row_scale, block_elems, need_h, need_w, need_b,
                           weight_dtype):
    """Fewer rows than classes (the aligner's case: thousands of answer tokens, tens of thousands of classes):
    blocks of classes over all rows. Each block's slice of the weight's (and bias's) gradient is one product,
    written once; the hidden states' gradient, the smaller one, is what sums over blocks (fp32)."""
    rows, vocab = h.shape[0], w.shape[0]
    cols = max(1, min(vocab, block_elems // max(rows, 1)))
    dh = torch.zeros(h.shape, dtype=lse.dtype, device=h.device) if need_h else None
    dw = torch.empty(w.shape, dtype=weight_dtype, device=w.device) if need_w else None  # slices cast as written
    db = torch.empty(vocab, dtype=lse.dtype, device=h.device) if need_b else None
    for col0 in range(0, vocab, cols):
        part = slice(col0, min(col0 + cols, vocab))
        g = _dlogits(_logits(h, w[part], None if b is None else b[part]), lse, targets, valid, row_scale, col0)
        if db is not None:
            db[part] = g.sum(0)
        g16 = g.to(h.dtype)
        if dw is not None:
            dw[part] = g16.t() @ h
        if dh is not None:
            dh += g16 @ w[part]
    return dh, dw, db


def _grads_by_row_blocks(h, w, b, targets, valid, lse, row_scale, chunk, need_h, need_w, need_b):
    """More rows than classes: blocks of rows over all classes; the weight's gradient, now the smaller one, sums
    over blocks (fp32) and each block's rows get their hidden-state gradient once."""
    rows = h.shape[0]
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
    dw = torch.zeros(w.shape, dtype=lse.dtype, device=w.device) if need_w else None
    db = torch.zeros(w.shape[0], dtype=lse.dtype, device=h.device) if need_b else None
    for start in range(0, rows, chunk):
        part = slice(start, min(start + chunk, rows))
        g = _dlogits(_logits(h[part], w, b), lse[part], targets[part], valid[part], row_scale[part], 0)
        if db is not None:
            db += g.sum(0)
        g16 = g.to(h.dtype)
        if dh is not None:
            dh[part] = g16 @ w
        if dw is not None:
            dw += g16.t() @ h[part]
    return dh, dw, db


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear in the compute dtype (the bias added before the rounding, as F.linear adds it), then the loss
    dtype."""
    return F.linear(h, w, b).to(_loss_dtype(h.dtype))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = IGNORE_INDEX,
                         reduction: str = "sum", chunk_rows: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, in chunks of rows (module docstring).

    hidden: (rows, features), float; weight: (vocab, features); bias: (vocab,) or None; targets: (rows,) int64 in
    [0, vocab) or ignore_index. reduction: "sum" (the default) or "mean" over the targets that are not ignored (0,
    with a zero gradient, when there are none). chunk_rows: rows per chunk (default: default_chunk_rows(vocab)).
    Returns (loss, an fp32 scalar (fp64 for fp64 inputs); the number of targets not ignored, an int64 scalar
    without gradient).
    Targets out of range raise on a CPU; on a GPU a device-side assert fires (no synchronisation).
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape (rows, features), got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape (vocab, {hidden.shape[1]}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if targets.shape != (hidden.shape[0],) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 of shape ({hidden.shape[0]},), got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; they must match")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    if targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if targets.device.type == "cpu":
            if bool(bad.any()):
                raise ValueError(f"targets must be in [0, {weight.shape[0]}) or ignore_index ({ignore_index}), "
                                 f"got {targets[bad][:5].tolist()}")
        else:  # a device-side assert: no synchronisation, and no silent class 0 for a stray negative label
            torch._assert_async(~bad.any(), f"linear_cross_entropy: targets must be in [0, {weight.shape[0]}) "
                                            f"or ignore_index ({ignore_index})")
    chunk = chunk_rows or default_chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, chunk,
                                     _compute_dtype(hidden, weight), reduction == "mean")

"""Cross-entropy of a linear output head without the (rows, vocab) logits: the stage-2 LM loss.

`linear_cross_entropy(hidden, weight, targets)` is `F.cross_entropy(F.linear(hidden, weight, bias).float(),
targets, ignore_index=-100, reduction="sum")`, computed in chunks of rows: the forward keeps one (chunk, vocab)
fp32 block at a time and saves only the (rows,) log-sum-exps; the backward recomputes each chunk's logits and
turns them into the gradients of hidden, weight and bias. Peak memory beyond the inputs and the weight's gradient:
about 3 x chunk x vocab x 4 bytes, against rows x vocab x (2 + 4 + 4 + 2) bytes for logits, their fp32 copy, its
gradient and the logits' gradient when the logits exist (9.8 GB of fp32 logits alone for 16k tokens of a 150k
vocabulary). The products run as F.linear would run them: in the autocast dtype when autocast is on (bf16 logits,
rounded to bf16 before the fp32 softmax, as the plain expression rounds them), else in the inputs' dtype; the
weight's gradient is summed over chunks in fp32 (fp64 for fp64 inputs, which run in fp64 throughout).

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
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.is_floating_point():
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, chunk, dtype, mean):
        rows = hidden.shape[0]
        w = weight.to(dtype)
        lse = torch.empty(rows, dtype=_loss_dtype(dtype), device=hidden.device)
        total = torch.zeros((), dtype=lse.dtype, device=hidden.device)
        valid = targets != ignore_index
        count = valid.sum()
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            logits = _logits(hidden[part], w, bias, dtype)
            lse[part] = torch.logsumexp(logits, dim=1)
            picked = logits.gather(1, targets[part].clamp(min=0)[:, None])[:, 0]
            total += torch.where(valid[part], lse[part] - picked, 0.0).sum()
        ctx.save_for_backward(hidden, weight, bias, targets, lse, count)
        ctx.args = (ignore_index, chunk, dtype, mean)
        ctx.mark_non_differentiable(count)
        return (total / count.clamp(min=1) if mean else total), count

    @staticmethod
    def backward(ctx, grad, _grad_count):
        if torch.is_grad_enabled():
            raise RuntimeError("linear_cross_entropy does not support a double backward (create_graph=True): its "
                               "backward recomputes the logits without a graph; use linear_cross_entropy_ref")
        hidden, weight, bias, targets, lse, count = ctx.saved_tensors
        ignore_index, chunk, dtype, mean = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        scale = grad / count.clamp(min=1) if mean else grad
        w = weight.to(dtype)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=lse.dtype, device=bias.device) if need_b else None
        rows = hidden.shape[0]
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            logits = _logits(hidden[part], w, bias, dtype)
            # d(lse - logit[target]) / d logits = softmax - onehot(target), zero on ignored rows, times the
            # upstream gradient (over the target count for the mean)
            g = torch.exp(logits.sub_(lse[part, None]))
            tgt = targets[part]
            valid = tgt != ignore_index
            g.scatter_add_(1, tgt.clamp(min=0)[:, None], -valid[:, None].to(g.dtype))
            g.mul_((valid.to(g.dtype) * scale)[:, None])
            if db is not None:
                db += g.sum(0)
            g16 = g.to(dtype)
            if dh is not None:
                dh[part] = (g16 @ w).to(hidden.dtype)
            if dw is not None:
                dw += g16.t() @ hidden[part].to(dtype)
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None, None)


def _logits(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    out = (h.to(dtype) @ w.t()).to(_loss_dtype(dtype))
    return out if bias is None else out + bias.to(out.dtype)


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
    Targets are not range-checked on the device (that would synchronise); on a CPU they are.
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
    if targets.device.type == "cpu" and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {weight.shape[0]}) or ignore_index ({ignore_index}), got "
                             f"{targets[bad][:5].tolist()}")
    chunk = chunk_rows or default_chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, chunk,
                                     _compute_dtype(hidden, weight), reduction == "mean")

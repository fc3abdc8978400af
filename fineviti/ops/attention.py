"""Variable-length packed attention: the public op, its backends and its pure-torch reference.

Tokens of many sequences are concatenated along dim 0; `cu_seqlens` (int32, (n+1,), from 0) marks where each
starts. Attention is non-causal within a sequence and never crosses sequences. Backends (one call, one contract):

  triton        ours (kernels/varlen_attention.py), forward and backward (dq by atomics, or without them
                when deterministic=True)
  torch         reference path: scaled_dot_product_attention per sequence; runs everywhere, differentiable;
                one opaque custom op when traced (torch.compile), so the graph neither breaks nor guards on lengths
  torch_varlen  torch.nn.attention.varlen.varlen_attn (FlashAttention inside torch; CUDA only)
  flex          FlexAttention with a document mask (CUDA only; compiles per shape)
  flash_attn    flash_attn.flash_attn_varlen_func (unverified: never run on a machine of this project)
  xformers      xformers.ops.memory_efficient_attention with BlockDiagonalMask (unverified likewise)

`backend="auto"` follows a fixed rule table, never a timing: triton for CUDA tensors (but torch for fp32 beyond
head_dim 64, which the triton kernels do not take in fp32 on a GPU), torch for CPU tensors.
FINEVITI_ATTN_BACKEND overrides "auto" (empty: "auto", as the other ops' variables). Under autocast the inputs
take the autocast dtype first, whatever the backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import warnings

import torch

from fineviti._checks import (
    check_cu_seqlens,
    env_backend,
    env_flag,
    refuse_interpreted_bf16,
    triton_interpreting,
    value_checks_enabled,
)

BACKENDS = ("triton", "torch", "torch_varlen", "flex", "flash_attn", "xformers")
UNVERIFIED = ("flash_attn", "xformers")  # tested through fake modules only
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def varlen_attention_ref(q, k, v, cu_seqlens, cu_seqlens_k=None, softmax_scale=None, upcast=True, return_lse=False):
    """Plain-torch varlen attention, one sequence at a time (host loop over the lengths).

    With `upcast`, 16-bit inputs are computed in fp32 (pass fp64 tensors for an fp64 reference); without it,
    everything runs in the inputs' dtype, which gives the error budget a kernel in that dtype is held to.
    Returns (total, heads, head_dim) in q's dtype, and with `return_lse` also the (heads, total) log-sum-exp.
    """
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    compute = torch.float32 if (upcast and q.dtype in (torch.float16, torch.bfloat16)) else q.dtype
    bounds_q, bounds_k = cu_seqlens.tolist(), cu_k.tolist()
    outs, lses = [], []
    for i in range(len(bounds_q) - 1):
        qi = q[bounds_q[i]:bounds_q[i + 1]].to(compute).transpose(0, 1)  # (heads, Lq, d)
        ki = k[bounds_k[i]:bounds_k[i + 1]].to(compute).transpose(0, 1)
        vi = v[bounds_k[i]:bounds_k[i + 1]].to(compute).transpose(0, 1)
        scores = (qi @ ki.transpose(1, 2)) * scale
        lse = torch.logsumexp(scores, dim=-1)  # (heads, Lq)
        if ki.shape[1] == 0:  # no keys: zeros, differentiable (as _sdpa_per_sequence's: a zero gradient for q)
            outs.append(torch.where(torch.zeros_like(qi, dtype=torch.bool), qi, 0).transpose(0, 1))
        else:
            outs.append((torch.softmax(scores, dim=-1) @ vi).transpose(0, 1))
        lses.append(lse)
    out = torch.cat(outs, 0).to(q.dtype) if outs else q.new_empty(q.shape)
    if return_lse:
        return out, torch.cat(lses, 1).float() if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Ours: Triton, as a torch.library custom op with an autograd formula, so torch.compile traces it whole.
# ----------------------------------------------------------------------------------------------------------------


def _kernels():
    from fineviti.kernels import varlen_attention

    return varlen_attention


def _host_lengths(seqlens_q: list[int] | None, seqlens_host: torch.Tensor | None) -> list[int] | None:
    """The query lengths on the host, from the list or from the CPU tensor that carries them through a compiled
    graph (reading a CPU tensor does not wait for the device)."""
    if seqlens_q is not None or seqlens_host is None:
        return seqlens_q
    return seqlens_host.tolist()


@torch.library.custom_op("fineviti::varlen_attention_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                seqlens_q: list[int] | None = None, deterministic: bool = False,
                split_mode: str = "masked", seqlens_host: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        softmax_scale, _host_lengths(seqlens_q, seqlens_host), mode=split_mode)


@_triton_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, seqlens_q=None,
      deterministic=False, split_mode="masked", seqlens_host=None):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fineviti::varlen_attention_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def _triton_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                max_seqlen_k: int, softmax_scale: float, seqlens_q: list[int] | None = None,
                deterministic: bool = False, split_mode: str = "masked", self_attention: bool = False,
                seqlens_host: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # self_attention: the key lengths are the query lengths (cu_seqlens_k is cu_seqlens_q at the call: an identity
    # a traced graph does not keep)
    seqlens_q = _host_lengths(seqlens_q, seqlens_host)
    return _kernels().attention_backward(do.contiguous() if do.stride(-1) != 1 else do, q, k, v, o, lse,
                                         cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                         seqlens_q, seqlens_q if self_attention else None,
                                         deterministic=deterministic, mode=split_mode)


@_triton_bwd.register_fake
def _(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, seqlens_q=None,
      deterministic=False, split_mode="masked", self_attention=False, seqlens_host=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens_q, deterministic, split, seqlens_host = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k, seqlens_host)
    ctx.args = (max_q, max_k, scale, seqlens_q, deterministic, split, cu_k is cu_q)
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, do, dlse):
    q, k, v, o, lse, cu_q, cu_k, seqlens_host = ctx.saved_tensors
    max_q, max_k, scale, seqlens_q, deterministic, split, self_attention = ctx.args
    # the forward's split mode, whatever FINEVITI_ATTN_SPLIT says now
    dq, dk, dv = _triton_bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, scale, seqlens_q, deterministic, split,
                             self_attention, seqlens_host)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fineviti::varlen_attention_fwd", _fwd_backward, setup_context=_fwd_setup_context)


def _run_triton(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens, return_lse, deterministic=False,
                seqlens_host=None):
    if q.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported "
                           "(Triton's interpreter); use backend='torch' on a CPU")
    refuse_interpreted_bf16("varlen_attention", q, "backend='torch' on a CPU")
    # the kernels index cu_seqlens with stride 1: a strided view is copied (a few bytes; the identity of a shared
    # cu_seqlens is kept, it marks self-attention for the backward)
    same = cu_k is cu_q
    cu_q = cu_q.contiguous()
    cu_k = cu_q if same else cu_k.contiguous()
    prep = [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)]
    kernels = _kernels()
    kernels.check_supported(q)
    head_dim = q.shape[-1]
    split = kernels.split_mode()  # read once: the padding rule, the forward and its backward all use this one
    width = triton_padded_head_dim(head_dim, q, split)
    if width != head_dim:
        prep = [torch.nn.functional.pad(t, (0, width - head_dim)) for t in prep]
        o, lse = _triton_fwd(*prep, cu_q, cu_k, max_q, max_k, scale, seqlens, deterministic, split, seqlens_host)
        o = o[..., :head_dim].contiguous()
    else:
        o, lse = _triton_fwd(*prep, cu_q, cu_k, max_q, max_k, scale, seqlens, deterministic, split, seqlens_host)
    return (o, lse) if return_lse else o


def triton_padded_head_dim(head_dim: int, q: torch.Tensor, split: str | None = None) -> int:
    """The head dim the triton kernels run at. Head dims that run as two power-of-two pieces (72 = 64 + 16, and
    80 or 96 under FINEVITI_ATTN_SPLIT=pieces) run so under the interpreter, but on an H100 (2026-11-27, triton 3.6)
    those kernels hit an illegal memory access: at 72 first, then at 80 when 72 was zero-padded to 80
    (benchmarks/results/2026-11-27_H100-80GB-HBM3_gpu_check*.md; again on an H200, 2026-11-28). Until the fault is
    located (triton issues 10486, 10573 and 11366 report illegal shared-memory reads of Hopper wgmma with narrow dot
    operands in 3.6-3.7), CUDA tensors at such head dims are zero-padded to the next power of two: 72 runs at 128.
    FINEVITI_ATTN_PAD_SPLIT=0 turns the padding off (to run the two-piece kernels through this op on a GPU;
    benchmarks/attention_split_probe.py calls the kernels directly). In split mode "masked", the default
    (kernels.split_mode(), or `split`), 80 and 96 run in one 128-column tile with masked columns and nothing is
    padded: the padded FLOPs without the copies. What is padded: 72 always, and 80 and 96 under
    FINEVITI_ATTN_SPLIT=pieces. The H200 run of 2026-11-28 still faulted or computed wrong in the two-piece
    kernels (72, 80, 96)."""
    return padded_head_dim_for(head_dim, q.dtype, q.device.type, split)


def padded_head_dim_for(head_dim: int, dtype: torch.dtype, device_type: str, split: str | None = None) -> int:
    """triton_padded_head_dim by dtype and device type, without a tensor (the GPU check's summary asks what a GPU
    runs)."""
    dim_a, dim_b = _kernels().split_head_dim(head_dim, dtype, split)
    if dim_b == 0 or device_type not in PAD_SPLIT_HEAD_DIMS_ON:
        return head_dim
    if not env_flag("FINEVITI_ATTN_PAD_SPLIT", default=True):
        return head_dim
    return 1 << (head_dim - 1).bit_length()


PAD_SPLIT_HEAD_DIMS_ON = ("cuda",)  # device types where such head dims are padded (the interpreter runs both)


# ----------------------------------------------------------------------------------------------------------------
# RoPE inside the attention kernel (variant (b) of where the rotation goes; issue 4): an experiment beside the
# fused QKV split that the model uses, kept so that the benchmark can time both.
# ----------------------------------------------------------------------------------------------------------------


class _AttentionRope(torch.autograd.Function):
    """Forward: q and k rotated as the kernel loads them (no rotated copies written). Backward: the rotated q and k
    are rebuilt by the rope kernel, the usual backward runs on them, and dq, dk are rotated back (the rotation by
    the negative angle is the transpose of the rotation). The forward's cos/sin come from fp64 tables rounded to
    fp32, the rope kernel's from its own fp32 polynomials: the rebuilt q and k can differ from what the forward
    used by an ulp of their dtype. The forward's half-swapped second load ((cols + HALF) % HEAD_DIM) may not
    vectorise; loading the halves apart would, if the timing says it matters."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen, pos, theta, scale, seqlens, deterministic):
        kernels = _kernels()
        cos, sin = kernels.rope_tables(pos, q.shape[-1], theta)  # (its host read refuses what int32 cannot hold)
        pos = pos.to(torch.int32).contiguous()
        o, lse = kernels.attention_forward(q, k, v, cu, cu, max_seqlen, max_seqlen, scale, seqlens,
                                           rope=(pos, pos, cos, sin))
        ctx.save_for_backward(q, k, v, o, lse, cu, pos)
        ctx.args = (max_seqlen, theta, scale, seqlens, deterministic)
        return o

    @staticmethod
    def backward(ctx, do):
        from fineviti.kernels import rope as rope_kernels

        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients would come back without a grad_fn
            raise RuntimeError("varlen_attention_rope does not support a double backward (create_graph=True through "
                               "it): its gradients carry no second-order terms; use rope_2d and "
                               "varlen_attention_ref for that")
        q, k, v, o, lse, cu, pos = ctx.saved_tensors
        max_seqlen, theta, scale, seqlens, deterministic = ctx.args
        q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, also for strided q and k
        k_rot = torch.empty_like(q_rot)
        rope_kernels.launch(q, k, None, q_rot, k_rot, None, pos, theta, False)
        dq_rot, dk_rot, dv = _kernels().attention_backward(
            do.contiguous(), q_rot, k_rot, v, o, lse, cu, cu, max_seqlen, max_seqlen, scale, seqlens, seqlens,
            deterministic=deterministic)
        dq, dk = torch.empty_like(dq_rot), torch.empty_like(dk_rot)
        rope_kernels.launch(dq_rot, dk_rot, None, dq, dk, None, pos, theta, True)
        return dq, dk, dv, None, None, None, None, None, None, None


def varlen_attention_rope(q, k, v, cu_seqlens, max_seqlen, pos, *, theta=10000.0, softmax_scale=None, seqlens=None,
                          deterministic=False, check_values=None):
    """varlen_attention(rope_2d(q, pos), rope_2d(k, pos), v, cu_seqlens, max_seqlen) with the rotation done inside
    the triton attention kernel as it loads q and k (no rotated copies in the forward). Self-attention only
    (one cu_seqlens), the triton backend only (a GPU, or the interpreter on a CPU), head_dim a power of two from
    16 to 128. pos: (total, 2) non-negative integers (row, col), as rope_2d takes them. One host read of pos's
    minimum and maximum (the size of the cos/sin tables: (max + 1) x head_dim / 4 floats each; a negative position
    raises). The model uses the fused QKV split (qkv_split_rope) instead; this exists so that the two can
    be timed against each other (benchmarks/bench_rope.py, attn_block rows). Under autocast q, k and v take its
    dtype first, as in varlen_attention (they were computed and returned in their own dtype)."""
    q, k, v = _autocast_inputs(q, k, v)
    max_seqlen = _max_seqlen("max_seqlen", max_seqlen)
    _check_inputs(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, check_values)
    _check_seqlens(seqlens, cu_seqlens, q.shape[0], check_values, max_seqlen)
    total, heads, head_dim = q.shape
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 128:
        raise ValueError(f"varlen_attention_rope takes a power-of-two head_dim from 16 to 128, got {head_dim}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must have one shape here (self-attention), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not isinstance(pos, torch.Tensor) or pos.shape != (total, 2) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"pos must be an int32/int64 tensor of shape ({total}, 2), got "
                         f"{getattr(pos, 'dtype', type(pos).__name__)} {tuple(getattr(pos, 'shape', ()))}")
    if pos.device != q.device:
        raise ValueError(f"pos is on {pos.device} but q is on {q.device}; they must match")
    from fineviti.ops.rope import _theta, check_positions

    theta = _theta(theta)  # 0, a negative, NaN or inf made NaN tables without a word
    if value_checks_enabled(pos, check_values):
        check_positions(pos)
    if q.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("varlen_attention_rope on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                           "imported; use rope_2d and varlen_attention on a CPU")
    refuse_interpreted_bf16("varlen_attention_rope", q, "rope_2d and backend='torch' on a CPU")
    cu_seqlens = cu_seqlens.contiguous()  # the kernels index it with stride 1
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    if k.stride() != q.stride():  # the rope kernel of the backward reads q and k with one set of strides
        q, k = q.contiguous(), k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    return _AttentionRope.apply(q, k, v, cu_seqlens, max_seqlen, pos, theta,
                                scale, list(seqlens) if seqlens is not None else None, deterministic)


# ----------------------------------------------------------------------------------------------------------------
# Other backends
# ----------------------------------------------------------------------------------------------------------------


def _run_torch(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens, return_lse):
    if torch.compiler.is_compiling():
        # Traced, the per-sequence loop reads the lengths on the host (a graph break, or an error under
        # fullgraph=True) and specialises the graph on them (one recompile per pack): the same computation as one
        # opaque custom op instead, which the trace keeps whole.
        # (varlen_attention has already given the inputs the autocast dtype)
        o, lse = _torch_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse)
        return (o, lse) if return_lse else o
    if return_lse:  # without a gradient, as the triton backend's (and traced, this backend's)
        o, lse = _sdpa_per_sequence(q, k, v, cu_q, cu_k, scale, seqlens, True)
        return o, lse.detach()
    return _sdpa_per_sequence(q, k, v, cu_q, cu_k, scale, seqlens, False)


def _sdpa_per_sequence(q, k, v, cu_q, cu_k, scale, seqlens, return_lse):
    # One host read of the lengths unless `seqlens` is given: this path is the reference, not the fast one.
    # torch.split, not slicing: the backward of a slice writes a zero tensor of the whole input per sequence.
    lens_q = seqlens if seqlens is not None else (cu_q[1:] - cu_q[:-1]).tolist()
    lens_k = lens_q if cu_k is cu_q else (cu_k[1:] - cu_k[:-1]).tolist()
    outs, lses = [], []
    for qi, ki, vi in zip(q.split(lens_q), k.split(lens_k), v.split(lens_k), strict=True):
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (qi, ki, vi))
        if ki.shape[2] == 0:  # no keys: zeros, differentiable (a zero gradient for q, also where q is not finite)
            outs.append(torch.where(torch.zeros_like(qi[0], dtype=torch.bool), qi[0], 0).transpose(0, 1))
        else:
            outs.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, scale=scale)[0].transpose(0, 1))
        if return_lse:  # in fp32 also under autocast (the contract's dtype; autocast would run it in 16 bits)
            with torch.autocast(q.device.type, enabled=False):
                lses.append(torch.logsumexp((qi[0].float() @ ki[0].float().transpose(1, 2)) * scale, dim=-1))
    out = torch.cat(outs, 0) if outs else torch.empty_like(q)
    if return_lse:
        return out, (torch.cat(lses, 1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32))
    return out


@torch.library.custom_op("fineviti::varlen_attention_torch_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _torch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
               return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend as one op, for traced code (_run_torch): (out, lse), out contiguous in q's dtype, lse
    (heads, total_q) with return_lse, else (heads, 0). The max_seqlen arguments are unused (kept for the other ops'
    signature). Autocast is off inside (the caller cast the inputs), so the fake's dtypes hold."""
    with torch.autocast(q.device.type, enabled=False):
        if return_lse:
            out, lse = _sdpa_per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, None, True)
        else:
            out = _sdpa_per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, None, False)
            lse = q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return out.contiguous(), lse.contiguous()


@_torch_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, return_lse):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0] if return_lse else 0), dtype=torch.float32)


@torch.library.custom_op("fineviti::varlen_attention_torch_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def _torch_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
               cu_seqlens_k: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous) of _torch_fwd's output, per sequence from the recomputed probabilities (in fp32 for
    16-bit inputs), in blocks of query rows that keep each (heads, rows, keys) fp32 block near _TORCH_BWD_BLOCK
    bytes. Written out rather than through autograd: a custom op's body runs with autograd turned off."""
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    heads = q.shape[1]
    with torch.autocast(q.device.type, enabled=False):
        for i in range(len(bounds_q) - 1):
            keys = slice(bounds_k[i], bounds_k[i + 1])
            n_keys = keys.stop - keys.start
            if n_keys == 0:
                continue  # no keys: the output is zeros whatever q, k, v are
            ki, vi = (t[keys].to(compute).transpose(0, 1) for t in (k, v))  # (heads, Lk, d)
            dki, dvi = torch.zeros_like(ki), torch.zeros_like(vi)
            block = max(1, _TORCH_BWD_BLOCK // (4 * heads * n_keys))
            for start in range(bounds_q[i], bounds_q[i + 1], block):
                rows = slice(start, min(start + block, bounds_q[i + 1]))
                qi, doi = (t[rows].to(compute).transpose(0, 1) for t in (q, do))
                p = torch.softmax((qi @ ki.transpose(1, 2)) * softmax_scale, dim=-1)  # (heads, rows, Lk)
                dp = doi @ vi.transpose(1, 2)
                ds = p * (dp - (dp * p).sum(-1, keepdim=True))  # the row sum of dp * p is that of dO * O
                dq[rows] = ((ds @ ki) * softmax_scale).transpose(0, 1).to(q.dtype)
                dki += (ds.transpose(1, 2) @ qi) * softmax_scale
                dvi += p.transpose(1, 2) @ doi
            dk[keys] = dki.transpose(0, 1).to(k.dtype)
            dv[keys] = dvi.transpose(0, 1).to(v.dtype)
    return dq, dk, dv


_TORCH_BWD_BLOCK = 64 * 2**20  # bytes of one fp32 (heads, rows, keys) block in _torch_bwd


@_torch_bwd.register_fake
def _(do, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _torch_fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, _max_q, _max_k, scale, _return_lse = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k)
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])


def _torch_fwd_backward(ctx, do, dlse):
    q, k, v, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _torch_bwd(do, q, k, v, cu_q, cu_k, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("fineviti::varlen_attention_torch_fwd", _torch_fwd_backward,
                                setup_context=_torch_fwd_setup_context)


def _run_torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens, return_lse):
    from torch.nn.attention import varlen

    params = inspect.signature(varlen.varlen_attn).parameters
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    elif not math.isclose(scale, 1.0 / math.sqrt(q.shape[-1])):
        q = q * (scale * math.sqrt(q.shape[-1]))
    if return_lse:
        out, lse = varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=varlen.AuxRequest(lse=True),
                                      **kwargs)
        return out, lse
    return varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def _run_flex(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens, return_lse):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if cu_k is not cu_q and not torch.equal(cu_k, cu_q):
        raise ValueError("backend='flex' supports self-attention only (cu_seqlens_k equal to cu_seqlens)")
    total = q.shape[0]
    doc = torch.searchsorted(cu_q[1:], torch.arange(total, device=q.device, dtype=torch.int32), right=True)

    def same_doc(b, h, qi, ki):
        return doc[qi] == doc[ki]

    mask = create_block_mask(same_doc, B=None, H=None, Q_LEN=total, KV_LEN=total, device=q.device)
    fn = _compiled_flex(flex_attention)
    out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask,
             scale=scale, return_lse=return_lse)
    if return_lse:
        return out[0][0].transpose(0, 1), out[1][0]
    return out[0].transpose(0, 1)


_FLEX = {}


def _compiled_flex(flex_attention):
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _run_flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens, return_lse, deterministic=False):
    from flash_attn import flash_attn_varlen_func

    result = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale,
                                    causal=False, deterministic=deterministic, return_attn_probs=return_lse)
    if return_lse:
        return result[0], result[1]
    return result


def _run_xformers(q, k, v, cu_q, cu_k, max_q, max_k, scale, seqlens, return_lse):
    from xformers.ops import fmha

    if return_lse:
        raise ValueError("backend='xformers' does not return the log-sum-exp here; use return_lse=False")
    lens_q = seqlens if seqlens is not None else (cu_q[1:] - cu_q[:-1]).tolist()
    lens_k = (cu_k[1:] - cu_k[:-1]).tolist() if cu_k is not cu_q else lens_q
    bias = fmha.BlockDiagonalMask.from_seqlens(lens_q, lens_k)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]


_RUN = {"triton": _run_triton, "torch": _run_torch, "torch_varlen": _run_torch_varlen, "flex": _run_flex,
        "flash_attn": _run_flash_attn, "xformers": _run_xformers}
_NEEDS = {"triton": "triton", "flash_attn": "flash_attn", "xformers": "xformers"}
# Looked up once, at import: a lookup per call would sit inside torch.compile's trace, and dynamo in torch 2.11
# refuses importlib.util.find_spec ("marked as skipped"), which broke fullgraph compiles of the triton path there.
_INSTALLED = {module: importlib.util.find_spec(module) is not None
              for module in (*_NEEDS.values(), "torch.nn.attention.varlen")}


def backend_available(name: str, device: torch.device | str = "cuda") -> tuple[bool, str]:
    """(available, reason) for backend `name` on `device`."""
    device = torch.device(device)
    if name not in BACKENDS:
        return False, f"unknown backend {name!r}; expected one of {BACKENDS}"
    module = _NEEDS.get(name)
    if module and not _INSTALLED[module]:
        return False, f"backend {name!r} needs the package {module!r}, which is not installed"
    if name == "torch_varlen":
        if not _INSTALLED["torch.nn.attention.varlen"]:
            return False, f"backend 'torch_varlen' needs torch.nn.attention.varlen (torch {torch.__version__} lacks it)"
        if device.type != "cuda":
            return False, "backend 'torch_varlen' runs on CUDA tensors only"
    if name in ("flex", "flash_attn", "xformers") and device.type != "cuda":
        return False, f"backend {name!r} runs on CUDA tensors only"
    if name == "triton" and device.type == "cpu" and not triton_interpreting():
        return False, "backend 'triton' on a CPU needs TRITON_INTERPRET=1 set before triton is imported"
    return True, ""


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None,
                    head_dim: int | None = None) -> str:
    """The fixed rule table: an explicit backend stays; 'auto' is FINEVITI_ATTN_BACKEND, else triton on CUDA and
    torch on a CPU, and torch on CUDA for fp32 beyond the head dims the triton kernels take in fp32
    (kernels.varlen_attention.FP32_MAX_HEAD_DIM_GPU)."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = env_backend("FINEVITI_ATTN_BACKEND", BACKENDS, "varlen attention") or "auto"  # "": "auto"
        if backend == "auto":
            backend = "triton" if device.type == "cuda" else "torch"
            if backend == "triton" and dtype == torch.float32 and head_dim is not None \
                    and head_dim > _kernels().FP32_MAX_HEAD_DIM_GPU:
                backend = "torch"
    ok, why = backend_available(backend, device)
    if not ok:
        raise RuntimeError(why)
    return backend


# ----------------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------------


def _check_deterministic(name: str, device: torch.device, asked: bool) -> None:
    """deterministic=True, or torch.use_deterministic_algorithms(True), is a promise the backend must keep, not a
    hint: triton and flash_attn have a backward without atomics; torch's own attention (torch, torch_varlen)
    follows torch.use_deterministic_algorithms, which must then be on; flex and xformers have no such mode on a
    GPU (an error, or a warning under the global switch's warn_only). CPU kernels are deterministic already."""
    switch = torch.are_deterministic_algorithms_enabled()
    if not (asked or switch) or device.type != "cuda" or name in ("triton", "flash_attn"):
        return
    if name in ("torch", "torch_varlen"):
        if not switch:
            raise ValueError(f"deterministic=True with backend {name!r} on CUDA: torch's attention backward is "
                             f"deterministic only under torch.use_deterministic_algorithms(True); set that, or use "
                             f"backend='triton'")
        return
    message = (f"deterministic=True: backend {name!r} has no deterministic backward on CUDA; use "
               f"backend='triton' or 'flash_attn'")
    if not asked and torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message + " (torch.use_deterministic_algorithms(True, warn_only=True): a warning)",
                      stacklevel=3)
        return
    raise ValueError(message)


def _autocast_inputs(q, k, v):
    """Under autocast, q, k and v in the autocast dtype (fp64 excepted), as scaled_dot_product_attention's inputs
    are cast in eager mode: every backend then returns that dtype (a custom op is outside autocast's reach)."""
    if not isinstance(q, torch.Tensor) or not torch.is_autocast_enabled(q.device.type):
        return q, k, v
    low = torch.get_autocast_dtype(q.device.type)
    # (what is no floating-point tensor, or fp64, is left to _check_inputs, which names it)
    return tuple(t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (
        low, torch.float64) else t for t in (q, k, v))


def _max_seqlen(name: str, value) -> int:
    """max_seqlen as an int: a Python int as it is (under torch.compile a dynamic size: operator.index would
    specialise it, one graph per value), another integer type (numpy's, as flash_attn takes them) converted; not
    bool, float or a tensor."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    else:
        raise ValueError(f"{name} must be a non-negative integer (a Python int), got {value!r}")
    if number < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return number


def _check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, check_values, own_keys=False):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (total, heads, head_dim), got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must match")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q and k must have the same (heads, head_dim), got {tuple(q.shape[1:])} and "
                         f"{tuple(k.shape[1:])}")
    if not own_keys and k.shape[0] != q.shape[0]:  # a shape: checked on every device
        raise ValueError(f"k has {k.shape[0]} tokens and q has {q.shape[0]}: without cu_seqlens_k the keys follow "
                         f"cu_seqlens, so they must match (pass cu_seqlens_k and max_seqlen_k for other key lengths)")
    for name, cu in (("cu_seqlens", cu_q), ("cu_seqlens_k", cu_k)):
        if isinstance(cu, torch.Tensor) and cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; they must match")
    check_cu_seqlens(cu_q, q.shape[0], "cu_seqlens", max_q, "max_seqlen", check_values)
    check_cu_seqlens(cu_k, k.shape[0], "cu_seqlens_k", max_k, "max_seqlen_k", check_values)
    if cu_k.numel() != cu_q.numel():
        raise ValueError(f"cu_seqlens_k must have as many entries as cu_seqlens ({cu_q.numel()}), "
                         f"got {cu_k.numel()}")


def _host_seqlens(seqlens, cu_seqlens, total: int, check_values, max_seqlen: int | None = None):
    """The checked host lengths as (a list, None); traced with a CPU tensor, (None, the tensor): its values are not
    read while tracing (they would specialise the graph), the triton op reads them when it runs."""
    if isinstance(seqlens, torch.Tensor):
        if seqlens.device.type != "cpu" or seqlens.dim() != 1 or seqlens.is_floating_point() or seqlens.is_complex():
            raise ValueError(f"seqlens as a tensor must be a 1-D integer CPU tensor (host-side lengths), got "
                             f"{seqlens.dtype} {tuple(seqlens.shape)} on {seqlens.device}")
        if torch.compiler.is_compiling():
            return None, seqlens
        seqlens = seqlens.tolist()
    if seqlens is not None:
        seqlens = list(seqlens)
        _check_seqlens(seqlens, cu_seqlens, total, check_values, max_seqlen)
    return seqlens, None


def _check_seqlens(seqlens, cu_seqlens, total: int, check_values, max_seqlen: int | None = None) -> None:
    if seqlens is None:
        return
    if len(seqlens) != cu_seqlens.numel() - 1 or sum(seqlens) != total:
        raise ValueError(f"seqlens must hold {cu_seqlens.numel() - 1} lengths summing to {total} tokens, "
                         f"got {len(seqlens)} lengths summing to {sum(seqlens)}")
    if max_seqlen is not None and seqlens and max(seqlens) > max_seqlen:  # host values: free to check
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence in seqlens ({max(seqlens)})")
    if value_checks_enabled(cu_seqlens, check_values) and (cu_seqlens[1:] - cu_seqlens[:-1]).tolist() != list(
            seqlens):
        raise ValueError("seqlens disagrees with cu_seqlens: it must list the differences of cu_seqlens")


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, cu_seqlens_k=None, max_seqlen_k=None, softmax_scale=None,
                     backend="auto", return_lse=False, deterministic=False, seqlens=None, check_values=None):
    """Non-causal attention within each packed sequence.

    q, k, v: (total, heads, head_dim), float16/bfloat16/float32, the same dtype (under autocast: after the cast to
        its dtype) and device; head_dim 16..256.
    cu_seqlens: int32 (n+1,), 0 first, non-decreasing, last = total. max_seqlen: an integer >= every length (a
        Python int; numpy's are taken too).
    cu_seqlens_k / max_seqlen_k: separate key lengths (default: the query ones).
    softmax_scale: default 1/sqrt(head_dim).
    backend: 'auto' or one of BACKENDS (module docstring).
    return_lse: also return the (heads, total) fp32 log-sum-exp (natural log) of the scaled scores (without a
        gradient on the triton and torch backends).
    deterministic: ask for a bit-reproducible backward (also on when torch.use_deterministic_algorithms(True) is
        set); on CUDA a backend that cannot keep it raises (torch and torch_varlen need
        torch.use_deterministic_algorithms(True); flex and xformers have no such mode). The triton backend then
        computes dq in a second kernel without atomics; otherwise it follows
        kernels.varlen_attention.dq_mode (atomic dq at 16-bit head dims above 64;
        FINEVITI_ATTN_DQ=atomic|separate overrides it from 64 to 128).
    softmax_scale with the triton backend: finite and > 0.
        The torch backend always is; it is passed on to flash_attn.
    seqlens: optional host-side lengths of the sequences (the data planner knows them), a list of ints or a 1-D
        integer CPU tensor: lets the triton backend launch an exact grid (and reuse its block schedule), and
        xformers skip a host read. Under torch.compile pass the tensor: a list would specialise the graph on its
        values (a recompile per pack), the tensor reaches the triton op as an input. Its count, sum and maximum are
        always checked; that it lists the differences of cu_seqlens, only with the values (check_values): on CUDA
        it is otherwise trusted, like cu_seqlens itself, and a wrong list leaves rows of the output unwritten.
    check_values: check cu_seqlens' values, and seqlens against them (default: always on CPU, FINEVITI_CHECKS=1 on
        CUDA, since it costs a device-to-host synchronisation).
    Returns (total, heads, head_dim) in q's dtype, or under autocast in the autocast dtype, which q, k and v take
    first as scaled_dot_product_attention's do (and the log-sum-exp with return_lse).
    """
    if cu_seqlens_k is not None and max_seqlen_k is None:
        raise ValueError("cu_seqlens_k needs max_seqlen_k (an integer >= the longest key sequence), as "
                         "flash_attn_varlen_func does: it is not taken from max_seqlen")
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    max_seqlen = _max_seqlen("max_seqlen", max_seqlen)
    max_k = max_seqlen if max_seqlen_k is None else _max_seqlen("max_seqlen_k", max_seqlen_k)
    q, k, v = _autocast_inputs(q, k, v)  # before the dtype checks: under autocast q, k and v may differ, as in SDPA
    _check_inputs(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, check_values, own_keys=cu_seqlens_k is not None)
    seqlens, seqlens_host = _host_seqlens(seqlens, cu_seqlens, q.shape[0], check_values, max_seqlen)
    head_dim = q.shape[-1]
    if not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim (the last dim of q, k and v) must be in [16, 256], got {head_dim}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    name = resolve_backend(backend, q.device, q.dtype, head_dim)
    _check_deterministic(name, q.device, bool(deterministic))
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    if name == "triton":
        return _run_triton(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, scale, seqlens, return_lse,
                           deterministic=deterministic, seqlens_host=seqlens_host)
    if name == "flash_attn":
        return _run_flash_attn(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, scale, seqlens, return_lse,
                               deterministic=deterministic)
    return _RUN[name](q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, scale, seqlens, return_lse)

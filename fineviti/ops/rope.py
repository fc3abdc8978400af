"""2D rotary position embedding of packed vision tokens: Qwen2-VL's vision RoPE, fused.

x (total, heads, head_dim) rotates by each token's (row, col): head_dim/4 frequencies theta**(-f/(head_dim/4)),
row angles then column angles, repeated twice, applied as x*cos + rotate_half(x)*sin in fp32 (Hugging Face
transformers, Qwen2-VL: VisionRotaryEmbedding + apply_rotary_pos_emb_vision). The backward is the rotation by the
negative angle. Backends: "triton" (kernels/rope.py, q and k in one launch, sin/cos on the fly), "cuda"
(csrc/rope.cu), "cpp" (csrc/rope.cpp, CPU), "torch" (the reference). `qkv_split_rope` splits a fused QKV
projection into contiguous q, k, v while rotating q and k, reading the projection once.
"""

from __future__ import annotations

import math

import torch

from fineviti import _checks, _ext

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
BACKEND_ENV = "FINEVITI_ROPE_BACKEND"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the halves of the last dim, as in Hugging Face transformers."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_2d_angles(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> torch.Tensor:
    """(total, head_dim // 2) angles: row * inv_freq then col * inv_freq, computed in `dtype`."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=dtype, device=pos.device) / half))
    return torch.cat((pos[:, :1].to(dtype) * inv_freq, pos[:, 1:2].to(dtype) * inv_freq), dim=-1)


def rope_2d_ref(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0, *, inverse: bool = False,
                upcast: bool = True) -> torch.Tensor:
    """Plain-torch 2D RoPE: x (total, heads, head_dim), pos (total, 2) integer (row, col); returns x's dtype.

    upcast=True computes in fp32 (fp64 for fp64 x), as Qwen2-VL does; upcast=False multiplies in x's dtype with
    cos/sin rounded to it. inverse=True rotates by the negative angle (the gradient of the forward rotation).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = rope_2d_angles(pos, x.shape[-1], theta, compute)
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]
    cos, sin = emb.cos(), emb.sin()
    if inverse:
        sin = -sin
    xc = x.to(compute) if upcast else x
    out = xc * cos.to(xc.dtype) + rotate_half(xc) * sin.to(xc.dtype)
    return out if out.dtype == x.dtype else out.to(x.dtype)  # (see _contiguous: no no-op .to on an output)


# ---------------------------------------------------------------------------------------------------------------
# Checks


def _check_x(name: str, x: torch.Tensor, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must have shape (total, heads, head_dim), got shape {tuple(x.shape)}")
    if x.shape[-1] % 4 != 0:
        raise ValueError(f"{op}: head_dim of {name} must be divisible by 4 (row and column halves of "
                         f"cos/sin pairs), got head_dim={x.shape[-1]}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {x.dtype}")


def _check_pos(pos: torch.Tensor, total: int, device: torch.device, op: str) -> None:
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{op}: pos must be a torch.Tensor, got {type(pos).__name__}")
    if pos.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: pos must be int32 or int64 (row, col) positions, got {pos.dtype}")
    if pos.dim() != 2 or pos.shape[1] != 2:
        raise ValueError(f"{op}: pos must have shape (total, 2) holding (row, col), got shape {tuple(pos.shape)}")
    if pos.shape[0] != total:
        raise ValueError(f"{op}: pos has {pos.shape[0]} rows but the input has {total} tokens; expected one "
                         f"(row, col) per token")
    if pos.device != device:
        raise ValueError(f"{op}: pos is on {pos.device} but the input is on {device}")


def check_positions(pos: torch.Tensor) -> None:
    """Value check (reads pos on the host): positions must be non-negative and below 2**31 (unchecked, larger int64
    positions rotate by their fp64 angle on the triton, cpp and cuda backends, by their fp32-rounded one on torch)."""
    if pos.numel() == 0:
        return
    bad = (pos < 0) | (pos > _INT32_MAX)
    if bool(bad.any()):
        i, c = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"rope_2d: positions must be non-negative integers below 2**31, got "
                         f"pos[{i}, {c}]={int(pos[i, c])} ({'row' if c == 0 else 'col'} of token {i})")


def _env_backend() -> str | None:
    return _checks.env_backend(BACKEND_ENV, BACKENDS, "rope")


def _cpp_ops_available() -> bool:
    return _ext.loaded() and hasattr(torch.ops.fineviti, "rope_2d")


_HAS_CPP_OPS = _cpp_ops_available()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend "auto" means on `device` (FINEVITI_ROPE_BACKEND overrides it); checks an explicit one."""
    if backend not in BACKENDS:
        raise ValueError(f"rope_2d: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _env_backend() or ("triton" if device.type == "cuda" else ("cpp" if _HAS_CPP_OPS else "torch"))
    if backend == "triton" and device.type != "cuda" and not _checks.triton_interpreting():
        raise ValueError(f"rope_2d: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    if backend in ("cuda", "cpp") and not _HAS_CPP_OPS:
        raise RuntimeError(f"rope_2d: backend={backend!r} needs the compiled extension fineviti._C with the rope "
                           f"ops ({_ext.load_error() or 'it has no rope_2d op'}); build it with "
                           f"`pip install --no-build-isolation -e .`")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"rope_2d: backend='cuda' needs CUDA tensors, got {device}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"rope_2d: backend='cpp' needs CPU tensors, got {device}")
    return backend


def _unit_last(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Views with a unit last stride sharing (token, head) strides; copies only where they are not."""
    out = [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]
    if any(t.stride() != out[0].stride() for t in out[1:]):
        out = [t.contiguous() for t in out]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Triton ops (torch.library custom ops with fake implementations, so torch.compile traces through them)


def _triton_launch(q, k, v, q_out, k_out, v_out, pos, theta, inverse):
    from fineviti.kernels import rope as kernels

    # pos as it is, int32 or int64: an int32 cast wrapped positions >= 2**31 to wrong angles when value checks were
    # off (CUDA's default); the kernel converts either to fp64, as the cpp and cuda ops do
    kernels.launch(q, k, v, q_out, k_out, v_out, pos, theta, inverse)


def _empty(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fineviti::rope_2d_triton", mutates_args=())
def _rope_2d_triton(x: torch.Tensor, pos: torch.Tensor, theta: float, inverse: bool,
                    check_pos: bool) -> torch.Tensor:
    if check_pos:
        check_positions(pos)
    (x,) = _unit_last(x)
    out = _empty(x)
    _triton_launch(x, None, None, out, None, None, pos, theta, inverse)
    return out


@_rope_2d_triton.register_fake
def _(x, pos, theta, inverse, check_pos):
    return _empty(x)


@torch.library.custom_op("fineviti::rope_2d_qk_triton", mutates_args=())
def _rope_2d_qk_triton(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, theta: float, inverse: bool,
                       check_pos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if check_pos:
        check_positions(pos)
    q, k = _unit_last(q, k)
    q_out, k_out = _empty(q), _empty(k)
    _triton_launch(q, k, None, q_out, k_out, None, pos, theta, inverse)
    return q_out, k_out


@_rope_2d_qk_triton.register_fake
def _(q, k, pos, theta, inverse, check_pos):
    return _empty(q), _empty(k)


@torch.library.custom_op("fineviti::rope_2d_qk_triton_", mutates_args=("q", "k"))
def _rope_2d_qk_triton_(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, theta: float, inverse: bool,
                        check_pos: bool) -> None:
    """In place: q and k are overwritten (each element is read and written by the same program)."""
    if check_pos:
        check_positions(pos)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or q.stride() != k.stride():
        for t in (q, k):  # rotate each separately through a contiguous copy
            (t_unit,) = _unit_last(t)
            _triton_launch(t_unit, None, None, t_unit, None, None, pos, theta, inverse)
            if t_unit is not t:
                t.copy_(t_unit)
        return
    _triton_launch(q, k, None, q, k, None, pos, theta, inverse)


@_rope_2d_qk_triton_.register_fake
def _(q, k, pos, theta, inverse, check_pos):
    return None


@torch.library.custom_op("fineviti::rope_2d_triton_", mutates_args=("x",))
def _rope_2d_triton_(x: torch.Tensor, pos: torch.Tensor, theta: float, inverse: bool, check_pos: bool) -> None:
    if check_pos:
        check_positions(pos)
    (x_unit,) = _unit_last(x)
    _triton_launch(x_unit, None, None, x_unit, None, None, pos, theta, inverse)
    if x_unit is not x:
        x.copy_(x_unit)


@_rope_2d_triton_.register_fake
def _(x, pos, theta, inverse, check_pos):
    return None


def _qkv_views(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    total, width = qkv.shape
    return qkv.view(total, 3, heads, width // (3 * heads)).unbind(1)


@torch.library.custom_op("fineviti::qkv_split_rope_triton", mutates_args=())
def _qkv_split_rope_triton(qkv: torch.Tensor, pos: torch.Tensor, heads: int, theta: float,
                           check_pos: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if check_pos:
        check_positions(pos)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q, k, v = _qkv_views(qkv, heads)
    q_out, k_out, v_out = _empty(q), _empty(k), _empty(v)
    _triton_launch(q, k, v, q_out, k_out, v_out, pos, theta, False)
    return q_out, k_out, v_out


@_qkv_split_rope_triton.register_fake
def _(qkv, pos, heads, theta, check_pos):
    q, k, v = _qkv_views(qkv, heads)
    return _empty(q), _empty(k), _empty(v)


@torch.library.custom_op("fineviti::qkv_split_rope_triton_bwd", mutates_args=())
def _qkv_split_rope_triton_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, pos: torch.Tensor,
                               theta: float) -> torch.Tensor:
    dq, dk, dv = _unit_last(dq, dk, dv)
    total, heads, head_dim = dq.shape
    dqkv = torch.empty((total, 3 * heads * head_dim), dtype=dq.dtype, device=dq.device)
    dq_out, dk_out, dv_out = _qkv_views(dqkv, heads)
    _triton_launch(dq, dk, dv, dq_out, dk_out, dv_out, pos, theta, True)
    return dqkv


@_qkv_split_rope_triton_bwd.register_fake
def _(dq, dk, dv, pos, theta):
    total, heads, head_dim = dq.shape
    return dq.new_empty((total, 3 * heads * head_dim))


# Fake implementations of the C++/CUDA ops (csrc/rope.cpp, csrc/rope.cu), so that torch.compile traces them too.
if _HAS_CPP_OPS:

    @torch.library.register_fake("fineviti::rope_2d")
    def _(x, pos, theta, inverse, check_pos):
        return _empty(x)

    @torch.library.register_fake("fineviti::rope_2d_qk")
    def _(q, k, pos, theta, inverse, check_pos):
        return _empty(q), _empty(k)

    @torch.library.register_fake("fineviti::rope_2d_")
    def _(x, pos, theta, inverse, check_pos):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and autograd


_OVERLAP_SEARCH_LIMIT = 4096  # index combinations _views_overlap tries before it gives up (None)


def _views_overlap(a: torch.Tensor, b: torch.Tensor) -> bool | None:
    """Whether two tensors share an element of memory: True, False, or None where it could not tell (views of one
    storage with different shapes or strides whose ranges intersect; torch's own in-place checks give up there
    too). Views of one shape and strides, as q and k sliced from one qkv buffer are, are decided exactly: they
    overlap iff their offset difference is sum(c_i * stride_i) with |c_i| < size_i, a short search over the dims
    from the largest stride."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or \
            a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):  # [first, last] byte of t's elements
        low = high = t.storage_offset()
        for n, st in zip(t.shape, t.stride(), strict=True):
            low, high = (low + (n - 1) * st, high) if st < 0 else (low, high + (n - 1) * st)
        return low * t.element_size(), (high + 1) * t.element_size() - 1

    (a0, a1), (b0, b1) = span(a), span(b)
    if a1 < b0 or b1 < a0:
        return False
    if a.dtype != b.dtype or a.shape != b.shape or any(
            n > 1 and sa != sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True)):
        return None  # (a size-1 dim's stride places nothing)
    dims = sorted(((abs(st), n) for n, st in zip(a.shape, a.stride(), strict=True) if n > 1 and st != 0),
                  reverse=True)
    reach = [0] * (len(dims) + 1)  # reach[k]: the largest |sum| the dims from k on can make
    for k in range(len(dims) - 1, -1, -1):
        reach[k] = reach[k + 1] + (dims[k][1] - 1) * dims[k][0]
    budget = [_OVERLAP_SEARCH_LIMIT]

    def reachable(k: int, rest: int) -> bool | None:
        if k == len(dims):
            return rest == 0
        stride, n = dims[k]
        low = max(-(n - 1), -((reach[k + 1] - rest) // stride))  # ceil((rest - reach) / stride)
        high = min(n - 1, (rest + reach[k + 1]) // stride)
        unsure = False
        for c in range(low, high + 1):
            budget[0] -= 1
            if budget[0] < 0:
                return None
            found = reachable(k + 1, rest - c * stride)
            if found:
                return True
            unsure = unsure or found is None
        return None if unsure else False

    return reachable(0, b.storage_offset() - a.storage_offset())


def _check_inplace_targets(tensors: tuple[torch.Tensor, ...]) -> None:
    """In place, every element is rotated once: no tensor whose elements share memory (an expand()), and no
    element in both q and k (the kernels would rotate it twice, or race on it on a GPU). q and k that are views
    of one buffer are checked exactly where they have the same shape and strides (q and k sliced from one qkv
    tensor); views with other layouts whose memory ranges intersect are refused as undecided (they used to pass,
    and a shared element was rotated twice)."""
    for name, t in zip(("q", "k") if len(tensors) == 2 else ("x",), tensors, strict=True):
        if torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(f"rope in place: {name} has elements that share memory (strides {t.stride()}, e.g. "
                             f"from expand()); rotate it out of place, or a .contiguous() copy")
    overlap = _views_overlap(*tensors) if len(tensors) == 2 else False
    if overlap:
        q, k = tensors
        raise ValueError(f"rope in place: q and k are the same memory or overlap (storage offsets "
                         f"{q.storage_offset()} and {k.storage_offset()}, strides {q.stride()} and {k.stride()}); "
                         f"rotate one tensor once as x, or pass copies")
    if overlap is None:  # the kernels would rotate a shared element twice, without a word: refused as undecided
        q, k = tensors
        raise ValueError(f"rope in place: q and k are views of one buffer with different layouts whose memory "
                         f"ranges intersect (storage offsets {q.storage_offset()} and {k.storage_offset()}, strides "
                         f"{q.stride()} and {k.stride()}); whether they share an element was not decided: rotate "
                         f"out of place, or pass copies")


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """t.contiguous() without the no-op call on a contiguous t: under torch 2.11's torch.compile an
    autograd.Function output that went through a no-op .contiguous() or .to(same dtype) (the op returning its input)
    got no gradient (qkv_split_rope's q and k gradients came out zero; fixed in later torch)."""
    return t if t.is_contiguous() else t.contiguous()


def _rotate(tensors: tuple[torch.Tensor, ...], pos: torch.Tensor, theta: float, inverse: bool, backend: str,
            check_pos: bool, inplace: bool = False) -> tuple[torch.Tensor, ...]:
    """Rotate one tensor or a (q, k) pair with `backend`; out of place unless `inplace`."""
    if inplace and not torch.compiler.is_compiling():  # (a debug query dynamo need not trace)
        _check_inplace_targets(tensors)
    if backend == "torch":
        if check_pos and not torch.compiler.is_compiling():
            check_positions(pos)
        outs = tuple([_contiguous(rope_2d_ref(t, pos, theta, inverse=inverse)) for t in tensors])
        if inplace:
            for t, out in zip(tensors, outs, strict=True):
                t.copy_(out)
            return tensors
        return outs
    if backend == "triton":
        if len(tensors) == 1:
            if inplace:
                torch.ops.fineviti.rope_2d_triton_(tensors[0], pos, theta, inverse, check_pos)
                return tensors
            return (torch.ops.fineviti.rope_2d_triton(tensors[0], pos, theta, inverse, check_pos),)
        if inplace:
            torch.ops.fineviti.rope_2d_qk_triton_(*tensors, pos, theta, inverse, check_pos)
            return tensors
        return tuple(torch.ops.fineviti.rope_2d_qk_triton(*tensors, pos, theta, inverse, check_pos))
    # "cuda" and "cpp": the same C++ ops, registered for the CUDA and CPU dispatch keys. On CUDA the (opt-in) value
    # check runs here: an error thrown inside the extension's CUDA ops crashed the process on the H100 machine
    # (torch 2.11; build_positions' CUDA errors too), so the C++ CUDA op is never asked to throw for a bad value.
    if backend == "cuda" and check_pos:
        if not torch.compiler.is_compiling():
            check_positions(pos)
        check_pos = False
    if inplace:
        for i, t in enumerate(tensors):
            torch.ops.fineviti.rope_2d_(t, pos, theta, inverse, check_pos and i == 0)
        return tensors
    if len(tensors) == 1:
        return (torch.ops.fineviti.rope_2d(tensors[0], pos, theta, inverse, check_pos),)
    return tuple(torch.ops.fineviti.rope_2d_qk(*tensors, pos, theta, inverse, check_pos))


class _Rope2d(torch.autograd.Function):
    """Rotation of x, or of q and k together (the tensors first: a Function whose first input is not the tensor it
    modifies in place tripped autograd's view handling); the backward rotates the gradients by the negative angle
    through this Function again, so that it is differentiable too (create_graph=True: the cpp and cuda ops have no
    autograd of their own, and their second derivatives came out as zeros)."""

    @staticmethod
    def forward(ctx, *args):
        *tensors, pos, theta, backend, inplace, check_pos, inverse = args
        outs = _rotate(tuple(tensors), pos, theta, inverse, backend, check_pos, inplace)
        ctx.save_for_backward(pos)
        ctx.theta, ctx.backend, ctx.inverse = theta, backend, inverse
        if inplace:
            ctx.mark_dirty(*tensors)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        (pos,) = ctx.saved_tensors
        grads_in = _Rope2d.apply(*grads, pos, ctx.theta, ctx.backend, False, False, not ctx.inverse)
        return (*grads_in, None, None, None, None, None, None)


class _QKVSplitRope(torch.autograd.Function):
    """Split (total, 3*heads*head_dim) into rotated q, k and v; the backward gathers dqkv = [R^-1 dq | R^-1 dk | dv]."""

    @staticmethod
    def forward(ctx, qkv, pos, heads, theta, backend, check_pos):
        ctx.save_for_backward(pos)
        ctx.theta, ctx.backend = theta, backend
        if backend == "triton":
            return tuple(torch.ops.fineviti.qkv_split_rope_triton(qkv, pos, heads, theta, check_pos))
        q, k, v = _qkv_views(qkv, heads)
        q, k = _rotate((q, k), pos, theta, False, backend, check_pos)
        # a copy always: contiguous() returns the view itself for one token, and v then aliased qkv
        return q, k, v.clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (pos,) = ctx.saved_tensors
        if ctx.backend == "triton" and not torch.is_grad_enabled():
            dqkv = torch.ops.fineviti.qkv_split_rope_triton_bwd(dq, dk, dv, pos, ctx.theta)
        else:  # differentiable (create_graph=True): the rotation through _Rope2d, the gather through torch.stack
            dq, dk = _Rope2d.apply(dq, dk, pos, ctx.theta, ctx.backend, False, False, True)
            dqkv = torch.stack((dq, dk, dv), dim=1).view(dq.shape[0], 3 * dq.shape[1] * dq.shape[2])  # (0 tokens)
        return dqkv, None, None, None, None, None


def _check_pos_flag(pos: torch.Tensor, check_values: bool | None, backend: str) -> bool:
    """Whether the rotation checks pos's values: _checks' rule, and also on CPU tensors while torch.compile traces
    where the backend's op checks inside itself (cpp, triton: the tracer does not enter a custom op, so its host
    read breaks no graph; negative positions were let through compiled)."""
    check = _checks.value_checks_enabled(pos, check_values)
    if check_values is None and not check and backend in ("cpp", "triton") and pos.device.type == "cpu":
        check = True
    return check


_FP32_MAX = torch.finfo(torch.float32).max


def _theta(theta) -> float:
    try:
        value = float(theta)
    except (TypeError, ValueError):
        value = math.nan
    # (above fp32's largest, the Triton kernels, which take theta as fp32, would see inf). The bounds refuse NaN and
    # the infinities without math.isfinite, which dynamo cannot trace on a float it keeps symbolic (a closure's
    # theta in a compiled block): it broke the block's graph there.
    if isinstance(theta, bool) or not (0 < value <= _FP32_MAX):
        raise ValueError(f"theta must be a finite number > 0 (at most fp32's largest), got {theta!r}")
    return value


def rope_2d(x: torch.Tensor, pos: torch.Tensor, *, theta: float = 10000.0, backend: str = "auto",
            inplace: bool = False, check_values: bool | None = None) -> torch.Tensor:
    """Rotate x by its tokens' (row, col) positions (Qwen2-VL vision RoPE).

    x: (total, heads, head_dim) float32/float16/bfloat16, head_dim divisible by 4; pos: (total, 2) int32/int64.
    Returns a tensor of x's shape and dtype (contiguous; x itself when inplace=True). Computed in fp32.
    backend: "auto" (triton on CUDA; on CPU cpp when the extension is built, else torch; FINEVITI_ROPE_BACKEND
    overrides it), "triton", "cuda", "cpp" or "torch". check_values: check that positions are non-negative and
    below 2**31 (default: always on CPU, on CUDA only with FINEVITI_CHECKS=1, since it synchronises).
    """
    _check_x("x", x, "rope_2d")
    _check_pos(pos, x.shape[0], x.device, "rope_2d")
    backend = resolve_backend(backend, x.device)
    check_pos = _check_pos_flag(pos, check_values, backend)
    return _Rope2d.apply(x, pos, _theta(theta), backend, inplace, check_pos, False)[0]


def rope_2d_qk(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0, *,
               backend: str = "auto", inplace: bool = False,
               check_values: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (same shape (total, heads, head_dim) and dtype) in one launch; returns (q_rot, k_rot).

    Same arguments and rules as `rope_2d`. In place under autograd the two rotate in two launches (autograd takes
    one in-place output per Function on views). Known limit: in place on views under torch.compile with the torch
    backend trips an autograd assert (the cpp and triton backends compile); the model rotates out of place.
    """
    _check_x("q", q, "rope_2d_qk")
    _check_x("k", k, "rope_2d_qk")
    if q.shape != k.shape or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"rope_2d_qk: q and k must have the same shape, dtype and device, got q {tuple(q.shape)} "
                         f"{q.dtype} {q.device} and k {tuple(k.shape)} {k.dtype} {k.device}")
    _check_pos(pos, q.shape[0], q.device, "rope_2d_qk")
    backend = resolve_backend(backend, q.device)
    check_pos = _check_pos_flag(pos, check_values, backend)
    theta = _theta(theta)
    if inplace and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        # autograd takes one in-place output per Function when the inputs are views (q and k of one qkv buffer):
        # two Functions, after the joint check of the pair
        if not torch.compiler.is_compiling():
            _check_inplace_targets((q, k))
        q_rot = _Rope2d.apply(q, pos, theta, backend, True, check_pos, False)[0]
        k_rot = _Rope2d.apply(k, pos, theta, backend, True, False, False)[0]
        return q_rot, k_rot
    q_rot, k_rot = _Rope2d.apply(q, k, pos, theta, backend, inplace, check_pos, False)
    return q_rot, k_rot


def qkv_split_rope(qkv: torch.Tensor, pos: torch.Tensor, heads: int, theta: float = 10000.0, *,
                   backend: str = "auto",
                   check_values: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused QKV projection and rotate q and k: the same result as splitting, then `rope_2d_qk`.

    qkv: (total, 3 * heads * head_dim) laid out [q | k | v], each (heads, head_dim); returns q, k, v, each
    (total, heads, head_dim) contiguous in qkv's dtype. The triton backend reads qkv once and writes the three.
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 2:
        raise ValueError(f"qkv_split_rope: qkv must be a (total, 3 * heads * head_dim) tensor, got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    if not isinstance(heads, int) or heads < 1 or qkv.shape[1] % (3 * heads) != 0:
        raise ValueError(f"qkv_split_rope: heads must be a positive int dividing qkv.shape[1] / 3, got heads={heads} "
                         f"for qkv of shape {tuple(qkv.shape)}")
    head_dim = qkv.shape[1] // (3 * heads)
    if head_dim % 4 != 0:
        raise ValueError(f"qkv_split_rope: head_dim = qkv.shape[1] / (3 * heads) must be divisible by 4, got "
                         f"head_dim={head_dim} (qkv of shape {tuple(qkv.shape)}, heads={heads})")
    if qkv.dtype not in _DTYPES:
        raise TypeError(f"qkv_split_rope: qkv must be float32, float16 or bfloat16, got {qkv.dtype}")
    _check_pos(pos, qkv.shape[0], qkv.device, "qkv_split_rope")
    backend = resolve_backend(backend, qkv.device)
    check_pos = _check_pos_flag(pos, check_values, backend)
    return _QKVSplitRope.apply(qkv, pos, heads, _theta(theta), backend, check_pos)

"""RMSNorm over the last dim, fused: y = x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 (fp64 for fp64 x)
and returned in x's dtype, as the towers' norms compute it (Llama's RMSNorm with the statistic in fp32).

Backends: "triton" (kernels/rmsnorm.py: one read of x and one write of y forward; one read of x and dy and one write
of dx backward, dweight from per-program partial sums) and "torch" (the reference, `rms_norm_ref`, whose eager
autograd makes several passes over an fp32 copy of x). "auto": triton on CUDA, torch on a CPU and under
torch.compile (Inductor fuses the expression itself); FINEVITI_NORM_BACKEND overrides it.
"""

from __future__ import annotations

import math

import torch

from fineviti.ops import _fused

BACKENDS = _fused.BACKENDS
BACKEND_ENV = "FINEVITI_NORM_BACKEND"


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain torch: (x * rsqrt(mean(x^2, -1) + eps)) * weight in fp32 (fp64 for fp64 x), returned in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(compute)).to(x.dtype)


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend "auto" means for `x` (FINEVITI_NORM_BACKEND overrides it); checks an explicit one."""
    return _fused.resolve("rms_norm", backend, x, BACKEND_ENV, _max_width())


def _max_width() -> int:
    from fineviti.kernels import rmsnorm

    return rmsnorm.MAX_WIDTH


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"rms_norm: x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"rms_norm: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"rms_norm: x must have a last dim of at least 1 feature, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1]},) (x's last dim), got "
                         f"{tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"rms_norm: weight must be a floating-point tensor, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device} but x is on {x.device}")
    # (the bounds refuse NaN and inf without math.isfinite, which dynamo cannot trace on the symbolic float that
    # eps is in a block compiled with dynamic shapes: it broke the block's graph there)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < math.inf):
        raise ValueError(f"rms_norm: eps must be a finite number >= 0, got {eps!r}")


# ---------------------------------------------------------------------------------------------------------------
# Triton ops (torch.library custom ops with fake implementations, so torch.compile traces through them)


@torch.library.custom_op("fineviti::rms_norm_triton", mutates_args=())
def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from fineviti.kernels import rmsnorm

    return rmsnorm.forward(_fused.unit_last(x), weight.contiguous(), eps)


@_rms_norm_triton.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fineviti::rms_norm_triton_bwd", mutates_args=())
def _rms_norm_triton_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from fineviti.kernels import rmsnorm

    return rmsnorm.backward(_fused.unit_last(dy), _fused.unit_last(x), weight.contiguous(), rstd.contiguous())


@_rms_norm_triton_bwd.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, eps):
        y, rstd = torch.ops.fineviti.rms_norm_triton(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the kernel's gradients have no graph of their own
            dx, dw = _fused.differentiable_grads(lambda a, w: rms_norm_ref(a, w, ctx.eps), (x2d, weight), dy,
                                                 ctx.needs_input_grad[:2])
            return dx, dw, None
        dx, dw = torch.ops.fineviti.rms_norm_triton_bwd(dy, x2d, weight, rstd)
        return dx, (dw if ctx.needs_input_grad[1] else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x over its last dim: (x * rsqrt(mean(x^2) + eps)) * weight, in fp32, returned in x's dtype.

    x: (..., width) float; weight: (width,) float on x's device (its gradient comes back in its own dtype); eps a
    finite number >= 0; x and weight may be strided (copied where the kernels need a unit last stride or a
    contiguous weight). backend: "auto" (triton on CUDA for float32/float16/bfloat16 and widths up to 8192, torch
    on a CPU and while torch.compile traces; FINEVITI_NORM_BACKEND overrides it), "triton" or "torch". Under
    autocast x keeps its dtype (the norm runs in fp32 inside either way).
    """
    _check(x, weight, eps)
    backend = resolve_backend(backend, x)
    if backend == "torch":
        return rms_norm_ref(x, weight, eps)
    x2d = _fused.unit_last(x.reshape(-1, x.shape[-1]))
    return _RMSNormTriton.apply(x2d, weight, float(eps)).view(x.shape)

"""SwiGLU's gate, fused: h = silu(gate) * up for one Linear's output laid out [gate | up] (the towers' MLP).

Backends: "triton" (kernels/swiglu.py: one read of [gate | up] and one write of h forward, the product in fp32 and
rounded once; one read of dh and [gate | up] and one write of d[gate | up] backward) and "torch" (the reference,
`swiglu_ref`: `F.silu(gate) * up` in the input's dtype, as the towers computed it). "auto": triton on CUDA, torch
on a CPU and under torch.compile (Inductor fuses the expression itself); FINEVITI_SWIGLU_BACKEND overrides it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fineviti.ops import _fused

BACKENDS = _fused.BACKENDS
BACKEND_ENV = "FINEVITI_SWIGLU_BACKEND"


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Plain torch: silu(gate) * up over the halves [gate | up] of the last dim, in gate_up's dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def resolve_backend(backend: str, gate_up: torch.Tensor) -> str:
    """The backend "auto" means for `gate_up` (FINEVITI_SWIGLU_BACKEND overrides it); checks an explicit one."""
    return _fused.resolve("swiglu", backend, gate_up, BACKEND_ENV, arg="gate_up")


@torch.library.custom_op("fineviti::swiglu_triton", mutates_args=())
def _swiglu_triton(gate_up: torch.Tensor) -> torch.Tensor:
    from fineviti.kernels import swiglu

    return swiglu.forward(_fused.unit_last(gate_up))


@_swiglu_triton.register_fake
def _(gate_up):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.custom_op("fineviti::swiglu_triton_bwd", mutates_args=())
def _swiglu_triton_bwd(dh: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    from fineviti.kernels import swiglu

    return swiglu.backward(_fused.unit_last(dh), _fused.unit_last(gate_up))


@_swiglu_triton_bwd.register_fake
def _(dh, gate_up):
    return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


class _SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return torch.ops.fineviti.swiglu_triton(gate_up)

    @staticmethod
    def backward(ctx, dh):
        (gate_up,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the kernel's gradient has no graph of its own
            return _fused.differentiable_grads(_swiglu_fp32, (gate_up,), dh, (True,))[0]
        return torch.ops.fineviti.swiglu_triton_bwd(dh, gate_up)


def _swiglu_fp32(gate_up: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in torch: silu(gate) * up in fp32, rounded once to gate_up's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def swiglu(gate_up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up, with [gate | up] the two halves of gate_up's last dim: (..., 2 * hidden) float in,
    (..., hidden) in its dtype out. backend: "auto" (triton on CUDA for float32/float16/bfloat16, torch on a CPU
    and while torch.compile traces; FINEVITI_SWIGLU_BACKEND overrides it), "triton" or "torch". The triton
    backend computes the product in fp32 and rounds it once; the reference rounds silu(gate) first, as eager
    torch does in 16-bit."""
    if not isinstance(gate_up, torch.Tensor):
        raise TypeError(f"swiglu: gate_up must be a tensor, got {type(gate_up).__name__}")
    if not gate_up.is_floating_point():
        raise TypeError(f"swiglu: gate_up must be a floating-point tensor, got {gate_up.dtype}")
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2 != 0 or gate_up.shape[-1] == 0:
        raise ValueError(f"swiglu: gate_up's last dim must be 2 * hidden with hidden >= 1 ([gate | up]), got shape "
                         f"{tuple(gate_up.shape)}")
    backend = resolve_backend(backend, gate_up)
    if backend == "torch":
        return swiglu_ref(gate_up)
    flat = _fused.unit_last(gate_up.reshape(-1, gate_up.shape[-1]))
    return _SwiGLUTriton.apply(flat).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

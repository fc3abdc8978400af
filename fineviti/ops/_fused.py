"""What the fused elementwise ops (rms_norm, swiglu) share: their backends and the rule behind "auto"."""

from __future__ import annotations

import torch

from fineviti import _checks

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_backend(name: str, backend: str) -> None:
    """A clear error unless `backend` is one of BACKENDS (`name`: what it is, for the message)."""
    if backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {backend!r}")


def auto_backend(device_type: str, compiling: bool) -> str:
    """The rule behind "auto": triton on CUDA; torch on a CPU, and while torch.compile traces (Inductor makes one
    fused kernel of the plain expression and of the elementwise ops beside it, where our custom op would stay an
    opaque call between its graphs)."""
    return "triton" if device_type == "cuda" and not compiling else "torch"


def resolve(op: str, backend: str, x: torch.Tensor, env: str, max_width: int | None = None, arg: str = "x") -> str:
    """The backend "auto" means for input `x` (named `arg` in errors; environment variable `env` overrides it);
    checks an explicit one. Where "auto" would pick triton for what the kernels do not take (fp64, rows wider than
    `max_width`), the reference."""
    check_backend(f"{op}: backend", backend)
    too_wide = max_width is not None and x.shape[-1] > max_width
    if backend == "auto":
        backend = _checks.env_backend(env, BACKENDS, op) or auto_backend(x.device.type,
                                                                       torch.compiler.is_compiling())
        if backend == "triton" and (x.dtype not in TRITON_DTYPES or too_wide):
            return "torch"
    if backend == "triton":
        if x.device.type != "cuda" and not _checks.triton_interpreting():
            raise ValueError(f"{op}: backend='triton' needs a CUDA {arg} (or TRITON_INTERPRET=1), got "
                             f"{arg}.device={x.device}")
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"{op}: backend='triton' takes a float32, float16 or bfloat16 {arg}, got "
                            f"{arg}.dtype={x.dtype}")
        if too_wide:
            raise ValueError(f"{op}: backend='triton' takes rows of up to {max_width} features, got "
                             f"{arg}.shape[-1]={x.shape[-1]}; use backend='torch'")
    return backend


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by a stride and features by position: a unit last stride, copied only if needed."""
    return t if t.stride(-1) == 1 else t.contiguous()


def differentiable_grads(fn, inputs: tuple, grad_out: torch.Tensor, needed) -> tuple:
    """For a backward run with create_graph=True (a double backward): the gradients of fn(*inputs) for grad_out,
    as a differentiable function of the inputs and grad_out, from fn's plain torch expression (the fused kernels'
    backwards return tensors without a graph, which would silently drop the second-order terms). None where
    `needed` says an input needs no gradient."""
    wanted = [t for t, need in zip(inputs, needed, strict=True) if need]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(fn(*inputs), wanted, grad_out, create_graph=True) if wanted else ())
    return tuple(next(grads) if need else None for need in needed)

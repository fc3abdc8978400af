"""Input checks shared by the ops.

Shape, dtype and device checks always run. Checks of tensor values need the values on the host:
free for CPU tensors, a device-to-host synchronisation for CUDA ones, so on CUDA they run only when
asked for (an op's `check_values=True`, or FINEVITI_CHECKS=1 in the environment). While torch.compile traces, the
default leaves them out on CPU tensors too (a host read breaks the graph); check_values=True or FINEVITI_CHECKS=1
still ask for them there.
"""

from __future__ import annotations

import os

import torch

# On/off values as Triton reads its own variables (TRITON_INTERPRET=true interprets): any case.
_ON = ("1", "true", "yes", "on", "y")
_OFF = ("", "0", "false", "no", "off", "n")


def env_flag(variable: str, default: bool = False) -> bool:
    """An on/off environment variable of ours: 1/true/yes/on/y or 0/false/no/off/n/empty (any case); unset: default.
    Anything else is an error naming the variable, not silently on (FINEVITI_CHECKS=off turned checks on)."""
    value = os.environ.get(variable)
    if value is None:
        return default
    spelt = value.strip().lower()
    if spelt in _ON:
        return True
    if spelt in _OFF:
        return False
    raise ValueError(f"{variable}={value!r} is not an on/off value; expected 1, true, yes, on or 0, false, no, off")


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter, read exactly as Triton reads TRITON_INTERPRET (its getenv_bool:
    any case, no surrounding spaces)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _ON


def env_backend(variable: str, backends: tuple[str, ...], what: str) -> str | None:
    """The backend named by environment `variable` ("" or "auto": None), checked against `backends`."""
    value = os.environ.get(variable, "")
    if value in ("", "auto"):
        return None
    if value not in backends:
        raise ValueError(f"{variable}={value!r} is not a {what} backend; expected one of {backends}")
    return value


def value_checks_enabled(tensor: torch.Tensor, check_values: bool | None = None) -> bool:
    """Whether to check the values of `tensor`: always on the CPU, opt-in on an accelerator; by default not while
    torch.compile traces (a host read of a value would break the graph; check_values=True still asks for it)."""
    if check_values is not None:
        return check_values
    if env_flag("FINEVITI_CHECKS"):
        return True
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, name: str = "cu_seqlens",
                     max_seqlen: int | None = None, max_seqlen_name: str = "max_seqlen",
                     check_values: bool | None = None, *, seqlens: list[int] | None = None,
                     seqlens_name: str = "seqlens", what: str | None = None) -> None:
    """Check a cu_seqlens tensor: int32, 1-D with at least 2 entries; values when enabled. `seqlens`: host-side
    lengths the caller's kernels will trust, checked against cu_seqlens with its values; `what` ("image", ...):
    every sequence must have at least one token (empty ones are an error naming `what`)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have shape (n+1,) with n >= 1, got {tuple(cu_seqlens.shape)}")
    if not value_checks_enabled(cu_seqlens, check_values):
        return
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i}]={values[i]} < "
                             f"{name}[{i - 1}]={values[i - 1]}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of tokens {total}, got {values[-1]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:], strict=True)]
    if what is not None and 0 in lengths:
        raise ValueError(f"{name} holds an empty {what} (index {lengths.index(0)}, from {name} = "
                         f"{_abbreviated(values)}); every {what} needs at least one token")
    if seqlens is not None and list(seqlens) != lengths:
        raise ValueError(f"{seqlens_name} must list the lengths of {name}, {_abbreviated(lengths)}; got "
                         f"{_abbreviated(list(seqlens))} (the attention would run on other boundaries than the "
                         f"pooling)")
    if max_seqlen is not None:
        longest = max(lengths)
        if longest > max_seqlen:
            raise ValueError(f"{max_seqlen_name}={max_seqlen} is smaller than the longest sequence "
                             f"in {name} ({longest})")


def _abbreviated(values: list, keep: int = 8) -> str:
    return str(values) if len(values) <= keep else f"{str(values[:keep])[:-1]}, ... ({len(values)} values)]"


def refuse_interpreted_bf16(op: str, tensor: torch.Tensor, instead: str) -> None:
    """Triton's CPU interpreter computes bfloat16 tl.dot products wrongly (triton 3.6-3.8; errors of 1e8 and more,
    silently): the Triton backends with dot products refuse bf16 CPU tensors rather than return them."""
    if tensor.device.type == "cpu" and tensor.dtype == torch.bfloat16:
        raise ValueError(f"{op}: backend='triton' on a CPU runs in Triton's interpreter, whose bfloat16 dot products "
                         f"are wrong; got bfloat16 tensors. Pass float16 or float32 ones, or use {instead}")

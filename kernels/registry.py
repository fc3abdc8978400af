"""What each Triton kernel ships: the configurations the kernel report compiles for the GPU.

A kernel module calls `declare(name, kernel, configs)` at import time, where `configs` is a function
returning `Shipped` rows: one per (autotune config x representative constexprs x dtype) that the
kernel can launch with in production. `benchmarks/kernel_report.py` compiles each row ahead of time
for a named target (no GPU needed) and reads its resources; the interpreter tests run the shipped
block shapes (`shipped(name)`) on small ragged inputs. Every kernel a module launches is
declared (tests/test_kernel_report_coverage.py scans for launches), a launch runs with the warps and stages its rows
declare, and a declaration whose configurations function returns no rows fails the report's --check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Shipped:
    """One compiled variant of a kernel.

    signature: every argument of the kernel by name -> Triton type string ('*fp16', '*bf16', '*fp32',
        '*i32', 'i32', 'i64', 'fp32', or 'constexpr'), in the kernel's argument order.
    constexprs: the value of every 'constexpr' argument (block sizes, HEAD_DIM, flags).
    """

    kernel_name: str
    label: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 2
    warp_specialize: bool = False  # asked for through tl.range(..., warp_specialize=True)
    maxnreg: int | None = None  # the launch's register cap per thread (ptxas .maxnreg), where the launcher sets one
    # Arguments the launch specialises as divisible by 16 (Triton does so at run time for 16-byte-aligned
    # pointers and for ints that are multiples of 16); None means every pointer argument and no int.
    aligned: tuple[str, ...] | None = None
    # A measured exception to the kernel report's no-spill gate: up to this many bytes of spill stores pass as a
    # warning, with `spill_reason` (what was measured against what) printed beside them. 0: any spill fails.
    spill_allowance: int = 0
    spill_reason: str = ""
    fn: object = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Declared:
    name: str
    fn: object  # the triton.JITFunction
    configs: Callable[[], list[Shipped]]


_REGISTRY: dict[str, Declared] = {}


def declare(name: str, fn: object, configs: Callable[[], list[Shipped]]) -> None:
    """Register `fn` (a @triton.jit function) under `name` with the function listing what it ships."""
    if name in _REGISTRY and _REGISTRY[name].fn is not fn:
        raise ValueError(f"kernel name {name!r} is declared twice")
    _REGISTRY[name] = Declared(name, fn, configs)


def elementwise_row(kernel_name: str, label: str, signature: dict[str, str], constexprs: dict[str, object],
                    num_warps: int, width_arg: str, num_stages: int) -> Shipped:
    """A row of a row-wise elementwise kernel (the fused norm and SwiGLU) with the warps and stages its launcher
    passes (both from the module's `config()`, which the launch reads too), specialised as the launch does for the
    shipped widths: the pointers, the row strides and `width_arg` divisible by 16."""
    aligned = tuple(n for n, t in signature.items() if t.startswith("*") or n == width_arg
                    or n.startswith("stride_"))
    return Shipped(kernel_name=kernel_name, label=label, signature=signature, constexprs=constexprs,
                   num_warps=num_warps, num_stages=num_stages, aligned=aligned)


def compile_attrs(row: Shipped) -> dict:
    """`attrs` for triton.compiler.ASTSource that reproduce the run-time specialisation of `row`."""
    names = list(row.signature)
    if row.aligned is None:
        aligned = [n for n, t in row.signature.items() if t.startswith("*")]
    else:
        aligned = list(row.aligned)
    return {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}


def declared() -> dict[str, Declared]:
    """Every declared kernel, after importing all kernel modules."""
    import fineviti.kernels  # noqa: F401  (imports every kernel module, which declare themselves)

    return dict(_REGISTRY)


def shipped(name: str | None = None) -> list[Shipped]:
    """Every shipped configuration (of one kernel when `name` is given), with `fn` filled in."""
    rows = []
    for decl in declared().values():
        if name is not None and decl.name != name:
            continue
        rows.extend(dataclasses.replace(row, fn=decl.fn) for row in decl.configs())
    return rows

"""Fixture kernels for tests/test_kernel_report.py: one clean, one built to spill registers.

They are never declared in `fineviti.kernels.registry` (the registry is process-wide and would leak them into
every other test and into the real report); `rows()` returns their `Shipped` rows with `fn` filled in, which
`benchmarks/kernel_report.py --rows tests.kernels_for_report:rows` compiles like registry rows.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import triton
import triton.language as tl

from fineviti.kernels.registry import Shipped


@triton.jit
def clean_matmul_kernel(
    a_ptr,  # (M, K)
    b_ptr,  # (K, N)
    c_ptr,  # (M, N)
    M,
    N,
    K,
    stride_a_m,
    stride_b_k,
    stride_c_m,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C = A @ B tile by tile, fp32 accumulation: on sm_90 with 16-bit inputs Triton lowers it to HGMMA."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_mask = (rows[:, None] < M) & ((k0 + ks)[None, :] < K)
        a = tl.load(a_ptr + rows[:, None] * stride_a_m + (k0 + ks)[None, :], mask=a_mask, other=0.0)
        b_mask = ((k0 + ks)[:, None] < K) & (cols[None, :] < N)
        b = tl.load(b_ptr + (k0 + ks)[:, None] * stride_b_k + cols[None, :], mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc)
    c_mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(c_ptr + rows[:, None] * stride_c_m + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _rownorm(x_ptr, y_ptr, n, ROWS: tl.constexpr, COLS: tl.constexpr):
    """y = x / sum(x * x, row) over one giant tile held by a single warp: ROWS * COLS / 32 fp32 values per thread
    stay live across the reduction, far more than the 255 registers a thread may have, so ptxas spills. Jitted twice
    below: inlined (the kernel spills) and not inlined (ptxas logs the spills under the callee's own name)."""
    r = tl.arange(0, ROWS)
    c = tl.arange(0, COLS)
    offsets = r[:, None] * n + c[None, :]
    mask = c[None, :] < n
    x = tl.load(x_ptr + offsets, mask=mask, other=1.0)
    s = tl.sum(x * x, 1)
    tl.store(y_ptr + offsets, x / s[:, None], mask=mask)


_rownorm_inlined = triton.jit(_rownorm)
_spilling_rownorm_noinline = triton.jit(noinline=True)(_rownorm)


@triton.jit
def spilling_rownorm_kernel(
    x_ptr,  # (ROWS, n)
    y_ptr,  # (ROWS, n)
    n,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    """_rownorm inlined: the kernel itself spills."""
    _rownorm_inlined(x_ptr, y_ptr, n, ROWS, COLS)


@triton.jit
def warp_specialized_matmul_kernel(
    a_ptr,  # (M, K), contiguous
    b_ptr,  # (K, N), contiguous
    c_ptr,  # (M, N), contiguous
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The same product through device-side tensor descriptors (TMA) with a warp-specialised K loop: producer warps
    issue the loads, consumer warpgroups the wgmma, and setmaxnreg moves registers from the first to the second."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=True):
        a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        b = b_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
        acc = tl.dot(a, b, acc)
    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def broken_kernel(x_ptr, BLOCK: tl.constexpr):
    """Does not compile for BLOCK = 16: stands for a shipped configuration the kernel cannot build."""
    tl.static_assert(BLOCK % 3 == 0, "BLOCK must be a multiple of 3")
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros((BLOCK,), dtype=tl.float32))


@triton.jit
def noinline_spill_kernel(
    x_ptr,  # (ROWS, n)
    y_ptr,  # (ROWS, n)
    n,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    _spilling_rownorm_noinline(x_ptr, y_ptr, n, ROWS, COLS)


@triton.jit
def tiny_copy_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """The cheapest kernel to compile: one block copied."""
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs))


class AbortsInAnotherProcess:
    """A constexpr value that kills the process compiling it, as an LLVM assertion or a segfault in the compiler
    would: Triton hashes its constexprs by str(), and str() calls os.abort() in any process but the one that made
    the value (pickling keeps the maker's pid), so the test process itself can print it safely."""

    def __init__(self) -> None:
        self.maker_pid = os.getpid()

    def __str__(self) -> str:
        if os.getpid() != self.maker_pid:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the working folder
            print("fixture: this compile aborts on purpose", file=sys.stderr, flush=True)
            os.abort()
        return "AbortsInAnotherProcess"

    __repr__ = __str__


_MATMUL_SIG = {
    "a_ptr": "*fp16",
    "b_ptr": "*fp16",
    "c_ptr": "*fp16",
    "M": "i32",
    "N": "i32",
    "K": "i32",
    "stride_a_m": "i32",
    "stride_b_k": "i32",
    "stride_c_m": "i32",
    "BLOCK_M": "constexpr",
    "BLOCK_N": "constexpr",
    "BLOCK_K": "constexpr",
}


def clean_row(dtype: str = "fp16", warp_specialize: bool = False) -> Shipped:
    """warp_specialize=True asks for what this kernel cannot give (its loop is a plain range): the report warns."""
    sig = {k: (f"*{dtype}" if v.startswith("*") else v) for k, v in _MATMUL_SIG.items()}
    return Shipped(
        "fixture_clean_matmul",
        f"{dtype}-BM64-BN64-BK32-w4-s2" + ("-ws" if warp_specialize else ""),
        sig,
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
        num_warps=4,
        num_stages=2,
        warp_specialize=warp_specialize,
        fn=clean_matmul_kernel,
    )


def warp_specialized_row() -> Shipped:
    sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    return Shipped(
        "fixture_ws_matmul",
        "fp16-BM128-BN128-BK64-w4-s3-ws",
        sig,
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64},
        num_warps=4,
        num_stages=3,
        warp_specialize=True,
        fn=warp_specialized_matmul_kernel,
    )


def spilling_row() -> Shipped:
    return Shipped(
        "fixture_spilling_rownorm",
        "fp32-R64-C128-w1",
        {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "ROWS": "constexpr", "COLS": "constexpr"},
        {"ROWS": 64, "COLS": 128},
        num_warps=1,
        num_stages=1,
        fn=spilling_rownorm_kernel,
    )


def hmma_row() -> Shipped:
    """Two warps cannot form a warpgroup, so Triton falls back to warp-level HMMA on sm_90: the report warns."""
    return dataclasses.replace(clean_row(), label="fp16-BM64-BN64-BK32-w2-s2", num_warps=2)


def broken_row() -> Shipped:
    return Shipped("fixture_broken", "BLOCK16", {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16},
                   num_warps=1, num_stages=1, fn=broken_kernel)


def capped_row() -> Shipped:
    """The clean kernel launched with a register cap (ptxas .maxnreg) below what it takes uncapped (168)."""
    return dataclasses.replace(clean_row(), label="fp16-BM64-BN64-BK32-w4-s2-r96", maxnreg=96)


def noinline_spill_row() -> Shipped:
    return dataclasses.replace(spilling_row(), kernel_name="fixture_noinline_spill", fn=noinline_spill_kernel)


def copy_row(block: int = 32) -> Shipped:
    return Shipped("fixture_copy", f"BLOCK{block}", {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
                   {"BLOCK": block}, num_warps=1, num_stages=1, fn=tiny_copy_kernel)


def aborting_row() -> Shipped:
    return dataclasses.replace(copy_row(), kernel_name="fixture_aborts", label="aborts",
                               constexprs={"BLOCK": AbortsInAnotherProcess()})


def dying_rows() -> list[Shipped]:
    """A row whose compile kills its process between two that compile: run with one job, the first finishes in the
    pool, the abort breaks it, and the last had not run."""
    return [copy_row(32), aborting_row(), copy_row(64)]


def rows() -> list[Shipped]:
    """Every fixture row, as `kernel_report.py --rows tests.kernels_for_report:rows` reads them."""
    return [clean_row(), spilling_row(), warp_specialized_row(), clean_row("bf16", warp_specialize=True), hmma_row(),
            broken_row(), capped_row()]


def clean_rows() -> list[Shipped]:
    return [clean_row()]


def spilling_rows() -> list[Shipped]:
    return [clean_row(), spilling_row()]


def no_rows() -> list[Shipped]:
    return []

"""SwiGLU's gate, forward and backward, in Triton: h = silu(gate) * up for a fused projection [gate | up].

The eager expression (`F.silu(gate) * up` on two halves of one Linear's output) writes silu(gate) and reads it
back, keeps it for the backward, and its backward makes four more passes and a `cat` of the two halves' gradients.
Here the forward reads [gate | up] once and writes h once (the product in fp32, rounded once to the input dtype);
the backward reads dh and [gate | up] once and writes d[gate | up] once. Each program takes BLOCK_R rows by BLOCK_C
columns of h (a 2-D grid: widths of a few thousand need no loop).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import registry


@triton.jit
def _gate_up_tile(GU, rows, hidden, stride_gu, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's BLOCK_R rows (int64) by BLOCK_C columns of h: the rows, columns, mask, and gate and up in
    fp32."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < hidden)[None, :]
    r64 = r.to(tl.int64)
    gate_ptrs = GU + r64[:, None] * stride_gu + c[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + hidden, mask=mask, other=0.0).to(tl.float32)
    return r64, c, mask, gate, up


@triton.jit
def swiglu_fwd_kernel(
    GU,  # (rows, 2 * hidden): [gate | up], unit last stride
    H,  # (rows, hidden) out, GU's dtype
    rows,
    hidden,
    stride_gu,
    stride_h,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r64, c, mask, gate, up = _gate_up_tile(GU, rows, hidden, stride_gu, BLOCK_R, BLOCK_C)
    h = gate * tl.sigmoid(gate) * up
    tl.store(H + r64[:, None] * stride_h + c[None, :], h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(
    DH,  # (rows, hidden), unit last stride
    GU,  # (rows, 2 * hidden): [gate | up], unit last stride
    DGU,  # (rows, 2 * hidden) out: [d gate | d up], GU's dtype
    rows,
    hidden,
    stride_dh,
    stride_gu,
    stride_dgu,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r64, c, mask, gate, up = _gate_up_tile(GU, rows, hidden, stride_gu, BLOCK_R, BLOCK_C)
    dh = tl.load(DH + r64[:, None] * stride_dh + c[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu / d gate = sig * (1 + gate * (1 - sig))
    d_gate = dh * up * (sig * (1.0 + gate * (1.0 - sig)))
    d_up = dh * silu
    out = DGU + r64[:, None] * stride_dgu + c[None, :]
    tl.store(out, d_gate.to(DGU.dtype.element_ty), mask=mask)
    tl.store(out + hidden, d_up.to(DGU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Configurations and launchers


def config(hidden: int) -> dict:
    """BLOCK_C columns (up to 1024, a power of two) by BLOCK_R rows per program, 4096 elements, over 4 warps, one
    stage (no loop to pipeline; the launch passes it, and the kernel report compiles it): one config, no autotuning
    (the interpreter runs what the GPU runs)."""
    block_c = min(1024, triton.next_power_of_2(max(hidden, 1)))
    return {"BLOCK_R": max(1, 4096 // block_c), "BLOCK_C": block_c, "num_warps": 4, "num_stages": 1}


def _grid(rows: int, hidden: int, cfg: dict) -> tuple[int, int]:
    return triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(hidden, cfg["BLOCK_C"])


def forward(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a (rows, 2 * hidden) [gate | up] with a unit last stride; (rows, hidden) in its dtype."""
    rows, width = gate_up.shape
    hidden = width // 2
    h = torch.empty((rows, hidden), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0 or hidden == 0:
        return h
    cfg = config(hidden)
    swiglu_fwd_kernel[_grid(rows, hidden, cfg)](
        gate_up, h, rows, hidden, gate_up.stride(0), h.stride(0),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return h


def backward(dh: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d[gate | up] (gate_up's shape and dtype) for (rows, hidden) dh, both with unit last strides."""
    rows, width = gate_up.shape
    hidden = width // 2
    dgu = torch.empty((rows, width), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0 or hidden == 0:
        return dgu
    cfg = config(hidden)
    swiglu_bwd_kernel[_grid(rows, hidden, cfg)](
        dh, gate_up, dgu, rows, hidden, dh.stride(0), gate_up.stride(0), dgu.stride(0),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return dgu


# ---------------------------------------------------------------------------------------------------------------
# What ships: the presets' MLP widths (fineviti.model presets and the built-in LM), 16-bit and fp32.

SHIPPED_HIDDEN = (384, 512, 704, 2048, 2816, 4608)
_DTYPES = ("bf16", "fp16", "fp32")


def _configs() -> list[registry.Shipped]:
    rows = []
    for hidden in SHIPPED_HIDDEN:
        cfg = config(hidden)
        for dtype in _DTYPES:
            ptr = "*" + dtype
            fwd = {"GU": ptr, "H": ptr, "rows": "i32", "hidden": "i32", "stride_gu": "i32", "stride_h": "i32",
                   "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
            bwd = {"DH": ptr, "GU": ptr, "DGU": ptr, "rows": "i32", "hidden": "i32", "stride_dh": "i32",
                   "stride_gu": "i32", "stride_dgu": "i32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
            constexprs = {"BLOCK_R": cfg["BLOCK_R"], "BLOCK_C": cfg["BLOCK_C"]}
            rows += [registry.elementwise_row(kernel, f"h{hidden} {dtype}", signature, constexprs,
                                              cfg["num_warps"], "hidden", cfg["num_stages"])
                     for kernel, signature in (("swiglu_fwd_kernel", fwd), ("swiglu_bwd_kernel", bwd))]
    return rows


registry.declare("swiglu_fwd", swiglu_fwd_kernel,
                 lambda: [r for r in _configs() if r.kernel_name == "swiglu_fwd_kernel"])
registry.declare("swiglu_bwd", swiglu_bwd_kernel,
                 lambda: [r for r in _configs() if r.kernel_name == "swiglu_bwd_kernel"])

"""RMSNorm over the last dim, forward and backward, in Triton: y = x * rsqrt(mean(x^2) + eps) * weight.

Each program of the forward normalises BLOCK_R rows held whole in registers (BLOCK_W = the width rounded up to a
power of two, the columns past it masked): one read of x, one write of y in x's dtype, the math in fp32, and the
reciprocal root of each row kept (fp32) for the backward. The backward runs a persistent grid (a few programs per
SM, each looping over row blocks: one wave): dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * weight and
x_hat = x * rstd, in one read of x and dy and one write of dx, and each program's share of dweight = sum(dy * x_hat)
over its rows in an fp32 partial row that the caller sums. The eager torch expression this replaces
(fineviti.ops.norm.rms_norm_ref) makes about six passes over an fp32 copy of x forward and more backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import registry
from ._device import sm_count

MAX_WIDTH = 8192  # one row in registers: 8192 fp32 values over 8 warps are 32 per thread (16384 spilled)
_ELEMENTS = 4096  # per program (BLOCK_R * BLOCK_W) up to width 4096: 32 fp32 values per thread over 4 warps


@triton.jit
def rmsnorm_fwd_kernel(
    X,  # (rows, width), unit last stride
    W,  # (width,)
    Y,  # (rows, width) out, X's dtype
    RSTD,  # (rows,) fp32 out: 1 / sqrt(mean(x^2) + eps)
    rows,
    width,
    stride_x,
    stride_y,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_W)
    row_ok = r < rows
    col_ok = c < width
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = r.to(tl.int64)
    x = tl.load(X + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / width + eps)
    w = tl.load(W + c, mask=col_ok, other=0.0).to(tl.float32)
    y = (x * rstd[:, None]) * w[None, :]
    tl.store(Y + r64[:, None] * stride_y + c[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + r, rstd, mask=row_ok)


@triton.jit
def rmsnorm_bwd_kernel(
    DY,  # (rows, width), unit last stride
    X,  # (rows, width), unit last stride
    W,  # (width,)
    RSTD,  # (rows,) fp32, from the forward
    DX,  # (rows, width) out, X's dtype
    DW_PARTIAL,  # (programs, width) fp32 out: each program's sum of dy * x_hat over its rows
    rows,
    width,
    stride_dy,
    stride_x,
    stride_dx,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_W)
    col_ok = c < width
    w = tl.load(W + c, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_W], dtype=tl.float32)
    for block in range(pid, tl.cdiv(rows, BLOCK_R), tl.num_programs(0)):
        r = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = r < rows
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = r.to(tl.int64)
        x = tl.load(X + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64[:, None] * stride_dy + c[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        proj = tl.sum(g * x_hat, axis=1) / width
        dx = (g - x_hat * proj[:, None]) * rstd[:, None]
        tl.store(DX + r64[:, None] * stride_dx + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PARTIAL + pid * width + c, dw, mask=col_ok)


# ---------------------------------------------------------------------------------------------------------------
# Configurations and launchers


def config(width: int) -> dict:
    """BLOCK_W (the width rounded up to a power of two), BLOCK_R rows per program (4096 elements, at most 16 rows),
    the warps (32 elements per thread) and one stage (the kernel report's figures are for one; the launch passes it
    rather than take Triton's default): one config per width, no autotuning (the interpreter runs what the GPU
    runs). At 8192 elements per program over 4 warps the backward took 255 registers and spilled at width 384."""
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"rms_norm (triton): width must be in [1, {MAX_WIDTH}], got {width}")
    block_w = triton.next_power_of_2(width)
    block_r = max(1, min(16, _ELEMENTS // block_w))
    num_warps = max(4, min(8, block_r * block_w // 1024))
    return {"BLOCK_R": block_r, "BLOCK_W": block_w, "num_warps": num_warps, "num_stages": 1}


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y (x's dtype) and rstd (fp32, one per row) of a (rows, width) x with a unit last stride."""
    rows, width = x.shape
    y = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, rstd
    cfg = config(width)
    rmsnorm_fwd_kernel[(triton.cdiv(rows, cfg["BLOCK_R"]),)](
        x, weight, y, rstd, rows, width, x.stride(0), y.stride(0), float(eps),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_W=cfg["BLOCK_W"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return y, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
             rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (x's dtype) and dweight (weight's dtype) for (rows, width) dy and x with unit last strides."""
    rows, width = x.shape
    dx = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    cfg = config(width)
    # as many programs as fit on the GPU at once (kernel report, sm_90: 144-216 registers, so 3 per SM up to width
    # 2048, 2 at 4096, 1 at 8192): one wave, each program looping over its share of the row blocks
    per_sm = 3 if cfg["BLOCK_W"] <= 2048 else (2 if cfg["BLOCK_W"] <= 4096 else 1)
    programs = min(triton.cdiv(rows, cfg["BLOCK_R"]), per_sm * sm_count(x.device))
    partial = torch.empty((programs, width), dtype=torch.float32, device=x.device)
    rmsnorm_bwd_kernel[(programs,)](
        dy, x, weight, rstd, dx, partial, rows, width, dy.stride(0), x.stride(0), dx.stride(0),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_W=cfg["BLOCK_W"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return dx, partial.sum(0).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# What ships: the model widths (fineviti.model presets: 384-1536, and the built-in LM's), 16-bit and fp32 inputs,
# fp32 weights (the module's parameter) and, for 16-bit inputs, weights of the inputs' dtype (FSDP2's
# MixedPrecisionPolicy(param_dtype=bf16), or a model made with dtype=torch.bfloat16): another compiled kernel.

SHIPPED_WIDTHS = (384, 768, 1024, 1152, 1536, 2048, 4096, 8192)
_DTYPES = ("bf16", "fp16", "fp32")


def _configs() -> list[registry.Shipped]:
    rows = []
    for width in SHIPPED_WIDTHS:
        cfg = config(width)
        for dtype, weight in [(d, "fp32") for d in _DTYPES] + [("bf16", "bf16"), ("fp16", "fp16")]:
            ptr, w = "*" + dtype, "*" + weight
            fwd = {"X": ptr, "W": w, "Y": ptr, "RSTD": "*fp32", "rows": "i32", "width": "i32",
                   "stride_x": "i32", "stride_y": "i32", "eps": "fp32", "BLOCK_R": "constexpr",
                   "BLOCK_W": "constexpr"}
            bwd = {"DY": ptr, "X": ptr, "W": w, "RSTD": "*fp32", "DX": ptr, "DW_PARTIAL": "*fp32",
                   "rows": "i32", "width": "i32", "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32",
                   "BLOCK_R": "constexpr", "BLOCK_W": "constexpr"}
            constexprs = {"BLOCK_R": cfg["BLOCK_R"], "BLOCK_W": cfg["BLOCK_W"]}
            label = f"w{width} {dtype}" + ("" if weight == "fp32" else f" weight-{weight}")
            rows += [registry.elementwise_row(kernel, label, signature, constexprs, cfg["num_warps"], "width",
                                              cfg["num_stages"])
                     for kernel, signature in (("rmsnorm_fwd_kernel", fwd), ("rmsnorm_bwd_kernel", bwd))]
    return rows


registry.declare("rmsnorm_fwd", rmsnorm_fwd_kernel,
                 lambda: [r for r in _configs() if r.kernel_name == "rmsnorm_fwd_kernel"])
registry.declare("rmsnorm_bwd", rmsnorm_bwd_kernel,
                 lambda: [r for r in _configs() if r.kernel_name == "rmsnorm_bwd_kernel"])

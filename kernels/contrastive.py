"""Tiled SigLIP and CLIP losses: the N x N logits are recomputed tile by tile and never stored.

Forward: each program owns BLOCK_M rows and one split of the columns, computes z = scale * x @ y.T + bias one
(BLOCK_M, BLOCK_N) tile at a time (looping over D in BLOCK_K chunks, fp32 accumulation) and reduces it into
per-row SigLIP sums of softplus(-label * z) or per-row CLIP log-sum-exps (online max); with COLS, CLIP also writes
each tile's column log-sum-exps over its rows, so that one pass over the logits gives both directions.
Gradient: each (BLOCK_M, BLOCK_N) tile of a chunk of rows (one program per tile, or with PERSISTENT a program per
SM looping over tiles) computes z and writes dL/dz, times a factor the caller gives (its 1/N, scale and upstream
gradient, read from device memory), into a buffer that the caller multiplies with cuBLAS
(fineviti/ops/contrastive.py), plus per-tile partial sums for the gradients of the bias (sum dL/dz) and of the
scale (sum dL/dz * x.y, from the fp32 dot products) and, with WITH_LOSS (SigLIP), of the loss itself: SigLIP's
dL/dz needs no normaliser, so this one pass gives the loss and every gradient (CLIP's runs after its forward,
recomputing z). The SigLIP paper (Zhai et al.,
2023) and Inf-CL (Cheng et al., 2024) tile the same way.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from . import registry
from ._device import sm_count

SIGLIP = 0
CLIP = 1
_LOSSES = {"siglip": SIGLIP, "clip": CLIP}
_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@triton.jit
def _logit_dots(
    X, Y, offs_m, offs_n, mask_m, mask_n, D, stride_x_m, stride_y_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """x[offs_m] @ y[offs_n].T as a (BLOCK_M, BLOCK_N) fp32 tile, D looped in BLOCK_K chunks (tails zero)."""
    dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        x = tl.load(X + offs_m[:, None] * stride_x_m + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        y = tl.load(Y + offs_n[:, None] * stride_y_n + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)
        if IEEE:
            dots = tl.dot(x, tl.trans(y), dots, input_precision="ieee")
        else:
            dots = tl.dot(x, tl.trans(y), dots)
    return dots


# log(1 + e) / e on [0, 1]: the Chebyshev interpolant of degree 9 (nodes on [0, 1]), coefficients rounded to fp32.
# In fp32 Horner form, e * P(e) is within 1.6e-7 of log1p(e) relative for every e in [0, 1], small e included (no
# 1 + e that rounds to 1): tests/test_contrastive.py::test_log1p_polynomial runs it over [0, 1].


@triton.jit
def _log1p(e):
    """log(1 + e) for e in [0, 1] (SigLIP's exp(-|z|)) as e * P(e), P above: ten FMA-pipe instructions per
    logit, where libdevice's logf (range reduction and a polynomial, about 16) and Goldberg's division (about 9,
    for the precision of small e) took about 30."""
    p = tl.fma(e, -0.0031760570127516985, 0.019542526453733444)
    p = tl.fma(p, e, -0.056373611092567444)
    p = tl.fma(p, e, 0.10543623566627502)
    p = tl.fma(p, e, -0.1526966691017151)
    p = tl.fma(p, e, 0.1966327428817749)
    p = tl.fma(p, e, -0.24951615929603577)
    p = tl.fma(p, e, 0.33329710364341736)
    p = tl.fma(p, e, -0.49999892711639404)
    p = tl.fma(p, e, 1.0)
    return p * e


@triton.jit
def _diagonal(offs_m_first, offs_n_first, diag_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of the positives (column = row + diag_offset) of the tile whose first row and column
    are given (int64), compared in int32: the offset between the tile's local indices is clamped to a value no pair
    can reach when it is out of the tile, so that the per-logit test takes one 32-bit compare, not 64-bit ones."""
    shift = offs_m_first + diag_offset - offs_n_first  # positive iff local_n - local_m == shift
    shift = tl.minimum(tl.maximum(shift, -BLOCK_M), BLOCK_N).to(tl.int32)
    local = tl.arange(0, BLOCK_N)[None, :] - tl.arange(0, BLOCK_M)[:, None]
    return local == shift


@triton.jit
def _no_positive(offs_m_first, offs_n_first, diag_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether the tile whose first row and column are given holds no positive pair (the scalar side of
    _diagonal: local_n - local_m ranges over (-BLOCK_M, BLOCK_N))."""
    shift = offs_m_first + diag_offset - offs_n_first
    return (shift <= -BLOCK_M) | (shift >= BLOCK_N)


# Exponentials as exp2 of arguments in log2 units: one MUFU.EX2 per logit on sm_90, where tl.exp (exp(x) =
# ex2(x * log2 e) with a guard for subnormal results) compiled to five instructions; the scale is multiplied by
# log2 e once per program, not per logit (SASS counts in benchmarks/NOTES-losses.md).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _softplus(u):
    """log(1 + exp(u)) without overflow: max(u, 0) + log1p(exp(-|u|))."""
    return tl.maximum(u, 0.0) + _log1p(tl.math.exp2(-tl.abs(u) * _LOG2E))


@triton.jit
def _sigmoid_of_abs(e, g_scale):
    """g_scale / (1 + e) for e in [0, 1] (sigmoid(|z|) with e = exp(-|z|)): rsqrt of (1 + e)^2 is one MUFU.RSQ and
    two FMA-pipe instructions, where the division (div.full.f32) took about eight; both within about 2e-7
    relative. g_scale: a power of two (exact)."""
    return g_scale * tl.math.rsqrt(tl.fma(e, e + 2.0, 1.0))


@triton.jit
def contrastive_fwd_kernel(
    X,  # (M, D) row features (images; texts for CLIP's text-to-image direction)
    Y,  # (N, D) column features
    SCALE,  # (1,) fp32 logit scale (the multiplier, already exponentiated)
    BIAS,  # (1,) fp32 logit bias (SigLIP; zero for CLIP, where it cancels)
    OUT,  # (SPLITS, M) fp32: per column split, SigLIP row sums of -logsigmoid(label * z) or CLIP row log-sum-exps
    COL_OUT,  # (2, cdiv(M, BLOCK_M), N) fp32, with COLS: per row block, CLIP column maxima of z * log2 e and sums of
    #          exp2(z * log2 e - max)
    #          (planes stride_col_part apart; the caller takes the logs: else every thread holding a column would)
    POS,  # (M,) fp32, with COLS: z of each row's positive (column row + diag_offset; rows without one: unwritten)
    M,
    N,
    D,
    stride_x_m,
    stride_y_n,
    stride_out_s,
    stride_col_m,
    stride_col_part,
    diag_offset,  # the positive of row i is column i + diag_offset (none where that is outside [0, N))
    cols_per_split,  # columns per program along axis 1, a multiple of BLOCK_N
    LOSS: tl.constexpr,  # 0 SigLIP, 1 CLIP
    COLS: tl.constexpr,  # CLIP: also write each tile's column maxima and sums (the column log-sum-exps' parts)
    FLATTEN: tl.constexpr,  # the column loop and the K loop flattened into one (loads of the next tile in flight)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: true fp32 products, not TF32
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    z_scale = scale  # CLIP works in log2 units: its z carries log2 e from the scale, no multiply per logit
    z_bias = bias
    if LOSS == 1:
        z_scale = scale * _LOG2E
        z_bias = bias * _LOG2E
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for start_n in tl.range(col_start, col_end, BLOCK_N, flatten=FLATTEN):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < col_end
        z = z_scale * _logit_dots(X, Y, offs_m, offs_n, mask_m, mask_n, D, stride_x_m, stride_y_n,
                                  BLOCK_M, BLOCK_N, BLOCK_K, IEEE) + z_bias
        if LOSS == 0:
            plain = (start_n + BLOCK_N <= col_end) & _no_positive(pid_m * BLOCK_M, start_n, diag_offset, BLOCK_M,
                                                                  BLOCK_N)
            if FLATTEN:  # triton's loop fusion cannot take a branch in the fused loop: masked tiles only
                plain = False
            if plain:  # nearly every tile: no column past the split, all negatives, no mask
                row_sum += tl.sum(_softplus(z), axis=1)
            else:
                positive = _diagonal(pid_m * BLOCK_M, start_n, diag_offset, BLOCK_M, BLOCK_N)
                term = _softplus(tl.where(positive, -z, z))  # -logsigmoid(label * z)
                row_sum += tl.sum(tl.where(mask_n[None, :], term, 0.0), axis=1)
        else:  # z in log2 units; the maxima and the log-sum-exps go back to natural units once per row or column
            z = tl.where(mask_n[None, :], z, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(z, axis=1))
            row_sum = row_sum * tl.math.exp2(row_max - new_max) + tl.sum(tl.math.exp2(z - new_max[:, None]), axis=1)
            row_max = new_max
            if COLS:
                # a second exponential per logit: shifting by the row maxima instead could underflow a column's
                # largest terms (|z| reaches twice the scale), and every column is seen once per program
                zc = tl.where(mask_m[:, None], z, float("-inf"))
                col_max = tl.where(mask_n, tl.max(zc, axis=0), 0.0)  # columns past N: no -inf - -inf
                col_sum = tl.where(mask_n, tl.sum(tl.math.exp2(zc - col_max[None, :]), axis=0), 1.0)
                col_ptrs = COL_OUT + pid_m * stride_col_m + offs_n
                tl.store(col_ptrs, col_max, mask=mask_n)  # log2 units, as the sums are relative to it
                tl.store(col_ptrs + stride_col_part, col_sum, mask=mask_n)
    if COLS:  # the positives whose column is in this program's split: x_i . y_(i + diag_offset) in fp32 (exact
        # products, as the tiles' dots): after the loop, so the loop keeps its registers (an extraction from the
        # diagonal tiles inside it spilled 8-68 bytes), and no separate pass over fp32 copies of the features
        first = pid_m * BLOCK_M + diag_offset
        if (first < col_end) & (first + BLOCK_M > col_start):
            pos_col = offs_m + diag_offset
            here = mask_m & (pos_col >= col_start) & (pos_col < col_end)
            pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k in range(0, D, BLOCK_K):
                offs_k = k + tl.arange(0, BLOCK_K)
                both = here[:, None] & (offs_k < D)[None, :]
                xk = tl.load(X + offs_m[:, None] * stride_x_m + offs_k[None, :], mask=both, other=0.0)
                yk = tl.load(Y + pos_col[:, None] * stride_y_n + offs_k[None, :], mask=both, other=0.0)
                pos += tl.sum(xk.to(tl.float32) * yk.to(tl.float32), axis=1)
            tl.store(POS + offs_m, scale * pos + bias, mask=here)
    if LOSS == 0:
        out = row_sum
    else:
        out = (row_max + tl.log2(row_sum)) * _LN2
    tl.store(OUT + pid_s * stride_out_s + offs_m, out, mask=mask_m)


@triton.jit
def _grad_epilogue(
    dots, scale, offs_m, offs_n, mask_m, mask_n, first_m, first_n, BIAS, LSE_ROW, LSE_COL, G, g_scale, GMUL, PARTIAL,
    tile, tiles, stride_g_m, store_cols, diag_offset, LOSS: tl.constexpr, WITH_LOSS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):
    """dL/dz of one tile from the dot products x.y (z = scale * x.y), stored times GMUL, with its
    sums: of dL/dz (the bias), of dL/dz * x.y (the scale) and, WITH_LOSS, of the loss terms. MASKED: the tile has
    rows or columns past M or N, or positive pairs; without it (an interior tile off the diagonal, nearly all of
    them) no mask, no positive and no select is computed per logit."""
    # z in log2 units (scale and bias times log2 e, once): exp2 of it is one instruction per logit
    if MASKED:
        valid = mask_m[:, None] & mask_n[None, :]
        positive = _diagonal(first_m, first_n, diag_offset, BLOCK_M, BLOCK_N)
    if LOSS == 0:
        z = (scale * _LOG2E) * dots + tl.load(BIAS) * _LOG2E
        e = tl.math.exp2(-tl.abs(z))  # exp(-|z|) in natural units
        if WITH_LOSS:  # softplus(-label * z) = max(-label * z, 0) + log1p(e), from the same e
            if MASKED:
                term = tl.where(valid, tl.fma(tl.maximum(tl.where(positive, -z, z), 0.0), _LN2, _log1p(e)), 0.0)
            else:
                term = tl.fma(tl.maximum(z, 0.0), _LN2, _log1p(e))
            tl.store(PARTIAL + 2 * tiles + tile, tl.sum(tl.sum(term, axis=1), axis=0))
        # d/dz softplus(-label * z) = -label * sigmoid(-label * z): sigmoid(z) for negatives, -sigmoid(-z) for the
        # positive, both from e = exp(-|z|) <= 1 so that nothing overflows and tails keep their precision
        # (g_scale folded into r: an extra multiply per logit cost triton 3.6 a spill in the CLIP branch)
        r = _sigmoid_of_abs(e, g_scale)
        if MASKED:
            g = tl.where(positive, -tl.where(z >= 0, e * r, r), tl.where(z >= 0, r, e * r))
        else:
            g = tl.where(z >= 0, r, e * r)
    else:
        z = (scale * _LOG2E) * dots
        log_scale = tl.log2(g_scale)
        if MASKED:
            lse_row = tl.load(LSE_ROW + offs_m, mask=mask_m, other=0.0) * _LOG2E - log_scale
            lse_col = tl.load(LSE_COL + offs_n, mask=mask_n, other=0.0) * _LOG2E - log_scale
        else:
            lse_row = tl.load(LSE_ROW + offs_m) * _LOG2E - log_scale
            lse_col = tl.load(LSE_COL + offs_n) * _LOG2E - log_scale
        # image-to-text softmax + text-to-image softmax - 2 at the positive (all times g_scale)
        g = tl.math.exp2(z - lse_row[:, None]) + tl.math.exp2(z - lse_col[None, :])
        if MASKED:
            g -= tl.where(positive, 2.0 * g_scale, 0.0)
    ptrs = G + offs_m[:, None] * stride_g_m + offs_n[None, :]
    if MASKED:
        g = tl.where(valid, g, 0.0)  # g_scale * dL/dz
    out = g * tl.load(GMUL)
    if MASKED:
        # zeros go to the padding columns [N, store_cols) too: a multiple of 16 there lets the stores vectorise
        # whatever N is
        tl.store(ptrs, out.to(G.dtype.element_ty), mask=mask_m[:, None] & (offs_n < store_cols)[None, :])
    else:
        tl.store(ptrs, out.to(G.dtype.element_ty))
    tl.store(PARTIAL + tile, tl.sum(tl.sum(g, axis=1), axis=0) / g_scale)
    # the scale's gradient, sum(dL/dz * x.y), from the fp32 dot products (masked tiles: dots and g are 0 outside)
    tl.store(PARTIAL + tiles + tile, tl.sum(tl.sum(g * dots, axis=1), axis=0) / g_scale)


@triton.jit
def _grad_tile(
    tile_id, X, Y, scale, BIAS, LSE_ROW, LSE_COL, G, g_scale, GMUL, PARTIAL, M, N, D, stride_x_m, stride_y_n,
    stride_g_m, store_cols, diag_offset, LOSS: tl.constexpr, WITH_LOSS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, IEEE: tl.constexpr,
    SPLIT_PATHS: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of dL/dz, its sum and (WITH_LOSS) its loss sum; tiles are numbered so that
    GROUP_M row blocks walk the columns together. SPLIT_PATHS: interior tiles off the diagonal take the unmasked
    epilogue (else every tile takes the masked one)."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * grid_n
    first_m = (tile_id // group_size) * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = (first_m + (tile_id % group_size) % rows_in_group).to(tl.int64)
    pid_n = ((tile_id % group_size) // rows_in_group).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    tile = pid_m * grid_n + pid_n
    dots = _logit_dots(X, Y, offs_m, offs_n, mask_m, mask_n, D, stride_x_m, stride_y_n, BLOCK_M, BLOCK_N, BLOCK_K,
                       IEEE)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    plain = (row0 + BLOCK_M <= M) & (col0 + BLOCK_N <= N) & _no_positive(row0, col0, diag_offset, BLOCK_M, BLOCK_N)
    if not SPLIT_PATHS:  # triton's loop fusion (PERSISTENT) cannot take a branch in the fused loop
        plain = False
    if plain:
        _grad_epilogue(dots, scale, offs_m, offs_n, mask_m, mask_n, row0, col0, BIAS, LSE_ROW, LSE_COL, G, g_scale,
                       GMUL, PARTIAL, tile, grid_m * grid_n, stride_g_m, store_cols, diag_offset, LOSS, WITH_LOSS,
                       BLOCK_M, BLOCK_N, False)
    else:
        _grad_epilogue(dots, scale, offs_m, offs_n, mask_m, mask_n, row0, col0, BIAS, LSE_ROW, LSE_COL, G, g_scale,
                       GMUL, PARTIAL, tile, grid_m * grid_n, stride_g_m, store_cols, diag_offset, LOSS, WITH_LOSS,
                       BLOCK_M, BLOCK_N, True)


@triton.jit
def contrastive_bwd_kernel(
    X,  # (M, D) row features
    Y,  # (N, D) column features
    SCALE,  # (1,) fp32
    BIAS,  # (1,) fp32
    LSE_ROW,  # (M,) fp32 CLIP row log-sum-exps (unused by SigLIP: pass any fp32 tensor)
    LSE_COL,  # (N,) fp32 CLIP column log-sum-exps (likewise)
    G,  # (M, N) input dtype, out: dL/dz without the 1/N factor, times g_scale (and GMUL)
    g_scale,  # fp32 power of two: fp16 stores dL/dz scaled up (|dL/dz| <= 2) so that small values stay normal
    GMUL,  # (1,) fp32: a factor of the stored values only (the caller's 1/N * scale * upstream, or 1)
    PARTIAL,  # (3, grid_m * grid_n) fp32, out: per tile sum(dL/dz), sum(dL/dz * x.y) and (WITH_LOSS) the sum of
    #           the loss terms
    M,
    N,
    D,
    stride_x_m,
    stride_y_n,
    stride_g_m,
    store_cols,  # columns of G the kernel writes: N, or G's padded width (zeros past N) so that stores vectorise
    diag_offset,
    LOSS: tl.constexpr,
    WITH_LOSS: tl.constexpr,  # SigLIP: also the sum of -logsigmoid(label * z) over the tile
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row blocks that walk the columns together, so that Y tiles are reused from L2
    PERSISTENT: tl.constexpr,  # a grid of one program per SM, each looping over tiles (one flattened loop)
    IEEE: tl.constexpr,
):
    scale = tl.load(SCALE)
    if PERSISTENT:
        # the tile loop and the K loop flattened into one, so that the loads of the next tile are in flight while
        # this tile's epilogue runs
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _grad_tile(tile_id, X, Y, scale, BIAS, LSE_ROW, LSE_COL, G, g_scale, GMUL, PARTIAL, M, N, D,
                       stride_x_m, stride_y_n, stride_g_m, store_cols, diag_offset, LOSS, WITH_LOSS, BLOCK_M,
                       BLOCK_N, BLOCK_K, GROUP_M, IEEE, False)
    else:
        _grad_tile(tl.program_id(0), X, Y, scale, BIAS, LSE_ROW, LSE_COL, G, g_scale, GMUL, PARTIAL, M, N, D,
                   stride_x_m, stride_y_n, stride_g_m, store_cols, diag_offset, LOSS, WITH_LOSS, BLOCK_M,
                   BLOCK_N, BLOCK_K, GROUP_M, IEEE, True)


@triton.jit
def _tile_of_program(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The elementwise kernels' (BLOCK_M, BLOCK_N) tile of an (M, N) block: program (row tile, column tile), the
    tile's row and column indices and their masks."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_n, offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def contrastive_bwd_dots_kernel(
    DOTS,  # (M, N) fp32 dot products x.y, from cuBLAS (FINEVITI_LOSS_LOGITS=gemm)
    stride_dots_m,
    SCALE,  # (1,) fp32
    BIAS,  # (1,) fp32
    LSE_ROW,  # (M,) fp32 CLIP row log-sum-exps (unused by SigLIP: pass any fp32 tensor)
    LSE_COL,  # (N,) fp32 CLIP column log-sum-exps (likewise)
    G,  # (M, N) 16-bit or fp32, out: as contrastive_bwd_kernel's
    g_scale,
    GMUL,
    PARTIAL,  # (3, tiles) fp32, out: as contrastive_bwd_kernel's
    M,
    N,
    stride_g_m,
    store_cols,
    diag_offset,
    LOSS: tl.constexpr,
    WITH_LOSS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """contrastive_bwd_kernel's epilogue on dot products read from memory instead of computed: the products run in
    cuBLAS (at its rate, with the (M, N) fp32 block written and read once), this kernel is elementwise."""
    pid_m, pid_n, offs_m, offs_n, mask_m, mask_n = _tile_of_program(M, N, BLOCK_M, BLOCK_N)
    tile = pid_m * tl.num_programs(1) + pid_n
    tiles = tl.num_programs(0) * tl.num_programs(1)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    scale = tl.load(SCALE)
    ptrs = DOTS + offs_m[:, None] * stride_dots_m + offs_n[None, :]
    plain = (row0 + BLOCK_M <= M) & (col0 + BLOCK_N <= N) & _no_positive(row0, col0, diag_offset, BLOCK_M, BLOCK_N)
    if plain:
        _grad_epilogue(tl.load(ptrs), scale, offs_m, offs_n, mask_m, mask_n, row0, col0, BIAS, LSE_ROW, LSE_COL, G,
                       g_scale, GMUL, PARTIAL, tile, tiles, stride_g_m, store_cols, diag_offset, LOSS, WITH_LOSS,
                       BLOCK_M, BLOCK_N, False)
    else:
        dots = tl.load(ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        _grad_epilogue(dots, scale, offs_m, offs_n, mask_m, mask_n, row0, col0, BIAS, LSE_ROW, LSE_COL, G, g_scale,
                       GMUL, PARTIAL, tile, tiles, stride_g_m, store_cols, diag_offset, LOSS, WITH_LOSS, BLOCK_M,
                       BLOCK_N, True)


@triton.jit
def contrastive_fwd_dots_kernel(
    DOTS,  # (M, N) fp32 dot products x.y, from cuBLAS (FINEVITI_LOSS_LOGITS=gemm)
    stride_dots_m,
    SCALE,  # (1,) fp32
    ROW_OUT,  # (2, cdiv(N, BLOCK_N), M) fp32, out: per column tile, the row maxima of z * log2 e and the row sums of
    #          exp2(z * log2 e - max) (planes stride_row_part apart, tiles stride_row_t)
    COL_OUT,  # (2, cdiv(M, BLOCK_M), N) fp32, out, with COLS: per row tile, the same for the columns
    M,
    N,
    stride_row_t,
    stride_row_part,
    stride_col_m,
    stride_col_part,
    COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """CLIP's forward (contrastive_fwd_kernel with LOSS=1) on dot products read from memory: each program one
    tile, its rows' and columns' maxima and sums of exponentials, which the caller combines into log-sum-exps
    (lse_of_partials). Elementwise: the products run in cuBLAS, as in contrastive_bwd_dots_kernel."""
    pid_m, pid_n, offs_m, offs_n, mask_m, mask_n = _tile_of_program(M, N, BLOCK_M, BLOCK_N)
    z_scale = tl.load(SCALE) * _LOG2E  # log2 units, as the fused forward's z
    ptrs = DOTS + offs_m[:, None] * stride_dots_m + offs_n[None, :]
    if (pid_m * BLOCK_M + BLOCK_M <= M) & (pid_n * BLOCK_N + BLOCK_N <= N):
        z = z_scale * tl.load(ptrs)
    else:  # every tile has a row and a column inside: its maxima are finite where stored
        z = tl.where(mask_m[:, None] & mask_n[None, :],
                     z_scale * tl.load(ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0), float("-inf"))
    row_max = tl.max(z, axis=1)
    row_sum = tl.sum(tl.math.exp2(z - tl.where(mask_m, row_max, 0.0)[:, None]), axis=1)
    row_ptrs = ROW_OUT + pid_n * stride_row_t + offs_m
    tl.store(row_ptrs, row_max, mask=mask_m)
    tl.store(row_ptrs + stride_row_part, row_sum, mask=mask_m)
    if COLS:
        col_max = tl.max(z, axis=0)
        col_sum = tl.sum(tl.math.exp2(z - tl.where(mask_n, col_max, 0.0)[None, :]), axis=0)
        col_ptrs = COL_OUT + pid_m * stride_col_m + offs_n
        tl.store(col_ptrs, col_max, mask=mask_n)
        tl.store(col_ptrs + stride_col_part, col_sum, mask=mask_n)


# ---------------------------------------------------------------------------------------------------------------
# Configurations and launchers


KERNELS = ("fwd", "fwd_cols", "bwd", "bwd_loss")  # what config() takes: the two kernels and their flag variants


def config(d: int, dtype: torch.dtype, kernel: str = "bwd", loss: str = "siglip") -> dict:
    """Block sizes and launch options of `kernel` (one of KERNELS: the forward, CLIP's forward with the column
    log-sum-exps, the gradient, SigLIP's gradient with the loss sum) for feature width `d`, input dtype and loss: one
    config, no autotuning, so that the interpreter runs what the GPU runs. The bf16 forward and gradient tiles are
    the fastest of a sweep on an H100 at N = 32768, D = 768 (benchmarks/bench_contrastive.py --sweep-configs);
    fp16 follows bf16. The 2026-11-28 measurements and register counts below moved CLIP's one-pass forward
    (fwd_cols) to 64 x 128 over 4 warps and the gradient kernels (bwd, bwd_loss) to 128 x 64. An H200 sweep of
    2026-11-28 hinted at 7-10% for other gradient tiles, against a baseline from another section; the sweep now
    carries its own pinned row (benchmarks/bench_contrastive.py, sweep_configs) and decides at the next run."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    # PERSISTENT (gradient) and FLATTEN (forward): flattened loops, not yet measured against the plain ones and off
    # until a GPU sweep says otherwise. 128 x 128 persistent tiles of the gradient kernel with its loss sum spill
    # (364-504 bytes, triton 3.6 and 3.8): check the kernel report before turning either on.
    loops = {"PERSISTENT": False} if kernel.startswith("bwd") else {"FLATTEN": False}
    if dtype == torch.float32:  # true fp32 products run on the FMA pipes: small tiles over 8 warps, no spills
        # (SigLIP's gradient with its loss sum spilled 8 bytes on triton 3.6 at BLOCK_K 32 once log1p became a
        # polynomial; 115 registers at 16)
        block_k = 16 if kernel == "bwd_loss" else 32
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 2, **loops}
    block_k = 64 if d >= 64 else 32
    # The H100 sweep's fastest CLIP forward, 128 x 256 tiles, spilled 108-160 bytes per thread on sm_90 (kernel
    # report): the kernel report's CI gate fails any shipped spill, so CLIP's forward takes 128 x 128 tiles. A
    # fourth stage measured faster in bf16. The gradient kernels take 128 x 64: since they also reduce the scale's
    # gradient, sum(dL/dz * x.y), from the fp32 dot products (which saved the step two passes over an fp32 (N, D)
    # product; 2026-11-28 profile), 128 x 128 tiles spill 12-104 bytes (triton 3.6 and 3.8) and 128 x 64 take
    # 113-194 registers without; the 2026-11-28 sweep timed the two within 1% for SigLIP's step (2.859 against
    # 2.838 ms at N = 16384, D = 768, bf16, the older epilogue).
    if kernel == "fwd_cols":
        # CLIP's one-pass forward over 4 warps, two programs per SM (236-250 registers, no spills): one program's
        # epilogue (two exponentials per logit and the column reductions) runs beside the other's matmul. H100,
        # N = 16384, D = 768, bf16 (benchmarks/results/2026-11-28_H100-80GB-HBM3_gpu_check_targeted_summary.md):
        # CLIP forward 1.722 ms against 1.968 for 128 x 128 over 8 warps, the whole step 4.265 against 4.528.
        # SigLIP's forward stays at 128 x 128 (1.120 ms against 1.217 for this tile). Its column partials stay
        # within COL_PARTIAL_BYTES whatever BLOCK_M is (loss_rows_cols takes rows in chunks).
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 4, **loops}
    block_n = 64 if kernel.startswith("bwd") else 128
    return {"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 4, **loops}


_GROUP_M = 8


def _caps(cfg: dict) -> dict:
    """The launch's register cap (cfg["maxnreg"], ptxas .maxnreg) where a config sets one: a cap of 128 registers
    per thread fits two 8-warp programs on an SM (65536 registers), so that one's epilogue can run beside the other's
    matmul."""
    return {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dtype not in _TRITON_DTYPES or y.dtype != x.dtype:
        raise TypeError(f"contrastive kernels take bf16, fp16 or fp32 features of one dtype, got {x.dtype} and "
                        f"{y.dtype}")
    if x.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError(f"contrastive kernels need unit stride along D, got strides {x.stride()} and {y.stride()}")


def _launch_rows(x, y, scale, bias, loss, diag_offset, splits, col_out, pos=None):
    """Per-row partials (splits, M) of x against y; with col_out (2, cdiv(M, BLOCK_M), N), CLIP's per-row-block
    column maxima and sums of exp(z - max) too, and the positives' logits into `pos` (M,), which it then needs."""
    if (col_out is None) != (pos is None):
        raise ValueError("col_out and pos go together (CLIP's one-pass forward writes both)")
    m, d = x.shape
    n = y.shape[0]
    cfg = config(d, x.dtype, "fwd_cols" if col_out is not None else "fwd", loss)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid_m = triton.cdiv(m, block_m)
    col_blocks = triton.cdiv(n, block_n)
    if splits is None:  # enough programs to fill the GPU a few times over when M alone would not
        splits = triton.cdiv(4 * sm_count(x.device), grid_m)
    blocks_per_split = triton.cdiv(col_blocks, max(1, min(splits, col_blocks)))
    cols_per_split = blocks_per_split * block_n
    splits = triton.cdiv(n, cols_per_split)
    out = torch.empty((splits, m), device=x.device, dtype=torch.float32)
    cols = col_out is not None
    contrastive_fwd_kernel[(grid_m, splits)](
        x, y, scale, bias, out, col_out if cols else out, pos if cols else out, m, n, d, x.stride(0), y.stride(0),
        out.stride(0),
        col_out.stride(1) if cols else 0, col_out.stride(0) if cols else 0, diag_offset, cols_per_split,
        LOSS=_LOSSES[loss], COLS=cols, FLATTEN=bool(cfg.get("FLATTEN", False)), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=cfg["BLOCK_K"],
        IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_caps(cfg))
    return out


def loss_rows(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *, loss: str,
              diag_offset: int = 0, splits: int | None = None) -> torch.Tensor:
    """Per row of x (M, D) against all rows of y (N, D), in fp32: SigLIP sums of -logsigmoid(label * z) or CLIP
    log-sum-exps of z, with z = scale * x @ y.T + bias. scale and bias: (1,) fp32 on the features' device."""
    _check(x, y)
    out = _launch_rows(x, y, scale, bias, loss, diag_offset, splits, None)
    if out.shape[0] == 1:
        return out[0]
    return out.sum(0) if loss == "siglip" else torch.logsumexp(out, dim=0)


COL_PARTIAL_BYTES = 64 << 20  # loss_rows_cols: the per-row-block column partials of one chunk of rows


def loss_rows_cols(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, *, splits: int | None = None,
                   chunk_bytes: int = COL_PARTIAL_BYTES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP's log-sum-exps of z = scale * x @ y.T along both axes from one pass over the logits, and the positives'
    logits: (per row of x (M,), per row of y (N,), z_ii per row of x (M,); rows past N: 0), fp32. Each row block
    writes its column maxima and sums of exp(z - max) to a partial buffer of at most `chunk_bytes` (rows are taken
    in chunks that fit), which torch reduces (and takes the logs of: once per column, where the kernel would have
    taken each on every thread that holds the column)."""
    _check(x, y)
    m, n = x.shape[0], y.shape[0]
    positive = (torch.empty if m <= n else torch.zeros)(m, device=x.device, dtype=torch.float32)
    block_m = config(x.shape[1], x.dtype, "fwd_cols", "clip")["BLOCK_M"]
    blocks = max(1, chunk_bytes // max(1, 8 * padded_cols(n)))
    step = blocks * block_m
    zero = torch.zeros(1, device=x.device, dtype=torch.float32)
    lse_row = torch.empty(m, device=x.device, dtype=torch.float32)
    lse_col = None
    # rows padded to a multiple of 16 floats, so that both strides are too (what the registry compiles for)
    col_part = torch.empty((2, min(blocks, triton.cdiv(m, block_m)), padded_cols(n)), device=x.device,
                           dtype=torch.float32)[:, :, :n]
    for start in range(0, m, step):
        stop = min(m, start + step)
        part = col_part[:, :triton.cdiv(stop - start, block_m)]
        rows = _launch_rows(x[start:stop], y, scale, zero, "clip", start, splits, part, positive[start:stop])
        lse_row[start:stop] = rows[0] if rows.shape[0] == 1 else torch.logsumexp(rows, dim=0)
        cols = lse_of_partials(part)
        lse_col = cols if lse_col is None else torch.logaddexp(lse_col, cols)
    return lse_row, lse_col, positive


def lse_of_partials(part: torch.Tensor) -> torch.Tensor:
    """Natural log-sum-exps from (2, tiles, L) partials in log2 units (maxima, then sums of exp2(z - max)): over
    the tiles, per position L. Every tile holds an element of each position, so the maxima are finite."""
    top = part[0].amax(0)
    return (top + torch.log2((part[1] * torch.exp2(part[0] - top)).sum(0))) * math.log(2.0)


def clip_partials_from_dots(dots: torch.Tensor, scale: torch.Tensor, *, cols: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLIP's forward partials from the (M, N) fp32 dot products x.y computed elsewhere (cuBLAS), z = scale * x.y:
    the rows' (2, cdiv(N, BLOCK_N), M) and, with cols, the columns' (2, cdiv(M, BLOCK_M), N), for lse_of_partials.
    One elementwise pass over the products, the loss_rows_cols of the gemm logits mode."""
    if dots.dtype != torch.float32 or dots.dim() != 2 or dots.stride(1) != 1:
        raise ValueError(f"dots must be a 2-D float32 tensor with unit column stride, got {dots.dtype} "
                         f"{tuple(dots.shape)} strides {dots.stride()}")
    m, n = dots.shape
    cfg = DOTS_CONFIG
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    row_part = torch.empty((2, grid[1], m), device=dots.device, dtype=torch.float32)
    col_part = torch.empty((2, grid[0], n), device=dots.device, dtype=torch.float32) if cols else None
    if m and n:
        out = row_part if col_part is None else col_part
        contrastive_fwd_dots_kernel[grid](
            dots, dots.stride(0), scale, row_part, out, m, n, row_part.stride(1), row_part.stride(0),
            out.stride(1), out.stride(0), COLS=cols, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return row_part, col_part


def grad_scale(dtype: torch.dtype) -> float:
    """The power of two loss_grad_logits multiplies dL/dz by before storing it: 2**14 for fp16 (|dL/dz| <= 2 stays
    below fp16's maximum, and gradients down to 2**-38 stay normal numbers instead of flushing), 1 otherwise (bf16
    has fp32's range). The caller divides its fp32 products by it (exact)."""
    return 16384.0 if dtype == torch.float16 else 1.0


def loss_grad_logits(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, g: torch.Tensor, *,
                     loss: str, diag_offset: int = 0, lse_row: torch.Tensor | None = None,
                     lse_col: torch.Tensor | None = None, with_loss: bool = False,
                     store_cols: int | None = None, mult: torch.Tensor | None = None) -> torch.Tensor:
    """Fill g (M, N), in the features' dtype, with grad_scale(dtype) * mult * dL/dz per pair (without the 1/N
    factor; `mult`: a (1,) fp32 tensor, default 1, so that the caller's products come out scaled): SigLIP
    -label * sigmoid(-label * z); CLIP softmax_row + softmax_col - 2 at the positive, from the saved fp32
    log-sum-exps. Returns fp32 sums over the block, without grad_scale and mult: (sum(dL/dz), sum(dL/dz * x.y)) (the
    gradients of the bias and the scale), and with `with_loss` (SigLIP only) the sum of -logsigmoid(label * z)
    third. Give g a row stride that is a multiple of 16 (new_grad_buffer), or its stores do not
    vectorise. store_cols: the columns of each row of g the kernel may write, N (the default) up to g's row stride:
    the columns past N get zeros, and a multiple of 16 lets the stores vectorise for any N (new_grad_buffer's
    padded width, padded_cols(N); only for a [:, :N] view of a buffer whose padding columns hold nothing)."""
    _check(x, y)
    m, d = x.shape
    n = y.shape[0]
    store_cols, lse_row, lse_col, mult = _grad_args(m, n, x.dtype, x.device, scale, g, loss, lse_row, lse_col,
                                                    with_loss, store_cols, mult)
    cfg = config(d, x.dtype, "bwd_loss" if with_loss else "bwd", loss)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    partial = torch.empty((3, tiles), device=x.device, dtype=torch.float32)
    persistent = bool(cfg.get("PERSISTENT", False))
    programs = min(tiles, sm_count(x.device)) if persistent else tiles  # one program per SM: 1 block/SM (regs)
    contrastive_bwd_kernel[(programs,)](
        x, y, scale, bias, lse_row, lse_col, g, grad_scale(x.dtype), mult, partial, m, n, d, x.stride(0), y.stride(0),
        g.stride(0), store_cols, diag_offset,
        LOSS=_LOSSES[loss], WITH_LOSS=with_loss, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=_GROUP_M, PERSISTENT=persistent, IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **_caps(cfg))
    # rows: sum(dL/dz), sum(dL/dz * x.y), the loss terms (WITH_LOSS; else not written). A slice, not an index
    # list: a list index would copy it to the device and wait for the kernel (a sync per chunk)
    return partial[:3 if with_loss else 2].sum(1)


def _grad_args(m, n, dtype, device, scale, g, loss, lse_row, lse_col, with_loss, store_cols, mult):
    """The gradient launchers' checks and defaults: (store_cols, lse_row, lse_col, mult)."""
    if g.shape != (m, n) or g.dtype != dtype or g.stride(1) != 1:
        raise ValueError(f"g must be a ({m}, {n}) {dtype} buffer with unit column stride, got {tuple(g.shape)} "
                         f"{g.dtype} strides {g.stride()}")
    store_cols = n if store_cols is None else store_cols
    if not n <= store_cols <= max(n, g.stride(0)):
        raise ValueError(f"store_cols must be between N = {n} and g's row stride {g.stride(0)}, got {store_cols}")
    if store_cols > n and m > 0 and g.storage_offset() % g.stride(0) != 0:
        # columns past N would run into the next row's leading columns, outside g
        raise ValueError(f"store_cols = {store_cols} > N needs g to start at column 0 of its buffer's rows (a "
                         f"[:, :N] view), got storage offset {g.storage_offset()} with row stride {g.stride(0)}")
    if loss == "clip" and (lse_row is None or lse_col is None):
        raise ValueError("the CLIP gradient needs lse_row and lse_col")
    if with_loss and loss != "siglip":
        raise ValueError(f"with_loss needs loss='siglip' (CLIP's gradient needs the finished log-sum-exps), got "
                         f"{loss!r}")
    if mult is None:
        mult = torch.ones(1, device=device, dtype=torch.float32)
    elif mult.dtype != torch.float32 or mult.numel() != 1 or mult.device != device:
        raise ValueError(f"mult must be a one-element float32 tensor on {device}, got {tuple(mult.shape)} "
                         f"{mult.dtype} on {mult.device}")
    return store_cols, scale if lse_row is None else lse_row, scale if lse_col is None else lse_col, mult


# The dots epilogue's tile and warps: elementwise and memory-bound, so 16 logits per thread and 512-byte fp32 row
# segments: 59-80 registers, 3-4 blocks of 8 warps per SM (kernel report, sm_90, bf16; 64 x 128 tiles took 113-162
# registers and 1-2 blocks). Not yet timed.
DOTS_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 1}


def loss_grad_from_dots(dots: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, g: torch.Tensor, *,
                        loss: str, diag_offset: int = 0, lse_row: torch.Tensor | None = None,
                        lse_col: torch.Tensor | None = None, with_loss: bool = False,
                        store_cols: int | None = None, mult: torch.Tensor | None = None) -> torch.Tensor:
    """loss_grad_logits from the (M, N) fp32 dot products x.y computed elsewhere (cuBLAS): the same g and the same
    sums, with the products at cuBLAS's rate and the fp32 block written and read once (an elementwise pass)."""
    if dots.dtype != torch.float32 or dots.dim() != 2 or dots.stride(1) != 1:
        raise ValueError(f"dots must be a 2-D float32 tensor with unit column stride, got {dots.dtype} "
                         f"{tuple(dots.shape)} strides {dots.stride()}")
    if g.dtype not in _TRITON_DTYPES:
        raise TypeError(f"g must be bf16, fp16 or fp32, got {g.dtype}")
    m, n = dots.shape
    store_cols, lse_row, lse_col, mult = _grad_args(m, n, g.dtype, g.device, scale, g, loss, lse_row, lse_col,
                                                    with_loss, store_cols, mult)
    cfg = DOTS_CONFIG
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    partial = torch.empty((3, grid[0] * grid[1]), device=g.device, dtype=torch.float32)
    if m and n:
        contrastive_bwd_dots_kernel[grid](
            dots, dots.stride(0), scale, bias, lse_row, lse_col, g, grad_scale(g.dtype), mult, partial, m, n,
            g.stride(0), store_cols, diag_offset, LOSS=_LOSSES[loss], WITH_LOSS=with_loss, BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return partial[:3 if with_loss else 2].sum(1)


def padded_cols(n: int) -> int:
    """new_grad_buffer's row stride for N columns: the next multiple of 16 elements."""
    return triton.cdiv(n, 16) * 16


def new_grad_buffer(rows: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (rows, n) buffer for loss_grad_logits, its row stride padded to padded_cols(n) so that the
    kernel's stores vectorise (pass store_cols=padded_cols(n))."""
    return torch.empty((rows, padded_cols(n)), device=like.device, dtype=like.dtype)[:, :n]


# ---------------------------------------------------------------------------------------------------------------
# What ships: the configs above for a small D and the D of the base and fine presets, per dtype and loss.

SHIPPED_D = (32, 64, 768, 1152)
_ALIGNED_INTS = ("D", "stride_x_m", "stride_y_n", "stride_g_m", "store_cols", "stride_col_m", "stride_col_part",
                 "cols_per_split")
_SHIPPED_FIELDS = {f.name for f in dataclasses.fields(registry.Shipped)}


def _signature(kernel: str, ptr: str) -> dict[str, str]:
    common = {"X": ptr, "Y": ptr, "SCALE": "*fp32", "BIAS": "*fp32"}
    if kernel == "fwd":
        return {**common, "OUT": "*fp32", "COL_OUT": "*fp32", "POS": "*fp32", "M": "i32", "N": "i32", "D": "i32",
                "stride_x_m": "i32", "stride_y_n": "i32", "stride_out_s": "i32", "stride_col_m": "i32",
                "stride_col_part": "i32", "diag_offset": "i32",
                "cols_per_split": "i32", "LOSS": "constexpr", "COLS": "constexpr", "FLATTEN": "constexpr",
                "BLOCK_M": "constexpr",
                "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "IEEE": "constexpr"}
    return {**common, "LSE_ROW": "*fp32", "LSE_COL": "*fp32", "G": ptr, "g_scale": "fp32", "GMUL": "*fp32",
            "PARTIAL": "*fp32", "M": "i32", "N": "i32",
            "D": "i32", "stride_x_m": "i32", "stride_y_n": "i32", "stride_g_m": "i32", "store_cols": "i32",
            "diag_offset": "i32", "LOSS": "constexpr", "WITH_LOSS": "constexpr", "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr", "PERSISTENT": "constexpr",
            "IEEE": "constexpr"}


# (kernel, flag constexprs) per loss: SigLIP's gradient with and without its loss sum (the one-process op and the
# ring), CLIP's forward with and without the column log-sum-exps (one process, and rows against gathered columns).
_VARIANTS = {
    "siglip": [("fwd", {"COLS": False}), ("bwd", {"WITH_LOSS": False}), ("bwd_loss", {"WITH_LOSS": True})],
    "clip": [("fwd", {"COLS": False}), ("fwd_cols", {"COLS": True}), ("bwd", {"WITH_LOSS": False})],
}


def _configs() -> list[registry.Shipped]:
    seen = {}  # one row per compiled variant; the D it serves are listed in its label
    for dtype, tname in _TRITON_DTYPES.items():
        for d in SHIPPED_D:
            for loss_name, loss in _LOSSES.items():
                for variant, flags in _VARIANTS[loss_name]:
                    cfg = config(d, dtype, variant, loss_name)
                    kernel = variant.split("_")[0]
                    constexprs = {"LOSS": loss, **flags, "BLOCK_M": cfg["BLOCK_M"],
                                  "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                                  **({"GROUP_M": _GROUP_M, "PERSISTENT": cfg["PERSISTENT"]} if kernel == "bwd"
                                     else {"FLATTEN": cfg["FLATTEN"]}),
                                  "IEEE": dtype == torch.float32}
                    key = (kernel, tname, tuple(sorted(constexprs.items())), cfg["num_warps"], cfg["num_stages"],
                           cfg.get("maxnreg"))
                    if key in seen:
                        seen[key]["label"] += f",{d}"
                        continue
                    suffix = " +cols" if flags.get("COLS") else " +loss" if flags.get("WITH_LOSS") else ""
                    seen[key] = {"label": f"{loss_name} {kernel}{suffix} {tname} d{d}", "kernel": kernel,
                                 "tname": tname, "constexprs": constexprs, "cfg": cfg}
    rows = []
    for row in seen.values():
        sig = _signature(row["kernel"], "*" + row["tname"])
        # At run time the JIT also specialises D and the row strides (multiples of 16 for the shipped D; the
        # caller pads G's rows to one, and writes them up to that width: store_cols) and cols_per_split (a multiple
        # of BLOCK_N); without them Triton can neither vectorise nor pipeline the loads, and G's stores take a
        # 64-bit address per element (spills). N is not: a batch of packed images rarely has a multiple of 16.
        aligned = tuple(k for k, t in sig.items() if t.startswith("*") or k in _ALIGNED_INTS)
        extra = {"aligned": aligned} if "aligned" in _SHIPPED_FIELDS else {}
        rows.append(registry.Shipped(kernel_name=f"contrastive_{row['kernel']}_kernel", label=row["label"],
                                     signature=sig, constexprs=row["constexprs"], num_warps=row["cfg"]["num_warps"],
                                     num_stages=row["cfg"]["num_stages"], maxnreg=row["cfg"].get("maxnreg"),
                                     **extra))
    return rows


def _configs_of(kernel_name: str):
    return lambda: [row for row in _configs() if row.kernel_name == kernel_name]


def _dots_configs() -> list[registry.Shipped]:
    """contrastive_bwd_dots_kernel: one tile, per G dtype, loss and loss-sum flag."""
    rows = []
    cfg = DOTS_CONFIG
    for tname in _TRITON_DTYPES.values():
        for loss_name, loss in _LOSSES.items():
            for with_loss in ((False, True) if loss_name == "siglip" else (False,)):
                sig = {"DOTS": "*fp32", "stride_dots_m": "i32", "SCALE": "*fp32", "BIAS": "*fp32", "LSE_ROW": "*fp32",
                       "LSE_COL": "*fp32", "G": f"*{tname}", "g_scale": "fp32", "GMUL": "*fp32",
                       "PARTIAL": "*fp32", "M": "i32", "N": "i32", "stride_g_m": "i32", "store_cols": "i32",
                       "diag_offset": "i32", "LOSS": "constexpr", "WITH_LOSS": "constexpr",
                       "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
                # the dot products' row stride is N, rarely a multiple of 16 for packed batches: not specialised
                aligned = tuple(k for k, t in sig.items() if t.startswith("*")) + ("stride_g_m", "store_cols")
                extra = {"aligned": aligned} if "aligned" in _SHIPPED_FIELDS else {}
                rows.append(registry.Shipped(
                    kernel_name="contrastive_bwd_dots_kernel",
                    label=f"{loss_name} bwd from dots{' +loss' if with_loss else ''} {tname}", signature=sig,
                    constexprs={"LOSS": loss, "WITH_LOSS": with_loss, "BLOCK_M": cfg["BLOCK_M"],
                                "BLOCK_N": cfg["BLOCK_N"]},
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra))
    return rows


registry.declare("contrastive_fwd", contrastive_fwd_kernel, _configs_of("contrastive_fwd_kernel"))
registry.declare("contrastive_bwd", contrastive_bwd_kernel, _configs_of("contrastive_bwd_kernel"))
def _fwd_dots_configs() -> list[registry.Shipped]:
    """contrastive_fwd_dots_kernel: its one tile (DOTS_CONFIG), with and without the columns."""
    cfg = DOTS_CONFIG
    sig = {"DOTS": "*fp32", "stride_dots_m": "i32", "SCALE": "*fp32", "ROW_OUT": "*fp32", "COL_OUT": "*fp32",
           "M": "i32", "N": "i32", "stride_row_t": "i32", "stride_row_part": "i32", "stride_col_m": "i32",
           "stride_col_part": "i32", "COLS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    # M and N (the partials' strides) and the products' row stride are rarely multiples of 16: not specialised
    aligned = tuple(k for k, t in sig.items() if t.startswith("*"))
    extra = {"aligned": aligned} if "aligned" in _SHIPPED_FIELDS else {}
    return [registry.Shipped(kernel_name="contrastive_fwd_dots_kernel",
                             label=f"clip fwd from dots{' +cols' if cols else ''}", signature=sig,
                             constexprs={"COLS": cols, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]},
                             num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
            for cols in (False, True)]


registry.declare("contrastive_bwd_dots", contrastive_bwd_dots_kernel, _dots_configs)
registry.declare("contrastive_fwd_dots", contrastive_fwd_dots_kernel, _fwd_dots_configs)

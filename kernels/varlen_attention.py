"""Variable-length packed attention (non-causal), forward and backward, in Triton.

FlashAttention-2's algorithm (Dao 2023, arXiv 2307.08691) over packed sequences. Each program owns one block of
queries (forward, dq) or of keys (dk, dv) of one sequence and head; programs map to (sequence, block) through a
cumulative block count built on the device, so a launch never synchronises with the host and uneven packs launch
no idle programs when the caller passes host-side lengths (at most one per sequence otherwise). Head dims that are
not powers of two (split_mode): multiples of 16 (48, 80, 96, 112, ...) by default run in one power-of-two tile with
the columns past head_dim masked ("masked"); the others (72), or all of them with FINEVITI_ATTN_SPLIT=pieces, in two
power-of-two pieces, each with its own tl.dot (80 = 64 + 16, 96 = 64 + 32, 72 = 64 + 16 with 8 columns masked),
which on a GPU the ops layer pads to the next power of two for now (those kernels fault with triton 3.6, see
benchmarks/NOTES-attention.md). The backward recomputes the probabilities from the saved fp32 log-sum-exp. dk and
dv are written without atomics; dq either by a second kernel per query block (deterministic) or by fp32 atomic
adds from the dk/dv kernel, element-wise or one bulk tensor reduction per tile (dq_mode). The pure-torch reference
lives in fineviti/ops/attention.py.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import registry


def _interpreter_descriptor_reduce() -> None:
    """Triton's interpreter (3.6-3.8) has no `tensor_descriptor.atomic_add` (TMA_DQ below). Give it one with the
    hardware's semantics: an element-wise atomic add over the block, clipped to the tensor's bounds (as its
    descriptor store is), so the CPU tests run the same kernel code; the bulk instruction itself is a GPU test."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if hasattr(builder, "create_descriptor_reduce"):
        return
    ir = interpreter._ir

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"descriptor reduction {kind} in the interpreter")
        ptrs, mask = desc.materialize_pointers(indices)
        op = ir.ATOMIC_OP.FADD if value.dtype.scalar.is_floating() else ir.ATOMIC_OP.ADD
        return self.create_atomic_rmw(op, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED, None)

    builder.create_descriptor_reduce = create_descriptor_reduce


if os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y"):  # as Triton's getenv_bool
    _interpreter_descriptor_reduce()

# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

_LOG2E = tl.constexpr(1.4426950408889634)  # the kernels work in log2 units: exp(x) = exp2(x * log2 e)
_LN2 = tl.constexpr(0.6931471805599453)  # back to natural units: log(x) = log2(x) * ln 2


@triton.jit
def _locate(block_cu, n_seqs, pid):
    """Largest s in [0, n_seqs) with block_cu[s] <= pid: the sequence that owns program `pid` (binary search)."""
    lo = 0
    hi = n_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(block_cu + mid) <= pid:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _load_tile(base, tok, row_ok, stride_tok, COL0: tl.constexpr, COLS: tl.constexpr, HEAD_DIM: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """Rows `tok` (int64 token indices) x columns [COL0, COL0 + COLS) of a (total, head_dim) head slice."""
    cols = COL0 + tl.arange(0, COLS)
    ptrs = base + tok[:, None] * stride_tok + cols[None, :]
    if MASK_ROWS:
        if COL0 + COLS > HEAD_DIM:
            x = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if COL0 + COLS > HEAD_DIM:
            x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(base, x, tok, row_ok, stride_tok, COL0: tl.constexpr, COLS: tl.constexpr, HEAD_DIM: tl.constexpr):
    cols = COL0 + tl.arange(0, COLS)
    ptrs = base + tok[:, None] * stride_tok + cols[None, :]
    if COL0 + COLS > HEAD_DIM:
        tl.store(ptrs, x, mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, x, mask=row_ok[:, None])


@triton.jit
def _load_rotated(base, tok, row_ok, stride_tok, POS, COS, SIN, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Rows `tok` of a (total, HEAD_DIM) head slice rotated by 2D RoPE (DESIGN.md's rope_2d): x * cos +
    rotate_half(x) * sin, in fp32, returned in x's dtype (as rope_2d would have stored it). rotate_half is a second
    load of the same rows with the halves swapped; cos and sin come from (positions, HEAD_DIM // 4) fp32 tables
    indexed by the token's row (first quarter of each half) or column (second quarter)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    QUARTER: tl.constexpr = HEAD_DIM // 4
    cols = tl.arange(0, HEAD_DIM)
    row_ptrs = base + tok[:, None] * stride_tok
    if MASK_ROWS:
        x = tl.load(row_ptrs + cols[None, :], mask=row_ok[:, None], other=0.0)
        swapped = tl.load(row_ptrs + ((cols + HALF) % HEAD_DIM)[None, :], mask=row_ok[:, None], other=0.0)
        r = tl.load(POS + tok * 2, mask=row_ok, other=0)
        c = tl.load(POS + tok * 2 + 1, mask=row_ok, other=0)
    else:
        x = tl.load(row_ptrs + cols[None, :])
        swapped = tl.load(row_ptrs + ((cols + HALF) % HEAD_DIM)[None, :])
        r = tl.load(POS + tok * 2)
        c = tl.load(POS + tok * 2 + 1)
    pair = cols % HALF
    coord = tl.where((pair < QUARTER)[None, :], r[:, None], c[:, None])
    index = coord * QUARTER + (pair % QUARTER)[None, :]
    cos = tl.load(COS + index)
    sin = tl.load(SIN + index)
    sign = tl.where(cols < HALF, -1.0, 1.0)
    out = x.to(tl.float32) * cos + sign[None, :] * swapped.to(tl.float32) * sin
    return out.to(x.dtype)


@triton.jit
def _atomic_add_tile(base, x, tok, row_ok, stride_tok, COL0: tl.constexpr, COLS: tl.constexpr,
                     HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr):
    cols = COL0 + tl.arange(0, COLS)
    ptrs = base + tok[:, None] * stride_tok + cols[None, :]
    if MASK_ROWS:
        if COL0 + COLS > HEAD_DIM:
            tl.atomic_add(ptrs, x, mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM), sem="relaxed")
        else:
            tl.atomic_add(ptrs, x, mask=row_ok[:, None], sem="relaxed")
    else:
        if COL0 + COLS > HEAD_DIM:
            tl.atomic_add(ptrs, x, mask=cols[None, :] < HEAD_DIM, sem="relaxed")
        else:
            tl.atomic_add(ptrs, x, sem="relaxed")


@triton.jit
def _fwd_step(acc_a, acc_b, m_i, l_i, q_a, q_b, K, V, POS_K, COS, SIN, kv_start, start_n, seqlen_k, stride_k_tok,
              stride_v_tok, qk_scale, HEAD_DIM: tl.constexpr, DIM_A: tl.constexpr, DIM_B: tl.constexpr,
              BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr, ROPE: tl.constexpr,
              I32_TOKENS: tl.constexpr):
    rows = start_n + tl.arange(0, BLOCK_N)
    row_ok = rows < seqlen_k
    if I32_TOKENS:  # token offsets in 32 bits (the launcher checked that they fit): no 64-bit multiply per row
        tok = kv_start + rows
    else:
        tok = (kv_start + rows).to(tl.int64)
    if ROPE:  # DIM_B == 0 (checked by the launcher)
        k_a = _load_rotated(K, tok, row_ok, stride_k_tok, POS_K, COS, SIN, HEAD_DIM, MASK_N)
    else:
        k_a = _load_tile(K, tok, row_ok, stride_k_tok, 0, DIM_A, HEAD_DIM, MASK_N)
    qk = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
    if DIM_B > 0:
        k_b = _load_tile(K, tok, row_ok, stride_k_tok, DIM_A, DIM_B, HEAD_DIM, MASK_N)
        qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=PRECISION)
    if MASK_N:
        qk = tl.where(row_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # the scale folded into the exponent: one FMA per score
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_a = _load_tile(V, tok, row_ok, stride_v_tok, 0, DIM_A, HEAD_DIM, MASK_N)
    acc_a = tl.dot(p.to(v_a.dtype), v_a, acc_a * alpha[:, None], input_precision=PRECISION)
    if DIM_B > 0:
        v_b = _load_tile(V, tok, row_ok, stride_v_tok, DIM_A, DIM_B, HEAD_DIM, MASK_N)
        acc_b = tl.dot(p.to(v_b.dtype), v_b, acc_b * alpha[:, None], input_precision=PRECISION)
    return acc_a, acc_b, m_new, l_i


@triton.jit
def _attn_fwd(
    Q, K, V,  # (total_q | total_k, heads, HEAD_DIM), last dim contiguous
    OUT,  # (total_q, heads, HEAD_DIM), written
    LSE,  # (heads, total_q) fp32, written: natural-log log-sum-exp of the scaled scores
    cu_seqlens_q, cu_seqlens_k,  # (n_seqs + 1,) int32
    block_cu,  # (n_seqs + 1,) int32: cumulative count of BLOCK_M query blocks per sequence
    POS_Q, POS_K,  # (total_q | total_k, 2) int32 (row, col), contiguous (ROPE only; else unused)
    COS, SIN,  # (positions, HEAD_DIM // 4) fp32 tables (ROPE only; else unused)
    n_seqs,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_o_tok, stride_o_head, stride_lse_head,
    softmax_scale,
    HEAD_DIM: tl.constexpr, DIM_A: tl.constexpr, DIM_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    ROPE: tl.constexpr,  # rotate q and k by 2D RoPE as they are loaded (variant (b) of rope's placement)
    I32_TOKENS: tl.constexpr = False,  # k/v token offsets (token x token stride) fit in 32 bits
):
    # Token and head strides are multiples of ALIGN elements (checked by the launcher): 16-byte vector loads.
    stride_q_tok = tl.multiple_of(stride_q_tok, ALIGN)
    stride_q_head = tl.multiple_of(stride_q_head, ALIGN)
    stride_k_tok = tl.multiple_of(stride_k_tok, ALIGN)
    stride_k_head = tl.multiple_of(stride_k_head, ALIGN)
    stride_v_tok = tl.multiple_of(stride_v_tok, ALIGN)
    stride_v_head = tl.multiple_of(stride_v_head, ALIGN)
    stride_o_tok = tl.multiple_of(stride_o_tok, ALIGN)
    stride_o_head = tl.multiple_of(stride_o_head, ALIGN)
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    if pid >= tl.load(block_cu + n_seqs):
        return
    seq = _locate(block_cu, n_seqs, pid)
    m_block = pid - tl.load(block_cu + seq)
    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    kv_start = tl.load(cu_seqlens_k + seq)
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - kv_start

    Q += head * stride_q_head
    K += head * stride_k_head
    V += head * stride_v_head
    OUT += head * stride_o_head

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    tok = (q_start + rows).to(tl.int64)
    if ROPE:
        q_a = _load_rotated(Q, tok, row_ok, stride_q_tok, POS_Q, COS, SIN, HEAD_DIM, True)
    else:
        q_a = _load_tile(Q, tok, row_ok, stride_q_tok, 0, DIM_A, HEAD_DIM, True)
    q_b = q_a
    if DIM_B > 0:
        q_b = _load_tile(Q, tok, row_ok, stride_q_tok, DIM_A, DIM_B, HEAD_DIM, True)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, DIM_A], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, DIM_B if DIM_B > 0 else 16], dtype=tl.float32) if DIM_B > 0 else 0.0
    qk_scale = softmax_scale * _LOG2E

    n_full = (seqlen_k // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, n_full, BLOCK_N):
        acc_a, acc_b, m_i, l_i = _fwd_step(acc_a, acc_b, m_i, l_i, q_a, q_b, K, V, POS_K, COS, SIN, kv_start,
                                           start_n, seqlen_k, stride_k_tok, stride_v_tok, qk_scale, HEAD_DIM, DIM_A,
                                           DIM_B, BLOCK_N, False, PRECISION, ROPE, I32_TOKENS)
    if n_full < seqlen_k:
        acc_a, acc_b, m_i, l_i = _fwd_step(acc_a, acc_b, m_i, l_i, q_a, q_b, K, V, POS_K, COS, SIN, kv_start,
                                           n_full, seqlen_k, stride_k_tok, stride_v_tok, qk_scale, HEAD_DIM, DIM_A,
                                           DIM_B, BLOCK_N, True, PRECISION, ROPE, I32_TOKENS)

    # A query with no keys (an empty key sequence) gets output 0 and log-sum-exp -inf instead of 0/0.
    has_keys = l_i > 0
    inv_l = tl.where(has_keys, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)
    _store_tile(OUT, (acc_a * inv_l[:, None]).to(OUT.dtype.element_ty), tok, row_ok, stride_o_tok, 0, DIM_A, HEAD_DIM)
    if DIM_B > 0:
        _store_tile(OUT, (acc_b * inv_l[:, None]).to(OUT.dtype.element_ty), tok, row_ok, stride_o_tok, DIM_A, DIM_B,
                    HEAD_DIM)
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * _LN2,
                   float("-inf"))
    tl.store(LSE + head * stride_lse_head + tok, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess(
    OUT, DO,  # (total, heads, HEAD_DIM)
    DELTA,  # (heads, total) fp32, written: rowsum(O * dO)
    LSE, LSE2,  # (heads, total) fp32, strided as DELTA: the forward's log-sum-exp, read; times log2 e, written
    total,
    stride_o_tok, stride_o_head, stride_do_tok, stride_do_head, stride_delta_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    mask = (tok[:, None] < total) & (cols[None, :] < HEAD_DIM)
    o = tl.load(OUT + head * stride_o_head + tok[:, None] * stride_o_tok + cols[None, :], mask=mask, other=0.0)
    do = tl.load(DO + head * stride_do_head + tok[:, None] * stride_do_tok + cols[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = head * stride_delta_head + tok
    tl.store(DELTA + row, delta, mask=tok < total)
    # the backward kernels take the log-sum-exp in log2 units: converted here, once, not per key block
    tl.store(LSE2 + row, tl.load(LSE + row, mask=tok < total) * _LOG2E, mask=tok < total)


@triton.jit
def _dkdv_step(dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, key_ok, Q, DO, LSE, DELTA, DQ_ACC, DQ_DESC, head32,
               q_start, start_m, seqlen_q, stride_q_tok, stride_do_tok, stride_dqa_tok, qk_scale,
               HEAD_DIM: tl.constexpr, DIM_A: tl.constexpr, DIM_B: tl.constexpr, BLOCK_M: tl.constexpr,
               MASK_M: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, I32_TOKENS: tl.constexpr,
               TMA_DQ: tl.constexpr, PART: tl.constexpr):
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    if I32_TOKENS:  # token offsets in 32 bits (the launcher checked that they fit): no 64-bit multiply per row
        tok = q_start + rows
    else:
        tok = (q_start + rows).to(tl.int64)
    q_a = _load_tile(Q, tok, row_ok, stride_q_tok, 0, DIM_A, HEAD_DIM, MASK_M)
    qk_t = tl.dot(k_a, tl.trans(q_a), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
    if DIM_B > 0:
        q_b = _load_tile(Q, tok, row_ok, stride_q_tok, DIM_A, DIM_B, HEAD_DIM, MASK_M)
        qk_t = tl.dot(k_b, tl.trans(q_b), qk_t, input_precision=PRECISION)
    if MASK_M:
        lse = tl.load(LSE + tok, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + tok, mask=row_ok, other=0.0)
    else:
        lse = tl.load(LSE + tok)
        delta = tl.load(DELTA + tok)
    p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])  # LSE in log2 units
    if MASK_M:
        p_t = tl.where(row_ok[None, :], p_t, 0.0)
    if ATOMIC_DQ:  # key rows past the sequence (zeros) must add nothing to dq: exp(-lse) there can overflow
        p_t = tl.where(key_ok[:, None], p_t, 0.0)
    do_a = _load_tile(DO, tok, row_ok, stride_do_tok, 0, DIM_A, HEAD_DIM, MASK_M)
    if PART != 2:
        dv_a = tl.dot(p_t.to(do_a.dtype), do_a, dv_a, input_precision=PRECISION)
    if DIM_B > 0:
        do_b = _load_tile(DO, tok, row_ok, stride_do_tok, DIM_A, DIM_B, HEAD_DIM, MASK_M)
        if PART != 2:
            dv_b = tl.dot(p_t.to(do_b.dtype), do_b, dv_b, input_precision=PRECISION)
    if PART == 1:  # dv only: the dk pass of the same key block (PART 2) computes dp, ds, dk and dq
        return dk_a, dk_b, dv_a, dv_b
    dp_t = tl.dot(v_a, tl.trans(do_a), input_precision=PRECISION)
    if DIM_B > 0:
        dp_t = tl.dot(v_b, tl.trans(do_b), dp_t, input_precision=PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q_a.dtype)
    dk_a = tl.dot(ds_t, q_a, dk_a, input_precision=PRECISION)
    if DIM_B > 0:
        dk_b = tl.dot(ds_t, q_b, dk_b, input_precision=PRECISION)
    if ATOMIC_DQ:  # FlashAttention-2's dq: this key block's share, added into an fp32 buffer (order not fixed);
        # the softmax scale is applied once, when the buffer is converted, not per tile
        ds = tl.trans(ds_t)
        dq_a = tl.dot(ds, k_a, input_precision=PRECISION)
        if TMA_DQ:  # one bulk reduction of the whole tile (cp.reduce.async.bulk.tensor): its rows past the
            # sequence land in the next sequence's rows, so they are set to exact zeros (their ds is 0 already, but
            # 0 * k is NaN where k is not finite); the tensor's bounds clip the rows past `total` and the columns
            # past head_dim
            if MASK_M:
                dq_a = tl.where(row_ok[:, None], dq_a, 0.0)
            DQ_DESC.atomic_add([q_start + start_m, head32, 0], tl.reshape(dq_a, [BLOCK_M, 1, DIM_A]))
        else:
            _atomic_add_tile(DQ_ACC, dq_a, tok, row_ok, stride_dqa_tok, 0, DIM_A, HEAD_DIM, MASK_M)
        if DIM_B > 0:
            dq_b = tl.dot(ds, k_b, input_precision=PRECISION)
            _atomic_add_tile(DQ_ACC, dq_b, tok, row_ok, stride_dqa_tok, DIM_A, DIM_B, HEAD_DIM, MASK_M)
    return dk_a, dk_b, dv_a, dv_b


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO,  # (total_q | total_k, heads, HEAD_DIM)
    DK, DV,  # (total_k, heads, HEAD_DIM), written
    DQ_ACC,  # (total_q, heads, HEAD_DIM) fp32, zeroed, added into (ATOMIC_DQ only; else unused)
    DQ_DESC,  # TMA_DQ: a tensor descriptor over DQ_ACC, block [BLOCK_M, 1, DIM_A]; else None
    LSE, DELTA,  # (heads, total_q) fp32; LSE in log2 units (the forward's times log2 e)
    cu_seqlens_q, cu_seqlens_k,
    block_cu,  # (n_seqs + 1,) int32: cumulative count of BLOCK_N key blocks per sequence
    n_seqs,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dk_tok, stride_dk_head, stride_dv_tok, stride_dv_head,
    stride_dqa_tok, stride_dqa_head, stride_lse_head,
    softmax_scale,
    HEAD_DIM: tl.constexpr, DIM_A: tl.constexpr, DIM_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    I32_TOKENS: tl.constexpr = False,  # q-side token offsets (token x token stride) fit in 32 bits
    TMA_DQ: tl.constexpr = False,  # ATOMIC_DQ by bulk tensor reductions through DQ_DESC (one piece, DIM_B == 0)
    PART: tl.constexpr = 0,  # 0: dk and dv; 1: dv only; 2: dk (and the atomic dq) only. Two launches, 1 then 2,
    # hold one (BLOCK_N, head_dim) fp32 accumulator each instead of two (head_dim 256: see _dkdv_parts)
):
    # Token and head strides are multiples of ALIGN elements (checked by the launcher): 16-byte vector loads.
    stride_q_tok = tl.multiple_of(stride_q_tok, ALIGN)
    stride_q_head = tl.multiple_of(stride_q_head, ALIGN)
    stride_k_tok = tl.multiple_of(stride_k_tok, ALIGN)
    stride_k_head = tl.multiple_of(stride_k_head, ALIGN)
    stride_v_tok = tl.multiple_of(stride_v_tok, ALIGN)
    stride_v_head = tl.multiple_of(stride_v_head, ALIGN)
    stride_do_tok = tl.multiple_of(stride_do_tok, ALIGN)
    stride_do_head = tl.multiple_of(stride_do_head, ALIGN)
    stride_dk_tok = tl.multiple_of(stride_dk_tok, ALIGN)
    stride_dk_head = tl.multiple_of(stride_dk_head, ALIGN)
    stride_dv_tok = tl.multiple_of(stride_dv_tok, ALIGN)
    stride_dv_head = tl.multiple_of(stride_dv_head, ALIGN)
    stride_dqa_tok = tl.multiple_of(stride_dqa_tok, ALIGN)
    stride_dqa_head = tl.multiple_of(stride_dqa_head, ALIGN)
    pid = tl.program_id(0)
    head32 = tl.program_id(1)
    head = head32.to(tl.int64)
    if pid >= tl.load(block_cu + n_seqs):
        return
    seq = _locate(block_cu, n_seqs, pid)
    n_block = pid - tl.load(block_cu + seq)
    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    kv_start = tl.load(cu_seqlens_k + seq)
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - kv_start

    Q += head * stride_q_head
    K += head * stride_k_head
    V += head * stride_v_head
    DO += head * stride_do_head
    DQ_ACC += head * stride_dqa_head
    LSE += head * stride_lse_head
    DELTA += head * stride_lse_head

    rows = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < seqlen_k
    tok = (kv_start + rows).to(tl.int64)
    k_a = _load_tile(K, tok, row_ok, stride_k_tok, 0, DIM_A, HEAD_DIM, True)
    v_a = _load_tile(V, tok, row_ok, stride_v_tok, 0, DIM_A, HEAD_DIM, True)
    k_b = k_a
    v_b = v_a
    if DIM_B > 0:
        k_b = _load_tile(K, tok, row_ok, stride_k_tok, DIM_A, DIM_B, HEAD_DIM, True)
        v_b = _load_tile(V, tok, row_ok, stride_v_tok, DIM_A, DIM_B, HEAD_DIM, True)
    dk_a = tl.zeros([BLOCK_N, DIM_A], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, DIM_A], dtype=tl.float32)
    dk_b = tl.zeros([BLOCK_N, DIM_B if DIM_B > 0 else 16], dtype=tl.float32)
    dv_b = tl.zeros([BLOCK_N, DIM_B if DIM_B > 0 else 16], dtype=tl.float32)
    qk_scale = softmax_scale * _LOG2E

    m_full = (seqlen_q // BLOCK_M) * BLOCK_M
    for start_m in tl.range(0, m_full, BLOCK_M):
        dk_a, dk_b, dv_a, dv_b = _dkdv_step(dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, row_ok, Q, DO, LSE,
                                            DELTA, DQ_ACC, DQ_DESC, head32, q_start, start_m, seqlen_q,
                                            stride_q_tok, stride_do_tok, stride_dqa_tok, qk_scale, HEAD_DIM, DIM_A,
                                            DIM_B, BLOCK_M, False, PRECISION, ATOMIC_DQ, I32_TOKENS, TMA_DQ, PART)
    if m_full < seqlen_q:
        dk_a, dk_b, dv_a, dv_b = _dkdv_step(dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, row_ok, Q, DO, LSE,
                                            DELTA, DQ_ACC, DQ_DESC, head32, q_start, m_full, seqlen_q,
                                            stride_q_tok, stride_do_tok, stride_dqa_tok, qk_scale, HEAD_DIM, DIM_A,
                                            DIM_B, BLOCK_M, True, PRECISION, ATOMIC_DQ, I32_TOKENS, TMA_DQ, PART)

    DK += head * stride_dk_head
    DV += head * stride_dv_head
    if PART != 1:
        _store_tile(DK, (dk_a * softmax_scale).to(DK.dtype.element_ty), tok, row_ok, stride_dk_tok, 0, DIM_A,
                    HEAD_DIM)
        if DIM_B > 0:
            _store_tile(DK, (dk_b * softmax_scale).to(DK.dtype.element_ty), tok, row_ok, stride_dk_tok, DIM_A, DIM_B,
                        HEAD_DIM)
    if PART != 2:
        _store_tile(DV, dv_a.to(DV.dtype.element_ty), tok, row_ok, stride_dv_tok, 0, DIM_A, HEAD_DIM)
        if DIM_B > 0:
            _store_tile(DV, dv_b.to(DV.dtype.element_ty), tok, row_ok, stride_dv_tok, DIM_A, DIM_B, HEAD_DIM)


@triton.jit
def _dq_step(dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, K, V, kv_start, start_n, seqlen_k, stride_k_tok,
             stride_v_tok, qk_scale, HEAD_DIM: tl.constexpr, DIM_A: tl.constexpr, DIM_B: tl.constexpr,
             BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr, I32_TOKENS: tl.constexpr):
    rows = start_n + tl.arange(0, BLOCK_N)
    row_ok = rows < seqlen_k
    if I32_TOKENS:  # token offsets in 32 bits (the launcher checked that they fit)
        tok = kv_start + rows
    else:
        tok = (kv_start + rows).to(tl.int64)
    k_a = _load_tile(K, tok, row_ok, stride_k_tok, 0, DIM_A, HEAD_DIM, MASK_N)
    v_a = _load_tile(V, tok, row_ok, stride_v_tok, 0, DIM_A, HEAD_DIM, MASK_N)
    qk = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
    dp = tl.dot(do_a, tl.trans(v_a), input_precision=PRECISION)
    if DIM_B > 0:
        k_b = _load_tile(K, tok, row_ok, stride_k_tok, DIM_A, DIM_B, HEAD_DIM, MASK_N)
        v_b = _load_tile(V, tok, row_ok, stride_v_tok, DIM_A, DIM_B, HEAD_DIM, MASK_N)
        qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=PRECISION)
        dp = tl.dot(do_b, tl.trans(v_b), dp, input_precision=PRECISION)
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if MASK_N:
        p = tl.where(row_ok[None, :], p, 0.0)
    ds = (p * (dp - delta[:, None])).to(k_a.dtype)
    dq_a = tl.dot(ds, k_a, dq_a, input_precision=PRECISION)
    if DIM_B > 0:
        dq_b = tl.dot(ds, k_b, dq_b, input_precision=PRECISION)
    return dq_a, dq_b


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO,  # (total_q | total_k, heads, HEAD_DIM)
    DQ,  # (total_q, heads, HEAD_DIM), written
    LSE, DELTA,  # (heads, total_q) fp32; LSE in log2 units (the forward's times log2 e)
    cu_seqlens_q, cu_seqlens_k,
    block_cu,  # (n_seqs + 1,) int32: cumulative count of BLOCK_M query blocks per sequence
    n_seqs,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dq_tok, stride_dq_head,
    stride_lse_head,
    softmax_scale,
    HEAD_DIM: tl.constexpr, DIM_A: tl.constexpr, DIM_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    I32_TOKENS: tl.constexpr = False,  # k/v token offsets (token x token stride) fit in 32 bits
):
    # Token and head strides are multiples of ALIGN elements (checked by the launcher): 16-byte vector loads.
    stride_q_tok = tl.multiple_of(stride_q_tok, ALIGN)
    stride_q_head = tl.multiple_of(stride_q_head, ALIGN)
    stride_k_tok = tl.multiple_of(stride_k_tok, ALIGN)
    stride_k_head = tl.multiple_of(stride_k_head, ALIGN)
    stride_v_tok = tl.multiple_of(stride_v_tok, ALIGN)
    stride_v_head = tl.multiple_of(stride_v_head, ALIGN)
    stride_do_tok = tl.multiple_of(stride_do_tok, ALIGN)
    stride_do_head = tl.multiple_of(stride_do_head, ALIGN)
    stride_dq_tok = tl.multiple_of(stride_dq_tok, ALIGN)
    stride_dq_head = tl.multiple_of(stride_dq_head, ALIGN)
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    if pid >= tl.load(block_cu + n_seqs):
        return
    seq = _locate(block_cu, n_seqs, pid)
    m_block = pid - tl.load(block_cu + seq)
    q_start = tl.load(cu_seqlens_q + seq)
    seqlen_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    kv_start = tl.load(cu_seqlens_k + seq)
    seqlen_k = tl.load(cu_seqlens_k + seq + 1) - kv_start

    Q += head * stride_q_head
    K += head * stride_k_head
    V += head * stride_v_head
    DO += head * stride_do_head

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    tok = (q_start + rows).to(tl.int64)
    q_a = _load_tile(Q, tok, row_ok, stride_q_tok, 0, DIM_A, HEAD_DIM, True)
    do_a = _load_tile(DO, tok, row_ok, stride_do_tok, 0, DIM_A, HEAD_DIM, True)
    q_b = q_a
    do_b = do_a
    if DIM_B > 0:
        q_b = _load_tile(Q, tok, row_ok, stride_q_tok, DIM_A, DIM_B, HEAD_DIM, True)
        do_b = _load_tile(DO, tok, row_ok, stride_do_tok, DIM_A, DIM_B, HEAD_DIM, True)
    lse = tl.load(LSE + head * stride_lse_head + tok, mask=row_ok, other=0.0)  # log2 units
    delta = tl.load(DELTA + head * stride_lse_head + tok, mask=row_ok, other=0.0)
    dq_a = tl.zeros([BLOCK_M, DIM_A], dtype=tl.float32)
    dq_b = tl.zeros([BLOCK_M, DIM_B if DIM_B > 0 else 16], dtype=tl.float32)
    qk_scale = softmax_scale * _LOG2E

    n_full = (seqlen_k // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, n_full, BLOCK_N):
        dq_a, dq_b = _dq_step(dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, K, V, kv_start, start_n, seqlen_k,
                              stride_k_tok, stride_v_tok, qk_scale, HEAD_DIM, DIM_A, DIM_B, BLOCK_N, False,
                              PRECISION, I32_TOKENS)
    if n_full < seqlen_k:
        dq_a, dq_b = _dq_step(dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, K, V, kv_start, n_full, seqlen_k,
                              stride_k_tok, stride_v_tok, qk_scale, HEAD_DIM, DIM_A, DIM_B, BLOCK_N, True,
                              PRECISION, I32_TOKENS)

    DQ += head * stride_dq_head
    _store_tile(DQ, (dq_a * softmax_scale).to(DQ.dtype.element_ty), tok, row_ok, stride_dq_tok, 0, DIM_A, HEAD_DIM)
    if DIM_B > 0:
        _store_tile(DQ, (dq_b * softmax_scale).to(DQ.dtype.element_ty), tok, row_ok, stride_dq_tok, DIM_A, DIM_B,
                    HEAD_DIM)


# ----------------------------------------------------------------------------------------------------------------
# Configurations: pinned per (head-dim piece layout, dtype, power-of-two bucket of max_seqlen); never keyed on
# `total`, which changes every step. FINEVITI_ATTN_{FWD,DKDV,DKDV_ATOMIC,DQ}_CONFIG="BM,BN,warps,stages" overrides
# one launch kind for experiments.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return f"M{self.block_m}N{self.block_n}w{self.num_warps}s{self.num_stages}"


SPLIT_MODES = ("pieces", "masked")


def split_mode() -> str:
    """How head dims that are not powers of two are tiled (FINEVITI_ATTN_SPLIT): "masked" (the default), for multiples
    of 16, one power-of-two tile over the whole head (80, 96 and 112 in 128 columns, 48 in 64, 144-240 in 256; the
    columns past head_dim loaded as zeros and never stored): the FLOPs of zero-padding to that width without the
    padded copies of q, k, v and o, with that width's kernels and tiles. On an H200 (2026-11-28, triton 3.6) it
    passed the split probe at 80 and 96 and ran d80 fwd+bwd in 3.551 ms against 3.697 for the same kernels on copies
    padded to 128 (peak 243 against 387 MiB; benchmarks/results/2026-11-28_H200_gpu_check_second_summary.md).
    "pieces": two power-of-two pieces (80 = 64 + 16, 72 = 64 + 16 with 8 columns masked), the fewest FLOPs, but on
    Hopper with triton 3.6 those kernels fault or compute wrong (same run: 72 and 96 illegal memory access, 80
    wrong), so the ops layer zero-pads them to the next power of two on a GPU. 72 is always in pieces: its head
    stride is no multiple of 16 elements, the loads go scalar, and every masked kernel spilled 72-720 bytes (sm_90,
    triton 3.6 and 3.8). The ops layer reads the mode once per forward and hands the same mode to that forward's
    backward (a change in between applies to the next forward); attention_forward / attention_backward called
    directly read it when not given `mode`."""
    mode = os.environ.get("FINEVITI_ATTN_SPLIT") or "masked"
    if mode not in SPLIT_MODES:
        raise ValueError(f"FINEVITI_ATTN_SPLIT must be one of {SPLIT_MODES}, got {mode!r}")
    return mode


def split_head_dim(head_dim: int, dtype: torch.dtype = torch.bfloat16, mode: str | None = None) -> tuple[int, int]:
    """(DIM_A, DIM_B): the largest power of two <= head_dim, and the power of two (>= 16) covering the rest, or 0;
    in split mode "masked" (mode, else split_mode()) and for a multiple of 16, the power of two covering head_dim,
    and 0."""
    if not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be in [16, 256], got {head_dim}")
    if head_dim & (head_dim - 1) and head_dim % 16 == 0 and (mode or split_mode()) == "masked":
        return triton.next_power_of_2(head_dim), 0
    dim_a = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - dim_a
    dim_b = 0 if rest == 0 else max(16, triton.next_power_of_2(rest))
    return dim_a, dim_b


# fp32 runs as 3xTF32 products, which keep split copies of the operands in registers: at head_dim 128 every kernel
# spilled 540-980 bytes of stack on sm_90 whatever the tile (16x16 to 32x32, 2 to 8 warps), so on a GPU fp32 stops
# at 64 (the interpreter has no such limit).
FP32_MAX_HEAD_DIM_GPU = 64


def check_supported(q: torch.Tensor) -> None:
    if q.is_cuda and q.dtype == torch.float32 and q.shape[-1] > FP32_MAX_HEAD_DIM_GPU:
        raise ValueError(f"the triton backend takes float32 inputs on a GPU up to head_dim "
                         f"{FP32_MAX_HEAD_DIM_GPU}, got head_dim {q.shape[-1]}; use bfloat16/float16 inputs or "
                         f"backend='torch'")


def _seqlen_bucket(max_seqlen: int) -> int:
    return triton.next_power_of_2(max(max_seqlen, 16))


def _config_from_text(variable: str, text: str) -> Config:
    """BLOCK_M,BLOCK_N,WARPS,STAGES (e.g. "128,64,8,3"): powers of two, stages at least 1."""
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or any(v < 1 or v & (v - 1) for v in values[:3]) or values[3] < 1:
        raise ValueError(f"{variable} must be BLOCK_M,BLOCK_N,WARPS,STAGES (four integers, the first three powers of "
                         f"two, e.g. 128,64,8,3), got {text!r}")
    return Config(*values)


def pick_config(kind: str, head_dim: int, dtype: torch.dtype, max_seqlen: int, mode: str | None = None) -> Config:
    """The pinned configuration of launch `kind` ('fwd', 'dkdv' or 'dq'); `mode`: the split mode (split_mode())."""
    variable = f"FINEVITI_ATTN_{kind.upper()}_CONFIG"
    override = os.environ.get(variable)
    if override:
        return _config_from_text(variable, override)
    dim_a, dim_b = split_head_dim(head_dim, dtype, mode)
    width = dim_a + dim_b
    short = _seqlen_bucket(max_seqlen) <= 64
    if dtype == torch.float32:  # the accuracy path (3xTF32): small tiles keep the split operands in registers
        return Config(32, 32, 8, 1) if kind == "fwd" else Config(16, 16, 4, 1)
    # Measured on an H100 (benchmarks/results/2026-11-27_H100-80GB-HBM3_gpu_check_summary.md, FA3 shape seqlen
    # 4096, bf16): fwd d64 M128N64 with 8 warps 1.281 ms against 4 warps 1.361; dk/dv with atomic dq at d128
    # M64N128 w8 s2 4.537 ms against M64N64 7.466 (the other candidates 5.7-7.0). The 2026-11-28 sweeps, each
    # kernel's candidates with the other kernel at its pin (benchmarks/results/2026-11-28_H100-80GB-HBM3_gpu_check_
    # {sweeps,targeted_sweeps}_summary.md), backward times: d64 dk/dv M32N64 w4 s3 4.229 ms and M32N128 w4 s3 4.238
    # (which spills) against M64N128 w8 s2 4.850; d64 dq M64N64 w4 s2 4.857 against M128N64 w8 s2 4.951; d128
    # dk/dv with atomic dq M64N128 w8 s3 4.129 against s2 4.465; d128 deterministic dk/dv M64N128 w8 s3 5.913
    # against M64N64 w8 s2 8.261.
    if kind == "fwd":
        if width <= 64:
            return Config(64, 64, 4, 3) if short else Config(128, 64, 8, 3)
        if dim_b > 0 and width <= 128:
            # Two pieces (72, 80, 96 unpadded: FINEVITI_ATTN_PAD_SPLIT=0 on a GPU): with triton 3.6 the pipelined
            # forward read shared memory out of bounds on an H100 (M128 w8 s3, M64 w4 s3 and s1), M128 w8 s1 did
            # not (head dim 80, benchmarks/results/2026-11-28_H100-80GB-HBM3_gpu_check_logs.txt): the probe's
            # pieces run this, one stage, at every length. Not yet timed.
            return Config(128, 64, 8, 1)
        if width <= 128:
            return Config(64 if short else 128, 64, 8, 3)
        return Config(64, 32, 8, 2)
    if kind == "dkdv_tma":  # the atomic dq's tiles (a bulk reduction in place of the element-wise atomics)
        kind = "dkdv_atomic"
    if kind in ("dkdv", "dkdv_atomic"):
        if width <= 64:
            # opt-in at 64 (the default there is the separate dq): the H200 sweep's best, M64N128 w8 s3, backward
            # 4.793 ms against 5.333 for M64N64 w4 s2, the pin before, and 4.108 for the separate dq (fa3:4096,
            # bf16, 2026-11-28_H200_gpu_check_summary.md); no spill at d64 (kernel report)
            if kind == "dkdv_atomic" and not short:
                return Config(64, 128, 8, 3)
            return Config(64, 64, 8, 2) if short else Config(32, 64, 4, 3)
        if width <= 128:
            return Config(64, 128, 8, 3) if not short and dim_b == 0 else Config(64, 64, 8, 2)
        # head dim 256, in two launches (dkdv_parts), neither spilling: the dv part 158 registers, the dk part 187
        # (triton 3.8, bf16; not timed). With both accumulators the best tile (M16N64 w8 s2) spilled 52 bytes.
        return Config(32, 64, 8, 2)
    if kind == "dq":
        if width <= 64:
            return Config(64, 64, 8 if short else 4, 2)
        if width <= 128:
            return Config(64, 64, 8, 2)
        # head dim 256: two stages take 185 registers and no spill (one stage: 255 and 92 bytes of spills, with
        # more instructions per iteration: 556 against 420; triton 3.8, bf16; not timed)
        return Config(64, 32, 8, 2)
    raise ValueError(f"kind must be 'fwd', 'dkdv', 'dkdv_atomic', 'dkdv_tma' or 'dq', got {kind!r}")


def _precision(dtype: torch.dtype) -> str:
    # fp32: 3xTF32 products (each operand split into a TF32 high part and a low remainder, three TF32 dots), about
    # fp32's accuracy but not IEEE fp32 as issue 3 asked: IEEE ("ieee") dots spilled 136-784 bytes of stack in every
    # tile shape tried on sm_90 (commit 19540e1). The setting is unused for 16-bit inputs.
    return "tf32x3" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------------------------
# Launchers: allocate, build the grid, launch.
# ----------------------------------------------------------------------------------------------------------------


# block_schedule's device tensors, reused for the same host lengths: every layer of a model calls attention with one
# pack's lengths (the data planner passes them), and without the cache each call launches five small device ops.
_SCHEDULE_CACHE: collections.OrderedDict = collections.OrderedDict()
_SCHEDULE_CACHE_SIZE = 16


def _exact_schedule(cu_seqlens: torch.Tensor, block: int, seqlens: list[int]) -> tuple[torch.Tensor, int]:
    """(cumulative block counts on cu_seqlens' device, their total) from host lengths: a function of (seqlens,
    block) alone, built on the host, copied from pinned memory without waiting for the device, and cached under
    (lengths, block, device, stream), so that nothing about the cu_seqlens tensor (which an in-place write through
    a collective or a DLPack alias could change without a version bump) can make a hit stale."""
    stream = torch.cuda.current_stream(cu_seqlens.device).cuda_stream if cu_seqlens.is_cuda else 0
    key = (tuple(seqlens), block, str(cu_seqlens.device), stream)
    hit = _SCHEDULE_CACHE.get(key)
    if hit is not None:
        try:
            _SCHEDULE_CACHE.move_to_end(key)
        except KeyError:  # evicted by another thread in between: the entry itself is still good
            pass
        return hit
    cumulative = [0]
    for length in seqlens:
        cumulative.append(cumulative[-1] + (length + block - 1) // block)
    host = torch.tensor(cumulative, dtype=torch.int32)
    if cu_seqlens.is_cuda:  # pinned: the copy is queued on the stream, the host does not wait for the device
        block_cu = host.pin_memory().to(cu_seqlens.device, non_blocking=True)
    else:
        block_cu = host.to(cu_seqlens.device)
    _SCHEDULE_CACHE[key] = (block_cu, cumulative[-1])
    while len(_SCHEDULE_CACHE) > _SCHEDULE_CACHE_SIZE:
        try:
            _SCHEDULE_CACHE.popitem(last=False)
        except KeyError:
            break
    return block_cu, cumulative[-1]


def block_schedule(cu_seqlens: torch.Tensor, block: int, total: int,
                   seqlens: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Cumulative count of `block`-sized blocks per sequence (on the device) and the number of programs to launch.

    With host-side `seqlens` the count is exact (and cached, _exact_schedule); without them, or while a CUDA graph
    is captured (a cached tensor would be baked into the graph, or live in its private pool), the counts come from
    cu_seqlens on the device and the program count is an upper bound (at most one idle program per sequence, which
    exits at once), so that nothing waits for the device.
    """
    n = cu_seqlens.numel() - 1
    if seqlens is not None and not (cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
        return _exact_schedule(cu_seqlens, block, seqlens)
    counts = (cu_seqlens[1:] - cu_seqlens[:-1] + (block - 1)) // block
    block_cu = torch.zeros(n + 1, dtype=torch.int32, device=cu_seqlens.device)
    torch.cumsum(counts, 0, out=block_cu[1:])
    if seqlens is not None:
        programs = sum((length + block - 1) // block for length in seqlens)
    else:
        # sum(ceil(L_i / block)) <= ceil(total / block) + n - 1 whatever the lengths (a bound from max_seqlen, which
        # the caller states and on CUDA nobody checks by default, launched too few programs when it was understated)
        programs = triton.cdiv(total, block) + n - 1
    return block_cu, max(programs, 0)


def _alignment(*tensors: torch.Tensor) -> int:
    """The largest of 8, 4, 2, 1 dividing every token and head stride: lets the kernels load 16 bytes at a time."""
    g = 0
    for t in tensors:
        g = math.gcd(g, math.gcd(t.stride(0), t.stride(1)))
    return next(a for a in (8, 4, 2, 1) if g % a == 0)


def _common_strides(*tensors: torch.Tensor) -> list[int]:
    strides = []
    for t in tensors:
        strides += [t.stride(0), t.stride(1)]
    return strides


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                      seqlens_q=None, rope=None, mode=None):
    """O (total_q, heads, head_dim) in q's dtype and LSE (heads, total_q) fp32. With `rope` = (pos_q, pos_k, cos,
    sin), q and k are rotated by 2D RoPE as they are loaded: pos (total, 2) int32 contiguous, cos/sin the
    (positions, head_dim // 4) fp32 tables of rope_tables(); head_dim a power of two. `mode`: the split mode
    (default split_mode())."""
    total_q, heads, head_dim = q.shape
    check_supported(q)
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):  # the row maximum is taken before scaling
        raise ValueError(f"softmax_scale must be finite and > 0 for the triton backend, got {softmax_scale}")
    mode = mode or split_mode()
    dim_a, dim_b = split_head_dim(head_dim, q.dtype, mode)
    if rope is not None and head_dim & (head_dim - 1):
        raise ValueError(f"RoPE inside the attention kernel takes a power-of-two head_dim, got {head_dim}")
    cfg = pick_config("fwd", head_dim, q.dtype, max(max_seqlen_q, max_seqlen_k), mode)
    o = torch.empty_like(q)
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    block_cu, programs = block_schedule(cu_seqlens_q, cfg.block_m, total_q, seqlens_q)
    if programs == 0:
        return o, lse.fill_(float("-inf"))
    # without rope, POS_* and COS/SIN are not read: any int32 / fp32 tensor fills them
    pos_q, pos_k, cos, sin = rope if rope is not None else (cu_seqlens_q, cu_seqlens_q, lse, lse)
    _attn_fwd[(programs, heads)](
        q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, block_cu, pos_q, pos_k, cos, sin, cu_seqlens_q.numel() - 1,
        *_common_strides(q, k, v, o), lse.stride(0), softmax_scale,
        HEAD_DIM=head_dim, DIM_A=dim_a, DIM_B=dim_b, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        PRECISION=_precision(q.dtype), ALIGN=_alignment(q, k, v, o), ROPE=rope is not None,
        I32_TOKENS=fits_i32(k, v),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def rope_tables(pos: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (max coordinate + 1, head_dim // 4) fp32, of DESIGN.md's rope_2d frequencies
    theta ** (-arange(0, head_dim / 2, 2) / (head_dim / 2)), computed in fp64. One host read of pos's extremes."""
    if head_dim % 4:
        raise ValueError(f"head_dim must be divisible by 4 for RoPE, got {head_dim}")
    low, high = (int(x) for x in torch.aminmax(pos)) if pos.numel() else (0, 0)
    if low < 0:  # the kernel indexes the tables by position: a negative one would read before them
        raise ValueError(f"RoPE inside the attention kernel takes non-negative positions, got a minimum of {low}")
    if high >= 2**31:  # the kernels take int32 positions
        raise ValueError(f"RoPE inside the attention kernel takes positions below 2**31, got a maximum of {high}")
    if (high + 1) * (head_dim // 4) >= 2**31:
        raise ValueError(f"positions up to {high} make a cos/sin table of more than 2**31 entries at head_dim "
                         f"{head_dim}")
    positions = high + 1
    inv_freq = theta ** (-torch.arange(0, head_dim // 2, 2, dtype=torch.float64, device=pos.device) / (head_dim // 2))
    angles = torch.arange(positions, dtype=torch.float64, device=pos.device)[:, None] * inv_freq[None, :]
    return angles.cos().float().contiguous(), angles.sin().float().contiguous()


DQ_MODES = ("atomic", "separate", "tma")
# How dq is computed when the caller does not ask for a deterministic backward. "atomic": inside the dk/dv kernel,
# each key block adds its share into an fp32 buffer (FlashAttention-2's way: 5 matmuls per tile pair, the order of
# the additions not fixed). "separate": a second kernel per query block recomputes the scores and dP (7 matmuls,
# bit-reproducible). "tma" (opt-in, not yet timed): the atomic dq with each tile's share added by one bulk tensor
# reduction (cp.reduce.async.bulk.tensor, FlashAttention-3's way) instead of one atomic per element: kernel report,
# triton 3.6, hot loop 493 -> 462 instructions at d64 (M64N64 w4 s2, 255 -> 250 registers) and 673 -> 592 at d128
# (M64N128 w8 s3, spills 76 -> 60 bytes); one tile of head_dim columns, so two pieces (80 or 96 in split mode
# "pieces") keep the element-wise atomics. DEFAULT_DQ_MODE applies where atomic_dq_preferred holds;
# FINEVITI_ATTN_DQ=atomic|separate|tma overrides it wherever atomic_dq_supported holds (experiments and the GPU
# check's sweeps).
DEFAULT_DQ_MODE = "atomic"


def atomic_dq_supported(head_dim: int, dtype: torch.dtype, max_seqlen: int | None = None,
                        mode: str | None = None) -> bool:
    """Where the atomic variant compiles without spilling at some tile and is tested: 16-bit inputs at head dims
    64 to 128 whose tiles have no masked columns (64, 128; 80 = 64 + 16), or, in split mode "masked", 80 and 96
    inside one 128-column tile. Not at fp32, 72 (64 + 16 with 8 columns masked) or above 128: the extra dq tile
    spilled 32-900 bytes of registers on sm_90 whatever the tile (16x16 to 64x128, 4 or 8 warps; kernel report).
    Not when every sequence fits one 64-row block (`max_seqlen` <= 64): there the short tile spilled once the
    key-row mask was added, and a single key block per sequence leaves no recomputation to save."""
    dim_a, dim_b = split_head_dim(head_dim, dtype, mode)
    if max_seqlen is not None and _seqlen_bucket(max_seqlen) <= 64:
        return False
    # one tile (64, 128, or 80 and 96 masked inside 128), or pieces that cover head_dim exactly (80 = 64 + 16)
    return dtype in (torch.float16, torch.bfloat16) and (dim_b == 0 or dim_a + dim_b == head_dim) and \
        64 <= head_dim <= 128


def atomic_dq_preferred(head_dim: int) -> bool:
    """Where the default takes the atomic dq (when supported): above head dim 64. At 64 it was measured slower on
    an H100 with the tiles of the time (FA3 shape seqlen 4096, d64, bf16: backward 5.149 and 5.084 ms with atomics,
    4.909 and 4.900 ms without, two runs; benchmarks/results/2026-11-27_H100-80GB-HBM3_gpu_check{,_rerun}_
    summary.md), and again on an H200 with the 128-column tiles that made it 30% faster at d128: best M64N128 w8 s3,
    4.793 ms against 4.108 for the pinned separate dq (2026-11-28_H200_gpu_check_summary.md)."""
    return head_dim > 64


def dq_mode(deterministic: bool, head_dim: int, dtype: torch.dtype, max_seqlen: int | None = None,
            split: str | None = None) -> str:
    """'separate' when `deterministic` or where atomic_dq_supported is false (in split mode `split`, default
    split_mode()); else FINEVITI_ATTN_DQ when set; else DEFAULT_DQ_MODE where atomic_dq_preferred holds,
    'separate' elsewhere."""
    mode = os.environ.get("FINEVITI_ATTN_DQ") or None
    if mode is not None and mode not in DQ_MODES:
        raise ValueError(f"FINEVITI_ATTN_DQ must be one of {DQ_MODES}, got {mode!r}")
    if deterministic or not atomic_dq_supported(head_dim, dtype, max_seqlen, split):
        return "separate"
    if mode == "tma" and split_head_dim(head_dim, dtype, split)[1] > 0:
        return "atomic"  # the bulk reduction takes one tile; two pieces keep the element-wise atomics
    if mode:
        return mode
    return DEFAULT_DQ_MODE if atomic_dq_preferred(head_dim) else "separate"


def fits_i32(*tensors: torch.Tensor) -> bool:
    """Whether every token offset (token x token stride) of these (total, heads, head_dim) tensors, plus a row's
    columns, is below 2**31: then the kernels' loops index them in 32 bits (the head offset is added in 64 bits
    apart). (The columns count only for views whose rows overlap, a token stride below head_dim.)"""
    return all(t.shape[0] * t.stride(0) + t.shape[2] * t.stride(2) < 2**31 for t in tensors)


def i32_tokens(width: int, *q_side: torch.Tensor) -> bool:
    """Whether the dk/dv kernel takes its per-row token offsets in 32 bits: at tile widths up to 64 (kernel report,
    triton 3.6: the d64 hot loops 240 -> 229 and, with the atomic dq, 560 -> 493 instructions, no spill; the
    255-register 128-wide tiles spilled 48-52 bytes more, so they keep 64 bits) and when every offset fits. The
    forward and dq kernels take them wherever k and v fit (their hot loops 15-34 instructions shorter at every
    head dim, no spill)."""
    return width <= 64 and fits_i32(*q_side)


def dkdv_parts(width: int) -> tuple[int, ...]:
    """The dk/dv kernel's launches (its PART) for a tile `width` columns wide: one (0, dk and dv together), or,
    beyond 128 columns, two (1: dv, then 2: dk). At head dim 256 the kernel holding both (BLOCK_N, 256) fp32
    accumulators spilled 52-3296 bytes on sm_90 whatever the tile (M16-M64, N32-N128, 4 or 8 warps, 1-3 stages;
    triton 3.8, bf16), where each part alone does not (M32N64 w8 s2: 158 and 187 registers). The price: the dk
    part computes the scores again (5 matrix products per tile pair instead of 4). Not yet timed on a GPU."""
    return (1, 2) if width > 128 else (0,)


def attention_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                       seqlens_q=None, seqlens_k=None, deterministic=False, mode=None):
    """dq, dk, dv in the inputs' dtypes. With `deterministic`, no atomics (bit-reproducible); else dq_mode().
    `mode`: the split mode (default split_mode(); the ops layer passes its forward's)."""
    total_q, heads, head_dim = q.shape
    total_k = k.shape[0]
    mode = mode or split_mode()
    dim_a, dim_b = split_head_dim(head_dim, q.dtype, mode)
    longest = max(max_seqlen_q, max_seqlen_k)
    dq_how = dq_mode(deterministic, head_dim, q.dtype, longest, mode)
    if dq_how == "tma" and total_q == 0:
        dq_how = "atomic"  # no query rows: nothing to add, and a descriptor needs a non-empty tensor
    atomic = dq_how in ("atomic", "tma")
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else lse
    dq = None if atomic else torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse)  # lse in log2 units, which the kernels below read (written with delta)
    if total_q > 0:
        block_t = preprocess_block(head_dim)
        _attn_bwd_preprocess[(triton.cdiv(total_q, block_t), heads)](
            o, do, delta, lse, lse2, total_q, o.stride(0), o.stride(1), do.stride(0), do.stride(1), delta.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_T=block_t,
        )
    lse = lse2
    n_seqs = cu_seqlens_q.numel() - 1
    common = dict(HEAD_DIM=head_dim, DIM_A=dim_a, DIM_B=dim_b, PRECISION=_precision(q.dtype),
                  ALIGN=_alignment(q, k, v, do, dk, dv, dq_acc if atomic else dq))

    cfg = pick_config({"tma": "dkdv_tma", "atomic": "dkdv_atomic"}.get(dq_how, "dkdv"), head_dim, q.dtype, longest,
                      mode)
    block_cu, programs = block_schedule(cu_seqlens_k, cfg.block_n, total_k, seqlens_k)
    if programs:
        dq_desc = None
        if dq_how == "tma":
            dq_desc = TensorDescriptor(dq_acc, list(dq_acc.shape), list(dq_acc.stride()), [cfg.block_m, 1, dim_a])
        for part in dkdv_parts(dim_a + dim_b):
            _attn_bwd_dkdv[(programs, heads)](
                q, k, v, do, dk, dv, dq_acc, dq_desc, lse, delta, cu_seqlens_q, cu_seqlens_k, block_cu, n_seqs,
                *_common_strides(q, k, v, do, dk, dv), *(_common_strides(dq_acc) if atomic else (0, 0)),
                lse.stride(0), softmax_scale, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ATOMIC_DQ=atomic,
                I32_TOKENS=i32_tokens(dim_a + dim_b, q, do, dq_acc if atomic else q), TMA_DQ=dq_how == "tma",
                PART=part, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
            )
    else:
        dk.zero_()
        dv.zero_()
    if atomic:  # the scale and the cast to q's dtype in one pass over the fp32 buffer
        dq = torch.empty_like(q)
        torch.mul(dq_acc, softmax_scale, out=dq)
        return dq, dk, dv

    cfg = pick_config("dq", head_dim, q.dtype, longest, mode)
    block_cu, programs = block_schedule(cu_seqlens_q, cfg.block_m, total_q, seqlens_q)
    if programs:
        _attn_bwd_dq[(programs, heads)](
            q, k, v, do, dq, lse, delta, cu_seqlens_q, cu_seqlens_k, block_cu, n_seqs,
            *_common_strides(q, k, v, do, dq), lse.stride(0), softmax_scale,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            I32_TOKENS=fits_i32(k, v), **common,
        )
    else:
        dq.zero_()
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# What ships: every pinned configuration at the representative head dims and dtypes (read by the kernel report).
# ----------------------------------------------------------------------------------------------------------------

SHIPPED_HEAD_DIMS = (32, 64, 72, 80, 96, 128, 256)
SHIPPED_SEQLENS = (64, 4096)  # one short and one long bucket
_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _params(fn) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of every argument of a @triton.jit function (also under the interpreter)."""
    params = inspect.signature(getattr(fn, "fn", fn)).parameters.values()
    return [(p.name, "constexpr" in str(p.annotation)) for p in params]


def _signature(fn, dtype_name: str, pointer_dtypes: dict[str, str]) -> dict[str, str]:
    """Triton type of every argument of `fn`: constexprs, then the listed pointers, ints, the scale, data."""
    sig = {}
    for name, is_constexpr in _params(fn):
        if is_constexpr:
            sig[name] = "constexpr"
        elif name in pointer_dtypes:
            sig[name] = pointer_dtypes[name]
        elif name.startswith("stride_") or name in ("n_seqs", "total"):
            sig[name] = "i32"
        elif name == "softmax_scale":
            sig[name] = "fp32"
        else:
            sig[name] = f"*{dtype_name}"
    return sig


def shipped_configs(kind: str) -> list[registry.Shipped]:
    fn = {"fwd": _attn_fwd, "fwd_rope": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dkdv_atomic": _attn_bwd_dkdv,
          "dkdv_tma": _attn_bwd_dkdv, "dq": _attn_bwd_dq}[kind]
    rows, seen = [], set()
    cases = [(d, t) for d in SHIPPED_HEAD_DIMS for t in (torch.bfloat16, torch.float16)] + [(64, torch.float32)]
    if kind == "fwd_rope":  # varlen_attention_rope: power-of-two head dims, 16-bit, the long bucket
        cases = [(d, t) for d in (64, 128) for t in (torch.bfloat16, torch.float16)]
    # the head dims that are not powers of two in both split modes: "pieces" (72 always; 80 and 96 with
    # FINEVITI_ATTN_SPLIT=pieces) and "masked" (the default for multiples of 16)
    modes = [(d, t, "pieces") for d, t in cases] + [
        (d, t, "masked") for d, t in cases
        if t != torch.float32 and split_head_dim(d, t, "masked") != split_head_dim(d, t, "pieces")]
    for head_dim, dtype, mode in modes:
        for seqlen in SHIPPED_SEQLENS:
            if kind in ("dkdv_atomic", "dkdv_tma") and not atomic_dq_supported(head_dim, dtype, seqlen, mode):
                continue
            if kind == "dkdv_tma" and split_head_dim(head_dim, dtype, mode)[1] > 0:
                continue
            if kind == "fwd_rope" and seqlen <= 64:
                continue
            cfg = pick_config("fwd" if kind == "fwd_rope" else kind, head_dim, dtype, seqlen, mode)
            dim_a, dim_b = split_head_dim(head_dim, dtype, mode)
            key = (head_dim, dtype, mode, cfg)
            if key in seen:
                continue
            seen.add(key)
            name = _TORCH_TO_TRITON[dtype]
            pointers = {p: "*fp32" for p in ("LSE", "DELTA", "DQ_ACC", "COS", "SIN")}
            pointers.update({p: "*i32" for p in ("POS_Q", "POS_K")})
            pointers.update({p: "*i32" for p in ("cu_seqlens_q", "cu_seqlens_k", "block_cu")})
            signature = _signature(fn, name, pointers)
            dkdv_flags = {}
            if kind.startswith("dkdv"):
                tma = kind == "dkdv_tma"
                signature["DQ_DESC"] = f"tensordesc<fp32[{cfg.block_m},1,{dim_a}]>" if tma else "constexpr"
                dkdv_flags = {"ATOMIC_DQ": kind != "dkdv", "I32_TOKENS": dim_a + dim_b <= 64, "TMA_DQ": tma,
                              "PART": 0, **({} if tma else {"DQ_DESC": None})}
            row = registry.Shipped(
                kernel_name=f"attn_{kind}" if kind.startswith("fwd") else f"attn_bwd_{kind}",
                label=f"d{head_dim}{'' if mode == 'pieces' or dim_a == head_dim else f'in{dim_a}'}-{name}-{cfg.label}",
                signature=signature,
                constexprs=dict(HEAD_DIM=head_dim, DIM_A=dim_a, DIM_B=dim_b, BLOCK_M=cfg.block_m,
                                BLOCK_N=cfg.block_n, PRECISION=_precision(dtype),
                                ALIGN=8 if head_dim % 8 == 0 else 1,
                                **(dkdv_flags if kind.startswith("dkdv") else {"I32_TOKENS": True}),
                                **({"ROPE": kind == "fwd_rope"} if kind.startswith("fwd") else {})),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                aligned=_aligned(fn, head_dim, zero_dqa=kind == "dkdv"),
                **_spill_allowance(kind, head_dim, dim_a, dim_b, cfg),
            )
            parts = dkdv_parts(dim_a + dim_b) if kind.startswith("dkdv") else (0,)
            for part in parts:  # the two launches of a wide tile (dv, then dk) are two kernels to the compiler
                rows.append(row if part == 0 else dataclasses.replace(
                    row, label=f"{row.label}-{'dv' if part == 1 else 'dk'}",
                    constexprs={**row.constexprs, "PART": part}))
            last = rows[-1]
            if (last.constexprs["I32_TOKENS"] and head_dim in (64, 128) and dtype == torch.bfloat16
                    and mode == "pieces" and seqlen > 64 and kind != "fwd_rope"):
                # the 64-bit token offsets taken where a span reaches 2**31: compiled at the main head dims too
                rows.append(dataclasses.replace(last, label=f"{last.label}-i64",
                                                constexprs={**last.constexprs, "I32_TOKENS": False}))
    return rows


def _spill_allowance(kind: str, head_dim: int, dim_a: int, dim_b: int, cfg: Config) -> dict:
    """The measured exceptions to the no-spill gate, the 128-column dk/dv tiles M64N128 w8 (H100, FA3 shape seqlen
    4096, bf16): with atomic dq it spilled 88 bytes at s2 (triton 3.6) and spills 76 (3.6) and 56 (3.8) at s3, yet
    ran the backward in 4.537 ms at s2 (2026-11-27) against 5.723 for the best tile that does not spill (M32N128)
    and 7.466 for M64N64, and in 4.129 ms at s3 against 4.465 at s2 (2026-11-28); deterministic, at s3 it spills 16
    (3.6) and 36 bytes (3.8) and ran it in 5.913 ms against 8.261 for M64N64 w8 s2, which does not spill. In split
    mode "masked" (80 and 96 in 128 columns, the default) the same tiles spill a little more (16-96 bytes), not
    timed on an H100: the d128 allowances plus 16 bytes, said as such. Masked 80 ran its fwd+bwd (atomic dq) on an
    H200 in 3.551 ms against 3.697 for the d128 kernels on copies padded to 128 (2026-11-28). The opt-in
    bulk-reduction dq (dkdv_tma) takes the atomic dq's tiles and spills less there."""
    if kind not in ("dkdv", "dkdv_atomic", "dkdv_tma") or (dim_a, dim_b) != (128, 0) or \
            (cfg.block_m, cfg.block_n, cfg.num_warps) != (64, 128, 8):
        return {}
    if kind == "dkdv_tma":
        return {"spill_allowance": 64,
                "spill_reason": "opt-in (FINEVITI_ATTN_DQ=tma), not yet timed: the atomic dq's tile, which ran "
                                "faster with its spills, spilling less with the bulk reduction (60 bytes against "
                                "76-80 on triton 3.6)"}
    if head_dim != dim_a:
        if kind == "dkdv_atomic":
            return {"spill_allowance": 112,
                    "spill_reason": "split mode 'masked' (80, 96 in 128 columns), timed on an H200 at d80 bf16: "
                                    "fwd+bwd 3.551 ms against 3.697 for the unmasked d128 kernels on padded copies"}
        return {"spill_allowance": 64,
                "spill_reason": "split mode 'masked' (80, 96 in 128 columns), deterministic backward: not timed "
                                "on a GPU; the tile that d128 runs faster with its spills (5.913 against 8.261 ms "
                                "on an H100), plus 16 bytes"}
    if kind == "dkdv_atomic":
        return {"spill_allowance": 96, "spill_reason": "measured on an H100 with these spills (triton 3.6): "
                                                       "bwd 4.129 ms against 5.723 for the best non-spilling tile"}
    return {"spill_allowance": 48, "spill_reason": "measured on an H100 with these spills (triton 3.6): "
                                                   "bwd 5.913 ms against 8.261 for M64N64, no spills"}


def _aligned(fn, head_dim: int, heads: int = 16, zero_dqa: bool = False) -> tuple[str, ...]:
    """What Triton specialises as divisible by 16 for contiguous (total, heads, head_dim) inputs: the pointers,
    the token strides (heads * head_dim) and the head strides when head_dim is a multiple of 16."""
    names = []
    for name, is_constexpr in _params(fn):
        if is_constexpr or name in ("n_seqs", "total", "softmax_scale", "stride_lse_head", "stride_delta_head",
                                    "DQ_DESC"):
            continue
        if name.startswith("stride_dqa_") and zero_dqa:  # passed as 0 when dq is not accumulated by atomics
            names.append(name)
            continue
        if name.endswith("_tok"):
            names.append(name) if (heads * head_dim) % 16 == 0 else None
        elif name.endswith("_head"):
            names.append(name) if head_dim % 16 == 0 else None
        else:
            names.append(name)
    return tuple(names)


def preprocess_block(head_dim: int) -> int:
    """Rows per program of the backward's preprocess (delta = rowsum(o * do)): 64 at every head dim. (16 beyond head
    dim 128 for a while: 64 rows spilled 24-40 bytes on sm_90 in the variant the kernel report then compiled, whose
    strides were not specialised as multiples of 16; the variant that launches for contiguous o and do, declared
    since, takes 44 registers there and does not spill. A do with strides that are no multiple of 16 still
    compiles the other one.)"""
    return 64


def _shipped_preprocess() -> list[registry.Shipped]:
    rows = []
    for head_dim in SHIPPED_HEAD_DIMS:
        for dtype in (torch.bfloat16, torch.float16):
            name = _TORCH_TO_TRITON[dtype]
            rows.append(registry.Shipped(
                kernel_name="attn_bwd_preprocess", label=f"d{head_dim}-{name}",
                signature=_signature(_attn_bwd_preprocess, name, {p: "*fp32" for p in ("DELTA", "LSE", "LSE2")}),
                constexprs=dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                                BLOCK_T=preprocess_block(head_dim)),
                num_warps=4, num_stages=3,  # the launch's defaults
                aligned=_aligned(_attn_bwd_preprocess, head_dim),  # contiguous o and do: strides divisible by 16
            ))
    return rows


registry.declare("attn_fwd", _attn_fwd, lambda: shipped_configs("fwd"))
registry.declare("attn_fwd_rope", _attn_fwd, lambda: shipped_configs("fwd_rope"))
registry.declare("attn_bwd_dkdv", _attn_bwd_dkdv, lambda: shipped_configs("dkdv"))
registry.declare("attn_bwd_dkdv_atomic", _attn_bwd_dkdv, lambda: shipped_configs("dkdv_atomic"))
registry.declare("attn_bwd_dkdv_tma", _attn_bwd_dkdv, lambda: shipped_configs("dkdv_tma"))
registry.declare("attn_bwd_dq", _attn_bwd_dq, lambda: shipped_configs("dq"))
registry.declare("attn_bwd_preprocess", _attn_bwd_preprocess, _shipped_preprocess)

"""2D rotary position embedding (Qwen2-VL vision RoPE) in one pass, cos and sin computed on the fly.

Pairs (j, j + head_dim/2) of each head rotate by angle pos * theta**(-f/(head_dim/4)), with pos the token's row
for j < head_dim/4 and its column above, f = j mod head_dim/4 (fineviti.ops.rope.rope_2d_ref is the definition).
One program takes BLOCK_T tokens x BLOCK_H heads (all heads up to 16): it computes the tokens' angles once (fp64,
reduced to [-pi/4, pi/4], fp32 polynomials) and applies them to those heads of q, of k (HAS_K) and copies v
(HAS_V), so the trigonometry is shared by heads and tensors and each element is read and written once. INVERSE
rotates by the negative angle (the backward). Inputs and outputs may be strided views (the fused QKV split reads
q, k, v out of one projection). Positions are int32 or int64 as given (one compiled variant each), converted to fp64
as the C++/CUDA ops do: an int64 position beyond int32 is not cast down and wrapped.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import registry

HALF_PI = tl.constexpr(1.5707963267948966)
TWO_OVER_PI = tl.constexpr(0.6366197723675814)


@triton.jit
def _rotate_tile(x_ptrs, out_ptrs, cos, sin, mask, HALF: tl.constexpr):
    """out = x * cos + rotate_half(x) * sin on a (BLOCK_T, BLOCK_H, HALF_PAD) tile of first halves at x_ptrs."""
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    tl.store(out_ptrs, out1.to(out_ptrs.dtype.element_ty), mask=mask)
    tl.store(out_ptrs + HALF, out2.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _sin_cos(angle):
    """sin and cos (fp32) of fp64 angles: reduced in fp64 to r in [-pi/4, pi/4] and a quadrant, then Taylor
    polynomials in fp32 (truncation below 1e-9). No table, no slow path for large arguments, no local memory."""
    quadrant = tl.floor(angle * TWO_OVER_PI + 0.5)
    r = (angle - quadrant * HALF_PI).to(tl.float32)
    r2 = r * r
    sin_r = r + r * r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880))))
    cos_r = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800)))))
    n = quadrant.to(tl.int64) & 3
    sin = tl.where(n == 0, sin_r, tl.where(n == 1, cos_r, tl.where(n == 2, -sin_r, -cos_r)))
    cos = tl.where(n == 0, cos_r, tl.where(n == 1, -sin_r, tl.where(n == 2, -cos_r, sin_r)))
    return sin, cos


@triton.jit
def rope_2d_kernel(
    q_ptr,  # (total, heads, HEAD_DIM), strides (stride_in_t, stride_in_h, 1)
    k_ptr,  # same shape and strides as q (read only when HAS_K)
    v_ptr,  # same shape and strides as q (read only when HAS_V)
    q_out_ptr,  # (total, heads, HEAD_DIM), strides (stride_out_t, stride_out_h, 1); may alias q_ptr
    k_out_ptr,  # like q_out (written only when HAS_K)
    v_out_ptr,  # like q_out (written only when HAS_V)
    pos_ptr,  # (total, 2) int32 or int64 (row, col), strides (stride_pos_t, stride_pos_c)
    total,
    heads,
    theta,
    stride_in_t,
    stride_in_h,
    stride_out_t,
    stride_out_h,
    stride_pos_t,
    stride_pos_c,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,  # next power of two >= HEAD_DIM // 2
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_K: tl.constexpr,
    HAS_V: tl.constexpr,
    INVERSE: tl.constexpr,
    STRIDE_MULTIPLE: tl.constexpr,  # a power of two dividing every q/k/v and output stride (1, 2, 4 or 8)
):
    HALF: tl.constexpr = HEAD_DIM // 2
    QUARTER: tl.constexpr = HEAD_DIM // 4
    pid = tl.program_id(0).to(tl.int64)
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < total
    row = tl.load(pos_ptr + tokens * stride_pos_t, mask=token_mask, other=0)
    col = tl.load(pos_ptr + tokens * stride_pos_t + stride_pos_c, mask=token_mask, other=0)

    # Angles in fp64 (positions exact up to 2**53); sin/cos once per (token, pair), shared by heads and tensors.
    j = tl.arange(0, HALF_PAD)
    freq = (j % QUARTER).to(tl.float64)
    log2_theta = tl.log2(tl.zeros((HALF_PAD,), dtype=tl.float64) + theta)
    inv_freq = tl.exp2(-(freq / QUARTER) * log2_theta)
    coord = tl.where((j < QUARTER)[None, :], row[:, None], col[:, None]).to(tl.float64)
    sin, cos = _sin_cos(coord * inv_freq[None, :])
    sin = sin[:, None, :]
    cos = cos[:, None, :]
    if INVERSE:
        sin = -sin

    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = token_mask[:, None, None] & (h < heads)[None, :, None] & (j < HALF)[None, None, :]
    # Row starts are multiples of STRIDE_MULTIPLE (Triton itself only hints ints divisible by 16; head_dim 72
    # strides are multiples of 8), which lets the half rows load as wide vectors.
    in_rows = tokens[:, None] * stride_in_t + h[None, :].to(tl.int64) * stride_in_h
    out_rows = tokens[:, None] * stride_out_t + h[None, :].to(tl.int64) * stride_out_h
    in_rows = tl.multiple_of(in_rows, [STRIDE_MULTIPLE, STRIDE_MULTIPLE])
    out_rows = tl.multiple_of(out_rows, [STRIDE_MULTIPLE, STRIDE_MULTIPLE])
    in_offsets = in_rows[:, :, None] + j[None, None, :]
    out_offsets = out_rows[:, :, None] + j[None, None, :]
    _rotate_tile(q_ptr + in_offsets, q_out_ptr + out_offsets, cos, sin, mask, HALF)
    if HAS_K:
        _rotate_tile(k_ptr + in_offsets, k_out_ptr + out_offsets, cos, sin, mask, HALF)
    if HAS_V:
        v1 = tl.load(v_ptr + in_offsets, mask=mask)
        v2 = tl.load(v_ptr + in_offsets + HALF, mask=mask)
        tl.store(v_out_ptr + out_offsets, v1.to(v_out_ptr.dtype.element_ty), mask=mask)
        tl.store(v_out_ptr + out_offsets + HALF, v2.to(v_out_ptr.dtype.element_ty), mask=mask)


# Block sizes: a tile of about 2048 pairs per tensor (BLOCK_T tokens x BLOCK_H heads x HALF_PAD lanes), all
# heads of a token in one tile up to 16 heads, so that one program's sin/cos serve 16 heads x 2 tensors. More heads
# take more programs along the grid's second axis (each recomputes its tokens' sin/cos).
TILE_PAIRS = 2048
MAX_BLOCK_H = 16
NUM_WARPS = 4
NUM_STAGES = 1  # the head loop carries no loads across iterations worth pipelining


def launch_config(head_dim: int, heads: int, tile_pairs: int = TILE_PAIRS, max_block_h: int = MAX_BLOCK_H,
                  num_warps: int = NUM_WARPS) -> dict:
    """The constexprs and launch options used for a head dim and head count (the defaults are what ships; the
    other arguments exist for the benchmark's config sweep)."""
    half_pad = triton.next_power_of_2(head_dim // 2)
    block_h = min(max_block_h, triton.next_power_of_2(heads))
    block_t = max(1, tile_pairs // (half_pad * block_h))
    return {"HALF_PAD": half_pad, "BLOCK_T": block_t, "BLOCK_H": block_h, "num_warps": num_warps,
            "num_stages": NUM_STAGES}


def launch(q, k, v, q_out, k_out, v_out, pos, theta: float, inverse: bool, config: dict | None = None) -> None:
    """Rotate q (and k) into q_out (and k_out), copy v into v_out. k, v (and their outputs) may be None.

    q, k, v share shape (total, heads, head_dim) and strides with a unit last stride; so do the outputs. pos is
    (total, 2) int32 or int64, read as it is. The caller checks shapes; this only builds the grid and launches.
    """
    total, heads, head_dim = q.shape
    if q.numel() == 0:  # no tokens, heads or columns: nothing to rotate (a grid from 0 heads divided by zero)
        return
    config = config or launch_config(head_dim, heads)
    grid = (triton.cdiv(total, config["BLOCK_T"]), triton.cdiv(heads, config["BLOCK_H"]))
    strides = (q.stride(0), q.stride(1), q_out.stride(0), q_out.stride(1))
    multiple = next(m for m in (8, 4, 2, 1) if all(s % m == 0 for s in strides))
    rope_2d_kernel[grid](
        q, k if k is not None else q, v if v is not None else q,
        q_out, k_out if k_out is not None else q_out, v_out if v_out is not None else q_out,
        pos, total, heads, float(theta),
        q.stride(0), q.stride(1), q_out.stride(0), q_out.stride(1), pos.stride(0), pos.stride(1),
        HEAD_DIM=head_dim, HAS_K=k is not None, HAS_V=v is not None, INVERSE=bool(inverse),
        STRIDE_MULTIPLE=multiple, **config,
    )


SHIPPED_HEAD_DIMS = (64, 72, 80, 96, 128)
SHIPPED_HEADS = 16
# (HAS_K, HAS_V, INVERSE): rope_2d forward/backward, rope_2d_qk forward/backward, qkv_split_rope forward/backward.
SHIPPED_VARIANTS = {
    "x_fwd": (False, False, False),
    "x_bwd": (False, False, True),
    "qk_fwd": (True, False, False),
    "qk_bwd": (True, False, True),
    "qkv_fwd": (True, True, False),
    "qkv_bwd": (True, True, True),
}


def _configs() -> list[registry.Shipped]:
    """Contiguous (total, 16, head_dim) tensors (qkv views for the split), contiguous pos: every pointer 16-byte
    aligned, token strides multiples of 16, head strides too except at head_dim 72, and pos's column stride 1, which
    Triton specialises as a constant. pos int32 (build_positions' dtype), and int64 (torch's default integers,
    labelled "pos64") in bf16 only: the fp16 variants differ from those in the element type alone."""
    rows = []
    for head_dim in SHIPPED_HEAD_DIMS:
        config = launch_config(head_dim, SHIPPED_HEADS)
        for dtype, pos_type in (("bf16", "i32"), ("fp16", "i32"), ("bf16", "i64")):
            ptr = "*" + dtype
            signature = {
                "q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "q_out_ptr": ptr, "k_out_ptr": ptr, "v_out_ptr": ptr,
                "pos_ptr": "*" + pos_type, "total": "i32", "heads": "i32", "theta": "fp32",
                "stride_in_t": "i32", "stride_in_h": "i32", "stride_out_t": "i32", "stride_out_h": "i32",
                "stride_pos_t": "i32", "stride_pos_c": "constexpr",
                "HEAD_DIM": "constexpr", "HALF_PAD": "constexpr", "BLOCK_T": "constexpr", "BLOCK_H": "constexpr",
                "HAS_K": "constexpr", "HAS_V": "constexpr", "INVERSE": "constexpr", "STRIDE_MULTIPLE": "constexpr",
            }
            aligned = [name for name, kind in signature.items() if kind.startswith("*")]
            aligned += ["heads", "stride_in_t", "stride_out_t"]
            if head_dim % 16 == 0:
                aligned += ["stride_in_h", "stride_out_h"]
            suffix = " pos64" if pos_type == "i64" else ""
            for variant, (has_k, has_v, inverse) in SHIPPED_VARIANTS.items():
                constexprs = {"stride_pos_c": 1, "HEAD_DIM": head_dim, "HALF_PAD": config["HALF_PAD"],
                              "BLOCK_T": config["BLOCK_T"], "BLOCK_H": config["BLOCK_H"], "HAS_K": has_k,
                              "HAS_V": has_v, "INVERSE": inverse, "STRIDE_MULTIPLE": 8}
                rows.append(registry.Shipped(
                    kernel_name="rope_2d_kernel", label=f"{variant} d{head_dim} {dtype} h{SHIPPED_HEADS}{suffix}",
                    signature=signature, constexprs=constexprs, num_warps=config["num_warps"],
                    num_stages=config["num_stages"], aligned=tuple(aligned)))
    return rows


registry.declare("rope_2d", rope_2d_kernel, _configs)

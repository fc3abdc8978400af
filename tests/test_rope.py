"""rope_2d, rope_2d_qk and qkv_split_rope against an fp64 reference, on every backend this machine has.

Held to err(kernel) <= 2 * err(reference in the same dtype) + atol against fp64, forward and gradient. The
reference itself is checked against a transcription of Qwen2-VL's vision RoPE (Hugging Face transformers).
Inputs are strided views into NaN-filled buffers and Triton outputs are NaN-poisoned, so stray reads and
missing writes show. Triton runs under the interpreter without a GPU (fp32 and fp16 there: the interpreter's
bf16 arithmetic is wrong); `-m gpu` runs the Triton and CUDA backends on the device; `-m slow` the full matrix.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import fineviti  # noqa: F401  (loads the extension when built)
from fineviti._checks import triton_interpreting
from fineviti.ops import rope as rope_mod
from fineviti.ops.rope import qkv_split_rope, rope_2d, rope_2d_qk, rope_2d_ref

CPP_BUILT = rope_mod._HAS_CPP_OPS
CUDA = torch.cuda.is_available()
INTERPRET = triton_interpreting()
DEVICE = "cuda" if CUDA else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GRIDS = {"1x1": [(1, 1)], "7x13": [(7, 13)], "16x16": [(16, 16)], "37x29": [(37, 29)],
         "pack": [(7, 13), (1, 1), (16, 16), (3, 5), (2, 9)]}


def cpu_backends():
    """Backends run on CPU tensors here, each with a skip reason where it cannot run."""
    triton_mark = [] if INTERPRET else [pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1")]
    cpp_mark = [] if CPP_BUILT else [pytest.mark.skip(
        reason="fineviti._C with the rope ops is not built (pip install --no-build-isolation --no-deps -e .)")]
    return [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=triton_mark),
            pytest.param("cpp", id="cpp", marks=cpp_mark)]


def gpu_backends():
    cuda_mark = [] if CPP_BUILT else [pytest.mark.skip(reason="fineviti._C with the rope ops is not built")]
    return [pytest.param("triton", id="gpu-triton", marks=pytest.mark.gpu),
            pytest.param("cuda", id="gpu-cuda", marks=[pytest.mark.gpu, *cuda_mark])]


def positions(grids, merge: int = 1) -> torch.Tensor:
    """(total, 2) int32 (row, col) of a pack of grids, each row-major (merge 1) or in merge x merge groups."""
    out = []
    for h, w in grids:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        if merge > 1:
            rows = rows.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3)
            cols = cols.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3)
        out.append(torch.stack((rows.flatten(), cols.flatten()), dim=-1))
    return torch.cat(out).to(torch.int32)


def padded_randn(total, heads, head_dim, dtype, device, scale=1.0):
    """A (total, heads, head_dim) view into a NaN-filled buffer with extra heads and lanes around it."""
    buf = torch.full((total, heads + 1, head_dim + 8), float("nan"), dtype=dtype, device=device)
    x = buf[:, :heads, 4:4 + head_dim]
    x.copy_(torch.randn(total, heads, head_dim, device=device) * scale)
    return x


@pytest.fixture
def poisoned(monkeypatch):
    """Triton outputs start as NaN, so an element the kernel does not write fails the comparison."""
    def nan_empty(x):
        return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)

    monkeypatch.setattr(rope_mod, "_empty", nan_empty)


def max_err(out, ref64):
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return (out.double() - ref64).abs().max().item()


def assert_close_to_fp64(out, ref_lo, ref64, dtype, what):
    err, err_ref = max_err(out, ref64), max_err(ref_lo, ref64)
    assert err <= 2 * err_ref + ATOL[dtype], f"{what}: error {err:.3g} > 2 * {err_ref:.3g} + {ATOL[dtype]}"


def check_rope(backend, device, grids, heads, head_dim, theta, dtype):
    """Forward and gradient of rope_2d_qk (q and k) and rope_2d (x) against the fp64 reference."""
    pos = positions(grids).to(device)
    total = pos.shape[0]
    q = padded_randn(total, heads, head_dim, dtype, device)
    k = padded_randn(total, heads, head_dim, dtype, device, scale=3.0)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_rot, k_rot = rope_2d_qk(q, k, pos, theta, backend=backend)
    assert q_rot.shape == q.shape and q_rot.dtype == dtype and k_rot.dtype == dtype
    dq_out = torch.randn_like(q_rot)
    dk_out = torch.randn_like(k_rot)
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), (dq_out, dk_out))

    for x, x_rot, dy, dx, name in ((q, q_rot, dq_out, dq, "q"), (k, k_rot, dk_out, dk, "k")):
        x64 = x.detach().double().requires_grad_(True)
        ref64 = rope_2d_ref(x64, pos, theta)
        (dx64,) = torch.autograd.grad(ref64, x64, dy.double())
        x_lo = x.detach().clone().requires_grad_(True)
        ref_lo = rope_2d_ref(x_lo, pos, theta)
        (dx_lo,) = torch.autograd.grad(ref_lo, x_lo, dy)
        assert_close_to_fp64(x_rot, ref_lo, ref64, dtype, f"{backend} forward {name}")
        assert_close_to_fp64(dx, dx_lo, dx64, dtype, f"{backend} gradient {name}")

    # rope_2d alone is the same rotation as either half of the pair.
    x_rot = rope_2d(q.detach(), pos, theta=theta, backend=backend)
    torch.testing.assert_close(x_rot, q_rot.detach(), rtol=0, atol=0)


# A default set that covers every grid, head dim, both thetas and both CPU dtypes at least once; the full
# product is under `slow`.
DEFAULT_CASES = [
    ("1x1", 2, 32, 10000.0, torch.float32),
    ("7x13", 20, 72, 10000.0, torch.float16),  # more heads than one Triton program takes
    ("16x16", 2, 64, 100.0, torch.float32),
    ("37x29", 1, 80, 10000.0, torch.float32),
    ("pack", 4, 96, 100.0, torch.float16),
    ("pack", 2, 128, 10000.0, torch.float32),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grid,heads,head_dim,theta,dtype", DEFAULT_CASES)
def test_rope_cpu(backend, grid, heads, head_dim, theta, dtype, poisoned):
    check_rope(backend, "cpu", GRIDS[grid], heads, head_dim, theta, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("theta", [10000.0, 500.0])
@pytest.mark.parametrize("head_dim", [32, 64, 72, 80, 96, 128])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_rope_cpu_full(backend, grid, head_dim, theta, dtype, poisoned):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in Triton's interpreter")
    check_rope(backend, "cpu", GRIDS[grid], 3, head_dim, theta, dtype)


# On a GPU every distinct (head dim, dtype, variant, integer specialisation) is a Triton compile: every head dim in
# bf16 on a pack, fp32 and fp16 at two head dims, and the other grids at one; the full product is under `slow`.
GPU_CASES = ([("pack", d, torch.bfloat16) for d in (32, 64, 72, 80, 96, 128)]
             + [("pack", d, dt) for d in (72, 128) for dt in (torch.float32, torch.float16)]
             + [(g, 80, torch.bfloat16) for g in ("1x1", "7x13", "16x16", "37x29")])


def check_rope_gpu(backend, grid, head_dim, dtype):
    theta = 500.0 if head_dim == 64 else 10000.0
    check_rope(backend, "cuda", GRIDS[grid], 16 if head_dim != 32 else 3, head_dim, theta, dtype)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("grid,head_dim,dtype", GPU_CASES)
def test_rope_gpu(backend, grid, head_dim, dtype, poisoned):
    check_rope_gpu(backend, grid, head_dim, dtype)


@pytest.mark.slow  # not marked `gpu`, so that `-m gpu` (the GPU check) stays short
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
    not CPP_BUILT, reason="fineviti._C with the rope ops is not built"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 72, 80, 96, 128])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_rope_gpu_full(backend, grid, head_dim, dtype, poisoned):
    check_rope_gpu(backend, grid, head_dim, dtype)


def test_large_positions_stay_accurate():
    """Angles up to ~5000 rad: the fp64 angle and range reduction keep the fp32 result near fp64."""
    pos = torch.tensor([[0, 0], [1, 5000], [4999, 3], [2047, 2048]], dtype=torch.int64)
    x = torch.randn(4, 2, 64)
    ref64 = rope_2d_ref(x.double(), pos)
    for backend in ["torch"] + (["triton"] if INTERPRET else []) + (["cpp"] if CPP_BUILT else []):
        out = rope_2d(x, pos, backend=backend)
        tol = 2e-3 if backend == "torch" else 2e-5  # the torch path rounds the angle to fp32, as Qwen2-VL does
        assert max_err(out, ref64) < tol, backend


def positions_beyond_int32(device) -> torch.Tensor:
    """int64 (row, col) at and above 2**31, and two within int32. The triton ops cast pos to int32 before their
    kernel: 2**31 became -2**31 and 2**32 + 1 became 1, a wrong angle without a word when value checks were off."""
    return torch.tensor([[2**31, 5], [7, 2**31 + 3], [2**32 + 1, 2**33 - 1], [0, 0], [2**31 - 1, 12],
                         [3 * 2**31 + 11, 2**34 + 17]], dtype=torch.int64, device=device)


def check_positions_beyond_int32(backend, device, dtype, check_values):
    """Unchecked int64 positions beyond int32 rotate by their fp64 angle (the cpp and cuda ops' rule; the torch
    backend rounds positions to fp32, as Qwen2-VL does, so it is no reference here): the QKV split and its
    gradient, rope_2d_qk, and rope_2d in place. err <= 2 * (fp64 result rounded to dtype) + 2e-4: angles up to
    2**34 rad carry about 1e-5 rad of fp64 rounding; a wrapped position is off by O(1)."""
    pos = positions_beyond_int32(device)
    total, heads, head_dim = pos.shape[0], 3, 24
    qkv = torch.randn(total, 3 * heads * head_dim, dtype=dtype, device=device, requires_grad=True)
    q_rot, k_rot, _ = qkv_split_rope(qkv, pos, heads, backend=backend, check_values=check_values)
    dq, dk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    (dqkv,) = torch.autograd.grad((q_rot, k_rot), qkv, (dq, dk))
    q, k, _ = (t.detach() for t in rope_mod._qkv_views(qkv, heads))
    q2, k2 = rope_2d_qk(q, k, pos, backend=backend, check_values=check_values)
    x = q.clone()
    rope_2d(x, pos, backend=backend, inplace=True, check_values=check_values)
    dq_in, dk_in, _ = rope_mod._qkv_views(dqkv, heads)
    cases = {"split q": (q_rot, q, False), "split k": (k_rot, k, False), "qk q": (q2, q, False),
             "qk k": (k2, k, False), "in place": (x, q, False), "dq": (dq_in, dq, True), "dk": (dk_in, dk, True)}
    for name, (got, x_in, inverse) in cases.items():
        want = rope_2d_ref(x_in.double(), pos, inverse=inverse)
        err, err_rounding = max_err(got, want), max_err(want.to(dtype), want)
        assert err <= 2 * err_rounding + 2e-4, f"{backend} {name}: error {err:.3g} against the fp64 angle"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", [p for p in cpu_backends() if p.values[0] != "torch"])
def test_positions_beyond_int32_unchecked(backend, dtype, poisoned):
    check_positions_beyond_int32(backend, "cpu", dtype, check_values=False)


@pytest.mark.parametrize("backend", gpu_backends())
def test_positions_beyond_int32_unchecked_gpu(backend, poisoned, monkeypatch):
    monkeypatch.delenv("FINEVITI_CHECKS", raising=False)  # CUDA's default: no value check, no synchronisation
    check_positions_beyond_int32(backend, "cuda", torch.bfloat16, check_values=None)


# ---------------------------------------------------------------------------------------------------------------
# The reference against Qwen2-VL (transcribed from transformers' modeling_qwen2_vl.py)


class VisionRotaryEmbedding(torch.nn.Module):
    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seqlen: int) -> torch.Tensor:
        seq = torch.arange(seqlen, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        return torch.outer(seq, self.inv_freq)


def hf_rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb_vision(q, k, cos, sin):
    orig_q_dtype, orig_k_dtype = q.dtype, k.dtype
    q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q_embed = (q * cos) + (hf_rotate_half(q) * sin)
    k_embed = (k * cos) + (hf_rotate_half(k) * sin)
    return q_embed.to(orig_q_dtype), k_embed.to(orig_k_dtype)


def hf_rot_pos_emb(grid_thw, rotary, spatial_merge_size):
    """Qwen2VisionTransformerPretrainedModel.rot_pos_emb; also returns the pos_ids it builds."""
    pos_ids = []
    for t, h, w in grid_thw.tolist():
        hpos_ids = torch.arange(h).unsqueeze(1).expand(-1, w)
        hpos_ids = hpos_ids.reshape(h // spatial_merge_size, spatial_merge_size, w // spatial_merge_size,
                                    spatial_merge_size).permute(0, 2, 1, 3).flatten()
        wpos_ids = torch.arange(w).unsqueeze(0).expand(h, -1)
        wpos_ids = wpos_ids.reshape(h // spatial_merge_size, spatial_merge_size, w // spatial_merge_size,
                                    spatial_merge_size).permute(0, 2, 1, 3).flatten()
        pos_ids.append(torch.stack([hpos_ids, wpos_ids], dim=-1).repeat(t, 1))
    pos_ids = torch.cat(pos_ids, dim=0)
    max_grid_size = grid_thw[:, 1:].max()
    rotary_pos_emb_full = rotary(max_grid_size)
    return rotary_pos_emb_full[pos_ids].flatten(1), pos_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_reference_matches_qwen2_vl(dtype, head_dim):
    heads = 3
    grid_thw = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 10, 8]])
    rotary = VisionRotaryEmbedding(head_dim // 2)
    rotary_pos_emb, pos_ids = hf_rot_pos_emb(grid_thw, rotary, spatial_merge_size=2)
    emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    total = pos_ids.shape[0]
    # The attention layer: a fused QKV projection reshaped to (seq, 3, heads, head_dim), then rotated.
    qkv = torch.randn(total, 3 * heads * head_dim).to(dtype)
    q, k, v = qkv.reshape(total, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q_hf, k_hf = apply_rotary_pos_emb_vision(q, k, cos, sin)

    assert torch.equal(pos_ids.to(torch.int32), positions([(4, 6), (2, 2), (10, 8)], merge=2))
    assert torch.equal(rope_2d_ref(q, pos_ids), q_hf)  # same fp32 operations, bit for bit
    assert torch.equal(rope_2d_ref(k, pos_ids), k_hf)
    triton_here = INTERPRET and dtype != torch.bfloat16  # the interpreter's bf16 arithmetic is wrong
    backends = ["torch"] + (["cpp"] if CPP_BUILT else []) + (["triton"] if triton_here else [])
    for backend in backends:
        q_ours, k_ours, v_ours = qkv_split_rope(qkv, pos_ids, heads, backend=backend)
        # On-the-fly angles differ from the fp32 table by rounding only: within an ulp of the output dtype.
        tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(q_ours, q_hf, rtol=0, atol=tol)
        torch.testing.assert_close(k_ours, k_hf, rtol=0, atol=tol)
        assert torch.equal(v_ours, v)


# ---------------------------------------------------------------------------------------------------------------
# The fused QKV split, in place, and the pair against single calls


def check_qkv_split(backend, device, grids, heads, head_dim, dtype, theta=10000.0):
    pos = positions(grids).to(device)
    total = pos.shape[0]
    buf = torch.full((total, 3 * heads * head_dim + 16), float("nan"), dtype=dtype, device=device)
    qkv = buf[:, 8:8 + 3 * heads * head_dim]
    qkv.copy_(torch.randn(total, 3 * heads * head_dim, device=device))
    qkv.requires_grad_(True)
    q, k, v = qkv_split_rope(qkv, pos, heads, theta, backend=backend)
    for t in (q, k, v):
        assert t.shape == (total, heads, head_dim) and t.is_contiguous() and t.dtype == dtype
    grads = [torch.randn_like(t) for t in (q, k, v)]
    (dqkv,) = torch.autograd.grad((q, k, v), qkv, grads)

    # The two-step composition: split, then rope_2d_qk of the torch backend.
    qkv2 = qkv.detach().clone().requires_grad_(True)
    q2, k2, v2 = qkv2.view(total, 3, heads, head_dim).unbind(1)
    q2, k2 = rope_2d_qk(q2, k2, pos, theta, backend="torch")
    (dqkv2,) = torch.autograd.grad((q2, k2, v2), qkv2, grads)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(q, q2, rtol=0, atol=tol)
    torch.testing.assert_close(k, k2, rtol=0, atol=tol)
    assert torch.equal(v, v2)
    torch.testing.assert_close(dqkv, dqkv2, rtol=0, atol=tol)
    assert torch.equal(dqkv.view(total, 3, heads, head_dim)[:, 2], grads[2])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grid,heads,head_dim,dtype", [("pack", 3, 72, torch.float32), ("7x13", 2, 64, torch.float16)])
def test_qkv_split_rope_cpu(backend, grid, heads, head_dim, dtype, poisoned):
    check_qkv_split(backend, "cpu", GRIDS[grid], heads, head_dim, dtype)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("head_dim,dtype", [(d, torch.bfloat16) for d in (64, 72, 80, 96, 128)]
                         + [(80, torch.float32)])
def test_qkv_split_rope_gpu(backend, head_dim, dtype, poisoned):
    check_qkv_split(backend, "cuda", GRIDS["pack"] + GRIDS["37x29"], 16, head_dim, dtype)


def check_inplace(backend, device, dtype):
    pos = positions(GRIDS["pack"]).to(device)
    total = pos.shape[0]
    q = padded_randn(total, 5, 80, dtype, device)
    k = torch.randn(total, 5, 80, dtype=dtype, device=device)
    q_expected, k_expected = rope_2d_qk(q, k, pos, backend=backend)
    q_in, k_in = q.clone(), k.clone()
    q_ret, k_ret = rope_2d_qk(q_in, k_in, pos, backend=backend, inplace=True)
    assert q_ret.data_ptr() == q_in.data_ptr() and k_ret.data_ptr() == k_in.data_ptr()
    assert torch.equal(q_in, q_expected) and torch.equal(k_in, k_expected)
    x_in = q.clone()  # a strided view of a padded buffer: the kernel writes only inside it
    buf = torch.full((total, 6, 96), float("nan"), dtype=dtype, device=device)
    x_view = buf[:, :5, 8:88]
    x_view.copy_(x_in)
    assert rope_2d(x_view, pos, backend=backend, inplace=True) is x_view
    assert torch.equal(x_view, q_expected)
    assert torch.isnan(buf[:, 5]).all() and torch.isnan(buf[:, :, :8]).all() and torch.isnan(buf[:, :, 88:]).all()

    # Gradients flow through the in-place op on a non-leaf tensor: the backward needs only pos.
    leaf = torch.randn(total, 5, 80, dtype=dtype, device=device, requires_grad=True)
    y = rope_2d(leaf * 1, pos, backend=backend, inplace=True)
    dy = torch.randn_like(y)
    (dleaf,) = torch.autograd.grad(y, leaf, dy)
    torch.testing.assert_close(dleaf, rope_2d_ref(dy, pos, inverse=True), rtol=0, atol=ATOL[dtype] * 10)


@pytest.mark.parametrize("backend", cpu_backends())
def test_inplace_cpu(backend):
    check_inplace(backend, "cpu", torch.float32)


@pytest.mark.parametrize("backend", gpu_backends())
def test_inplace_gpu(backend):
    check_inplace(backend, "cuda", torch.bfloat16)


@pytest.mark.parametrize("backend", cpu_backends())
def test_inplace_refuses_targets_that_share_memory(backend):
    """In place, an expanded tensor (heads sharing memory) and one tensor passed as both q and k are refused: the
    C++ and Triton kernels rotated the shared elements several times (on a GPU, a race), where the torch backend's
    copy_ raised."""
    pos = positions(GRIDS["pack"])
    x = torch.randn(pos.shape[0], 1, 16).expand(-1, 3, -1)
    with pytest.raises(ValueError, match="x has elements that share memory"):
        rope_2d(x, pos, backend=backend, inplace=True)
    q = torch.randn(pos.shape[0], 2, 16)
    with pytest.raises(ValueError, match="q and k are the same memory"):
        rope_2d_qk(q, q, pos, backend=backend, inplace=True)
    q_out, k_out = rope_2d_qk(q, q, pos, backend=backend)  # out of place, the same tensor twice is fine
    torch.testing.assert_close(q_out, k_out)
    # partly overlapping views of one buffer (heads 0-1 and 1-2): head 1 would be rotated twice
    buf = torch.randn(pos.shape[0], 3, 16)
    with pytest.raises(ValueError, match="q and k are the same memory or overlap"):
        rope_2d_qk(buf[:, 0:2], buf[:, 1:3], pos, backend=backend, inplace=True)
    # views of other layouts whose ranges intersect (both hold head 0): undecided, refused (it was rotated twice)
    buf = torch.randn(pos.shape[0], 4, 16)
    with pytest.raises(ValueError, match="whether they share an element was not decided"):
        rope_2d_qk(buf[:, 0:2], buf[:, ::2], pos, backend=backend, inplace=True)
    # q and k sliced from one qkv buffer interleave but share no element: rotated in place like copies
    qkv = torch.randn(pos.shape[0], 3, 2, 16)
    expected = rope_2d_qk(qkv[:, 0].clone(), qkv[:, 1].clone(), pos, backend="torch")
    v = qkv[:, 2].clone()
    rope_2d_qk(qkv[:, 0], qkv[:, 1], pos, backend=backend, inplace=True)
    for got, want in zip((qkv[:, 0], qkv[:, 1], qkv[:, 2]), (*expected, v), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_views_overlap_against_enumeration():
    """The in-place check's overlap test against the sets of element offsets, for random views of one storage
    (same shape and strides: exact; other layouts: an answer only where the ranges are apart)."""
    import itertools
    import random

    from fineviti.ops.rope import _views_overlap

    def offsets(t):
        return {t.storage_offset() + sum(i * st for i, st in zip(idx, t.stride(), strict=True))
                for idx in itertools.product(*[range(n) for n in t.shape])}

    rng = random.Random(0)
    base = torch.zeros(512)
    for _ in range(500):
        shape = [rng.randint(1, 5) for _ in range(rng.randint(1, 4))]
        strides = [rng.randint(0, 12) for _ in shape]
        a = base.as_strided(shape, strides, rng.randint(0, 80))
        b = base.as_strided(shape, strides, rng.randint(0, 80))
        assert _views_overlap(a, b) == bool(offsets(a) & offsets(b)), (shape, strides)
        other = base.as_strided([rng.randint(1, 4)], [rng.randint(1, 5)], rng.randint(0, 200))
        answer = _views_overlap(a, other)
        assert answer is None or answer == bool(offsets(a) & offsets(other)), (shape, strides, other.stride())
    assert _views_overlap(torch.zeros(4), torch.zeros(4)) is False  # two storages
    q = torch.zeros(6, 1, 8)  # a size-1 dim's stride does not matter: the same memory is found
    assert _views_overlap(q, q.as_strided(q.shape, (8, 99, 1))) is True


def test_int64_and_strided_positions():
    pos32 = positions(GRIDS["pack"])
    pos64 = pos32.long().T.contiguous().T  # int64 with strides (1, total): columns apart
    pos_rows = torch.zeros(pos32.shape[0], 5, dtype=torch.int32)[:, 1:3]  # a slice of a wider table
    pos_rows.copy_(pos32)
    assert not pos64.is_contiguous() and not pos_rows.is_contiguous()
    x = torch.randn(pos32.shape[0], 2, 32)
    backends = ["torch"] + (["triton"] if INTERPRET else []) + (["cpp"] if CPP_BUILT else [])
    for backend in backends:
        want = rope_2d(x, pos32, backend=backend)
        assert torch.equal(rope_2d(x, pos64, backend=backend), want), backend
        assert torch.equal(rope_2d(x, pos_rows, backend=backend), want), backend


@pytest.mark.parametrize("backend", cpu_backends())
def test_second_derivatives(backend):
    """create_graph=True through the rotation: the cpp ops have no autograd of their own, and the backward that
    called them gave second derivatives of 0 with a warning; it now rotates through the Function again."""
    pos = positions(GRIDS["7x13"])
    x = torch.randn(pos.shape[0], 3, 24, dtype=torch.float32, requires_grad=True)
    w = torch.randn_like(x)
    (gx,) = torch.autograd.grad((rope_2d(x, pos, backend=backend) * w).square().sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    (gx_ref,) = torch.autograd.grad((rope_2d_ref(x, pos) * w).square().sum(), x, create_graph=True)
    (ggx_ref,) = torch.autograd.grad(gx_ref.sum(), x)
    torch.testing.assert_close(ggx, ggx_ref, rtol=1e-4, atol=1e-4)
    qkv = torch.randn(pos.shape[0], 3 * 2 * 8, requires_grad=True)
    q, k, _ = qkv_split_rope(qkv, pos, 2, backend=backend)
    (g,) = torch.autograd.grad((q * k).sum(), qkv, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), qkv)
    q_ref, k_ref, _ = (t.reshape(pos.shape[0], 2, 8) for t in qkv.view(pos.shape[0], 3, 16).unbind(1))
    (g_ref,) = torch.autograd.grad((rope_2d_ref(q_ref, pos) * rope_2d_ref(k_ref, pos)).sum(), qkv, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.square().sum(), qkv)
    torch.testing.assert_close(gg, gg_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("create_graph", [False, True], ids=["first", "create_graph"])
def test_qkv_split_rope_backward_of_no_tokens(backend, create_graph):
    """0 tokens (an empty pack): the backward's .view(0, -1) could not infer the width (torch and cpp; triton too
    with create_graph=True); the gradient is an empty (0, 3 * heads * head_dim) tensor."""
    qkv = torch.randn(0, 3 * 2 * 8, requires_grad=True)
    q, k, v = qkv_split_rope(qkv, torch.zeros(0, 2, dtype=torch.long), 2, backend=backend)
    assert q.shape == k.shape == v.shape == (0, 2, 8)
    (g,) = torch.autograd.grad(q.sum() + k.sum() + v.sum(), qkv, create_graph=create_graph)
    assert g.shape == qkv.shape


@pytest.mark.parametrize("backend", cpu_backends())
def test_inplace_on_views_with_gradients(backend):
    """In place on views of a tensor that autograd tracks (q and k sliced from a qkv activation): autograd's view
    handling failed (an internal assert, or "cannot return more than one Tensor") before."""
    pos = positions(GRIDS["pack"])
    leaf = torch.randn(pos.shape[0], 3, 2, 16, requires_grad=True)
    base = leaf * 1
    rope_2d(base[:, 2], pos, backend=backend, inplace=True)
    q, k = rope_2d_qk(base[:, 0], base[:, 1], pos, backend=backend, inplace=True)
    assert q.data_ptr() == base[:, 0].data_ptr()
    w = torch.randn_like(base)
    (got,) = torch.autograd.grad((base * w).sum(), leaf)
    ref = torch.stack([rope_2d_ref(leaf[:, i], pos) for i in range(3)], dim=1)
    (want,) = torch.autograd.grad((ref * w).sum(), leaf)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_heads_and_bad_theta(backend):
    pos = positions(GRIDS["7x13"])
    assert rope_2d(torch.randn(pos.shape[0], 0, 8), pos, backend=backend).shape == (pos.shape[0], 0, 8)
    x = torch.randn(pos.shape[0], 2, 8)
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e39, "abc", None, True):
        with pytest.raises(ValueError, match=f"theta must be a finite number > 0.*, got {re.escape(repr(bad))}"):
            rope_2d(x, pos, theta=bad, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_outputs_are_fresh_contiguous_tensors(backend):
    """Out of place, every backend returns contiguous tensors of its own: the torch backend returned x's layout for
    a transposed x, and qkv_split_rope's v for one token (a 1x1 image) was a view of qkv, so an in-place op on v
    changed qkv (and autograd refused it)."""
    pos = positions(GRIDS["1x1"])
    qkv = torch.randn(1, 3 * 2 * 8, requires_grad=True)
    q, k, v = qkv_split_rope(qkv, pos, 2, backend=backend)
    assert v.untyped_storage().data_ptr() != qkv.untyped_storage().data_ptr()
    before = qkv.detach().clone()
    v.mul_(0)
    torch.testing.assert_close(qkv.detach(), before, rtol=0, atol=0)
    (q.sum() + k.sum() + v.sum()).backward()
    assert qkv.grad is not None
    pos = positions(GRIDS["7x13"])
    x = torch.randn(8, 2, pos.shape[0]).permute(2, 1, 0)  # (total, heads, head_dim), last stride not 1
    assert rope_2d(x, pos, backend=backend).is_contiguous()


def design_formula_fp64(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """DESIGN.md's rope_2d, element by element in Python floats (fp64), written apart from rope_2d_ref (which is
    also the torch backend, so the backends' tests alone would compare it with itself): head_dim / 4 frequencies
    theta ** (-2i / (head_dim / 2)), row angles then column angles, repeated twice, x * cos + rotate_half(x) * sin."""
    import math

    total, heads, head_dim = x.shape
    half, quarter = head_dim // 2, head_dim // 4
    xs, out = x.double().tolist(), torch.empty(x.shape, dtype=torch.float64)
    for t in range(total):
        row, col = (int(v) for v in pos[t])
        for h in range(heads):
            for j in range(head_dim):
                f = j % half
                coord, i = (row, f) if f < quarter else (col, f - quarter)
                angle = coord * theta ** (-2 * i / half)
                partner = -xs[t][h][j + half] if j < half else xs[t][h][j - half]
                out[t, h, j] = xs[t][h][j] * math.cos(angle) + partner * math.sin(angle)
    return out


@pytest.mark.parametrize("backend", cpu_backends())
def test_every_backend_against_designs_formula(backend):
    pos = torch.tensor([[0, 0], [3, 1], [0, 7], [12, 5], [40, 2]], dtype=torch.int32)
    for head_dim, theta in ((4, 10000.0), (12, 100.0), (20, 1e6), (64, 10000.0)):
        x = torch.randn(pos.shape[0], 2, head_dim, dtype=torch.float32)
        want = design_formula_fp64(x, pos, theta)
        got = rope_2d(x, pos, theta=theta, backend=backend).double()
        assert (got - want).abs().max() < 2e-5, (head_dim, theta, (got - want).abs().max())


def test_backends_agree_with_each_other():
    pos = positions(GRIDS["pack"])
    x = torch.randn(pos.shape[0], 4, 72)
    outs = {b: rope_2d(x, pos, backend=b) for b in ["torch"] + (["triton"] if INTERPRET else [])
            + (["cpp"] if CPP_BUILT else [])}
    for backend, out in outs.items():
        torch.testing.assert_close(out, outs["torch"], rtol=0, atol=2e-5, msg=backend)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs and backend selection


@pytest.mark.parametrize("backend", cpu_backends())
def test_bad_inputs(backend):
    pos = positions([(3, 4)])
    x = torch.randn(12, 2, 16)
    with pytest.raises(ValueError, match="divisible by 4.*head_dim=18"):
        rope_2d(torch.randn(12, 2, 18), pos, backend=backend)
    with pytest.raises(TypeError, match="pos must be int32 or int64.*float32"):
        rope_2d(x, pos.float(), backend=backend)
    with pytest.raises(ValueError, match="pos has 11 rows but the input has 12 tokens"):
        rope_2d(x, pos[:11], backend=backend)
    with pytest.raises(ValueError, match=r"pos must have shape \(total, 2\).*\(12, 3\)"):
        rope_2d(x, torch.zeros(12, 3, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match=r"x must have shape \(total, heads, head_dim\)"):
        rope_2d(torch.randn(12, 16), pos, backend=backend)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16.*float64"):
        rope_2d(x.double(), pos, backend=backend)
    bad = pos.clone()
    bad[5, 1] = -3
    with pytest.raises(ValueError, match=r"non-negative.*pos\[5, 1\]=-3"):
        rope_2d(x, bad, backend=backend)
    with pytest.raises(ValueError, match=r"non-negative.*pos\[5, 1\]=-3"):
        rope_2d_qk(x, x, bad, backend=backend)
    with pytest.raises(ValueError, match=r"non-negative.*pos\[5, 1\]=-3"):
        qkv_split_rope(torch.randn(12, 96), bad, 2, backend=backend)
    # Value checks can be turned off explicitly (they are what costs a synchronisation on a GPU).
    rope_2d(x, bad, backend=backend, check_values=False)
    with pytest.raises(ValueError, match="same shape, dtype and device"):
        rope_2d_qk(x, torch.randn(12, 3, 16), pos, backend=backend)
    with pytest.raises(ValueError, match="heads must be a positive int dividing.*heads=5"):
        qkv_split_rope(torch.randn(12, 96), pos, 5, backend=backend)
    with pytest.raises(ValueError, match="divisible by 4.*head_dim=6"):
        qkv_split_rope(torch.randn(12, 36), pos, 2, backend=backend)


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(rope_mod.BACKEND_ENV, raising=False)
    assert rope_mod.resolve_backend("auto", cpu) == ("cpp" if CPP_BUILT else "torch")
    assert rope_mod.resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.setenv(rope_mod.BACKEND_ENV, "torch")
    assert rope_mod.resolve_backend("auto", cpu) == "torch"
    assert rope_mod.resolve_backend("triton", torch.device("cuda")) == "triton"  # an explicit choice wins
    monkeypatch.setenv(rope_mod.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="FINEVITI_ROPE_BACKEND='fast'"):
        rope_mod.resolve_backend("auto", cpu)
    monkeypatch.delenv(rope_mod.BACKEND_ENV)
    with pytest.raises(ValueError, match="backend must be one of.*'flash'"):
        rope_2d(torch.randn(4, 1, 8), positions([(2, 2)]), backend="flash")
    with pytest.raises((ValueError, RuntimeError),
                       match="backend='cuda' needs CUDA tensors|needs the compiled extension"):
        rope_2d(torch.randn(4, 1, 8), positions([(2, 2)]), backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        rope_mod.resolve_backend("triton", cpu)


@pytest.mark.skipif(CPP_BUILT, reason="the extension is built here")
def test_cpp_backend_without_extension_says_how_to_build():
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        rope_2d(torch.randn(4, 1, 8), positions([(2, 2)]), backend="cpp")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_value_checks_opt_in_on_gpu(backend, monkeypatch):
    if backend == "cuda" and not CPP_BUILT:
        pytest.skip("fineviti._C with the rope ops is not built")
    monkeypatch.delenv("FINEVITI_CHECKS", raising=False)
    pos = positions([(3, 4)]).cuda()
    pos[2, 0] = -1
    x = torch.randn(12, 2, 16, device="cuda")
    rope_2d(x, pos, backend=backend)  # unchecked by default on a GPU: no synchronisation
    with pytest.raises(ValueError, match=r"non-negative.*pos\[2, 0\]=-1"):
        rope_2d(x, pos, backend=backend, check_values=True)
    monkeypatch.setenv("FINEVITI_CHECKS", "1")
    with pytest.raises(ValueError, match=r"non-negative.*pos\[2, 0\]=-1"):
        rope_2d(x, pos, backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile


def triton_or_skip():
    if not (INTERPRET or CUDA):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")


def test_custom_ops_opcheck():
    triton_or_skip()
    pos = positions([(3, 5)]).to(DEVICE)
    x = torch.randn(15, 2, 16, device=DEVICE)
    k = torch.randn(15, 2, 16, device=DEVICE)
    ops = torch.ops.fineviti
    cases = [
        (ops.rope_2d_triton.default, (x, pos, 100.0, False, True)),
        (ops.rope_2d_qk_triton.default, (x, k, pos, 100.0, True, False)),
        (ops.rope_2d_triton_.default, (x.clone(), pos, 100.0, False, False)),
        (ops.rope_2d_qk_triton_.default, (x.clone(), k.clone(), pos, 100.0, False, False)),
        (ops.qkv_split_rope_triton.default, (torch.randn(15, 96, device=DEVICE), pos, 2, 100.0, False)),
        (ops.qkv_split_rope_triton_bwd.default, (x, k, x * 2, pos, 100.0)),
    ]
    if CPP_BUILT:
        xc, kc, posc = x.cpu(), k.cpu(), pos.cpu()
        cases += [(ops.rope_2d.default, (xc, posc, 100.0, False, True)),
                  (ops.rope_2d_qk.default, (xc, kc, posc, 100.0, True, False)),
                  (ops.rope_2d_.default, (xc.clone(), posc, 100.0, False, False))]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["triton", "torch", "cpp"])
def test_torch_compile_fullgraph(backend):
    if backend == "triton":
        triton_or_skip()
    if backend == "cpp" and not CPP_BUILT:
        pytest.skip("fineviti._C with the rope ops is not built")
    device = "cpu" if backend == "cpp" else DEVICE
    torch._dynamo.reset()
    pos = positions(GRIDS["pack"]).to(device)
    total, heads, head_dim = pos.shape[0], 2, 24
    qkv = torch.randn(total, 3 * heads * head_dim, device=device, requires_grad=True)
    x = torch.randn(total, heads, head_dim, device=device, requires_grad=True)

    def block(qkv, x, pos):
        q, k, v = qkv_split_rope(qkv, pos, heads, 500.0, backend=backend, check_values=False)
        q2, k2 = rope_2d_qk(q * 2, k, pos, 500.0, backend=backend, check_values=False)
        y = rope_2d(x, pos, theta=500.0, backend=backend, check_values=False)
        y = rope_2d(y * 1, pos, theta=500.0, backend=backend, inplace=True, check_values=False)
        return (q2 * k2 + v).sum() + y.square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss_c = compiled(qkv, x, pos)
    if backend != "torch" and device == "cpu":
        # the default check runs inside the cpp and triton ops, where the tracer does not look: no graph break
        # (negative positions went through compiled, where eager refuses them)
        torch._dynamo.reset()
        checked = torch.compile(lambda x, pos: rope_2d(x, pos, theta=500.0, backend=backend), fullgraph=True,
                                backend="aot_eager")
        assert checked(x, pos).shape == x.shape
        with pytest.raises(ValueError, match="positions must be non-negative"):
            checked(x, pos - 1)
    grads_c = torch.autograd.grad(loss_c, (qkv, x))
    loss_e = block(qkv, x, pos)
    grads_e = torch.autograd.grad(loss_e, (qkv, x))
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge)


# ---------------------------------------------------------------------------------------------------------------
# The shipped Triton configurations: run under the interpreter, compiled for sm_90 without spills


def test_shipped_configs_run_in_interpreter():
    """Every shipped (head dim, variant, pos dtype) at its shipped block sizes, 16 heads, on a ragged 5-token input
    (fp16)."""
    triton_or_skip()
    from fineviti.kernels import registry
    from fineviti.kernels import rope as kernels

    pos_types = {"*i32": torch.int32, "*i64": torch.int64}
    for row in registry.shipped("rope_2d"):
        if row.signature["q_ptr"] != "*fp16":
            continue
        pos = torch.tensor([[0, 0], [3, 1], [0, 7], [12, 5], [2, 2]], dtype=pos_types[row.signature["pos_ptr"]],
                           device=DEVICE)
        c = row.constexprs
        head_dim, heads = c["HEAD_DIM"], kernels.SHIPPED_HEADS
        config = kernels.launch_config(head_dim, heads)
        assert {k: config[k] for k in ("HALF_PAD", "BLOCK_T", "BLOCK_H")} == {
            k: c[k] for k in ("HALF_PAD", "BLOCK_T", "BLOCK_H")}, row.label
        ins = [padded_randn(5, heads, head_dim, torch.float16, DEVICE) for _ in range(3)]
        outs = [torch.full((5, heads, head_dim), float("nan"), dtype=torch.float16, device=DEVICE) for _ in range(3)]
        kernels.launch(ins[0], ins[1] if c["HAS_K"] else None, ins[2] if c["HAS_V"] else None, outs[0],
                       outs[1] if c["HAS_K"] else None, outs[2] if c["HAS_V"] else None, pos, 10000.0, c["INVERSE"])
        for i, (x, out) in enumerate(zip(ins, outs, strict=True)):
            if i == 1 and not c["HAS_K"] or i == 2 and not c["HAS_V"]:
                assert torch.isnan(out).all(), row.label
                continue
            expected = x if i == 2 else rope_2d_ref(x, pos, inverse=c["INVERSE"])
            torch.testing.assert_close(out, expected, rtol=0, atol=2e-3, msg=row.label)


SM90_CHECK = textwrap.dedent("""
    import json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fineviti.kernels import registry
    labels = json.loads(sys.argv[1])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    for row in registry.shipped("rope_2d"):
        if labels and row.label not in labels:
            continue
        # registry.compile_attrs: the run-time specialisation each row declares (aligned pointers and strides).
        signature, constexprs, attrs = row.signature, row.constexprs, registry.compile_attrs(row)
        kernel = triton.compile(ASTSource(fn=row.fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": row.num_warps, "num_stages": row.num_stages})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
        os.unlink(f.name)
        spills = [int(a) + int(b)
                  for a, b in re.findall(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", report)]
        regs = int(re.search(r"Used (\\d+) registers", report).group(1))
        wide = len(re.findall(r"ld\\.global(?:\\.nc)?\\.v[24]\\.b32", kernel.asm["ptx"]))
        print(json.dumps({"label": row.label, "spills": sum(spills), "regs": regs, "vector_loads": wide}))
""")


def compile_for_sm90(labels):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SM90_CHECK, __import__("json").dumps(labels)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def check_sm90_rows(rows, expected_count):
    assert len(rows) == expected_count
    for row in rows:
        assert row["spills"] == 0, row
        assert row["regs"] <= 255, row
        assert row["vector_loads"] > 0, f"no vectorised loads: {row}"


def test_shipped_configs_compile_for_sm90_sample():
    labels = ["qk_fwd d128 bf16 h16", "qkv_fwd d72 bf16 h16", "x_bwd d80 fp16 h16", "qkv_bwd d96 bf16 h16 pos64"]
    check_sm90_rows(compile_for_sm90(labels), len(labels))


@pytest.mark.slow
def test_shipped_configs_compile_for_sm90_all():
    from fineviti.kernels import registry

    check_sm90_rows(compile_for_sm90([]), len(registry.shipped("rope_2d")))

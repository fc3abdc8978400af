"""varlen_attention: every backend against an fp64 reference, awkward packs, bad inputs, dispatch, compile."""

import itertools
import math
import re
import sys
import types

import pytest
import torch

from fineviti.kernels import registry
from fineviti.kernels import varlen_attention as kernels
from fineviti.ops import attention as attention_mod
from fineviti.ops import varlen_attention, varlen_attention_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def make_pack(lens, heads, head_dim, dtype, device=DEVICE, requires_grad=True):
    total = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    q, k, v = (torch.randn(total, heads, head_dim, device=device, dtype=torch.float32).to(dtype)
               .requires_grad_(requires_grad) for _ in range(3))
    return q, k, v, cu


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_against_reference(lens, heads, head_dim, dtype, backend="triton", atol=None, deterministic=False):
    q, k, v, cu = make_pack(lens, heads, head_dim, dtype)
    out = varlen_attention(q, k, v, cu, max(lens), backend=backend, deterministic=deterministic)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref64 = varlen_attention_ref(*leaves64, cu)
    grads64 = torch.autograd.grad(ref64, leaves64, grad_out.double())

    leaves_same = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_same = varlen_attention_ref(*leaves_same, cu, upcast=False)
    grads_same = torch.autograd.grad(ref_same, leaves_same, grad_out)

    atol = atol if atol is not None else (1e-5 if dtype == torch.float32 else 2e-3)
    for name, ours, same, exact in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_same, *grads_same),
                                       (ref64, *grads64), strict=True):
        assert torch.isfinite(ours).all(), f"{name} has non-finite values"
        err = (ours.double() - exact).abs().max().item()
        budget = 2 * (same.double() - exact).abs().max().item() + atol
        assert err <= budget, f"{name}: max error {err:.3e} > budget {budget:.3e} (lens={lens}, d={head_dim})"


# Reduced matrix for CI: every head dim (and 256) in both dtypes, 1-4 heads, lengths 1, 3 and 17 in each case and
# the long ones (64, 197, 257, 577) spread over them, 577 once alone and once in a mix; the full product is under
# -m slow.
CASES = [
    (32, torch.float32, 1, [1, 3, 197]),
    (64, torch.float16, 2, [3, 17, 257, 1]),
    (72, torch.float32, 3, [17, 1, 3]),
    (80, torch.float16, 1, [197, 3, 1]),
    (96, torch.float32, 2, [1, 17, 3, 64]),
    (128, torch.float16, 4, [3, 1, 17]),
    (64, torch.float32, 1, [577]),
    (32, torch.float16, 3, [17, 1, 3, 64]),
    (72, torch.float16, 2, [3, 17, 1, 257]),
    (80, torch.float32, 4, [1, 3, 17]),
    (96, torch.float16, 3, [17, 3, 1]),
    (128, torch.float32, 1, [1, 17, 3, 197]),
    (256, torch.float16, 1, [1, 3, 17, 64]),
    (256, torch.float32, 2, [17, 1, 3]),
    (64, torch.float16, 1, [577, 1, 17, 3]),
]


@pytest.mark.parametrize("head_dim,dtype,heads,lens", CASES)
def test_triton_matches_reference(head_dim, dtype, heads, lens):
    check_against_reference(lens, heads, head_dim, dtype)  # the default backward (atomic dq at 80 and 128)


@pytest.mark.parametrize("head_dim,dtype,heads,lens", [CASES[1], CASES[2], CASES[5]])
def test_triton_deterministic_backward_matches_reference(head_dim, dtype, heads, lens):
    check_against_reference(lens, heads, head_dim, dtype, deterministic=True)  # dq in its own kernel


@pytest.mark.parametrize("head_dim,dtype,heads,lens", [CASES[3], CASES[4]])
def test_pieces_split_mode_matches_reference(monkeypatch, head_dim, dtype, heads, lens):
    """FINEVITI_ATTN_SPLIT=pieces (opt-in since masked became the default): 80 = 64 + 16 and 96 = 64 + 32 in two
    power-of-two pieces, both backwards."""
    monkeypatch.setenv("FINEVITI_ATTN_SPLIT", "pieces")
    assert kernels.split_head_dim(head_dim)[1] > 0
    check_against_reference(lens, heads, head_dim, dtype)
    check_against_reference(lens, heads, head_dim, dtype, deterministic=True)


def test_split_head_dims_padded_path(monkeypatch):
    # The zero-padding to a power of two that CUDA tensors take at head dims that run in two pieces, on the CPU.
    monkeypatch.delenv("FINEVITI_ATTN_SPLIT", raising=False)
    monkeypatch.setattr(attention_mod, "PAD_SPLIT_HEAD_DIMS_ON", ("cuda", "cpu"))
    q = torch.empty(2, 1, 80)
    assert attention_mod.triton_padded_head_dim(80, q) == 80  # the default split mode, masked: nothing to pad
    assert attention_mod.triton_padded_head_dim(80, q, "pieces") == 128
    assert attention_mod.triton_padded_head_dim(64, q) == 64
    seen = []
    original = attention_mod._triton_fwd

    def spy(q, *args):
        seen.append(q.shape[-1])
        return original(q, *args)

    monkeypatch.setattr(attention_mod, "_triton_fwd", spy)
    check_against_reference([1, 70, 3], 2, 72, torch.float16)
    assert seen == [128]  # the kernels ran at the padded width
    monkeypatch.setenv("FINEVITI_ATTN_PAD_SPLIT", "0")
    check_against_reference([1, 7], 1, 72, torch.float16)
    assert seen == [128, 72]


@pytest.mark.parametrize("deterministic", [False, True])
def test_masked_split_mode(monkeypatch, deterministic):
    """Split mode "masked", the default: 80 and 96 run in one 128-column tile, the columns past head_dim loaded
    as zeros and never stored, with no padded copies (the ops layer keeps the true width, also where it would pad);
    72 (no multiple of 16) stays in pieces. Outputs and gradients against the references, q/k/v in NaN-padded
    storage; the non-deterministic backward takes the atomic dq there (one power-of-two tile)."""
    monkeypatch.delenv("FINEVITI_ATTN_SPLIT", raising=False)
    assert kernels.split_mode() == "masked"
    monkeypatch.delenv("FINEVITI_ATTN_DQ", raising=False)
    assert kernels.split_head_dim(80) == kernels.split_head_dim(96) == (128, 0)
    assert kernels.split_head_dim(72) == (64, 16) and kernels.split_head_dim(64) == (64, 0)
    assert kernels.atomic_dq_supported(80, torch.float16, 130) and not kernels.atomic_dq_supported(72, torch.float16)
    monkeypatch.setattr(attention_mod, "PAD_SPLIT_HEAD_DIMS_ON", ("cuda", "cpu"))
    q = torch.empty(2, 1, 80)
    assert attention_mod.triton_padded_head_dim(80, q) == 80  # no copies at 80
    assert attention_mod.triton_padded_head_dim(72, q[..., :72]) == 128  # 72: pieces, zero-padded where padding is on
    widths = []
    original = kernels.attention_forward

    def spy(q, *args, **kwargs):
        widths.append((q.shape[-1], kernels.split_head_dim(q.shape[-1], q.dtype)))
        return original(q, *args, **kwargs)

    monkeypatch.setattr(kernels, "attention_forward", spy)
    plain = make_pack

    def nan_guarded(lens, heads, head_dim, dtype, **kwargs):
        """q, k, v as views of storage whose columns past head_dim (up to 128 and beyond) hold NaN: a load of a
        masked column shows in every output."""
        out = []
        for t in plain(lens, heads, head_dim, dtype, requires_grad=False)[:3]:
            buf = torch.full((t.shape[0], heads, 144), float("nan"), dtype=dtype)
            out.append(buf[..., :head_dim].copy_(t).requires_grad_())
        return (*out, plain(lens, heads, head_dim, dtype)[3])

    monkeypatch.setattr(sys.modules[__name__], "make_pack", nan_guarded)
    modes = []
    dq_mode = kernels.dq_mode
    monkeypatch.setattr(kernels, "dq_mode", lambda *args: modes.append(dq_mode(*args)) or modes[-1])
    for head_dim in (80, 96):
        check_against_reference([1, 130, 3, 67], 2, head_dim, torch.float16, deterministic=deterministic)
    check_against_reference([1, 5, 60], 1, 80, torch.float16, deterministic=deterministic)  # the short bucket
    # every other multiple of 16 takes the mode too: 48 in 64 columns (the separate dq, as at 64), 112 in 128
    check_against_reference([1, 70, 3], 1, 48, torch.float16, deterministic=deterministic)
    check_against_reference([1, 70, 3], 1, 112, torch.float16, deterministic=deterministic)
    assert widths == [(80, (128, 0)), (96, (128, 0)), (80, (128, 0)), (48, (64, 0)), (112, (128, 0))]
    # the atomic dq where sequences span several key blocks, as at 128; the separate kernel otherwise
    assert modes == (["separate"] * 5 if deterministic else ["atomic", "atomic", "separate", "separate", "atomic"])


def test_backward_keeps_its_forwards_split_mode(monkeypatch):
    """The split mode is read once per forward: a change of FINEVITI_ATTN_SPLIT before the backward runs applies
    to the next forward, not to this backward (both modes compute the same gradients, but a GPU would otherwise run
    kernels the forward's padding rule kept away)."""
    modes = []
    original = kernels.attention_backward

    def spy(*args, mode=None, **kwargs):
        modes.append(mode)
        return original(*args, mode=mode, **kwargs)

    monkeypatch.setattr(kernels, "attention_backward", spy)
    for first, second in (("masked", "pieces"), ("pieces", "masked")):
        monkeypatch.setenv("FINEVITI_ATTN_SPLIT", first)
        q, k, v, cu = make_pack([1, 130, 3], 1, 80, torch.float16)
        out = varlen_attention(q, k, v, cu, 130, backend="triton")
        monkeypatch.setenv("FINEVITI_ATTN_SPLIT", second)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert all(torch.isfinite(g).all() for g in grads)
    assert modes == ["masked", "pieces"]


def test_split_mode_must_be_known(monkeypatch):
    monkeypatch.setenv("FINEVITI_ATTN_SPLIT", "padded")
    with pytest.raises(ValueError, match="FINEVITI_ATTN_SPLIT must be one of .* got 'padded'"):
        kernels.split_head_dim(80)


def _backward_spy(monkeypatch):
    calls = []
    original = kernels.attention_backward

    def spy(*args, deterministic=False, **kwargs):
        q = args[1]
        calls.append(kernels.dq_mode(deterministic, q.shape[-1], q.dtype, max(args[8], args[9])))
        return original(*args, deterministic=deterministic, **kwargs)

    monkeypatch.setattr(kernels, "attention_backward", spy)
    return calls


def test_deterministic_reaches_the_backward(monkeypatch):
    monkeypatch.delenv("FINEVITI_ATTN_DQ", raising=False)
    calls = _backward_spy(monkeypatch)
    q, k, v, cu = make_pack([5, 70], 1, 128, torch.float16)
    for det in (False, True):
        out = varlen_attention(q, k, v, cu, 70, backend="triton", deterministic=det)
        torch.autograd.grad(out.sum(), (q, k, v))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = varlen_attention(q, k, v, cu, 70, backend="triton")
        torch.autograd.grad(out.sum(), (q, k, v))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert calls == [kernels.DEFAULT_DQ_MODE, "separate", "separate"] and kernels.DEFAULT_DQ_MODE == "atomic"


def test_atomic_dq_ignores_key_rows_past_the_sequence():
    # Every score of a query far below its row's others: exp(-lse) overflows fp16 on the padding rows of the last
    # key block, which must add nothing to dq (they did: NaN through inf * 0).
    # (70 keys: one 128-row key block with 58 padding rows; max_seqlen > 64, so the default uses the atomic dq)
    assert kernels.dq_mode(False, 128, torch.float16, 70) == "atomic"
    q = 4 * torch.randn(1, 1, 128) + 0.01 * torch.randn(71, 1, 128)
    k = -1.5 * q
    q, k, v = (t.to(torch.float16).requires_grad_() for t in (q, k, torch.randn(71, 1, 128)))
    cu = torch.tensor([0, 1, 71], dtype=torch.int32)
    grads = {}
    for det in (False, True):
        out = varlen_attention(q, k, v, cu, 70, backend="triton", deterministic=det)
        grads[det] = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for atomic, separate in zip(grads[False], grads[True], strict=True):
        assert torch.isfinite(atomic).all()
        assert torch.allclose(atomic.float(), separate.float(), atol=1e-3, rtol=1e-2)


def test_atomic_dq_at_64_on_request(monkeypatch):
    """FINEVITI_ATTN_DQ=atomic takes the atomic dq at head dim 64 too (the default there is the separate kernel):
    outputs and gradients against the references, at its pinned tile and at the 128-key tile the sweep tries."""
    monkeypatch.setenv("FINEVITI_ATTN_DQ", "atomic")
    calls = _backward_spy(monkeypatch)
    check_against_reference([1, 130, 3, 67], 2, 64, torch.float16)
    monkeypatch.setenv("FINEVITI_ATTN_DKDV_ATOMIC_CONFIG", "64,128,8,2")
    check_against_reference([200, 1, 17], 1, 64, torch.float16)
    assert calls == ["atomic", "atomic"]
    assert kernels.pick_config("dkdv_atomic", 64, torch.bfloat16, 4096) != kernels.pick_config(
        "dkdv", 64, torch.bfloat16, 4096)  # its own pin, not the deterministic kernel's


@pytest.mark.parametrize("head_dim,lens", [(64, [1, 130, 3, 67]), (128, [70, 5, 197, 1]), (80, [197, 3, 1, 66])])
def test_tma_dq_matches_reference(monkeypatch, head_dim, lens):
    """FINEVITI_ATTN_DQ=tma: the atomic dq as one bulk tensor reduction per tile (on the CPU the interpreter's
    stand-in for it, an element-wise add over the whole block clipped to the tensor). Each sequence's last query
    block runs past its end into the next sequence's rows, which the block adds zeros into: outputs and gradients
    against the references, at the pinned tile and at the 128-key tile (80: masked inside 128 columns)."""
    monkeypatch.delenv("FINEVITI_ATTN_SPLIT", raising=False)
    monkeypatch.setenv("FINEVITI_ATTN_DQ", "tma")
    calls = _backward_spy(monkeypatch)
    check_against_reference(lens, 2, head_dim, torch.float16)
    monkeypatch.setenv("FINEVITI_ATTN_DKDV_TMA_CONFIG", "64,128,8,2")
    check_against_reference(lens[::-1], 1, head_dim, torch.float16)
    assert calls == ["tma", "tma"]
    assert kernels.pick_config("dkdv_tma", head_dim, torch.float16, 4096) == kernels.Config(64, 128, 8, 2)


@pytest.mark.parametrize("lens_k", [[3, 61], [5, 40]])  # self-attention, and keys of other lengths
@pytest.mark.parametrize("infinite_key", [False, True])
def test_tma_dq_block_past_the_end_adds_only_zeros(lens_k, infinite_key):
    """The tile of a sequence's last query block reaches past it into rows that belong to the next sequence: run
    the first sequence only, and check that the second's rows of the dq buffer stay exact zeros, also when a key of
    the first is infinite (its dq is then not finite, and 0 * inf would carry NaN into the neighbour)."""
    lens_q = [3, 61]  # one 64-row query block for the first sequence covers 61 rows of the second
    q, _, _, cu = make_pack(lens_q, 1, 64, torch.float16, requires_grad=False)
    _, k, v, cu_k = make_pack(lens_k, 1, 64, torch.float16, requires_grad=False)
    if infinite_key:
        k[1, 0, 5] = float("inf")
    do = torch.randn_like(q)
    out, lse = kernels.attention_forward(q, k, v, cu, cu_k, max(lens_q), max(lens_k), 0.125)[:2]
    dq_acc = torch.zeros(q.shape)
    zeros = torch.zeros_like(k)
    cfg = kernels.pick_config("dkdv_tma", 64, q.dtype, max(lens_q))
    desc = kernels.TensorDescriptor(dq_acc, list(dq_acc.shape), list(dq_acc.stride()), [cfg.block_m, 1, 64])
    block_cu, programs = kernels.block_schedule(cu_k, cfg.block_n, k.shape[0], lens_k)
    delta = (out.float() * do.float()).sum(-1).T.contiguous()
    kernels._attn_bwd_dkdv[(programs, 1)](
        q, k, v, do, zeros.clone(), zeros.clone(), dq_acc, desc, (lse * math.log2(math.e)).contiguous(), delta,
        cu, cu_k, block_cu, 1, *kernels._common_strides(q, k, v, do, zeros, zeros), *kernels._common_strides(dq_acc),
        lse.stride(0), 0.125, HEAD_DIM=64, DIM_A=64, DIM_B=0, PRECISION="tf32", ALIGN=8, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, ATOMIC_DQ=True, TMA_DQ=True)
    # only the first sequence ran (n_seqs = 1): the second's rows were in its block's box and must hold zeros
    assert torch.equal(dq_acc[3:], torch.zeros_like(dq_acc[3:]))
    assert (dq_acc[:3] != 0).any()
    assert torch.isfinite(dq_acc[:3]).all() != infinite_key


def test_tma_dq_without_query_tokens(monkeypatch):
    """No query tokens (cross-attention from empty query sequences): the tma mode takes the element-wise atomics
    (a descriptor needs a non-empty tensor); dk and dv are zeros, dq empty."""
    monkeypatch.setenv("FINEVITI_ATTN_DQ", "tma")
    q = torch.zeros(0, 1, 64, dtype=torch.float16, requires_grad=True)
    _, k, v, cu_k = make_pack([100, 80], 1, 64, torch.float16)
    cu_q = torch.zeros(3, dtype=torch.int32)
    out = varlen_attention(q, k, v, cu_q, 0, cu_seqlens_k=cu_k, max_seqlen_k=100, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), allow_unused=True)
    assert dq.shape == (0, 1, 64)
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


def test_i32_token_offsets_only_where_they_fit():
    """The dk/dv kernel's 32-bit token offsets: at tile widths up to 64, and only when every q-side tensor's
    token x token-stride span is below 2**31 (meta tensors: no memory)."""
    small = torch.empty((1 << 16, 16, 64), device="meta")
    edge = torch.empty(((1 << 31) // 1024 - 1, 16, 64), device="meta")  # span just under 2**31
    big = torch.empty(((1 << 31) // 1024, 16, 64), device="meta")  # span exactly 2**31
    fused = torch.empty((1 << 16, 3, 16, 64), device="meta")[:, 0]  # a view into fused qkv: 3x the stride
    assert kernels.i32_tokens(64, small, small) and kernels.i32_tokens(64, edge)
    assert not kernels.i32_tokens(64, small, big) and not kernels.i32_tokens(128, small)
    assert kernels.i32_tokens(64, fused) and fused.stride(0) == 3 * 16 * 64
    # the forward and dq kernels: any width, k and v must fit
    assert kernels.fits_i32(small, edge) and not kernels.fits_i32(small, big)
    # rows that overlap (a token stride below head_dim): the last row's columns reach past its token offset
    overlapping = torch.empty(1 << 31, device="meta").as_strided(((1 << 31) - 32, 1, 64), (1, 64, 1))
    assert overlapping.shape[0] * overlapping.stride(0) < 2**31 and not kernels.fits_i32(overlapping)


@pytest.mark.parametrize("deterministic", [True, False])
def test_64_bit_token_offsets_path(monkeypatch, deterministic):
    """The kernels' 64-bit token offsets (taken where a span would overflow 32 bits, which no test tensor does):
    forced, forward and backward against the references at d64, with the atomic dq too."""
    asked = []
    monkeypatch.setattr(kernels, "fits_i32", lambda *tensors: asked.append("fwd/dq") or False)
    monkeypatch.setattr(kernels, "i32_tokens", lambda width, *tensors: asked.append("dkdv") or False)
    monkeypatch.setenv("FINEVITI_ATTN_DQ", "atomic")
    check_against_reference([1, 130, 3, 67], 2, 64, torch.float16, deterministic=deterministic)
    # every launch asked (forward, dk/dv, and dq where it is a kernel of its own), so each ran 64-bit
    assert asked == ["fwd/dq", "dkdv"] + (["fwd/dq"] if deterministic else [])


def test_dq_mode_rule(monkeypatch):
    monkeypatch.delenv("FINEVITI_ATTN_DQ", raising=False)
    assert kernels.dq_mode(True, 128, torch.float16) == "separate"
    assert kernels.dq_mode(False, 128, torch.float16) == kernels.DEFAULT_DQ_MODE
    assert kernels.dq_mode(False, 64, torch.bfloat16) == "separate"  # measured faster there, not preferred
    assert kernels.dq_mode(False, 80, torch.bfloat16) == "atomic"
    monkeypatch.setenv("FINEVITI_ATTN_DQ", "")  # empty: unset
    assert kernels.dq_mode(False, 64, torch.bfloat16) == "separate"
    monkeypatch.setenv("FINEVITI_ATTN_DQ", "atomic")
    assert kernels.dq_mode(False, 80, torch.float16) == "atomic"
    assert kernels.dq_mode(False, 128, torch.bfloat16) == "atomic"
    assert kernels.dq_mode(False, 128, torch.bfloat16, 64) == "separate"  # one key block per sequence
    assert kernels.dq_mode(False, 64, torch.bfloat16) == "atomic"  # opt-in there (the default: separate)
    assert kernels.dq_mode(False, 72, torch.float16) == "separate"  # the atomic variant spills there
    assert kernels.dq_mode(False, 64, torch.float32) == "separate"
    assert kernels.dq_mode(False, 256, torch.bfloat16) == "separate"
    monkeypatch.setenv("FINEVITI_ATTN_DQ", "separate")
    assert kernels.dq_mode(False, 128, torch.float16) == "separate"
    monkeypatch.setenv("FINEVITI_ATTN_DQ", "tma")
    assert kernels.dq_mode(False, 64, torch.bfloat16) == "tma"
    assert kernels.dq_mode(False, 96, torch.float16, split="masked") == "tma"  # one 128-column tile
    assert kernels.dq_mode(False, 96, torch.float16, split="pieces") == "atomic"  # two pieces: element-wise
    assert kernels.dq_mode(True, 128, torch.float16) == "separate"
    assert kernels.dq_mode(False, 72, torch.float16) == "separate"
    monkeypatch.setenv("FINEVITI_ATTN_DQ", "fast")
    with pytest.raises(ValueError, match="FINEVITI_ATTN_DQ must be one of .* got 'fast'"):
        kernels.dq_mode(False, 128, torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [32, 64, 72, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("lens", [[1, 3, 17, 197, 257, 577], [577, 1], [3, 257, 17]])
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_matches_reference_full(head_dim, dtype, heads, lens, deterministic):
    check_against_reference(lens, heads, head_dim, dtype, deterministic=deterministic)


LAUNCH_KINDS = {"attn_fwd": "fwd", "attn_bwd_dkdv": "dkdv", "attn_bwd_dkdv_atomic": "dkdv_atomic",
                "attn_bwd_dq": "dq"}


def _shipped_block_shapes():
    shapes = set()
    for row in registry.shipped():
        if row.kernel_name in LAUNCH_KINDS:
            shapes.add((LAUNCH_KINDS[row.kernel_name], row.constexprs["BLOCK_M"], row.constexprs["BLOCK_N"]))
    return sorted(shapes)


def test_every_launch_kind_ships():
    assert {kind for kind, _, _ in _shipped_block_shapes()} == set(LAUNCH_KINDS.values())


@pytest.mark.parametrize("kind,block_m,block_n", _shipped_block_shapes())
def test_every_shipped_block_shape(monkeypatch, kind, block_m, block_n):
    # The interpreter ignores warps and stages, so the block shapes are what differ between shipped configs; each
    # runs in both layouts of a head dim that is no power of two: one masked tile (80 in 128 columns) and two
    # pieces (72 = 64 + 16)
    monkeypatch.setenv(f"FINEVITI_ATTN_{kind.upper()}_CONFIG", f"{block_m},{block_n},4,1")
    check_against_reference([1, 130, 3, 67], 2, 80, torch.float16, deterministic=kind in ("dkdv", "dq"))
    check_against_reference([1, 130, 3], 1, 72, torch.float16, deterministic=kind in ("dkdv", "dq"))


@pytest.mark.parametrize("text", ["64,64", "a,b,c,d", "64,48,4,1", "64,64,4,0", "64,64,4,1,2"])
def test_a_malformed_config_override_names_its_variable(monkeypatch, text):
    """It was a bare TypeError from Config's constructor, or int()'s message, naming neither."""
    monkeypatch.setenv("FINEVITI_ATTN_FWD_CONFIG", text)
    with pytest.raises(ValueError, match=rf"FINEVITI_ATTN_FWD_CONFIG must be BLOCK_M,BLOCK_N,WARPS,STAGES .*"
                                         rf"got '{text}'"):
        kernels.pick_config("fwd", 64, torch.float16, 128)
    monkeypatch.setenv("FINEVITI_ATTN_FWD_CONFIG", "64,32,4,2")
    assert kernels.pick_config("fwd", 64, torch.float16, 128) == kernels.Config(64, 32, 4, 2)


def test_torch_backend_matches_reference():
    check_against_reference([1, 3, 17, 40], 2, 64, torch.float32, backend="torch")
    check_against_reference([5, 33], 1, 72, torch.float16, backend="torch")


def test_no_leak_between_sequences():
    lens = [37, 70, 5, 64]
    q, k, v, cu = make_pack(lens, 2, 64, torch.float32, requires_grad=False)
    base = varlen_attention(q, k, v, cu, max(lens), backend="triton")
    start, end = cu[1].item(), cu[2].item()
    k2, v2 = k.clone(), v.clone()
    k2[start:end] = float("nan")
    v2[start:end] = float("nan")
    out = varlen_attention(q, k2, v2, cu, max(lens), backend="triton")
    keep = torch.ones(sum(lens), dtype=torch.bool)
    keep[start:end] = False
    assert torch.equal(out[keep], base[keep]), "changing one sequence's keys and values changed another's output"
    assert torch.isnan(out[~keep]).all()


def test_empty_sequences_and_host_lengths():
    lens = [0, 5, 0, 0, 70, 1, 0]
    q, k, v, cu = make_pack(lens, 2, 32, torch.float32)
    exact = varlen_attention(q, k, v, cu, max(lens), backend="triton", seqlens=lens)
    bound = varlen_attention(q, k, v, cu, max(lens), backend="triton")
    ref = varlen_attention_ref(q.double(), k.double(), v.double(), cu)
    assert torch.equal(exact, bound)
    assert (exact.double() - ref).abs().max() < 1e-5


def test_block_schedule_exact_and_bound():
    lens = [1, 128, 129, 0, 300]
    cu = torch.tensor([0, 1, 129, 258, 258, 558], dtype=torch.int32)
    block_cu, exact = kernels.block_schedule(cu, 128, 558, lens)
    assert block_cu.tolist() == [0, 1, 2, 4, 4, 7] and exact == 7
    _, bound = kernels.block_schedule(cu, 128, 558)
    assert 7 <= bound <= 7 + len(lens)


def test_block_schedule_is_cached_by_host_lengths_only():
    """The device block counts are cached under the host lengths and block size (every layer of a model passes the
    planner's lengths): the same lengths give the same tensor, whatever cu_seqlens object comes with them; other
    lengths or another block size give new counts; without host lengths nothing is cached (a cu_seqlens tensor
    can change in place without a version bump, through a collective or a DLPack alias)."""
    lens = [1, 128, 129, 0, 300]
    cu = torch.tensor([0, 1, 129, 258, 258, 558], dtype=torch.int32)
    first, exact = kernels.block_schedule(cu, 128, 558, lens)
    assert first.tolist() == [0, 1, 2, 4, 4, 7] and exact == 7
    assert kernels.block_schedule(cu.clone(), 128, 558, list(lens))[0] is first  # same lengths: reused
    assert kernels.block_schedule(cu, 64, 558, lens)[0].tolist() == [0, 1, 3, 6, 6, 11]  # other block
    other = [1, 130, 127, 0, 300]
    cu_other = torch.tensor([0, 1, 131, 258, 258, 558], dtype=torch.int32)
    assert kernels.block_schedule(cu_other, 128, 558, other)[0].tolist() == [0, 1, 3, 4, 4, 7]
    # no host lengths: from cu_seqlens every time, so an in-place change that bumps no version still shows
    plain, _ = kernels.block_schedule(cu, 128, 558)
    assert plain is not first and plain.tolist() == first.tolist()
    cu.numpy()[2:] = [131, 258, 258, 558]  # a write torch's version counter does not see
    assert kernels.block_schedule(cu, 128, 558)[0].tolist() == [0, 1, 3, 4, 4, 7]
    for i in range(kernels._SCHEDULE_CACHE_SIZE + 3):  # bounded
        kernels.block_schedule(torch.tensor([0, 558 - i, 558], dtype=torch.int32), 128, 558, [558 - i, i])
    assert len(kernels._SCHEDULE_CACHE) <= kernels._SCHEDULE_CACHE_SIZE


def test_cross_lengths_and_lse():
    lens_q, lens_k = [3, 20, 1], [7, 2, 40]
    cu_q = torch.tensor([0, 3, 23, 24], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 9, 49], dtype=torch.int32)
    q = torch.randn(24, 2, 64, requires_grad=True)
    k = torch.randn(49, 2, 64, requires_grad=True)
    v = torch.randn(49, 2, 64, requires_grad=True)
    out, lse = varlen_attention(q, k, v, cu_q, max(lens_q), cu_seqlens_k=cu_k, max_seqlen_k=max(lens_k),
                                backend="triton", return_lse=True, softmax_scale=0.3)
    ref, ref_lse = varlen_attention_ref(q.double(), k.double(), v.double(), cu_q, cu_k, softmax_scale=0.3,
                                        return_lse=True)
    assert lse.shape == (2, 24) and lse.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-5
    assert (lse.double() - ref_lse).abs().max() < 1e-5
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    theirs = torch.autograd.grad(varlen_attention_ref(*leaves, cu_q, cu_k, softmax_scale=0.3), leaves, grad.double())
    for a, b in zip(ours, theirs, strict=True):
        assert (a.double() - b).abs().max() < 1e-5


def test_backward_is_deterministic():
    q, k, v, cu = make_pack([90, 3, 40], 2, 64, torch.float16)
    out = varlen_attention(q, k, v, cu, 90, backend="triton", deterministic=True)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_strided_views_of_fused_qkv():
    qkv = torch.randn(43, 3, 2, 64, requires_grad=True)
    cu = torch.tensor([0, 10, 43], dtype=torch.int32)
    out = varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, 33, backend="triton")
    ref = varlen_attention_ref(qkv[:, 0].double(), qkv[:, 1].double(), qkv[:, 2].double(), cu)
    assert (out.double() - ref).abs().max() < 1e-5
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


def test_split_head_dim(monkeypatch):
    monkeypatch.delenv("FINEVITI_ATTN_SPLIT", raising=False)
    pieces = lambda d: kernels.split_head_dim(d, mode="pieces")  # noqa: E731
    assert kernels.split_head_dim(64) == pieces(64) == (64, 0)
    assert kernels.split_head_dim(72) == pieces(72) == (64, 16)  # no multiple of 16: pieces in either mode
    assert pieces(80) == (64, 16) and kernels.split_head_dim(80) == (128, 0)
    assert pieces(96) == (64, 32) and kernels.split_head_dim(96) == (128, 0)
    assert pieces(160) == (128, 32) and kernels.split_head_dim(160) == (256, 0)
    assert kernels.split_head_dim(256) == (256, 0)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.split_head_dim(8)


# --- bad input ---------------------------------------------------------------------------------------------------


def _ok_inputs():
    q, k, v, cu = make_pack([3, 5], 2, 32, torch.float32, device="cpu", requires_grad=False)
    return q, k, v, cu


@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v, cu: (q[0], k, v, cu, 5), "q must have shape"),
    (lambda q, k, v, cu: (q, k.half(), v, cu, 5), "k has dtype"),
    (lambda q, k, v, cu: (q, k[:7], v, cu, 5), "k and v must have the same shape"),
    (lambda q, k, v, cu: (q, k[:, :1], v[:, :1], cu, 5), "same \\(heads, head_dim\\)"),
    (lambda q, k, v, cu: (q, k, v, cu.long(), 5), "cu_seqlens must be int32"),
    (lambda q, k, v, cu: (q, k, v, cu + 1, 5), "cu_seqlens\\[0\\] must be 0"),
    (lambda q, k, v, cu: (q, k, v, torch.tensor([0, 6, 3, 8], dtype=torch.int32), 6), "non-decreasing"),
    (lambda q, k, v, cu: (q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32), 5), "must equal the number"),
    (lambda q, k, v, cu: (q, k, v, cu, 4), "max_seqlen=4 is smaller than the longest sequence"),
    (lambda q, k, v, cu: (q, k, v, cu, 5.0), "max_seqlen must be a non-negative integer \\(a Python int\\), got 5.0"),
    (lambda q, k, v, cu: (q, k, v, cu, True), "max_seqlen must be a non-negative integer \\(a Python int\\), got True"),
    (lambda q, k, v, cu: (q, k, v, cu, -1), "max_seqlen must be a non-negative integer, got -1"),
    (lambda q, k, v, cu: (q, k, v, cu, torch.tensor(5)), "max_seqlen must be a non-negative integer \\(a Python"),
    (lambda q, k, v, cu: (q.int(), k, v, cu, 5), "q must be float16, bfloat16 or float32"),
    (lambda q, k, v, cu: (q, k[:6], v[:6], cu, 5), "k has 6 tokens and q has 8: without cu_seqlens_k"),
    (lambda q, k, v, cu: (q, k.to("meta"), v, cu, 5), "k is on meta but q is on cpu; they must match"),
    (lambda q, k, v, cu: (q, k, v, cu.to("meta"), 5), "cu_seqlens is on meta but q is on cpu; they must match"),
])
def test_bad_inputs(mutate, match):
    q, k, v, cu, max_seqlen = mutate(*_ok_inputs())
    with pytest.raises((ValueError, TypeError), match=match):
        varlen_attention(q, k, v, cu, max_seqlen, backend="torch")


def test_max_seqlen_takes_numpy_integers():
    """flash_attn_varlen_func takes any integer for max_seqlen (a planner's numpy max, say); so do we, as an int."""
    np = pytest.importorskip("numpy")
    q, k, v, cu = _ok_inputs()
    want = varlen_attention(q, k, v, cu, 5, backend="torch")
    for value in (np.int64(5), np.int32(5)):
        torch.testing.assert_close(varlen_attention(q, k, v, cu, value, backend="torch"), want, rtol=0, atol=0)
        out = varlen_attention(q, k, v, cu, 5, cu_seqlens_k=cu, max_seqlen_k=value, backend="torch")
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_seqlen_k must be a non-negative integer \\(a Python int\\), got 5.0"):
        varlen_attention(q, k, v, cu, 5, cu_seqlens_k=cu, max_seqlen_k=5.0, backend="torch")


def test_max_seqlen_stays_dynamic_under_compile():
    """Compiled, a changing max_seqlen becomes a dynamic size after the first recompile; converting it with
    operator.index pinned it (a guard on its value): one graph per value, and past dynamo's recompile limit the
    caller ran uncompiled (the model's blocks under selective or no activation checkpointing)."""
    from torch._dynamo.utils import counters

    class Pack:
        def __init__(self, cu, longest):
            self.cu, self.longest = cu, longest

    @torch.compile(fullgraph=True, backend="aot_eager")
    def attend(q, pack):
        return varlen_attention(q, q, q, pack.cu, pack.longest, backend="torch", check_values=False)

    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for lens in ([3, 5], [4, 6], [2, 7], [8, 1], [5, 5, 2], [6, 6, 6], [1, 9, 3]):
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
        attend(torch.randn(sum(lens), 2, 16), Pack(cu, max(lens)))
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[-1] <= 3 and graphs[-1] == graphs[-3], graphs  # the seven lengths: not seven graphs


def test_seqlens_must_match_cu_seqlens():
    q, k, v, cu = _ok_inputs()
    with pytest.raises(ValueError, match="seqlens must hold 2 lengths summing to 8"):
        varlen_attention(q, k, v, cu, 5, backend="torch", seqlens=[3, 4])
    with pytest.raises(ValueError, match="seqlens disagrees with cu_seqlens"):
        varlen_attention(q, k, v, cu, 5, backend="torch", seqlens=[5, 3])
    # host lengths longer than max_seqlen: caught without a look at the device (also where values go unchecked)
    with pytest.raises(ValueError, match=r"max_seqlen=4 is smaller than the longest sequence in seqlens \(5\)"):
        varlen_attention(q, k, v, cu, 4, backend="torch", seqlens=[3, 5], check_values=False)


def test_cu_seqlens_k_needs_max_seqlen_k():
    """As flash_attn_varlen_func: max_seqlen_k is not taken from max_seqlen (a key sequence longer than the longest
    query one made too few dk/dv programs run, unwritten gradients, where values go unchecked)."""
    q, k, v, cu = _ok_inputs()
    with pytest.raises(ValueError, match="cu_seqlens_k needs max_seqlen_k"):
        varlen_attention(q, k, v, cu, 5, cu_seqlens_k=cu, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_cu_seqlens(backend):
    """A cu_seqlens view with a stride (a column of a table): the triton kernels index it with stride 1 and read
    other entries (garbage, or out-of-bounds writes) before it was made contiguous."""
    q, k, v, cu = make_pack([5, 7, 3], 2, 32, torch.float32, device="cpu", requires_grad=True)
    strided = torch.stack((cu, torch.full_like(cu, 9)), dim=1)[:, 0]
    assert strided.stride() == (2,)
    out = varlen_attention(q, k, v, strided, 7, backend=backend)
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, 7, backend="torch"), rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = torch.autograd.grad(varlen_attention(q, k, v, cu, 7, backend="torch").square().sum(), (q, k, v))
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_understated_max_seqlen_without_checks_still_covers_every_block():
    """Without host lengths the triton grid is an upper bound from the token count alone, not from max_seqlen:
    an understated max_seqlen (unchecked on CUDA by default) left output rows unwritten."""
    q, k, v, cu = make_pack([300, 5], 1, 32, torch.float32, device="cpu", requires_grad=False)
    out = varlen_attention(q, k, v, cu, 64, backend="triton", check_values=False)
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, 300, backend="torch"), rtol=1e-5, atol=1e-5)
    _, bound = kernels.block_schedule(cu, 64, 305)
    assert bound >= 6  # ceil(300 / 64) + 1 blocks exist


def test_triton_refuses_bf16_in_the_interpreter():
    """Triton's interpreter computes bf16 dots wrongly (errors of 1e8): refused, not returned."""
    q, k, v, cu = make_pack([5, 3], 1, 32, torch.bfloat16, device="cpu", requires_grad=False)
    with pytest.raises(ValueError, match="Triton's interpreter, whose bfloat16 dot products are wrong"):
        varlen_attention(q, k, v, cu, 5, backend="triton")


def test_negative_softmax_scale_is_a_clear_error():
    q, k, v, cu = make_pack([3, 5], 1, 32, torch.float32)
    for bad in (-0.5, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"softmax_scale must be finite and > 0 for the triton backend, got {bad}"):
            varlen_attention(q, k, v, cu, 5, backend="triton", softmax_scale=bad)


def test_bad_backend_and_head_dim():
    q, k, v, cu = _ok_inputs()
    with pytest.raises(ValueError, match="backend must be"):
        varlen_attention(q, k, v, cu, 5, backend="nope")
    with pytest.raises(ValueError, match="head_dim \\(the last dim of q, k and v\\) must be in \\[16, 256\\], got 8"):
        varlen_attention(q[..., :8], k[..., :8], v[..., :8], cu, 5, backend="torch")


# --- dispatch ------------------------------------------------------------------------------------------------------


def test_auto_rule_table(monkeypatch):
    assert attention_mod.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FINEVITI_ATTN_BACKEND", "triton")
    assert attention_mod.resolve_backend("auto", torch.device("cpu")) == "triton"
    monkeypatch.setenv("FINEVITI_ATTN_BACKEND", "auto")
    assert attention_mod.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FINEVITI_ATTN_BACKEND", "")  # empty is "auto", as the other ops' variables (it raised)
    assert attention_mod.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert attention_mod.resolve_backend("torch", torch.device("cpu")) == "torch"
    # on CUDA: triton, except fp32 beyond the head dims its kernels take in true fp32 (the "fine" preset's 96)
    cuda = torch.device("cuda")
    monkeypatch.setattr(attention_mod, "backend_available", lambda name, device: (True, ""))
    assert attention_mod.resolve_backend("auto", cuda, torch.bfloat16, 96) == "triton"
    assert attention_mod.resolve_backend("auto", cuda, torch.float32, 64) == "triton"
    assert attention_mod.resolve_backend("auto", cuda, torch.float32, 96) == "torch"
    assert attention_mod.resolve_backend("triton", cuda, torch.float32, 96) == "triton"  # asked for: its error
    monkeypatch.setenv("FINEVITI_ATTN_BACKEND", "flash")
    with pytest.raises(ValueError, match="FINEVITI_ATTN_BACKEND='flash' is not a varlen attention backend"):
        attention_mod.resolve_backend("auto", cuda)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autocast_gives_every_backend_and_empty_keys_its_dtype(dtype, autocast_dtype):
    """Under autocast q, k and v take the autocast dtype first, as SDPA's do: a pack with a sequence without keys
    used to come out in the inputs' dtype (fp32) or fail (fp16 inputs under bf16 autocast), and compiled and eager
    disagreed on fp16 inputs."""
    q, _, _, cu = make_pack([3, 2], 2, 32, dtype, device="cpu")
    cu_k = torch.tensor([0, 4, 4], dtype=torch.int32)  # the second sequence has no keys
    k, v = (torch.randn(4, 2, 32).to(dtype) for _ in range(2))

    def f(q, k, v):
        return varlen_attention(q, k, v, cu, 3, cu_seqlens_k=cu_k, max_seqlen_k=4, backend="torch")

    with torch.autocast("cpu", dtype=autocast_dtype):
        eager = f(q, k, v)
        traced = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert eager.dtype == traced.dtype == autocast_dtype
    assert (eager[3:] == 0).all()
    torch.testing.assert_close(traced.float(), eager.float(), rtol=1e-2, atol=1e-2)


def test_torch_backend_output_is_differentiable_without_any_key():
    """Every sequence without keys: zeros with a zero gradient for q (the output used to have no grad_fn, and
    backward() failed), also where q is not finite."""
    q = torch.randn(5, 2, 32, requires_grad=True)
    q.data[0, 0, 0] = float("nan")
    k = torch.randn(0, 2, 32, requires_grad=True)
    v = torch.randn(0, 2, 32, requires_grad=True)
    out = varlen_attention(q, k, v, torch.tensor([0, 2, 5], dtype=torch.int32), 3,
                           cu_seqlens_k=torch.tensor([0, 0, 0], dtype=torch.int32), max_seqlen_k=0, backend="torch")
    assert (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_takes_mixed_input_dtypes(backend):
    """Under autocast q, k and v are cast before the dtype check, as SDPA casts them: q fp16 with k, v fp32 raised
    a TypeError (the check ran on the uncast inputs)."""
    q, k, v, cu = make_pack([3, 4], 2, 16, torch.float32, device="cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        out = varlen_attention(q.half(), k, v, cu, 4, backend=backend)
    assert out.dtype == torch.float16
    want = varlen_attention_ref(q.half().double(), k.half().double(), v.half().double(), cu)
    assert (out.double() - want).abs().max() < 2e-3
    out.float().sum().backward()
    assert k.grad.dtype == torch.float32 and torch.isfinite(k.grad).all()
    with pytest.raises(TypeError, match="k has dtype torch.float32 but q has torch.float16"):  # outside autocast
        varlen_attention(q.half(), k, v, cu, 4, backend=backend)


def test_reference_is_differentiable_without_any_token():
    """Every sequence empty: the reference's zeros for a sequence without keys had no grad_fn, so its output could
    not be backpropagated (the torch backend's are differentiable); now both give an empty gradient."""
    for cu in (torch.tensor([0, 0], dtype=torch.int32), torch.tensor([0, 0, 0], dtype=torch.int32)):
        q, k, v = (torch.randn(0, 2, 16, requires_grad=True) for _ in range(3))
        out = varlen_attention_ref(q, k, v, cu)
        assert out.shape == (0, 2, 16) and out.grad_fn is not None
        out.sum().backward()
        assert q.grad.shape == q.shape


def test_unavailable_backend_names_what_is_missing(monkeypatch):
    q, k, v, cu = _ok_inputs()
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with pytest.raises(RuntimeError, match="flash_attn"):
        varlen_attention(q, k, v, cu, 5, backend="flash_attn")
    with pytest.raises(RuntimeError, match="CUDA"):
        varlen_attention(q, k, v, cu, 5, backend="torch_varlen")


def test_flash_attn_through_fake_module(monkeypatch):
    """flash_attn never ran on a machine of this project: check our call against its real signature."""
    calls = {}

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        calls.update(max_q=max_seqlen_q, scale=softmax_scale, causal=causal, det=deterministic)
        out = varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale,
                                   return_lse=return_attn_probs)
        return (out[0], out[1], None) if return_attn_probs else out

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = flash_attn_varlen_func
    fake.__spec__ = types.SimpleNamespace(name="flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(attention_mod, "backend_available", lambda name, device: (True, ""))
    q, k, v, cu = _ok_inputs()
    out = varlen_attention(q, k, v, cu, 5, backend="flash_attn", deterministic=True)
    assert calls == {"max_q": 5, "scale": 1 / math.sqrt(32), "causal": False, "det": True}
    assert torch.allclose(out, varlen_attention_ref(q, k, v, cu))


def test_xformers_through_fake_module(monkeypatch):
    seen = {}

    class BlockDiagonalMask:
        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None):
            seen["q"], seen["kv"] = list(q_seqlen), list(kv_seqlen)
            return cls()

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        assert query.dim() == 4 and query.shape[0] == 1 and isinstance(attn_bias, BlockDiagonalMask)
        cu = torch.tensor([0] + list(torch.tensor(seen["q"]).cumsum(0)), dtype=torch.int32)
        return varlen_attention_ref(query[0], key[0], value[0], cu, softmax_scale=scale)[None]

    fmha = types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask,
                                 memory_efficient_attention=memory_efficient_attention)
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fmha
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(attention_mod, "backend_available", lambda name, device: (True, ""))
    q, k, v, cu = _ok_inputs()
    out = varlen_attention(q, k, v, cu, 5, backend="xformers")
    assert seen == {"q": [3, 5], "kv": [3, 5]}
    assert torch.allclose(out, varlen_attention_ref(q, k, v, cu))


def test_custom_op_traces_without_graph_break():
    q, k, v, cu = make_pack([3, 17], 2, 32, torch.float32, device="cpu")
    torch.library.opcheck(torch.ops.fineviti.varlen_attention_fwd.default, (q, k, v, cu, cu, 17, 17, 0.2, None),
                          test_utils=("test_schema", "test_faketensor"))

    def f(q, k, v, cu):
        return varlen_attention(q, k, v, cu, 17, backend="triton", check_values=False).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, cu)
    loss.backward()
    assert torch.allclose(loss, f(q.detach(), k.detach(), v.detach(), cu), atol=1e-5)
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("cross", [False, True])
def test_torch_backend_traces_whole_and_does_not_recompile_per_pack(cross, monkeypatch):
    """Traced, the torch backend is one custom op (its per-sequence loop reads the lengths on the host, which a
    fullgraph compile refused and a plain one specialised on): the same values and gradients as eager, and a pack
    of other lengths (same total) reuses the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    q, k, v, cu = make_pack([3, 0, 17], 2, 32, torch.float32, device="cpu")
    torch.library.opcheck(torch.ops.fineviti.varlen_attention_torch_fwd.default, (q, k, v, cu, cu, 17, 17, 0.2, True))
    # a dense but permuted q (heads-major storage): the fake's strides are the real output's (contiguous)
    permuted = [t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.fineviti.varlen_attention_torch_fwd.default,
                          (*permuted, cu, cu, 17, 17, 0.2, False))
    monkeypatch.setattr(attention_mod, "_TORCH_BWD_BLOCK", 4 * 2 * 17 * 5)  # blocks of 5 query rows at 17 keys
    counter = CompileCounterWithBackend("aot_eager")

    def f(q, k, v, cu, cu_k, lse_weight):
        out, lse = varlen_attention(q, k, v, cu, 20, cu_seqlens_k=cu_k, max_seqlen_k=20, backend="torch",
                                    return_lse=True)
        return out, lse * lse_weight

    compiled = torch.compile(f, fullgraph=True, backend=counter)
    for lens, lens_k in (([3, 0, 17], [5, 2, 13]), ([19, 1, 0], [0, 19, 1])):
        q, k, v, cu = make_pack(lens, 2, 32, torch.float32, device="cpu")
        if cross:
            cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
        else:
            cu_k, lens_k = cu, lens
        out, lse = compiled(q, k, v, cu, cu_k, 1.0)
        assert not lse.requires_grad  # as in eager mode (and the triton backend)
        want, want_lse = varlen_attention_ref(q, k, v, cu, cu_k, return_lse=True)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
        grad_out = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad_out)
        want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
        for name, a, b in zip("qkv", got, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"d{name}")
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for two packs of the same total"


@pytest.mark.parametrize("cross", [False, True])
def test_triton_op_traced_takes_host_lengths_as_a_tensor(cross, monkeypatch):
    """Traced, the triton backend gets the host lengths as a CPU tensor (a list would specialise the graph on its
    values): the forward and both backward launches build their block schedules from them (exact grids, cached),
    not from cu_seqlens on the device, the results are eager's, and a pack of other lengths reuses the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from fineviti.kernels import varlen_attention as kernels

    torch._dynamo.reset()
    calls = []
    original = kernels.block_schedule
    monkeypatch.setattr(kernels, "block_schedule", lambda cu, block, total, seqlens=None: (
        calls.append(seqlens), original(cu, block, total, seqlens))[1])
    counter = CompileCounterWithBackend("aot_eager")

    def f(q, k, v, cu, cu_k, lengths):
        return varlen_attention(q, k, v, cu, 20, cu_seqlens_k=cu_k, max_seqlen_k=20, backend="triton",
                                seqlens=lengths)

    compiled = torch.compile(f, fullgraph=True, backend=counter)
    for lens, lens_k in (([3, 0, 17], [5, 2, 13]), ([19, 1, 0], [0, 19, 1])):
        q, k, v, cu = make_pack(lens, 2, 32, torch.float32, device=DEVICE)
        if cross:
            cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
            k, v = (torch.randn(sum(lens_k), 2, 32, device=DEVICE, requires_grad=True) for _ in range(2))
        else:
            cu_k = cu
        calls.clear()
        out = compiled(q, k, v, cu, cu_k, torch.tensor(lens, dtype=torch.int32))
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        # forward, then the backward's two schedules (query blocks; key blocks, whose lengths are the query ones
        # only in self-attention)
        assert calls == [lens, None, lens] if cross else calls == [lens] * 3, calls
        want = f(q, k, v, cu, cu_k, lens)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, torch.autograd.grad(want, (q, k, v), torch.ones_like(want)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for two packs of the same total"
    with pytest.raises(ValueError, match="1-D integer CPU tensor"):
        f(q, k, v, cu, cu_k, torch.tensor([1.0, 2.0]))


def test_torch_backend_under_autocast_traced_as_in_eager():
    """Autocast does not reach into a custom op: traced, the torch backend casts its inputs as SDPA would eagerly,
    so eager and compiled agree on the output's dtype and values (and the fake on the real op's dtype)."""
    q, k, v, cu = make_pack([5, 11], 2, 32, torch.float32, device="cpu")

    def f(q, k, v, cu):
        out, lse = varlen_attention(q, k, v, cu, 11, backend="torch", return_lse=True)
        return out, lse

    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = f(q, k, v, cu)
        traced = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, cu)
    assert eager[0].dtype == traced[0].dtype == torch.bfloat16 and not eager[1].requires_grad
    torch.testing.assert_close(traced[0], eager[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(traced[1], eager[1], rtol=1e-2, atol=1e-2)


def test_backend_lookup_does_no_import_machinery_per_call(monkeypatch):
    """torch 2.11's dynamo refuses importlib.util.find_spec inside a trace (a fullgraph compile of the triton path
    failed on the H100 on 2026-11-28; torch 2.14 here traces it): whether a package is installed is looked up once."""
    import importlib.util

    def refuse(*args, **kwargs):
        raise AssertionError("importlib.util.find_spec called while resolving a backend")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    for backend in attention_mod.BACKENDS:
        for device in ("cpu", "cuda"):
            attention_mod.backend_available(backend, device)
    assert attention_mod.resolve_backend("torch", torch.device("cpu")) == "torch"


# --- RoPE inside the attention kernel (variant (b)) -------------------------------------------------------------


def _grid_pos(lens, device=DEVICE):
    """(row, col) of each token of images laid out on grids about as wide as tall."""
    rows = []
    for n in lens:
        width = max(1, int(n ** 0.5))
        idx = torch.arange(n)
        rows.append(torch.stack((idx // width, idx % width), 1))
    return torch.cat(rows).to(device=device, dtype=torch.int64)


@pytest.mark.parametrize("head_dim,dtype,lens", [(32, torch.float32, [1, 17, 70]), (64, torch.float16, [3, 130]),
                                                 (128, torch.float32, [5, 66])])
def test_rope_in_kernel_matches_rope_then_attention(head_dim, dtype, lens):
    from fineviti.ops import rope_2d_ref, varlen_attention_rope

    q, k, v, cu = make_pack(lens, 2, head_dim, dtype)
    pos = _grid_pos(lens)
    out = varlen_attention_rope(q, k, v, cu, max(lens), pos, theta=100.0, seqlens=lens)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)

    def composed(q, k, v, upcast=True):
        return varlen_attention_ref(rope_2d_ref(q, pos, theta=100.0), rope_2d_ref(k, pos, theta=100.0), v, cu,
                                    upcast=upcast)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref64 = composed(*leaves64)
    grads64 = torch.autograd.grad(ref64, leaves64, grad.double())
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    same = composed(*leaves, upcast=False)
    same_grads = torch.autograd.grad(same, leaves, grad)
    atol = 1e-5 if dtype == torch.float32 else 3e-3
    for name, ours, s, exact in zip(("out", "dq", "dk", "dv"), (out, *grads), (same, *same_grads),
                                    (ref64, *grads64), strict=True):
        assert torch.isfinite(ours).all(), name
        err = (ours.double() - exact).abs().max().item()
        budget = 2 * (s.double() - exact).abs().max().item() + atol
        assert err <= budget, f"{name}: {err:.3e} > {budget:.3e}"


def test_rope_in_kernel_takes_strided_views_and_checks_inputs():
    from fineviti.ops import rope_2d_ref, varlen_attention_rope

    lens = [9, 20]
    qkv = torch.randn(29, 3, 2, 32, requires_grad=True)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 9, 29], dtype=torch.int32)
    pos = _grid_pos(lens, "cpu")
    out = varlen_attention_rope(q, k, v, cu, 20, pos)
    want = varlen_attention_ref(rope_2d_ref(q, pos), rope_2d_ref(k, pos), v, cu)
    assert (out - want).abs().max() < 1e-5
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    with pytest.raises(ValueError, match="power-of-two head_dim from 16 to 128, got 80"):
        varlen_attention_rope(*(torch.randn(29, 2, 80) for _ in range(3)), cu, 20, pos)
    with pytest.raises(ValueError, match=r"pos must be an int32/int64 tensor of shape \(29, 2\)"):
        varlen_attention_rope(q, k, v, cu, 20, pos[:, :1])
    with pytest.raises(ValueError, match="positions must be non-negative"):
        varlen_attention_rope(q, k, v, cu, 20, -pos)
    with pytest.raises(ValueError, match="non-negative positions, got a minimum of -1"):
        varlen_attention_rope(q, k, v, cu, 20, pos - 1, check_values=False)  # the kernel's own guard
    with pytest.raises(ValueError, match="seqlens must hold 2 lengths summing to 29 tokens"):
        varlen_attention_rope(q, k, v, cu, 20, pos, seqlens=[1])
    for bad in (0.0, -1.0, float("nan"), "abc"):  # these made NaN tables without a word
        with pytest.raises(ValueError, match=f"theta must be a finite number > 0.*, got {re.escape(repr(bad))}"):
            varlen_attention_rope(q, k, v, cu, 20, pos, theta=bad)
    # int64 positions beyond int32: the table's host read refuses them (they were cast to int32 first, and wrapped)
    with pytest.raises(ValueError, match="positions below 2\\*\\*31, got a maximum of 42949673"):
        varlen_attention_rope(q, k, v, cu, 20, pos.long() + 2**32, check_values=False)


def test_rope_in_kernel_takes_the_autocast_dtype():
    """Under autocast varlen_attention_rope computed fp32 inputs in fp32 and returned fp32, where varlen_attention
    (the same computation without the fused rotation) returns the autocast dtype."""
    from fineviti.ops import rope_2d_ref, varlen_attention_rope

    q, k, v, cu = make_pack([3, 4], 2, 16, torch.float32, device="cpu")
    pos = _grid_pos([3, 4], "cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        out = varlen_attention_rope(q, k, v, cu, 4, pos)
        plain = varlen_attention(rope_2d_ref(q, pos), rope_2d_ref(k, pos), v, cu, 4)
    assert out.dtype == plain.dtype == torch.float16
    assert (out.float() - plain.float()).abs().max() < 2e-3
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


def test_rope_in_kernel_refuses_a_double_backward():
    """create_graph=True through varlen_attention_rope returned first-order gradients without a grad_fn, so a
    gradient penalty silently lost its second-order terms: it raises now; a plain backward still works."""
    from fineviti.ops import varlen_attention_rope

    q, k, v, cu = make_pack([3, 4], 2, 16, torch.float32, device="cpu")
    pos = _grid_pos([3, 4], "cpu")
    out = varlen_attention_rope(q, k, v, cu, 4, pos)
    with pytest.raises(RuntimeError, match="varlen_attention_rope does not support a double backward"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)
    (dq,) = torch.autograd.grad(varlen_attention_rope(q, k, v, cu, 4, pos).square().sum(), q)
    assert dq.grad_fn is None and torch.isfinite(dq).all()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_rope_in_kernel(head_dim):
    from fineviti.ops import rope_2d, varlen_attention_rope

    lens = [1, 197, 577, 1024]
    q, k, v, cu = make_pack(lens, 4, head_dim, torch.bfloat16, device="cuda")
    pos = _grid_pos(lens, "cuda")
    out = varlen_attention_rope(q, k, v, cu, max(lens), pos, seqlens=lens)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = varlen_attention(rope_2d(leaves[0], pos), rope_2d(leaves[1], pos), leaves[2], cu, max(lens),
                            backend="triton", seqlens=lens)
    want_grads = torch.autograd.grad(want, leaves, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads), strict=True):
        assert torch.isfinite(a).all() and rel_err(a, b) < 2e-2, name


# --- GPU -------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128])
def test_gpu_matches_reference(dtype, head_dim):
    _gpu_against_reference(dtype, head_dim)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,deterministic", [(32, False), (256, False), (80, True), (128, True)])
def test_gpu_other_head_dims_and_deterministic_match_reference(head_dim, deterministic):
    """The issue's ends of the head-dim range (32, 256) and the deterministic backward against the fp64 reference
    (not only against the atomic one), under the sync debug mode too."""
    _gpu_against_reference(torch.bfloat16, head_dim, deterministic)


def _gpu_against_reference(dtype, head_dim, deterministic=False):
    lens = [1, 3, 17, 197, 257, 577, 1024]
    q, k, v, cu = make_pack(lens, 4, head_dim, dtype, device="cuda")
    grad = torch.randn(q.shape, device="cuda", dtype=dtype)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = varlen_attention(q, k, v, cu, max(lens), backend="triton", seqlens=lens, deterministic=deterministic)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        out2 = varlen_attention(q, k, v, cu, max(lens), backend="triton",  # upper-bound grid, no host lengths
                                deterministic=deterministic)
        torch.autograd.grad(out2, (q, k, v), grad)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out, out2)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = varlen_attention_ref(*leaves64, cu)
    ref_grads = torch.autograd.grad(ref, leaves64, grad.double())
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    same = varlen_attention_ref(*leaves, cu, upcast=False)
    same_grads = torch.autograd.grad(same, leaves, grad)
    for name, a, s, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (same, *same_grads), (ref, *ref_grads),
                             strict=True):
        err = (a.double() - r).abs().max().item()
        budget = 2 * (s.double() - r).abs().max().item() + 2e-3
        assert err <= budget, f"{name}: {err:.3e} > {budget:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_gpu_deterministic_backward(head_dim):
    lens = [1, 197, 577, 1024]
    q, k, v, cu = make_pack(lens, 4, head_dim, torch.bfloat16, device="cuda")
    grad = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    runs = []
    for deterministic in (True, True, False):
        out = varlen_attention(q, k, v, cu, max(lens), backend="triton", seqlens=lens, deterministic=deterministic)
        runs.append(torch.autograd.grad(out, (q, k, v), grad))
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a, b)  # bit-reproducible
    for a, b in zip(runs[0], runs[2], strict=True):
        assert rel_err(b, a) < 1e-2  # the atomic dq computes the same function


@pytest.mark.gpu
def test_gpu_fp32_is_near_fp32():
    check_against_reference([1, 100, 300], 2, 64, torch.float32, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in attention_mod.BACKENDS if b != "triton"])
def test_gpu_backends_agree_with_ours(backend):
    ok, why = attention_mod.backend_available(backend, "cuda")
    if not ok:
        pytest.skip(why)
    lens = [64, 300, 17]
    q, k, v, cu = make_pack(lens, 4, 64, torch.bfloat16, device="cuda")
    ours = varlen_attention(q, k, v, cu, 300, backend="triton")
    theirs = varlen_attention(q, k, v, cu, 300, backend=backend)
    assert rel_err(theirs, ours) < 2e-2


@pytest.mark.gpu
def test_gpu_compiled_triton_path():
    q, k, v, cu = make_pack([64, 300], 2, 64, torch.bfloat16, device="cuda")

    def f(q, k, v):
        return varlen_attention(q, k, v, cu, 300, backend="triton").float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    assert rel_err(compiled(q, k, v), f(q, k, v)) < 1e-3


@pytest.mark.gpu
def test_gpu_compiled_triton_path_with_host_lengths_never_syncs():
    """Compiled with the host lengths as a CPU tensor (as the model's compiled blocks pass them): the same result,
    forward and backward, without a device synchronisation."""
    q, k, v, cu = make_pack([64, 300], 2, 64, torch.bfloat16, device="cuda")
    lengths = torch.tensor([64, 300], dtype=torch.int32)

    def f(q, k, v, lengths):
        return varlen_attention(q, k, v, cu, 300, backend="triton", seqlens=lengths).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    want = f(q, k, v, [64, 300])
    compiled(q, k, v, lengths).backward()  # compile both graphs outside the check (compiling may synchronise)
    q.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = compiled(q, k, v, lengths)
        got.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rel_err(got.detach(), want.detach()) < 1e-3 and torch.isfinite(q.grad).all()


@pytest.mark.gpu
def test_gpu_fp32_head_dim_limit_is_a_clear_error():
    q, k, v, cu = make_pack([10, 20], 2, 128, torch.float32, device="cuda")
    with pytest.raises(ValueError, match="float32 inputs on a GPU up to head_dim 64"):
        varlen_attention(q, k, v, cu, 20, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_gpu_tma_dq_matches_reference(monkeypatch, head_dim):
    """FINEVITI_ATTN_DQ=tma on the GPU: the bulk tensor reduction itself (cp.reduce.async.bulk.tensor). Last in the
    file: it is new on the device, and a fault there would turn every later test of the process into an error."""
    monkeypatch.delenv("FINEVITI_ATTN_SPLIT", raising=False)
    monkeypatch.setenv("FINEVITI_ATTN_DQ", "tma")
    calls = _backward_spy(monkeypatch)
    _gpu_against_reference(torch.bfloat16, head_dim)
    assert set(calls) == {"tma"}


def test_deterministic_is_refused_where_a_cuda_backend_cannot_keep_it(monkeypatch):
    """deterministic=True on CUDA: triton and flash_attn keep it; torch's attention only under
    torch.use_deterministic_algorithms(True); flex and xformers never (it was ignored silently). On a CPU it holds."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for name in ("triton", "flash_attn"):
        attention_mod._check_deterministic(name, cuda, True)
    for name in ("torch", "torch_varlen"):
        with pytest.raises(ValueError, match=f"backend '{name}' on CUDA: .*use_deterministic_algorithms"):
            attention_mod._check_deterministic(name, cuda, True)
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        attention_mod._check_deterministic(name, cuda, True)
        monkeypatch.undo()
    for name in ("flex", "xformers"):
        with pytest.raises(ValueError, match=f"backend '{name}' has no deterministic backward on CUDA"):
            attention_mod._check_deterministic(name, cuda, True)
        attention_mod._check_deterministic(name, cuda, False)
        attention_mod._check_deterministic(name, cpu, True)
        # the global switch asks too: an error, or a warning under its warn_only
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        with pytest.raises(ValueError, match="no deterministic backward"):
            attention_mod._check_deterministic(name, cuda, False)
        monkeypatch.setattr(torch, "is_deterministic_algorithms_warn_only_enabled", lambda: True)
        with pytest.warns(UserWarning, match="warn_only=True"):
            attention_mod._check_deterministic(name, cuda, False)
        monkeypatch.undo()
    q, k, v, cu = _ok_inputs()
    varlen_attention(q, k, v, cu, 5, backend="torch", deterministic=True)  # CPU: deterministic already

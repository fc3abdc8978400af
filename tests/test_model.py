"""The FineViT model: parameter counts, packing invariance, degenerate grids, gradients, the text tower's lengths,
the towers against a plain re-implementation, SigLIP/CLIP initialisation, activation checkpointing, the Triton
backends under the interpreter, and the stage-2 aligner (splicing, answer-only loss, padding).

Small configs in fp32 on the CPU, attention backend "torch" unless a test says otherwise.
"""

from __future__ import annotations

import contextlib
import math
import types

import pytest
import torch
import torch.nn.functional as F

import fineviti
from fineviti._checks import triton_interpreting
from fineviti.data.batch import PackedBatch
from fineviti.data.positions import build_positions_ref
from fineviti.model import (
    AlignerConfig,
    BuiltinLM,
    FineViT,
    HFCausalLM,
    build_example,
    collate,
    create_aligner,
    create_model,
)
from fineviti.model import config as cfg_mod
from fineviti.model.aligner import IGNORE_INDEX, next_token_loss
from fineviti.model.layers import rope_1d, rope_1d_cos_sin
from fineviti.ops.attention import varlen_attention_ref
from fineviti.ops.rope import rope_2d_ref

INTERPRET = triton_interpreting()

SMALL = {"attn_backend": "torch", "rope_backend": "torch", "embed_dim": 48,
         "vision": {"width": 64, "depth": 2, "heads": 2, "mlp_hidden": 96},
         "text": {"vocab_size": 300, "width": 64, "depth": 2, "heads": 2, "mlp_hidden": 96}}


def small_model(**overrides) -> FineViT:
    torch.manual_seed(0)
    settings = {**SMALL, **overrides}
    return create_model("tiny", **settings)


def pack_images(grids, merge=1, patch_dim=588, seed=0):
    """patches, cu_seqlens, pos, max_seqlen, seqlens of images with these patch grids (fresh random pixels)."""
    gen = torch.Generator().manual_seed(seed)
    grid_hw = torch.tensor(grids, dtype=torch.int32)
    cu, pos = build_positions_ref(grid_hw, merge)
    lengths = (cu[1:] - cu[:-1]).tolist()
    patches = torch.randn(int(cu[-1]), patch_dim, generator=gen)
    return patches, cu, pos, max(lengths), lengths


def pack_captions(lengths, vocab=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (sum(lengths),), generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return tokens, cu, max(lengths), list(lengths)


def make_batch(grids, caption_lengths, merge=1, vocab=300, seed=0) -> PackedBatch:
    patches, cu, pos, max_len, lengths = pack_images(grids, merge, seed=seed)
    tokens, tcu, tmax, tlens = pack_captions(caption_lengths, vocab, seed=seed + 1)
    return PackedBatch(patches=patches, cu_seqlens=cu, pos=pos, max_seqlen=max_len, seqlens=lengths,
                       grid_hw=torch.tensor(grids, dtype=torch.int32), tokens=tokens, text_cu_seqlens=tcu,
                       text_max_seqlen=tmax, text_seqlens=tlens)


def select(packed, cu, order):
    """The rows of the sequences `order` of a packed tensor, concatenated in that order."""
    bounds = cu.tolist()
    return torch.cat([packed[bounds[i]:bounds[i + 1]] for i in order])


# ---------------------------------------------------------------------------------------------------------------
# Configs and parameter counts


@pytest.mark.parametrize("name", ["tiny", "base", "large", "fine"])
def test_param_count_matches_modules(name):
    device = "cpu" if name == "tiny" else "meta"  # the large presets are built without memory
    model = create_model(name, device=device)
    cfg = model.cfg
    assert cfg_mod.count_params(model.visual) == cfg.vision.num_params(cfg.embed_dim)
    assert cfg_mod.count_params(model.text) == cfg.text.num_params(cfg.embed_dim)
    assert cfg_mod.count_params(model) == cfg.num_params()


def test_preset_shapes():
    fine = cfg_mod.fine()
    assert (fine.vision.width, fine.vision.depth, fine.vision.heads, fine.vision.head_dim,
            fine.vision.mlp_hidden) == (1536, 28, 16, 96, 4608)
    assert 0.84e9 < fine.vision.num_params(fine.embed_dim) < 0.88e9  # "about 0.86B" in the paper
    assert (cfg_mod.base().vision.width, cfg_mod.base().vision.depth, cfg_mod.base().vision.head_dim) == (768, 12, 64)
    assert (cfg_mod.large().vision.width, cfg_mod.large().vision.depth, cfg_mod.large().vision.head_dim) == \
        (1024, 24, 64)
    for name in cfg_mod.PRESETS:
        assert cfg_mod.preset(name).text.context_length >= 256


def test_overrides_and_errors():
    cfg = cfg_mod.apply_overrides(cfg_mod.tiny(), {"vision.depth": 2, "text": {"vocab_size": 1234}, "loss": "clip"})
    assert (cfg.vision.depth, cfg.text.vocab_size, cfg.loss) == (2, 1234, "clip")
    assert cfg_mod.tiny().vision.depth == 4  # presets are fresh copies
    with pytest.raises(KeyError, match="vision.dpeth"):
        cfg_mod.apply_overrides(cfg_mod.tiny(), {"vision.dpeth": 2})
    with pytest.raises(ValueError, match="heads"):
        cfg_mod.apply_overrides(cfg_mod.tiny(), {"vision.heads": 5})
    with pytest.raises(ValueError, match="head_dim"):
        cfg_mod.apply_overrides(cfg_mod.tiny(), {"vision.heads": 64})  # head_dim 3
    with pytest.raises(ValueError, match="context_length"):
        cfg_mod.apply_overrides(cfg_mod.tiny(), {"text.context_length": 128})
    with pytest.raises(ValueError, match="unknown model preset"):
        create_model("huge")
    model = fineviti.create_model("tiny", device="meta", text={"vocab_size": 777})
    assert model.text.token_embed.num_embeddings == 777 and model.visual.patch_size == 14
    assert model.visual.merge == 2
    model = model.to_empty(device="cpu")  # meta -> memory, as FSDP2's deferred init does, then initialise
    model.init_weights()
    assert torch.allclose(model.logit_scale, torch.tensor(math.log(10.0))) and float(model.logit_bias.detach()) == -10.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 0.015 < float(model.visual.blocks[0].attn.qkv.weight.detach().std()) < 0.025


def test_logit_initialisation():
    siglip = small_model()
    scale, bias = siglip.logit_params()
    assert torch.allclose(scale, torch.tensor(10.0)) and torch.allclose(bias, torch.tensor(-10.0))
    assert torch.allclose(siglip.logit_scale, torch.tensor(math.log(10.0)))
    clip = small_model(loss="clip")
    scale, bias = clip.logit_params()
    assert bias is None and clip.logit_bias is None
    assert torch.allclose(scale, torch.tensor(1 / 0.07))
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(500.0))
    assert float(clip.logit_params()[0].detach()) == pytest.approx(100.0)


def test_clip_logit_scale_capped_in_place_keeps_its_gradient():
    """CLIP capped exp(scale) at 100 in the forward only: a stored log past log(100) had a zero gradient and
    stayed there for good. The trainer caps the parameter after each step (open_clip's rule), and at the cap the
    gradient flows."""
    clip = small_model(loss="clip")
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(105.0))
    clip.clamp_logit_scale_()
    assert float(clip.logit_scale.detach()) == pytest.approx(math.log(100.0))
    scale, _ = clip.logit_params()
    scale.backward()
    assert float(clip.logit_scale.grad) == pytest.approx(100.0, rel=1e-5)  # d exp(s)/ds at the cap
    siglip = small_model()
    with torch.no_grad():
        siglip.logit_scale.fill_(math.log(500.0))
    siglip.clamp_logit_scale_()  # SigLIP has no cap (big_vision)
    assert float(siglip.logit_params()[0].detach()) == pytest.approx(500.0)


# ---------------------------------------------------------------------------------------------------------------
# Vision tower


def test_packing_invariance():
    """An image's embedding (and its patch tokens) is the same alone, packed with others, in another order."""
    model = small_model().eval()
    grids = [(4, 6), (2, 2), (6, 4), (2, 8)]
    patches, cu, pos, max_len, lengths = pack_images(grids, merge=2)
    with torch.no_grad():
        packed, tokens = model.encode_image(patches, cu, pos, max_len, lengths, return_tokens=True)
        order = [2, 0, 3, 1]
        cu_perm = torch.tensor([0, *torch.tensor([lengths[i] for i in order]).cumsum(0).tolist()], dtype=torch.int32)
        permuted, tokens_perm = model.encode_image(select(patches, cu, order), cu_perm, select(pos, cu, order),
                                                   max_len, return_tokens=True)
        for j, i in enumerate(order):
            torch.testing.assert_close(permuted[j], packed[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tokens_perm, select(tokens, cu, order), rtol=1e-5, atol=1e-6)
        for i in range(len(grids)):
            alone = model.encode_image(select(patches, cu, [i]), torch.tensor([0, lengths[i]], dtype=torch.int32),
                                       select(pos, cu, [i]), lengths[i])
            torch.testing.assert_close(alone[0], packed[i], rtol=1e-5, atol=1e-6)


def test_static_padding():
    """Zero rows after cu_seqlens[-1] (PackedBatch.padding_tokens): the same features, the padding in no image."""
    model = small_model().eval()
    batch = make_batch([(2, 4), (3, 3)], [5, 9])
    with torch.no_grad():
        plain = model(batch)
        padded = make_batch([(2, 4), (3, 3)], [5, 9])
        padded.patches = torch.cat([padded.patches, torch.zeros(13, padded.patches.shape[1])])
        padded.pos = torch.cat([padded.pos, torch.zeros(13, 2, dtype=padded.pos.dtype)])
        padded.padding_tokens = 13
        out = model(padded)
        torch.testing.assert_close(out["image_features"], plain["image_features"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["loss"], plain["loss"], rtol=1e-5, atol=1e-6)
        _, tokens = model.encode_image(padded.patches, padded.cu_seqlens, padded.pos, padded.max_seqlen,
                                       padding_tokens=13, return_tokens=True)
        assert tokens.shape[0] == 17 + 13 and torch.isfinite(tokens).all()
        with pytest.raises(ValueError, match=r"padding_tokens must equal the number of patches 30, got 17 \+ 12"):
            model.encode_image(padded.patches, padded.cu_seqlens, padded.pos, padded.max_seqlen, padding_tokens=12)


def test_degenerate_grids():
    """1x1 and 1x64 patch grids: finite features and gradients; a one-token image pools to its own value."""
    model = small_model()
    patches, cu, pos, max_len, lengths = pack_images([(1, 1), (1, 64), (64, 1)])
    patches.requires_grad_(True)
    features, tokens = model.encode_image(patches, cu, pos, max_len, lengths, return_tokens=True)
    assert features.shape == (3, 48) and tokens.shape == (129, 64)
    features.square().sum().backward()
    assert torch.isfinite(features).all() and torch.isfinite(patches.grad).all()
    pool = model.visual.pool
    with torch.no_grad():  # softmax over one token is 1: the pool returns out(v) of that token
        _, v = pool.kv(tokens[:1]).chunk(2, dim=-1)
        torch.testing.assert_close(features[0], pool.out(v)[0], rtol=1e-5, atol=1e-6)


def test_attention_pool_against_per_image_softmax():
    torch.manual_seed(1)
    pool = small_model().visual.pool.double()
    lengths = [1, 7, 3, 30]
    x = torch.randn(sum(lengths), 64, dtype=torch.float64) * 3
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x.requires_grad_(True)
    got = pool(x, cu)
    expected = []
    heads, hd = pool.heads, pool.head_dim
    for chunk in x.split(lengths):
        k, v = pool.kv(chunk).view(len(chunk), 2, heads, hd).unbind(1)
        attn = torch.softmax(torch.einsum("thd,hd->ht", k, pool.query.view(heads, hd)) / math.sqrt(hd), dim=-1)
        expected.append(pool.out(torch.einsum("ht,thd->hd", attn, v).reshape(-1)))
    expected = torch.stack(expected)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)  # fp64 throughout, not fp32 inside
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [x, pool.query], g)
    grads_ref = torch.autograd.grad(expected, [x, pool.query], g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_vision_tower_against_plain_reimplementation():
    """The fused QKV layout, 2D RoPE and varlen attention wired as the docs say: recompute the tower with the
    ops' references, one image at a time."""
    model = small_model(**{"vision.depth": 2})
    vis = model.visual
    patches, cu, pos, max_len, lengths = pack_images([(2, 4), (3, 3), (1, 5)])
    got = vis.forward_tokens(patches, cu, pos, max_len, lengths)

    def rms(layer, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.eps) * layer.weight

    heads, hd = vis.heads, vis.width // vis.heads
    x = patches @ vis.patch_embed.weight.T + vis.patch_embed.bias
    for block in vis.blocks:
        h = rms(block.norm1, x)
        qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
        q, k, v = qkv[:, :64].view(-1, heads, hd), qkv[:, 64:128].view(-1, heads, hd), qkv[:, 128:].view(-1, heads, hd)
        q, k = rope_2d_ref(q, pos), rope_2d_ref(k, pos)
        o = varlen_attention_ref(q, k, v, cu).reshape(-1, 64)
        x = x + o @ block.attn.proj.weight.T + block.attn.proj.bias
        gate, up = (rms(block.norm2, x) @ block.mlp.gate_up.weight.T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ block.mlp.down.weight.T
    torch.testing.assert_close(got, rms(vis.norm, x), rtol=1e-5, atol=1e-5)


def test_bad_vision_inputs():
    model = small_model()
    patches, cu, pos, max_len, lengths = pack_images([(2, 3)])
    with pytest.raises(ValueError, match="patches must have shape"):
        model.encode_image(patches[:, :100], cu, pos, max_len)
    with pytest.raises(ValueError, match="pos must have shape"):
        model.encode_image(patches, cu, pos[:-1], max_len)
    with pytest.raises(ValueError, match="max_seqlen=3"):
        model.encode_image(patches, cu, pos, 3)
    with pytest.raises(TypeError, match="int32"):
        model.encode_image(patches, cu.long(), pos, max_len)


def test_host_lengths_and_empty_sequences_are_checked():
    """Host `seqlens` that disagree with cu_seqlens (same sum) once ran the attention on seqlens' boundaries and
    the pooling on cu_seqlens': one image's (or caption's) tokens attended into the next, silently. An empty image
    pooled to the pool's bias and an empty caption to zeros, both taken as real pairs by the loss."""
    model = small_model()
    patches, cu, pos, _, lengths = pack_images([(2, 2), (2, 2)])
    assert lengths == [4, 4]
    model.encode_image(patches, cu, pos, 8, seqlens=lengths)
    with pytest.raises(ValueError, match=r"seqlens must list the lengths of cu_seqlens, \[4, 4\]; got \[6, 2\]"):
        model.encode_image(patches, cu, pos, 8, seqlens=[6, 2])
    empty = torch.tensor([0, 4, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens holds an empty image \(index 1"):
        model.encode_image(patches, empty, pos, 8)
    tokens, tcu, tmax, tlens = pack_captions([4, 4])
    with pytest.raises(ValueError, match=r"text seqlens must list the lengths of text cu_seqlens"):
        model.encode_text(tokens, tcu, 6, seqlens=[6, 2])
    with pytest.raises(ValueError, match=r"text cu_seqlens holds an empty caption \(index 0"):
        model.encode_text(tokens, torch.tensor([0, 0, 8], dtype=torch.int32), 8)


# ---------------------------------------------------------------------------------------------------------------
# Text tower


def test_rope_1d_is_the_rotary_embedding():
    """rope_1d rotates the pairs (i, i + d/2) by position * theta**(-2i/d): relative positions only."""
    torch.manual_seed(0)
    d, theta = 32, 10000.0
    positions = torch.tensor([0, 1, 5, 17, 255])
    x = torch.randn(5, 3, d, dtype=torch.float64)
    cos, sin = rope_1d_cos_sin(positions, d, theta)
    got = rope_1d(x, cos.double(), sin.double())
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(5, d // 2, dtype=torch.float64), positions[:, None].double() * freqs)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * rot[:, None, :]
    # cos and sin are fp32 (as in Llama): angles up to 255 rad carry ~1e-5 of rounding
    torch.testing.assert_close(got, torch.cat((z.real, z.imag), dim=-1), rtol=0, atol=3e-5)
    q, k = torch.randn(2, 1, 1, d, dtype=torch.float64)

    def score(pq, pk):
        cq, sq = rope_1d_cos_sin(torch.tensor([pq]), d, theta)
        ck, sk = rope_1d_cos_sin(torch.tensor([pk]), d, theta)
        return float((rope_1d(q, cq.double(), sq.double()) * rope_1d(k, ck.double(), sk.double())).sum())

    assert score(3, 10) == pytest.approx(score(103, 110), rel=1e-5)
    assert score(3, 10) != pytest.approx(score(3, 11), rel=1e-3)


def test_caption_lengths_and_text_packing():
    """Captions of length 1 and of the full context, alone and packed: the same embeddings."""
    model = small_model().eval()
    context = model.text.context_length
    lengths = [1, context, 17, 1]
    tokens, cu, max_len, tlens = pack_captions(lengths)
    with torch.no_grad():
        packed = model.encode_text(tokens, cu, max_len, tlens)
        assert packed.shape == (4, 48) and torch.isfinite(packed).all()
        for i, n in enumerate(lengths):
            alone = model.encode_text(select(tokens, cu, [i]), torch.tensor([0, n], dtype=torch.int32), n)
            torch.testing.assert_close(alone[0], packed[i], rtol=1e-5, atol=1e-6)
    # A token's position matters (RoPE): reversing a caption changes its embedding.
    with torch.no_grad():
        fwd = model.encode_text(tokens[1:18], torch.tensor([0, 17], dtype=torch.int32), 17)
        rev = model.encode_text(tokens[1:18].flip(0), torch.tensor([0, 17], dtype=torch.int32), 17)
    assert not torch.allclose(fwd, rev, atol=1e-4)
    with pytest.raises(ValueError, match="context length"):
        model.encode_text(torch.zeros(context + 1, dtype=torch.long),
                          torch.tensor([0, context + 1], dtype=torch.int32), context + 1)
    with pytest.raises(ValueError, match="vocab_size=300"):
        model.encode_text(torch.tensor([1, 300]), torch.tensor([0, 2], dtype=torch.int32), 2)


def test_last_token_pool():
    model = small_model(**{"text.pool": "last"}).eval()
    tokens, cu, max_len, tlens = pack_captions([3, 1, 9])
    with torch.no_grad():
        feats = model.encode_text(tokens, cu, max_len, tlens)
        x = model.text.forward_tokens(tokens, cu, max_len, tlens)
        torch.testing.assert_close(feats, model.text.proj(x[cu[1:].long() - 1]))


# ---------------------------------------------------------------------------------------------------------------
# The two-tower model


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_every_parameter_gets_a_gradient(loss):
    model = small_model(loss=loss)
    batch = make_batch([(2, 2), (1, 5), (4, 3)], [5, 1, 12])
    out = model(batch)
    assert out["image_features"].shape == (3, 48) and out["text_features"].shape == (3, 48)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_loss_matches_reference_and_text_image_pairs():
    from fineviti.ops.contrastive import siglip_loss_ref

    model = small_model()
    batch = make_batch([(2, 2), (3, 1)], [4, 6, 2])
    batch.text_image = torch.tensor([0, 1, 1])
    out = model(batch)
    scale, bias = model.logit_params()
    expected = siglip_loss_ref(out["image_features"][batch.text_image].double(), out["text_features"].double(),
                               scale.double(), bias.double())
    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-5, atol=1e-6)
    batch.text_image = None
    with pytest.raises(ValueError, match="2 images and 3 captions"):
        model(batch)


def test_checkpointing_gives_the_same_gradients():
    batch = make_batch([(2, 4), (3, 3)], [7, 3])
    grads = []
    for ckpt in (False, True):
        model = small_model(grad_checkpointing=ckpt)
        model(batch)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                    reason="Triton on a CPU needs TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
def test_triton_backends_match_torch():
    """The vision tower with the Triton attention, fused QKV-split RoPE, RMSNorm and SwiGLU (the GPU defaults), fp32,
    forward and backward, against the torch backends; on the CPU under Triton's interpreter, at a tiny size."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {"vision": {"width": 64, "depth": 1, "heads": 2, "mlp_hidden": 64}}
    ref = small_model(norm_backend="torch", swiglu_backend="torch", **settings).to(device)  # the torch paths also
    # on a GPU, where "auto" means triton
    tri = small_model(attn_backend="triton", rope_backend="triton", norm_backend="triton", swiglu_backend="triton",
                      **settings).to(device)
    tri.load_state_dict(ref.state_dict())
    patches, cu, pos, max_len, lengths = (t.to(device) if isinstance(t, torch.Tensor) else t
                                          for t in pack_images([(3, 5), (1, 1), (2, 7)]))
    outs = []
    for model in (ref, tri):
        x = patches.clone().requires_grad_(True)
        feats = model.encode_image(x, cu, pos, max_len, lengths)
        feats.square().sum().backward()
        block = model.visual.blocks[0]  # the MLP and norm weights' gradients see their ops directly (the
        # residual branches are scaled down at initialisation, so the features alone hardly do)
        outs.append((feats, x.grad, block.attn.qkv.weight.grad, block.mlp.down.weight.grad,
                     block.mlp.gate_up.weight.grad, block.norm1.weight.grad, block.norm2.weight.grad))
    for a, b in zip(*outs, strict=True):  # atol relative to each tensor's scale (some are around 1e-4)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


@pytest.mark.gpu
def test_gpu_bf16_training_step():
    """On the GPU with the default backends (Triton attention and fused QKV-split RoPE, fused SigLIP loss) under
    bf16 autocast, with checkpointing: finite loss and gradients, features close to the fp32 torch-backend model.
    Head dim 64 (a shipped kernel configuration) keeps the compile count small."""
    settings = {"vision": {"width": 128, "depth": 2, "heads": 2, "mlp_hidden": 256},
                "text": {"vocab_size": 300, "width": 128, "depth": 2, "heads": 2, "mlp_hidden": 256}}
    ref = small_model(attn_backend="torch", rope_backend="torch", loss_backend="reference", norm_backend="torch",
                      swiglu_backend="torch", **settings).cuda()
    fast = small_model(attn_backend="auto", rope_backend="auto", grad_checkpointing=True, **settings).cuda()
    fast.load_state_dict(ref.state_dict())
    batch = make_batch([(16, 12), (2, 2), (30, 8), (4, 20)], [40, 1, 256, 77], merge=2).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fast(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for name, p in fast.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        expected = ref(batch)
    for key in ("image_features", "text_features"):
        cos = F.cosine_similarity(out[key].float(), expected[key], dim=-1)
        assert cos.min() > 0.99, (key, cos)
    torch.testing.assert_close(out["loss"].float(), expected["loss"], rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# Stage-2 aligner

LM = {"builtin_lm.vocab_size": 200, "builtin_lm.width": 64, "builtin_lm.depth": 2, "builtin_lm.heads": 2,
      "builtin_lm.mlp_hidden": 96}


def small_aligner(**overrides):
    torch.manual_seed(0)
    stage1 = small_model()
    return create_aligner(stage1.cfg, visual=stage1.visual, **{**LM, **overrides})


def aligner_inputs(aligner, grids=((2, 4), (2, 2)), prompts=((5, 6, 7), (8,)), answers=((9, 10), (11, 12, 13))):
    patches, cu, pos, max_len, lengths = pack_images(list(grids), merge=2)
    examples = [build_example(p, a, rows * cols // 4, aligner.placeholder_id, bos_id=1, eos_id=2)
                for (rows, cols), p, a in zip(grids, prompts, answers, strict=True)]
    ids, labels, mask = collate(examples, pad_id=0)
    return (patches, cu, pos, max_len, lengths), ids, labels, mask


def test_aligner_refuses_tokens_not_in_2x2_groups():
    """The merger concatenates each 4 consecutive tokens: row-major tokens (merge=1) or a 1x4 grid once passed the
    multiple-of-4 check and were merged as if they were 2x2 groups."""
    aligner = small_aligner()
    (patches, cu, pos, max_len, lengths), *_ = aligner_inputs(aligner)
    assert aligner.encode_images(patches, cu, pos, max_len, lengths).shape[0] == 3
    row_major = pack_images([(2, 4), (2, 2)], merge=1)
    with pytest.raises(ValueError, match=r"2x2 groups.*tokens 0..3 are at \[\[0, 0\], \[0, 1\], \[0, 2\], \[0, 3\]\]"):
        aligner.encode_images(*row_major)
    with pytest.raises(ValueError, match=r"2x2 groups"):
        aligner.encode_images(*pack_images([(1, 4)], merge=1))


def test_builtin_lm_residual_projections_are_scaled_at_init():
    """The built-in LM's attention output (blocks.i.proj) writes into the residual stream: initialised with std
    0.02 / sqrt(2 * depth) like the towers' attn.proj, not 0.02."""
    lm = small_aligner().lm
    depth = len(lm.blocks)
    expected = 0.02 / math.sqrt(2 * depth)
    for block in lm.blocks:
        for linear in (block.proj, block.mlp.down):
            assert abs(linear.weight.std().item() - expected) < 0.25 * expected, linear


def test_build_example_and_collate():
    ids, labels = build_example([5, 6], [7, 8], 3, placeholder_id=99, bos_id=1, eos_id=2)
    assert ids.tolist() == [1, 99, 99, 99, 5, 6, 7, 8, 2]
    assert labels.tolist() == [IGNORE_INDEX] * 6 + [7, 8, 2]
    ids2, labels2 = build_example([5], [7], 1, placeholder_id=99)
    batch_ids, batch_labels, mask = collate([(ids, labels), (ids2, labels2)], pad_id=0)
    assert batch_ids[1].tolist() == [99, 5, 7] + [0] * 6 and mask[1].tolist() == [1, 1, 1] + [0] * 6
    assert batch_labels[1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7] + [IGNORE_INDEX] * 6


def test_splice_places_image_tokens_at_placeholders():
    aligner = small_aligner()
    images, ids, labels, mask = aligner_inputs(aligner)
    patches, cu, pos, max_len, lengths = images
    image_embeds = aligner.encode_images(*images)
    assert image_embeds.shape == (sum(lengths) // 4, aligner.lm.hidden_size)
    embeds = aligner.splice(ids, image_embeds, cu // 4)
    is_image = ids == aligner.placeholder_id
    torch.testing.assert_close(embeds[is_image], image_embeds)
    torch.testing.assert_close(embeds[~is_image], aligner.lm.embed(ids[~is_image]))
    # sample_image: two samples asking about the same image get the same rows
    ids_same = torch.stack([ids[1, :8], ids[1, :8]])
    embeds_same = aligner.splice(ids_same, image_embeds, cu // 4, sample_image=torch.tensor([1, 1]))
    torch.testing.assert_close(embeds_same[0], embeds_same[1])
    torch.testing.assert_close(embeds_same[0][ids_same[0] == aligner.placeholder_id], image_embeds[2:3])
    with pytest.raises(ValueError, match="placeholder tokens"):
        aligner.splice(torch.cat([ids[:, :1], ids[:, 2:]], 1), image_embeds, cu // 4)  # one placeholder fewer


def test_aligner_loss_is_answer_only():
    aligner = small_aligner()
    images, ids, labels, mask = aligner_inputs(aligner)
    out = aligner(*images[:4], ids, labels, mask, images[4], return_logits=True)
    logits = out["logits"]
    manual, count = [], 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if labels[b, t + 1] != IGNORE_INDEX:
                manual.append(F.cross_entropy(logits[b, t][None].float(), labels[b, t + 1][None]))
                count += 1
    assert int(out["n_targets"]) == count == 3 + 4  # answers plus eos
    torch.testing.assert_close(out["loss"], torch.stack(manual).mean())
    # The loss has no gradient at positions whose next token is not an answer token.
    (dlogits,) = torch.autograd.grad(out["loss"], logits, retain_graph=True)
    targets = torch.zeros_like(labels, dtype=torch.bool)
    targets[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert dlogits[~targets].abs().max() == 0 and dlogits[targets].abs().sum(-1).min() > 0
    # Relabelling a non-answer position (as if it were a target) changes the loss; the loss with the
    # original labels ignores what the model predicts there.
    relabelled = labels.clone()
    relabelled[0, 3] = 5
    assert not torch.allclose(next_token_loss(logits, relabelled)[0], out["loss"])
    # every parameter that trains in stage 2 gets a gradient (the pooling head is frozen)
    out["loss"].backward()
    assert all(not p.requires_grad for p in aligner.visual.pool.parameters())
    for name, p in aligner.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("autocast", [False, True])
def test_aligner_head_loss_matches_the_logits_path(autocast):
    """The default training forward (labels, no logits) runs the output head on the answer positions only, in
    chunks: the same loss, target count and gradients of every parameter as the full-logits path (return_logits),
    in fp32 and under bf16 autocast (where both round the logits to bf16 before the fp32 softmax)."""
    images, ids, labels, mask = aligner_inputs(small_aligner())
    results = []
    for return_logits in (True, False):
        torch.manual_seed(0)
        aligner = small_aligner()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            out = aligner(*images[:4], ids, labels, mask, images[4], return_logits=return_logits)
        assert ("logits" in out) == return_logits
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in aligner.named_parameters() if p.grad is not None}
        results.append((out["loss"].detach(), int(out["n_targets"]), grads))
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b == 7 and grads_a.keys() == grads_b.keys()
    tol = dict(rtol=1e-3, atol=1e-5) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_b, loss_a, **tol)
    for name, g in grads_a.items():
        scale = g.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grads_b[name] / scale, g / scale, **tol, msg=name)


def test_aligner_host_counts_give_the_same_loss_and_gradients():
    """The trainer passes the placeholder and target counts it knows on the host, so that the forward reads nothing
    from the device (it read both, two synchronisations mid-forward): the same loss, count and gradients as
    without them, with samples that share an image (sample_image, where the image rows are gathered); counts
    that do not match the batch are refused by the value checks."""
    images, ids, labels, mask = aligner_inputs(small_aligner())
    sample_image = torch.tensor([1, 1])  # both samples use the second image (the gathered path)
    same = ids.clone()
    same[0] = ids[1]
    labels_same = labels.clone()
    labels_same[0] = labels[1]
    placeholders = int((same == small_aligner().placeholder_id).sum())
    targets = int((labels_same[:, 1:] != IGNORE_INDEX).sum())
    results = []
    for counts in ({}, {"image_tokens": placeholders, "n_targets": targets}):
        torch.manual_seed(0)
        aligner = small_aligner()
        out = aligner(*images[:4], same, labels_same, mask, images[4], sample_image=sample_image, **counts)
        out["loss"].backward()
        results.append((out["loss"].detach(), int(out["n_targets"]),
                        {n: p.grad.clone() for n, p in aligner.named_parameters() if p.grad is not None}))
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b == targets > 0 and grads_a.keys() == grads_b.keys()
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=0, atol=0, msg=name)
    for wrong in ({"image_tokens": placeholders + 1}, {"n_targets": targets - 1}):
        name = next(iter(wrong))
        with pytest.raises(ValueError, match=rf"{name}={wrong[name]} but the batch has"):
            small_aligner()(*images[:4], same, labels_same, mask, images[4], sample_image=sample_image, **wrong)


def test_aligner_right_padding_does_not_leak():
    """A sample's logits are the same alone and batched with a longer sample (right padding, causal LM)."""
    aligner = small_aligner().eval()
    images, ids, labels, mask = aligner_inputs(aligner)
    patches, cu, pos, max_len, lengths = images
    with torch.no_grad():
        both = aligner(patches, cu, pos, max_len, ids, labels, mask, lengths, return_logits=True)["logits"]
        n = int(mask[1].sum())
        alone = aligner(patches[lengths[0]:], cu[1:] - cu[1], pos[lengths[0]:], lengths[1], ids[1:, :n])["logits"]
    torch.testing.assert_close(both[1, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_aligner_checkpointing_and_generate():
    images, ids, labels, mask = aligner_inputs(small_aligner())
    grads = []
    for ckpt in (False, True):
        aligner = small_aligner(grad_checkpointing=ckpt)
        aligner(*images[:4], ids, labels, mask, images[4])["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in aligner.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    patches, cu, pos, max_len, lengths = images
    new = aligner.generate(patches[:lengths[0]], cu[:2], pos[:lengths[0]], lengths[0], ids[0, :12],
                           max_new_tokens=3)
    assert new.shape == (3,) and int(new.max()) < aligner.lm.vocab_size


class _FakeHFBase(torch.nn.Module):
    """What a Hugging Face causal LM keeps under base_model_prefix: inputs_embeds in, last_hidden_state out."""

    def __init__(self, vocab, width):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)

    def forward(self, inputs_embeds, attention_mask=None, use_cache=None):
        assert use_cache is False  # a cache filled in the forward would be filled again by a checkpointed recompute
        hidden = torch.tanh(self.mix(inputs_embeds))
        if attention_mask is not None:  # as attention would, the mask changes every position's state: it must reach
            hidden = hidden * (1 + attention_mask.sum(1, keepdim=True)[..., None].to(hidden.dtype) / 8)  # the base
        return types.SimpleNamespace(last_hidden_state=hidden)


class _FakeHFCausalLM(torch.nn.Module):
    """The parts of a transformers *ForCausalLM that HFCausalLM uses, with an optional Gemma-style soft cap and an
    optional logit multiplier under a config name the adapter does not know (caught by its numeric check)."""

    base_model_prefix = "model"

    def __init__(self, vocab=200, width=48, softcap=None, multiplier=None):
        super().__init__()
        self.config = types.SimpleNamespace(final_logit_softcapping=softcap, some_new_logit_multiplier=multiplier)
        self.model = _FakeHFBase(vocab, width)
        self.lm_head = torch.nn.Linear(width, vocab, bias=True)

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, inputs_embeds, attention_mask=None, use_cache=None):
        logits = self.lm_head(self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                         use_cache=use_cache).last_hidden_state)
        cap, mult = self.config.final_logit_softcapping, self.config.some_new_logit_multiplier
        if mult is not None:
            logits = logits * mult
        return types.SimpleNamespace(logits=logits if cap is None else cap * torch.tanh(logits / cap))


def _hf_lm(softcap=None, multiplier=None):
    lm = HFCausalLM.__new__(HFCausalLM)  # without transformers or a directory: the adapter around a fake model
    torch.nn.Module.__init__(lm)
    lm.model = _FakeHFCausalLM(softcap=softcap, multiplier=multiplier)
    lm.vocab_size, lm.hidden_size = 200, 48
    return lm


@pytest.mark.parametrize("softcap,multiplier", [(None, None), (3.0, None), (None, 2.0)])
def test_aligner_head_loss_through_a_hugging_face_adapter(softcap, multiplier):
    """A Hugging Face LM takes the head loss through its base model (with the attention mask) and lm_head (with
    its bias); one whose logits are transformed keeps the full logits, so its loss stays right: Gemma's soft cap by
    its config name, a multiplier under an unknown name by the adapter's numeric check."""
    stage1 = small_model()
    images, ids, labels, mask = aligner_inputs(create_aligner(stage1.cfg, visual=stage1.visual, lm=_hf_lm()))
    results = []
    for return_logits in (True, False):
        torch.manual_seed(0)
        lm = _hf_lm(softcap, multiplier)
        aligner = create_aligner(stage1.cfg, visual=stage1.visual, lm=lm)
        assert lm.head_loss_supported() == (softcap is None and multiplier is None)
        out = aligner(*images[:4], ids, labels, mask, images[4], return_logits=return_logits)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in aligner.named_parameters() if p.grad is not None}
        for p in aligner.parameters():
            p.grad = None
        results.append((out["loss"].detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert "lm.model.lm_head.bias" in grads_a and grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        scale = g.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grads_b[name] / scale, g / scale, rtol=1e-5, atol=1e-6, msg=name)


def test_aligner_config_and_hf_adapter_errors(tmp_path):
    cfg = cfg_mod.aligner_config("tiny")
    assert isinstance(cfg, AlignerConfig) and cfg.vision == cfg_mod.tiny().vision
    aligner = create_aligner("tiny", device="meta")
    assert isinstance(aligner.lm, BuiltinLM) and aligner.placeholder_id == aligner.lm.vocab_size
    assert cfg_mod.count_params(aligner.lm) == aligner.cfg.builtin_lm.num_params()
    with pytest.raises(FileNotFoundError, match="local directory"):
        HFCausalLM(str(tmp_path / "missing"))
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="transformers"):
            HFCausalLM(str(tmp_path))


def test_model_loss_takes_every_ranks_negatives_by_default():
    """The model's loss passes group="default" on (the world group under torch.distributed, as the losses' own
    default): with None, a DDP user calling model(batch) got per-rank losses."""
    import inspect

    from fineviti.model.two_tower import FineViT

    for method in (FineViT.forward, FineViT.contrastive_loss):
        assert inspect.signature(method).parameters["group"].default == "default"


def test_decoder_layer_lists_take_the_named_layers_once_and_not_shared_ones():
    """`_no_split_modules` names the layer class (in a checkpoint wrapper too); a list whose layers share
    parameters (Zamba's shared transformer block) is left out, since FSDP2 cannot put one parameter in two units;
    the trainer warns when an LM declares no list at all."""
    import warnings

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from fineviti.model.aligner import decoder_layer_lists
    from fineviti.train import parallel

    class DecoderLayer(torch.nn.Module):
        def __init__(self, shared=None):
            super().__init__()
            self.mlp = torch.nn.Linear(4, 4)
            self.shared = shared

    class Other(torch.nn.Module):
        pass

    class Model(torch.nn.Module):
        _no_split_modules = ["DecoderLayer"]

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([DecoderLayer(), checkpoint_wrapper(DecoderLayer())])
            shared = torch.nn.Linear(4, 4)
            self.hybrid = torch.nn.ModuleList([DecoderLayer(shared), DecoderLayer(shared)])
            self.mixed = torch.nn.ModuleList([DecoderLayer(), Other()])

    model = Model()
    assert decoder_layer_lists(model) == [model.layers]
    Model._no_split_modules = None
    assert decoder_layer_lists(model) == []

    class Holder(torch.nn.Module):  # what HFCausalLM declares, for a model that names no layer class
        def __init__(self):
            super().__init__()
            self.model = model

        def layer_lists(self):
            return decoder_layer_lists(self.model)

    cfg = types.SimpleNamespace(activation_checkpointing="full", selective_every=2, compile=False, strategy="ddp")
    with pytest.warns(UserWarning, match=r"lm \(Model\) declares no layer list .* FSDP2 shards it as one unit"):
        parallel.parallelize(torch.nn.ModuleDict({"lm": Holder()}), cfg, parallel.World(), None)
    cfg.activation_checkpointing = "none"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel.parallelize(torch.nn.ModuleDict({"lm": Holder()}), cfg, parallel.World(), None)  # nothing to say

"""The FLOP counter: against a hand count for a tiny configuration, and against torch's FlopCounterMode running the
towers (attention through SDPA's math path, whose matmuls the counter sees), with and without recomputation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fineviti.data.batch import PackedBatch
from fineviti.data.positions import build_positions_ref
from fineviti.model import count_flops, create_model
from fineviti.model.flops import text_flops, vision_flops

HAND = {"embed_dim": 16, "vision": {"width": 32, "depth": 2, "heads": 2, "mlp_hidden": 48},
        "text": {"vocab_size": 100, "width": 32, "depth": 1, "heads": 2, "mlp_hidden": 64}}


def test_hand_count():
    """Images of 4 and 9 patches (p = 14), captions of 3 and 5 tokens; every figure worked out by hand:
    vision, per token: 588*32 (patch, x4: no pixel gradient) = 18816, x 13 tokens x 4 = 978432; 2*(4*32^2 +
    3*32*48) (blocks) + 2*32^2 (pool k/v) = 19456, x 13 tokens, + 32*16 per image x 2 = 253952 -> x6 = 1523712;
    1523712 + 978432 = 2502144; attention 12 * (16 + 81) * 32 * 2 layers = 74496;
    pool attention 12 * 13 * 32 = 4992. text: (4*32^2 + 3*32*64) * 8 tokens + 32*16 x 2 = 82944 -> x6 = 497664;
    attention 12 * (9 + 25) * 32 = 13056. loss 6 * 2 * 2 * 16 = 384.
    recompute (blocks up to, not including, the SwiGLU down projection): vision 2*2*(4*32^2 + 2*32*48)*13
    + 4*97*32*2 = 397568, text 2*(4*32^2 + 2*32*64)*8 + 4*34*32 = 135424."""
    cfg = create_model("tiny", device="meta", **HAND).cfg
    got = count_flops(cfg, [4, 9], [3, 5])
    assert (got.vision_matmul, got.vision_attention, got.vision_pool_attention) == (2502144, 74496, 4992)
    assert (got.text_matmul, got.text_attention, got.loss, got.recompute) == (497664, 13056, 384, 0)
    assert got.model == got.hardware == 3092736
    ckpt = count_flops(cfg, [4, 9], [3, 5], recompute=True)
    assert ckpt.recompute == 397568 + 135424 and ckpt.model == got.model
    assert ckpt.hardware == got.model + 532992
    fwd = count_flops(cfg, [4, 9], [3, 5], training=False, recompute=True)
    assert (fwd.vision_matmul, fwd.vision_attention, fwd.text_matmul, fwd.loss, fwd.recompute) == \
        (997120, 24832, 165888, 128, 0)
    # negatives from other ranks only grow the loss term
    assert count_flops(cfg, [4, 9], [3, 5], world_negatives=8).loss == 6 * 2 * 8 * 16
    with pytest.raises(ValueError, match="seqlens"):
        count_flops(cfg, [4, -1], [3])


def _counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("recompute", [False, True])
def test_matches_torch_flop_counter(recompute):
    torch.manual_seed(0)
    model = create_model("tiny", attn_backend="torch", rope_backend="torch", grad_checkpointing=recompute, **HAND)
    grid = torch.tensor([[2, 4], [3, 3], [1, 5]], dtype=torch.int32)
    cu, pos = build_positions_ref(grid)
    lengths = (cu[1:] - cu[:-1]).tolist()
    patches = torch.randn(int(cu[-1]), 588)  # as in training: no pixel gradient
    text_lengths = [7, 1, 20]
    tokens = torch.randint(0, 100, (sum(text_lengths),))
    tcu = torch.tensor([0, 7, 8, 28], dtype=torch.int32)
    vision = vision_flops(model.cfg.vision, 16, lengths, recompute=recompute)
    text = text_flops(model.cfg.text, 16, text_lengths, recompute=recompute)
    # The pool's one-query attention is elementwise work in torch, which FlopCounterMode does not count.
    vis_counted = _counted(lambda: model.visual(patches, cu, pos, max(lengths), lengths).sum().backward())
    assert vis_counted == vision.vision_matmul + vision.vision_attention + vision.recompute
    txt_counted = _counted(lambda: model.text(tokens, tcu, 20, text_lengths).sum().backward())
    assert txt_counted == text.text_matmul + text.text_attention + text.recompute
    with torch.no_grad():
        vis_fwd = _counted(lambda: model.visual(patches, cu, pos, max(lengths), lengths))
    fwd = vision_flops(model.cfg.vision, 16, lengths, training=False)
    assert vis_fwd == fwd.vision_matmul + fwd.vision_attention
    batch = PackedBatch(patches=patches, cu_seqlens=cu, pos=pos, max_seqlen=max(lengths), seqlens=lengths,
                        grid_hw=grid, tokens=tokens, text_cu_seqlens=tcu, text_max_seqlen=20,
                        text_seqlens=text_lengths)
    assert model.flops(batch).as_dict() == count_flops(model.cfg, lengths, text_lengths, recompute=recompute).as_dict()


@pytest.mark.parametrize("freeze", ["", "vision", "vision,merger", "lm", "merger,projector,lm"])
def test_stage2_count_matches_torch_flop_counter(freeze):
    """stage2_flops against FlopCounterMode on one region sample (no padding, which the counter would count), with
    parts frozen: a frozen part costs its forward, plus its input gradient where a part before it trains. The
    LM's causal attention runs through SDPA's math path, which computes the whole T x T square: the counter sees
    twice the causal count there."""
    from fineviti.train import stage2
    from fineviti.train.config import preset
    from fineviti.train.data import RandomBatches

    torch.manual_seed(0)
    cfg = preset("debug")
    model = stage2.Aligner(dataclasses.replace(cfg.aligner, attn_backend="torch", rope_backend="torch"))
    stage2.freeze_parts(model, [p for p in freeze.split(",") if p])
    batch = RandomBatches(dataclasses.replace(cfg.random_data, seed=0), patch_size=14, merge=2, vocab_size=96,
                          with_regions=True).make(0)
    region = stage2.region_tasks(batch, stage2.ByteIds(96), tasks=["box2caption"], regions_per_image=1,
                                 merge=2, placeholder_id=model.placeholder_id, seed=0, step=0, rank=0)
    first = region.sample_image == region.sample_image[0]
    region = dataclasses.replace(region, input_ids=region.input_ids[first][:1], labels=region.labels[first][:1],
                                 attention_mask=region.attention_mask[first][:1],
                                 sample_image=region.sample_image[first][:1], n_samples=1)
    length = int(region.attention_mask.sum())
    region = dataclasses.replace(region, input_ids=region.input_ids[:, :length], labels=region.labels[:, :length],
                                 attention_mask=region.attention_mask[:, :length],
                                 answer_tokens=int((region.labels != -100).sum()))

    def step():
        out = model(batch.patches, batch.cu_seqlens, batch.pos, batch.max_seqlen, region.input_ids,
                    labels=region.labels, attention_mask=region.attention_mask, seqlens=batch.seqlens,
                    sample_image=region.sample_image)
        out["loss"].backward()

    lm = cfg.aligner.builtin_lm
    causal_excess = 6 * lm.depth * lm.width * length * length
    # linear_cross_entropy recomputes the answer positions' logits in its backward: hardware, not model, FLOPs
    head_recompute = 2 * model.lm.embed.weight.numel() * region.answer_tokens
    assert _counted(step) == stage2.stage2_flops(model, batch.seqlens, region) + causal_excess + head_recompute


def test_stage2_output_head_of_other_lms():
    """_output_head: BuiltinLM's tied embedding, a Hugging Face model's output embedding, and None (not an
    AttributeError: stage2_flops runs every step) for one whose get_output_embeddings() is None."""
    from fineviti.model.aligner import BuiltinLM
    from fineviti.model.config import BuiltinLMConfig
    from fineviti.train.stage2 import _output_head

    builtin = BuiltinLM(BuiltinLMConfig(vocab_size=50, width=32, depth=1, heads=2, mlp_hidden=32, max_length=64))
    assert _output_head(builtin) is builtin.embed.weight

    class HF(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.lm_head = head

        def get_output_embeddings(self):
            return self.lm_head

    class Wrapper(torch.nn.Module):  # HFCausalLM's layout: the HF model under .model
        def __init__(self, head):
            super().__init__()
            self.model = HF(head)

    head = torch.nn.Linear(16, 50, bias=False)
    assert _output_head(Wrapper(head)) is head.weight and _output_head(HF(head)) is head.weight
    assert _output_head(Wrapper(None)) is None and _output_head(torch.nn.Linear(2, 2)) is None

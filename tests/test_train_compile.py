"""The trainer's `parallel.compile` (torch.compile per block, inside activation checkpointing) with our kernels
(Triton, under the interpreter here) and with the torch attention backend (a CPU's default): the same loss and
gradients as eager, and packs of other image counts and lengths reuse the compiled blocks instead of recompiling
each time (the host-side lengths once put a guard on every pack's list of lengths; the torch backend's host read of
them did so too, until it became one custom op under tracing)."""

import contextlib
import dataclasses

import pytest
import torch

from fineviti.model import FineViT
from fineviti.train import parallel
from fineviti.train.config import RandomDataConfig, preset
from fineviti.train.data import RandomBatches


def pack(cfg, seed: int, max_side: int):
    random = RandomDataConfig(token_budget=256, min_side=2, max_side=max_side, min_text=8, max_text=24, seed=seed)
    source = RandomBatches(random, patch_size=cfg.model.vision.patch_size, merge=cfg.model.vision.merge,
                           vocab_size=cfg.model.text.vocab_size)
    return source.make(0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("attn_backend,checkpointing", [("triton", "full"), ("torch", "full"), ("torch", "none")])
def test_compiled_blocks_match_eager_and_do_not_recompile_per_pack(attn_backend, checkpointing):
    """checkpointing "none": the compiled blocks called directly, not inside a checkpoint wrapper (as "selective"
    leaves every other block); there a max_seqlen converted with operator.index was pinned, a graph per value."""
    # past dynamo's recompile limit the blocks would quietly run eager, and stop adding graphs: make that an error
    limit = (torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
             if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit") else contextlib.nullcontext())
    with limit:
        _compiled_against_eager(attn_backend, checkpointing)


def _compiled_against_eager(attn_backend, checkpointing="full"):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = preset("debug")
    cfg.model.attn_backend = attn_backend  # "torch": the CPU default, one opaque op when traced
    cfg.model.rope_backend = cfg.model.loss_backend = "triton"
    torch.manual_seed(0)
    # the eager reference attends with the torch backend: under the interpreter an eager Triton pass costs as much
    # as a compiled one (45 of this test's 105 s), and the two backends agree to fp32 rounding (test_attention)
    eager = FineViT(dataclasses.replace(cfg.model, attn_backend="torch"))
    compiled = FineViT(cfg.model)
    compiled.load_state_dict(eager.state_dict())
    # as the presets run it: activation checkpointing around the blocks, then compile (parallel.setup's order)
    assert (parallel.apply_activation_checkpointing(compiled, checkpointing) > 0) is (checkpointing != "none")
    assert parallel.apply_compile(compiled) == sum(len(blocks) for blocks in parallel.block_lists(compiled)) > 0
    # (seed, largest side in patches): 2 to 30 images, the longest of 16 to 128 patch tokens, so the
    # attention's short (<= 64) and long buckets both run. Under the interpreter the Triton backend costs about a
    # second per image and pass, so it leaves out the 30-image pack (about a third of its time); 2 to 13 images
    # still give four image counts and three longest lengths.
    shapes = ((1, 8), (1, 12), (1, 4), (2, 8), (2, 16))
    packs = [pack(cfg, seed, side) for seed, side in shapes if attn_backend != "triton" or (seed, side) != (1, 4)]
    assert len({len(b.seqlens) for b in packs}) >= 3 and len({max(b.seqlens) for b in packs}) >= 3
    graphs = []
    from fineviti.kernels import varlen_attention as kernels

    schedules = []  # the host lengths each of the compiled model's attention launches got (None: none)
    original = kernels.block_schedule

    def block_schedule(cu, block, total, seqlens=None):
        schedules.append(seqlens)
        return original(cu, block, total, seqlens)

    kernels.block_schedule = block_schedule
    try:
        for batch in packs:
            for model in (eager, compiled):
                model.zero_grad(set_to_none=True)
            want = eager(batch)["loss"]
            want.backward()
            schedules.clear()
            got = compiled(batch)["loss"]
            got.backward()
            if attn_backend == "triton":  # compiled, the blocks still launch exact grids from the host lengths
                assert schedules and all(s is not None for s in schedules), schedules
            _check_against_eager(eager, compiled, got, want)
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        kernels.block_schedule = original
    # the first pack compiles one graph per tower (the blocks share their code; dynamic shapes from the start), and
    # no later pack compiles anything. Compiled with static shapes first, each tower compiled twice (static, then
    # dynamic: [2, 4, 4, 4, 4]); a block's graph once broke at the RoPE theta check (math.isfinite on the float
    # dynamo keeps symbolic) where no checkpoint wrapper surrounds it ("none"): [2, 7, 11, 13, 13] graphs, and a
    # pinned max_seqlen gave [2, 7, 11, 14, 16].
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs == [2] * len(graphs), graphs
    torch._dynamo.reset()


def _check_against_eager(eager, compiled, got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if a.grad is not None:
            # atol relative to the tensor's largest gradient: an element summed over many tokens with
            # cancellation (a bias's) keeps the absolute rounding of its largest terms, and the reference rounds
            # its attention differently (the torch backend)
            atol = 1e-5 * max(1.0, a.grad.abs().max().item())
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=atol, msg=name)

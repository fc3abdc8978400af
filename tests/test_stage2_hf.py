"""Stage 2 with a Hugging Face causal LM (aligner.lm=DIR, the `hf` extra): tiny random models built from their
configs here (nothing downloaded), with the synthetic data set's tokenizer as theirs. The trainer runs,
checkpoints, resumes exactly and exports; the decoder layers are blocks to the trainer's activation
checkpointing, compile and FSDP2 (found through `_no_split_modules`); a checkpointed layer recomputes without the
key/value cache (Gemma 2 failed with it); the loss without logits equals the loss of the full logits, and a
soft-capped model takes the full logits; a bf16 checkpoint loads as fp32 weights. Two ranks:
tests/test_train_dist.py."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fineviti.model.aligner import HFCausalLM, decoder_layer_lists  # noqa: E402
from fineviti.train import parallel  # noqa: E402
from fineviti.train.config import apply_cli_overrides, preset  # noqa: E402
from fineviti.train.trainer import Trainer  # noqa: E402
from tests.dist_util import train_until  # noqa: E402
from tests.hf_util import make_hf_lm  # noqa: E402


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    from fineviti.data import synth

    root = tmp_path_factory.mktemp("hf_lm")
    synth.generate(root / "data", images=16, heldout=2, processes=1, vocab_size=300)
    tokenizer = root / "data" / "tokenizer.json"
    return root, {kind: make_hf_lm(root / kind, tokenizer, kind) for kind in ("llama", "qwen2", "gemma2")}


def _config(run_dir, lm, *overrides):
    return apply_cli_overrides(preset("debug"), [f"run_dir={run_dir}", "training.stage=2", f"aligner.lm={lm}",
                                                 "training.steps=3", "checkpoint.interval=2", *overrides])


def _run(cfg, crash_at=None):
    return train_until(Trainer(cfg), crash_at)


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "step" in r and "event" not in r}


def _params(trainer):
    return {n.replace("_checkpoint_wrapped_module.", ""): p.detach().clone()
            for n, p in trainer.raw_model.named_parameters()}


def test_trains_checkpointed_and_resumes_exactly(lms, tmp_path):
    """On shards, read with the LM's own tokenizer; activation checkpointing over the LM's layers too; a run killed
    after its step-2 checkpoint and resumed ends where the uninterrupted run does."""
    root, lm = lms
    shards = ["training.data_source=shards", f"data.path={root / 'data' / 'train'}", "data.merge=2",
              "data.token_budget=256", "parallel.activation_checkpointing=full"]
    whole = _run(_config(tmp_path / "whole", lm["llama"], *shards))
    lm_layers = decoder_layer_lists(whole.raw_model.lm.model)
    assert [len(layers) for layers in lm_layers] == [2]
    assert all(type(b).__name__ == "CheckpointWrapper" for b in lm_layers[0])
    losses = _losses(tmp_path / "whole")
    vocab = whole.raw_model.lm.vocab_size
    assert sorted(losses) == [1, 2, 3] and abs(losses[1] - math.log(vocab)) < 0.5  # a random LM: about ln(vocab)
    assert whole.cfg.data.tokenizer == str(lm["llama"] / "tokenizer.json")  # the LM's own vocabulary
    _run(_config(tmp_path / "resumed", lm["llama"], *shards), crash_at=3)  # killed as step 3 begins
    assert sorted(_losses(tmp_path / "resumed")) == [1, 2]
    resumed = _run(_config(tmp_path / "resumed", lm["llama"], *shards, "checkpoint.resume=auto"))
    assert _losses(tmp_path / "resumed")[3] == losses[3]
    want, got = _params(whole), _params(resumed)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    # exported whole: the model is built on the meta device, where from_pretrained refuses (the LM's config.json
    # gives its architecture; the checkpoint its weights)
    from safetensors.torch import load_file

    from fineviti.train.export import export_checkpoint

    exported = load_file(str(export_checkpoint(tmp_path / "whole", tmp_path / "full.safetensors", part="full")))
    assert any(name.startswith("lm.model.") for name in exported)
    for name, value in want.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)
    vision = load_file(str(export_checkpoint(tmp_path / "whole", tmp_path / "vision.safetensors")))
    assert vision and not any(name.startswith("lm.") for name in vision)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2"])
def test_decoder_layers_are_blocks_and_recompute_alike(lms, kind):
    """block_lists finds the decoder layers (and each once); checkpointed, they give the gradients of the plain
    model: Gemma 2's layers filled their key/value cache again on the recompute (10 keys for 5 queries) until the
    adapter passed use_cache=False."""
    _, lm = lms
    plain = HFCausalLM(str(lm[kind]))
    plain.train()
    wrapped = copy.deepcopy(plain)
    assert [len(b) for b in parallel.block_lists(wrapped)] == [2]
    assert parallel.apply_activation_checkpointing(wrapped, "full") == 2
    assert [len(b) for b in parallel.block_lists(wrapped)] == [2]  # found again inside their wrappers
    x = torch.randn(2, 5, plain.hidden_size, generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (plain, wrapped):
        model(x).square().mean().backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2"])
def test_loss_without_logits_is_the_full_logits_loss(lms, tmp_path, kind):
    """The aligner's loss over the answer positions only (no (B, T, V) logits) against its loss from the full
    logits, forward and gradients; Gemma 2's soft cap makes its logits more than the head's product, so it keeps
    the full logits (head_loss_supported False)."""
    from fineviti.model.aligner import Aligner, build_example, collate
    from fineviti.train.data import RandomBatches

    _, lm = lms
    cfg = _config(tmp_path, lm[kind])
    torch.manual_seed(0)
    model = Aligner(cfg.aligner, lm=HFCausalLM(str(lm[kind])))
    assert model.lm.head_loss_supported() is (kind != "gemma2")
    batch = RandomBatches(cfg.random_data, patch_size=cfg.aligner.vision.patch_size, merge=2,
                          vocab_size=model.lm.vocab_size).make(0)
    n_tokens = [int(h * w) // 4 for h, w in batch.grid_hw.tolist()]
    examples = [build_example([5 + i, 6], [7, 8 + i, 9], n, model.placeholder_id, bos_id=1, eos_id=2)
                for i, n in enumerate(n_tokens)]
    input_ids, labels, mask = collate(examples)
    results = []
    for full in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(batch.patches, batch.cu_seqlens, batch.pos, batch.max_seqlen, input_ids, labels, mask,
                    return_logits=full)
        assert ("logits" in out) is full
        out["loss"].backward()
        results.append((out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}))
    (loss, grads), (want_loss, want_grads) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        atol = 1e-6 * max(1.0, want_grads[name].abs().max().item())
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=atol, msg=name)


def test_a_bf16_checkpoint_trains_in_fp32_weights(lms, tmp_path):
    """transformers 5 loads a checkpoint in its own dtype; pretrained LMs ship bf16. The adapter loads fp32 weights
    (the optimizer's, as the vision tower's; mixed precision computes in bf16), unless dtype says otherwise."""
    root, _ = lms
    folder = make_hf_lm(tmp_path / "bf16", root / "data" / "tokenizer.json", dtype=torch.bfloat16)
    assert {p.dtype for p in HFCausalLM(str(folder)).parameters()} == {torch.float32}
    assert {p.dtype for p in HFCausalLM(str(folder), dtype=None).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in HFCausalLM(str(folder), dtype=torch.float16).parameters()} == {torch.float16}


def test_a_frozen_lm_takes_the_mixed_precision_dtype_but_not_its_buffers(lms, tmp_path):
    """stage2.freeze=lm under bf16 (stage2.frozen_dtype=auto): the LM's parameters bf16, its rotary frequency
    buffer still fp32 (a module-wide .to(bf16) would have rounded it), the trained parts fp32; steps finite."""
    _, lm = lms
    trainer = _run(_config(tmp_path / "run", lm["llama"], "training.mixed_precision=bf16", "stage2.freeze=lm"))
    model = trainer.raw_model
    assert {p.dtype for p in model.lm.parameters()} == {torch.bfloat16}
    buffers = dict(model.lm.named_buffers())
    assert any("inv_freq" in name for name in buffers) and all(
        b.dtype == torch.float32 for name, b in buffers.items() if "inv_freq" in name)
    assert {p.dtype for p in model.projector.parameters()} == {torch.float32}
    assert all(math.isfinite(loss) for loss in _losses(tmp_path / "run").values())

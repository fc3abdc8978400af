"""The trainer on two gloo processes: DDP and FSDP2 (with and without GradCache) give the losses and weights of
one process training on both ranks' batches together (negatives from every rank), and a run killed after a
checkpoint and resumed with two ranks continues exactly (each rank its own next batch, its own RNG entry), on
random batches and on shards through the packed loader (the planner's global state in the checkpoint); stage 2
(the aligner) trains alike under DDP and FSDP2 and resumes exactly under both.

One spawn runs every case; the tests compare its results with single-process references built here."""

import dataclasses
import datetime
import json
import math

import pytest
import torch
import torch.multiprocessing as mp

from fineviti.data.batch import PackedBatch
from fineviti.train import checkpoint as ckpt
from fineviti.train.config import apply_cli_overrides, preset
from fineviti.train.trainer import Trainer
from tests.dist_util import free_port, train_until

WORLD = 2
STEPS = 4
SHARDS = ["training.data_source=shards", "data.path={root}/data/train", "data.merge=2", "data.token_budget=256",
          "model.text.vocab_size=2000", "eval.every=2", "eval.path={root}/data/heldout"]
CASES = {  # name: overrides
    "ddp": ["parallel.strategy=ddp"],
    "fsdp": ["parallel.strategy=fsdp", "checkpoint.export=full"],  # the export at the end gathers the shards
    "ddp_gradcache": ["parallel.strategy=ddp", "training.grad_cache_images=2"],
    "fsdp_gradcache": ["parallel.strategy=fsdp", "training.grad_cache_images=2"],
    "ddp_shards": ["parallel.strategy=ddp", *SHARDS],
    "fsdp_shards": ["parallel.strategy=fsdp", *SHARDS],
    "ddp_async": ["parallel.strategy=ddp", "checkpoint.async_save=true"],  # DCP's writer thread beside the steps
    "fsdp_async": ["parallel.strategy=fsdp", "checkpoint.async_save=true"],
    "ddp_stage2": ["parallel.strategy=ddp", "training.stage=2"],  # the aligner, its LM loss without logits
    # metrics.log_every=2: steps 1 and 3 read nothing, their clipping factor computed on the device, where FSDP2's
    # gradients are DTensor shards (a clip that scales every step: the debug model's norms are above 0.05)
    "fsdp_clip": ["parallel.strategy=fsdp", "training.grad_clip=0.05"],
    "fsdp_clip_deferred": ["parallel.strategy=fsdp", "training.grad_clip=0.05", "metrics.log_every=2"],
    # a frozen LM in bf16 beside the trained fp32 parts (stage2.frozen_dtype=auto): DDP's broadcast of both dtypes
    "ddp_stage2_frozen_bf16": ["parallel.strategy=ddp", "training.stage=2", "training.mixed_precision=bf16",
                               "stage2.freeze=lm"],
    "fsdp_stage2": ["parallel.strategy=fsdp", "training.stage=2"],
    "stage2_rank1_without_regions": ["parallel.strategy=ddp", "training.stage=2"],  # rank 1 draws no region
    "rank1_empty_pack": ["parallel.strategy=ddp"],  # rank 1's second batch has no image
    # one epoch, as many steps as it gives: the last step splits the pack left over between the ranks
    "ddp_one_epoch": ["parallel.strategy=ddp", *SHARDS[:5], "data.token_budget=384", "data.epochs=1",
                      "training.steps=0"],  # (29 packs: 14 steps of two, then one of the last pack split in two)
    # fp16 loss scaling under FSDP2 (each rank holds shards: the global norm decides) with GradCache's backward
    # (12 steps: at torch 2.11's CPU numerics the first 8 overflow, the debug text tower's tiny feature norms
    # blowing up the gradient of the normalisation; 2.14 applies its first update earlier)
    "fsdp_fp16_gradcache": ["parallel.strategy=fsdp", "training.mixed_precision=fp16", "training.grad_cache_images=2",
                            "training.steps=12"],
}
try:  # stage 2 with a Hugging Face LM (the `hf` extra): its decoder layers checkpointed and sharded one by one
    import transformers  # noqa: F401

    HF = ["training.stage=2", "aligner.lm={root}/hf_llama", "parallel.activation_checkpointing=full", *SHARDS[:4]]
    CASES.update(ddp_stage2_hf=["parallel.strategy=ddp", *HF], fsdp_stage2_hf=["parallel.strategy=fsdp", *HF])
except ImportError:
    pass
EQUIVALENT = ("ddp", "fsdp", "ddp_gradcache", "fsdp_gradcache", "ddp_async", "fsdp_async")  # one-process reference
RESUMED = ("ddp", "fsdp", "ddp_shards", "fsdp_shards", "ddp_stage2", "ddp_stage2_frozen_bf16", "fsdp_stage2",
           "ddp_async", "fsdp_async",
           *[name for name in CASES if name == "fsdp_stage2_hf"])


def _config(root, name, *overrides):
    return apply_cli_overrides(preset("debug"), [f"run_dir={root / name}", f"training.steps={STEPS}",
                                                 "checkpoint.interval=2", *overrides])


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "step" in r and "event" not in r}


def _full_params(trainer):
    out = {}
    for name, p in trainer.raw_model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("_checkpoint_wrapped_module.", "")] = p.detach().clone()
    return out


def _block_kinds(trainer):
    """The class of each block the trainer's parallelism wrapped, per list (FSDP2 subclasses what it shards)."""
    from fineviti.train.parallel import block_lists

    return [[type(b).__name__ for b in blocks] for blocks in block_lists(trainer.raw_model)]


def _no_regions_on_rank1(trainer):
    """Rank 1's batches have no region boxes (what region_tasks gives then: None)."""
    from fineviti.train import stage2

    if trainer.rank == 1:
        stage2.region_tasks = lambda *args, **kwargs: None


def _empty_second_pack_on_rank1(trainer):
    """Rank 1's batch of step 2 has no image (a pack whose images all failed to decode)."""
    from fineviti.train.data import take_images

    if trainer.rank == 1:
        make = trainer.data.make
        trainer.data.make = lambda step: take_images(make(step), 0, 0)[0] if step == 1 else make(step)


HOOKS = {"stage2_rank1_without_regions": _no_regions_on_rank1, "rank1_empty_pack": _empty_second_pack_on_rank1}


def _run_case(root, name, overrides, crash_at=None):
    from fineviti.train import stage2

    region_tasks = stage2.region_tasks
    trainer = Trainer(_config(root, name, *(o.format(root=root) for o in overrides)))
    if name in HOOKS:
        HOOKS[name](trainer)
    try:
        return train_until(trainer, crash_at)
    finally:
        stage2.region_tasks = region_tasks


def _worker(rank, port, root, names):
    import os
    from pathlib import Path

    import torch.distributed as dist

    root = Path(root)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for name in names:
            overrides = CASES[name]
            try:
                trainer = _run_case(root, name, overrides)
                results[name] = {"losses": _losses(root / name) if rank == 0 else None,
                                 "params": _full_params(trainer), "blocks": _block_kinds(trainer)}
                if name in RESUMED:
                    _run_case(root, f"{name}_resumed", overrides, crash_at=3)
                    resumed = _run_case(root, f"{name}_resumed", [*overrides, "checkpoint.resume=auto"])
                    results[f"{name}_resumed"] = {"losses": _losses(root / f"{name}_resumed") if rank == 0 else None,
                                                  "params": _full_params(resumed)}
            except Exception as exc:  # reported by the test of that case
                import traceback

                results[name] = f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        if rank == 0:
            torch.save(results, root / "results.pt")
        else:  # the other ranks' errors
            torch.save({k: v for k, v in results.items() if isinstance(v, str)}, root / f"errors_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    from fineviti.data import synth

    root = tmp_path_factory.mktemp("train_dist")
    synth.generate(root / "data", 48, heldout=8, samples_per_shard=16, processes=1)
    if "fsdp_stage2_hf" in CASES:
        from tests.hf_util import make_hf_lm

        # saved in bf16 as pretrained LMs are: loaded so, the LM's units held bf16 beside fp32 ones and FSDP2 refused
        make_hf_lm(root / "hf_llama", root / "data" / "tokenizer.json", dtype=torch.bfloat16)
    mp.start_processes(_worker, args=(free_port(), str(root), list(CASES)), nprocs=WORLD, join=True,
                       start_method="spawn")
    return root, torch.load(root / "results.pt", weights_only=False)


def _concat(a: PackedBatch, b: PackedBatch) -> PackedBatch:
    n_a, t_a = a.cu_seqlens[-1], a.text_cu_seqlens[-1]
    return dataclasses.replace(
        a, patches=torch.cat([a.patches, b.patches]), cu_seqlens=torch.cat([a.cu_seqlens, b.cu_seqlens[1:] + n_a]),
        pos=torch.cat([a.pos, b.pos]), max_seqlen=max(a.max_seqlen, b.max_seqlen), seqlens=a.seqlens + b.seqlens,
        grid_hw=torch.cat([a.grid_hw, b.grid_hw]), tokens=torch.cat([a.tokens, b.tokens]),
        text_cu_seqlens=torch.cat([a.text_cu_seqlens, b.text_cu_seqlens[1:] + t_a]),
        text_max_seqlen=max(a.text_max_seqlen, b.text_max_seqlen), text_seqlens=a.text_seqlens + b.text_seqlens,
        keys=a.keys + b.keys)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process training on rank 0's and rank 1's batches of each step together."""
    from fineviti.train.data import RandomBatches

    root = tmp_path_factory.mktemp("train_ref")
    trainer = Trainer(_config(root, "reference"))
    cfg = trainer.cfg
    ranks = [RandomBatches(cfg.random_data, patch_size=14, merge=2, vocab_size=cfg.model.text.vocab_size, rank=r,
                           world_size=WORLD) for r in range(WORLD)]
    trainer.data.make = lambda step: _concat(ranks[0].make(step), ranks[1].make(step))
    try:
        trainer.train()
    finally:
        trainer.close()
    return _losses(root / "reference"), _full_params(trainer)


def _concat_regions(a, b, images_a: int):
    """One RegionBatch of rank 0's samples then rank 1's (whose images come after rank 0's in the joined batch),
    right-padded to the longer of the two."""
    from fineviti.train.stage2 import RegionBatch

    width = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return RegionBatch(torch.cat([pad(a.input_ids, 0), pad(b.input_ids, 0)]),  # padding is masked, never a target
                       torch.cat([pad(a.labels, -100), pad(b.labels, -100)]),
                       torch.cat([pad(a.attention_mask, 0), pad(b.attention_mask, 0)]),
                       torch.cat([a.sample_image, b.sample_image + images_a]), a.n_samples + b.n_samples,
                       a.answer_tokens + b.answer_tokens, a.text_tokens + b.text_tokens)


def _join_regions(batch):
    """PackedBatch's region fields of two batches joined (boxes of the second batch's images renumbered)."""
    a, b = batch
    n_region = a.region_cu_seqlens[-1]
    return dict(boxes=torch.cat([a.boxes, b.boxes]), box_image=torch.cat([a.box_image, b.box_image + a.n_images]),
                region_tokens=torch.cat([a.region_tokens, b.region_tokens]),
                region_cu_seqlens=torch.cat([a.region_cu_seqlens, b.region_cu_seqlens[1:] + n_region]))


@pytest.fixture(scope="module")
def stage2_reference(tmp_path_factory):
    """One process training stage 2 on rank 0's and rank 1's batches of each step together, with each rank's own
    region samples (the ranks draw them from their own random streams)."""
    from fineviti.train import stage2
    from fineviti.train.data import RandomBatches

    root = tmp_path_factory.mktemp("train_ref2")
    trainer = Trainer(_config(root, "reference2", "training.stage=2"))
    cfg = trainer.cfg
    ranks = [RandomBatches(cfg.random_data, patch_size=cfg.aligner.vision.patch_size, merge=2,
                           vocab_size=trainer.raw_model.lm.vocab_size, rank=r, world_size=WORLD, with_regions=True)
             for r in range(WORLD)]
    current = []  # the two halves of the batch being trained on

    def make(step):
        pair = (ranks[0].make(step), ranks[1].make(step))
        current[:] = pair
        return dataclasses.replace(_concat(*pair), **_join_regions(pair))

    original = stage2.region_tasks

    def region_tasks(batch, ids, *, step, rank, **kwargs):
        a, b = current
        return _concat_regions(original(a, ids, step=step, rank=0, **kwargs),
                               original(b, ids, step=step, rank=1, **kwargs), a.n_images)

    trainer.data.make = make
    stage2.region_tasks = region_tasks
    try:
        trainer.train()
    finally:
        stage2.region_tasks = original
        trainer.close()
    return _losses(root / "reference2"), _full_params(trainer)


def _check(result):
    if isinstance(result, str):
        pytest.fail(result)


@pytest.mark.parametrize("name", EQUIVALENT)
def test_two_ranks_equal_one_process_on_both_batches(dist_results, reference, name):
    _, results = dist_results
    result = results[name]
    _check(result)
    ref_losses, ref_params = reference
    assert list(result["losses"]) == list(range(1, STEPS + 1))
    for step, loss in result["losses"].items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), (step, loss, ref_losses[step])
    for key, value in ref_params.items():  # (atol: Adam's normalised step turns the summation order's rounding in
        # a near-zero gradient into a visible difference: 1.5e-5 in one of 3072 elements under torch 2.11)
        torch.testing.assert_close(result["params"][key], value, rtol=1e-4, atol=3e-5,
                                   msg=lambda m, key=key: f"{name} {key}: {m}")


@pytest.mark.parametrize("name", RESUMED)
def test_two_rank_resume_is_exact(dist_results, name):
    root, results = dist_results
    _check(results[name])
    _check(results[f"{name}_resumed"])
    straight, resumed = results[name], results[f"{name}_resumed"]
    assert resumed["losses"] == straight["losses"]  # steps 1-2 before the kill, 3-4 after the resume (logged twice)
    for key, value in straight["params"].items():
        assert torch.equal(resumed["params"][key], value), key
    keys = ckpt.saved_keys(ckpt.resolve_checkpoint(root / f"{name}_resumed"))
    assert any(k.startswith("rng.rank0.") for k in keys) and any(k.startswith("rng.rank1.") for k in keys)
    if name.endswith("_shards"):  # the loader's state, and retrieval on the held-out split during training
        assert any(k.startswith("data.planner") for k in keys), keys
        lines = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in lines if r.get("event") == "eval"]
        assert [r["step"] for r in evals] == [2, 4] and all(r["n"] == 8 for r in evals)


@pytest.mark.parametrize("name", ["ddp_stage2", "fsdp_stage2"])
def test_stage2_two_ranks_equal_one_process_on_both_batches(dist_results, stage2_reference, name):
    """Stage 2 on two ranks: each rank's loss is weighted by its share of the answer tokens, so that after the
    gradients' average every token of both ranks counts alike, as in one process over both ranks' samples."""
    _, results = dist_results
    result = results[name]
    _check(result)
    ref_losses, ref_params = stage2_reference
    for step, loss in result["losses"].items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), (step, loss, ref_losses[step])
    for key, value in ref_params.items():  # (atol: Adam's normalised step turns the summation order's rounding in
        # a near-zero gradient into a visible difference: 1.5e-5 in one of 3072 elements under torch 2.11)
        torch.testing.assert_close(result["params"][key], value, rtol=1e-4, atol=3e-5,
                                   msg=lambda m, key=key: f"{name} {key}: {m}")


def test_a_run_of_one_epoch_trains_every_sample_once(dist_results):
    """training.steps=0 with data.epochs=1: the run takes the steps the epoch gives at two ranks, its last one of
    the pack left over split between them, and trains every image of the data set once."""
    from fineviti.data.dataset import ShardDataset

    root, results = dist_results
    _check(results["ddp_one_epoch"])
    lines = [json.loads(line) for line in (root / "ddp_one_epoch" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    (event,) = [r for r in lines if r.get("event") == "steps_from_epochs"]
    config = json.loads((root / "ddp_one_epoch" / "config.json").read_text())
    assert event["world_size"] == 2 and event["samples_left_out"] == 0
    assert [r["step"] for r in steps] == list(range(1, event["steps"] + 1)) and event["steps"] > 0
    assert config["training"]["steps"] == 0  # the setting, not the count it gave
    assert sum(r["images"] for r in steps) == len(ShardDataset(str(root / "data" / "train")))
    from fineviti.data.loader import PackedLoader

    overrides = [o.format(root=root) for o in CASES["ddp_one_epoch"]]
    n_packs = PackedLoader(_config(root, "count", *overrides).data).planner.epoch(0).n_packs
    assert n_packs % 2 and event["steps"] == (n_packs + 1) // 2  # the last step: one pack split between the ranks


def test_stage2_ddp_and_fsdp_agree(dist_results):
    """Stage 2 (the aligner) on two ranks: DDP and FSDP2 train the same batches to the same losses and weights."""
    _, results = dist_results
    ddp, fsdp = results["ddp_stage2"], results["fsdp_stage2"]
    _check(ddp)
    _check(fsdp)
    assert list(ddp["losses"]) == list(range(1, STEPS + 1))
    for step, loss in ddp["losses"].items():
        assert fsdp["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert ddp["params"].keys() == fsdp["params"].keys()
    for key, value in ddp["params"].items():
        torch.testing.assert_close(fsdp["params"][key], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")


def test_stage2_with_a_hugging_face_lm_on_two_ranks(dist_results):
    """A Hugging Face LM's decoder layers are blocks: checkpointed, and under FSDP2 sharded one by one (they were
    one unit with the whole LM, gathered at once); DDP and FSDP2 agree; the sharded run resumes exactly
    (test_two_rank_resume_is_exact)."""
    if "fsdp_stage2_hf" not in CASES:
        pytest.skip("needs transformers (the hf extra)")
    _, results = dist_results
    ddp, fsdp = results["ddp_stage2_hf"], results["fsdp_stage2_hf"]
    _check(ddp)
    _check(fsdp)
    # the vision tower's two blocks, then the LM's two decoder layers
    assert ddp["blocks"] == [["CheckpointWrapper"] * 2] * 2, ddp["blocks"]
    assert fsdp["blocks"] == [["FSDPCheckpointWrapper"] * 2] * 2, fsdp["blocks"]
    assert list(ddp["losses"]) == list(range(1, STEPS + 1))
    for step, loss in ddp["losses"].items():
        assert fsdp["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert ddp["params"].keys() == fsdp["params"].keys()
    assert any(".layers." in key for key in ddp["params"])
    for key, value in ddp["params"].items():
        torch.testing.assert_close(fsdp["params"][key], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")


def test_export_at_the_end_of_a_sharded_run(dist_results):
    """checkpoint.export under FSDP2: every rank gathers the shards, rank 0 writes the full tensors (rank 0 alone
    used to call the collective: the other rank closed the group and no file was written)."""
    from safetensors.torch import load_file

    root, results = dist_results
    _check(results["fsdp"])
    exported = load_file(str(root / "fsdp" / "model.safetensors"))
    for key, value in results["fsdp"]["params"].items():
        assert torch.equal(exported[key], value), key


def test_export_of_a_sharded_checkpoint(dist_results, tmp_path):
    """An FSDP2 checkpoint (DTensor shards from two ranks) exports on one process to the full tensors."""
    from safetensors.torch import load_file

    from fineviti.train.export import export_checkpoint

    root, results = dist_results
    _check(results["fsdp"])
    out = export_checkpoint(root / "fsdp", tmp_path / "fsdp_full.safetensors", part="full")
    exported = load_file(str(out))
    params = results["fsdp"]["params"]
    assert set(params) <= set(exported)
    for key, value in params.items():
        assert torch.equal(exported[key], value), key


def test_stage2_rank_without_regions_stops_every_rank(dist_results):
    """One rank's batch without region boxes stops both ranks at the same step with an error that says why (not
    one rank raising while the other waits in the next collective until the timeout)."""
    root, results = dist_results
    errors = torch.load(root / "errors_rank1.pt", weights_only=False)
    name = "stage2_rank1_without_regions"
    assert isinstance(results[name], str) and isinstance(errors.get(name), str), (results[name], errors)
    assert "ValueError: stage 2 step 1: a batch without region boxes on another rank" in results[name]
    assert "ValueError: stage 2 step 1: a batch without region boxes (keys" in errors[name]
    assert not any(isinstance(v, str) for k, v in results.items() if k != name)  # nothing else failed on rank 0
    assert set(errors) == {name}


def test_a_rank_with_an_empty_pack_skips_the_step_on_both_ranks(dist_results):
    """Rank 1's second batch has no image: both ranks skip that step (no rank waits in a collective the other
    never enters), log the images rank 0 dropped, and train on to the last step."""
    from fineviti.train.data import RandomBatches

    root, results = dist_results
    name = "rank1_empty_pack"
    _check(results[name])
    assert list(results[name]["losses"]) == list(range(1, STEPS + 1))
    lines = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in lines if r.get("event") == "skipped_batch"]
    cfg = _config(root, name)
    rank0 = RandomBatches(cfg.random_data, patch_size=14, merge=2, vocab_size=cfg.model.text.vocab_size, rank=0,
                          world_size=WORLD).make(1)
    assert len(skipped) == 1 and skipped[0]["step"] == 1 and skipped[0]["images_dropped"] == rank0.n_images > 0


def test_fp16_loss_scaling_on_two_sharded_ranks(dist_results):
    """FSDP2 with fp16 and GradCache on two ranks: both ranks skip the same overflowed updates (a rank deciding
    alone would leave the shards of the others behind), the scale comes down, and later updates happen."""
    root, results = dist_results
    name = "fsdp_fp16_gradcache"
    _check(results[name])
    lines = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "step" in r and "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert steps[0]["loss_scale"] == 2.0**15 and 0 < sum(r["update_skipped"] for r in steps) < 12
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert all(torch.isfinite(p).all() for p in results[name]["params"].values())


def test_a_frozen_bf16_lm_trains_beside_fp32_parts_under_ddp(dist_results):
    """stage2.freeze=lm under bf16: the LM's weights bf16, the rest fp32, on both ranks alike (DDP broadcasts both
    dtypes from rank 0 and buckets only the trained ones); the resume test above checks the rest."""
    _, results = dist_results
    _check(results["ddp_stage2_frozen_bf16"])
    dtypes = {(name.startswith("lm."), p.dtype) for name, p in results["ddp_stage2_frozen_bf16"]["params"].items()}
    assert dtypes == {(True, torch.bfloat16), (False, torch.float32)}, dtypes
    assert all(math.isfinite(v) for v in results["ddp_stage2_frozen_bf16"]["losses"].values())


def test_steps_between_rows_clip_sharded_gradients_as_the_host_does(dist_results):
    """FSDP2 with metrics.log_every=2: the steps between rows clip by a factor computed on the device (DTensor
    shards scaled locally) and end with the same weights, bit for bit, as a run that reads every step."""
    _, results = dist_results
    every, deferred = results["fsdp_clip"], results["fsdp_clip_deferred"]
    _check(every)
    _check(deferred)
    assert list(deferred["losses"]) == [2, 4]
    assert all(deferred["losses"][s] == every["losses"][s] for s in (2, 4))
    for key, value in every["params"].items():
        assert torch.equal(deferred["params"][key], value), key

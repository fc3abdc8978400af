"""The trainer on one process: stage 1 and 2 steps and their metrics, exact resume, a save interrupted halfway,
a non-finite loss, GradCache against the full batch, the text-length schedule, the profiler and export.

Everything runs the `debug` preset (a model of a few thousand parameters on random packed batches)."""

import dataclasses
import json
import math
import os

import pytest
import torch

from fineviti.train import checkpoint as ckpt
from fineviti.train.config import apply_cli_overrides, from_dict, preset, to_dict
from fineviti.train.data import RandomBatches, split_images, truncate_captions
from fineviti.train.metrics import NonFiniteLossError, peak_tflops
from fineviti.train.trainer import Trainer, run
from tests.dist_util import train_until

STAGE1_KEYS = {"loss", "lr", "grad_norm", "logit_scale", "logit_bias", "images_per_s", "tokens_per_s",
               "padding_fraction", "text_length", "step_time_s", "data_wait_s", "images", "patch_tokens",
               "text_tokens"}


def config(tmp_path, *overrides, name="run"):
    return apply_cli_overrides(preset("debug"), [f"run_dir={tmp_path / name}", *overrides])


def rows(run_dir):
    return rows_of(run_dir / "metrics.jsonl")


def rows_of(path):
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if '"step"' in line and '"event"' not in line]


def events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event"' in line]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in rows(run_dir)}


def test_stage1_steps_write_metrics_and_config(tmp_path):
    cfg = config(tmp_path, "training.steps=4")
    last = run(cfg)
    run_dir = tmp_path / "run"
    logged = rows(run_dir)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:
        assert STAGE1_KEYS <= set(r), STAGE1_KEYS - set(r)
        assert math.isfinite(r["loss"]) and r["images"] >= 1 and r["grad_norm"] > 0
        assert "mfu" not in r  # no GPU: no MFU
    assert last["loss"] == logged[-1]["loss"]
    # warmup over 2 steps (1.5e-3, 3e-3), then a cosine that would reach 0 at step 4 (0-based; HF's convention)
    assert [r["lr"] for r in logged] == pytest.approx([1.5e-3, 3e-3, 3e-3, 1.5e-3], abs=1e-9)
    assert [r["text_length"] for r in logged] == [16, 16, 16, 24]
    saved = json.loads((run_dir / "config.json").read_text())
    assert to_dict(from_dict(saved)) == to_dict(cfg)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [4]


def test_stage1_learns_a_repeated_batch(tmp_path):
    """The same batch every step (a one-batch data set): the loss must fall."""
    cfg = config(tmp_path, "training.steps=12", "scheduler.warmup_steps=1", "optimizer.lr=1e-2",
                 "checkpoint.save_final=false")
    trainer = Trainer(cfg)
    fixed = trainer.data.make(0)
    trainer.data.make = lambda step: fixed
    try:
        trainer.train()
    finally:
        trainer.close()
    values = [r["loss"] for r in rows(tmp_path / "run")]
    assert values[-1] < 0.5 * values[0], values


def _crash_at(trainer, step):
    original = trainer.train_step

    def train_step(batch, **kwargs):
        if trainer.step == step:
            raise KeyboardInterrupt(f"simulated kill at step {step}")
        return original(batch, **kwargs)

    trainer.train_step = train_step


def _train_expecting(trainer, error, match=None):
    """trainer.train() raising `error` (matching `match`), the trainer closed after."""
    with pytest.raises(error, match=match):
        try:
            trainer.train()
        finally:
            trainer.close()


def _train_until_killed(trainer, step):
    """trainer.train() killed when it reaches `step` (before that step's update), then closed."""
    _crash_at(trainer, step)
    _train_expecting(trainer, KeyboardInterrupt)


def test_exact_resume(tmp_path):
    steps = ["training.steps=6", "checkpoint.interval=3"]
    run(config(tmp_path, *steps, name="straight"))
    expected = losses(tmp_path / "straight")

    trainer = Trainer(config(tmp_path, *steps, name="crashed"))
    _train_until_killed(trainer, 5)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "crashed" / "checkpoints")] == [3]

    resumed = Trainer(config(tmp_path, *steps, "checkpoint.resume=auto", name="crashed"))
    assert resumed.step == 3
    try:
        resumed.train()
    finally:
        resumed.close()
    # one row per step: the killed run's row of step 4 (after its last checkpoint) is set aside in a file of its
    # own, not left beside the resumed run's
    assert [r["step"] for r in rows(tmp_path / "crashed")] == [1, 2, 3, 4, 5, 6]
    aside = list((tmp_path / "crashed").glob("metrics.superseded-*.jsonl"))
    assert len(aside) == 1 and [r["step"] for r in rows_of(aside[0])] == [4]
    got = {r["step"]: r for r in rows(tmp_path / "crashed")}
    # steps 4 to 6 equal the uninterrupted run's exactly
    for step in (4, 5, 6):
        assert got[step]["loss"] == expected[step], (step, got[step]["loss"], expected[step])
    assert rows(tmp_path / "crashed")[-1]["grad_norm"] == rows(tmp_path / "straight")[-1]["grad_norm"]


def test_fp16_scales_the_loss_skips_overflowed_updates_and_resumes_exactly(tmp_path):
    """mixed_precision=fp16 (autocast fp16 on this CPU) trains with dynamic loss scaling: a step whose scaled
    gradients overflow changes no weight and halves the scale, the others update, and the scale is in the
    checkpoint (a resumed run goes on exactly). Without a scaler fp16 gradients underflow silently."""
    steps = ["training.steps=12", "checkpoint.interval=6", "training.mixed_precision=fp16"]
    trainer = Trainer(config(tmp_path, *steps, name="straight"))
    snapshots = []
    original = trainer.train_step

    def train_step(batch, **kwargs):
        before = [p.detach().clone() for p in trainer.params]
        row = original(batch, **kwargs)
        snapshots.append((row["update_skipped"], any(not torch.equal(b, p) for b, p in zip(before, trainer.params,
                                                                                             strict=True))))
        return row

    trainer.train_step = train_step
    try:
        trainer.train()
    finally:
        trainer.close()
    straight = rows(tmp_path / "straight")
    scales = [r["loss_scale"] for r in straight]
    assert scales[0] == 2.0**15 and all(r["update_skipped"] in (0, 1) for r in straight)
    assert [skipped for skipped, _ in snapshots] == [r["update_skipped"] for r in straight]
    assert all(changed == (not skipped) for skipped, changed in snapshots)  # skipped: no weight moved
    assert 0 < sum(s for s, _ in snapshots) < 12  # the scale came down to where updates happen
    for previous, row in zip(straight, straight[1:], strict=False):  # halved after an overflow, else kept
        assert row["loss_scale"] == previous["loss_scale"] / (2 if row["update_skipped"] else 1)
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())
    updates = 0  # the schedule follows the updates: a skipped step spends no warmup
    for r in straight:
        assert r["lr"] == pytest.approx(trainer.cfg.optimizer.lr * trainer.scheduler.lr_lambdas[0](updates))
        updates += 1 - r["update_skipped"]
    assert trainer.scheduler.last_epoch == updates < 12

    crashed = Trainer(config(tmp_path, *steps, name="crashed"))
    _train_until_killed(crashed, 8)
    resumed = Trainer(config(tmp_path, *steps, "checkpoint.resume=auto", name="crashed"))
    try:
        assert resumed.step == 6 and resumed.scaler.scale == straight[5]["loss_scale"]
        resumed.train()
    finally:
        resumed.close()
    got = {r["step"]: r for r in rows(tmp_path / "crashed")}
    for r in straight[6:]:
        assert (got[r["step"]]["loss"], got[r["step"]]["loss_scale"], got[r["step"]]["lr"]) == \
            (r["loss"], r["loss_scale"], r["lr"]), r["step"]


def test_fp16_gradients_that_stay_non_finite_stop_the_run(tmp_path):
    """fp16: a NaN gradient at every step is no overflow: once the scale has come down past fp16's smallest
    subnormal the run stops with the reason (before, it skipped every remaining step until the scale reached 0)."""
    from fineviti.train.parallel import LossScaler

    trainer = Trainer(config(tmp_path, "training.steps=60", "training.mixed_precision=fp16"))
    weight = next(p for p in trainer.raw_model.parameters() if p.dim() == 2)
    weight.register_hook(lambda g: g * float("nan"))
    _train_expecting(trainer, NonFiniteLossError, r"non-finite for \d+ steps in a row, the fp16 loss scale down")
    assert trainer.scaler.scale < LossScaler.MIN_SCALE and trainer.scaler.overflows_in_a_row >= 40
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_loss_scaler_rule():
    """Halve after an overflow, double after growth_interval clean steps in a row; the state round-trips."""
    from fineviti.train.parallel import LossScaler

    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    scaler.update(True)
    assert scaler.scale == 8.0
    scaler.update(True)
    assert scaler.scale == 16.0 and scaler.clean_steps == 0
    scaler.update(True)
    scaler.update(False)
    assert scaler.scale == 8.0 and scaler.clean_steps == 0
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = scaler.scaled(torch.full((3,), 2.0))
    scaler.unscale_([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    again = LossScaler()
    again.load_state_dict(scaler.state_dict())
    assert (again.scale, again.clean_steps) == (8.0, 0)


def test_async_save_then_resume(tmp_path):
    trainer = Trainer(config(tmp_path, "training.steps=4", "checkpoint.interval=2", "checkpoint.async_save=true"))
    try:
        trainer.train()
    finally:
        trainer.close()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == [2, 4]
    resumed = Trainer(config(tmp_path, "training.steps=4", "checkpoint.resume=auto"))
    try:
        assert resumed.step == 4
        for (name, p), q in zip(resumed.raw_model.named_parameters(), trainer.raw_model.parameters(), strict=True):
            assert torch.equal(p, q), name
    finally:
        resumed.close()


def test_an_async_save_is_committed_once_written_not_at_the_next_save(tmp_path):
    """An asynchronous save was renamed from .tmp-step-N to step-N only at the next save or at close(): a process
    killed in between (no close) left no checkpoint, and the next start deleted the whole .tmp folder, so a resume
    started over. It is committed at the first step after every rank wrote it, and a start commits a .tmp folder
    that a kill left whole (its .metadata written) instead of deleting it."""
    folder = tmp_path / "run" / "checkpoints"
    trainer = Trainer(config(tmp_path, "training.steps=8", "checkpoint.interval=3", "checkpoint.async_save=true",
                             "checkpoint.save_final=false"))
    original = trainer.train_step
    seen = {}

    def train_step(batch, **kwargs):  # trainer.step: the step this call runs
        if trainer.step == 4:  # the save at 3 is pending: let its writer thread finish
            trainer.checkpointer._pending[0].result()
        if trainer.step == 5:  # committed before this step, the first after the write
            seen[5] = [s for s, _ in ckpt.list_checkpoints(folder)]
        return original(batch, **kwargs)

    trainer.train_step = train_step
    try:
        trainer.train()
    finally:
        trainer.close()
    assert seen[5] == [3]

    # a kill after the write of step 6's save, before its commit: the next start commits the whole .tmp folder
    step6 = folder / "step-00000006"
    os.replace(step6, folder / ".tmp-step-00000006")
    (folder / ".tmp-step-00000007").mkdir()  # a save that never finished writing: deleted, as before
    with pytest.warns(UserWarning, match="never renamed"):
        resumed = Trainer(config(tmp_path, "training.steps=8", "checkpoint.resume=auto"))
    try:
        assert resumed.step == 6 and not (folder / ".tmp-step-00000007").exists()
    finally:
        resumed.close()


def test_a_resume_under_another_config_says_what_changed(tmp_path):
    """`fineviti train --preset tiny --resume` without the first run's overrides took the preset's learning rate
    and schedule with no word; the resumed run keeps this run's config (extending training.steps is how a run is
    lengthened), but warns and logs each field that differs from the checkpoint's config.json."""
    run(config(tmp_path, "training.steps=2", "checkpoint.interval=2", "optimizer.lr=1e-4"))
    with pytest.warns(UserWarning, match=r"optimizer.lr: checkpoint 0.0001, this run 0.0002.*training.steps: "
                                         r"checkpoint 2, this run 3"):
        resumed = Trainer(config(tmp_path, "training.steps=3", "checkpoint.interval=2", "checkpoint.resume=auto",
                                 "optimizer.lr=2e-4"))
    resumed.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    changed = [e for e in map(json.loads, lines) if e.get("event") == "resume_config_changed"]
    assert changed and changed[0]["changed"] == ["optimizer.lr: checkpoint 0.0001, this run 0.0002",
                                                 "training.steps: checkpoint 2, this run 3"], changed


def test_a_restart_from_an_older_step_sets_the_abandoned_branch_aside(tmp_path):
    """Resumed from step 2 of a run saved at 2, 4 and 6 (keep=2 keeps 4 and 6): before, keep pruned the new
    branch's step-4 checkpoint at once (the old 6 was newer) and resume=auto went back to the old branch."""
    run(config(tmp_path, "training.steps=6", "checkpoint.interval=2", "checkpoint.keep=0"))
    folder = tmp_path / "run" / "checkpoints"
    old = {s: (path / ".metadata").read_bytes() for s, path in ckpt.list_checkpoints(folder)}
    assert sorted(old) == [2, 4, 6]
    with pytest.warns(UserWarning, match=r"starts at step 2: 2 checkpoint\(s\) in .* belong to a branch"):
        trainer = Trainer(config(tmp_path, "training.steps=5", "checkpoint.interval=2",
                                 f"checkpoint.resume={folder / 'step-00000002'}", "optimizer.lr=1e-3"))
    try:
        assert trainer.step == 2
        trainer.train()
    finally:
        trainer.close()
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [4, 5]  # keep=2: the new branch's, not the old 6
    aside = [p for p in folder.iterdir() if p.name.startswith(ckpt.SUPERSEDED_PREFIX)]
    assert len(aside) == 1  # nothing lost: the old 4 and 6 whole, out of resume's and keep's way
    assert {s: (p / ".metadata").read_bytes() for s, p in ckpt.list_checkpoints(aside[0])} == \
        {4: old[4], 6: old[6]}
    assert ckpt.resolve_checkpoint(tmp_path / "run").name == "step-00000005"
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"superseded"' in line]
    assert len(events) == 1 and events[0]["step"] == 2 and len(events[0]["moved"]) == 2
    # a fresh run that never saves leaves them be; one that saves sets all of them aside instead of overwriting
    Trainer(config(tmp_path, "training.steps=1", "checkpoint.save_final=false")).close()
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [4, 5]
    with pytest.warns(UserWarning, match="starts at step 0"):
        fresh = Trainer(config(tmp_path, "training.steps=1"))
    fresh.close()
    assert ckpt.list_checkpoints(folder) == []
    assert len([p for p in folder.iterdir() if p.name.startswith(ckpt.SUPERSEDED_PREFIX)]) == 2


def test_setting_aside_that_fails_says_what_moved(tmp_path, monkeypatch):
    """A move that fails halfway (e.g. another file system) stops the start with what moved and what to do,
    raised on every rank (rank 0 broadcasts it), not a barrier that the other ranks wait at forever."""
    import os

    run(config(tmp_path, "training.steps=4", "checkpoint.interval=2"))
    folder = tmp_path / "run" / "checkpoints"
    checkpointer = ckpt.Checkpointer(preset("debug").checkpoint, tmp_path / "run", rank=0, world_size=1,
                                     config_json="{}")
    replace, calls = os.replace, []

    def failing(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(18, "Invalid cross-device link")
        replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing)
    with pytest.raises(RuntimeError, match=r"could not move .*Invalid cross-device link.*step-00000002"):
        checkpointer.set_aside_after(0)
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [4]  # step 2 moved, step 4 left where it was


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    steps = ["training.steps=4", "checkpoint.interval=2"]
    run(config(tmp_path, *steps, name="straight"))
    expected = losses(tmp_path / "straight")

    original = ckpt.dcp.FileSystemWriter.finish

    def finish(self, metadata, results):  # every data file is written; the metadata never lands
        if "step-00000004" in str(self.path):
            raise OSError("simulated crash in the middle of a save")
        return original(self, metadata, results)

    monkeypatch.setattr(ckpt.dcp.FileSystemWriter, "finish", finish)
    trainer = Trainer(config(tmp_path, *steps, name="crashed"))
    with pytest.raises(BaseException, match="simulated crash"):  # DCP wraps it in a CheckpointException
        try:
            trainer.train()
        finally:
            trainer.close()
    folder = tmp_path / "crashed" / "checkpoints"
    assert (folder / ".tmp-step-00000004").is_dir()
    assert not (folder / "step-00000004").exists()
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [2]
    monkeypatch.setattr(ckpt.dcp.FileSystemWriter, "finish", original)

    resumed = Trainer(config(tmp_path, *steps, "checkpoint.resume=auto", name="crashed"))
    assert resumed.step == 2 and not (folder / ".tmp-step-00000004").exists()
    try:
        resumed.train()
    finally:
        resumed.close()
    assert losses(tmp_path / "crashed")[4] == expected[4]
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [2, 4]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from fineviti.data import synth

    root = tmp_path_factory.mktemp("synthetic")
    synth.generate(root, 48, heldout=8, samples_per_shard=16, processes=1)
    return root


def shard_config(tmp_path, shards, *overrides, name="run"):
    return config(tmp_path, "training.data_source=shards", f"data.path={shards / 'train'}", "data.merge=2",
                  "data.token_budget=256", "model.text.vocab_size=2000", "aligner.builtin_lm.vocab_size=2000",
                  *overrides, name=name)


def test_exact_resume_on_shards(tmp_path, shards):
    """The packed loader's planner state is in the checkpoint: the resumed run sees the batches it would have."""
    steps = ["training.steps=6", "checkpoint.interval=3"]
    run(shard_config(tmp_path, shards, *steps, name="straight"))
    expected = {r["step"]: r for r in rows(tmp_path / "straight")}
    trainer = Trainer(shard_config(tmp_path, shards, *steps, name="crashed"))
    _train_until_killed(trainer, 4)
    run(shard_config(tmp_path, shards, *steps, "checkpoint.resume=auto", name="crashed"))
    got = {r["step"]: r for r in rows(tmp_path / "crashed")}
    for step in range(1, 7):
        assert got[step]["loss"] == expected[step]["loss"], step
        assert got[step]["patch_tokens"] == expected[step]["patch_tokens"], step
    state = json.loads((tmp_path / "crashed" / "config.json").read_text())
    assert state["data"]["path"] == str(shards / "train")


def test_steps_from_epochs_run_to_the_end_of_the_data_and_resume(tmp_path, shards):
    """training.steps=0 takes the steps data.epochs give (here two epochs on one process: every pack); a resumed run
    counts the same and ends where the straight run ended, with the same losses."""
    steps = ["training.steps=0", "data.epochs=2", "checkpoint.interval=2", "scheduler.warmup_steps=1"]
    trainer = Trainer(shard_config(tmp_path, shards, *steps, name="straight"))
    planner = trainer.data.loader.planner
    expected_steps = planner.epoch(0).n_packs + planner.epoch(1).n_packs
    assert trainer.cfg.training.steps == expected_steps and trainer.scheduler.lr_lambdas[0].total == expected_steps
    try:
        trainer.train()
    finally:
        trainer.close()
    expected = losses(tmp_path / "straight")
    assert sorted(expected) == list(range(1, expected_steps + 1))
    # config.json keeps the setting (a run restarted from it counts again), the metrics the count
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["training"]["steps"] == 0
    (event,) = [e for e in events(tmp_path / "straight") if e["event"] == "steps_from_epochs"]
    assert event["steps"] == expected_steps

    _train_until_killed(Trainer(shard_config(tmp_path, shards, *steps, name="crashed")), 4)
    resumed = Trainer(shard_config(tmp_path, shards, *steps, "checkpoint.resume=auto", name="crashed"))
    try:
        assert resumed.step == 2 and resumed.cfg.training.steps == expected_steps
        resumed.train()
    finally:
        resumed.close()
    assert losses(tmp_path / "crashed") == expected


@pytest.mark.parametrize("bad_pack", ["second", "last"])
def test_steps_from_epochs_end_where_the_data_ends_when_a_step_is_skipped(tmp_path, shards, monkeypatch, bad_pack):
    """A pack whose images all fail to decode is a skipped step: a run of training.steps=0 ends one step earlier
    than counted, with its final checkpoint and evaluation, instead of running out of data (DataExhaustedError)
    before its last step. Also when the skipped step is the last one: the end comes after the step before it."""
    from fineviti.data.dataset import SKIP_REASONS, BadSample, ShardDataset

    trainer = Trainer(shard_config(tmp_path, shards, "training.steps=0", "data.epochs=1", "eval.every=100",
                                   f"eval.path={shards / 'heldout'}", "checkpoint.interval=2"))
    counted = trainer.cfg.training.steps
    planner = trainer.data.loader.planner
    pack = 1 if bad_pack == "second" else planner.epoch(0).n_packs - 1
    assert counted == planner.epoch(0).n_packs and (counted - 1) % 2  # (the last step taken: no interval save)
    bad = set(planner.pack_samples(0, pack).tolist())
    load = ShardDataset.load

    def failing(self, i, epoch=0):
        if i in bad:
            raise BadSample(sorted(SKIP_REASONS)[0], "a test's undecodable image")
        return load(self, i, epoch)

    monkeypatch.setattr(ShardDataset, "load", failing)
    trainer.cfg.metrics.profile = f"{counted - 1}:{counted}"  # (as --profile sets them: valid for the count)
    trainer.profiler.window = (counted - 1, counted)
    try:
        with pytest.warns(UserWarning, match=rf"--profile\) '{counted - 1}:{counted}': steps .* end at the run's"):
            trainer.train()
    finally:
        trainer.close()
    run_dir = tmp_path / "run"
    assert [r["step"] for r in rows(run_dir)] == list(range(1, counted))
    assert trainer.finished and trainer.cfg.training.steps == counted - 1
    assert json.loads((run_dir / "config.json").read_text())["training"]["steps"] == 0
    step, final = ckpt.list_checkpoints(run_dir / "checkpoints")[-1]
    assert step == counted - 1 and json.loads((final / "config.json").read_text())["training"]["steps"] == 0
    logged = events(run_dir)
    assert [e["step"] for e in logged if e["event"] == "eval"] == [counted - 1]  # the last step's evaluation, once
    assert [e["steps"] for e in logged if e["event"] == "steps_from_epochs"] == [counted, counted - 1]
    assert trainer.scheduler.lr_lambdas[0].total == counted - 1
    # the profile window ended at the step counted last: it ends at the last step taken, with its trace
    (shortened,) = [e for e in logged if e["event"] == "profile_shortened"]
    assert f"a trace of steps {counted - 1}-{counted - 1}" in shortened["window"]
    assert (run_dir / "profile" / f"trace_steps{counted - 1}-{counted - 1}_rank0.json").is_file()



def test_steps_from_epochs_with_every_step_skipped_is_an_error(tmp_path, shards, monkeypatch):
    """training.steps=0 and no pack with a decodable image: the run fails (it finished with its initial weights,
    and exported them, when the count fell to 0)."""
    from fineviti.data.dataset import SKIP_REASONS, BadSample, ShardDataset
    from fineviti.train.trainer import MAX_SKIPPED_IN_A_ROW, DataExhaustedError

    def failing(self, i, epoch=0):
        raise BadSample(sorted(SKIP_REASONS)[0], "a test's undecodable image")

    trainer = Trainer(shard_config(tmp_path, shards, "training.steps=0", "data.epochs=1"))
    assert trainer.cfg.training.steps < MAX_SKIPPED_IN_A_ROW  # (the count reaches 0 first)
    monkeypatch.setattr(ShardDataset, "load", failing)
    _train_expecting(trainer, DataExhaustedError, "every step data.epochs=1 gives was skipped")
    assert not trainer.finished


def test_steps_from_epochs_counted_again_after_a_resume_move_the_schedule(tmp_path, shards):
    """After a resume under another world size the steps left differ from the count at the start: the schedule's
    horizon, the next rate and the run's config follow the new count."""
    trainer = Trainer(shard_config(tmp_path, shards, "training.steps=0", "data.epochs=1", "scheduler.warmup_steps=1"))
    try:
        before = trainer.cfg.training.steps
        trainer.scheduler.last_epoch = 3  # as if resumed at step 3
        trainer._steps_from(before + 5)
        shape = trainer.scheduler.lr_lambdas[0]
        assert shape.total == before + 5 and trainer.cfg.training.steps == before + 5
        lr = trainer.optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(trainer.scheduler.base_lrs[0] * shape(3)) and lr < trainer.scheduler.base_lrs[0]
        assert json.loads(trainer.config_json)["training"]["steps"] == 0  # the setting, saved as set
        assert trainer.checkpointer.config_json == trainer.config_json
        # a checkpoint of a run of training.steps=0 (whatever its count) is no config change; one of a run that gave
        # its steps is (the switch to 0 changes the schedule's horizon); another setting still is
        saved = json.loads(trainer.config_json)
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(saved))
        assert trainer._changed_since(tmp_path / "ckpt") == []
        saved["training"]["steps"] = before
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(saved))
        assert trainer._changed_since(tmp_path / "ckpt") == [f"training.steps: checkpoint {before}, this run 0"]
        saved["training"]["steps"] = 0
        saved["training"]["grad_clip"] = float("inf")  # Infinity, as config.json held it before "inf"
        trainer.config_json = trainer.config_json.replace('"grad_clip": 1.0', '"grad_clip": "inf"')
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(saved))
        assert trainer._changed_since(tmp_path / "ckpt") == []
        saved["optimizer"]["lr"] *= 2
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(saved))
        assert [c.split(":")[0] for c in trainer._changed_since(tmp_path / "ckpt")] == ["optimizer.lr"]
    finally:
        trainer.close()
    with pytest.raises(ValueError, match=r"ends after the run's last step \(training.steps=0: data.epochs=1 gives"):
        Trainer(shard_config(tmp_path, shards, "training.steps=0", "data.epochs=1", "metrics.profile=2:1000",
                             name="profiled"))


def test_resume_keeps_the_loaders_skip_counters(tmp_path, shards):
    """The loader's counts of skipped samples come back with its planner state (a dict whose keys only the saved
    run had never loaded: the resumed run's summary started from zero)."""
    steps = ["training.steps=4", "checkpoint.interval=2"]
    trainer = Trainer(shard_config(tmp_path, shards, *steps, name="r"))
    trainer.data.loader.stats.update({"undecodable_image": 3, "bad_box": 1})
    _train_until_killed(trainer, 3)
    resumed = Trainer(shard_config(tmp_path, shards, *steps, "checkpoint.resume=auto", name="r"))
    try:
        assert resumed.step == 2
        assert resumed.data.loader.stats == {"undecodable_image": 3, "bad_box": 1}
        assert "undecodable_image 3" in resumed.data.summary()
        resumed.train()
    finally:
        resumed.close()
    # the counts reach the metrics: every row (summed over the ranks) and, at the end, the loader's summary
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["data_skipped"] >= 4 for r in lines if "loss" in r)
    (end,) = [r for r in lines if r.get("event") == "data"]
    assert end["step"] == 4 and "undecodable_image 3" in end["summary"]


def test_skipped_samples_count_the_scan_once_over_the_ranks(tmp_path, shards):
    """Every rank scans the whole data set and starts from its skips: summed over the ranks, data_skipped counted
    them once per rank. Each rank now reports its loads, and rank 0 the scan too."""
    from collections import Counter

    from fineviti.train.data import LoaderSource

    data_cfg = shard_config(tmp_path, shards).data
    sources = [LoaderSource(data_cfg, rank, 2) for rank in (0, 1)]
    for source in sources:
        source.loader.dataset.stats = Counter({"missing_caption": 1})
        source.loader.stats = Counter({"missing_caption": 1, "undecodable_image": 2})
    assert [s.skipped() for s in sources] == [3, 2]  # 1 scanned + 2 + 2 loaded: 5 in all
    for source in sources:
        source.close()


def test_evaluation_during_training(tmp_path, shards):
    run(shard_config(tmp_path, shards, "training.steps=4", "eval.every=2", f"eval.path={shards / 'heldout'}"))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["n"] == 8 and 0 <= r["i2t_r1"] <= 1 and r["chance_r1"] == pytest.approx(1 / 8)


def test_stage2_on_shards_with_the_data_tokenizer(tmp_path, shards):
    run(shard_config(tmp_path, shards, "training.steps=2", name="stage1"))
    run(shard_config(tmp_path, shards, "training.stage=2", "training.steps=2",
                     f"stage2.init_from={tmp_path / 'stage1'}", name="stage2"))
    logged = rows(tmp_path / "stage2")
    assert len(logged) == 2 and all(r["answer_tokens"] > 0 and math.isfinite(r["loss"]) for r in logged)
    # static shapes (data.pad_to_budget): the step passes the padding on to the aligner, which failed on it
    # ("cu_seqlens[-1] must equal the number of tokens") before
    run(shard_config(tmp_path, shards, "training.stage=2", "training.steps=2", "data.pad_to_budget=true",
                     f"stage2.init_from={tmp_path / 'stage1'}", name="stage2_padded"))
    padded = rows(tmp_path / "stage2_padded")
    assert len(padded) == 2 and all(math.isfinite(r["loss"]) for r in padded)
    assert any(r["padding_tokens"] > 0 for r in padded)
    # a vision override that the checkpoint's config replaces: said, not dropped without a word
    with pytest.warns(UserWarning, match="aligner.vision.depth: 7 -> "):
        run(shard_config(tmp_path, shards, "training.stage=2", "training.steps=1", "aligner.vision.depth=7",
                         f"stage2.init_from={tmp_path / 'stage1'}", name="stage2_override"))


def test_region_tasks_put_boxes_in_text(tmp_path):
    from fineviti.data.tokenizer import CaptionTokenizer, train_tokenizer
    from fineviti.train.stage2 import TextIds, region_tasks

    batch = RandomBatches(dataclasses.replace(preset("debug").random_data, seed=1), patch_size=14, merge=2,
                          vocab_size=96, with_regions=True).make(0)
    batch.boxes[0] = torch.tensor([0.0, 0.0, batch.grid_hw[0, 1] / 2, batch.grid_hw[0, 0] * 1.0])  # patch grid
    captions = ["a red circle in the top left of the image", "describe the region find the box of: [0, 1000]"]
    tokenizer = CaptionTokenizer(train_tokenizer(captions * 20, tmp_path / "tokenizer.json", vocab_size=300))
    ids = TextIds(tokenizer)
    region = region_tasks(batch, ids, tasks=["box2caption"], regions_per_image=8, merge=2,
                          placeholder_id=999, seed=0, step=0, rank=0)
    assert region.n_samples == batch.boxes.shape[0]
    texts = [tokenizer.decode([t for t in row.tolist() if t not in (999, 0)])
             for row in region.input_ids[region.sample_image == 0]]
    assert any("describe the region [0, 0, 500, 1000]:" in text for text in texts), texts
    image_tokens = (region.input_ids == 999).sum(1)
    expected = (batch.grid_hw[region.sample_image].prod(1) // 4)
    assert torch.equal(image_tokens, expected)
    assert (region.labels != -100).sum() == region.answer_tokens
    # the text of the samples (<bos>, prompt, answer, <eos>), not their image placeholders or padding
    assert region.text_tokens == int(region.attention_mask.sum() - image_tokens.sum()) > region.answer_tokens


def _hf_like_tokenizer(folder, captions, bos=None):
    """A tokenizer.json as a Hugging Face LM ships it (Qwen2-like: its own special tokens, no <bos>/<eos>/<pad>,
    no template) with the tokenizer_config.json that names them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(captions * 20, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": "<|endoftext|>", "pad_token": {"content": "<|endoftext|>"}}))
    return folder / "tokenizer.json"


def test_a_hugging_face_lm_reads_text_with_its_own_tokenizer(tmp_path):
    """Stage 2 with aligner.lm a Hugging Face directory encoded prompts and captions with the data set's tokenizer:
    ids that mean other tokens to the LM. It takes the LM's tokenizer.json, with the special tokens its
    tokenizer_config.json names (no <bos>, pad as eos); data.tokenizer may only name a copy of it."""
    from fineviti.data.tokenizer import CaptionTokenizer, train_tokenizer
    from fineviti.train.stage2 import TextIds, build_example, lm_tokenizer

    captions = ["a red circle in the top left of the image", "describe the region find the box of: [0, 1000]"]
    lm = tmp_path / "lm"
    own = _hf_like_tokenizer(lm, captions)
    tokenizer = CaptionTokenizer(own)
    eos = tokenizer.tokenizer.token_to_id("<|endoftext|>")
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (None, eos, eos)
    ids = TextIds(tokenizer)
    prompt = ids.encode(" describe the region [0, 0, 500, 1000]:")
    input_ids, labels = build_example(prompt, ids.encode(" a red circle"), 3, 999, bos_id=ids.bos_id,
                                      eos_id=ids.eos_id)
    assert input_ids[:3].tolist() == [999] * 3 and int(input_ids[-1]) == eos  # no <bos>; the answer ends in eos
    assert lm_tokenizer(str(lm), None) == str(own)
    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    copy.write_bytes(own.read_bytes())
    assert lm_tokenizer(str(lm), str(copy)) == str(own)  # (the names are in the LM's tokenizer_config.json)
    other = train_tokenizer(captions * 20, tmp_path / "data" / "tokenizer.json", vocab_size=300)
    with pytest.raises(ValueError, match=r"data.tokenizer=.* is not the tokenizer of aligner.lm="):
        lm_tokenizer(str(lm), str(other))
    with pytest.raises(FileNotFoundError, match=r"aligner.lm=.* has no tokenizer.json"):
        lm_tokenizer(str(tmp_path / "data" / "nothing"), None)
    (lm / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    with pytest.raises(ValueError, match="no end-of-text token"):
        lm_tokenizer(str(lm), None)


def test_non_finite_loss_stops_before_the_update(tmp_path):
    """...and a run stopped by an error exports nothing: the file would look like a finished run's (it once did,
    with the weights of the step it stopped on); an "export_skipped" event says why."""
    trainer = Trainer(config(tmp_path, "training.steps=4", "checkpoint.export=vision"))
    make = trainer.data.make

    def poisoned(step):
        batch = make(step)
        if step == 1:
            batch.patches[0, 0] = float("nan")
        return batch

    trainer.data.make = poisoned
    _train_expecting(trainer, NonFiniteLossError, "at step 2")
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())
    assert not (tmp_path / "run" / "model.safetensors").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    events = [e for e in map(json.loads, lines) if e.get("event") == "export_skipped"]
    assert events and "stopped at step 2 of 4" in events[0]["reason"], events


@pytest.mark.parametrize("grad_cache", [0, 2])
def test_a_pack_without_images_is_skipped_not_a_crash(tmp_path, grad_cache):
    """The loader hands out a batch with no image when every image of a pack failed to decode: the trainer skips
    it (consumed, logged as a "skipped_batch" event, no optimizer step) and trains on; 100 in a row stop the run
    with a message. Before, the model rejected the empty pack, and GradCache divided by zero."""
    from fineviti.train.data import take_images
    from fineviti.train.trainer import MAX_SKIPPED_IN_A_ROW

    trainer = Trainer(config(tmp_path, "training.steps=3", f"training.grad_cache_images={grad_cache}"))
    make = trainer.data.make
    trainer.data.make = lambda step: take_images(make(step), 0, 0)[0] if step == 1 else make(step)
    assert trainer.data.make(1).n_images == 0
    try:
        trainer.train()
    finally:
        trainer.close()
    run_dir = tmp_path / "run"
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3] and trainer.data.step == 4  # 4 batches consumed
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    skipped = [e for e in events if e["event"] == "skipped_batch"]
    assert len(skipped) == 1 and skipped[0]["step"] == 1 and skipped[0]["images_dropped"] == 0
    assert trainer.optimizer.state[next(iter(trainer.raw_model.parameters()))]["step"] == 3

    broken = Trainer(config(tmp_path, "training.steps=3", name="broken"))
    make = broken.data.make
    broken.data.make = lambda step: take_images(make(step), 0, 0)[0]
    _train_expecting(broken, RuntimeError, f"{MAX_SKIPPED_IN_A_ROW} batches in a row had a rank without")


def test_non_finite_gradient_stops_before_the_update(tmp_path):
    """A NaN gradient with a finite loss (fp16 overflow) used to pass the clip (NaN < 1 is false), write NaN
    weights and save them in the step's checkpoint: it now stops the run before the optimizer step."""
    trainer = Trainer(config(tmp_path, "training.steps=4", "checkpoint.interval=1"))
    weight = next(p for p in trainer.raw_model.parameters() if p.dim() == 2)
    weight.register_hook(lambda g: g * float("nan") if trainer.step == 2 else g)
    _train_expecting(trainer, NonFiniteLossError, "the gradient norm .* is nan at step 2")
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == [1]


@pytest.mark.parametrize("several_captions", [False, True])
def test_grad_cache_gives_the_full_batch_gradients(tmp_path, several_captions):
    grads, values = [], []
    for chunk in (0, 2):
        trainer = Trainer(config(tmp_path, f"training.grad_cache_images={chunk}", name=f"gc{chunk}"))
        batch = trainer.data.make(0)
        assert batch.n_images >= 5
        if several_captions:  # captions 0..n-1, plus a second caption for images 1 and 3, listed last
            starts = batch.text_cu_seqlens.tolist()
            extra = [batch.tokens[starts[i]:starts[i + 1]].flip(0) for i in (1, 3)]
            batch.tokens = torch.cat([batch.tokens, *extra])
            lengths = batch.text_seqlens + [len(t) for t in extra]
            batch.text_seqlens = lengths
            batch.text_cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
            batch.text_image = torch.tensor(list(range(batch.n_images)) + [1, 3])
        if chunk:
            loss, _ = trainer._grad_cache_step(batch)
        else:
            loss, _ = trainer._stage1_step(batch)
        values.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in trainer.raw_model.named_parameters()})
        trainer.close()
    assert values[1] == pytest.approx(values[0], rel=1e-6)
    for name, full in grads[0].items():
        cached = grads[1][name]
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-6 * full.abs().max().item() + 1e-9,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_split_images_keeps_every_image_and_caption():
    source = RandomBatches(preset("debug").random_data, patch_size=14, merge=2, vocab_size=96)
    batch = source.make(3)
    chunks, real, order = split_images(batch, 3)
    assert real == 3 and order is None and sum(c.n_images for c in chunks) == batch.n_images
    assert torch.equal(torch.cat([c.patches for c in chunks]), batch.patches)
    assert torch.equal(torch.cat([c.tokens for c in chunks]), batch.tokens)
    assert torch.equal(torch.cat([c.pos for c in chunks]), batch.pos)
    for c in chunks:
        assert c.cu_seqlens[0] == 0 and c.cu_seqlens[-1] == c.patches.shape[0] == sum(c.seqlens)
    assert max(c.n_images for c in chunks) - min(c.n_images for c in chunks) <= 1
    chunks, real, _ = split_images(batch, batch.n_images + 2)  # more chunks than images: two fillers
    assert real == batch.n_images and len(chunks) == real + 2
    assert torch.equal(chunks[-1].patches, chunks[0].patches)


def test_truncate_captions_keeps_first_tokens_and_the_last():
    source = RandomBatches(preset("debug").random_data, patch_size=14, merge=2, vocab_size=96)
    batch = source.make(0)
    lengths = batch.text_seqlens
    cut = truncate_captions(batch, 6)
    starts = batch.text_cu_seqlens.tolist()
    new_starts = cut.text_cu_seqlens.tolist()
    for i, n in enumerate(lengths):
        old = batch.tokens[starts[i]:starts[i] + n]
        new = cut.tokens[new_starts[i]:new_starts[i + 1]]
        expected = old if n <= 6 else torch.cat([old[:5], old[-1:]])
        assert torch.equal(new, expected)
    assert cut.truncated_tokens == sum(max(0, n - 6) for n in lengths) > 0
    assert cut.text_max_seqlen == min(6, max(lengths))


def test_stage2_from_a_stage1_checkpoint(tmp_path):
    run(config(tmp_path, "training.steps=2", name="stage1"))
    stage1 = ckpt.resolve_checkpoint(tmp_path / "stage1")
    cfg = config(tmp_path, "training.stage=2", "training.steps=3", f"stage2.init_from={tmp_path / 'stage1'}",
                 "stage2.freeze=lm", "stage2.vision_lr_scale=0.5", name="stage2")
    trainer = Trainer(cfg)
    from fineviti.model import FineViT

    reference = FineViT(preset("debug").model)
    ckpt.load_module_state(stage1, reference, "")
    for name, tensor in reference.visual.state_dict().items():
        assert torch.equal(trainer.raw_model.visual.state_dict()[name], tensor), name
    lm_before = {n: p.clone() for n, p in trainer.raw_model.lm.named_parameters()}
    vision_lrs = {g["part"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert "lm" not in vision_lrs and vision_lrs["visual"] == pytest.approx(0.5 * vision_lrs["merger"])
    try:
        trainer.train()
    finally:
        trainer.close()
    logged = rows(tmp_path / "stage2")
    assert len(logged) == 3 and all(math.isfinite(r["loss"]) and r["answer_tokens"] > 0 for r in logged)
    # the logged rate is the base one (optimizer.lr times the schedule), not the first group's (the vision tower's,
    # at half of it here)
    from fineviti.train.optim import WarmupDecay

    schedule = WarmupDecay(cfg.scheduler, cfg.training.steps)
    assert [r["lr"] for r in logged] == pytest.approx([cfg.optimizer.lr * schedule(i) for i in range(3)], abs=1e-12)
    assert any(r["lr"] > 0 for r in logged)
    for n, p in trainer.raw_model.lm.named_parameters():
        assert torch.equal(p, lm_before[n]), n
    assert not torch.equal(trainer.raw_model.visual.blocks[0].attn.qkv.weight,
                           reference.visual.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("freeze,match", [("", r"optimizer with 6 parameter groups, and this run builds 8"),
                                          ("vision", r"no optimizer state for \d+ of this run's trainable")])
def test_resume_with_other_optimizer_groups_says_why(tmp_path, freeze, match):
    """A checkpoint whose optimizer was grouped otherwise (here stage2.freeze changed between the runs: more groups,
    or as many over other parameters; a DDP stage-2 run saved before the groups followed the unwrapped names is
    the other case) fails to resume with an error that says so, not DCP's missing-key message."""
    run(config(tmp_path, "training.stage=2", "training.steps=1", "stage2.freeze=lm", name="s2"))
    with pytest.raises(ValueError, match=match):
        Trainer(config(tmp_path, "training.stage=2", "training.steps=2", "checkpoint.resume=auto",
                       f"stage2.freeze={freeze}", name="s2"))


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path):
    """Raising training.steps on resume stretches the schedule to the new end (the checkpoint keeps the step count,
    not the old total: the old one decayed the rate to its floor at step 4 and kept it there)."""
    from fineviti.train.optim import WarmupDecay

    run(config(tmp_path, "training.steps=4", "scheduler.decay=linear", "scheduler.warmup_steps=1", name="r"))
    cfg = config(tmp_path, "training.steps=8", "scheduler.decay=linear", "scheduler.warmup_steps=1",
                 "checkpoint.resume=auto", name="r")
    run(cfg)
    logged = {r["step"]: r["lr"] for r in rows(tmp_path / "r")}
    schedule = WarmupDecay(cfg.scheduler, 8)
    assert [logged[s] for s in range(5, 9)] == pytest.approx([cfg.optimizer.lr * schedule(s - 1)
                                                              for s in range(5, 9)], abs=1e-12)
    assert min(logged[s] for s in range(5, 8)) > 0


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_applies_this_runs_rates(tmp_path, stage):
    """The rates a resumed run applies come from its own config and schedule: a new optimizer.lr and a longer
    schedule take effect at the first resumed step (the saved groups' rates and the scheduler's base rates used to
    come back from the checkpoint: the old schedule's rate 0 at its end, or the old optimizer.lr for good), each
    part at its stage-2 scale; the weight decay follows the config too."""
    from fineviti.train.optim import WarmupDecay

    common = ["scheduler.decay=linear", "scheduler.warmup_steps=1", f"training.stage={stage}"]
    run(config(tmp_path, "training.steps=4", *common, name="r"))
    trainer = Trainer(config(tmp_path, "training.steps=8", "optimizer.lr=1e-4", "optimizer.weight_decay=0.2",
                             "checkpoint.resume=auto", *common, name="r"))
    try:
        assert trainer.step == 4
        factor = WarmupDecay(trainer.cfg.scheduler, 8)(4)  # the rate of step 5 on the new schedule
        bases = [group["initial_lr"] for group in trainer.optimizer.param_groups]
        assert min(bases) >= 1e-4 * 0.1 - 1e-15 and max(bases) == pytest.approx(1e-4)
        if stage == 2:  # the vision tower at stage2.vision_lr_scale
            assert min(bases) == pytest.approx(1e-4 * trainer.cfg.stage2.vision_lr_scale)
        assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([b * factor for b in bases])
        assert trainer.scheduler.base_lrs == bases
        assert {g["weight_decay"] for g in trainer.optimizer.param_groups} <= {0.0, 0.2}
        before = [p.detach().clone() for p in trainer.raw_model.parameters() if p.requires_grad]
        trainer.train()
        after = [p for p in trainer.raw_model.parameters() if p.requires_grad]
        assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    finally:
        trainer.close()


def test_activation_checkpointing_keeps_the_losses(tmp_path):
    from fineviti.train.parallel import block_lists

    results = {}
    for mode in ("none", "full", "selective"):
        trainer = Trainer(config(tmp_path, "training.steps=3", f"parallel.activation_checkpointing={mode}",
                                 "parallel.selective_every=2", "checkpoint.save_final=false", name=mode))
        wrapped = [type(b).__name__ == "CheckpointWrapper" for blocks in block_lists(trainer.raw_model) for b in blocks]
        assert wrapped == {"none": [False] * 4, "full": [True] * 4, "selective": [True, False] * 2}[mode]
        try:
            trainer.train()
        finally:
            trainer.close()
        results[mode] = [r["loss"] for r in rows(tmp_path / mode)]
    assert results["full"] == pytest.approx(results["none"], rel=1e-6)
    assert results["selective"] == pytest.approx(results["none"], rel=1e-6)


def test_clip_logit_scale_is_capped_after_each_step(tmp_path):
    """The trainer caps CLIP's stored log scale at log(100) after the optimizer's step (open_clip's rule)."""
    trainer = Trainer(config(tmp_path, "model.loss=clip", "training.steps=1", "checkpoint.save_final=false"))
    with torch.no_grad():
        trainer.raw_model.logit_scale.fill_(math.log(300.0))
    try:
        trainer.train()
    finally:
        trainer.close()
    assert float(trainer.raw_model.logit_scale.detach()) == pytest.approx(math.log(100.0))
    assert rows(tmp_path / "run")[0]["logit_scale"] == pytest.approx(100.0)  # (used capped in the step)


def test_metrics_lines_are_strict_json_and_a_cut_line_does_not_swallow_the_next(tmp_path, monkeypatch):
    """An fp16 overflow's grad_norm (NaN or inf) was written as NaN / Infinity, which jq and JavaScript refuse: null
    now. A line cut short by a kill stayed without its newline, and the resumed run's first row was glued to it
    (lost). TensorBoard drops the killed run's steps after the resumed one (purge_step), as metrics.jsonl does."""
    import sys
    import types

    from fineviti.train.config import MetricsConfig
    from fineviti.train.metrics import MetricsLogger, json_line

    assert json.loads(json_line({"grad_norm": float("nan"), "x": [float("inf"), 1.0], "y": {"z": -float("inf")}}),
                      parse_constant=lambda name: pytest.fail(name)) == {"grad_norm": None, "x": [None, 1.0],
                                                                            "y": {"z": None}}
    writers = []
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = lambda *args, **kwargs: writers.append(kwargs) or types.SimpleNamespace(
        add_scalar=lambda *a: None, close=lambda: None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    cfg = MetricsConfig(progress="off", tensorboard="on")
    logger = MetricsLogger(cfg, tmp_path, rank=0, total_steps=4, start_step=1)
    logger.log(2, {"loss": 1.5, "grad_norm": float("inf")})
    logger.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"step": 1, "loss": 2.0}' and len(lines) == 2  # the cut line aside, with the killed run's
    assert json.loads(lines[1]) == {"step": 2, "loss": 1.5, "grad_norm": None}
    (aside,) = tmp_path.glob("metrics.superseded-*.jsonl")
    assert aside.read_text() == '{"step": 2, "lo'
    assert writers == [{"purge_step": 2}]


def test_profile_writes_a_trace(tmp_path):
    run(config(tmp_path, "training.steps=3", "metrics.profile=2:3", "checkpoint.save_final=false"))
    traces = list((tmp_path / "run" / "profile").glob("*.json"))
    assert len(traces) == 1 and "traceEvents" in traces[0].read_text()[:2000]


def test_a_profile_window_before_the_resumed_step_warns(tmp_path):
    """--profile 1:2 on a run resumed at step 2: the window never begins (its trace was silently missing)."""
    run(config(tmp_path, "training.steps=2"))
    with pytest.warns(UserWarning, match=r"--profile\) '1:2' starts at or before the resumed step 2: no trace"):
        trainer = Trainer(config(tmp_path, "training.steps=4", "metrics.profile=1:2", "checkpoint.resume=auto"))
    try:
        assert trainer.step == 2 and trainer.profiler.window is None
    finally:
        trainer.close()
    assert [e["event"] for e in events(tmp_path / "run")].count("profile_skipped") == 1


def test_profile_window_shortened_with_the_run(tmp_path):
    """A run of training.steps=0 that skips a step ends earlier than its window was checked against: the window
    ends at the new last step (its trace written at once if the run is there), or is dropped when it starts after."""
    from fineviti.train.metrics import StepProfiler

    profiler = StepProfiler((2, 5), tmp_path, rank=0)
    assert profiler.shorten(5, 1) is None and profiler.window == (2, 5)  # (no shorter)
    profiler.begin(2)
    assert profiler.end(2) is None  # (inside the window)
    message = profiler.shorten(3, 3)
    assert message.startswith("steps 2-5 end at the run's last step: a trace of steps 2-3 (")
    assert (tmp_path / "profile" / "trace_steps2-3_rank0.json").is_file() and profiler._prof is None
    later = StepProfiler((4, 5), tmp_path, rank=0)
    assert later.shorten(3, 1) == "steps 4-5 lie past the run's last step 3: no trace" and later.window is None
    later.begin(4)
    assert later._prof is None


def test_export_vision_tower(tmp_path):
    from safetensors.torch import load_file

    from fineviti.model import VisionTower
    from fineviti.model.config import VisionConfig
    from fineviti.train.export import export_checkpoint

    cfg = config(tmp_path, "training.steps=2")
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    out = export_checkpoint(tmp_path / "run", tmp_path / "vision.safetensors")
    meta = json.loads((tmp_path / "vision.safetensors.json").read_text())
    vision = from_dict(meta["config"]["model"]["vision"], VisionConfig)
    tower = VisionTower(vision, meta["config"]["model"]["embed_dim"])
    tower.load_state_dict(load_file(str(out)))
    for name, tensor in trainer.raw_model.visual.state_dict().items():
        assert torch.equal(tower.state_dict()[name], tensor), name
    full = export_checkpoint(tmp_path / "run", tmp_path / "full.safetensors", part="full")
    assert set(load_file(str(full))) == set(trainer.raw_model.state_dict())


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA H200") == 989 and peak_tflops("NVIDIA H200 NVL") == 835  # not the SXM board's
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops("NVIDIA H100 NVL") is None
    assert peak_tflops("Tesla T4") is None and peak_tflops(None) is None


def test_apex_requested_but_missing(tmp_path):
    pytest.importorskip("torch")
    try:
        import apex  # noqa: F401

        pytest.skip("apex is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="apex"):
        Trainer(config(tmp_path, "optimizer.name=apex_fused_adam"))


@pytest.mark.gpu
def test_cuda_steps_report_mfu(tmp_path):
    """On a GPU: bf16 autocast, fused AdamW, our kernels; every row has TFLOP/s, and MFU where the GPU is known."""
    run(config(tmp_path, "training.steps=3", "training.device=cuda", "random_data.token_budget=4096",
               "random_data.max_side=32", "checkpoint.save_final=false"))
    logged = rows(tmp_path / "run")
    name = torch.cuda.get_device_name()
    for r in logged:
        assert math.isfinite(r["loss"]) and r["tflops_per_gpu"] > 0
        assert (r["mfu"] is None) == (peak_tflops(name) is None)


@pytest.mark.gpu
@pytest.mark.parametrize("stage,log_every", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_cuda_steps_read_the_device_only_where_they_must(tmp_path, monkeypatch, stage, log_every):
    """Every host read of the GPU in a step waits for all the work queued before it. After the first step (Triton
    compiles, autotuning), a step on one GPU reads the device only at these lines: the loss with the logit scale and
    bias (one read, with the losses and norms of the steps since the last row) and the gradient norm (one); with
    metrics.log_every=3 the steps between rows (2) read nothing. An audit found 7 in stage 1 (caption truncation on
    the GPU batch, the scale read after the optimizer step) and 12 plus 4 per region box in stage 2 (the aligner's
    counts of image rows and of answer tokens among them); torch.cuda.set_sync_debug_mode("warn") names each at its
    line."""
    import linecache
    import warnings

    monkeypatch.delenv("FINEVITI_CHECKS", raising=False)  # (value checks read the device by design)
    allowed = ["scalars.tolist()", "torch.cat([scalars, torch.stack(held)]).tolist()",
               "float(on_device)"]
    original = Trainer.train_step
    caught = []  # (step, warning)

    def train_step(self, batch, **kwargs):
        if self.step < 2:
            return original(self, batch, **kwargs)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(self, batch, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                caught.extend((self.step, w) for w in seen if "synchroniz" in str(w.message))

    monkeypatch.setattr(Trainer, "train_step", train_step)
    run(config(tmp_path, f"training.stage={stage}", "training.steps=4", "training.device=cuda",
               "random_data.token_budget=4096", "random_data.max_side=32", "checkpoint.save_final=false",
               "checkpoint.interval=0", f"metrics.log_every={log_every}"))
    sites = {(w.filename, w.lineno, linecache.getline(w.filename, w.lineno).strip()) for _, w in caught}
    unexpected = [site for site in sites if not any(a in site[2] for a in allowed)]
    assert caught and not unexpected, sorted(sites)
    if log_every == 3:  # step 2 lies between rows; steps 3 (a row) and 4 (the last) read
        assert {step for step, _ in caught} == {3, 4}, sorted(sites)


def test_data_norm_must_match_the_vision_towers(tmp_path, shards):
    """data.norm normalises training's pixels; the tower's image_mean / image_std (saved with the model) normalise
    evaluation's and export's: a run whose two differ is refused, naming both and the overrides that fix it."""
    with pytest.raises(ValueError, match=r"data.norm='clip' .* model.vision.image_mean / image_std .* "
                                         r"\(0.5, 0.5, 0.5\).*set model.vision.image_mean=0.48145466"):
        Trainer(shard_config(tmp_path, shards, "data.norm=clip", "training.steps=1"))
    clip = ["model.vision.image_mean=0.48145466,0.4578275,0.40821073",
            "model.vision.image_std=0.26862954,0.26130258,0.27577711"]
    trainer = Trainer(shard_config(tmp_path, shards, "data.norm=clip", *clip, "training.steps=1", name="clip"))
    trainer.close()


def test_saved_config_of_a_checkpoint_folder(tmp_path):
    """The trainer's reader of a checkpoint's config (one reader with the evaluator's): a folder without config.json
    is named; an exported file is no checkpoint folder."""
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ckpt.saved_config(tmp_path)
    (tmp_path / "config.json").write_text('{"training": {"stage": 1}}')
    assert ckpt.saved_config(tmp_path) == {"training": {"stage": 1}}
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ckpt.saved_config(tmp_path / "config.json")


def test_a_stage1_checkpoint_and_its_exports_keep_the_tokenizer(tmp_path, shards):
    """The text tower's ids mean nothing without the tokenizer that made them, and the training config's path to
    it may be relative or gone by the time a checkpoint is evaluated: each checkpoint keeps a copy, each export
    writes one beside its file, and `fineviti eval` finds them from a run folder, a checkpoint or an export."""
    import argparse
    import shutil

    from fineviti.data.tokenizer import CaptionTokenizer, tokenizer_config_path
    from fineviti.eval.cli import _find_tokenizer
    from fineviti.train.export import export_checkpoint, tokenizer_file
    from tests.dist_util import train_until

    given = tmp_path / "elsewhere" / "tokenizer.json"
    given.parent.mkdir()
    shutil.copyfile(shards / "tokenizer.json", given)
    # a Hugging Face style tokenizer_config.json beside it names the special tokens: here no pad (eos pads)
    given.with_name("tokenizer_config.json").write_text(json.dumps({"pad_token": None}))
    trained_with = CaptionTokenizer(given)
    assert trained_with.pad_id == trained_with.eos_id != CaptionTokenizer(shards / "tokenizer.json").pad_id
    trainer = Trainer(shard_config(tmp_path, shards, "training.steps=2", "checkpoint.interval=1",
                                   f"data.tokenizer={given}", "checkpoint.export=vision"))
    original = given.read_bytes()
    # removed (or moved, or rewritten) while the run goes on: its saves keep the tokenizer it started with (each
    # save once copied the file anew, and failed the run at its next save without it)
    shutil.rmtree(given.parent)
    train_until(trainer)
    run_dir = tmp_path / "run"
    kept = [folder / "tokenizer.json" for _, folder in ckpt.list_checkpoints(run_dir / "checkpoints")]
    out = export_checkpoint(run_dir, tmp_path / "vision.safetensors")
    for copy in (*kept, tokenizer_file(run_dir / "model.safetensors"), tokenizer_file(out)):  # the trainer's export
        assert copy.read_bytes() == original and tokenizer_config_path(copy).is_file(), copy
        assert CaptionTokenizer(copy).pad_id == trained_with.pad_id, copy
    assert len(kept) == 2
    assert tokenizer_config_path(tokenizer_file(out)).name == "vision.safetensors.tokenizer_config.json"

    def found(**kw):
        args = {"tokenizer": None, "checkpoint": None, "vision_checkpoint": None, "data": str(tmp_path / "none")}
        return _find_tokenizer(argparse.Namespace(**{**args, **kw}))

    assert found(checkpoint=str(run_dir)) == kept[-1]  # a run folder: its newest checkpoint's copy
    assert found(checkpoint=str(kept[0].parent)) == kept[0]
    assert found(vision_checkpoint=str(out)) == tokenizer_file(out)
    # both: the text tower's checkpoint's first (it reads the captions), whatever the vision tower's keeps
    assert found(checkpoint=str(kept[0].parent), vision_checkpoint=str(out)) == kept[0]
    # an export from a checkpoint without a copy (an older run's) leaves no stale one beside the file it replaces
    kept[-1].unlink()
    # a text tower's checkpoint without a copy: a tokenizer beside it still comes before the vision tower's copy
    beside = kept[-1].parent.parent / "tokenizer.json"
    shutil.copyfile(kept[0], beside)
    assert found(checkpoint=str(kept[-1].parent), vision_checkpoint=str(out)) == beside
    beside.unlink()
    export_checkpoint(kept[-1].parent, out, overwrite=True)
    assert not tokenizer_file(out).exists() and not tokenizer_config_path(tokenizer_file(out)).exists()
    with pytest.raises(FileNotFoundError, match="no --tokenizer given"):
        found(vision_checkpoint=str(out))


def test_tokenizer_copies_carry_the_special_tokens_they_were_read_with(tmp_path, shards):
    """A tokenizer without a tokenizer_config.json is copied with one that names the special tokens it was read
    with (fineviti's), so that the copy reads them alike even beside another tokenizer_config.json; a file named
    <name>.tokenizer.json without its own <name>.tokenizer_config.json still reads the one beside it."""
    import shutil

    from fineviti.data.tokenizer import CaptionTokenizer, tokenizer_config_path, tokenizer_files, write_tokenizer

    source = CaptionTokenizer(shards / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": None, "eos_token": "<bos>"}))
    copy = tmp_path / "x.safetensors.tokenizer.json"
    write_tokenizer(tokenizer_files(shards / "tokenizer.json"), copy)
    assert tokenizer_config_path(copy) == tmp_path / "x.safetensors.tokenizer_config.json"
    read = CaptionTokenizer(copy)
    assert (read.bos_id, read.eos_id, read.pad_id) == (source.bos_id, source.eos_id, source.pad_id)
    named = tmp_path / "qwen.tokenizer.json"
    shutil.copyfile(shards / "tokenizer.json", named)
    assert tokenizer_config_path(named) == tmp_path / "tokenizer_config.json"
    assert CaptionTokenizer(named).eos_id == source.bos_id


@pytest.mark.parametrize("stage,grad_cache", [(1, 0), (2, 0), (1, 2)])
def test_what_the_step_reads_from_the_batch_is_read_before_its_copy_to_the_device(tmp_path, monkeypatch, stage,
                                                                                  grad_cache):
    """Caption truncation (stage 1), the region samples (stage 2) and GradCache's chunks read the batch's values
    (offsets, boxes, captions, grids): after the copy to the GPU each read waited for the device, the stage-2
    samples four per box, the chunks 4-6 each (an audit of the step's host synchronisations). They now take the
    host batch, before PackedBatch.to."""
    from fineviti.data.batch import PackedBatch
    from fineviti.train import stage2
    from fineviti.train import trainer as trainer_mod

    moved = []  # the batches .to() made, kept alive (ids of freed objects are reused)
    original_to = PackedBatch.to

    def to(self, *args, **kwargs):
        out = original_to(self, *args, **kwargs)
        moved.append(out)
        return out

    seen = []

    def spy(function):
        def wrapped(batch, *args, **kwargs):
            seen.append(any(batch is m for m in moved))
            return function(batch, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(PackedBatch, "to", to)
    monkeypatch.setattr(trainer_mod, "truncate_captions", spy(trainer_mod.truncate_captions))
    monkeypatch.setattr(stage2, "region_tasks", spy(stage2.region_tasks))
    monkeypatch.setattr(trainer_mod, "split_images", spy(trainer_mod.split_images))
    run(config(tmp_path, f"training.stage={stage}", "training.steps=2", f"training.grad_cache_images={grad_cache}"))
    assert len(seen) == (4 if grad_cache else 2) and moved and not any(seen), seen


def test_resume_names_what_differs_from_the_checkpoint(tmp_path, shards):
    """--resume builds the model and the data from this run's config: a checkpoint of another architecture, stage
    or data plan is named field by field (it was a 49-line traceback from DCP's loader for a vocabulary size, and
    for the data a plan fingerprint that did not say which setting had changed)."""
    run(shard_config(tmp_path, shards, "training.steps=2", "checkpoint.interval=1"))
    with pytest.raises(ValueError, match=r"another model, model.text.vocab_size: checkpoint 2000, this run 3000;"):
        Trainer(shard_config(tmp_path, shards, "training.steps=3", "model.text.vocab_size=3000",
                             "checkpoint.resume=auto"))
    # (no tensor's shape shows these: the checkpoint would have loaded)
    with pytest.raises(ValueError, match=r"another model, model.text.rope_theta: checkpoint 10000.0, this run 100.0 "
                                         r"\(and 1 more\)"):
        Trainer(shard_config(tmp_path, shards, "training.steps=3", "model.vision.rope_theta=100",
                             "model.text.rope_theta=100", "checkpoint.resume=auto"))
    with pytest.raises(ValueError, match=r"stage-1 run, this run is stage 2: .*stage2.init_from"):
        Trainer(shard_config(tmp_path, shards, "training.steps=3", "training.stage=2", "checkpoint.resume=auto"))
    with pytest.raises(ValueError, match=r"another plan .* data settings differ from the checkpoint's: "
                                         r"data.token_budget: checkpoint 256, this run 320;"):
        Trainer(shard_config(tmp_path, shards, "training.steps=3", "data.token_budget=320", "data.prefetch=4",
                             "checkpoint.resume=auto"))  # (the prefetch depth shapes no plan: not named)
    trainer = Trainer(shard_config(tmp_path, shards, "training.steps=3", "model.attn_backend=torch",
                                   "checkpoint.resume=auto"))  # a backend is no architecture
    assert trainer.step == 2
    trainer.close()


def test_resume_on_a_data_set_that_changed_says_so(tmp_path, shards):
    """Same settings, other samples at data.path: the plan's fingerprint differs and no setting does; the error
    says the data set changed (it once listed settings that shape no plan, as if repeating them would help)."""
    import shutil

    from fineviti.data import synth

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    steps = ("training.steps=3", "checkpoint.interval=1", f"data.path={data / 'train'}")
    run(shard_config(tmp_path, shards, *steps[:2], steps[2]))
    shutil.rmtree(data)
    synth.generate(data, 40, heldout=0, samples_per_shard=16, processes=1, seed=7)
    with pytest.raises(ValueError, match=r"another plan .* No data setting that shapes the plan differs from the "
                                         r"checkpoint's: the data set itself changed"):
        Trainer(shard_config(tmp_path, shards, *steps, "data.prefetch=4", "checkpoint.resume=auto"))


def test_a_missing_data_path_says_how_to_make_one(tmp_path):
    """The tiny preset's default data.path (data/synthetic/train) does not exist on a fresh checkout: the error
    named only the path; now also the command that makes the synthetic set and the random-batch alternative."""
    with pytest.raises(FileNotFoundError, match=r"data.path '.*nowhere' does not exist: .*`fineviti data synth "
                                                r"--out DIR`, then data.path=DIR/train; .*training.data_source=random"):
        Trainer(config(tmp_path, "training.data_source=shards", f"data.path={tmp_path / 'nowhere'}"))


def test_stage2_without_init_from_warns_of_a_random_vision_tower(tmp_path):
    with pytest.warns(UserWarning, match="stage 2 starts from a random vision tower: stage2.init_from"):
        run(config(tmp_path, "training.stage=2", "training.steps=1"))


def test_a_backend_the_device_cannot_run_is_named_before_any_work(tmp_path, monkeypatch):
    """model.attn_backend=triton on a CPU without Triton's interpreter failed at the first step, a traceback from
    inside the forward; the rope backend 'cuda' likewise."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"model.attn_backend='triton' cannot run on this run's device \(cpu\): "
                                         r".*TRITON_INTERPRET=1"):
        Trainer(config(tmp_path, "model.attn_backend=triton", "training.device=cpu"))
    with pytest.raises(ValueError, match=r"aligner.rope_backend='cuda' cannot run .*needs CUDA tensors"):
        Trainer(config(tmp_path, "training.stage=2", "aligner.rope_backend=cuda", "training.device=cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    Trainer(config(tmp_path, "model.norm_backend=triton", "training.device=cpu")).close()


def test_frozen_parts_take_the_mixed_precision_dtype(tmp_path):
    """stage2.frozen_dtype=auto: under bf16 mixed precision the frozen LM's weights are bf16 (autocast computes with
    bf16 copies anyway, cast at every use: a frozen weight is no trainable leaf, whose cast autocast would keep), the
    trained parts stay fp32, the losses stay those of fp32 frozen weights to bf16 rounding, and a run killed after
    its checkpoint resumes to the same weights; a checkpoint of either dtype resumes under the other."""
    def cfg(name, *overrides):
        return config(tmp_path, "training.stage=2", "training.steps=3", "training.mixed_precision=bf16",
                      "stage2.freeze=lm", "checkpoint.interval=2", *overrides, name=name)

    whole = train_until(Trainer(cfg("auto")))
    assert {p.dtype for p in whole.raw_model.lm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in whole.raw_model.visual.parameters()} == {torch.float32}
    fp32 = train_until(Trainer(cfg("fp32", "stage2.frozen_dtype=fp32")))
    assert {p.dtype for p in fp32.raw_model.lm.parameters()} == {torch.float32}
    want = [r["loss"] for r in rows(tmp_path / "fp32")]
    assert [r["loss"] for r in rows(tmp_path / "auto")] == pytest.approx(want, rel=1e-3)
    train_until(Trainer(cfg("resumed")), crash_at=3)
    resumed = train_until(Trainer(cfg("resumed", "checkpoint.resume=auto")))
    assert [r["loss"] for r in rows(tmp_path / "resumed")] == [r["loss"] for r in rows(tmp_path / "auto")]
    for (name, a), b in zip(whole.raw_model.named_parameters(), resumed.raw_model.parameters(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # the fp32 run's checkpoint under auto, the bf16 run's under fp32: loaded into this run's dtypes
    other = train_until(Trainer(cfg("fp32", "training.steps=4", "checkpoint.resume=auto")))
    assert {p.dtype for p in other.raw_model.lm.parameters()} == {torch.bfloat16}
    other = train_until(Trainer(cfg("auto", "training.steps=4", "stage2.frozen_dtype=fp32", "checkpoint.resume=auto")))
    assert {p.dtype for p in other.raw_model.lm.parameters()} == {torch.float32}
    assert len(rows(tmp_path / "auto")) == 4


def test_steps_between_rows_read_nothing_and_train_the_same(tmp_path, monkeypatch):
    """metrics.log_every=3: the steps between two rows (1, 2, 4, 5) read nothing from the device (their loss and
    gradient norm wait for the next row's one read, the norm clips by a factor computed on the device); rows at 3,
    6 and the last step, 7, with the same loss, norm and logit scale as a run that reads every step, and the same
    weights; rates over the steps since the previous row."""
    from fineviti.train import parallel
    from fineviti.train import trainer as trainer_mod

    clip_reads = []
    original_clip = parallel.clip_grad_norm

    def clip(params, max_norm, read=True):
        clip_reads.append(read)
        return original_clip(params, max_norm, read=read)

    monkeypatch.setattr(parallel, "clip_grad_norm", clip)
    reads = []
    original_read = trainer_mod.Trainer._read_with_pending

    def read_with_pending(self, scalars):
        reads.append((self.step, len(self._pending)))
        return original_read(self, scalars)

    monkeypatch.setattr(trainer_mod.Trainer, "_read_with_pending", read_with_pending)
    steps = ["training.steps=7", "training.grad_clip=0.5"]  # (the debug model's norms clip at 0.5)
    every = train_until(Trainer(config(tmp_path, *steps, name="every")))
    assert reads == [(s, 0) for s in range(1, 8)] and clip_reads == [True] * 7
    reads.clear()
    clip_reads.clear()
    deferred = train_until(Trainer(config(tmp_path, *steps, "metrics.log_every=3", name="deferred")))
    assert reads == [(3, 2), (6, 2), (7, 0)]
    assert clip_reads == [False, False, True, False, False, True, True]
    want = {r["step"]: r for r in rows(tmp_path / "every")}
    got = rows(tmp_path / "deferred")
    assert [r["step"] for r in got] == [3, 6, 7]
    assert any(r["grad_norm"] > 0.5 for r in want.values())  # (the clip scaled some steps' gradients)
    for row in got:
        for key in ("loss", "grad_norm", "lr", "logit_scale", "logit_bias", "images", "patch_tokens"):
            assert row[key] == want[row["step"]][key], (row["step"], key)
        assert row["images_per_s"] > 0 and row["tokens_per_s"] > 0 and row["step_time_s"] > 0
    for (name, a), b in zip(every.raw_model.named_parameters(), deferred.raw_model.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_a_non_finite_step_between_rows_stops_at_the_next_and_saves_nothing_after_it(tmp_path, clip):
    """metrics.log_every=3 and a NaN gradient at step 4 (between rows): the update runs on it (nothing was read),
    the checkpoint due at step 5 is not written, and the error names step 4. Clipped (1.0), the NaN norm scales
    every gradient, the logit scale's too, and step 5's value check of the scale (which runs on a CPU) fails
    first: that error is chained to the one that names step 4 (it once stood alone, naming no step)."""
    trainer = Trainer(config(tmp_path, "training.steps=9", "metrics.log_every=3", "checkpoint.interval=5",
                             "checkpoint.save_final=false", f"training.grad_clip={clip}"))
    weight = next(p for p in trainer.raw_model.parameters() if p.dim() == 2)
    weight.register_hook(lambda g: g * float("nan") if trainer.step == 4 else g)
    with pytest.raises(NonFiniteLossError, match=r"the gradient norm is nan at step 4, a step between two metrics "
                                                 r"rows \(metrics.log_every=3\): its update ran, and steps up to 5") \
            as raised:
        try:
            trainer.train()
        finally:
            trainer.close()
    cause = raised.value.__cause__
    assert (cause is None) if not clip else "logit_scale must be finite, got nan" in str(cause)
    assert [r["step"] for r in rows(tmp_path / "run")] == [3]
    assert ckpt.list_checkpoints(tmp_path / "run" / "checkpoints") == []

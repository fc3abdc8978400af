"""The trainer: config -> Trainer -> train() -> close().

    trainer = Trainer(preset("tiny"))
    try:
        trainer.train()
    finally:
        trainer.close()

Stage 1 trains the two-tower model with its contrastive loss, negatives from every rank; with
training.grad_cache_images it follows GradCache (Gao et al., 2021): embeddings of the whole batch without
gradients, the loss and its gradients with respect to the embeddings, then a forward and backward per chunk of
images with those gradients, so that a batch larger than memory keeps all of its negatives. Stage 2 trains the
aligner on region tasks (fineviti.train.stage2). Each step: the next batch on every rank (or the run ends on all
of them), forward and backward, the metrics reduced over ranks (a non-finite loss stops the run before the
optimizer step), gradient clipping, the optimizer and schedule steps; then the batch counts as consumed, the
metrics are logged and a checkpoint is written if due.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from fineviti._errors import work
from fineviti.train import checkpoint as ckpt
from fineviti.train import parallel
from fineviti.train.config import (
    STAGE2_PARTS,
    STAGE2_TASKS,
    JobConfig,
    parse_parts,
    parse_profile,
    parse_text_schedule,
    text_length_at,
    to_json,
)
from fineviti.train.data import LoaderSource, RandomBatches, split_images, truncate_captions
from fineviti.train.metrics import (
    MetricsLogger,
    NonFiniteLossError,
    StepProfiler,
    check_finite,
    device_name,
    nvtx_range,
    peak_tflops,
)
from fineviti.train.optim import build_optimizer, build_scheduler


class DataExhaustedError(RuntimeError):
    pass


MAX_SKIPPED_IN_A_ROW = 100  # batches skipped one after another (a rank's pack without an image) before giving up


def _check_norm(norm: str, vision, prefix: str) -> None:
    """The data path normalises with data.norm; evaluation and export with the vision tower's image_mean and
    image_std (saved with the model): they must be the same statistics, else every later evaluation sees pixels
    normalised differently from training's."""
    from fineviti.data.pixels import NORMS

    mean, std = NORMS[norm]
    have = (tuple(vision.image_mean), tuple(vision.image_std))
    if not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip((*have[0], *have[1]), (*mean, *std), strict=True)):
        raise ValueError(
            f"data.norm={norm!r} normalises with mean {mean} and std {std}, but {prefix}.image_mean / image_std "
            f"(what evaluation and export normalise with) are {have[0]} / {have[1]}; set {prefix}.image_mean="
            f"{','.join(map(str, mean))} {prefix}.image_std={','.join(map(str, std))}, or choose the data.norm "
            f"that matches them")


class Trainer:
    def __init__(self, cfg: JobConfig):
        cfg.validate()
        self.cfg = cfg
        self.world = parallel.init_world(cfg.parallel, cfg.training.device)
        self.device = self.world.device
        self.rank = self.world.rank
        torch.manual_seed(cfg.training.seed)  # the same initial weights on every rank
        self.run_dir = Path(cfg.out_dir)
        self.stage = cfg.training.stage
        self.mp_dtype = parallel.mixed_precision_dtype(cfg.training.mixed_precision, self.device)
        self.text_schedule = parse_text_schedule(cfg.training.text_length)
        self._check_backends()
        if cfg.eval.every:  # found missing now, not at the first evaluation
            from fineviti.data.shards import list_shards

            try:
                list_shards(cfg.eval.path)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"eval.path: {exc}") from None

        fsdp = self.world.distributed and cfg.parallel.strategy == "fsdp"
        if self.stage == 1:
            from fineviti.model import FineViT

            raw = FineViT(cfg.model)
            scales = None
        else:
            from fineviti.train import stage2

            raw, cfg.aligner = stage2.build_aligner(cfg)
            frozen = parse_parts(cfg.stage2.freeze, "stage2.freeze", STAGE2_PARTS)
            stage2.freeze_parts(raw, frozen)
            if cfg.stage2.frozen_dtype == "auto" and self.mp_dtype is not None and not fsdp:
                stage2.cast_frozen(raw, frozen, self.mp_dtype)
            scales = stage2.part_scales(cfg)
        self.raw_model = raw
        self.model = parallel.parallelize(raw, cfg.parallel, self.world, self.mp_dtype)
        self.autocast_dtype = None if fsdp else self.mp_dtype  # FSDP2's policy casts the parameters itself
        # fp16 needs loss scaling (bf16 has fp32's range): dynamic, decided by the global gradient norm
        self.scaler = parallel.LossScaler() if self.mp_dtype == torch.float16 else None
        # the unwrapped model's names ("visual.", not DDP's "module.visual."): the stage-2 parts' learning-rate
        # scales look up the first name component (the same parameter objects: DDP wraps, FSDP2 shards in place)
        self.optimizer = build_optimizer(raw, cfg.optimizer, device=self.device, part_scales=scales)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.replicated = parallel.replicated_params(self.model) if fsdp else []

        self.data = self._build_data()
        # training.steps=0: the steps data.epochs give from the start at this world size (counted again from the
        # resumed position below, which differs only after a change of world size)
        self.steps_from_epochs = cfg.training.steps == 0
        if self.steps_from_epochs:
            cfg.training.steps = self.data.steps_left()
            if cfg.training.steps == 0:
                raise ValueError(f"training.steps=0: data.epochs={cfg.data.epochs} gives no step at world size "
                                 f"{self.world.world_size} ({self.data.left_out()} samples, fewer than the ranks)")
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.training.steps)
        self.tokens = self._prompt_ids() if self.stage == 2 else None
        self.config_json = self._config_json()
        # stage 1 on a data set: its checkpoints keep the captions' tokenizer (a stage-2 run's is its LM's, or the
        # built-in LM's data set's, which nothing reads back from a checkpoint)
        tokenizer = self.data.tokenizer.path if self.stage == 1 and isinstance(self.data, LoaderSource) else None
        self.checkpointer = ckpt.Checkpointer(cfg.checkpoint, self.run_dir, rank=self.rank,
                                              world_size=self.world.world_size, config_json=self.config_json,
                                              tokenizer=tokenizer)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpointer.clean_partial()
        self.step = 0
        self.finished = False  # train() reached training.steps (what close() exports)
        resume = self.checkpointer.resume_path()
        if resume is not None:
            self.step = self.checkpointer.load(resume, self.model, self.optimizer, self.scheduler, self.data,
                                               scaler=self.scaler)
            if self.steps_from_epochs:
                self._steps_from(self.step + self.data.steps_left())
        if self.steps_from_epochs:  # after the resume: its count (checked by validate() where the steps were given)
            window = parse_profile(cfg.metrics.profile)
            if window is not None and window[1] > cfg.training.steps:
                raise ValueError(f"metrics.profile (--profile) {cfg.metrics.profile!r} ends after the run's last step "
                                 f"(training.steps=0: data.epochs={cfg.data.epochs} gives {cfg.training.steps} "
                                 f"steps at world size {self.world.world_size}): no trace would be written")
        if self.rank == 0:  # after the resume: a resume that fails (no checkpoint there, another architecture)
            # leaves the run's config.json as it was
            (self.run_dir / "config.json").write_text(self.config_json)
        superseded = []
        if cfg.checkpoint.interval > 0 or cfg.checkpoint.save_final:  # a run that never saves leaves them be
            superseded = self.checkpointer.set_aside_after(self.step, resume)
        self.metrics = MetricsLogger(cfg.metrics, self.run_dir, rank=self.rank, total_steps=cfg.training.steps,
                                     start_step=self.step)
        if self.steps_from_epochs:
            self.metrics.event(kind="steps_from_epochs", step=self.step, steps=cfg.training.steps,
                               epochs=cfg.data.epochs, world_size=self.world.world_size,
                               samples_left_out=self.data.left_out())
        if resume is not None:
            self.metrics.event(kind="resume", step=self.step, checkpoint=str(resume))
            changed = self._changed_since(resume)
            if changed:
                self.metrics.event(kind="resume_config_changed", step=self.step, changed=changed)
                if self.rank == 0:
                    warnings.warn(f"resuming {resume} with another config than it was saved with: "
                                  f"{'; '.join(changed)} (a resumed run takes this run's config, not the "
                                  f"checkpoint's: repeat the first run's overrides to keep them)", stacklevel=2)
        if self.stage == 2 and resume is None and not cfg.stage2.init_from and self.rank == 0:
            warnings.warn("stage 2 starts from a random vision tower: stage2.init_from names no stage-1 checkpoint "
                          "or run folder to start it from", stacklevel=2)
        if superseded:
            self.metrics.event(kind="superseded", step=self.step, moved=[str(p) for p in superseded])
        window = parse_profile(cfg.metrics.profile)
        if window is not None and window[0] <= self.step:  # a resumed run past the window's start: no trace
            passed = (f"metrics.profile (--profile) {cfg.metrics.profile!r} starts at or before the resumed step "
                      f"{self.step}: no trace is written (profile later steps)")
            self.metrics.event(kind="profile_skipped", step=self.step, reason=passed)
            if self.rank == 0:
                warnings.warn(passed, stacklevel=2)
            window = None
        self.profiler = StepProfiler(window, self.run_dir, self.rank)
        self.nvtx = cfg.metrics.nvtx and self.device.type == "cuda"
        self.peak = peak_tflops(device_name(self.device)) if self.device.type == "cuda" else None
        self.last_row: dict = {}
        # metrics.log_every > 1: the steps between two rows read nothing from the device (_reads_at); their loss and
        # gradient norm wait here, on the device, for the next row's one read; their counts and host times add up
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self._window = _Window()

    # -- construction helpers ----------------------------------------------------------------------------------

    def _end_of_run(self, last: int) -> None:
        """The last step's save and evaluation, for a step that was taken as a middle one (its run's horizon fell to
        it afterwards: a later step skipped); what it did then as a middle step is not done twice."""
        self._check_pending()  # (the step was taken as a middle one: it may not have read)
        interval, every = self.cfg.checkpoint.interval, self.cfg.eval.every
        if self.checkpointer.due(last, last) and not (interval > 0 and last % interval == 0):
            self.save()
        if every and last % every != 0:
            self.evaluate()

    def _config_json(self) -> str:
        """The config as the run's config.json, its checkpoints and its export keep it: as set, so training.steps=0
        stays 0 (the count it gave is in the metrics' steps_from_epochs events; a run restarted from the file counts
        again, and a resume that switches between a count and 0 is reported as a changed setting)."""
        saved = json.loads(to_json(self.cfg))
        if self.steps_from_epochs:
            saved["training"]["steps"] = 0
        return json.dumps(saved, indent=2)

    def _steps_from(self, total: int) -> None:
        """training.steps set to `total` in a run whose steps data.epochs decide (after a resume, or a skipped step);
        the schedule's horizon with it and the rate of the next step (config.json keeps 0: `_config_json`)."""
        if total == self.cfg.training.steps:
            return
        self.cfg.training.steps = total
        for shape in self.scheduler.lr_lambdas:
            shape.total = total
        for group, base, shape in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                      self.scheduler.lr_lambdas, strict=True):
            group["lr"] = base * shape(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if getattr(self, "metrics", None) is not None:  # (after a resume it is made later, with this total)
            self.metrics.set_total(total)

    def _check_backends(self) -> None:
        """A backend the run's device cannot run, named before any work (it failed at the first step, from inside
        the forward): each op's own rule, on the run's device."""
        from fineviti.ops import attention, contrastive, glu, norm, rope

        probe = torch.empty(0, 4, device=self.device)  # (fp32: every backend takes it)
        resolvers = {"attn_backend": lambda b: attention.resolve_backend(b, self.device),
                     "rope_backend": lambda b: rope.resolve_backend(b, self.device),
                     "loss_backend": lambda b: contrastive._resolve_backend(b, probe),
                     "norm_backend": lambda b: norm.resolve_backend(b, probe),
                     "swiglu_backend": lambda b: glu.resolve_backend(b, probe)}
        section, prefix = (self.cfg.model, "model") if self.stage == 1 else (self.cfg.aligner, "aligner")
        for field, resolve in resolvers.items():
            value = getattr(section, field, "auto")
            if value == "auto":
                continue
            try:
                resolve(value)
            except (ValueError, RuntimeError, TypeError) as exc:
                raise ValueError(f"{prefix}.{field}={value!r} cannot run on this run's device ({self.device}): "
                                 f"{exc}") from None

    def _changed_since(self, checkpoint: Path) -> list[str]:
        """What this run's config sets otherwise than the checkpoint's config.json ("optimizer.lr: checkpoint 0.0001,
        model 0.00256"), checkpoint.resume and the runtime choices (backends) aside."""
        from fineviti.eval.checkpoint import config_differences

        saved = ckpt.saved_config_or_none(checkpoint)
        if not saved:
            return []
        saved.get("checkpoint", {}).pop("resume", None)
        mine = json.loads(self.config_json)
        mine.get("checkpoint", {}).pop("resume", None)
        return config_differences(saved, mine, other="this run")

    def _build_data(self):
        cfg = self.cfg
        if cfg.training.data_source == "random":
            if self.stage == 1:
                patch, merge, vocab = cfg.model.vision.patch_size, cfg.model.vision.merge, cfg.model.text.vocab_size
            else:
                patch, merge = cfg.aligner.vision.patch_size, cfg.aligner.vision.merge
                vocab = self.raw_model.lm.vocab_size
            return RandomBatches(cfg.random_data, patch_size=patch, merge=merge, vocab_size=vocab, rank=self.rank,
                                 world_size=self.world.world_size, with_regions=self.stage == 2)
        if not Path(cfg.data.path).exists():
            raise FileNotFoundError(
                f"data.path {cfg.data.path!r} does not exist: a folder of .tar shards (or one .tar) is expected. The "
                f"synthetic set: `fineviti data synth --out DIR`, then data.path=DIR/train; or train on random "
                f"batches with training.data_source=random")
        vision = cfg.model.vision if self.stage == 1 else cfg.aligner.vision
        if self.stage == 2 and cfg.aligner.lm != "builtin":  # the LM's own vocabulary, not the data set's
            from fineviti.train import stage2

            cfg.data.tokenizer = stage2.lm_tokenizer(cfg.aligner.lm, cfg.data.tokenizer)
        if cfg.data.patch != vision.patch_size:
            raise ValueError(f"data.patch = {cfg.data.patch} differs from the model's patch_size "
                             f"{vision.patch_size}; expected them equal")
        _check_norm(cfg.data.norm, vision, "model.vision" if self.stage == 1 else "aligner.vision")
        if self.stage == 2 and cfg.data.merge != 2:
            raise ValueError(f"stage 2 merges 2x2 patch groups: data.merge must be 2, got {cfg.data.merge}")
        source = LoaderSource(cfg.data, self.rank, self.world.world_size)
        vocab = source.tokenizer.vocab_size
        limit = cfg.model.text.vocab_size if self.stage == 1 else self.raw_model.lm.vocab_size
        if vocab > limit:
            part = "model.text.vocab_size" if self.stage == 1 else "aligner.builtin_lm.vocab_size"
            raise ValueError(f"the data set's tokenizer has {vocab} tokens but {part} = {limit}; expected at least "
                             f"the tokenizer's size")
        return source

    def _prompt_ids(self):
        from fineviti.train import stage2

        if isinstance(self.data, LoaderSource):
            return stage2.TextIds(self.data.tokenizer)
        return stage2.ByteIds(self.raw_model.lm.vocab_size)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- the loop ----------------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Runs to training.steps (from the resumed step); returns the last step's metrics. An exception raised
        here keeps its traceback on the command line (fineviti._errors.work)."""
        with work():
            return self._train()

    def _train(self) -> dict:
        last = self.cfg.training.steps
        batches = iter(self.data)
        tick = time.perf_counter()
        skipped = 0  # in a row
        while self.step < last:
            batch = next(batches, None)
            have, saved = self._every_rank_has(batch)
            if saved:  # an asynchronous save written on every rank: commit it now, not at the next save
                self.checkpointer.finish_pending()
            if have == "none":
                hint = ("" if self.steps_from_epochs else ", or set training.steps=0 (the steps data.epochs give)")
                raise DataExhaustedError(f"the data ran out after {self.step} of {last} steps on at least one rank "
                                         f"({self.data.summary()}); lower training.steps or allow more "
                                         f"epochs{hint}")
            if have == "empty":
                skipped += 1
                self._skip(batch, skipped)
                if self.steps_from_epochs:  # a step counted at the start that is not taken: the run ends one earlier
                    last -= 1
                    if last == 0:
                        raise DataExhaustedError(f"training.steps=0: every step data.epochs={self.cfg.data.epochs} "
                                                 f"gives was skipped, no pack had a decodable image on every rank "
                                                 f"({self.data.summary()})")
                    self._steps_from(last)
                    self.metrics.event(kind="steps_from_epochs", step=self.step, steps=last,
                                       reason="a step was skipped (a rank's pack had no decodable image)")
                    shortened = self.profiler.shorten(last, self.step)
                    if shortened is not None:
                        self.metrics.event(kind="profile_shortened", step=self.step, window=shortened)
                        if self.rank == 0:
                            warnings.warn(f"metrics.profile (--profile) {self.cfg.metrics.profile!r}: {shortened}",
                                          stacklevel=2)
                    if 0 < self.step == last:  # the skipped step was the last: the end of the run comes now
                        self._end_of_run(last)
                tick = time.perf_counter()
                continue
            skipped = 0
            data_wait = time.perf_counter() - tick
            self.step += 1
            self.profiler.begin(self.step)
            with torch.profiler.record_function(f"step {self.step}"):
                try:
                    row = self.train_step(batch, read=self._reads_at(self.step, last))
                except Exception as exc:
                    # a non-finite step between rows first shows as an error of its own in a later step (a value
                    # check of a NaN logit scale, on a CPU or with FINEVITI_CHECKS=1): named as what it is
                    self._check_pending(cause=exc)
                    raise
            self.data.mark_consumed(batch)
            self.profiler.end(self.step)
            self._window.add(time.perf_counter() - tick, data_wait)
            if row is not None:
                row.update(self._timing(row))
                # (between rows every step reads under fp16: only its own rows are written there)
                self.metrics.log(self.step, row, always=self.step == last or self.scaler is None)
                self.last_row = row
            if self.checkpointer.due(self.step, last):
                self.save()
            if self.cfg.eval.every and (self.step % self.cfg.eval.every == 0 or self.step == last):
                self.evaluate()
            tick = time.perf_counter()
        self._check_pending()  # (the last step reads; a skipped last step leaves the ones before it here)
        if hasattr(self.data, "skipped"):  # what the data cost, once at the end (rank 0's loader; each rank's
            # counters are in the checkpoints)
            self.metrics.event(kind="data", step=self.step, summary=self.data.summary())
        self.finished = True
        return self.last_row

    def save(self) -> Path:
        self._check_pending()  # (a step whose reads were deferred: never a checkpoint of non-finite weights)
        state = self.checkpointer.state(self.model, self.optimizer, self.scheduler, self.step,
                                        self.data.state_dict(), scaler=self.scaler)
        path = self.checkpointer.save(state, self.step)
        self.metrics.event(kind="checkpoint", step=self.step, path=str(path),
                           asynchronous=self.cfg.checkpoint.async_save)
        return path

    def evaluate(self) -> dict:
        """Retrieval on eval.path (fineviti.eval, every rank in step); logged as an "eval" event."""
        from fineviti.eval import loaders
        from fineviti.eval.runner import EvalConfig, Evaluator, RetrievalTask

        cfg = self.cfg
        records = loaders.shard_captions(cfg.eval.path).records
        records = records[: cfg.eval.max_images] if cfg.eval.max_images else records
        tokenizer = getattr(self.data, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("evaluation needs the data set's tokenizer: training.data_source=shards")
        eval_cfg = EvalConfig(token_budget=cfg.eval.token_budget, min_pixels=cfg.data.min_pixels,
                              max_pixels=cfg.data.max_pixels, max_aspect=cfg.data.max_aspect,
                              exif_orientation=cfg.data.exif_orientation, box_frame=cfg.data.box_frame,
                              autocast_dtype=self.autocast_dtype or self.mp_dtype)
        start = time.perf_counter()
        with parallel.unsharded(self.model):
            report = Evaluator(self.raw_model, tokenizer, eval_cfg, device=self.device,
                               group=self.world.group).run({"retrieval": RetrievalTask(records)})
        result = {k: v for k, v in report["retrieval"].items() if isinstance(v, (int, float))}
        result["seconds"] = time.perf_counter() - start
        self.metrics.event(kind="eval", step=self.step, **result)
        return result

    def close(self) -> None:
        with work():
            self._close()

    def _close(self) -> None:
        try:
            self.checkpointer.close()
            if self.cfg.checkpoint.export and self.finished:  # every rank: FSDP2 gathers the shards
                from fineviti.train.export import export_model

                export_model(self.raw_model, self.run_dir / "model.safetensors", part=self.cfg.checkpoint.export,
                             config=json.loads(self.config_json), write=self.rank == 0,
                             tokenizer=self.checkpointer.tokenizer_files)
            elif self.cfg.checkpoint.export and self.step > 0:
                # a run that stopped early (an error, a kill) would leave a file that looks like a finished run's,
                # with whatever weights it stopped on (NaN after a non-finite loss)
                self.metrics.event(kind="export_skipped", step=self.step,
                                   reason=f"the run stopped at step {self.step} of {self.cfg.training.steps}; "
                                          f"export from a checkpoint with `fineviti export`")
        finally:
            self.profiler.close()
            self.metrics.close()
            self.data.close()
            parallel.close_world(self.world)

    # -- one step ----------------------------------------------------------------------------------------------

    def train_step(self, batch, read: bool = True) -> dict | None:
        """One step; its metrics row, or None where `read` is False (metrics.log_every > 1, a step between two rows):
        then nothing is read from the device, and the step's loss and gradient norm are checked at the next row."""
        # What is built from the batch's values is built on the host, before the copy: read after it, each value
        # would wait for the GPU (the copy, and every step queued before it)
        if self.stage == 1:
            batch = truncate_captions(batch, text_length_at(self.text_schedule, self.step - 1))
        else:
            region = self._region_tasks(batch)
        grad_cache = self.stage == 1 and self.cfg.training.grad_cache_images
        if not grad_cache:  # (GradCache cuts the host batch into chunks, and copies each)
            with nvtx_range("h2d", self.nvtx):
                batch = batch.to(self.device, non_blocking=True)
        if self.stage == 1:
            with nvtx_range("forward_backward", self.nvtx):
                if grad_cache:
                    loss, out = self._grad_cache_step(batch)
                else:
                    loss, out = self._stage1_step(batch)
            local = self._stage1_counts(batch)
        else:
            with nvtx_range("forward_backward", self.nvtx):
                loss, out = self._stage2_step(batch, region)
            local = self._stage2_counts(batch, region)
        # skipped or repaired samples so far, all ranks (each rank's loads; the scan of the data set, which every
        # rank makes alike, once): bad data shows in every row
        local["data_skipped"] = self.data.skipped() if hasattr(self.data, "skipped") else 0
        # the loss and, in stage 1, the logit scale and bias: one read of the device (read one by one, each waits
        # for the GPU; the scale's read once came after the optimizer step, and held the next step's host work
        # until the update had run)
        scalars = [loss.detach().float().reshape(())]
        if self.stage == 1:
            scalars += [out[k].detach().float().reshape(()) for k in ("logit_scale", "logit_bias")
                        if out.get(k) is not None]
        if not read:
            self._deferred_update(scalars[0], local)
            return None
        values, held = self._read_with_pending(torch.stack(scalars))
        totals = self._reduce(values[0], {**local, **self._window.counts(local), "pending_bad": _non_finite(held)})
        self._raise_if_pending_bad(held, totals.pop("pending_bad"))
        check_finite(totals["loss"], self.step)
        # the base rate of this step (the schedule moves on below): optimizer.lr times the schedule's factor, not
        # the first group's rate, which in stage 2 is a part's (the vision tower's, at stage2.vision_lr_scale)
        lr = self.cfg.optimizer.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        with nvtx_range("optimizer", self.nvtx):
            if self.scaler is not None:
                self.scaler.unscale_(self.params)
            grad_norm = self._clip()
            updated = self.scaler is None or math.isfinite(grad_norm)
            if updated:
                # a NaN norm clips nothing (NaN < 1 is false): the update would write NaN weights and the step's
                # checkpoint would keep them
                check_finite(grad_norm, self.step, "the gradient norm (the loss was finite)")
                self.optimizer.step()
                if self.stage == 1:
                    self.raw_model.clamp_logit_scale_()  # (CLIP's cap, as open_clip keeps it)
            # fp16: an overflow in the scaled backward skips the update and lowers the scale for the next step;
            # gradients that stay non-finite whatever the scale are no overflow: they stop the run
            if self.scaler is not None:
                self.scaler.update(math.isfinite(grad_norm))
                if self.scaler.scale < parallel.LossScaler.MIN_SCALE:
                    check_finite(grad_norm, self.step, f"the gradient norm (non-finite for "
                                 f"{self.scaler.overflows_in_a_row} steps in a row, the fp16 loss scale down to "
                                 f"{self.scaler.scale:g})")
            if updated:
                # the schedule follows the updates (as Hugging Face's Trainer does): the steps fp16 skips while its
                # scale settles spend no warmup; the checkpoint keeps the scheduler's count of them
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        row = {"loss": totals["loss"], "lr": lr, "grad_norm": grad_norm}
        if self.scaler is not None:
            row["loss_scale"] = self.scaler.scale  # after this step's update
            row["update_skipped"] = int(not math.isfinite(grad_norm))
        if self.stage == 1:
            row["logit_scale"] = values[1]
            if out.get("logit_bias") is not None:
                row["logit_bias"] = values[2]
            row["text_length"] = text_length_at(self.text_schedule, self.step - 1)
        row.update({k: v for k, v in totals.items() if k != "loss"})
        return row

    def _stage1_step(self, batch):
        with self._autocast():
            out = self.model(batch, group=self.world.group, host_group=self.world.host_group)
        loss = out["loss"]
        self._backward(loss)
        return loss, out

    def _grad_cache_step(self, batch):
        """GradCache: (1) embeddings of every chunk without autograd, (2) the loss over all of them and its
        gradients with respect to the embeddings (and the logit scale and bias), (3) per chunk, the forward
        again and a backward of the embeddings with those gradients (the logit scale and bias with the last
        chunk, where the gradient reduction of DDP / FSDP2 also happens).

        batch: the batch as the loader gives it, its bounds and captions on the host: it is cut there and each chunk
        copied to the device (cut on the GPU, each chunk read the batch's bounds back: 4-6 synchronisations)."""
        from fineviti.data.batch import to_device
        from fineviti.model.two_tower import pair_loss

        per_chunk = self.cfg.training.grad_cache_images
        n_chunks = self._max_over_ranks(-(-batch.n_images // per_chunk))  # FSDP2: one count of forwards per rank
        chunks, real, order = split_images(batch, n_chunks)
        with nvtx_range("h2d", self.nvtx):
            chunks = [chunk.to(self.device, non_blocking=True) for chunk in chunks]
            text_image = None if batch.text_image is None else to_device(
                batch.text_image if order is None else batch.text_image[order], self.device, non_blocking=True)
        images, texts = [], []
        with torch.no_grad(), self._autocast():
            for chunk in chunks[:real]:
                out = self.model(chunk, compute_loss=False)
                images.append(out["image_features"])
                texts.append(out["text_features"])
            for chunk in chunks[real:]:  # fillers: the forwards the other ranks run
                self.model(chunk, compute_loss=False)
        img = torch.cat(images).detach().requires_grad_()
        txt = torch.cat(texts).detach().requires_grad_()
        scale = out["logit_scale"].detach().float().requires_grad_()
        bias = out["logit_bias"].detach().float().requires_grad_() if out["logit_bias"] is not None else None
        loss = pair_loss(self.cfg.model, img, txt, text_image, scale, bias, group=self.world.group,
                         host_group=self.world.host_group)
        # fp16: the scaled loss, so that the embeddings' 16-bit gradients are scaled as they are made (scaled after,
        # their small entries would have underflowed already); the chunks' backward passes take them as they are
        self._backward(loss)
        img_grads = list(img.grad.split([x.shape[0] for x in images]))
        txt_grads = list(txt.grad.split([x.shape[0] for x in texts]))
        for i, chunk in enumerate(chunks):
            is_last = i == len(chunks) - 1
            with parallel.no_grad_sync(self.model, sync=is_last):
                with self._autocast():
                    out = self.model(chunk, compute_loss=False)
                tensors = [out["image_features"], out["text_features"]]
                if i < real:
                    grads = [img_grads[i].to(tensors[0].dtype), txt_grads[i].to(tensors[1].dtype)]
                else:
                    grads = [torch.zeros_like(t) for t in tensors]
                if is_last:
                    tensors.append(out["logit_scale"])
                    grads.append(scale.grad.to(out["logit_scale"].dtype))
                    if bias is not None:
                        tensors.append(out["logit_bias"])
                        grads.append(bias.grad.to(out["logit_bias"].dtype))
                torch.autograd.backward(tensors, grads)
        return loss.detach(), {"logit_scale": scale.detach(), "logit_bias": None if bias is None else bias.detach()}

    def _region_tasks(self, batch):
        """The step's stage-2 samples, from the batch on the host (its boxes, captions and grids are read)."""
        from fineviti.train import stage2

        cfg = self.cfg
        return stage2.region_tasks(
            batch, self.tokens, tasks=parse_parts(cfg.stage2.tasks, "stage2.tasks", STAGE2_TASKS),
            regions_per_image=cfg.stage2.regions_per_image, merge=2,
            placeholder_id=self.raw_model.placeholder_id, seed=cfg.training.seed, step=self.step, rank=self.rank)

    def _stage2_step(self, batch, region):
        from fineviti.data.batch import to_device
        from fineviti.model.aligner import IGNORE_INDEX

        # The loss's targets (labels[:, 1:] not ignored, as the aligner counts them), from the host-side labels,
        # summed over ranks with a has-regions flag in one all-reduce, before the forward: a rank without regions
        # stops every rank (one alone would leave the rest waiting in a collective).
        local = 0 if region is None else int((region.labels[:, 1:] != IGNORE_INDEX).sum())
        ranks_with_regions, targets = self._sum_over_ranks([float(region is not None), float(local)])
        if ranks_with_regions < self.world.world_size:
            where = f"(keys {batch.keys[:3]}...)" if region is None else "on another rank"
            raise ValueError(f"stage 2 step {self.step}: a batch without region boxes {where}; stage 2 needs data "
                             f"with regions in its json")
        def dev(t):
            return to_device(t, self.device, non_blocking=True)

        # the counts the aligner would otherwise read from the device mid-forward, from the host-side samples
        image_tokens = int((region.input_ids == self.raw_model.placeholder_id).sum())
        with self._autocast():
            out = self.model(batch.patches, batch.cu_seqlens, batch.pos, batch.max_seqlen,
                             dev(region.input_ids), labels=dev(region.labels),
                             attention_mask=dev(region.attention_mask), seqlens=batch.seqlens,
                             sample_image=dev(region.sample_image), padding_tokens=batch.padding_tokens,
                             image_tokens=image_tokens, n_targets=local)
        # The aligner's loss is this rank's mean over its answer tokens, and the data-parallel wrapper averages
        # the ranks' gradients: weighted by this rank's share of all answer tokens (times the world size), every
        # token of the global batch counts alike, as in one process over the ranks' samples together (ranks' token
        # counts differ from step to step). The weighted loss, averaged over ranks by _reduce, is that global mean.
        loss = out["loss"] * (local * self.world.world_size / max(targets, 1.0))  # 1 on one process
        self._backward(loss)
        return loss, out

    def _backward(self, loss: torch.Tensor) -> None:
        self._scaled(loss).backward()

    def _scaled(self, t: torch.Tensor) -> torch.Tensor:
        """t times the fp16 loss scale (t itself without one)."""
        return t if self.scaler is None else self.scaler.scaled(t)

    def _clip(self, read: bool = True):
        """The gradient norm (a float; a device tensor where read is False), the gradients clipped to it."""
        if self.replicated:
            parallel.reduce_replicated_grads(self.replicated, self.world)
        max_norm = self.cfg.training.grad_clip if self.cfg.training.grad_clip > 0 else float("inf")
        return parallel.clip_grad_norm(self.params, max_norm, read=read)

    # -- deferred reads (metrics.log_every > 1) ----------------------------------------------------------------

    def _reads_at(self, step: int, last: int) -> bool:
        """Whether `step` reads the device: every step with metrics.log_every = 1 or fp16 (its loss scale is decided
        on the host from each step's gradient norm); else the steps that log a row, the last, and those that save
        a checkpoint or evaluate (neither runs on weights whose steps were not checked)."""
        every, evaluate = self.cfg.metrics.log_every, self.cfg.eval.every
        return (every == 1 or self.scaler is not None or step % every == 0 or step == last
                or self.checkpointer.due(step, last) or bool(evaluate and step % evaluate == 0))

    def _deferred_update(self, loss: torch.Tensor, local: dict) -> None:
        """A step between two rows: the update with the gradient norm kept on the device (clipping by a device-side
        factor; a non-finite norm then makes non-finite weights, stopped at the next row or checkpoint, which is not
        written), the loss and norm kept for the next row's read, the step's counts added to the window."""
        with nvtx_range("optimizer", self.nvtx):
            norm = self._clip(read=False)
            self.optimizer.step()
            if self.stage == 1:
                self.raw_model.clamp_logit_scale_()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._pending.append((self.step, loss, norm))
        self._window.add_counts(local)

    def _read_with_pending(self, scalars: torch.Tensor) -> tuple[list[float], list[float]]:
        """This step's scalars, and the pending steps' losses and norms (in their order), in one read."""
        if not self._pending:
            return scalars.tolist(), []
        held = [t.reshape(()).float() for _, loss, norm in self._pending for t in (loss, norm)]
        every = torch.cat([scalars, torch.stack(held)]).tolist()
        return every[:scalars.numel()], every[scalars.numel():]

    def _raise_if_pending_bad(self, held: list[float], bad_on_ranks: float) -> None:
        """Ends the pending steps (their values `held`, as _read_with_pending gives them); NonFiniteLossError (on
        every rank: `bad_on_ranks` counts the non-finite values of all of them) naming the first pending step whose
        loss or gradient norm was not finite here, or that one was elsewhere."""
        pending, self._pending = self._pending, []
        if not bad_on_ranks:
            return
        for (step, _, _), values in zip(pending, zip(held[::2], held[1::2], strict=True), strict=True):
            for what, value in zip(("the loss", "the gradient norm"), values, strict=True):
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"{what} is {value} at step {step}, a step between two metrics rows "
                        f"(metrics.log_every={self.cfg.metrics.log_every}): its update ran, and steps up to "
                        f"{self.step} computed on its weights; resume from the last checkpoint (none was written "
                        f"after it)")
        raise NonFiniteLossError(f"a loss or gradient norm between steps {pending[0][0]} and {pending[-1][0]} was "
                                 f"not finite on another rank (metrics.log_every={self.cfg.metrics.log_every}); "
                                 f"resume from the last checkpoint")

    def _check_pending(self, cause: Exception | None = None) -> None:
        """The pending steps' losses and norms read and checked now: before a checkpoint and at the end, on every
        rank; or, with `cause` (an error raised in a later step), on this rank alone (ranks may fail apart: no
        collective), a non-finite one raised from `cause`."""
        if not self._pending:
            return
        _, held = self._read_with_pending(torch.zeros(0, device=self.device))
        bad = float(_non_finite(held))
        if cause is None:
            self._raise_if_pending_bad(held, self._sum_over_ranks([bad])[0])
            return
        try:
            self._raise_if_pending_bad(held, bad)
        except NonFiniteLossError as named:
            raise named from cause

    # -- metrics -----------------------------------------------------------------------------------------------

    def _stage1_counts(self, batch) -> dict:
        from fineviti.model.flops import count_flops

        towers = count_flops(self.cfg.model, batch.seqlens, batch.text_seqlens, training=True, recompute=False,
                             world_negatives=0).model
        return {"images": batch.n_images, "patch_tokens": sum(batch.seqlens), "text_tokens": sum(batch.text_seqlens),
                "padding_tokens": batch.padding_tokens, "truncated_tokens": batch.truncated_tokens,
                "pairs": batch.n_texts, "flops": towers}

    def _stage2_counts(self, batch, region) -> dict:
        from fineviti.train.stage2 import stage2_flops

        return {"images": batch.n_images, "patch_tokens": sum(batch.seqlens),
                "text_tokens": region.text_tokens, "padding_tokens": batch.padding_tokens,
                "truncated_tokens": batch.truncated_tokens, "pairs": 0, "answer_tokens": region.answer_tokens,
                "samples": region.n_samples, "flops": stage2_flops(self.raw_model, batch.seqlens, region)}

    def _reduce(self, loss: float, local: dict) -> dict:
        """Sums the counts over ranks and averages the loss, in one all-reduce (float64: exact integers)."""
        keys = list(local)
        values = self._sum_over_ranks([loss] + [float(local[k]) for k in keys])
        out = {"loss": values[0] / self.world.world_size}
        out.update({k: float(v) for k, v in zip(keys, values[1:], strict=True)})
        window = [out.pop(k) for k in keys if k.startswith("window_pairs_")]  # (the window's other steps)
        if self.stage == 1:  # the loss FLOPs: every pair against every caption of every rank
            loss_flops = 6 * self.cfg.model.embed_dim
            out["flops"] += loss_flops * out["pairs"] ** 2
            if "window_flops" in out:
                out["window_flops"] += loss_flops * (out["pairs"] ** 2 + sum(p * p for p in window))
        return out

    def _timing(self, row: dict) -> dict:
        """Times and rates of the steps since the last row (one step with metrics.log_every = 1): the host times
        summed over them, the counts of the window's steps (summed over ranks with the row's own, in `row`)."""
        world = self.world.world_size
        steps, elapsed, data_wait = self._window.steps, self._window.time, self._window.wait
        images, tokens, flops = (row.pop(f"window_{k}") for k in ("images", "tokens", "flops"))
        self._window = _Window()
        step_time = elapsed / steps
        out = {"step_time_s": step_time, "data_wait_s": data_wait / steps, "images_per_s": images / elapsed,
               "tokens_per_s": tokens / elapsed,
               "padding_fraction": row["padding_tokens"] / max(1.0, row["patch_tokens"] + row["padding_tokens"])}
        if self.device.type == "cuda":
            tflops = flops / world / elapsed / 1e12
            out["tflops_per_gpu"] = tflops
            out["mfu"] = tflops / self.peak if self.peak else None
        for key in ("images", "patch_tokens", "text_tokens", "padding_tokens", "truncated_tokens", "pairs",
                    "answer_tokens", "samples", "data_skipped"):
            if key in row:
                row[key] = int(row[key])
        return out

    def _sum_over_ranks(self, values: list[float], op: str = "SUM") -> list[float]:
        """Host values reduced over the ranks (op: "SUM", "MAX" or "MIN", a dist.ReduceOp's name) in one
        all-reduce (float64: exact integers; on the host, over gloo, whatever the training backend: through NCCL
        each would wait for the GPU's queue); the values themselves on one process."""
        if not self.world.distributed:
            return list(values)
        comm = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(comm, op=getattr(dist.ReduceOp, op), group=self.world.host_group)
        return comm.tolist()

    def _max_over_ranks(self, value: int) -> int:
        return int(self._sum_over_ranks([float(value)], op="MAX")[0])

    def _every_rank_has(self, batch) -> tuple[str, bool]:
        """("none" when a rank's data ran out, "empty" when a rank's pack has no image (the loader hands one out
        when every image of a pack failed to decode, so that every rank still reaches this point), else "images";
        whether an asynchronous save is written on every rank), from one all-reduce (MIN) per step."""
        status = 0.0 if batch is None else 1.0 if batch.n_images == 0 else 2.0
        written = float(not self.checkpointer.poll())  # (in the same all-reduce) this rank's async save is done
        worst, everywhere = self._sum_over_ranks([status, written], op="MIN")
        have = "none" if worst == 0 else "empty" if worst == 1 else "images"
        return have, self.checkpointer.pending and everywhere == 1

    def _skip(self, batch, in_a_row: int) -> None:
        """A step without an image on some rank is skipped on every rank (the towers need an image, and a rank
        cannot sit out the step's collectives): the batches count as consumed, the optimizer and the step counter
        do not move, and the images the other ranks drop are logged ("skipped_batch" event)."""
        self.data.mark_consumed(batch)
        dropped, texts = self._sum_over_ranks([float(batch.n_images), float(len(batch.text_seqlens))])
        self.metrics.event(kind="skipped_batch", step=self.step, images_dropped=int(dropped),
                           texts_dropped=int(texts), reason="a rank's pack had no decodable image",
                           data=self.data.summary())
        if in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise RuntimeError(f"{in_a_row} batches in a row had a rank without a decodable image "
                               f"({self.data.summary()}): the data looks broken")


def _non_finite(values: list[float]) -> int:
    return sum(not math.isfinite(v) for v in values)


class _Window:
    """What the steps since the last metrics row add up to: host time, data wait, and counts of this rank (the row's
    own step's counts join at the row, summed over ranks with them)."""

    def __init__(self):
        self.steps, self.time, self.wait = 0, 0.0, 0.0
        self.images = self.tokens = self.flops = 0.0
        self.pairs: list[float] = []

    def add(self, elapsed: float, data_wait: float) -> None:
        self.steps += 1
        self.time += elapsed
        self.wait += data_wait

    def add_counts(self, local: dict) -> None:
        self.images += local["images"]
        self.tokens += local["patch_tokens"] + local["text_tokens"]
        self.flops += local["flops"]
        self.pairs.append(local["pairs"])  # (stage 1's loss FLOPs grow with the square of each step's global count)

    def counts(self, local: dict) -> dict:
        """The window's counts with the row's own step (`local`), as fields of the row's all-reduce."""
        out = {"window_images": self.images + local["images"],
               "window_tokens": self.tokens + local["patch_tokens"] + local["text_tokens"],
               "window_flops": self.flops + local["flops"]}
        out.update({f"window_pairs_{i}": pairs for i, pairs in enumerate(self.pairs)})
        return out


def run(cfg: JobConfig) -> dict:
    """config -> trainer -> train() -> close(); returns the last step's metrics."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()


def summarise(row: dict) -> str:
    keys = ("loss", "lr", "grad_norm", "images_per_s", "tokens_per_s", "tflops_per_gpu", "mfu")
    return ", ".join(f"{k} {row[k]:.4g}" for k in keys if isinstance(row.get(k), float) and math.isfinite(row[k]))



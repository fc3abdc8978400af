"""Checkpoints with torch.distributed.checkpoint (DCP): written to a temporary folder, then renamed, so that a
checkpoint folder is either complete or absent.

Layout: run_dir/checkpoints/step-00000100/ holds the DCP files (.metadata, one .distcp per rank), config.json (the
run's resolved config, so that stage 2 and `fineviti export` can rebuild the model) and, for a stage-1 run on a data
set, tokenizer.json (a copy of the one its captions were encoded with, which `fineviti eval` reads; with its
tokenizer_config.json where it has one). A save in progress writes run_dir/checkpoints/.tmp-step-00000100/ and
renames it when every rank has written and the metadata is down; folders left by a save that died are ignored, and
removed when the next run starts. A run that starts at step s (fresh: 0; resumed: the checkpoint's step) and will
save moves this folder's checkpoints of later steps (and one of step s from elsewhere), which belong to a branch it
abandons, into run_dir/checkpoints/superseded-<time>/: kept, but no longer what `resume = "auto"` finds or what
`keep` counts (they would otherwise be chosen over, or outlive, the checkpoints of the new branch).

Contents: model (parameters by their names without wrapper prefixes, DTensor shards under FSDP2), optim (the
optimizer's state in the same names), scheduler, step, data (the loader's global state: planner seed, epoch,
cursor), and rng.rank<r> (the torch CPU and CUDA generator states of rank r: DCP keeps one copy of a key that all
ranks share, so per-rank state needs per-rank keys).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = ".tmp-"
REPLACED_PREFIX = ".replaced-"  # a checkpoint saved again, set aside until its replacement is in place
SUPERSEDED_PREFIX = "superseded-"


_SINGLE_PROCESS_WARNING = "torch.distributed is (disabled|unavailable)"


@contextlib.contextmanager
def _quiet():
    """DCP warns on every single-process save and load that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        yield


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder` as (step, path), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / ".metadata").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a path that is one, a run's checkpoints folder or a run folder (newest)."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    for folder in (path, path / "checkpoints"):
        found = list_checkpoints(folder)
        if found:
            return found[-1][1]
    raise FileNotFoundError(f"no complete checkpoint at {str(path)!r} (expected a step-XXXXXXXX folder holding "
                            f".metadata, or a run folder with checkpoints/)")


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


class Checkpointer:
    def __init__(self, cfg, run_dir: Path, *, rank: int, world_size: int, config_json: str,
                 tokenizer: str | os.PathLike | None = None):
        """tokenizer: a tokenizer.json that every checkpoint keeps a copy of (the text tower's ids mean nothing
        without it, and the training config's path to it may be relative or gone by the time it is evaluated); read
        here, once, with its tokenizer_config.json (data.tokenizer.tokenizer_files)."""
        from fineviti.data.tokenizer import tokenizer_files

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.folder = Path(run_dir) / "checkpoints"
        self.config_json = config_json
        self.tokenizer_files = tokenizer_files(tokenizer) if tokenizer is not None else None
        self._pending = None  # (future, tmp, final, step) of an asynchronous save
        # An asynchronous save runs its collectives from DCP's writer thread, while the training steps run theirs:
        # on one group they interleave differently on each rank (a mismatch), and an NCCL-only group has no CPU
        # backend, which async_save requires. So it gets a gloo group of its own (torchtitan does the same). Every
        # rank builds the Checkpointer at the same point, as new_group needs.
        self._async_group = dist.new_group(backend="gloo") if world_size > 1 and cfg.async_save else None
        if world_size == 1:  # async_save warns from its writer thread, past any catch_warnings here
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)

    # -- state ---------------------------------------------------------------------------------------------

    def _options(self) -> StateDictOptions:
        return StateDictOptions(ignore_frozen_params=False)

    def state(self, model, optimizer, scheduler, step: int, data_state: dict, scaler=None) -> dict:
        """What a checkpoint holds; with an fp16 loss scaler (parallel.LossScaler), its scale and clean steps."""
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self._options())
        state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "step": step,
                 "data": data_state, "rng": {f"rank{self.rank}": rng_state()}}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    # -- saving --------------------------------------------------------------------------------------------

    def due(self, step: int, last_step: int) -> bool:
        """Whether `step` saves: every `interval` steps, and the last step unless save_final is off (an interval's
        step stays due when it is also the last)."""
        interval = self.cfg.interval > 0 and step % self.cfg.interval == 0
        return interval or (step == last_step and self.cfg.save_final)

    def save(self, state: dict, step: int) -> Path:
        """Writes `state` as the checkpoint of `step` (collective: every rank calls it)."""
        self.finish_pending()
        final = self.folder / step_dir_name(step)
        tmp = self.folder / f"{TMP_PREFIX}{step_dir_name(step)}"

        def prepare():
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            (tmp / "config.json").write_text(self.config_json)
            if self.tokenizer_files is not None:
                from fineviti.data.tokenizer import write_tokenizer

                write_tokenizer(self.tokenizer_files, tmp / "tokenizer.json")

        self._on_rank0(prepare, f"could not prepare the checkpoint folder {tmp}")
        if self.cfg.async_save:
            with _quiet():
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group,
                                        no_dist=self._no_dist)
            self._pending = (future, tmp, final, step)
            return final
        with _quiet():
            dcp.save(state, checkpoint_id=str(tmp), process_group=self._group(), no_dist=self._no_dist)
        self._commit(tmp, final)
        return final

    def poll(self) -> bool:
        """True when an asynchronous save is still being written on this rank."""
        return self._pending is not None and not self._pending[0].done()

    @property
    def pending(self) -> bool:
        """Whether an asynchronous save waits to be committed (written or not)."""
        return self._pending is not None

    def finish_pending(self) -> None:
        """Waits for an asynchronous save and commits it (collective)."""
        if self._pending is None:
            return
        future, tmp, final, _ = self._pending
        self._pending = None
        future.result()
        self._commit(tmp, final)

    def _commit(self, tmp: Path, final: Path) -> None:
        self._barrier()  # every rank's files and the metadata are written

        def commit():
            old = None
            if final.exists():  # (replaced whole: set aside first, so a kill midway leaves one complete copy)
                old = final.with_name(f"{REPLACED_PREFIX}{final.name}")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._prune()

        self._on_rank0(commit, f"could not commit the checkpoint {tmp} as {final} (the written files stay in "
                               f"{tmp}: the next start commits them)")

    def _on_rank0(self, work, what: str | None = None):
        """Runs `work` on rank 0 (file operations: one rank does them), then lets every rank go on together with its
        result (collective). An OSError there raises on every rank (the other ranks would otherwise wait at a
        barrier, or die with a bare "connection closed by peer"): a RuntimeError naming `what`, or without `what`
        the error as rank 0 met it (FileNotFoundError as itself, any other as an OSError naming its kind)."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = work()
            except OSError as exc:
                error = (type(exc).__name__, str(exc))
        if self.world_size > 1:
            box = [result, error]
            dist.broadcast_object_list(box, src=0)
            result, error = box
        if error is not None:
            kind, text = error
            if what is not None:
                raise RuntimeError(f"rank 0: {what}: {text}")
            raise FileNotFoundError(text) if kind == "FileNotFoundError" else OSError(f"rank 0: {kind}: {text}")
        return result

    def _prune(self) -> None:
        if self.cfg.keep <= 0:
            return
        found = list_checkpoints(self.folder)
        for _, path in found[: max(0, len(found) - self.cfg.keep)]:
            shutil.rmtree(path, ignore_errors=True)

    def set_aside_after(self, step: int, resumed_from: Path | None = None) -> list[Path]:
        """Moves this run's checkpoints of steps after `step` (and one at `step` that is not `resumed_from`: another
        branch's) into a superseded-<UTC time> folder beside them (rank 0; collective: a failure on rank 0 raises
        on every rank); returns their new paths. The run starting at `step` writes a new history from there: left
        in place, the old branch's newer checkpoints would be what `resume = "auto"` picks, and `keep` would prune
        the new checkpoints before them."""
        moved, error = [], None
        if self.rank == 0:
            source = resumed_from.resolve() if resumed_from is not None else None
            stale = [path for s, path in list_checkpoints(self.folder)
                     if s > step or (s == step and path.resolve() != source)]
            try:
                if stale:
                    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
                    target = self.folder / f"{SUPERSEDED_PREFIX}{stamp}"
                    n = 1
                    while target.exists():
                        n += 1
                        target = self.folder / f"{SUPERSEDED_PREFIX}{stamp}-{n}"
                    target.mkdir()
                    for path in stale:
                        os.replace(path, target / path.name)
                        moved.append(target / path.name)
                    warnings.warn(f"this run starts at step {step}: {len(stale)} checkpoint(s) in {self.folder} "
                                  f"belong to a branch it abandons (later steps, or this step from another "
                                  f"source) and were moved to {target} ({', '.join(p.name for p in stale)})",
                                  stacklevel=2)
            except OSError as exc:
                error = (f"could not move the abandoned branch's checkpoints out of {self.folder} ({exc}); moved so "
                         f"far: {[str(p) for p in moved] or 'none'}. Move or delete the step-* folders after step "
                         f"{step} by hand, then start again")
        if self.world_size > 1:  # every rank learns whether rank 0 failed (instead of waiting at a barrier)
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise RuntimeError(error)
        return moved

    def clean_partial(self) -> list[Path]:
        """Removes folders of saves that never finished (rank 0); returns them. A save that finished writing but was
        never renamed (an asynchronous one, the process killed before its commit) is committed instead: DCP writes
        .metadata last, once every rank's files are written."""
        removed = []

        def clean():
            if not self.folder.is_dir():
                return
            # the unrenamed saves first: one whose commit was killed between its two renames wins over the copy it
            # replaced
            for child in sorted(self.folder.iterdir(), key=lambda c: (not c.name.startswith(TMP_PREFIX), c.name)):
                if child.name.startswith(REPLACED_PREFIX):  # a commit's replaced copy: the new one is in place
                    final = self.folder / child.name[len(REPLACED_PREFIX):]
                    if not final.exists() and (child / ".metadata").is_file():  # (killed between the commit's two
                        os.replace(child, final)  # renames: the only copy)
                    else:  # replaced, or half deleted
                        shutil.rmtree(child, ignore_errors=True)
                        removed.append(child)
                    continue
                if not child.name.startswith(TMP_PREFIX):
                    continue
                final = self.folder / child.name[len(TMP_PREFIX):]
                if (child / ".metadata").is_file() and (child / "config.json").is_file() and not final.exists():
                    os.replace(child, final)
                    warnings.warn(f"{child} was a whole checkpoint that its run never renamed (killed before the "
                                  f"commit of an asynchronous save): committed as {final}", stacklevel=2)
                    continue
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)

        self._on_rank0(clean, f"could not clean up the unfinished saves in {self.folder}")
        return removed

    # -- loading -------------------------------------------------------------------------------------------

    def resume_path(self) -> Path | None:
        """The checkpoint `checkpoint.resume` names: "" none, "auto" the newest of this run (if any), else a path.
        Rank 0 looks and tells the others (collective): each rank listing the folder itself could see another newest
        checkpoint (a shared file system's cached listing, just after clean_partial renamed one) and resume another
        step."""
        setting = self.cfg.resume
        if not setting:
            return None

        def find() -> str | None:
            if setting == "auto":
                newest = list_checkpoints(self.folder)
                return str(newest[-1][1]) if newest else None
            return str(resolve_checkpoint(setting))

        found = self._on_rank0(find)
        return None if found is None else Path(found)

    def load(self, path: Path, model, optimizer, scheduler, data_source, scaler=None) -> int:
        """Restores everything `state` saved from checkpoint `path`; returns its step. A loss scaler keeps its
        fresh state where the checkpoint has none (a run that was not fp16)."""
        saved = saved_config_or_none(path)
        current = json.loads(self.config_json)
        if saved is not None:
            _check_same_model(path, saved, current)
        state = self.state(model, optimizer, scheduler, 0, data_source.state_dict(), scaler=scaler)
        keys = saved_keys(path)
        if "scaler" in state and not any(k.startswith("scaler.") for k in keys):
            state.pop("scaler")
        _check_optimizer_keys(path, keys, state["optim"])
        groups = _group_layout(state["optim"])
        # a data source's entries the checkpoint lacks (a rank's own counters, saved under another world size)
        # stay out of the load: the source keeps its fresh ones
        for name in [n for n, v in state["data"].items() if not isinstance(v, dict) and f"data.{n}" not in keys]:
            state["data"].pop(name)
        rank_key = f"rng.rank{self.rank}"
        if not any(k.startswith(rank_key + ".") for k in keys):
            warnings.warn(f"checkpoint {path} has no RNG state for rank {self.rank} (saved with another world "
                          f"size?); this rank keeps its freshly seeded generators", stacklevel=2)
            state.pop("rng")
        else:  # a generator the saving run had not started (CUDA's, saved on a CPU or before CUDA was initialised)
            generators = state["rng"][f"rank{self.rank}"]
            for name in [n for n in generators if f"{rank_key}.{n}" not in keys]:
                warnings.warn(f"checkpoint {path} has no {name} RNG state for rank {self.rank} (the saving run had "
                              f"not initialised it); this rank keeps its own", stacklevel=2)
                generators.pop(name)
        if "scaler" in state:  # (entries added since: their fresh values)
            for name in [n for n in state["scaler"] if f"scaler.{n}" not in keys]:
                state["scaler"].pop(name)
        with _quiet():
            dcp.load(state, checkpoint_id=str(path), process_group=self._group(), no_dist=self._no_dist)
        _check_group_layout(path, groups, _group_layout(state["optim"]))
        # this run's hyperparameters (its config: base rates with the parts' scales, weight decay, betas, eps, the
        # implementation flags), which loading the optimizer's state would replace with the saved run's
        fresh = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in optimizer.param_groups]
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self._options())
        for group, hyper in zip(optimizer.param_groups, fresh, strict=True):
            group.update(hyper)
        # the schedule's shape comes from this run's config (a resume with more training.steps stretches it), its
        # step count from the checkpoint; the rate of the next step from both, not the saved run's rate
        state["scheduler"]["lr_lambdas"] = scheduler.state_dict()["lr_lambdas"]
        scheduler.load_state_dict(state["scheduler"])
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                       strict=True):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        try:
            data_source.load_state_dict(state["data"])
        except ValueError as err:
            if saved is None or "another plan" not in str(err):
                raise
            from fineviti.data.loader import PLAN_FIELDS

            differ = _differences(saved, current, "data", fields=PLAN_FIELDS)
            if differ:
                raise ValueError(f"{err}. This run's data settings differ from the checkpoint's: {', '.join(differ)}; "
                                 f"{_REPEAT}") from err
            raise ValueError(f"{err}. No data setting that shapes the plan differs from the checkpoint's: the data "
                             f"set itself changed (data.path {current.get('data', {}).get('path')!r} holds other "
                             f"samples, or other image sizes, than when the run started)") from err
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            set_rng_state(state["rng"][f"rank{self.rank}"])
        return int(state["step"])

    @property
    def _no_dist(self) -> bool:
        return self.world_size == 1

    def _group(self):
        return dist.group.WORLD if self.world_size > 1 else None

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        self.finish_pending()


_REGROUPED = ("(A stage-2 run under DDP saved before commit f3a62d9 grouped every parameter into 2 groups at the base "
              "learning rate, ignoring stage2.*_lr_scale; a change of stage2.freeze regroups too.) Start a new run "
              "instead; stage2.init_from takes the vision tower of that checkpoint.")


def _check_optimizer_keys(path, keys: list[str], optim_state: dict) -> None:
    """Before loading: the checkpoint must hold this optimizer's groups and the state of each of its parameters;
    a checkpoint of another grouping fails here with a reason, not in DCP with "Missing key in checkpoint
    state_dict: optim..."."""
    saved_groups = {int(k.split(".")[2]) for k in keys if k.startswith("optim.param_groups.")
                    and k.split(".")[2].isdigit()}
    if saved_groups and len(saved_groups) != len(optim_state["param_groups"]):
        raise ValueError(f"checkpoint {path} holds an optimizer with {len(saved_groups)} parameter groups, and this "
                         f"run builds {len(optim_state['param_groups'])}: its optimizer state cannot be restored. "
                         + _REGROUPED)
    saved_params = {k[len("optim.state."):].rsplit(".", 1)[0] for k in keys if k.startswith("optim.state.")}
    missing = sorted(set(optim_state["state"]) - saved_params)
    if saved_params and missing:
        raise ValueError(f"checkpoint {path} has no optimizer state for {len(missing)} of this run's trainable "
                         f"parameters (e.g. {missing[:3]}): it was saved with other parameters frozen or trained. "
                         + _REGROUPED)


def _group_layout(optim_state: dict) -> list[tuple]:
    """(part, parameter names) of each group, copied: DCP loads the saved values into the same dicts."""
    return [(group.get("part"), tuple(group["params"])) for group in optim_state["param_groups"]]


def _check_group_layout(path, expected: list[tuple], saved: list[tuple]) -> None:
    """After loading: the same parameters in the same groups (a regrouping with as many groups and the same
    trainable parameters would otherwise restore each group's rate onto other parameters)."""
    if saved != expected:
        wrong = next(i for i, (a, b) in enumerate(zip(expected, saved, strict=True)) if a != b)
        raise ValueError(f"checkpoint {path} groups its optimizer's parameters otherwise than this run (group "
                         f"{wrong}: saved part {saved[wrong][0]!r} with {len(saved[wrong][1])} parameters, this run "
                         f"part {expected[wrong][0]!r} with {len(expected[wrong][1])}). " + _REGROUPED)


_REPEAT = ("--resume continues with this run's config: repeat the overrides the run was started with (its "
           "config.json is in the checkpoint)")


def saved_config_or_none(path: str | os.PathLike) -> dict | None:
    """The config.json of checkpoint folder `path` (Infinity, as configs from before "inf" was written spell it,
    as "inf"), or None where it has none."""
    from fineviti._json import infinities_as_text
    from fineviti.eval.checkpoint import saved_config as read

    saved = read(path) if Path(path).is_dir() else None
    return infinities_as_text(saved) if saved else None


def _differences(saved: dict, current: dict, section: str, *, fields: tuple[str, ...] | None = None,
                 leave_out: tuple[str, ...] = ()) -> list[str]:
    """"section.key: checkpoint A, this run B" for each field of the config section (only `fields`, when given;
    never those in `leave_out` or the backends and other runtime fields) that the run sets otherwise."""
    from fineviti.eval.checkpoint import config_differences

    def part(config):
        return {k: v for k, v in (config.get(section) or {}).items()
                if (fields is None or k in fields) and k not in leave_out}

    return config_differences(part(saved), part(current), f"{section}.", other="this run")


def _check_same_model(path, saved: dict, current: dict) -> None:
    """A resumed run builds its model from its own config: a checkpoint of another stage or architecture is
    named here, field by field, before its tensors fail to fit (a shape error from deep in the loader, or none at
    all for a change no shape shows, such as the heads or RoPE's theta)."""
    stage = current.get("training", {}).get("stage", 1)
    saved_stage = saved.get("training", {}).get("stage", 1)
    if saved_stage != stage:
        hint = " (stage 2 starts from a stage-1 checkpoint with stage2.init_from)" if stage == 2 else ""
        raise ValueError(f"checkpoint {path} is of a stage-{saved_stage} run, this run is stage {stage}: --resume "
                         f"continues a run of the same stage{hint}")
    # (the LM's folder may have moved: its tensors' shapes still have to fit)
    differ = _differences(saved, current, "model" if stage == 1 else "aligner", leave_out=("lm",))
    if differ:
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise ValueError(f"checkpoint {path} was saved by a run with another model, {differ[0]}{more}; {_REPEAT}")


def saved_keys(path: str | os.PathLike) -> list[str]:
    reader = dcp.FileSystemReader(str(path))
    return list(reader.read_metadata().state_dict_metadata)


def saved_config(path: str | os.PathLike) -> dict:
    """The resolved config a checkpoint folder was written with (fineviti.eval.checkpoint.saved_config, which also
    reads an exported file's, and gives None where this raises)."""
    from fineviti.eval.checkpoint import saved_config as read

    config = read(path) if Path(path).is_dir() else None
    if config is None:
        raise FileNotFoundError(f"checkpoint {path} has no config.json (not written by fineviti's trainer?)")
    return config


def load_module_state(path: str | os.PathLike, module: torch.nn.Module, prefix: str) -> None:
    """Loads the tensors of `module` from the checkpoint's model entries under `prefix` (e.g. "visual."), without
    a process group (every tensor read whole)."""
    state = {"model": {f"{prefix}{k}": v for k, v in module.state_dict().items()}}
    missing = [k for k in state["model"] if f"model.{k}" not in set(saved_keys(path))]
    if missing:
        raise KeyError(f"checkpoint {path} lacks {len(missing)} tensors of the module (first: model.{missing[0]}); "
                       f"expected a checkpoint of a model with this part")
    with _quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    module.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items()})

"""The Checkpointer's files and its agreement between ranks: which steps save, a checkpoint saved again, a failure of
rank 0's file operations, the choice of the checkpoint to resume, and state entries a checkpoint lacks."""

import datetime
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from fineviti.train import checkpoint as ckpt
from fineviti.train.config import CheckpointConfig
from fineviti.train.parallel import LossScaler
from tests.dist_util import free_port


class _Data:
    """A data source's checkpoint interface (what the loaders give)."""

    def __init__(self):
        self.position = torch.tensor([0])

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, scheduler, _Data()


def _checkpointer(tmp_path, rank=0, world_size=1, **cfg):
    return ckpt.Checkpointer(CheckpointConfig(**cfg), tmp_path, rank=rank, world_size=world_size, config_json="{}")


def _save(checkpointer, step, scaler=None):
    model, optimizer, scheduler, data = _parts(step)
    state = checkpointer.state(model, optimizer, scheduler, step, data.state_dict(), scaler=scaler)
    return checkpointer.save(state, step)


def test_an_interval_step_that_is_also_the_last_saves_without_save_final(tmp_path):
    """save_final=false turned off the interval's save at the last step (steps 6, interval 3: only step 3 saved)."""
    off = _checkpointer(tmp_path, interval=3, save_final=False)
    assert [s for s in range(1, 7) if off.due(s, 6)] == [3, 6]
    assert [s for s in range(1, 8) if off.due(s, 7)] == [3, 6]
    on = _checkpointer(tmp_path, interval=3)
    assert [s for s in range(1, 8) if on.due(s, 7)] == [3, 6, 7]
    assert [s for s in range(1, 3) if _checkpointer(tmp_path).due(s, 2)] == [2]


def test_a_checkpoint_saved_again_is_replaced_whole(tmp_path, monkeypatch):
    """Saving a step that has a checkpoint sets the old one aside until the new one is in place: a kill between the
    two renames leaves both whole, and the next start keeps the newer (it deleted the old folder first: a kill
    during that deletion left a half-deleted checkpoint that the next start kept over the whole new one)."""
    checkpointer = _checkpointer(tmp_path)
    first = _save(checkpointer, 2)
    old_weight = ckpt.saved_keys(first)
    real = os.replace
    calls = []

    def killed_at_the_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("killed")
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_at_the_second)
    with pytest.raises(RuntimeError, match=r"rank 0: could not commit the checkpoint .*\.tmp-step-00000002 .*killed"):
        _save(checkpointer, 2)
    monkeypatch.setattr(ckpt.os, "replace", real)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".replaced-step-00000002", ".tmp-step-00000002"]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        removed = _checkpointer(tmp_path).clean_partial()
    assert [p.name for p in removed] == [".replaced-step-00000002"]
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000002"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]
    assert ckpt.saved_keys(tmp_path / "checkpoints" / "step-00000002") == old_weight  # (same layout, newer save)

    # killed after the first rename with no newer save written: the copy set aside is the checkpoint
    final = tmp_path / "checkpoints" / "step-00000002"
    os.replace(final, final.with_name(".replaced-step-00000002"))
    assert _checkpointer(tmp_path).clean_partial() == []
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000002"]

    # a copy set aside that a failed deletion left half deleted (no .metadata), its step since pruned: removed,
    # not restored as a checkpoint
    half = tmp_path / "checkpoints" / ".replaced-step-00000005"
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"x")
    assert [p.name for p in _checkpointer(tmp_path).clean_partial()] == [half.name]
    assert not (tmp_path / "checkpoints" / "step-00000005").exists()

    # and the normal case: replaced, nothing left beside it
    _save(checkpointer, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]


def test_missing_rng_and_scaler_entries_keep_their_fresh_values(tmp_path, monkeypatch):
    """A checkpoint saved before CUDA was initialised (or on a CPU) has no CUDA generator state: a resume that has
    one warns and keeps its own (DCP failed with "Missing key in checkpoint state_dict: rng.rank0.cuda"). A loss
    scaler's entry added since (overflows_in_a_row) keeps its fresh value; one saved comes back."""
    checkpointer = _checkpointer(tmp_path)
    scaler = LossScaler()
    scaler.update(False)
    scaler.update(False)
    path = _save(checkpointer, 1, scaler=scaler)
    assert {"rng.rank0.torch", "scaler.overflows_in_a_row"} <= set(ckpt.saved_keys(path))
    model, optimizer, scheduler, data = _parts(5)
    fresh = LossScaler()
    assert checkpointer.load(path, model, optimizer, scheduler, data, scaler=fresh) == 1
    assert (fresh.scale, fresh.overflows_in_a_row) == (scaler.scale, 2)

    old = LossScaler()
    monkeypatch.setattr(LossScaler, "state_dict", lambda self: {"scale": 8.0, "clean_steps": 3})
    path = _save(checkpointer, 2, scaler=old)
    monkeypatch.undo()
    cuda_state = torch.zeros(16, dtype=torch.uint8)
    monkeypatch.setattr(ckpt, "rng_state", lambda: {"torch": torch.get_rng_state(), "cuda": cuda_state})
    set_states = []
    monkeypatch.setattr(ckpt, "set_rng_state", set_states.append)
    resumed = LossScaler()
    resumed.overflows_in_a_row = 0
    with pytest.warns(UserWarning, match="has no cuda RNG state for rank 0"):
        assert checkpointer.load(path, model, optimizer, scheduler, data, scaler=resumed) == 2
    assert (resumed.scale, resumed.clean_steps, resumed.overflows_in_a_row) == (8.0, 3, 0)
    (restored,) = set_states
    assert set(restored) == {"torch"}


WORLD = 2


def _ranks_worker(rank, port, root, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # a collective one rank misses fails, no hang
    results = {}
    try:
        folder = os.path.join(root, "run")
        checkpointer = ckpt.Checkpointer(CheckpointConfig(resume="auto"), folder, rank=rank, world_size=WORLD,
                                         config_json="{}")
        for step in (1, 2):
            _save(checkpointer, step)
        # rank 1's listing lags (a shared file system's cached view): it would resume step 1
        real = ckpt.list_checkpoints
        if rank == 1:
            ckpt.list_checkpoints = lambda f: real(f)[:1]
        try:
            results["resume"] = checkpointer.resume_path().name
        finally:
            ckpt.list_checkpoints = real
        checkpointer.cfg.resume = os.path.join(root, "nowhere")
        try:
            checkpointer.resume_path()
        except FileNotFoundError as exc:
            results["missing"] = str(exc)
        checkpointer.cfg.resume = os.path.join(root, "x" * 300)  # another OSError (a name too long) on rank 0
        try:
            checkpointer.resume_path()
        except OSError as exc:
            results["oserror"] = str(exc)
        # rank 0's rename fails: every rank raises with its reason (rank 1 waited at a barrier, or died with
        # "connection closed by peer")
        real_replace = os.replace
        if rank == 0:
            def failing(src, dst):
                raise PermissionError(13, "Permission denied", str(dst))
            ckpt.os.replace = failing
        try:
            _save(checkpointer, 3)
        except RuntimeError as exc:
            results["commit"] = str(exc)
        finally:
            ckpt.os.replace = real_replace
        dist.barrier()
        results["after"] = [s for s, _ in ckpt.list_checkpoints(os.path.join(folder, "checkpoints"))]
    except Exception as exc:  # reported by the test
        results["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


def test_ranks_resume_the_same_checkpoint_and_share_rank0s_failures(tmp_path):
    """Two gloo ranks: rank 0 chooses the checkpoint to resume and tells the other (each listed the folder itself:
    a lagging listing made rank 1 resume another step, silently); a missing checkpoint is an error on both; rank
    0's failure to commit a save raises on both ranks with its reason."""
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_ranks_worker, args=(free_port(), str(tmp_path), str(out)), nprocs=WORLD, join=True)
    results = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    for rank, got in enumerate(results):
        assert "error" not in got, (rank, got["error"])
        assert got["resume"] == "step-00000002", rank
        assert "no complete checkpoint at" in got["missing"] and "nowhere" in got["missing"], rank
        assert got["oserror"].startswith("rank 0: OSError: ") and "too long" in got["oserror"], rank
        assert got["commit"].startswith("rank 0: could not commit the checkpoint "), rank
        assert "Permission denied" in got["commit"], rank
        assert got["after"] == [1, 2], rank  # (keep=2; step 3's files stay in its .tmp folder)

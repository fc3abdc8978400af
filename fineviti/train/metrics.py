"""Metrics rows (every metrics.log_every steps), and where they go: JSONL always, TensorBoard when installed, a
progress bar on a TTY.

Throughput is global (all ranks) over the steps since the previous row (the row's own step alone with
metrics.log_every = 1, or under fp16, which reads every step): images/s and tokens/s (patch + caption
tokens). TFLOP/s and MFU are per GPU: the model FLOPs of those steps (fineviti.model.flops, recomputation
excluded) over their time, divided by the peak dense bf16 rate of the device from PEAK_BF16_TFLOPS; an unknown
device gets no MFU rather than a wrong one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from fineviti._json import finite_or_null

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets. Matched against
# torch.cuda.get_device_name() by the substrings of each row, first match wins.
PEAK_BF16_TFLOPS = (
    (("H200", "NVL"), 835.0),  # 1,671 with sparsity in the H200 NVL's data sheet
    (("H200",), 989.0),
    (("H100", "PCIE"), 756.0),
    (("H100", "SXM"), 989.0),
    (("H100", "HBM3"), 989.0),  # the SXM5 board reports itself as "NVIDIA H100 80GB HBM3"
    (("A100",), 312.0),
)


def peak_tflops(device_name: str | None) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU by its name, or None when the name is not in the table (e.g. H100 NVL)."""
    if not device_name:
        return None
    name = device_name.upper()
    for keys, peak in PEAK_BF16_TFLOPS:
        if all(k in name for k in keys):
            return peak
    return None


class NonFiniteLossError(RuntimeError):
    pass


def check_finite(value: float, step: int, what: str = "the loss") -> None:
    """NonFiniteLossError for a non-finite loss or gradient norm, raised before the optimizer step (every rank
    sees the same reduced value, so every rank stops)."""
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"{what} is {value} at step {step}: training stopped before the optimizer step (lower optimizer.lr, "
            f"check the data of this step, or resume from the last checkpoint)")


@contextlib.contextmanager
def nvtx_range(name: str, enabled: bool):
    """An NVTX range around a phase of a step (visible in Nsight Systems); nothing without CUDA."""
    if enabled:
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


class ProgressBar:
    def __init__(self, total: int, start: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.start_step, self.start_time = start, time.perf_counter()

    def update(self, step: int, row: dict) -> None:
        width = 30
        done = int(width * step / max(1, self.total))
        elapsed = time.perf_counter() - self.start_time
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        text = (f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total} loss {row['loss']:.4f} "
                f"lr {row['lr']:.2e} {row['images_per_s']:.1f} img/s eta {eta:5.0f}s ")
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def json_line(row: dict) -> str:
    """One metrics.jsonl line, strict JSON: a non-finite value (an fp16 overflow's grad_norm) is null, not NaN or
    Infinity, which jq, JavaScript and serde refuse."""
    return json.dumps(finite_or_null(row)) + "\n"


def _set_aside_after(path: Path, step: int) -> None:
    """Moves the lines of `path` (JSON rows and events) logged after `step` into metrics.superseded-<UTC>.jsonl
    beside it, with a line a kill cut short (metrics.jsonl stays strict JSON). A run resumed from step s (or started
    afresh, s = 0) writes steps s + 1... again: left in place, the killed run's rows after its last checkpoint were
    logged twice, and a reader taking the first row of a step read the abandoned branch's."""
    if not path.is_file():
        return
    keep, later = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            logged = json.loads(line).get("step")
            cut = False
        except (json.JSONDecodeError, AttributeError):
            logged, cut = None, True  # a line cut short by a kill: the killed run's last, aside with its later ones
        (later if cut or isinstance(logged, int) and logged > step else keep).append(line)
    if keep and not keep[-1].endswith("\n"):  # (ended, so that the next row appended is a line of its own: glued
        keep[-1] += "\n"  # to the cut line, the resumed run's first row was lost with it)
        if not later:
            path.write_text("".join(keep))
    if not later:
        return
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S-%f")
    aside = path.with_name(f"metrics.superseded-{stamp}.jsonl")
    aside.write_text("".join(later))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


class MetricsLogger:
    """Writes step rows to run_dir/metrics.jsonl (and TensorBoard, and a progress bar). Only rank 0 writes."""

    def __init__(self, cfg, run_dir: Path, *, rank: int, total_steps: int, start_step: int):
        self.cfg, self.rank = cfg, rank
        self.enabled = rank == 0
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        _set_aside_after(run_dir / "metrics.jsonl", start_step)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run's steps replace the killed run's later ones, as in metrics.jsonl
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                if cfg.tensorboard == "on":
                    raise ImportError("metrics.tensorboard=on needs the `tensorboard` package "
                                      "(pip install tensorboard)") from None
        tty = sys.stderr.isatty()
        if cfg.progress == "on" or (cfg.progress == "auto" and tty):
            self._bar = ProgressBar(total_steps, start_step)

    def set_total(self, total_steps: int) -> None:
        """The run's last step changed (training.steps=0: a step skipped): the progress bar's total follows."""
        if self._bar is not None:
            self._bar.total = total_steps

    def log(self, step: int, row: dict, always: bool = False) -> None:
        """The row of `step`: to the progress bar, and to the JSONL and TensorBoard every metrics.log_every steps
        (or `always`: the last step, and the steps that read the device between rows, a checkpoint's or an
        evaluation's)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(step, row)
        if step % self.cfg.log_every and not always:
            return
        row = {"step": step, **row}
        self._jsonl.write(json_line(row))
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"train/{key}", value, step)

    def event(self, **fields) -> None:
        """A non-step row (a checkpoint saved, a resume): JSONL only."""
        if self.enabled:
            self._jsonl.write(json_line({"event": fields.pop("kind"), **fields}))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


class StepProfiler:
    """torch.profiler over steps START..END (inclusive), a Chrome trace per rank in run_dir/profile."""

    def __init__(self, window: tuple[int, int] | None, run_dir: Path, rank: int):
        self.window, self.rank = window, rank
        self.folder = run_dir / "profile"
        self._prof = None

    def begin(self, step: int) -> None:
        if self.window is None or step != self.window[0]:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=activities, record_shapes=True, with_stack=False)
        self._prof.__enter__()

    def end(self, step: int) -> Path | None:
        if self._prof is None or step != self.window[1]:
            return None
        self._prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"trace_steps{self.window[0]}-{self.window[1]}_rank{self.rank}.json"
        self._prof.export_chrome_trace(str(path))
        self._prof = None
        return path

    def shorten(self, last: int, step: int) -> str | None:
        """The run now ends at step `last`, before the window's end (a run of training.steps=0 that skipped a step,
        at step `step`): the window ends there too, its trace written now if `step` is that end. Returns what
        changed, for the metrics, or None."""
        if self.window is None or self.window[1] <= last:
            return None
        start, end = self.window
        if start > last:
            self.window = None
            return f"steps {start}-{end} lie past the run's last step {last}: no trace"
        self.window = (start, last)
        written = self.end(step) if step == last else None
        return f"steps {start}-{end} end at the run's last step: a trace of steps {start}-{last}" + (
            f" ({written})" if written is not None else "")

    def close(self) -> None:
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return os.uname().machine if hasattr(os, "uname") else "cpu"

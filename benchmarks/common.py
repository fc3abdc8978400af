"""Shared pieces of the benchmarks: timing, environment facts and result rows.

Every benchmark writes rows through `Recorder`, one JSON object a line, with the fields that
`benchmarks/gpu_check.sh` gathers into results.json and summary.md. Run them as
`python benchmarks/bench_<op>.py ...` or `fineviti bench <op> ...`, from any folder.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# Without a GPU our Triton kernels run in Triton's interpreter, at toy sizes. It must be chosen before anything
# imports triton: torch._dynamo, below, does, and triton.language's own helpers would then be compiled functions that
# an interpreted kernel cannot call.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Benchmarks compile many shapes in one process (the compiled providers of the full sweeps): past dynamo's default
# recompile limit of 8 a compiled function quietly runs eager, and its rows would time eager code under a
# "compiled" label. The limit is raised for benchmark processes.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, max(getattr(torch._dynamo.config, _name), 256))

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first on the path, not the root
    sys.path.insert(0, str(REPO))


def git_commit() -> str:
    """The commit benchmarked: FINEVITI_COMMIT when set (the GPU machine gets a copy of the tree without .git)."""
    if os.environ.get("FINEVITI_COMMIT"):
        return os.environ["FINEVITI_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def gpu_kernel_times(step, steps: int = 5, warmup: int = 3, wall_repeats: int = 5) -> tuple[dict[str, float], float]:
    """({kernel name: mean GPU ms per step}, host wall ms per step) of `steps` calls of `step` under torch.profiler,
    after `warmup` calls outside the trace. The wall time, outside the trace: the median over `wall_repeats`
    windows of `steps` calls back to back with one synchronisation at the end of each; well above the kernels' sum,
    the host's launches (or gaps between kernels) set the pace."""
    import statistics

    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):  # compile and warm up outside the trace
        step()
    torch.cuda.synchronize()
    windows = []
    for _ in range(wall_repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        windows.append((time.perf_counter() - start) * 1e3 / steps)
    wall_ms = statistics.median(windows)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel = {}
    for event in prof.key_averages():
        if "cuda" not in str(event.device_type).lower():
            continue
        us = getattr(event, "self_device_time_total", None)
        if us is None:  # older torch
            us = getattr(event, "self_cuda_time_total", 0.0)
        if us > 0:
            per_kernel[event.key] = per_kernel.get(event.key, 0.0) + us / 1e3 / steps
    return per_kernel, wall_ms


RUN = f"{os.getpid()}-{int(time.time())}"  # one benchmark process: summarize.py pairs ratios within one


def environment() -> dict:
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "gpu": gpu,
        "run": RUN,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


MIN_REPEATS = 10  # timed calls at the least: rep_ms alone gave one to three for calls of 30-70 ms


def bench(fn, *, warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    """Median and 20/80 percentiles in ms, timed with device events (triton.testing.do_bench) on a GPU over
    rep_ms or MIN_REPEATS calls, whichever is longer, and peak memory above what was allocated before the call."""
    if torch.cuda.is_available():
        import triton.testing

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        rep = max(rep_ms, MIN_REPEATS * start.elapsed_time(end))  # do_bench times about rep / (one call) calls
        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_mem_mb": peak}
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while True:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return {**percentiles(times), "peak_mem_mb": None}


class Recorder:
    """Collects result rows; appends them as JSON lines to `path` (default: $FINEVITI_RESULTS, else none)."""

    def __init__(self, benchmark: str, path: str | None = None):
        self.benchmark = benchmark
        self.path = path or os.environ.get("FINEVITI_RESULTS")
        self.env = environment()
        self.rows: list[dict] = []

    def add(self, *, provider: str, mode: str, shape: dict, dtype: str, timing: dict,
            tflops: float | None = None, gbps: float | None = None, **extra) -> dict:
        row = {"benchmark": self.benchmark, "provider": provider, "mode": mode, "shape": shape, "dtype": dtype,
               **timing, "tflops": tflops, "gbps": gbps, **extra, **self.env}
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        shown = f"{tflops:8.1f} TFLOP/s" if tflops is not None else (f"{gbps:8.1f} GB/s" if gbps is not None else "")
        print(f"{self.benchmark:12s} {provider:16s} {mode:5s} {json.dumps(shape):60s} {dtype:9s} "
              f"{timing['median_ms']:9.3f} ms {shown}", flush=True)
        return row

    def measure(self, step, *, provider: str, mode: str, shape: dict, dtype: str, flops: float | None = None,
                moved_bytes: float | None = None) -> dict | None:
        """Times `step` (bench) and adds its row, with TFLOP/s of `flops` or GB/s of `moved_bytes` per call; a
        failure (often out of memory) becomes an error row instead, and the CUDA cache is emptied after it."""
        failure = None
        try:
            timing = bench(step)
        except Exception as exc:  # noqa: BLE001 (one provider's failure is a row, not the end of the run)
            failure = f"{type(exc).__name__}: {exc}"
        if failure is not None:  # outside the handler: its traceback no longer holds the step's tensors
            self.error(provider=provider, mode=mode, shape=shape, dtype=dtype, error=failure)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        seconds = timing["median_ms"] * 1e-3
        return self.add(provider=provider, mode=mode, shape=shape, dtype=dtype, timing=timing,
                        tflops=None if flops is None else flops / seconds / 1e12,
                        gbps=None if moved_bytes is None else moved_bytes / seconds / 1e9)

    def error(self, *, provider: str, mode: str, shape: dict, dtype: str, error: str) -> None:
        row = {"benchmark": self.benchmark, "provider": provider, "mode": mode, "shape": shape, "dtype": dtype,
               "error": error, **self.env}
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"{self.benchmark:12s} {provider:16s} {mode:5s} {json.dumps(shape):60s} {dtype:9s} ERROR {error}",
              flush=True)


# Benchmarks that check what they time (bench_attention, bench_contrastive, bench_fused) hold ours to these relative
# errors against a torch path on the same inputs: far above what two correct implementations differ by in the dtype
# (bf16: a few 1e-3), so that a GPU session is not lost to a false alarm, and far below what a wrong index, tile or
# mask gives (about 1).
CHECK_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 5e-3}


def relative_error(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    """||got - want|| / max(||want||, floor) in fp32 (NaN stays NaN, so that a check `<= tolerance` fails on it)."""
    want = want.float()
    return float((got.float() - want).norm() / want.norm().clamp_min(floor))


def record_if_wrong(rec: Recorder, wrong: list[str], case: str, errors: dict[str, float], tolerance: float,
                    against: str, *, provider: str, mode: str, shape: dict, dtype: str,
                    timing: str = "not timed") -> bool:
    """Whether a check failed: any of `errors` ({quantity: relative error}) above `tolerance` (NaN too). Then the
    case gets an error row naming the errors and what became of its timing (`timing`: "not timed" where the check
    comes first; bench_train checks after timing and voids the row) and joins `wrong` (exit_if_wrong's list)."""
    if all(e <= tolerance for e in errors.values()):
        return False
    wrong.append(case)
    what = ", ".join(f"{name} {e:.3g}" for name, e in errors.items())
    rec.error(provider=provider, mode=mode, shape=shape, dtype=dtype,
              error=f"wrong result against {against} (relative errors {what}; tolerance {tolerance:g}): {timing}")
    return True


def exit_if_wrong(benchmark: str, wrong: list[str]) -> None:
    """Exit 1 naming the cases of ours that gave a wrong result (their error rows were printed and recorded), so
    that the GPU check's section fails: a benchmark that checks what it times (bench_attention, bench_contrastive)
    calls this last."""
    if wrong:
        print(f"{benchmark}: {len(wrong)} case(s) of ours gave a wrong result (error rows above): " + "; ".join(wrong),
              file=sys.stderr)
        raise SystemExit(1)


def percentiles(times_ms: list[float]) -> dict:
    """median_ms, p20_ms and p80_ms of per-call times (the sorted sample's entries at those fractions)."""
    times = sorted(times_ms)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median_ms": pick(0.5), "p20_ms": pick(0.2), "p80_ms": pick(0.8)}


def one_timer(*rows: dict) -> tuple[str, str]:
    """(field, timer name) by which rows compare: their medians where all have one timer (the CUDA-graph device
    times where all were captured) or some row has no host-inclusive figure, else every row's do_bench
    (host-inclusive) median: a provider that could not be captured keeps only that, and against another's graph
    time its ratio would mix two timers."""
    if all(r.get("timer") == rows[0].get("timer") for r in rows) or any("host_median_ms" not in r for r in rows):
        return "median_ms", rows[0].get("timer", "host")
    return "host_median_ms", "do_bench (host-inclusive, both rows)"


def comparable(a: dict, b: dict) -> tuple[float, float, str]:
    """The medians of two rows' timings by one timer (one_timer), and its name."""
    key, timer = one_timer(a, b)
    return a[key], b[key], timer


def cpu_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """dtype, or float32 on a CPU where dtype is bf16 (the interpreter computes bf16 dot products wrongly), said
    once on stdout."""
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        print("on the CPU: float32 instead of bfloat16 (Triton's interpreter computes bf16 dot products wrongly)")
        return torch.float32
    return dtype

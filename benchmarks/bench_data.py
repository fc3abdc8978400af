"""Data path: images/s and tokens/s of each pixel path, the padding of the packs, the planner (C++ against Python)
and the attention-cost balance across ranks.

Rows (benchmarks/common.Recorder): `load` rows time one packed batch (median ms per batch of `budget` patch tokens,
which is what a training step waits for when loading is not hidden), with images_per_s, tokens_per_s and gbps (the
float32 patches produced); `plan` rows time planning `samples` lengths (samples_per_s, and the extrapolated
seconds for 1e9 samples); `padding` rows give the unused fraction of the packs at the default budget on the
synthetic size distribution; `balance` rows the mean over steps of max/mean attention cost across 8 ranks.

    python benchmarks/bench_data.py --quick           # a small set (part of the GPU check): 400 synthetic images
    python benchmarks/bench_data.py --images 3000 --workers 4 --plan-samples 100000000
    python benchmarks/bench_data.py --data DIR        # an existing folder of shards (with tokenizer.json)
Paths measured where they run: pil (thread prefetch; and worker processes with --workers), dali on the CPU,
dali on the GPU (mixed decoder), torchvision nvJPEG on the GPU. Absent ones get an error row saying why. Each
path's first batch is checked against pil's (the same samples, pixels within LOAD_MEAN_LEVELS on average): one that
disagrees gets an error row instead of its time, and the script exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import Recorder, exit_if_wrong  # noqa: E402
from fineviti.data import dali, nvjpeg, synth  # noqa: E402
from fineviti.data.loader import DataConfig, PackedLoader  # noqa: E402
from fineviti.data.planner import Planner, PlanState, plan_packs  # noqa: E402
from fineviti.data.sizes import DEFAULT_TOKEN_BUDGET, SizeRule  # noqa: E402


def _timing(times_ms: list[float]) -> dict:
    times = sorted(times_ms)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median_ms": pick(0.5), "p20_ms": pick(0.2), "p80_ms": pick(0.8), "peak_mem_mb": None}


def providers(workers: int) -> list[tuple[str, dict]]:
    cuda = torch.cuda.is_available()
    out = [("pil", {"pixel_path": "pil"})]
    if workers > 0:
        out.append((f"pil_{workers}workers", {"pixel_path": "pil", "num_workers": workers}))
    out.append(("dali_cpu", {"pixel_path": "dali", "device": "cpu"}))
    if cuda:
        out.append(("dali_gpu", {"pixel_path": "dali", "device": "cuda"}))
        out.append(("nvjpeg_gpu", {"pixel_path": "nvjpeg", "device": "cuda"}))
    return out


# A path's first batch against the pil path's (the same plan: the same samples): the mean |difference| per image, in
# uint8 levels, may not pass this. Decoders and resizers differ by at most 4 levels on average (nvjpeg's GPU
# tolerance); a wrong layout, channel order or normalisation differs by tens.
LOAD_MEAN_LEVELS = 8.0


def check_batch(batch, reference) -> str | None:
    """Why `batch` (a path's first) disagrees with `reference` (pil's first; SigLIP normalisation), or None."""
    if list(batch.keys) != list(reference.keys):
        return f"other samples than pil's first batch ({len(batch.keys)} against {len(reference.keys)} images)"
    for name in ("cu_seqlens", "pos", "grid_hw"):
        if not torch.equal(getattr(batch, name).cpu(), getattr(reference, name)):
            return f"another {name} than pil's"
    levels = (batch.patches.float().cpu() - reference.patches.float()).abs() * 0.5 * 255
    bounds = reference.cu_seqlens.tolist()
    worst = max((float(levels[a:b].mean()) for a, b in zip(bounds, bounds[1:], strict=False) if b > a), default=0.0)
    if not worst <= LOAD_MEAN_LEVELS:
        return f"pixels {worst:.2f} levels from pil's on average in an image (tolerance {LOAD_MEAN_LEVELS})"
    return None


def bench_load(rec: Recorder, data: Path, budget: int, workers: int, max_batches: int,
               wrong: list[str] | None = None) -> None:
    """A `load` row per pixel path; each path's first (untimed) batch is checked against pil's first (check_batch):
    one that disagrees gets an error row instead of its time and joins `wrong`. Without a pil batch (its path
    failed) the others are timed unchecked: their rows say `checked_against_pil: false`."""
    wrong = [] if wrong is None else wrong
    reference = None
    for name, overrides in providers(workers):
        shape = {"budget": budget, "batches": max_batches}
        if overrides["pixel_path"] == "dali" and not dali.available():
            rec.error(provider=name, mode="load", shape=shape, dtype="float32", error="nvidia-dali is not installed")
            continue
        if overrides["pixel_path"] == "nvjpeg" and not nvjpeg.available():
            rec.error(provider=name, mode="load", shape=shape, dtype="float32", error="torchvision is not installed")
            continue
        try:
            cfg = DataConfig(path=str(data / "train"), token_budget=budget, seed=0, prefetch=2, **overrides)
            loader = PackedLoader(cfg)
            times, images, tokens, patch_bytes = [], 0, 0, 0
            it = iter(loader)
            first = next(it)  # warm-up: builds pipelines, starts workers, plans the epoch
            if name == "pil":
                reference = first
                problem = None
            else:
                problem = None if reference is None else check_batch(first, reference)
            if problem is not None:
                loader.close()
                wrong.append(name)
                rec.error(provider=name, mode="load", shape=shape, dtype="float32",
                          error=f"wrong result: {problem}: not timed")
                continue
            for _ in range(max_batches):
                start = time.perf_counter()
                batch = next(it)
                if batch.patches.is_cuda:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1000)
                images += batch.n_images
                tokens += int(batch.cu_seqlens[-1])
                patch_bytes += batch.patches.numel() * batch.patches.element_size()
            loader.close()
        except Exception as exc:  # noqa: BLE001 (one failing path must not hide the others)
            rec.error(provider=name, mode="load", shape=shape, dtype="float32", error=f"{type(exc).__name__}: {exc}")
            continue
        seconds = sum(times) / 1000
        rec.add(provider=name, mode="load", shape=shape, dtype="float32", timing=_timing(times),
                gbps=patch_bytes / seconds / 1e9, images_per_s=images / seconds, tokens_per_s=tokens / seconds,
                skipped=dict(loader.stats), checked_against_pil=name == "pil" or reference is not None)
        print(f"    {name}: {images / seconds:.0f} images/s, {tokens / seconds / 1e3:.0f}k tokens/s", flush=True)


def synthetic_sizes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image sizes drawn like fineviti.data.synth draws them (log-uniform long side, aspect up to 1:4)."""
    rng = np.random.default_rng(seed)
    long_side = np.minimum(synth.MAX_SIDE, np.exp(rng.uniform(np.log(synth.MIN_SIDE), np.log(synth.MAX_SIDE + 1), n))
                           .astype(np.int64))
    max_aspect = np.minimum(synth.MAX_ASPECT, long_side / synth.MIN_SIDE)
    aspect = np.exp(rng.uniform(0, 1, n) * np.log(np.maximum(max_aspect, 1.0)))
    short_side = np.maximum(synth.MIN_SIDE, np.round(long_side / aspect).astype(np.int64))
    wide = rng.random(n) < 0.5
    return np.where(wide, short_side, long_side), np.where(wide, long_side, short_side)


def bench_padding(rec: Recorder, budget: int, n: int) -> None:
    heights, widths = synthetic_sizes(n)
    for patch, merge in ((14, 1), (14, 2)):
        lengths = SizeRule.for_budget(budget, patch=patch, merge=merge).tokens(heights, widths)
        for window in (1, 16, 128):
            planner = Planner(lengths, budget, window=window, seed=0)
            plan = planner.epoch(0)
            used = lengths.sum()
            padding = 1 - used / (plan.n_packs * budget)
            padding_full = 1 - lengths[plan.order[:plan.offsets[-2]]].sum() / ((plan.n_packs - 1) * budget)
            shape = {"samples": n, "budget": budget, "patch": patch, "merge": merge, "window": window}
            rec.add(provider="planner", mode="padding", shape=shape, dtype="int64",
                    timing={"median_ms": 0.0, "p20_ms": 0.0, "p80_ms": 0.0, "peak_mem_mb": None},
                    padding_fraction=float(padding), padding_fraction_without_last_pack=float(padding_full),
                    packs=plan.n_packs, mean_images_per_pack=n / plan.n_packs)
            print(f"    padding merge {merge} window {window}: {padding:.4%} of {plan.n_packs} packs "
                  f"({n / plan.n_packs:.1f} images a pack)", flush=True)


def bench_planner(rec: Recorder, budget: int, n_cpp: int, n_python: int) -> None:
    heights, widths = synthetic_sizes(n_cpp, seed=1)
    lengths = SizeRule.for_budget(budget).tokens(heights, widths)
    for backend, n in (("cpp", n_cpp), ("python", n_python)):
        try:
            times = []
            for _ in range(3 if n <= 2_000_000 else 1):
                start = time.perf_counter()
                plan_packs(lengths[:n], budget, 128, backend=backend)
                times.append((time.perf_counter() - start) * 1000)
        except Exception as exc:  # noqa: BLE001
            rec.error(provider=f"plan_{backend}", mode="plan", shape={"samples": n, "budget": budget, "window": 128},
                      dtype="int64", error=f"{type(exc).__name__}: {exc}")
            continue
        timing = _timing(times)
        rate = n / (timing["median_ms"] / 1000)
        rec.add(provider=f"plan_{backend}", mode="plan", shape={"samples": n, "budget": budget, "window": 128},
                dtype="int64", timing=timing, samples_per_s=rate, seconds_per_1e9_samples=1e9 / rate)
        print(f"    plan_packs {backend}: {rate / 1e6:.2f} M samples/s ({1e9 / rate:.0f} s for 1e9)", flush=True)
    # the whole epoch plan (permutation + packing + balancing) in C++
    start = time.perf_counter()
    Planner(lengths, budget, seed=0).epoch(0)
    ms = (time.perf_counter() - start) * 1000
    rec.add(provider="epoch_plan", mode="plan", shape={"samples": n_cpp, "budget": budget, "window": 128},
            dtype="int64", timing={"median_ms": ms, "p20_ms": ms, "p80_ms": ms, "peak_mem_mb": None},
            samples_per_s=n_cpp / (ms / 1000))


def bench_balance(rec: Recorder, budget: int, n: int, world: int = 8) -> None:
    heights, widths = synthetic_sizes(n, seed=2)
    lengths = SizeRule.for_budget(budget).tokens(heights, widths)
    for block in (1, 64):
        planner = Planner(lengths, budget, seed=0, cost_block=block, epochs=1)
        ratios, k = [], 0
        state = PlanState(seed=0)
        while (positions := planner.step_packs(state, k, world)) is not None:
            costs = [float((lengths[planner.pack_samples(*p)].astype(np.float64) ** 2).sum()) for p in positions]
            ratios.append(max(costs) / np.mean(costs))
            k += 1
        rec.add(provider=f"cost_block_{block}", mode="balance", shape={"samples": n, "budget": budget, "ranks": world},
                dtype="int64", timing={"median_ms": 0.0, "p20_ms": 0.0, "p80_ms": 0.0, "peak_mem_mb": None},
                max_over_mean_attention_cost=float(np.mean(ratios)), steps=k)
        print(f"    balance cost_block {block}: max/mean attention cost across {world} ranks "
              f"{np.mean(ratios):.3f}", flush=True)


def bench_synth_and_load(rec: Recorder, args, tmp: str, wrong: list[str]) -> None:
    data = args.data
    if data is None:
        data = Path(tmp)
        processes = min(os.cpu_count() or 1, 8)
        start = time.perf_counter()
        synth.generate(data, images=args.images, seed=0, heldout=0, processes=processes)
        ms = (time.perf_counter() - start) * 1000
        rec.add(provider="synth", mode="generate", shape={"images": args.images}, dtype="uint8",
                timing={"median_ms": ms, "p20_ms": ms, "p80_ms": ms, "peak_mem_mb": None},
                images_per_s=args.images / (ms / 1000), processes=processes)
        print(f"    synth: {args.images / (ms / 1000):.0f} images/s with {processes} processes", flush=True)
    bench_load(rec, data, args.budget, args.workers, args.batches, wrong)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small fixed set of the GPU check")
    parser.add_argument("--data", type=Path, help="an existing data folder (with train/ and tokenizer.json)")
    parser.add_argument("--images", type=int, default=2000, help="synthetic images to generate (default 2000)")
    parser.add_argument("--budget", type=int, default=DEFAULT_TOKEN_BUDGET)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per path")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="loader worker processes for the pil_Nworkers row (0: none)")
    parser.add_argument("--plan-samples", type=int, default=10_000_000, help="lengths planned by the C++ op")
    args = parser.parse_args()
    if args.quick:
        quick = {"images": 400, "batches": 8, "plan_samples": 2_000_000}
        changed = [f"--{k.replace('_', '-')} {quick[k]}" for k in quick
                   if getattr(args, k) != parser.get_default(k) and getattr(args, k) != quick[k]]
        if changed:
            print(f"--quick sets {', '.join(changed)} (its fixed set)")
        for key, value in quick.items():
            setattr(args, key, value)
        args.workers = min(args.workers, 4)
    rec = Recorder("data")
    wrong: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bench_synth_and_load(rec, args, tmp, wrong)
    except ImportError as exc:  # e.g. no `tokenizers` on an offline machine: the planner rows still run
        rec.error(provider="synth", mode="generate", shape={"images": args.images}, dtype="uint8",
                  error=f"{type(exc).__name__}: {exc}")
    bench_padding(rec, args.budget, 200_000 if args.quick else 1_000_000)
    bench_planner(rec, args.budget, args.plan_samples, min(args.plan_samples, 200_000))
    bench_balance(rec, args.budget, 50_000 if args.quick else 200_000)
    exit_if_wrong(rec.benchmark, wrong)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The trainer's own loop: host wall time per step of `fineviti train` (fineviti.train.Trainer on its random packed
batches, stage 1), reading the device at every step (metrics.log_every=1: the loss, then the gradient norm, each a
wait for the GPU's queue to drain before the host launches the rest of the step) against reading it only at every
N-th step (metrics.log_every=N: the steps between rows read nothing, and the host queues ahead of the GPU).

bench_train times a step function of its own; this one times the Trainer, checkpoints and evaluation off, so that
what differs between the two rows is the reads (and the log_every=1 run's JSONL line per step). The first
`--warmup` steps (Triton compiles) are not timed; warmup is a multiple of N, so that timing starts after a step that
read (the GPU's queue holding at most that step's update), and the last step reads (the end of the timing waits for
the GPU). Both runs train the same model on the same batches: their last losses must be equal on a CPU, within 1%
on a GPU (kernels with atomic sums are not bit-reproducible); a mismatch is an error row and exit status 1.

    python benchmarks/bench_loop.py --quick     # the defaults, the GPU check's case: on a GPU base at 16k patch
                                                # tokens, log_every 1 against 10; on a CPU debug at 256, 1 against 3
    python benchmarks/bench_loop.py --preset large --every 20 --steps 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import Recorder, exit_if_wrong  # noqa: E402


def run_case(rec: Recorder, preset: str, budget: int, every: int, steps: int, warmup: int, device: str) -> dict:
    """Trains `steps` steps with metrics.log_every=`every`; adds the row of the steps after `warmup` (host wall time
    per step, from the start of step warmup + 1 to the end of the last step, which read the device)."""
    from fineviti.train.config import apply_cli_overrides
    from fineviti.train.config import preset as make_preset
    from fineviti.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = apply_cli_overrides(make_preset(preset), [
            f"run_dir={run_dir}", "training.data_source=random", f"training.steps={steps}",
            f"training.device={device}", f"metrics.log_every={every}", "checkpoint.interval=0",
            "checkpoint.save_final=false", "eval.every=0", "metrics.progress=off", "metrics.tensorboard=off",
            f"random_data.token_budget={budget}"])
        trainer = Trainer(cfg)
        starts = {}
        original = trainer.train_step

        def train_step(batch, **kwargs):
            if trainer.step == warmup + 1:
                starts["t0"] = time.perf_counter()
            return original(batch, **kwargs)

        trainer.train_step = train_step
        try:
            last = trainer.train()
            if device == "cuda":
                torch.cuda.synchronize()  # (the last step read; its update may still be queued)
            seconds = time.perf_counter() - starts["t0"]
        finally:
            trainer.close()
    timed = steps - warmup
    ms = seconds / timed * 1e3
    shape = {"preset": preset, "patch_tokens": budget, "steps": timed, "log_every": every}
    dtype = str(trainer.mp_dtype or "float32").replace("torch.", "")
    rec.add(provider=f"log_every={every}", mode="train", shape=shape, dtype=dtype,
            timing={"median_ms": ms, "timer": f"host wall, mean over {timed} steps"},
            steps_per_s=1e3 / ms, loss=last["loss"])
    return last


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--quick", action="store_true", help="the defaults (the GPU check's case)")
    parser.add_argument("--preset", default="base" if on_gpu else "debug")
    parser.add_argument("--budget", type=int, default=16384 if on_gpu else 256, help="patch tokens per step")
    parser.add_argument("--every", type=int, default=10 if on_gpu else 3, help="N of the deferred run")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: warmup + 3 N)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps, a multiple of N (default N)")
    args = parser.parse_args(argv)
    if args.every < 2:
        parser.error(f"--every {args.every}: expected at least 2 (the deferred run's metrics.log_every)")
    warmup = args.every if args.warmup is None else args.warmup
    if warmup < 1 or warmup % args.every:
        parser.error(f"--warmup {warmup}: expected a positive multiple of --every {args.every} (timing starts "
                     f"after a step that read the device)")
    steps = warmup + 3 * args.every if args.steps is None else args.steps
    if steps <= warmup:
        parser.error(f"--steps {steps}: expected more than --warmup {warmup}")
    device = "cuda" if on_gpu else "cpu"
    rec = Recorder("loop")
    wrong: list[str] = []
    losses = {}
    for every in (1, args.every):
        try:
            losses[every] = run_case(rec, args.preset, args.budget, every, steps, warmup, device)["loss"]
        except Exception as exc:  # noqa: BLE001 (one run's failure is a row, not the end of the other)
            rec.error(provider=f"log_every={every}", mode="train", shape={"preset": args.preset}, dtype="",
                      error=f"{type(exc).__name__}: {exc}")
            wrong.append(f"log_every={every}: {type(exc).__name__}")
    tolerance = 1e-2 if on_gpu else 0.0
    if len(losses) == 2 and abs(losses[1] - losses[args.every]) > tolerance * abs(losses[1]):
        message = (f"the last losses differ: {losses[1]} reading every step, {losses[args.every]} every "
                   f"{args.every} (allowed: a relative {tolerance:g})")
        rec.error(provider=f"log_every={args.every}", mode="train", shape={"preset": args.preset}, dtype="",
                  error=message)
        wrong.append(message)
    timed = {r["provider"]: r["median_ms"] for r in rec.rows if "median_ms" in r}
    if not wrong and len(timed) == 2:
        ratio = timed[f"log_every={args.every}"] / timed["log_every=1"]
        print(f"loop {args.preset}: log_every={args.every} takes {ratio:.3f}x the time per step of log_every=1")
    exit_if_wrong("bench_loop", wrong)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The stage-2 LM loss: fineviti.ops.linear_cross_entropy (the output head and the cross-entropy in chunks of rows,
no logits kept) against the plain expression the aligner used before, F.cross_entropy(F.linear(h, W).float()),
eager and under torch.compile.

Shapes are (targets, hidden, vocab): the rows whose next token is a target, the LM's width and vocabulary (32000:
Llama 2's; 151936: Qwen2's, with 3584 its 7B width). `--positions-per-target K` gives the plain providers K rows
per target, the others ignored (ignore_index), as the aligner's full-logits path ran the head on every position of
a region sample (image placeholders and the prompt included); ours always takes the target rows only, as the
aligner gathers them now. Rows report TFLOP/s of the useful head products (fwd 2 * targets * hidden * vocab; full,
forward and backward, 3 times that: ours recomputes the logits, a fourth product not counted) and peak memory.

    python benchmarks/bench_lm_loss.py --quick          # the GPU check's set
    python benchmarks/bench_lm_loss.py --targets 8192 --hidden 3584 --vocab 151936 --provider ours --mode full
On a CPU it runs one tiny shape of the eager providers as a smoke check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CHECK_TOLERANCE,
    Recorder,
    exit_if_wrong,
    record_if_wrong,
    relative_error,
)
from fineviti.ops import lm_loss  # noqa: E402

PROVIDERS = ("ours", "torch_eager", "torch_compile")
MODES = ("fwd", "full")
_COMPILED = {}


def plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=lm_loss.IGNORE_INDEX,
                           reduction="sum")


def provider_fn(provider):
    if provider == "ours":
        return lambda h, w, t: lm_loss.linear_cross_entropy(h, w, t)[0]
    if provider == "torch_eager":
        return plain
    if "plain" not in _COMPILED:
        _COMPILED["plain"] = torch.compile(plain, dynamic=False)
    return _COMPILED["plain"]


def make_inputs(provider, targets, hidden, vocab, per_target, dtype, device, grad):
    """(hidden rows, weight, targets): ours gets the target rows; the plain providers `per_target` rows per target,
    the extra ones ignored."""
    rows = targets if provider == "ours" else targets * per_target
    h = torch.randn(rows, hidden, device=device, dtype=dtype).requires_grad_(grad)
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype) / hidden ** 0.5).requires_grad_(grad)
    t = torch.full((rows,), lm_loss.IGNORE_INDEX, device=device, dtype=torch.long)
    t[::per_target if provider != "ours" else 1] = torch.randint(0, vocab, (targets,), device=device)
    return h, w, t


WRONG: list[str] = []  # ours' cases that failed their check (below), for main's exit status


def check_errors(fn, h, w, t, mode) -> dict[str, float]:
    """{quantity: relative error} of `fn` against the plain full-logits loss on the same rows: the loss and, in mode
    "full", the gradients of the hidden rows and the weight."""
    results = []
    for call in (fn, plain):
        out = call(h, w, t)
        got = {"loss": out.detach()}
        if mode == "full":
            got.update(zip(("d_hidden", "d_weight"), torch.autograd.grad(out, (h, w)), strict=True))
        results.append(got)
    return {name: relative_error(results[0][name], want, 1e-3 if want.dim() == 0 else 1e-30)
            for name, want in results[1].items()}


def run_case(rec, provider, mode, targets, hidden, vocab, per_target, dtype, device):
    h, w, t = make_inputs(provider, targets, hidden, vocab, per_target, dtype, device, mode == "full")
    fn = provider_fn(provider)
    shape = {"targets": targets, "hidden": hidden, "vocab": vocab, "positions_per_target": per_target}
    dtype_name = str(dtype).replace("torch.", "")
    if provider == "ours":  # checked before it is timed: a wrong result is an error row and a non-zero exit
        errors = check_errors(fn, h, w, t, mode)
        if record_if_wrong(rec, WRONG, f"{mode} targets={targets} hidden={hidden} vocab={vocab}", errors,
                           CHECK_TOLERANCE[dtype], "the plain full-logits loss", provider=provider, mode=mode,
                           shape=shape, dtype=dtype_name):
            return None
    flops = 2 * targets * hidden * vocab * (3 if mode == "full" else 1)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(h, w, t)
    else:
        def step():
            torch.autograd.grad(fn(h, w, t), (h, w))
    return rec.measure(step, provider=provider, mode=mode, shape=shape, dtype=dtype_name, flops=flops)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the fixed set of the GPU check")
    parser.add_argument("--provider", choices=PROVIDERS, action="append")
    parser.add_argument("--mode", choices=MODES, action="append")
    parser.add_argument("--targets", type=int, action="append", help="target rows (default 4096 and 16384)")
    parser.add_argument("--hidden", type=int, action="append", help="LM width (default 1024 and 3584)")
    parser.add_argument("--vocab", type=int, action="append", help="vocabulary (default 32000 and 151936)")
    parser.add_argument("--positions-per-target", type=int, default=1,
                        help="rows per target that the plain providers run the head on (default 1)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    if args.positions_per_target < 1:
        parser.error(f"--positions-per-target must be >= 1, got {args.positions_per_target}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if on_gpu else torch.float32
    rec = Recorder("lm_loss")
    if args.quick and on_gpu:
        # (targets, hidden, vocab, positions per target): a 7B-class head at 4k targets, alone and as the aligner
        # ran it before (4 positions per target), and a small LM's head at 16k; torch.compile on the first only
        # (each shape and mode compiles anew)
        cases = [(4096, 3584, 151936, 1), (4096, 3584, 151936, 4), (16384, 1024, 32000, 1)]
    elif on_gpu:
        cases = [(n, d, v, args.positions_per_target) for n in args.targets or [4096, 16384]
                 for d in args.hidden or [1024, 3584] for v in args.vocab or [32000, 151936]]
    else:
        cases = [(64, 32, 500, args.positions_per_target)]
        ignored = [flag for flag, value in (("--targets", args.targets), ("--hidden", args.hidden),
                                            ("--vocab", args.vocab)) if value]
        ignored += ["--dtype"] if args.dtype != parser.get_default("dtype") else []
        print("on the CPU: one toy shape (64 targets, hidden 32, vocabulary 500) in float32"
              + (f"; {', '.join(ignored)} not used" if ignored else ""))
    for i, (targets, hidden, vocab, per_target) in enumerate(cases):
        for provider in args.provider or PROVIDERS:
            if provider == "torch_compile" and args.quick and i > 0:
                continue
            if provider == "torch_compile" and not on_gpu:
                print(f"lm_loss      {provider:16s} skipped: torch.compile's CPU code generation is GPU-only here")
                continue
            for mode in args.mode or MODES:
                run_case(rec, provider, mode, targets, hidden, vocab, per_target, dtype, device)
    exit_if_wrong("bench_lm_loss", WRONG)


if __name__ == "__main__":
    main()

"""Probe of the two-piece attention kernels (head dims that are not powers of two) on a GPU.

On an H100 (2026-11-27, triton 3.6) the forward at head_dim 72, and at 80, hit an illegal memory access, so CUDA
tensors at such head dims are zero-padded to a power of two (fineviti/ops/attention.py, triton_padded_head_dim).
Under the interpreter the same kernels read nothing outside their inputs (NaN guard bands stay untouched), so the
fault is expected in the compiled code. This runs one head dim with the padding off, forward then backward, each
step (forward, each backward) synchronised, in a process of its own, and says which step faulted (the
kernels are called directly, below the ops layer's padding):

    FINEVITI_ATTN_SPLIT=pieces python benchmarks/attention_split_probe.py --head-dim 80   # OK or the faulting step
    FINEVITI_ATTN_SPLIT=pieces compute-sanitizer --tool memcheck python benchmarks/attention_split_probe.py \
        --head-dim 80 --small

    python benchmarks/attention_split_probe.py --all    # 80 and 96 in split mode "masked" (one 128-column
                                                        # tile, the default) and their timings
                                                        # against padding; then 72, 80 and 96 in two pieces,
                                                        # each in its own process; the first that faults again
                                                        # under compute-sanitizer and with other forward tiles;
                                                        # then the timing below for every head dim that did not
                                                        # fault (170 s in all)

    python benchmarks/attention_split_probe.py --head-dim 80 --time [--pad 96]
        forward+backward at 16k packed tokens (images of 256-4096 patches), 16 heads: the two-piece kernel
        against the zero-padded run at the next power of two (what CUDA tensors get today) and at each --pad
        width; rows go to FINEVITI_RESULTS as benchmark "attention_split" with the useful TFLOP/s (the
        unpadded head dim's FLOPs), so that the padding policy can follow a measurement

benchmarks/gpu_check.sh runs --all.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--all", action="store_true", help="72, 80 and 96 in subprocesses, then the sanitizer")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--small", action="store_true", help="one short pack (for compute-sanitizer)")
    parser.add_argument("--time", action="store_true", help="time the two-piece kernel against zero-padding")
    parser.add_argument("--pad", type=int, action="append", default=[], help="also time zero-padded to this width")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: nothing to probe")
        return 0
    if args.all:
        return probe_all(args.dtype)
    if args.head_dim is None:
        parser.error("--head-dim is required without --all")
    if args.time:
        return time_split(args.head_dim, args.dtype, args.pad)
    return check_head_dim(args.head_dim, args.dtype, [1, 3, 197, 130] if args.small else [1, 3, 197, 257, 577, 1024])


def check_head_dim(d: int, dtype_name: str, lens: list[int], heads: int = 4, device: str = "cuda") -> int:
    """Forward and both backwards of the kernels at head dim d (in the split mode FINEVITI_ATTN_SPLIT gives), each
    synchronised so that a fault names its step, then their values against the fp32 reference: 0 when all pass.
    (device: a CPU under the interpreter, for the tests.)"""
    from fineviti.kernels import varlen_attention as kernels

    dtype = getattr(torch, dtype_name)
    total = sum(lens)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q, k, v = (torch.randn(total, heads, d, device=device, dtype=dtype) for _ in range(3))
    step = "forward"
    do = torch.randn_like(q)
    grads = {}
    try:
        o, lse = kernels.attention_forward(q, k, v, cu, cu, max(lens), max(lens), d ** -0.5, lens)
        sync()
        for deterministic in (True, False):
            step = f"backward (deterministic={deterministic}, dq {kernels.dq_mode(deterministic, d, dtype, max(lens))})"
            grads[step] = kernels.attention_backward(do, q, k, v, o, lse, cu, cu, max(lens), max(lens),
                                                     d ** -0.5, lens, lens, deterministic=deterministic)
            sync()
    except Exception as exc:  # noqa: BLE001  (the fault is what this reports)
        print(f"head_dim {d} {dtype_name}, split mode {kernels.split_mode()}: FAULT in the {step}: "
              f"{type(exc).__name__}: {_first_line(exc)}")
        return 1
    from fineviti.ops import varlen_attention_ref

    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = varlen_attention_ref(*leaves, cu)
    ref_grads = torch.autograd.grad(ref, leaves, do.float())
    # against the fp32 reference, relative to each tensor's largest entry: 16-bit rounding is about 1e-2 there;
    # NaN fails too
    errors = {"forward": (o.float() - ref).abs().max().item() / ref.abs().max().item()}
    for step, got in grads.items():
        for name, g, r in zip(("dq", "dk", "dv"), got, ref_grads, strict=True):
            errors[f"{name} of the {step}"] = (g.float() - r).abs().max().item() / r.abs().max().item()
    worst = max(errors, key=lambda key: errors[key] if errors[key] == errors[key] else float("inf"))
    if not errors[worst] <= 5e-2:
        print(f"head_dim {d} {dtype_name}, split mode {kernels.split_mode()}: WRONG {worst}, relative error "
              f"{errors[worst]:.3e}")
        return 1
    print(f"head_dim {d} {dtype_name}, split mode {kernels.split_mode()}: OK (forward and both backwards, largest "
          f"relative error {errors[worst]:.1e} against the fp32 reference, in the {worst})")
    return 0


def time_split(d: int, dtype_name: str, pads: list[int], tokens: int = 16384, heads: int = 16,
               device: str = "cuda") -> int:
    """Forward+backward of the kernels (below the ops layer's padding) at head dim d unpadded (two pieces) and
    zero-padded to each width; useful TFLOP/s count d, not the padded width. (tokens, heads, device: small on a
    CPU under the interpreter, for the tests.)"""
    from bench_attention import pack_lengths  # noqa: I001  (benchmarks/ is on the path when run as a script)
    from common import Recorder, bench
    from fineviti.kernels import varlen_attention as kernels

    dtype = getattr(torch, dtype_name)
    lens = pack_lengths(tokens, seed=tokens, low=min(256, tokens // 4), high=min(4096, tokens // 2))
    total = sum(lens)  # 16384: the benchmark's "pack:16384"
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    flops = 3.5 * 4 * sum(n * n for n in lens) * heads * d  # forward 4 * sum(L^2) * h * d, backward 2.5 times that
    rec = Recorder("attention_split")
    # today's policy (the next power of two) first, so that a timeout loses the candidates, not the baseline
    widths = sorted({1 << (d - 1).bit_length(), *pads} - {d}, reverse=True) + [d]
    for width in widths:
        if width < d:
            continue
        q, k, v = (torch.randn(total, heads, width, device=device, dtype=dtype) for _ in range(3))
        if width > d:
            for t in (q, k, v):
                t[..., d:] = 0
        do = torch.randn_like(q)

        def step(q=q, k=k, v=v, do=do):
            o, lse = kernels.attention_forward(q, k, v, cu, cu, max(lens), max(lens), d ** -0.5, lens)
            kernels.attention_backward(do, q, k, v, o, lse, cu, cu, max(lens), max(lens), d ** -0.5, lens, lens,
                                       deterministic=False)

        dim_a, dim_b = kernels.split_head_dim(d, dtype)
        if width == d and dim_b:
            label = "two-piece"
        elif width == d and dim_a != d:
            label = f"masked in {dim_a}"  # FINEVITI_ATTN_SPLIT=masked: one tile, no padded copies
        else:
            label = f"padded to {width}"
        shape = {"head_dim": d, "width": width, "tokens": total, "images": len(lens), "heads": heads}
        try:
            timing = bench(step)
        except Exception as exc:  # noqa: BLE001  (a fault is a result here)
            rec.error(provider=label, mode="fwd_bwd", shape=shape, dtype=dtype_name,
                      error=f"{type(exc).__name__}: {_first_line(exc)}"[:300])
            return 1
        rec.add(provider=label, mode="fwd_bwd", shape=shape, dtype=dtype_name, timing=timing,
                tflops=flops / (timing["median_ms"] * 1e-3) / 1e12)
    return 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


def probe_all(dtype: str, budget_s: float = 170.0) -> int:
    """The fault probes of 72, 80 and 96, the diagnostics of the first that faults (compute-sanitizer, forward tiles),
    then the timings of those that did not fault, all inside budget_s (the GPU check's section gives 180 s): each
    subprocess gets what is left, and a step that would get under 20 s is skipped and said so."""
    me = [sys.executable, str(Path(__file__).resolve())]
    deadline = time.monotonic() + budget_s

    def run(cmd, env=None, timeout=40) -> int:
        timeout = min(timeout, deadline - time.monotonic())
        if timeout < 20:
            print(f"skipped (under 20 s of the probe's {budget_s:.0f} s left): {' '.join(cmd[-6:])}")
            return 125
        try:
            return subprocess.run(cmd, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            print(f"timed out after {timeout:.0f} s: {' '.join(cmd[-6:])}")
            return 124

    # First split mode "masked", the default (80 and 96 in one 128-column tile, the d128 kernels with masked
    # columns: no padded copies), each in a process of its own, then its timing against zero-padding to 128 (what
    # FINEVITI_ATTN_SPLIT=pieces runs on a GPU); then the two-piece kernels, which faulted on 2026-11-27 and twice
    # on 2026-11-28 (H100, H200).
    # A step skipped for want of budget (125) is no fault; the two-piece runs say "pieces" whatever the caller's
    # environment holds.
    masked = {**os.environ, "FINEVITI_ATTN_SPLIT": "masked"}
    pieces = {**os.environ, "FINEVITI_ATTN_SPLIT": "pieces"}
    masked_rc = {d: run([*me, "--head-dim", str(d), "--dtype", dtype], env=masked) for d in (80, 96)}
    if masked_rc[80] == 0:  # one timing (80; 96 runs the same tiles): the budget is for the probes
        run([*me, "--head-dim", "80", "--dtype", dtype, "--time"], env=masked, timeout=60)
    rcs = {d: run([*me, "--head-dim", str(d), "--dtype", dtype], env=pieces) for d in (72, 80, 96)}
    faulted = [d for d, rc in rcs.items() if rc not in (0, 125)]
    if faulted:
        sanitizer = shutil.which("compute-sanitizer")
        if sanitizer is None:
            print("compute-sanitizer is not on PATH: no memcheck run")
        else:
            run([sanitizer, "--tool", "memcheck", "--print-limit", "5", *me, "--head-dim", str(faulted[0]),
                 "--dtype", dtype, "--small"], timeout=60)
        # Which forward tiles fault at the first failing head dim: pipelining depth and block shape are the suspects
        # (narrow wgmma operands in multi-stage loops; on 2026-11-28 at 80: M128 w8 s3, M64 w4 s3 and s1 faulted,
        # M128 w8 s1 passed, and is the pieces' pin since). The backward keeps its pins.
        for config in ("128,64,8,3", "128,64,4,1", "64,64,8,1"):
            env = {**pieces, "FINEVITI_ATTN_FWD_CONFIG": config}
            rc = run([*me, "--head-dim", str(faulted[0]), "--dtype", dtype], env=env)
            verdict = "OK" if rc == 0 else "skipped" if rc == 125 else "FAULT"
            print(f"forward config {config} at head_dim {faulted[0]}: {verdict}")
    for d in (80, 96, 72):  # what the split buys where it runs, against padding to 128 (today), 96 and (72) 80
        if rcs[d] == 0:
            pads = [str(p) for p in (80, 96) if p > d and rcs[p] == 0]
            run([*me, "--head-dim", str(d), "--dtype", dtype, "--time", *(a for p in pads for a in ("--pad", p))],
                env=pieces, timeout=60)
    return 1 if faulted or any(rc not in (0, 125) for rc in masked_rc.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

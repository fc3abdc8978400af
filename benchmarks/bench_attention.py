"""Varlen attention: ours against stock attention, forward, backward and forward+backward.

Shapes: packs of native-resolution images (total 16k or 64k tokens, image lengths drawn from 256-4096, seeded), and
the fixed-length shapes of the FlashAttention-3 paper (batch x seqlen = 16k tokens, hidden 2048, non-causal), so
that its published numbers compare directly. FLOPs: forward 4 * sum(L_i^2) * heads * head_dim, backward 2.5x that.

  python benchmarks/bench_attention.py --quick                         # the set the GPU check runs
  python benchmarks/bench_attention.py --provider ours --shape fa3:4096 --head-dim 128 --mode fwd_bwd --once
                                                                       # one provider and shape alone (ncu, nsys)
  python benchmarks/bench_attention.py --sweep --shape fa3:4096 --head-dim 128
                                                                       # candidate configurations, to pick pins
  python benchmarks/bench_attention.py --profile --shape fa3:1024      # GPU time per kernel against wall time
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F
from common import (  # noqa: I001  (benchmarks/ is on the path when run as a script)
    CHECK_TOLERANCE,
    Recorder,
    bench,
    cpu_dtype,
    gpu_kernel_times,
    record_if_wrong,
    relative_error,
)

from fineviti.kernels import varlen_attention as kernels  # noqa: E402
from fineviti.ops import attention as attention_ops

HIDDEN = 2048
PROVIDERS = ("ours", "ours_det", "torch_varlen", "flash_attn", "xformers", "flex", "sdpa_flash", "sdpa_cudnn",
             "sdpa_mask")


def pack_lengths(total: int, seed: int, low: int = 256, high: int = 4096) -> list[int]:
    """Image token counts drawn from [low, high] until `total` is reached; the last one takes the rest."""
    rng = random.Random(seed)
    lens = []
    while sum(lens) < total:
        lens.append(min(rng.randint(low, high), total - sum(lens)))
    return lens


def shape_lengths(shape: str) -> tuple[list[int], str]:
    kind, _, value = shape.partition(":")
    if kind == "fa3":  # batch x seqlen = 16k tokens
        seqlen = int(value)
        return [seqlen] * max(1, 16384 // seqlen), f"fa3 seqlen {seqlen}"
    if kind == "pack":
        total = int(value)
        return pack_lengths(total, seed=total), f"pack {total}"
    raise ValueError(f"--shape must be fa3:SEQLEN or pack:TOTAL, got {shape!r}")


def _sdpa_per_sequence(q, k, v, lens, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    outs, start = [], 0
    with sdpa_kernel([chosen]):
        if len(set(lens)) == 1:  # fixed length: one batched call, as a user would write it
            b, n = len(lens), lens[0]
            view = lambda t: t.view(b, n, *t.shape[1:]).transpose(1, 2)  # noqa: E731
            return F.scaled_dot_product_attention(view(q), view(k), view(v)).transpose(1, 2).reshape(q.shape)
        for length in lens:
            sl = slice(start, start + length)
            outs.append(F.scaled_dot_product_attention(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                                                       v[sl].transpose(0, 1)[None])[0].transpose(0, 1))
            start += length
    return torch.cat(outs)


def _sdpa_mask(q, k, v, doc):
    mask = doc[:, None] == doc[None, :]
    return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          attn_mask=mask)[0].transpose(0, 1)


def make_call(provider, q, k, v, cu, lens):
    max_len = max(lens)
    if provider in ("ours", "ours_det"):  # ours_det: deterministic=True, dq in its own kernel without atomics
        det = provider == "ours_det"
        return lambda: attention_ops.varlen_attention(q, k, v, cu, max_len, backend="triton", seqlens=lens,
                                                      deterministic=det)
    if provider in ("torch_varlen", "flash_attn", "xformers", "flex"):
        ok, why = attention_ops.backend_available(provider, q.device)
        if not ok:
            raise RuntimeError(why)
        return lambda: attention_ops.varlen_attention(q, k, v, cu, max_len, backend=provider, seqlens=lens)
    if provider in ("sdpa_flash", "sdpa_cudnn"):
        return lambda: _sdpa_per_sequence(q, k, v, lens, provider)
    if provider == "sdpa_mask":
        total = sum(lens)
        if total > 32768:
            raise RuntimeError(f"the dense mask of {total} tokens takes {total * total / 2**30:.1f} GiB; skipped")
        doc = torch.repeat_interleave(torch.arange(len(lens), device=q.device), torch.tensor(lens, device=q.device))
        return lambda: _sdpa_mask(q, k, v, doc)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


# Our rows are checked before they are timed: the output (and dq, dk, dv in the backward modes) against the torch
# backend (SDPA per sequence) on the same inputs, as relative errors (common.CHECK_TOLERANCE). A wrong result is an
# error row and a non-zero exit of the script (the GPU check's section fails), never a time.
WRONG: list[str] = []  # the cases that failed their check, for main's exit status


def _case(provider, shape, head_dim, mode, dtype, device, heads=None):
    """(fn, info, flops, check): one call of `provider` in `mode` on inputs of `shape` (fn raises where it cannot
    run); check() -> the relative errors of the call's output and gradients against the torch backend."""
    lens, shape_name = shape_lengths(shape)
    heads = heads or (HIDDEN // head_dim if shape.startswith("fa3") else 16)
    total = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    q, k, v = (torch.randn(total, heads, head_dim, device=device, dtype=dtype, requires_grad=mode != "fwd")
               for _ in range(3))
    flops_fwd = 4 * sum(n * n for n in lens) * heads * head_dim
    flops = {"fwd": flops_fwd, "bwd": 2.5 * flops_fwd, "fwd_bwd": 3.5 * flops_fwd}[mode]
    info = {"shape": shape_name, "tokens": total, "images": len(lens), "max_len": max(lens), "heads": heads,
            "head_dim": head_dim}

    def fn():
        call = make_call(provider, q, k, v, cu, lens)
        if mode == "fwd":
            return call
        out = call()
        grad = torch.randn_like(out)
        if mode == "bwd":
            return lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
        return lambda: torch.autograd.grad(call(), (q, k, v), grad)

    def check() -> list[float]:
        results, upstream = [], None
        for call in (make_call(provider, q, k, v, cu, lens),
                     lambda: attention_ops.varlen_attention(q, k, v, cu, max(lens), backend="torch", seqlens=lens)):
            out = call()
            if mode == "fwd":
                results.append([out.detach()])
                continue
            if upstream is None:  # one random upstream gradient for both, as training gives
                upstream = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(1),
                                       device=out.device, dtype=out.dtype)
            results.append([out.detach(), *torch.autograd.grad(out, (q, k, v), upstream)])
        return [relative_error(g, w) for g, w in zip(results[0], results[1], strict=True)]

    return fn, info, flops, check


def head_dim_path(provider: str, head_dim: int, dtype, device) -> dict:
    """{"head_dim_path": ...} for our rows at a head dim that is no power of two (the issue's "the benchmark shows
    the choice"): one masked tile, two pieces or zero-padding, as the ops layer runs it on `device`; else {}."""
    if provider not in ("ours", "ours_det") or not head_dim & (head_dim - 1):
        return {}
    from fineviti.kernels import varlen_attention as kernels
    from fineviti.ops.attention import padded_head_dim_for

    split = kernels.split_mode()
    width = padded_head_dim_for(head_dim, dtype, torch.device(device).type, split)
    dim_a, dim_b = kernels.split_head_dim(width, dtype, split)
    path = f"padded to {width}" if width != head_dim else f"masked in {dim_a}" if dim_b == 0 else \
        f"two pieces {dim_a} + {dim_b}"
    return {"head_dim_path": path}


def run_case(rec, provider, shape, head_dim, mode, dtype, device, once=False, heads=None, tag=None):
    make, info, flops, check = _case(provider, shape, head_dim, mode, dtype, device, heads)
    if tag:
        info["config"] = tag
    dtype_name = str(dtype).replace("torch.", "")
    checked = {}
    try:
        fn = make()
        if once:
            fn()
            torch.cuda.synchronize() if device == "cuda" else None
            return
        if provider in ("ours", "ours_det"):
            errors = dict(zip(("out", "dq", "dk", "dv"), check(), strict=False))
            checked = {"check_rel_err": max(errors.values())}
            case = f"{provider} {mode} {info['shape']} d{head_dim} {tag or ''}".strip()
            if record_if_wrong(rec, WRONG, case, errors, CHECK_TOLERANCE[dtype], "the torch backend",
                               provider=provider, mode=mode, shape=info, dtype=dtype_name):
                return
        timing = bench(fn)
    except Exception as exc:  # a provider that cannot run this case is reported, not fatal
        rec.error(provider=provider, mode=mode, shape=info, dtype=dtype_name, error=f"{type(exc).__name__}: {exc}")
        return
    rec.add(provider=provider, mode=mode, shape=info, dtype=dtype_name, timing=timing,
            tflops=flops / (timing["median_ms"] * 1e-3) / 1e12, **checked,
            **head_dim_path(provider, head_dim, dtype, device))


def profile_case(rec, provider, shape, head_dim, mode, dtype, device, steps=5):
    """GPU time per call of each kernel of `provider` in `mode` (torch.profiler), and the host's wall time per call
    with calls back to back: rows of benchmark "attention_profile", provider "PROVIDER: kernel" (median_ms: that
    kernel's time per call) and "PROVIDER: wall" (tflops from the wall time). A wall time well above the kernels'
    sum means the host's launches, or gaps between kernels, set the pace of short shapes."""
    make, info, flops, _ = _case(provider, shape, head_dim, mode, dtype, device)
    dtype_name = str(dtype).replace("torch.", "")
    try:
        per_kernel, wall_ms = gpu_kernel_times(make(), steps)
    except Exception as exc:
        rec.error(provider=provider, mode=mode, shape=info, dtype=dtype_name, error=f"{type(exc).__name__}: {exc}")
        return
    total = sum(per_kernel.values())
    for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:8]:
        rec.add(provider=f"{provider}: {name[:60]}", mode=mode, shape=info, dtype=dtype_name,
                timing={"median_ms": ms}, share=ms / total if total else None)
    rec.add(provider=f"{provider}: wall", mode=mode, shape=info, dtype=dtype_name, timing={"median_ms": wall_ms},
            tflops=flops / (wall_ms * 1e-3) / 1e12, kernels_ms=total)
    print(f"attention_profile {provider} {mode} {info['shape']} d{head_dim}: {total:.3f} ms of GPU kernels per "
          f"call over {len(per_kernel)} kernels, {wall_ms:.3f} ms wall per call")


QUICK = (
    # (shapes, head dims, modes, providers)
    (["fa3:1024", "fa3:4096", "fa3:16384"], [64, 128], ["fwd_bwd"],
     ["ours", "torch_varlen", "sdpa_flash", "sdpa_cudnn", "flash_attn"]),
    (["fa3:4096"], [64, 128], ["fwd", "bwd"], ["ours", "torch_varlen"]),
    (["fa3:4096"], [128], ["bwd"], ["ours_det"]),  # at 64 ours runs the deterministic backward anyway
    (["pack:16384"], [64, 72, 80, 96, 128], ["fwd_bwd"], ["ours", "torch_varlen"]),
    (["pack:16384"], [128], ["fwd_bwd"], ["ours_det"]),
    (["pack:16384"], [64], ["fwd_bwd"], ["sdpa_flash", "sdpa_mask", "flex"]),
    (["pack:65536"], [64, 128], ["fwd_bwd"], ["ours", "torch_varlen"]),
    # d256 (8 heads at hidden 2048): times the dk/dv kernel's two-part launch beyond 128 columns (PART)
    (["fa3:4096"], [256], ["fwd_bwd"], ["ours", "torch_varlen"]),
)

FULL = (
    (["fa3:512", "fa3:1024", "fa3:2048", "fa3:4096", "fa3:8192", "fa3:16384", "pack:16384", "pack:65536"],
     [64, 72, 80, 96, 128], ["fwd", "bwd", "fwd_bwd"], list(PROVIDERS)),
)


SWEEP = {  # candidate configurations (BLOCK_M, BLOCK_N, warps, stages) per launch kind, for --sweep; the most
    # plausible first (--sweep-max keeps a prefix)
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3),
            (64, 128, 4, 3), (128, 32, 4, 4)],
    # dkdv_atomic: the pin at d128 and (since the H200 sweep) at d64 first (M64N128 w8 s3), then the d64 pin before
    # it and the tiles that do not spill at d64
    "dkdv_atomic": [(64, 128, 8, 3), (64, 64, 4, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3),
                    (32, 128, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)],
    # dkdv_tma: the atomic dq's tiles with one bulk tensor reduction per tile (FINEVITI_ATTN_DQ=tma), which shortens
    # the hot loop (d64 w4: 462 against 493 instructions on triton 3.6); kernel report, triton 3.6: none of these
    # spills at d64, at d128 the first four spill 60-88 bytes and M64N64 w8 none (M64N128 w4 spilled 1300-3700
    # bytes and M128N64 w8 overflowed shared memory at d128: left out)
    "dkdv_tma": [(64, 128, 8, 3), (64, 64, 4, 2), (64, 128, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 3)],
    "dkdv": [(64, 128, 8, 2), (64, 64, 8, 2), (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2),
             (128, 128, 8, 2), (16, 128, 4, 4)],
    "dq": [(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (64, 32, 4, 3),
           (128, 128, 8, 2), (64, 128, 8, 2)],
}


def sweep(rec, shape, head_dim, dtype, device, kinds=None, max_candidates=None):
    """Time the candidate configurations of each launch kind (the others at their pinned choice), to pick pins.
    The dk/dv and dq kinds of the deterministic backward run as provider ours_det, dkdv_atomic as ours with
    FINEVITI_ATTN_DQ=atomic (also where the default takes the separate dq, d64), dkdv_tma as ours with
    FINEVITI_ATTN_DQ=tma. Before the first candidate of each provider and mode, one row of its shipped default
    (tag "pinned": at d64 the separate dq for ours), the
    baseline of the same run. The environment is restored however the sweep ends."""
    import os

    best = {}
    pinned_done = set()
    saved = {name: os.environ.get(name) for name in
             ("FINEVITI_ATTN_DQ", *(f"FINEVITI_ATTN_{kind.upper()}_CONFIG" for kind in SWEEP))}

    def restore():
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    try:
        for kind, candidates in SWEEP.items():
            if kinds and kind not in kinds:
                continue
            mode = "fwd" if kind == "fwd" else "bwd"
            provider = "ours_det" if kind in ("dkdv", "dq") else "ours"
            if kind in ("dkdv_atomic", "dkdv_tma") and not kernels.atomic_dq_supported(head_dim, dtype):
                print(f"sweep {shape} d{head_dim} {kind}: skipped (no atomic dq at this head dim)")
                continue
            if kind == "dkdv_tma" and kernels.split_head_dim(head_dim, dtype)[1] > 0:
                print(f"sweep {shape} d{head_dim} dkdv_tma: skipped (two pieces take the element-wise atomics)")
                continue
            if (provider, mode) not in pinned_done:
                pinned_done.add((provider, mode))
                run_case(rec, provider, shape, head_dim, mode, dtype, device, tag="pinned")
            if kind in ("dkdv_atomic", "dkdv_tma"):
                os.environ["FINEVITI_ATTN_DQ"] = kind.removeprefix("dkdv_")
            timings = []
            for cfg in candidates[:max_candidates]:
                os.environ[f"FINEVITI_ATTN_{kind.upper()}_CONFIG"] = ",".join(map(str, cfg))
                before = len(rec.rows)
                tag = f"{kind}=M{cfg[0]}N{cfg[1]}w{cfg[2]}s{cfg[3]}"
                run_case(rec, provider, shape, head_dim, mode, dtype, device, tag=tag)
                row = rec.rows[before] if len(rec.rows) > before else {}
                if "median_ms" in row:
                    timings.append((row["median_ms"], cfg))
            restore()  # the next kind runs at the caller's settings
            if timings:
                best[kind] = min(timings)
    finally:
        restore()
    for kind, (ms, cfg) in best.items():
        print(f"sweep {shape} d{head_dim} {kind}: best {cfg} at {ms:.3f} ms (mode {'fwd' if kind == 'fwd' else 'bwd'})")


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    rows = [r for r in rows if r.get("tflops") and r["mode"] == "fwd_bwd"]
    cases = sorted({(r["shape"]["shape"], r["shape"]["head_dim"]) for r in rows}, key=str)
    providers = sorted({r["provider"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.9), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        values = [next((r["tflops"] for r in rows if r["provider"] == provider
                        and (r["shape"]["shape"], r["shape"]["head_dim"]) == c), 0) for c in cases]
        ax.bar([x + i * width for x in range(len(cases))], values, width, label=provider)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))])
    ax.set_xticklabels([f"{s}\nd{d}" for s, d in cases], fontsize=7)
    ax.set_ylabel("TFLOP/s (fwd+bwd)")
    ax.legend(fontsize=7)
    ax.set_title(f"varlen attention, {rows[0]['dtype'] if rows else ''}, {rows[0]['gpu'] if rows else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the fixed set the GPU check runs")
    parser.add_argument("--provider", choices=PROVIDERS, action="append")
    parser.add_argument("--shape", action="append", help="fa3:SEQLEN or pack:TOTAL (repeatable)")
    parser.add_argument("--head-dim", type=int, action="append")
    parser.add_argument("--mode", choices=("fwd", "bwd", "fwd_bwd"), action="append")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--once", action="store_true", help="run each case once without timing (for profilers)")
    parser.add_argument("--plot", help="write a PNG of fwd+bwd TFLOP/s per provider here")
    parser.add_argument("--sweep", action="store_true",
                        help="time the candidate configurations of each kernel at --shape/--head-dim (ours only)")
    parser.add_argument("--sweep-kind", choices=tuple(SWEEP), action="append", help="only these launch kinds")
    parser.add_argument("--sweep-max", type=int, help="only the first N candidates of each kind")
    parser.add_argument("--profile", action="store_true",
                        help="GPU time per kernel and wall time per call at --shape/--head-dim/--mode/--provider "
                             "(default ours and torch_varlen, fwd and bwd; GPU only)")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here (the default: cpu)")
    dtype = cpu_dtype(getattr(torch, args.dtype), args.device)
    explicit = bool(args.provider or args.shape or args.head_dim or args.mode)
    if explicit:
        plan = ((args.shape or ["fa3:4096"], args.head_dim or [64], args.mode or ["fwd_bwd"],
                 args.provider or ["ours"]),)
    else:
        plan = QUICK if args.quick else FULL
    if args.profile:
        if args.device != "cuda":
            parser.error("--profile needs a GPU")
        rec = Recorder("attention_profile")
        for shape in args.shape or ["fa3:1024"]:
            for head_dim in args.head_dim or [64]:
                for mode in args.mode or ["fwd", "bwd"]:
                    for provider in args.provider or ["ours", "torch_varlen"]:
                        profile_case(rec, provider, shape, head_dim, mode, dtype, args.device)
        return
    rec = Recorder("attention")
    if args.sweep:
        for shape in args.shape or ["fa3:4096"]:
            for head_dim in args.head_dim or [64, 128]:
                sweep(rec, shape, head_dim, dtype, args.device, args.sweep_kind, args.sweep_max)
        _exit_if_wrong()
        return
    if args.device == "cpu" and not explicit:  # a smoke check of the code path: toy size, fp32, 2 heads
        provider = "ours" if _interpreting() else "sdpa_mask"
        why = "Triton's interpreter" if provider == "ours" else "TRITON_INTERPRET=0: ours left out"
        print(f"on the CPU: one toy case of {provider} ({why}) as a smoke check; --provider, --shape, --head-dim "
              f"and --mode choose others")
        run_case(rec, provider, "pack:200", 64, "fwd_bwd", torch.float32, "cpu", once=args.once, heads=2)
        plan = ()
    for shapes, head_dims, modes, providers in plan:
        for shape in shapes:
            for head_dim in head_dims:
                for mode in modes:
                    for provider in providers:
                        run_case(rec, provider, shape, head_dim, mode, dtype, args.device, once=args.once)
    if args.plot:
        plot(rec.rows, args.plot)
    _print_ratios(rec.rows)
    _exit_if_wrong()


def _exit_if_wrong() -> None:
    from common import exit_if_wrong

    exit_if_wrong("bench_attention", WRONG)


def _interpreting() -> bool:

    from fineviti._checks import triton_interpreting

    return triton_interpreting()


def _print_ratios(rows):
    ours = {(r["shape"]["shape"], r["shape"]["head_dim"], r["mode"]): r for r in rows
            if r["provider"] == "ours" and "median_ms" in r}
    for r in rows:
        key = (r["shape"].get("shape"), r["shape"].get("head_dim"), r["mode"])
        if r["provider"] != "ours" and "median_ms" in r and key in ours:
            ratio = r["median_ms"] / ours[key]["median_ms"]
            print(f"ratio {key[0]:18s} d{key[1]:<4d} {key[2]:8s} ours is {ratio:5.2f}x as fast as {r['provider']}")


if __name__ == "__main__":
    main()

"""Contrastive losses (SigLIP, CLIP): ours (Triton) against the naive reference (full N x N logits), the chunked torch
path and torch.compile of the reference; forward and forward+backward time and peak memory.

TFLOP/s count the logit matmuls a plain implementation does: forward 2*N*N*D (img @ txt.T), forward+backward
6*N*N*D (also the d_img and d_txt products). Work a fused implementation adds is not counted (our CLIP backward
recomputes the logits, +2*N*N*D; our SigLIP computes its gradients in the forward's own pass and adds nothing), so
TFLOP/s compare wall time for the same useful work, as FlashAttention's figures do. Peak memory is
what the call allocates beyond its inputs (features, scale, bias), gradients included. The naive and compiled
references are skipped where their logits would not fit.

    python benchmarks/bench_contrastive.py                       # the sweep: N 4k..128k, D 768 and 1152, bf16
    python benchmarks/bench_contrastive.py --quick               # a fixed small set (part of the GPU check)
    python benchmarks/bench_contrastive.py --provider ours --n 65536 --d 768 --loss clip --mode full
    python benchmarks/bench_contrastive.py --sweep-configs       # block-size candidates for our kernels
    python benchmarks/bench_contrastive.py --profile --n 16384   # where one step of ours spends its GPU time
    python benchmarks/bench_contrastive.py --quick --device cpu  # tiny shapes on a CPU (Triton interpreted)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fineviti._checks import triton_interpreting  # noqa: E402

PROVIDERS = ("ours", "ours_gemm", "naive", "chunked", "compiled")
MODES = ("fwd", "full")
LOSSES = ("siglip", "clip")
SWEEP_N = (4096, 8192, 16384, 32768, 65536, 131072)
SWEEP_D = (768, 1152)
# (N, D) of the GPU check: the baselines at the first only; D = 1152 (SigLIP So400m's width) for the peak fraction
QUICK = [(16384, 768), (65536, 768), (16384, 1152)]
QUICK_CPU = [(256, 64)]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# bytes per logit a provider keeps alive at its peak (forward + backward, 16-bit inputs), for the skip rule
_BYTES_PER_LOGIT = {"naive": 14, "compiled": 6}


def make_inputs(n: int, d: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(img + torch.randn(n, d, device=device, generator=gen), dim=-1)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_(), scale, bias


_COMPILED = {}


def loss_fn(provider: str, loss: str):
    from fineviti.ops import contrastive as C

    if provider == "compiled":
        if loss not in _COMPILED:
            ref = C.siglip_loss_ref if loss == "siglip" else C.clip_loss_ref
            _COMPILED[loss] = torch.compile(ref, dynamic=False)
        fn = _COMPILED[loss]
        return (lambda i, t, s, b: fn(i, t, s, b)) if loss == "siglip" else (lambda i, t, s, b: fn(i, t, s))
    backend = {"ours": "triton", "ours_gemm": "triton", "naive": "reference", "chunked": "chunked"}[provider]
    if provider == "ours_gemm":  # the dot products of the gradient pass from cuBLAS (C.logits_mode)
        return _with_logits_mode("gemm", loss_fn("ours", loss))
    if loss == "siglip":
        return lambda i, t, s, b: C.siglip_loss(i, t, s, b, backend=backend)
    return lambda i, t, s, b: C.clip_loss(i, t, s, backend=backend)


def _with_logits_mode(mode: str, fn):
    """fn run with FINEVITI_LOSS_LOGITS=mode (the backward too: the mode is read when the gradient pass runs)."""
    from fineviti.ops import contrastive as C

    def run(*args):
        with C.using_logits_mode(mode):
            out = fn(*args)
        return _LogitsModeLoss(out, mode) if out.requires_grad else out
    return run


class _LogitsModeLoss:
    """A loss whose backward() also runs under the mode (CLIP's gradient pass runs in its backward)."""

    def __init__(self, loss, mode):
        self.loss, self.mode = loss, mode

    def backward(self):
        from fineviti.ops import contrastive as C

        with C.using_logits_mode(self.mode):
            self.loss.backward()


def skip_reason(provider: str, n: int, device: torch.device) -> str | None:
    if provider.startswith("ours") and device.type != "cuda" and not triton_interpreting():
        return "Triton needs a GPU (or TRITON_INTERPRET=1)"
    if provider in _BYTES_PER_LOGIT and device.type == "cuda":
        need = _BYTES_PER_LOGIT[provider] * n * n
        free = torch.cuda.mem_get_info(device)[0]
        if need > 0.85 * free:
            return f"would not fit: about {need / 2**30:.0f} GiB of logits and their gradients, {free / 2**30:.0f} free"
    return None


# Our rows (every sweep candidate too) are checked before they are timed: the loss and, in mode "full", the
# gradients of the features, the scale and the bias against the chunked torch backend on the same inputs, as
# relative errors. A wrong result is an error row and a non-zero exit (the GPU check's section fails), not a time.
WRONG: list[str] = []  # the cases that failed their check, for main's exit status


def check_errors(fn, loss, mode, img, txt, scale, bias) -> dict[str, float]:
    """{quantity: relative error} of `fn` against the chunked backend on the same inputs."""
    results = []
    for call in (fn, loss_fn("chunked", loss)):
        for t in (img, txt, scale, bias):
            t.grad = None
        out = call(img, txt, scale, bias)
        value = out.loss if isinstance(out, _LogitsModeLoss) else out
        got = {"loss": value.detach().float()}
        if mode == "full":
            out.backward()
            got.update({name: t.grad.detach().float() for name, t in
                        (("d_img", img), ("d_txt", txt), ("d_scale", scale), ("d_bias", bias)) if t.grad is not None})
        results.append(got)
    for t in (img, txt, scale, bias):
        t.grad = None
    ours, ref = results
    from benchmarks.common import relative_error

    # the scalars (loss, d_scale, d_bias) against at least 1e-3: a gradient near zero would make any rounding huge
    return {name: relative_error(ours[name], ref[name], 1e-3 if ref[name].dim() == 0 else 1e-30) for name in ref}


def run_case(rec, provider, loss, mode, n, d, dtype_name, device, label=None):
    from benchmarks.common import CHECK_TOLERANCE, bench, record_if_wrong

    label = label or provider
    shape = {"loss": loss, "N": n, "D": d}
    reason = skip_reason(provider, n, device)
    if reason:
        rec.error(provider=label, mode=mode, shape=shape, dtype=dtype_name, error=f"skipped: {reason}")
        return
    img, txt, scale, bias = make_inputs(n, d, _DTYPES[dtype_name], device)
    fn = loss_fn(provider, loss)

    def forward():
        with torch.no_grad():
            fn(img, txt, scale, bias)

    def full():
        for t in (img, txt, scale, bias):
            t.grad = None
        fn(img, txt, scale, bias).backward()

    try:
        if provider.startswith("ours"):
            errors = check_errors(fn, loss, mode, img, txt, scale, bias)
            if record_if_wrong(rec, WRONG, f"{label} {loss} {mode} N={n} D={d}", errors,
                               CHECK_TOLERANCE[_DTYPES[dtype_name]], "the chunked backend", provider=label,
                               mode=mode, shape=shape, dtype=dtype_name):
                return
        timing = bench(forward if mode == "fwd" else full)
    except torch.cuda.OutOfMemoryError as exc:
        rec.error(provider=label, mode=mode, shape=shape, dtype=dtype_name, error=f"out of memory: {exc}"[:300])
        return
    finally:
        for t in (img, txt, scale, bias):
            t.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flops = (2 if mode == "fwd" else 6) * n * n * d
    rec.add(provider=label, mode=mode, shape=shape, dtype=dtype_name, timing=timing,
            tflops=flops / (timing["median_ms"] * 1e-3) / 1e12)


def matmul_ceiling(rec, n, d, dtype_name, device):
    """The logit matmul alone through torch (cuBLAS): img @ txt.T, (n, d) x (d, n), output in the input dtype. Its
    TFLOP/s is the ceiling the loss kernels' matmul share is read against (measured, not the datasheet's)."""
    from benchmarks.common import bench

    img, txt, _, _ = make_inputs(n, d, _DTYPES[dtype_name], device)
    img, txt = img.detach(), txt.detach()
    out = torch.empty(n, n, device=device, dtype=img.dtype)
    timing = bench(lambda: torch.matmul(img, txt.T, out=out))
    rec.add(provider="matmul_ceiling", mode="fwd", shape={"N": n, "D": d}, dtype=dtype_name, timing=timing,
            tflops=2 * n * n * d / (timing["median_ms"] * 1e-3) / 1e12)


def sweep_configs(rec, n, d, dtype_name, device):
    """The gradient kernels (SigLIP's with its loss sum, CLIP's without) at block-size candidates, the forwards at
    their pins, whole-loss fwd+bwd times per loss; the pinned configuration itself first ("ours[pinned]") and last
    ("ours[pinned again]"), so that every candidate is read against rows of the same run (the launcher's config is
    patched per run)."""
    from fineviti.kernels import contrastive as kc

    default = kc.config
    # The H200 run of 2026-11-28 patched every kernel at once and had no pinned row (its baseline came from another
    # section, 2.915 / 4.165 ms): 128 x 64 over 4 warps (2.622 ms, SigLIP) and 128 x 128 over 8 (2.625 SigLIP,
    # 3.854 CLIP) looked 7-10% faster. With the loss sum, both spill on sm_90 (kernel report: 92-136 and 40-48 bytes,
    # triton 3.6 and 3.8); CLIP's gradient kernel does not at either. 64 x 128 over 4 warps spills 32-40 there.
    # The flattened loops ("flat": the gradient kernel persistent) lost 15-33% on an H100 and run on request.
    # First: the pinned tile with its registers capped at 128 ("r128"), two programs per SM instead of one. Kernel
    # report, bf16, D 64-1152, triton 3.6 (the GPU machines'): SigLIP's gradient with its loss sum 153 -> 128
    # registers and CLIP's 140 -> 128, no spills (triton 3.8: SigLIP's spills 24 bytes). Both kernels alternate an
    # issue-bound epilogue with the matmul in one program per SM: the second program can fill the gaps.
    candidates = [
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4, "maxnreg": 128},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    ]
    if os.environ.get("FINEVITI_SWEEP_FLAT"):
        candidates += [{"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4,
                        "PERSISTENT": True}]

    def patched(cfg):
        def config(d, dtype, kernel="bwd", loss="siglip"):
            return {**default(d, dtype, kernel, loss), **cfg} if kernel.startswith("bwd") else default(
                d, dtype, kernel, loss)
        return config

    # the pinned configuration first and again last: the two rows bracket the candidates and show the run's drift;
    # right after the first, the pinned tiles with the gradient pass's dot products from cuBLAS instead
    # (FINEVITI_LOSS_LOGITS=gemm, ninth session: cuBLAS ran the same product at about 800 TFLOP/s against the fused
    # kernel's 233 on the H200, for an fp32 block written and read once)
    runs = [("ours[pinned]", default), ("ours[gemm logits]", default)] + [
        ("ours[grad {BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages}".format(**cfg)
         + (f" r{cfg['maxnreg']}" if cfg.get("maxnreg") else "")
         + (" flat]" if cfg.get("PERSISTENT") else "]"), patched(cfg)) for cfg in candidates] + [
        ("ours[pinned again]", default)]
    try:
        for label, config in runs:
            kc.config = config
            provider = "ours_gemm" if label == "ours[gemm logits]" else "ours"
            for loss in LOSSES:
                try:
                    run_case(rec, provider, loss, "full", n, d, dtype_name, device, label=label)
                except Exception as exc:  # a config that does not compile or fit: say so, go on
                    rec.error(provider=label, mode="full", shape={"loss": loss, "N": n, "D": d},
                              dtype=dtype_name, error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        kc.config = default


def profile_steps(n, d, dtype_name, device, steps=5):
    """One forward+backward of our loss, repeated `steps` times under torch.profiler: the GPU time per step of each
    kernel (ours, cuBLAS, elementwise), so that the loss's time can be split between the Triton passes and the
    products. Rows go to benchmark "contrastive_profile" (median_ms: that kernel's time per step)."""
    from benchmarks.common import Recorder

    rec = Recorder("contrastive_profile")
    for logits, provider in (("fused", "ours"), ("gemm", "ours_gemm")):  # FINEVITI_LOSS_LOGITS, both modes
        for loss in LOSSES:
            per_kernel = _kernel_times(loss, n, d, dtype_name, device, steps, provider)
            total = sum(per_kernel.values())
            shape = {"loss": loss, "N": n, "D": d, "logits": logits}
            for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]:
                rec.add(provider=name[:60], mode="full", shape=shape, dtype=dtype_name,
                        timing={"median_ms": ms}, share=ms / total if total else None)
            print(f"contrastive_profile {loss} ({logits} logits): {total:.3f} ms of GPU kernels per step over "
                  f"{len(per_kernel)} kernels")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _kernel_times(loss, n, d, dtype_name, device, steps, provider="ours") -> dict[str, float]:
    """{kernel name: GPU ms per step} of `steps` forward+backward steps of `provider`'s `loss`."""
    from benchmarks import common

    img, txt, scale, bias = make_inputs(n, d, _DTYPES[dtype_name], device)
    fn = loss_fn(provider, loss)

    def step():
        for t in (img, txt, scale, bias):
            t.grad = None
        fn(img, txt, scale, bias).backward()

    return common.gpu_kernel_times(step, steps)[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the fixed small set of the GPU check")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--provider", choices=PROVIDERS, action="append", help="run only these providers")
    parser.add_argument("--loss", choices=LOSSES, action="append", help="run only these losses")
    parser.add_argument("--mode", choices=MODES, action="append", help="run only these modes")
    parser.add_argument("--n", type=int, action="append", help="batch sizes N")
    parser.add_argument("--d", type=int, action="append", help="feature widths D")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default=None,
                        help="default bf16 on a GPU, fp32 on a CPU (the interpreter's bf16 dot products are wrong)")
    parser.add_argument("--sweep-configs", action="store_true", help="block-size candidates of our kernels")
    parser.add_argument("--profile", action="store_true", help="GPU time per kernel of one step of ours (GPU only)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (the default: cpu)")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    from benchmarks.common import Recorder

    rec = Recorder("contrastive")
    if args.profile:
        if device.type != "cuda":
            parser.error("--profile needs a GPU")
        profile_steps((args.n or [16384])[0], (args.d or [768])[0], args.dtype, device)
        return
    if args.sweep_configs:
        sweep_configs(rec, (args.n or [32768])[0], (args.d or [768])[0], args.dtype, device)
        _exit_if_wrong()
        return
    if args.n or args.d:
        shapes = [(n, d) for n in (args.n or [16384]) for d in (args.d or [768])]
    elif args.quick:
        shapes = QUICK if device.type == "cuda" else QUICK_CPU
    else:
        shapes = [(n, d) for d in SWEEP_D for n in SWEEP_N] if device.type == "cuda" else QUICK_CPU
    providers = args.provider or list(PROVIDERS)
    modes = args.mode or (["full"] if args.quick else list(MODES))
    if device.type == "cuda" and not args.provider:
        matmul_ceiling(rec, shapes[0][0], shapes[0][1], args.dtype, device)
        torch.cuda.empty_cache()
    for n, d in shapes:
        for loss in args.loss or LOSSES:
            for provider in providers:
                if shapes is QUICK and provider != "ours" and (n, d) != QUICK[0]:
                    continue  # the GPU check's time: the baselines at the first shape only
                for mode in modes:
                    try:
                        run_case(rec, provider, loss, mode, n, d, args.dtype, device)
                    except Exception as exc:  # one provider failing must not hide the others' rows
                        rec.error(provider=provider, mode=mode, shape={"loss": loss, "N": n, "D": d},
                                  dtype=args.dtype, error=f"{type(exc).__name__}: {exc}"[:300])
    _exit_if_wrong()


def _exit_if_wrong() -> None:
    from benchmarks.common import exit_if_wrong

    exit_if_wrong("bench_contrastive", WRONG)


if __name__ == "__main__":
    main()

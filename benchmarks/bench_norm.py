"""RMSNorm: ours (Triton, fineviti.ops.rms_norm) against the eager torch expression the towers used
(rms_norm_ref: fp32 statistic), torch's own F.rms_norm where this torch has it, and torch.compile of the reference.

Rows are GB/s of the bytes a fused norm must move: forward x read and y written (x's dtype) and the fp32 row
statistic; forward + backward adds x and dy read and dx written. Modes: fwd, full (forward and backward, random
upstream gradients). Inputs are bf16 activations with an fp32 weight, as under autocast in the towers; rows carry
peak memory on a GPU.

    python benchmarks/bench_norm.py --quick     # a fixed small set (part of the GPU check)
    python benchmarks/bench_norm.py --rows 65536 --width 1024 --provider ours --mode full
On a CPU it runs tiny shapes of the providers that run there (not torch.compile) as a smoke check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import Recorder, bench  # noqa: E402
from fineviti.ops import norm  # noqa: E402

PROVIDERS = ("ours", "torch_eager", "torch_fused", "torch_compile")
MODES = ("fwd", "full")
EPS = 1e-6
_COMPILED = {}


def torch_fused(x, weight, eps):
    """torch's F.rms_norm on x upcast to fp32 (the towers' semantics: the statistic and product in fp32)."""
    return torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


def provider_fn(provider):
    if provider == "ours":
        return lambda x, w: norm.rms_norm(x, w, EPS, backend="triton")
    if provider == "torch_eager":
        return lambda x, w: norm.rms_norm_ref(x, w, EPS)
    if provider == "torch_fused":
        return lambda x, w: torch_fused(x, w, EPS)
    if "ref" not in _COMPILED:
        _COMPILED["ref"] = torch.compile(norm.rms_norm_ref, dynamic=False)
    return lambda x, w: _COMPILED["ref"](x, w, EPS)


def available(provider, device) -> str | None:
    if provider == "ours" and device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "needs a GPU (or TRITON_INTERPRET=1)"
    if provider == "torch_fused" and not hasattr(torch.nn.functional, "rms_norm"):
        return "this torch has no F.rms_norm"
    if provider == "torch_compile" and device.type != "cuda":
        return "torch.compile's CPU code generation takes minutes here; GPU only"
    return None


def run_case(rec, provider, mode, rows, width, dtype, device):
    x = torch.randn(rows, width, device=device, dtype=dtype)
    weight = (1 + 0.1 * torch.randn(width, device=device)).requires_grad_(mode == "full")
    fn = provider_fn(provider)
    shape = {"rows": rows, "width": width}
    dtype_name = str(dtype).replace("torch.", "")
    itemsize = x.element_size()
    if mode == "fwd":
        moved = rows * width * 2 * itemsize + rows * 4

        def step():
            with torch.no_grad():
                fn(x, weight)
    else:
        x.requires_grad_(True)
        dy = torch.randn_like(x)
        moved = rows * width * 5 * itemsize + rows * 8  # fwd: x, y; bwd: x, dy, dx; the statistic twice

        def step():
            y = fn(x, weight)
            torch.autograd.grad(y, (x, weight), dy)
    try:
        timing = bench(step)
    except Exception as exc:  # noqa: BLE001 (one provider's failure is a row, not the end of the run)
        rec.error(provider=provider, mode=mode, shape=shape, dtype=dtype_name, error=f"{type(exc).__name__}: {exc}")
        return None
    return rec.add(provider=provider, mode=mode, shape=shape, dtype=dtype_name, timing=timing,
                   gbps=moved / (timing["median_ms"] * 1e-3) / 1e9)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the fixed small set of the GPU check")
    parser.add_argument("--provider", choices=PROVIDERS, action="append", help="run only these providers")
    parser.add_argument("--rows", type=int, action="append", help="rows (tokens); default 16k and 64k")
    parser.add_argument("--width", type=int, action="append", help="widths; default 768, 1024, 1152, 1536")
    parser.add_argument("--mode", choices=MODES, action="append")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if on_gpu else torch.float32  # the interpreter is wrong in bf16
    rec = Recorder("rms_norm")
    if args.quick:
        rows_list, widths = ([65536] if on_gpu else [64]), ([768, 1152] if on_gpu else [96])
    else:
        rows_list = args.rows or ([16384, 65536] if on_gpu else [64])
        widths = args.width or ([768, 1024, 1152, 1536] if on_gpu else [96])
    providers = args.provider or list(PROVIDERS)
    for rows in rows_list:
        for width in widths:
            for provider in providers:
                reason = available(provider, device)
                if reason:
                    if args.provider:
                        print(f"rms_norm     {provider:16s} skipped: {reason}")
                    continue
                for mode in args.mode or MODES:
                    run_case(rec, provider, mode, rows, width, dtype, device)


if __name__ == "__main__":
    main()

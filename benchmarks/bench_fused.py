"""The towers' fused elementwise ops, ours (Triton) against the eager torch expressions they replace and torch's
fused alternatives:

- rms_norm: fineviti.ops.rms_norm against the eager expression the towers used (rms_norm_ref: fp32 statistic),
  torch's F.rms_norm on the fp32 upcast, and torch.compile of the reference;
- swiglu: fineviti.ops.swiglu (silu(gate) * up of one Linear's [gate | up] output) against the eager
  `F.silu(gate) * up` (swiglu_ref) and torch.compile of it.

Rows are GB/s of the bytes a fused op must move in 16-bit activations: rms_norm forward x read, y written and the
fp32 row statistic, plus x and dy read and dx written backward; swiglu forward [gate | up] read and h written, plus
dh and [gate | up] read and d[gate | up] written backward. Modes: fwd, full (forward and backward, random upstream
gradients). rms_norm takes an fp32 weight, as under autocast in the towers. Rows carry peak memory on a GPU.

    python benchmarks/bench_fused.py --quick     # a fixed small set (part of the GPU check)
    python benchmarks/bench_fused.py --op swiglu --rows 65536 --width 2816 --provider ours --mode full
On a CPU it runs tiny shapes of the providers that run there (not torch.compile) as a smoke check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CHECK_TOLERANCE,
    Recorder,
    exit_if_wrong,
    record_if_wrong,
    relative_error,
)
from fineviti._checks import triton_interpreting  # noqa: E402
from fineviti.ops import glu, norm  # noqa: E402

OPS = ("rms_norm", "swiglu")
PROVIDERS = {"rms_norm": ("ours", "torch_eager", "torch_fused", "torch_compile"),
             "swiglu": ("ours", "torch_eager", "torch_compile")}
MODES = ("fwd", "full")
EPS = 1e-6
_COMPILED = {}


def torch_fused_norm(x, weight):
    """torch's F.rms_norm on x upcast to fp32 (the towers' semantics: the statistic and product in fp32)."""
    return torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), weight, EPS).to(x.dtype)


def provider_fn(op, provider):
    """fn(*inputs) of `provider` for `op`: rms_norm takes (x, weight), swiglu (gate_up,)."""
    if op == "rms_norm":
        fns = {"ours": lambda x, w: norm.rms_norm(x, w, EPS, backend="triton"),
               "torch_eager": lambda x, w: norm.rms_norm_ref(x, w, EPS), "torch_fused": torch_fused_norm}
        ref = lambda x, w: norm.rms_norm_ref(x, w, EPS)  # noqa: E731
    else:
        fns = {"ours": lambda g: glu.swiglu(g, backend="triton"), "torch_eager": glu.swiglu_ref}
        ref = glu.swiglu_ref
    if provider != "torch_compile":
        return fns[provider]
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(ref, dynamic=False)
    return _COMPILED[op]


def available(provider, device) -> str | None:
    if provider == "ours" and device.type != "cuda" and not triton_interpreting():
        return "needs a GPU (or TRITON_INTERPRET=1)"
    if provider == "torch_fused" and not hasattr(torch.nn.functional, "rms_norm"):
        return "this torch has no F.rms_norm"
    if provider == "torch_compile" and device.type != "cuda":
        return "torch.compile's CPU code generation takes minutes here; GPU only"
    return None


def make_inputs(op, rows, width, dtype, device, grad):
    """The op's inputs (a (rows, width) x and its weight; a (rows, 2 * width) [gate | up]), the upstream gradient
    and the bytes a fused forward (and backward) moves."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if op == "rms_norm":
        x = torch.randn(rows, width, device=device, dtype=dtype).requires_grad_(grad)
        weight = (1 + 0.1 * torch.randn(width, device=device)).requires_grad_(grad)
        fwd_bytes, bwd_bytes = rows * width * 2 * itemsize + rows * 4, rows * width * 3 * itemsize + rows * 4
        return (x, weight), torch.randn_like(x), fwd_bytes, bwd_bytes
    gate_up = torch.randn(rows, 2 * width, device=device, dtype=dtype).requires_grad_(grad)
    fwd_bytes, bwd_bytes = rows * width * 3 * itemsize, rows * width * 5 * itemsize
    return (gate_up,), torch.randn(rows, width, device=device, dtype=dtype), fwd_bytes, bwd_bytes


WRONG: list[str] = []  # ours' cases that failed their check (below), for main's exit status


def check_errors(op, fn, inputs, dy, mode) -> dict[str, float]:
    """{quantity: relative error} of `fn` against the op's eager reference on the same inputs: the output and, in
    mode "full", the gradient of every input."""
    ref_fn = (lambda x, w: norm.rms_norm_ref(x, w, EPS)) if op == "rms_norm" else glu.swiglu_ref
    names = ("dx", "dweight") if op == "rms_norm" else ("dgate_up",)
    results = []
    for call in (fn, ref_fn):
        out = call(*inputs)
        got = {"out": out.detach()}
        if mode == "full":
            got.update(zip(names, torch.autograd.grad(out, inputs, dy), strict=True))
        results.append(got)
    return {name: relative_error(results[0][name], want) for name, want in results[1].items()}


def run_case(rec, op, provider, mode, rows, width, dtype, device):
    inputs, dy, fwd_bytes, bwd_bytes = make_inputs(op, rows, width, dtype, device, mode == "full")
    fn = provider_fn(op, provider)
    shape = {"rows": rows, "width": width}
    dtype_name = str(dtype).replace("torch.", "")
    if provider == "ours":  # checked before it is timed: a wrong result is an error row and a non-zero exit
        errors = check_errors(op, fn, inputs, dy, mode)
        if record_if_wrong(rec, WRONG, f"{op} {mode} rows={rows} width={width}", errors, CHECK_TOLERANCE[dtype],
                           "the eager reference", provider=provider, mode=mode, shape=shape, dtype=dtype_name):
            return None
    if mode == "fwd":
        moved = fwd_bytes

        def step():
            with torch.no_grad():
                fn(*inputs)
    else:
        moved = fwd_bytes + bwd_bytes
        leaves = [t for t in inputs if t.requires_grad]

        def step():
            torch.autograd.grad(fn(*inputs), leaves, dy)
    return rec.measure(step, provider=provider, mode=mode, shape=shape, dtype=dtype_name, moved_bytes=moved)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the fixed small set of the GPU check")
    parser.add_argument("--op", choices=OPS, action="append", help="only these ops (default both)")
    parser.add_argument("--provider", choices=PROVIDERS["rms_norm"], action="append", help="only these providers")
    parser.add_argument("--rows", type=int, action="append", help="rows (tokens); default 16k and 64k")
    parser.add_argument("--width", type=int, action="append",
                        help="the norm's width or SwiGLU's hidden size; defaults: the presets' widths")
    parser.add_argument("--mode", choices=MODES, action="append")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if on_gpu else torch.float32  # the interpreter is unreliable in bf16
    default_widths = {"rms_norm": [768, 1024, 1152, 1536], "swiglu": [2048, 2816, 4608]}
    quick_widths = {"rms_norm": [768, 1152], "swiglu": [2048, 2816]}
    if args.quick and (args.rows or args.width):
        print("--quick runs its fixed rows and widths: --rows and --width not used")
    if not on_gpu and args.dtype != "float32":
        print("on the CPU: float32 (Triton's interpreter computes 16-bit arithmetic wrongly)")
    for op in args.op or OPS:
        rec = Recorder(op)
        if args.quick:
            rows_list, widths = ([65536] if on_gpu else [64]), (quick_widths[op] if on_gpu else [96])
        else:
            rows_list = args.rows or ([16384, 65536] if on_gpu else [64])
            widths = args.width or (default_widths[op] if on_gpu else [96])
        for rows in rows_list:
            for i, width in enumerate(widths):
                for provider in args.provider or PROVIDERS[op]:
                    if provider not in PROVIDERS[op]:
                        continue
                    if provider == "torch_compile" and args.quick and i > 0:
                        continue  # each width and mode compiles anew: the quick set compiles the first width only
                    reason = available(provider, device)
                    if reason:
                        print(f"{op:12s} {provider:16s} skipped: {reason}")
                        continue
                    for mode in args.mode or MODES:
                        run_case(rec, op, provider, mode, rows, width, dtype, device)
    exit_if_wrong("bench_fused", WRONG)


if __name__ == "__main__":
    main()

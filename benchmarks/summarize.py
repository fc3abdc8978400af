"""Gather the GPU check's rows into results.json and summary.md.

  python benchmarks/summarize.py WORKDIR OUTDIR

WORKDIR holds rows.jsonl (one row per measurement, written by benchmarks/common.Recorder) and sections.jsonl
(the wall time and exit code of each section of benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import comparable, one_timer  # noqa: E402
from fineviti.train.metrics import peak_tflops  # noqa: E402 (the one table of GPU peaks, MFU's too)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def _shape_text(shape: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def _fmt(value, digits=2):
    return "" if value is None else f"{value:.{digits}f}"


def summary_markdown(rows: list[dict], sections: list[dict]) -> str:
    env = next((r for r in rows), {})
    lines = ["# GPU check", ""]
    if env:
        lines += [f"GPU {env.get('gpu')}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')},"
                  f" Python {env.get('python')}; commit {env.get('commit')}; {env.get('date')}.", ""]
    lines += ["## Sections", "", "| section | exit code | wall s |", "|---|---:|---:|"]
    lines += [f"| {s['section']} | {s['rc']} | {_fmt(s.get('wall_s'), 1)} |" for s in sections]
    goals = goal_rows(rows)
    if goals:
        lines += ["", "## Goals of the open issues, as these rows measure them", "",
                  "| issue | goal | measured | verdict |", "|---:|---|---|---|"]
        lines += [f"| {i} | {g} | {m} | {v} |" for i, g, m, v in goals]
    sweeps = sweep_verdicts(rows)
    if sweeps:
        lines += ["", "## Sweeps: the best candidate of each launch kind against the pinned default (attention and "
                  "the loss kernels)", "",
                  "(same run and shape; the other kernels at their pins; above 1: the candidate is faster, a case for "
                  "pinning it after checking the kernel report)", "",
                  "| shape | mode | provider | kind | pinned ms | best candidate | best ms | pinned / best |",
                  "|---|---|---|---|---:|---|---:|---:|"]
        lines += [f"| {s} | {m} | {p} | {k} | {_fmt(pin, 3)} | {c} | {best:.3f} | {_fmt(ratio)} |"
                  for s, m, p, k, pin, c, best, ratio in sweeps]
    for bench in sorted({r["benchmark"] for r in rows}):
        lines += ["", f"## {bench}", "", "| provider | mode | shape | dtype | median ms | p20-p80 ms | TFLOP/s | GB/s |"
                  " peak MiB |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["benchmark"] == bench):
            if "error" in r:
                lines.append(f"| {r['provider']} | {r['mode']} | {_shape_text(r['shape'])} | {r['dtype']} | "
                             f"error: {r['error'][:120]} | | | | |")
                continue
            lines.append(f"| {r['provider']} | {r['mode']} | {_shape_text(r['shape'])} | {r['dtype']} | "
                         f"{_fmt(r['median_ms'], 3)} | {_fmt(r.get('p20_ms'), 3)}-{_fmt(r.get('p80_ms'), 3)} | "
                         f"{_fmt(r.get('tflops'), 1)} | {_fmt(r.get('gbps'), 0)} | {_fmt(r.get('peak_mem_mb'), 0)} |")
        ratios = ratio_rows([r for r in rows if r["benchmark"] == bench])
        if ratios:
            lines += ["", f"Time of each provider over ours ({bench}; above 1 means ours is faster):", "",
                      "| shape | mode | dtype | provider | ratio |", "|---|---|---|---|---:|"]
            lines += [f"| {_shape_text(s)} | {m} | {d} | {p} | {x:.2f} |" for s, m, d, p, x in ratios]
    return "\n".join(lines) + "\n"


# The issues' goals, read against the rows (issue 3: FlashAttention-3's published fwd+bwd TFLOP/s on its shapes,
# non-causal, 1k-16k tokens, as the issue quotes them; the bf16 dense peak of the GPU: fineviti.train.metrics).
FA3_FWD_BWD_TFLOPS = {64: (370.0, 480.0), 128: (460.0, 580.0)}
VARLEN_SPEEDUP_GOAL = 1.6
ROPE_COPY_FRACTION_GOAL = 0.8
ROPE_EAGER_SPEEDUP_GOAL = 5.0
ROPE_BLOCK_SHARE_GOAL = 0.02
LOSS_PEAK_FRACTION_GOAL = 0.5
LOSS_MEMORY_GOAL_MB = 1024.0


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r and r.get("median_ms") is not None]


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def _attention_goals(rows: list[dict]) -> list[tuple]:
    out = []
    attn = [r for r in _ok(rows) if r["benchmark"] == "attention" and r["mode"] == "fwd_bwd"
            and str(r["shape"].get("shape", "")).startswith("fa3")]
    ours = [r for r in attn if r["provider"] == "ours" and r["shape"].get("head_dim") in FA3_FWD_BWD_TFLOPS]
    for r in ours:
        shape = f"{r['shape']['shape']}, d{r['shape']['head_dim']}, {r['dtype']}"
        low, high = FA3_FWD_BWD_TFLOPS[r["shape"]["head_dim"]]
        tflops = r["tflops"]
        seqlen = r["shape"].get("max_len")  # an fa3 shape's sequence length
        if seqlen is None or 1024 <= seqlen <= 16384:  # the issue quotes FA3 for 1k-16k tokens, on an H100
            verdict = ("met" if tflops >= high else "NOT met" if tflops < low else
                       "inside FA3's range: needs FA3's figure for this length")
            gpu = str(r.get("gpu", ""))
            where = "" if "H100" in gpu.upper() else f" (FA3's H100 figures, this is {gpu or 'another GPU'})"
            out.append((3, f"fwd+bwd >= FA3 ({low:.0f}-{high:.0f} TFLOP/s){where}, {shape}",
                        f"{tflops:.0f} TFLOP/s", verdict))
        # torch's varlen_attn of the same benchmark process where there is one (two sections can time one shape)
        varlen = min((v for v in attn if v["provider"] == "torch_varlen" and v["shape"] == r["shape"]
                      and v["dtype"] == r["dtype"]), key=lambda v: v.get("run") != r.get("run"), default=None)
        if varlen is not None:
            ratio = varlen["median_ms"] / r["median_ms"]
            out.append((3, f">= {VARLEN_SPEEDUP_GOAL}x torch varlen_attn, {shape}", f"{ratio:.2f}x",
                        _verdict(ratio >= VARLEN_SPEEDUP_GOAL)))
    # d72/d80 against padding to 96 (FA3's way; FA3 itself is not installed: our kernels padded to 96 stand in),
    # judged on the path the ops layer ships on a GPU at that head dim, not on a candidate it does not run
    split = [r for r in _ok(rows) if r["benchmark"] == "attention_split"]
    for d in (72, 80):
        label = shipped_split_label(d)
        shipped = next((r for r in split if r["provider"] == label and r["shape"].get("head_dim") == d), None)
        padded = shipped and next((p for p in split if p["provider"] == "padded to 96"
                                   and p["shape"].get("head_dim") == d and p["dtype"] == shipped["dtype"]), None)
        if shipped is not None and padded is not None:
            out.append((3, f"d{d}: more useful TFLOP/s than padding to 96 (FA3's way; FA3 itself not installed: "
                        f"ours padded stands in), the shipped path ({label})",
                        f"{shipped['tflops']:.0f} vs {padded['tflops']:.0f} TFLOP/s",
                        _verdict(shipped["tflops"] > padded["tflops"])))
    return out


def shipped_split_label(head_dim: int) -> str:
    """The split probe's label of what the ops layer runs on a GPU at `head_dim` (bf16, the default split mode
    "masked"): zero-padding to a power of two where fineviti.ops.attention pads it on CUDA, else one masked tile
    ("masked in 128"), else "two-piece" (a power of two: nothing to split)."""
    import torch

    from fineviti.kernels import varlen_attention as kernels
    from fineviti.ops.attention import padded_head_dim_for

    padded = padded_head_dim_for(head_dim, torch.bfloat16, "cuda", "masked")
    if padded != head_dim:
        return f"padded to {padded}"
    dim_a, dim_b = kernels.split_head_dim(head_dim, torch.bfloat16, "masked")
    return f"masked in {dim_a}" if dim_b == 0 and dim_a != head_dim else "two-piece"


def _rope_goals(rows: list[dict]) -> list[tuple]:
    out = []
    rope = [r for r in _ok(rows) if r["benchmark"] == "rope_2d"]
    for r in rope:
        if r["provider"] != "triton" or r["mode"] not in ("fwd", "bwd") or r.get("copy_fraction") is None:
            continue
        shape = f"d{r['shape'].get('head_dim')}, {r['shape'].get('tokens')} tokens, {r['dtype']}"
        out.append((4, f"{r['mode']} >= {ROPE_COPY_FRACTION_GOAL:.0%} of copy bandwidth, {shape}",
                    f"{r['copy_fraction']:.0%}", _verdict(r["copy_fraction"] >= ROPE_COPY_FRACTION_GOAL)))
        if r["mode"] == "fwd" and r.get("stock") == "torch_eager":
            out.append((4, f"fwd >= {ROPE_EAGER_SPEEDUP_GOAL:.0f}x eager, {shape}", f"{r['speedup_vs_stock']:.1f}x",
                        _verdict(r["speedup_vs_stock"] >= ROPE_EAGER_SPEEDUP_GOAL)))
    block = {r["provider"]: r for r in rope if r["provider"].startswith("attn_")}
    rotated = {k: v for k, v in block.items() if k in ("attn_fused_split", "attn_rope_in_kernel", "attn_standalone")}
    # the baseline is "QKV split plus attention": the faster of torch's split and a split at copy bandwidth
    split = {k: v for k, v in block.items() if k in ("attn_no_rope", "attn_triton_split_no_rope")}
    if rotated and split:
        # one timer for every row compared: the CUDA-graph times where all were captured, else all rows' do_bench
        # figures (a variant that could not be captured has only those)
        key, _ = one_timer(*rotated.values(), *split.values())
        timer = "" if key == "median_ms" else "; do_bench times: not every variant was captured in a CUDA graph"
        best, base = (min(g.items(), key=lambda kv: kv[1][key]) for g in (rotated, split))
        share = best[1][key] / base[1][key] - 1
        out.append((4, f"attention block: the rotation adds < {ROPE_BLOCK_SHARE_GOAL:.0%} (fastest rotated variant "
                    "over the fastest QKV split + attention without it)",
                    f"{best[0]} {best[1][key]:.3f} ms over {base[0]} {base[1][key]:.3f} ms: "
                    f"{share:+.1%}{timer}", _verdict(share < ROPE_BLOCK_SHARE_GOAL) + (
                        "" if "attn_triton_split_no_rope" in split else " (against torch's split copy only: these "
                        "rows have no split at copy bandwidth)")))
        views = block.get("attn_views_no_rope")
        if views is not None:
            ours, theirs, _ = comparable(best[1], views)
            share = ours / theirs - 1
            out.append((4, "attention block, for information: fastest rotated variant over attention reading strided "
                        "views (no split at all)", f"{best[0]} {ours:.3f} ms over {theirs:.3f} ms: {share:+.1%}",
                        "not a goal"))
    return out


def _loss_goals(rows: list[dict]) -> list[tuple]:
    out = []
    loss = [r for r in _ok(rows) if r["benchmark"] == "contrastive" and r["mode"] == "full"]
    gpu = str(next((r.get("gpu") for r in rows if r.get("gpu")), ""))
    peak = peak_tflops(gpu)
    for r in loss:
        if r["provider"] != "ours" or r["dtype"] != "bf16":
            continue
        shape = f"{r['shape']['loss']} N={r['shape']['N']} D={r['shape']['D']}"
        if peak is not None and r.get("tflops") is not None:
            out.append((5, f"logit matmuls >= {LOSS_PEAK_FRACTION_GOAL:.0%} of the bf16 peak ({peak:.0f}; 6 N^2 D per "
                        f"step over the whole loss time), {shape}",
                        f"{r['tflops']:.0f} TFLOP/s ({r['tflops'] / peak:.0%})",
                        _verdict(r["tflops"] >= LOSS_PEAK_FRACTION_GOAL * peak)))
        naive = next((n for n in loss if n["provider"] == "naive" and n["shape"] == r["shape"]
                      and n["dtype"] == r["dtype"]), None)
        if naive is not None:
            ratio = naive["median_ms"] / r["median_ms"]
            out.append((5, f"at least as fast as the naive loss, {shape}", f"{ratio:.2f}x", _verdict(ratio >= 1.0)))
        if r["shape"]["N"] >= 65536 and r.get("peak_mem_mb") is not None:
            out.append((5, f"memory beyond the features well under {LOSS_MEMORY_GOAL_MB:.0f} MiB, {shape}",
                        f"{r['peak_mem_mb']:.0f} MiB", _verdict(r["peak_mem_mb"] < LOSS_MEMORY_GOAL_MB)))
    return out


def goal_rows(rows: list[dict]) -> list[tuple]:
    """(issue, goal, measured, verdict) for every goal of issues 3, 4 and 5 that the rows measure."""
    return _attention_goals(rows) + _rope_goals(rows) + _loss_goals(rows)


def sweep_verdicts(rows: list[dict]) -> list[tuple]:
    """(shape, mode, provider, kind, pinned ms or None, best candidate, its ms, pinned / best or None) for each
    launch kind a sweep timed. bench_attention --sweep: rows carry shape["config"], "pinned" for the default and
    "KIND=MxNxwxsx" for a candidate. bench_contrastive --sweep-configs: providers "ours[pinned]" / "ours[pinned
    again]" (before and after the candidates) and "ours[grad MxNxK wW sS]" (the gradient kernels' tile)."""
    entries = []  # (group: (shape text, mode, provider), kind or None for a pinned row, candidate label, ms)
    for r in _ok(rows):
        if r["benchmark"] == "attention" and "config" in r["shape"]:
            text = _shape_text({k: v for k, v in r["shape"].items() if k in ("shape", "head_dim")})
            group = (f"{text}, {r['dtype']}", r["mode"], r["provider"])
            kind, _, label = r["shape"]["config"].partition("=")
            entries.append((group, None, "", r["median_ms"]) if kind == "pinned" else
                           (group, kind, label, r["median_ms"]))
        elif r["benchmark"] == "contrastive" and r["provider"].startswith("ours["):
            group = (f"{_shape_text(r['shape'])}, {r['dtype']}", r["mode"], "ours")
            label = r["provider"][len("ours["):-1]
            if label.startswith("pinned"):
                entries.append((group, None, "", r["median_ms"]))
            else:
                kind, _, tile = label.partition(" ") if label.startswith("grad ") else ("all", "", label)
                entries.append((group, kind, tile, r["median_ms"]))
    return _best_against_pinned(entries)


def _best_against_pinned(entries: list[tuple]) -> list[tuple]:
    """Per (group, kind) the fastest candidate, set against the mean of the group's pinned rows (if any)."""
    pinned: dict[tuple, list[float]] = {}
    best: dict[tuple, tuple[str, float]] = {}
    for group, kind, label, ms in entries:
        if kind is None:
            pinned.setdefault(group, []).append(ms)
        elif (group, kind) not in best or ms < best[(group, kind)][1]:
            best[(group, kind)] = (label, ms)
    out = []
    for ((shape, mode, provider), kind), (label, ms) in best.items():
        pin = sum(pinned[(shape, mode, provider)]) / len(pinned[(shape, mode, provider)]) \
            if (shape, mode, provider) in pinned else None
        out.append((shape, mode, provider, kind, pin, label, ms, pin / ms if pin else None))
    return out


def ratio_rows(rows: list[dict]) -> list[tuple]:
    def key(r):
        return json.dumps(r["shape"], sort_keys=True), r["mode"], r["dtype"]

    ours = {key(r): r for r in rows if r["provider"] == "ours" and "median_ms" in r}
    out = []
    for r in rows:
        if r["provider"] != "ours" and "median_ms" in r and key(r) in ours:
            out.append((r["shape"], r["mode"], r["dtype"], r["provider"], r["median_ms"] / ours[key(r)]["median_ms"]))
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python benchmarks/summarize.py WORKDIR OUTDIR")
    work, out = Path(argv[0]), Path(argv[1])
    rows = read_jsonl(work / "rows.jsonl")
    sections = read_jsonl(work / "sections.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"sections": sections, "rows": rows}, indent=1))
    (out / "summary.md").write_text(summary_markdown(rows, sections))
    print(f"{len(rows)} rows, {len(sections)} sections -> {out}/results.json, {out}/summary.md")


if __name__ == "__main__":
    main()

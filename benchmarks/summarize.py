"""Gather the GPU check's rows into results.json and summary.md.

  python benchmarks/summarize.py WORKDIR OUTDIR

WORKDIR holds rows.jsonl (one row per measurement, written by benchmarks/common.Recorder) and sections.jsonl
(the wall time and exit code of each section of benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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

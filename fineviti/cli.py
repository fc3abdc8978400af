"""The `fineviti` command: one subcommand per job (info, data, bench, eval, train, export, demo).

To add a subcommand, write `_add_<name>(subparsers)` that builds its parser and sets `run` to a function
taking the parsed arguments and returning an exit code, then list it in COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import sys


def _run_info(args: argparse.Namespace) -> int:
    from fineviti import info

    report = info.collect()
    print(json.dumps(report, indent=2) if args.json else info.format_text(report))
    return 0


def _add_info(subparsers) -> None:
    parser = subparsers.add_parser(
        "info", help="versions, the compiled extension, optional backends and the GPU",
        description="Report versions (python, torch, triton, CUDA, DALI), whether fineviti._C and its CUDA "
        "part are loaded, which optional backends import (and which are unverified), and the GPU.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=_run_info)


def _run_data_synth(args: argparse.Namespace) -> int:
    from fineviti.data import synth

    info = synth.generate(args.out, args.images, seed=args.seed, heldout=args.heldout,
                          samples_per_shard=args.per_shard, processes=args.processes)
    print(json.dumps(info, indent=2))
    return 0


def _add_data(subparsers) -> None:
    parser = subparsers.add_parser("data", help="data sets: the synthetic generator",
                                   description="Data set tools (see fineviti/data/).")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = actions.add_parser(
        "synth", help="write the synthetic dense-caption data set",
        description="Deterministic synthetic scenes as webdataset shards (OUT/train, OUT/heldout with hard "
        "negatives), a tokenizer trained on their captions (OUT/tokenizer.json) and OUT/info.json.")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--images", type=int, required=True, help="training images")
    synth.add_argument("--seed", type=int, default=0, help="same seed, byte-identical shards (default 0)")
    synth.add_argument("--heldout", type=int, default=500, help="held-out images (default 500)")
    synth.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    synth.add_argument("--processes", type=int, default=None, help="generator processes (default: CPU count)")
    synth.set_defaults(run=_run_data_synth)


BENCH_EXTRA = {"report": "kernel_report.py"}  # benchmarks/ scripts that are not named bench_<name>.py


def benchmarks_dir():
    """The benchmarks/ folder of the source checkout this fineviti runs from (an editable install), or None: the
    benchmarks are scripts beside the package, not part of a wheel."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    folder = root / "benchmarks"
    # this project's checkout (its pyproject names it), not another package's top-level benchmarks/ beside ours in
    # site-packages
    try:
        ours = 'name = "fineviti"' in (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return folder if ours and (folder / "common.py").is_file() else None


def bench_scripts(folder) -> dict:
    """name -> path of every benchmark in `folder`: bench_<name>.py, and BENCH_EXTRA."""
    found = {p.stem.removeprefix("bench_"): p for p in sorted(folder.glob("bench_*.py"))}
    found.update({name: folder / file for name, file in BENCH_EXTRA.items() if (folder / file).is_file()})
    return found


def _summary(path) -> str:
    """The first paragraph of a script's docstring, shortened to one line."""
    import ast
    import textwrap

    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return textwrap.shorten(doc.split("\n\n", 1)[0], width=96, placeholder=" ...")


def _run_bench(args: argparse.Namespace) -> int:
    import subprocess

    folder = benchmarks_dir()
    if folder is None:
        raise FileNotFoundError(
            "fineviti bench runs the scripts of a source checkout's benchmarks/ folder, and this fineviti "
            f"({__file__}) was not installed from one: clone the repository and `pip install -e .` there (or run "
            "`python benchmarks/<script>.py` in it)")
    scripts = bench_scripts(folder)
    if not scripts:
        raise FileNotFoundError(f"no benchmark (bench_*.py) in {folder}")
    if args.name is None:
        width = max(map(len, scripts))
        print(f"benchmarks in {folder} (fineviti bench NAME --help for each one's options):")
        for name, path in scripts.items():
            print(f"  {name:<{width}}  {_summary(path)}")
        return 0
    name = args.name.replace("-", "_")  # lm-loss or lm_loss
    if name not in scripts:
        raise ValueError(f"no benchmark named {args.name!r} in {folder}: expected one of {sorted(scripts)}")
    # a process of its own: the scripts set up sys.path, TRITON_INTERPRET and their own exit status
    try:
        code = subprocess.run([sys.executable, str(scripts[name]), *args.args], check=False).returncode
    except KeyboardInterrupt:  # (the script got the Ctrl-C too, and has ended)
        return 130
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="run a benchmark of benchmarks/ (without NAME: list them)",
        description="Run benchmarks/bench_NAME.py (or `report`: the kernel report) of the source checkout this "
        "fineviti is installed from, with the arguments that follow NAME; its exit status is the command's. "
        "Without NAME, list the benchmarks. The GPU check is benchmarks/gpu_check.sh.")
    parser.add_argument("name", nargs="?", metavar="NAME", help="the benchmark (bench_NAME.py), or report")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments (NAME --help)")
    parser.set_defaults(run=_run_bench)


def _add_eval(subparsers) -> None:
    from fineviti.eval import cli as eval_cli  # argparse only: the heavy imports happen when it runs

    eval_cli.add_parser(subparsers)


def _add_train(subparsers) -> None:
    from fineviti.train import cli as train_cli  # argparse only: train, export and demo

    train_cli.add_parsers(subparsers)


COMMANDS = [_add_info, _add_data, _add_bench, _add_eval, _add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fineviti", description="Training engine for native-resolution ViTs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


# What a command raises for a bad argument, a missing file or a bad config value: printed as one line (with the
# exception's type) and exit status 2, not a traceback (FINEVITI_TRACEBACK=1 shows it). Raised where the work runs
# (training steps, a run's end, an evaluation's forwards: fineviti._errors.work), they keep their traceback: there
# it may be a bug, not a usage error.
USAGE_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `train --preset x a=1 --print-config b=2`: argparse ends the positional overrides at the first option, so
        # the overrides after it come back here; anything else is an error as parse_args makes it
        from fineviti.train.cli import is_override

        if getattr(args, "command", None) == "train" and all(is_override(e) for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from fineviti._checks import env_flag

    try:  # read before the work: a bad value found in the error handler buried the error it was handling
        traceback = env_flag("FINEVITI_TRACEBACK")
    except ValueError as exc:
        print(f"fineviti {args.command}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except USAGE_ERRORS as exc:
        from fineviti._errors import keeps_traceback

        if keeps_traceback(exc) or traceback:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"fineviti {args.command}: error: {type(exc).__name__}: {message}\n"
              f"fineviti {args.command}: (FINEVITI_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `fineviti` command: one subcommand per job (`fineviti info`; train, eval, data, bench, demo to come).

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


COMMANDS = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fineviti", description="Training engine for native-resolution ViTs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

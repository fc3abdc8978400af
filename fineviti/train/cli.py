"""`fineviti train`, `fineviti export` and `fineviti demo` (argparse only here; the heavy imports happen when one
runs).

    fineviti train --preset tiny training.steps=50 optimizer.lr=3e-4        # one process
    torchrun --nproc-per-node 8 -m fineviti.cli train --preset large           # DDP / FSDP2 (parallel.strategy)
    fineviti train --preset tiny --resume                                   # the newest checkpoint of the run
    fineviti export runs/tiny --out tiny_vision.safetensors [--part full]
    fineviti demo --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path


def _run_train(args: argparse.Namespace) -> int:
    from fineviti.train import config as config_mod

    overrides = list(args.overrides)
    resume = args.resume
    if resume is not None and is_override(resume) and not Path(resume).exists():
        # `--resume training.steps=8`: argparse gave --resume the override that followed it
        overrides.append(resume)
        resume = "auto"
    if resume is not None and not resume.strip():  # ("" is checkpoint.resume's "start fresh": not what was asked)
        print("fineviti train: --resume takes a checkpoint path or nothing (the run folder's newest), got ''",
              file=sys.stderr)
        return 2
    if resume is not None:
        overrides.append(f"checkpoint.resume={resume}")
    if args.profile:
        overrides.append(f"metrics.profile={args.profile}")
    try:
        cfg = config_mod.apply_cli_overrides(config_mod.preset(args.preset), overrides)
    except (KeyError, ValueError, TypeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"fineviti train: {message}", file=sys.stderr)
        return 2
    for key, why in _unused_overrides(cfg, overrides):
        print(f"fineviti train: warning: {key} is not used by this run ({why})", file=sys.stderr)
    if args.print_config:
        print(config_mod.to_json(cfg))
        return 0
    if resume is not None and cfg.checkpoint.resume == "auto":  # asked for on the command line: not silently fresh
        from fineviti.train import checkpoint as ckpt

        folder = Path(cfg.out_dir) / "checkpoints"
        whole_tmp = [p for prefix in (ckpt.TMP_PREFIX, ckpt.REPLACED_PREFIX) for p in folder.glob(f"{prefix}*")
                     if (p / ".metadata").is_file()]
        if not ckpt.list_checkpoints(folder) and not whole_tmp:
            print(f"fineviti train: --resume: no checkpoint in {folder} to resume (check the preset, name or run_dir); "
                  f"leave out --resume to start a new run", file=sys.stderr)
            return 2
    from fineviti.train.trainer import run, summarise

    row = run(cfg)
    if os.environ.get("RANK", "0") == "0":
        if row:
            print(f"finished step {cfg.training.steps}: {summarise(row)}; run folder {cfg.out_dir}")
        else:  # resumed at or past the last step
            print(f"nothing to train: the resumed checkpoint is at or past training.steps = {cfg.training.steps} "
                  f"(raise training.steps to go on); run folder {cfg.out_dir}")
    return 0


# Sections and keys a run leaves unread (their overrides were taken without a word): when, and why (the warning).
_UNUSED = {
    "training.text_length": (lambda cfg: cfg.training.stage == 2,
                             "it cuts stage 1's captions; stage 2 keeps its region samples whole"),
    "model": (lambda cfg: cfg.training.stage == 2, "stage 2 builds its model from aligner.*"),
    "aligner": (lambda cfg: cfg.training.stage == 1, "stage 1 builds its model from model.*"),
    "stage2": (lambda cfg: cfg.training.stage == 1, "stage2.* applies to training.stage=2"),
    "random_data": (lambda cfg: cfg.training.data_source == "shards", "training.data_source is shards"),
    "data": (lambda cfg: cfg.training.data_source == "random",
             "training.data_source is random: random_data.* makes the batches"),
}


def _unused_overrides(cfg, overrides: list[str]) -> list[tuple[str, str]]:
    """(key, why) of each override of a section or key this run does not read."""
    out = []
    for key in (o.partition("=")[0] for o in overrides if "=" in o):
        for name, (unused, why) in _UNUSED.items():
            if (key == name or key.startswith(name + ".")) and unused(cfg):
                out.append((key, why))
                break
    return out


def is_override(text: str) -> bool:
    """Whether a command-line word is a key=value config override."""
    return re.fullmatch(r"[A-Za-z_][\w.]*=.*", text) is not None


def _run_export(args: argparse.Namespace) -> int:
    from fineviti.train.export import export_checkpoint, tokenizer_file

    path = export_checkpoint(args.checkpoint, args.out, part=args.part, overwrite=args.overwrite)
    tokenizer = f" and {tokenizer_file(path)}" if tokenizer_file(path).is_file() else ""
    print(f"wrote {path}, {path}.json{tokenizer}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from fineviti.train import demo

    report = demo.run_demo(args.out, images=args.images, heldout=args.heldout, stage1_steps=args.stage1_steps,
                           stage2_steps=args.stage2_steps, seed=args.seed)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0 if report.get("passed", False) else 1


def add_parsers(subparsers) -> None:
    from fineviti.train.config import PRESETS

    train = subparsers.add_parser(
        "train", help="train a model (stage 1 or 2) from a preset with key=value overrides",
        description="Train from a preset (a full config) with key=value overrides, e.g. training.steps=100 "
        "optimizer.lr=3e-4 model.vision.depth=2 parallel.strategy=fsdp. The resolved config is saved as "
        "RUN_DIR/config.json; metrics go to RUN_DIR/metrics.jsonl (and TensorBoard when installed); checkpoints "
        "to RUN_DIR/checkpoints. Several processes: torchrun ... -m fineviti.cli train ...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="the starting config (default tiny)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (dotted keys)")
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                       help="continue from a checkpoint: the newest of the run folder (no value) or a path")
    train.add_argument("--profile", default="", metavar="START:END",
                       help="write a torch.profiler trace of steps START..END to RUN_DIR/profile")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(run=_run_train)

    export = subparsers.add_parser(
        "export", help="write a checkpoint's vision tower (or whole model) as safetensors with its config",
        description="Load a trainer checkpoint (a step-XXXXXXXX folder, or a run folder: its newest) and write "
        "one .safetensors file: the config in its metadata and beside it as FILE.safetensors.json, and a stage-1 "
        "checkpoint's tokenizer as FILE.safetensors.tokenizer.json (with its tokenizer_config.json, if any, as "
        "FILE.safetensors.tokenizer_config.json). A vision export evaluates as `fineviti eval --vision-checkpoint`; "
        "`--part full` of a stage-1 run as `--checkpoint`.")
    export.add_argument("checkpoint", help="checkpoint folder or run folder")
    export.add_argument("--out", required=True, help="output .safetensors file")
    export.add_argument("--part", default="vision", choices=("vision", "full"), help="what to export (default vision)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace --out (and the files beside it) when it exists")
    export.set_defaults(run=_run_export)

    demo = subparsers.add_parser(
        "demo", help="the embedded default end to end: synthetic data, stage 1, stage 2, evaluation",
        description="Generate the synthetic data set, train stage 1 and stage 2 with the tiny presets on this "
        "machine, evaluate on the held-out split and write OUT/report.json (printed as a table). Exit status 1 "
        "when retrieval R@1 is below 10x chance in either direction.")
    demo.add_argument("--out", required=True, help="output folder (data, runs, report.json)")
    demo.add_argument("--images", type=int, default=None, help="training images to generate (default: the demo's)")
    demo.add_argument("--heldout", type=int, default=500, help="held-out images (default 500)")
    demo.add_argument("--stage1-steps", type=int, default=None, help="stage-1 steps (default: the tiny preset's)")
    demo.add_argument("--stage2-steps", type=int, default=None, help="stage-2 steps (default: the preset's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="also print the report as JSON")
    demo.set_defaults(run=_run_demo)

"""`fineviti eval`: one benchmark in its own format, one checkpoint, one command (torchrun works too).

    fineviti eval --format coco --data /data/coco --checkpoint runs/x/step_1000 --preset base --out eval/coco
    fineviti eval --format synthetic --data data/heldout --checkpoint runs/demo/stage1 --preset tiny
    torchrun --nproc-per-node 8 -m fineviti.cli eval --format imagenet --data /data/imagenet/val ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

FORMAT_HELP = {
    "coco": "Karpathy-split COCO: DATA holds dataset_coco.json (or --annotations) and val2014/ etc.",
    "flickr30k": "Karpathy-split Flickr30k: DATA holds dataset_flickr30k.json and the images (or flickr30k-images/)",
    "imagenet": "class folders DATA/<class>/*.JPEG; --class-names for a synset mapping file",
    "urban1k": "Urban1k: DATA/image/*.jpg and DATA/caption/*.txt (long-caption retrieval)",
    "dci": "Densely Captioned Images: DATA/densely_captioned_images/{photos,annotations,splits.json}",
    "docci": "DOCCI: DATA/docci_descriptions.jsonlines and DATA/images/",
    "coco_instances": "COCO boxes (FG-CLIP box classification): DATA/annotations/instances_val2017.json (or "
                      "--annotations) and the images in DATA/val2017/ (or in DATA)",
    "shards": "webdataset shards (img2dataset layout): retrieval on their captions",
    "synthetic": "fineviti's synthetic held-out shards: retrieval, hard negatives and region classification",
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint on a benchmark (retrieval, zero-shot, hard negatives, regions)",
        description="Evaluate a checkpoint on one benchmark given in its own format; writes report.json and "
        "report.md with --out. Formats: " + "; ".join(f"{k}: {v}" for k, v in FORMAT_HELP.items()),
    )
    parser.add_argument("--format", required=True, choices=sorted(FORMAT_HELP), help="the benchmark's layout")
    parser.add_argument("--data", required=True, help="the benchmark's folder (or shard folder)")
    parser.add_argument("--annotations", help="the annotation file where the format has one (default: in --data)")
    parser.add_argument("--split", help="split to evaluate (coco/flickr30k: test; dci: all; docci: test)")
    parser.add_argument("--class-names", help="imagenet: a synset mapping (LOC_synset_mapping.txt or json)")
    parser.add_argument("--checkpoint", help="stage-1 checkpoint: DCP folder (or a run folder: its newest), "
                        ".safetensors or torch file")
    parser.add_argument("--vision-checkpoint", help="load only the vision tower from this one (e.g. stage 2's run)")
    parser.add_argument("--preset", help="model preset (default: the config saved with the checkpoint, else tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override (as in training), e.g. --set vision.depth=2; with a checkpoint "
                        "that saved its config, only the backends and grad_checkpointing may differ from it")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's copy, else one beside the "
                        "checkpoint or the data)")
    parser.add_argument("--out", help="folder for report.json and report.md (not replaced without --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the reports already in --out")
    parser.add_argument("--token-budget", type=int, default=16384, help="patch tokens per image batch")
    parser.add_argument("--max-pixels", type=int, help="size rule's max_pixels (default: Qwen2-VL's, capped)")
    parser.add_argument("--context-length", type=int, help="caption tokens kept (default: the text tower's)")
    parser.add_argument("--templates", default=None, metavar="default|imagenet|FILE",
                        help="zero-shot and region prompts: 'default' ('a photo of a {}.'), 'imagenet' (open_clip's "
                        "7 ImageNet templates), or a text file of templates, one per line, each with {} for the "
                        "class name (e.g. CLIP's 80, for numbers comparable with published ones); unset: 'default', "
                        "except the synthetic regions' own 'a small/medium/large {}'")
    parser.add_argument("--region-method", choices=("mean", "roi_align"), default=None,
                        help="how a box's tokens are pooled (synthetic, coco_instances; default mean)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--pixel-path", default="pil", choices=("pil", "dali", "nvjpeg", "auto"))
    parser.add_argument("--box-frame", choices=("auto", "stored", "upright"), default=None,
                        help="the frame of a tagged photo's boxes (synthetic, coco_instances): stored pixels, upright, "
                        "or auto (default: upright where the annotation's image size is, else stored)")
    parser.add_argument("--exif-orientation", action=argparse.BooleanOptionalAction, default=True,
                        help="turn photos upright by their EXIF orientation tag, and their boxes with them (as "
                        "training does; --no-exif-orientation: the stored pixels, as open_clip's evaluation reads "
                        "them)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.set_defaults(run=run)


# The formats each optional input applies to: given for another format it would be ignored, so it is an error.
APPLIES_TO = {"split": ("coco", "flickr30k", "dci", "docci"), "annotations": ("coco", "flickr30k", "coco_instances"),
              "class_names": ("imagenet",), "region_method": ("synthetic", "coco_instances"),
              "box_frame": ("synthetic", "coco_instances"), "templates": ("imagenet", "coco_instances", "synthetic")}


def _check_applies(args) -> None:
    for name, formats in APPLIES_TO.items():
        if getattr(args, name) is not None and args.format not in formats:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} does not apply to --format {args.format} (it applies to "
                             f"{', '.join(formats)})")


def _check_out(args) -> None:
    """--out before any work: a folder (or a path to create), whose reports are replaced only with --overwrite (an
    earlier evaluation's report was replaced without a word)."""
    if not args.out:
        if args.overwrite:
            raise ValueError("--overwrite applies to --out, which is not given")
        return
    out = Path(args.out)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(f"--out {args.out!r}: {str(blocking)!r} is a file; expected a folder (or a path to "
                                 f"create) for report.json and report.md")
    existing = [p.name for p in (out / "report.json", out / "report.md") if p.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"--out {args.out!r} already holds {' and '.join(existing)}; pass --overwrite to "
                              f"replace them, or another --out")


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _templates(value: str | None):
    """--templates: None, a named set, or a file of templates (one per line, blank lines and # comments skipped)."""
    from fineviti.eval import zeroshot

    named = {None: None, "default": zeroshot.DEFAULT_TEMPLATES, "imagenet": zeroshot.SIMPLE_IMAGENET_TEMPLATES}
    if value in named:
        return named[value]
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"--templates must be 'default', 'imagenet' or a file of templates, got "
                         f"{value!r} (no such file)")
    lines = [line.strip() for line in path.read_text().splitlines()]
    templates = tuple(line for line in lines if line and not line.startswith("#"))
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        which = f", {bad[0]!r} without {{}}" if bad else ""
        raise ValueError(f"--templates {value}: expected one template per line, each with {{}} for "
                         f"the class name; got {len(templates)} templates{which}")
    return templates


def _saved_configs(args):
    """({"model": saved model config or None, "vision": saved vision config or None}, the config to build): the
    saved one (vision only: tiny's, with the saved vision tower) unless --preset names one."""
    import dataclasses

    from fineviti.eval.checkpoint import saved_model_config
    from fineviti.model.config import ModelConfig, VisionConfig, preset
    from fineviti.train.config import from_dict

    saved = {"model": saved_model_config(args.checkpoint) if args.checkpoint else None,
             "vision": saved_model_config(args.vision_checkpoint, "vision") if args.vision_checkpoint else None}
    if args.preset is not None:
        return saved, args.preset
    if saved["model"] is not None:
        return saved, from_dict(saved["model"], ModelConfig)
    if saved["vision"] is not None:
        vision = saved["vision"]
        base = dataclasses.replace(preset("tiny"), vision=from_dict(vision.get("vision", {}), VisionConfig))
        return saved, dataclasses.replace(base, **({"embed_dim": vision["embed_dim"]} if "embed_dim" in vision else {}))
    return saved, "tiny"


def _check_saved_configs(saved: dict, cfg) -> None:
    """CheckpointMismatchError naming what the model's config sets otherwise than the checkpoint's saved one."""
    import dataclasses

    from fineviti.eval.checkpoint import CheckpointMismatchError, config_differences

    have = dataclasses.asdict(cfg)
    differences = [d for part in saved.values() if part is not None for d in config_differences(part, have)]
    if differences:
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise CheckpointMismatchError(
            f"checkpoint does not match the model config: it was trained with another one, {differences[0]}{more}; "
            f"leave out --preset and the --set of architecture fields to use the checkpoint's own config")


def _check_checkpoint_kind(args) -> None:
    """--checkpoint takes a whole stage-1 model: a vision tower alone, or a stage-2 run's, is named with where it
    goes (it failed as a list of missing tensors)."""
    from fineviti.eval.checkpoint import exported_part, saved_config

    if not args.checkpoint or not Path(args.checkpoint).exists():
        return
    where = ("pass it as --vision-checkpoint (with a stage-1 --checkpoint for the text tower and the logit scale, "
             "which retrieval and zero-shot need)")
    if exported_part(args.checkpoint) == "vision":
        raise ValueError(f"--checkpoint {args.checkpoint!r} holds a vision tower alone (fineviti export's default "
                         f"--part vision): {where}, or export the stage-1 run with --part full")
    config = saved_config(args.checkpoint)
    if config and config.get("training", {}).get("stage", 1) == 2:
        raise ValueError(f"--checkpoint {args.checkpoint!r} is of a stage-2 run (the aligner, which has no text "
                         f"tower): {where}")


def _find_tokenizer(args) -> Path:
    """--tokenizer; else, for --checkpoint (whose text tower reads the captions), then --vision-checkpoint: the
    copy it keeps (a stage-1 run's checkpoint folder's tokenizer.json, an export's <file>.tokenizer.json; a run
    folder: its newest checkpoint's), then a tokenizer.json beside it, its folder or the folder above; then one
    beside the data."""
    from fineviti.eval.checkpoint import checkpoint_path
    from fineviti.train.export import tokenizer_file

    if args.tokenizer:
        return Path(args.tokenizer)
    places = []
    for start, weights in ((args.checkpoint, True), (args.vision_checkpoint, True), (args.data, False)):
        if not start:
            continue
        if weights:
            kept = checkpoint_path(start)
            places.append(kept / "tokenizer.json" if kept.is_dir() else tokenizer_file(kept))
        path = Path(start)
        places += [path / "tokenizer.json", path.parent / "tokenizer.json", path.parent.parent / "tokenizer.json"]
    places = list(dict.fromkeys(places))
    for place in places:
        if place.is_file():
            return place
    raise FileNotFoundError("no --tokenizer given and no tokenizer.json found beside the checkpoint or the "
                     f"data (looked at {', '.join(map(str, places))})")


def load_sets(args) -> dict:
    """{task name: EvalSet} of the benchmark `args` names (the synthetic set is `runner.synthetic_tasks`)."""
    from fineviti.eval import loaders

    data = Path(args.data)
    fmt = args.format
    if fmt in ("coco", "flickr30k"):
        annotations = args.annotations or data / f"dataset_{fmt}.json"
        return {fmt: loaders.karpathy_captions(annotations, data, args.split or "test")}
    if fmt == "imagenet":
        return {"zero_shot": loaders.image_folder(data, args.class_names)}
    if fmt == "urban1k":
        return {"urban1k": loaders.urban1k(data)}
    if fmt == "dci":
        return {"dci": loaders.dci(data, args.split or "all")}
    if fmt == "docci":
        return {"docci": loaders.docci(data, args.split or "test")}
    if fmt == "coco_instances":
        annotations = args.annotations or data / "annotations" / "instances_val2017.json"
        images = data / "val2017" if (data / "val2017").is_dir() else data  # COCO's own layout, else flat
        return {"regions": loaders.coco_instances(annotations, images)}
    if fmt == "shards":
        return {"retrieval": loaders.shard_captions(data)}
    raise ValueError(f"unknown format {fmt!r}")


def _init_distributed(device: str):
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def run(args: argparse.Namespace) -> int:
    import torch

    from fineviti.data.tokenizer import CaptionTokenizer
    from fineviti.eval import runner
    from fineviti.eval.checkpoint import CheckpointMismatchError, load_checkpoint
    from fineviti.model import create_model

    _check_applies(args)
    _check_checkpoint_kind(args)
    if not Path(args.data).exists():  # (before the tokenizer's search, which would name only the places it looked)
        raise FileNotFoundError(f"--data {str(args.data)!r} does not exist (the {args.format} benchmark's folder)")
    _check_out(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {device!r}") from None
    started = _init_distributed(device)
    try:
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
        tokenizer = CaptionTokenizer(_find_tokenizer(args))
        if not args.tokenizer:  # (found: said, and recorded in the report's meta)
            print(f"fineviti eval: tokenizer {tokenizer.path}", file=sys.stderr)
        overrides = _parse_overrides(args.overrides)
        saved, base = _saved_configs(args)
        if isinstance(base, str) and not any(k in overrides for k in ("text.vocab_size", "text")):
            overrides["text.vocab_size"] = tokenizer.vocab_size  # a preset: as training reads it from the tokenizer
        model = create_model(base, **overrides).to(device)
        if tokenizer.vocab_size > model.cfg.text.vocab_size:
            print(f"fineviti eval: the tokenizer has {tokenizer.vocab_size} tokens but the text tower's vocab_size "
                  f"is {model.cfg.text.vocab_size}; expected a tokenizer of the checkpoint's run", file=sys.stderr)
            return 2
        loaded = {}
        try:
            _check_saved_configs(saved, model.cfg)
            if args.checkpoint:
                loaded["checkpoint"] = load_checkpoint(model, args.checkpoint)
            if args.vision_checkpoint:
                loaded["vision_checkpoint"] = load_checkpoint(model.visual, args.vision_checkpoint)
        except CheckpointMismatchError as exc:
            print(f"fineviti eval: {exc} (preset {args.preset or 'from the checkpoint'!r}, overrides {overrides})",
                  file=sys.stderr)
            return 2
        if not loaded:
            print("fineviti eval: no --checkpoint: the model has random weights", file=sys.stderr)
        elif "checkpoint" not in loaded:
            print("fineviti eval: only --vision-checkpoint: the text tower and the logit scale keep random weights, "
                  "so retrieval, zero-shot and region scores mean nothing; add --checkpoint with a stage-1 "
                  "checkpoint for them", file=sys.stderr)
        templates = _templates(args.templates)
        if args.format == "synthetic":
            tasks = runner.synthetic_tasks(args.data, region_method=args.region_method or "mean")
            if templates is not None:
                tasks["regions"].templates = templates
        else:
            tasks = {name: runner.task_for(evalset, templates) for name, evalset in load_sets(args).items()}
            for task in tasks.values():
                if isinstance(task, runner.RegionTask):
                    task.method = args.region_method or "mean"
        if args.max_pixels is not None and args.max_pixels < 1:
            raise ValueError(f"--max-pixels must be >= 1 (leave it out for the default), got {args.max_pixels}")
        cfg = runner.EvalConfig(token_budget=args.token_budget, context_length=args.context_length,
                                pixel_path=args.pixel_path, exif_orientation=args.exif_orientation,
                                box_frame=args.box_frame or "auto",
                                **({"max_pixels": args.max_pixels} if args.max_pixels is not None else {}))
        meta = {"format": args.format, "data": str(args.data), "tokenizer": str(tokenizer.path),
                "preset": args.preset or model.cfg.name,
                "overrides": overrides,
                "loaded": loaded, "sets": {k: len(t.records) for k, t in tasks.items()}}
        report = runner.evaluate(model, tokenizer, tasks, cfg=cfg, out_dir=args.out, device=device, meta=meta)
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps(report, indent=2) if args.json else runner.markdown_table(report), end="")
            if args.out:
                print(f"wrote {Path(args.out) / 'report.json'} and report.md", file=sys.stderr)
        return 0
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()

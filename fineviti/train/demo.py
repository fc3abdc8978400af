"""`fineviti demo --out DIR`: the embedded default end to end on this machine.

1. data: the synthetic dense-caption set (fineviti.data.synth) in DIR/data (train + a held-out split of 500);
2. stage 1: the `tiny` preset (contrastive, native resolution) in DIR/stage1;
3. evaluation of the stage-1 model on the held-out split (fineviti.eval): retrieval with the long captions,
   hard negatives, region-level classification (each object's box against every "colour shape");
4. stage 2: the `tiny-stage2` preset (the stage-1 vision tower + merger + projector + built-in LM on box ->
   caption and caption -> box) in DIR/stage2;
5. region-level classification again, with the stage-2 vision tower (the stage-1 text tower and pooling head);
6. DIR/report.json and a table; "passed" says whether retrieval R@1 reached 10x chance both ways.

The runs resume from their newest checkpoint (checkpoint.resume=auto), so a demo stopped halfway continues.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

from fineviti.train.config import JobConfig, apply_cli_overrides, preset

DEMO_IMAGES = 4000
CHANCE_FACTOR = 10.0


def stage1_config(out: Path, data: Path, steps: int | None, seed: int) -> JobConfig:
    overrides = [f"run_dir={out / 'stage1'}", f"data.path={data / 'train'}", f"training.seed={seed}",
                 f"data.seed={seed}", "checkpoint.resume=auto"]
    if steps is not None:
        overrides.append(f"training.steps={steps}")
    return apply_cli_overrides(preset("tiny"), overrides)


def stage2_config(out: Path, data: Path, steps: int | None, seed: int) -> JobConfig:
    overrides = [f"run_dir={out / 'stage2'}", f"data.path={data / 'train'}", f"training.seed={seed}",
                 f"data.seed={seed}", f"stage2.init_from={out / 'stage1'}", "checkpoint.resume=auto"]
    if steps is not None:
        overrides.append(f"training.steps={steps}")
    return apply_cli_overrides(preset("tiny-stage2"), overrides)


def ensure_data(data: Path, images: int, heldout: int, seed: int, echo) -> float:
    """Generates the synthetic set unless DIR/data already holds the same one; returns the seconds spent."""
    from fineviti.data import synth

    info_file = data / "info.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if (info.get("images"), info.get("heldout"), info.get("seed")) == (images, heldout, seed):
            echo(f"data: reusing {data} ({images} training, {heldout} held-out images)")
            return 0.0
    start = time.perf_counter()
    echo(f"data: generating {images} training and {heldout} held-out images in {data}")
    synth.generate(data, images, seed=seed, heldout=heldout)
    # runs trained on another data set (and its tokenizer) would be resumed on this one: they start over
    for stale in (data.parent / "stage1", data.parent / "stage2"):
        if stale.exists():
            echo(f"data: a new data set, so {stale} (trained on the old one) is removed")
            shutil.rmtree(stale)
    return time.perf_counter() - start


def stage2_source(out: Path, echo) -> str:
    """The stage-1 checkpoint stage 2 starts from (the newest of out/stage1), kept in out/stage2/init.json: a
    stage-2 run started from another one (stage 1 trained on with more steps) is removed, where resume=auto had
    reported it "already done" and the report described a tower grown from the old stage-1 weights."""
    from fineviti.train import checkpoint as ckpt

    found = ckpt.list_checkpoints(out / "stage1" / "checkpoints")
    source = str(found[-1][1].resolve()) if found else ""
    marker = out / "stage2" / "init.json"
    if (out / "stage2").exists():
        before = json.loads(marker.read_text()).get("stage1_checkpoint") if marker.is_file() else None
        if before != source:
            echo(f"stage 2: {out / 'stage2'} started from {before or 'an unrecorded stage-1 checkpoint'}, not from "
                 f"{source}: it is removed and trained again")
            shutil.rmtree(out / "stage2")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"stage1_checkpoint": source}) + "\n")
    return source


def train(cfg: JobConfig, echo):
    from fineviti.train.trainer import Trainer, summarise

    start = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        if trainer.step > cfg.training.steps:  # an earlier demo in this folder trained longer: its weights are used
            echo(f"{cfg.name}: its newest checkpoint is at step {trainer.step}, past the {cfg.training.steps} asked; "
                 f"those weights are evaluated (delete {cfg.out_dir} to train {cfg.training.steps} steps)")
        elif trainer.step:
            echo(f"{cfg.name}: resuming at step {trainer.step} of {cfg.training.steps}")
        row = trainer.train()
    finally:
        trainer.close()
    seconds = time.perf_counter() - start
    steps = trainer.step  # the step of the weights returned (past training.steps when resumed there)
    echo(f"{cfg.name}: {steps} steps in {seconds:.0f} s ({summarise(row) if row else 'already done'})")
    return trainer.raw_model, row, seconds, steps


def eval_config(cfg: JobConfig):
    from fineviti.eval.runner import EvalConfig

    return EvalConfig(token_budget=4 * cfg.data.token_budget, min_pixels=cfg.data.min_pixels,
                      max_pixels=cfg.data.max_pixels, max_aspect=cfg.data.max_aspect,
                      exif_orientation=cfg.data.exif_orientation, box_frame=cfg.data.box_frame)


def evaluate(model, tokenizer, heldout: Path, cfg: JobConfig, names: tuple[str, ...]) -> dict:
    from fineviti.eval.runner import Evaluator, synthetic_tasks

    tasks = {k: v for k, v in synthetic_tasks(heldout).items() if k in names}
    return Evaluator(model, tokenizer, eval_config(cfg)).run(tasks)


def with_vision_tower(model, tower):
    """A copy of the stage-1 model whose vision tower is `tower` (the stage-2 one); text tower and pooling kept."""
    combined = copy.deepcopy(model)
    state = {k: v for k, v in tower.state_dict().items() if not k.startswith("pool.")}
    missing, unexpected = combined.visual.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("pool.") for k in missing):
        raise RuntimeError(f"the stage-2 vision tower does not fit the stage-1 model: missing {missing}, "
                           f"unexpected {unexpected}")
    return combined


def run_demo(out, *, images: int | None = None, heldout: int = 500, stage1_steps: int | None = None,
             stage2_steps: int | None = None, seed: int = 0, echo=print) -> dict:
    if heldout < CHANCE_FACTOR:  # R@1 >= 10 x chance = 10 / heldout could never be met (nor measured at 0)
        raise ValueError(f"heldout must be at least {CHANCE_FACTOR:g} (the pass criterion is retrieval R@1 >= "
                         f"{CHANCE_FACTOR:g} x chance, chance being 1 / heldout), got {heldout}")
    start = time.perf_counter()
    out = Path(out)
    data = out / "data"
    images = DEMO_IMAGES if images is None else images
    timings = {"data_s": ensure_data(data, images, heldout, seed, echo)}
    from fineviti.data.tokenizer import CaptionTokenizer

    tokenizer = CaptionTokenizer(data / "tokenizer.json")

    cfg1 = stage1_config(out, data, stage1_steps, seed)
    model1, row1, timings["stage1_s"], steps1 = train(cfg1, echo)
    t = time.perf_counter()
    eval1 = evaluate(model1, tokenizer, data / "heldout", cfg1, ("retrieval", "hard_negatives", "regions"))
    timings["eval_stage1_s"] = time.perf_counter() - t

    cfg2 = stage2_config(out, data, stage2_steps, seed)
    stage2_source(out, echo)
    model2, row2, timings["stage2_s"], steps2 = train(cfg2, echo)
    t = time.perf_counter()
    eval2 = evaluate(with_vision_tower(model1, model2.visual), tokenizer, data / "heldout", cfg1, ("regions",))
    timings["eval_stage2_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    retrieval = eval1["retrieval"]
    chance = retrieval["chance_r1"]
    passed = retrieval["i2t_r1"] >= CHANCE_FACTOR * chance and retrieval["t2i_r1"] >= CHANCE_FACTOR * chance
    report = {
        "retrieval": retrieval,
        "hard_negatives": eval1["hard_negatives"],
        "regions": {"after_stage1": eval1["regions"], "after_stage2": eval2["regions"]},
        "training": {
            "stage1": {"run_dir": cfg1.out_dir, "steps": steps1, "last": row1},
            "stage2": {"run_dir": cfg2.out_dir, "steps": steps2, "last": row2},
        },
        "data": {"path": str(data), "train_images": images, "heldout_images": heldout, "seed": seed},
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "criterion": f"retrieval R@1 >= {CHANCE_FACTOR:g} x chance in both directions",
        "passed": passed,
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / "report.json")
    echo(format_table(report))
    return report


def format_table(report: dict) -> str:
    r, h = report["retrieval"], report["hard_negatives"]
    s1, s2 = report["regions"]["after_stage1"], report["regions"]["after_stage2"]
    chance = r["chance_r1"]
    rows = [
        ("retrieval image->text R@1", r["i2t_r1"], chance, f"n={r['n']}"),
        ("retrieval text->image R@1", r["t2i_r1"], chance, f"n={r['n']}"),
        ("retrieval image->text R@5", r.get("i2t_r5"), None, ""),
        ("retrieval text->image R@5", r.get("t2i_r5"), None, ""),
        ("hard negatives accuracy", h["accuracy"], h.get("chance"), f"n={h['n']}, chance 0.5 ** negatives"),
        ("  if captions were exchangeable", h["accuracy"] if "chance_exchangeable" in h else None,
         h.get("chance_exchangeable"), "chance 1 / (1 + negatives)"),
        ("hard negatives, per pair", h.get("pair_accuracy"), h.get("pair_chance"), f"pairs={h['n_negatives']}"),
        ("regions top-1, after stage 1", s1["top1"], s1.get("chance_top1"), f"n={s1['n']}"),
        ("regions top-1, after stage 2", s2["top1"], s2.get("chance_top1"), f"n={s2['n']}"),
    ]
    lines = [f"{'metric':<32} {'value':>8} {'chance':>8} {'x chance':>9}  n", "-" * 68]
    for name, value, base, n in rows:
        if value is None:
            continue
        times = f"{value / base:9.1f}" if base else f"{'':>9}"
        base_text = f"{base:8.4f}" if base is not None else f"{'':>8}"
        lines.append(f"{name:<32} {value:8.4f} {base_text} {times}  {n}")
    t = report["timings"]
    lines.append("-" * 68)
    lines.append(f"wall time {t['total_s']:.0f} s (data {t['data_s']:.0f}, stage 1 {t['stage1_s']:.0f}, eval "
                 f"{t['eval_stage1_s']:.0f}, stage 2 {t['stage2_s']:.0f}, eval {t['eval_stage2_s']:.0f}); "
                 f"{report['criterion']}: {'passed' if report['passed'] else 'FAILED'}")
    return "\n".join(lines)

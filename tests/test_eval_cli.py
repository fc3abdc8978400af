"""`fineviti eval` and the config a checkpoint was saved with: names and shapes do not catch heads, the text
pool, RoPE's theta or the pixel statistics, which change no tensor."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fineviti.eval.checkpoint import config_differences, saved_config, saved_model_config
from fineviti.model import create_model

SMALL = {"vision.depth": 1, "vision.width": 64, "vision.heads": 2, "vision.mlp_hidden": 96, "text.depth": 1,
         "text.width": 64, "text.heads": 2, "text.mlp_hidden": 96, "embed_dim": 32, "attn_backend": "torch"}


def test_config_differences():
    saved = {"vision": {"heads": 2, "image_mean": [0.5, 0.5, 0.5]}, "attn_backend": "torch", "embed_dim": 32,
             "only_saved": 1}
    have = {"vision": {"heads": 2, "image_mean": (0.5, 0.5, 0.5)}, "attn_backend": "triton", "embed_dim": 32}
    assert config_differences(saved, have) == []  # lists against tuples, a runtime field, a field one side lacks
    have["vision"]["heads"] = 4
    have["embed_dim"] = 64
    assert config_differences(saved, have) == ["embed_dim: checkpoint 32, model 64",
                                               "vision.heads: checkpoint 2, model 4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A held-out split, its tokenizer, and a stage-1 checkpoint folder with the trainer's config.json."""
    import torch.distributed.checkpoint as dcp

    from fineviti.data import synth
    from fineviti.data.tokenizer import CaptionTokenizer

    root = tmp_path_factory.mktemp("evalcli")
    synth.generate(root / "data", images=4, heldout=6, processes=1, vocab_size=400)
    vocab = CaptionTokenizer(root / "data" / "tokenizer.json").vocab_size
    torch.manual_seed(0)
    model = create_model("tiny", **SMALL, **{"text.vocab_size": vocab, "text.pool": "last"})
    folder = root / "run" / "step-00000001"
    dcp.save({"model": model.state_dict(), "step": 1}, checkpoint_id=str(folder), no_dist=True)
    config = {"model": dataclasses.asdict(model.cfg), "training": {"stage": 1}}
    (folder / "config.json").write_text(json.dumps(config))
    return root, folder, model


def _args(root, *extra):
    return ["eval", "--format", "synthetic", "--data", str(root / "data" / "heldout"), "--max-pixels",
            str(28 * 28 * 16), *extra]


def test_eval_builds_the_model_from_the_checkpoints_config(trained, capsys):
    """No --preset and no --set: the saved config (here with pool "last", which no preset has) builds the model;
    a runtime choice (the attention backend) may still be set."""
    from fineviti.cli import main

    root, folder, _ = trained
    assert saved_model_config(folder)["text"]["pool"] == "last"
    assert main(_args(root, "--checkpoint", str(folder), "--set", "attn_backend=torch", "--out",
                      str(root / "eval"))) == 0
    report = json.loads((root / "eval" / "report.json").read_text())
    assert report["meta"]["loaded"]["checkpoint"]["tensors"] > 0 and report["retrieval"]["n"] == 6
    # the tokenizer it found (beside the data here: the checkpoint keeps no copy) is named and recorded
    assert report["meta"]["tokenizer"] == str(root / "data" / "tokenizer.json")
    assert f"fineviti eval: tokenizer {root / 'data' / 'tokenizer.json'}" in capsys.readouterr().err
    assert report["meta"]["exif_orientation"] is True
    assert main(_args(root, "--checkpoint", str(folder), "--set", "attn_backend=torch", "--no-exif-orientation",
                      "--box-frame", "upright", "--out", str(root / "eval_stored"))) == 0
    report = json.loads((root / "eval_stored" / "report.json").read_text())
    assert report["meta"]["exif_orientation"] is False  # the synthetic images have no tag: the same scores
    assert report["meta"]["box_frame"] == "upright"
    assert main(_args(root, "--checkpoint", str(folder), "--format", "shards", "--box-frame", "upright")) == 2
    assert "--box-frame does not apply to --format shards" in capsys.readouterr().err
    capsys.readouterr()


def test_eval_refuses_an_out_that_is_a_file(trained, capsys, tmp_path):
    from fineviti.cli import main

    root, folder, _ = trained
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "sub"):  # the second failed only after the work
        assert main(_args(root, "--checkpoint", str(folder), "--out", str(out))) == 2
        assert "notes.txt' is a file; expected a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert main(_args(root, "--checkpoint", str(folder), "--overwrite")) == 2
    assert "--overwrite applies to --out" in capsys.readouterr().err


@pytest.mark.parametrize("change,named", [
    ("text.pool=mean", "text.pool: checkpoint 'last', model 'mean'"),
    ("vision.heads=4", "vision.heads: checkpoint 2, model 4"),  # the same tensor shapes
    ("vision.rope_theta=100.0", "vision.rope_theta: checkpoint 10000.0, model 100.0"),
])
def test_eval_refuses_a_config_the_checkpoint_was_not_trained_with(trained, capsys, change, named):
    """Each of these changes no tensor's name or shape, so the checkpoint loaded and the scores were wrong."""
    from fineviti.cli import main

    root, folder, _ = trained
    assert main(_args(root, "--checkpoint", str(folder), "--set", change)) == 2
    err = capsys.readouterr().err
    assert "checkpoint does not match the model config" in err and named in err, err


def test_an_exported_vision_tower_carries_its_config(trained, tmp_path, capsys):
    """`fineviti export`'s file holds the training config in its metadata: --vision-checkpoint is checked too."""
    from fineviti.cli import main
    from fineviti.train.export import export_model

    root, folder, model = trained
    out = export_model(model, tmp_path / "vision.safetensors", config=saved_config(folder))
    vision = json.loads(json.dumps(dataclasses.asdict(model.cfg.vision)))
    assert saved_model_config(out, "vision") == {"vision": vision, "embed_dim": 32}
    assert main(_args(root, "--vision-checkpoint", str(out), "--set", "vision.heads=4")) == 2
    assert "vision.heads: checkpoint 2, model 4" in capsys.readouterr().err
    assert main(_args(root, "--vision-checkpoint", str(out))) == 0
    capsys.readouterr()
    # as --checkpoint (which takes the whole stage-1 model) it was a list of missing tensors; now where it goes
    assert main(_args(root, "--checkpoint", str(out))) == 2
    assert "holds a vision tower alone (fineviti export's default --part vision): pass it as --vision-checkpoint" \
        in capsys.readouterr().err
    stage2 = tmp_path / "stage2" / "step-00000001"
    stage2.mkdir(parents=True)
    (stage2 / "config.json").write_text(json.dumps({"training": {"stage": 2}}))
    (stage2 / ".metadata").write_bytes(b"")  # (only the config is read)
    assert main(_args(root, "--checkpoint", str(stage2))) == 2
    assert "is of a stage-2 run (the aligner, which has no text tower): pass it as --vision-checkpoint" \
        in capsys.readouterr().err


def test_coco_instances_reads_cocos_own_layout(tmp_path):
    """COCO ships DATA/annotations/ beside DATA/val2017/: the default once looked for the images in DATA itself,
    which fit no real layout. A flat folder (the images beside the annotations' folder) still works."""
    import argparse
    import shutil

    from fineviti.eval import cli
    from tests import fixtures_eval as fx

    annotations = fx.build_coco_instances(tmp_path)
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    shutil.move(str(annotations), coco / "annotations" / "instances_val2017.json")
    for image in tmp_path.glob("*.jpg"):
        shutil.move(str(image), coco / "val2017" / image.name)
    args = argparse.Namespace(data=str(coco), format="coco_instances", annotations=None, split=None,
                              class_names=None)
    regions = cli.load_sets(args)["regions"]
    assert len(regions.records) > 0


def test_templates_from_a_file(tmp_path):
    """--templates takes a file (e.g. CLIP's 80 ImageNet prompts, for numbers comparable with published ones)."""
    from fineviti.eval import cli

    assert len(cli._templates("imagenet")) == 7 and cli._templates(None) is None
    path = tmp_path / "templates.txt"
    path.write_text("# CLIP-style\na photo of a {}.\n\nitap of a {}.\n")
    assert cli._templates(str(path)) == ("a photo of a {}.", "itap of a {}.")
    path.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(ValueError, match="'a photo' without"):
        cli._templates(str(path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        cli._templates(str(tmp_path / "missing.txt"))


def test_an_explicit_preset_that_matches_the_checkpoint_is_accepted(trained, capsys):
    """--preset with the first run's --set overrides: the text tower's vocab comes from the tokenizer, as training
    takes it (it took the preset's 8192 for a while, and the saved config then refused the model)."""
    from fineviti.cli import main

    root, folder, _ = trained
    sets = [f"--set={k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in SMALL.items()]
    assert main(_args(root, "--checkpoint", str(folder), "--preset", "tiny", *sets, "--set", "text.pool=last")) == 0
    capsys.readouterr()


def test_region_method_for_a_format_without_regions_is_an_error(tmp_path, capsys):
    """--region-method was taken and ignored for formats without a region task; an input the format does not use is
    an error, as --split and --annotations are."""
    from fineviti.cli import main

    argv = ["eval", "--format", "shards", "--data", str(tmp_path), "--region-method", "roi_align"]
    assert main(argv) == 2
    assert "--region-method does not apply to --format shards" in capsys.readouterr().err
    assert main(["eval", "--format", "coco", "--data", str(tmp_path), "--templates", "imagenet"]) == 2
    assert ("--templates does not apply to --format coco (it applies to imagenet, coco_instances, synthetic)"
            in capsys.readouterr().err)  # (it was taken and ignored)
    assert main(["eval", "--format", "shards", "--data", str(tmp_path), "--device", "cdua"]) == 2
    assert "--device must be a torch device such as cpu, cuda or cuda:1, got 'cdua'" in capsys.readouterr().err


def test_a_run_folder_means_its_newest_complete_checkpoint(trained, tmp_path, capsys):
    """--checkpoint and --vision-checkpoint take a run folder (or its checkpoints/) as `train --resume` and
    stage2.init_from do: the newest complete step, its config.json with it; an unfinished step (no .metadata) is
    passed over."""
    import shutil

    from fineviti.cli import main
    from fineviti.eval.checkpoint import checkpoint_path

    root, folder, _ = trained
    run = tmp_path / "run"
    for step in (1, 3):
        shutil.copytree(folder, run / "checkpoints" / f"step-{step:08d}")
    (run / "checkpoints" / "step-00000005").mkdir()  # a save that never finished
    (run / "config.json").write_text("{}")  # the run's own config.json beside checkpoints/ is not a checkpoint's
    newest = run / "checkpoints" / "step-00000003"
    assert checkpoint_path(run) == checkpoint_path(run / "checkpoints") == newest
    assert checkpoint_path(folder) == folder and saved_model_config(run) == saved_model_config(folder)
    for flag, key in (("--checkpoint", "checkpoint"), ("--vision-checkpoint", "vision_checkpoint")):
        out = tmp_path / f"eval_{key}"
        assert main(_args(root, flag, str(run), "--set", "attn_backend=torch", "--out", str(out))) == 0
        assert json.loads((out / "report.json").read_text())["meta"]["loaded"][key]["path"] == str(newest)
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    capsys.readouterr()
    assert main(_args(root, "--checkpoint", str(empty), "--set", "attn_backend=torch")) == 2
    assert "nor a run folder with a complete checkpoint in checkpoints/" in capsys.readouterr().err


def test_a_missing_data_folder_is_named(tmp_path, capsys):
    from fineviti.cli import main

    missing = tmp_path / "nowhere"
    assert main(["eval", "--format", "synthetic", "--data", str(missing)]) == 2
    assert f"--data '{missing}' does not exist (the synthetic benchmark's folder)" in capsys.readouterr().err


def test_a_bad_traceback_flag_is_one_error_line(tmp_path, capsys, monkeypatch):
    """FINEVITI_TRACEBACK was read in the error handler: a bad value raised there, two chained tracebacks burying
    the error being reported. It is read before the work now, and a bad value is one line, as FINEVITI_CHECKS's."""
    from fineviti.cli import main

    monkeypatch.setenv("FINEVITI_TRACEBACK", "maybe")
    assert main(["eval", "--format", "synthetic", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "FINEVITI_TRACEBACK" in err and "maybe" in err and "Traceback" not in err, err
    monkeypatch.setenv("FINEVITI_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["eval", "--format", "synthetic", "--data", str(tmp_path / "nowhere")])

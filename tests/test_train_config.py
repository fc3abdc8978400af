"""Training configs: presets, key=value overrides (types, unknown keys, bad values), the saved JSON, the CLI."""

import json

import pytest

from fineviti import cli
from fineviti.train.config import (
    PRESETS,
    apply_cli_overrides,
    from_dict,
    parse_profile,
    parse_text_schedule,
    preset,
    text_length_at,
    to_dict,
    to_json,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = preset(name)
    cfg.validate()
    assert to_dict(from_dict(json.loads(to_json(cfg)))) == to_dict(cfg)


def test_overrides_are_typed():
    cfg = apply_cli_overrides(preset("tiny"), [
        "training.steps=7", "optimizer.lr=3e-4", "optimizer.betas=0.8,0.9", "parallel.compile=true",
        "model.vision.depth=2", "data.token_budget=1024", "aligner.merger_hidden=none", "aligner.merger_out=64",
        "name=x", "checkpoint.resume=auto"])
    assert cfg.training.steps == 7 and isinstance(cfg.training.steps, int)
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.parallel.compile is True and cfg.model.vision.depth == 2 and cfg.data.token_budget == 1024
    assert cfg.aligner.merger_hidden is None and cfg.aligner.merger_out == 64
    assert cfg.out_dir == "runs/x"
    assert preset("tiny").training.steps != 7  # the preset itself is untouched


@pytest.mark.parametrize("override, message", [
    ("training.stepz=3", "unknown config key 'training.stepz': training has no 'stepz'"),
    ("nope=1", "unknown config key 'nope'"),
    ("model.vision.depth.x=1", "'model.vision.depth' is not a section"),
    ("training=1", "is a section"),
    ("training.steps=ten", "'training.steps' takes an int, got 'ten'"),
    ("optimizer.lr=fast", "'optimizer.lr' takes a float, got 'fast'"),
    ("parallel.compile=maybe", "takes a bool"),
    ("optimizer.betas=0.9", "takes 2 comma-separated values"),
    ("parallel.strategy=zero3", "parallel.strategy must be one of ['ddp', 'fsdp'], got 'zero3'"),
    ("training.steps=-1", "training.steps must be >= 1 (or 0 with data.epochs), got -1"),
    ("training.steps=0", "training.steps=0 (run to the end of data.epochs) needs data from shards with data.epochs "
                         "set, got data.epochs=None"),
    ("training.steps=0 data.epochs=1 training.data_source=random",
     "got training.data_source='random'; set training.data_source=shards with data.path, or training.steps >= 1"),
    ("training.text_length=64:0", "training.text_length"),
    ("training.text_length=0:64,800:256,800:32", "training.text_length gives step 800 more than one length"),
    ("model.vision.image_std=0.5,0,0.5", "vision.image_std must be three finite numbers > 0, got (0.5, 0.0, 0.5)"),
    ("metrics.profile=5:2", "1 <= START <= END"),
    ("stage2.freeze=vision,eyes", "stage2.freeze must be one of"),
    ("model.vision.heads=5", "divisible"),
    ("steps", "must look like key=value"),
    ("data.window=0", "data.window must be an integer >= 1, got 0"),
    ("training.stage=2 training.grad_cache_images=2", "stage 2 runs each batch in one forward and backward"),
    ("model.vision.rope_theta=0", "vision.rope_theta must be a finite number > 0, got 0"),
    ("model.text.norm_eps=-1e-6", "text.norm_eps must be a finite number >= 0"),
    ("model.attn_backend=flash", "attn_backend must be one of ['auto', 'triton', 'torch'"),
    ("model.loss_backend=fused", "loss_backend must be one of"),
    ("model.rope_backend=cudnn", "rope_backend must be one of"),
    ("data.seed=-1", "data.seed must be an integer >= 0, got -1"),
    ("data.norm=clap", "data.norm must be one of ['clip', 'siglip'], got 'clap'"),  # a KeyError at the first batch
    ("data.dtype=uint8", "data.dtype must be one of ['bfloat16', 'float16', 'float32']"),  # silently zeroed patches
    ("data.max_text_tokens=1", "data.max_text_tokens must be >= 2"),
    # accepted before, each with a silent effect: clipping off, negative learning rates, a warmup above lr, no trace
    ("training.grad_clip=nan", "training.grad_clip must be a number, got nan"),
    ("optimizer.weight_decay=nan", "optimizer.weight_decay must be a number, got nan"),
    ("scheduler.min_lr_ratio=-1", "scheduler.min_lr_ratio must be in [0, 1]"),
    ("scheduler.warmup_init=5", "scheduler.warmup_init must be in [0, 1]"),
    ("training.steps=6 metrics.profile=5:100", "ends after the run's last step (training.steps = 6)"),
    # passed validation, then a traceback from torch or numpy at the first step (or from the first evaluation)
    ("optimizer.betas=0.9,2", "optimizer.betas must be two numbers in [0, 1)"),
    ("optimizer.eps=-1", "optimizer.eps must be a finite number >= 0, got -1"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay must be a finite number >= 0, got -1"),
    ("optimizer.lr=inf", "optimizer.lr must be a finite number > 0, got inf"),
    ("random_data.seed=-5", "random_data.seed must be >= 0, got -5"),
    ("training.stage=2 training.seed=-1", "training.seed must be >= 0 in stage 2, got -1"),
    ("eval.max_images=-1", "eval.max_images must be >= 0, got -1"),  # silently dropped the last image
    ("eval.every=1 eval.path=x eval.token_budget=0", "eval.token_budget must be >= 1, got 0"),
    ("eval.every=1 eval.path=x training.data_source=random", "eval.every needs training.data_source=shards"),
    ("name=", "name must name a folder inside runs/"),  # trained into runs/ itself
    ("name=.", "name must name a folder inside runs/"),
    ("name=a/../..", "name must name a folder inside runs/"),
    ("name=/abs", "name must name a folder inside runs/"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises((KeyError, ValueError)) as info:
        apply_cli_overrides(preset("tiny"), override.split(" "))
    text = info.value.args[0] if info.value.args else str(info.value)
    assert message in text


def test_infinite_settings_are_strict_json_and_read_back():
    """training.grad_clip=inf and data.max_aspect=inf (no limit) were written as Infinity, which strict JSON
    readers refuse (config.json, an export's metadata): "inf" now, read back as the float."""
    import json

    from fineviti.train.config import from_dict, to_dict, to_json

    cfg = apply_cli_overrides(preset("debug"), ["training.grad_clip=inf", "data.max_aspect=inf"])
    saved = json.loads(to_json(cfg), parse_constant=lambda name: pytest.fail(name))
    assert saved["training"]["grad_clip"] == "inf" and saved["data"]["max_aspect"] == "inf"
    again = from_dict(saved)
    assert again.training.grad_clip == float("inf") and to_dict(again) == to_dict(cfg)


def test_schedules():
    schedule = parse_text_schedule("0:64, 800:256")
    assert [text_length_at(schedule, s) for s in (0, 799, 800, 10**6)] == [64, 64, 256, 256]
    assert parse_text_schedule("128") == [(0, 128)]
    with pytest.raises(ValueError, match="start at step 0"):
        parse_text_schedule("10:64")
    assert parse_profile("") is None and parse_profile("3:5") == (3, 5)


def test_cli_print_config_and_errors(capsys, tmp_path):
    assert cli.main(["train", "--preset", "debug", "--print-config", "training.steps=3", "--resume",
                     "--profile", "2:3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["training"]["steps"] == 3 and printed["checkpoint"]["resume"] == "auto"
    assert printed["metrics"]["profile"] == "2:3"
    # an override right after a bare --resume is an override, not the checkpoint's path
    assert cli.main(["train", "--preset", "debug", "--print-config", "--resume", "training.steps=5",
                     "optimizer.lr=1e-3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["training"]["steps"] == 5 and printed["checkpoint"]["resume"] == "auto"
    assert printed["optimizer"]["lr"] == 1e-3
    assert cli.main(["train", "--preset", "debug", "--print-config", "--resume", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"]["resume"] == str(tmp_path)
    # overrides after an option: argparse stopped the positional list at the option and refused the rest
    assert cli.main(["train", "--preset", "debug", "training.steps=3", "--print-config", "optimizer.lr=0.5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["training"]["steps"] == 3 and printed["optimizer"]["lr"] == 0.5
    assert cli.main(["train", "--preset", "debug", "--print-config", "notanoverride"]) == 2
    assert "override 'notanoverride' must look like key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "debug", "--print-config", "a=1", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    # overrides of a section this run does not read: taken without a word before, a warning now
    assert cli.main(["train", "--preset", "debug", "--print-config", "data.path=/x", "model.vision.depth=3",
                     "stage2.freeze=lm", "aligner.embed_dim=8", "training.steps=3"]) == 0
    err = capsys.readouterr().err
    assert "data.path is not used by this run (training.data_source is random" in err
    assert "stage2.freeze is not used" in err and "aligner.embed_dim is not used" in err
    assert "model.vision.depth" not in err and "training.steps" not in err
    assert cli.main(["train", "--preset", "debug", "--print-config", "training.stage=2", "model.vision.depth=3"]) == 0
    assert "model.vision.depth is not used by this run (stage 2 builds its model from aligner.*)" in \
        capsys.readouterr().err
    assert cli.main(["train", "--preset", "debug", "--print-config", "training.stage=2", "training.text_length=8"]) == 0
    assert "training.text_length is not used by this run (it cuts stage 1's captions" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "debug", "--print-config", "training.text_length=8"]) == 0
    assert "text_length" not in capsys.readouterr().err
    assert cli.main(["train", "--preset", "debug", "training.bogus=1"]) == 2
    assert "unknown config key 'training.bogus'" in capsys.readouterr().err


def test_cli_train_runs_and_saves_config(capsys, tmp_path):
    run_dir = tmp_path / "cli"
    assert cli.main(["train", "--preset", "debug", f"run_dir={run_dir}", "training.steps=2"]) == 0
    assert "finished step 2" in capsys.readouterr().out
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["training"]["steps"] == 2 and saved["run_dir"] == str(run_dir)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2
    # --resume where there is nothing to resume (a typo in run_dir, another preset's name): an error, not a run
    # that starts over at step 0 without a word
    assert cli.main(["train", "--preset", "debug", f"run_dir={tmp_path / 'typo'}", "--resume"]) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert not (tmp_path / "typo" / "metrics.jsonl").exists()


def test_cli_errors_are_one_line_and_exit_2(capsys, tmp_path):
    """A bad path or value is one line naming it and exit status 2 (they were tracebacks, exit 1); raised while
    steps run, an error keeps its traceback."""
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--preset", "debug", f"run_dir={run_dir}", "training.steps=2"]) == 0
    config_before = (run_dir / "config.json").read_text()
    capsys.readouterr()
    cases = [
        (["train", "--preset", "debug", f"run_dir={run_dir}", "optimizer.lr=0.5", "--resume", str(tmp_path / "no")],
         "no complete checkpoint"),
        (["train", "--preset", "debug", "training.data_source=shards", "data.path=/nonexistent/shards",
          "eval.every=1", "eval.path=/nonexistent/heldout", f"run_dir={tmp_path / 'e'}"], "eval.path:"),
        (["data", "synth", "--out", str(tmp_path / "d"), "--images", "0"], "images must be >= 1"),
        (["data", "synth", "--out", str(tmp_path / "d"), "--images", "2", "--processes", "0"],
         "processes must be >= 1"),
        (["export", str(tmp_path / "no"), "--out", str(tmp_path / "v.safetensors")], "no complete checkpoint"),
        (["export", str(run_dir), "--out", str(tmp_path / "v.txt")], "ending in .safetensors"),
        (["demo", "--out", str(tmp_path / "demo"), "--heldout", "5"], "heldout must be at least"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"fineviti {argv[0]}: error:" in err and message in err and "Traceback" not in err, (argv, err)
    assert cli.main(["train", "--preset", "debug", f"run_dir={run_dir}", "--resume", ""]) == 2  # was a fresh run
    assert "--resume takes a checkpoint path or nothing" in capsys.readouterr().err
    # the failed resume left the run's config.json as it was (it was written before the resume was looked for)
    assert (run_dir / "config.json").read_text() == config_before
    # resumed at the last step: said so
    assert cli.main(["train", "--preset", "debug", f"run_dir={run_dir}", "training.steps=2", "--resume"]) == 0
    assert "nothing to train" in capsys.readouterr().out


def test_cli_keeps_the_traceback_of_an_error_while_the_work_runs(monkeypatch, tmp_path):
    """Raised in the steps or at a run's end (the export, the last checkpoint), a ValueError or KeyError may be a
    bug: it keeps its traceback instead of becoming a one-line usage error."""
    from fineviti.train.trainer import Trainer

    def broken(self):
        raise ValueError("a bug inside a step")

    monkeypatch.setattr(Trainer, "_train", broken)
    with pytest.raises(ValueError, match="a bug inside a step"):
        cli.main(["train", "--preset", "debug", f"run_dir={tmp_path / 'run'}", "training.steps=2"])
    monkeypatch.undo()
    monkeypatch.setattr(Trainer, "_close", lambda self: {}["loss"])
    with pytest.raises(KeyError, match="loss"):
        cli.main(["train", "--preset", "debug", f"run_dir={tmp_path / 'run2'}", "training.steps=2"])


@pytest.mark.parametrize("override", ["name=exp/a", "name= run_dir=RUN", "training.seed=-1", "optimizer.eps=0"])
def test_values_that_worked_still_validate(override, tmp_path):
    """A nested run name (runs/exp/a), any name with run_dir set, a negative seed in stage 1 and eps 0 (torch's
    AdamW takes it) trained before the stricter checks: they still do."""
    apply_cli_overrides(preset("tiny"), override.replace("RUN", str(tmp_path)).split(" "))


def test_export_refuses_to_replace_a_file_without_overwrite(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--preset", "debug", f"run_dir={run_dir}", "training.steps=2"]) == 0
    out = tmp_path / "v.safetensors"
    out.write_text("someone's file")
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "someone's file"
    assert cli.main(["export", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert out.stat().st_size > 100 and (tmp_path / "v.safetensors.json").is_file()
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path)]) == 2
    assert "ending in .safetensors" in capsys.readouterr().err
    (tmp_path / "x.safetensors").mkdir()
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "is a folder" in capsys.readouterr().err

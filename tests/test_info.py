"""`fineviti info`: what it reports, as text and JSON, through the CLI and the console script."""

import importlib.abc
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fineviti import _ext, cli, info


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def test_info_json_reports_this_environment(capsys):
    import fineviti.ops.attention  # noqa: F401  (registers Python custom ops in the same namespace)

    code, out = run_cli(capsys, "info", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["torch"]["version"] == torch.__version__
    assert report["python"]["executable"] == sys.executable
    assert report["cuda"]["available"] == torch.cuda.is_available()
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    ext = report["extension"]
    assert ext["loaded"] is True, ext["error"]
    assert {"build_positions", "cuda_built", "cuda_arch_list"} <= set(ext["ops"])
    assert "varlen_attention_fwd" not in ext["ops"]  # the extension's own ops only, not Python's custom ops
    assert ext["cuda_built"] == torch.ops.fineviti.cuda_built()
    assert ("build_positions" in ext["cuda_ops"]) == ext["cuda_built"]
    import triton

    assert report["triton"]["version"] == triton.__version__
    for name in ("flash_attn", "xformers", "apex"):
        assert report["optional"][name]["status"] == "unverified"
    assert "unverified" in report["optional"]["nvidia.dali"]["status"]
    # which attention backends can run here (the "which backends ... are importable"), and auto's pick
    from fineviti.ops.attention import BACKENDS, backend_available

    cpu = report["attention_backends"]["cpu"]
    assert set(cpu) == {*BACKENDS, "auto"} and cpu["torch"] == "yes" and cpu["auto"] == "torch"
    assert cpu["flash_attn"] == backend_available("flash_attn", "cpu")[1] != "yes"


def test_info_text(capsys):
    code, out = run_cli(capsys, "info")
    assert code == 0
    assert f"torch        {torch.__version__}" in out
    assert "build_positions" in out
    assert "flash_attn" in out and "[unverified]" in out
    assert "attention backends (varlen_attention):" in out and "auto: torch" in out


class BrokenInstall(importlib.abc.MetaPathFinder):
    """An installed package whose import fails with something other than ImportError."""

    def find_spec(self, name, path=None, target=None):
        if name == "apex":
            raise RuntimeError("apex was built for another torch")
        return None


def test_optional_packages_are_probed_by_import(monkeypatch):
    fake = types.ModuleType("flash_attn")
    fake.__version__ = "9.9.9"
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.delitem(sys.modules, "apex", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenInstall(), *sys.meta_path])
    report = info.collect()["optional"]
    assert report["flash_attn"] == {"importable": True, "version": "9.9.9", "status": "unverified", "error": None}
    assert report["apex"] == {
        "importable": False,
        "version": None,
        "status": "unverified",
        "error": "RuntimeError: apex was built for another torch",
    }


def test_info_without_the_extension(monkeypatch):
    monkeypatch.setattr(_ext, "load", lambda required=True: False)
    monkeypatch.setattr(_ext, "load_error", lambda: ImportError("no _C here"))
    report = info.collect()
    assert report["extension"] == {"loaded": False, "path": None, "error": "no _C here"}
    assert "extension    not loaded: no _C here" in info.format_text(report)


def test_cli_without_a_command_prints_usage(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])


def test_console_script():
    script = Path(sys.executable).parent / "fineviti"
    if not script.exists():
        pytest.skip(f"fineviti is not installed into {sys.executable}'s environment (no {script})")
    done = subprocess.run([str(script), "info", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["extension"]["loaded"] is True


def test_bench_lists_the_benchmarks(capsys):
    """`fineviti bench` lists every bench_*.py of the checkout's benchmarks/ and the kernel report, each with its
    docstring's first paragraph on one line."""
    code, out = run_cli(capsys, "bench")
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines()[1:]}
    folder = cli.benchmarks_dir()
    assert listed == {p.stem.removeprefix("bench_") for p in folder.glob("bench_*.py")} | {"report"}
    assert any(line.split()[:2] == ["attention", "Varlen"] for line in out.splitlines())


def test_bench_runs_the_script_with_its_arguments(capfd):
    """NAME's arguments reach the script (lm-loss and lm_loss alike), and its exit status is the command's."""
    assert cli.main(["bench", "lm-loss", "--help"]) == 0
    assert "usage: bench_lm_loss.py" in capfd.readouterr().out
    assert cli.main(["bench", "rope", "--no-such-option"]) == 2
    assert "bench_rope.py: error: unrecognized arguments: --no-such-option" in capfd.readouterr().err


def test_bench_errors_name_what_is_missing(capsys, monkeypatch):
    assert cli.main(["bench", "attn"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark named 'attn'" in err and "'attention'" in err
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: None)
    assert cli.main(["bench"]) == 2
    assert "was not installed from one: clone the repository and `pip install -e .`" in capsys.readouterr().err


def test_bench_reports_a_killed_benchmark_as_a_shell_does(monkeypatch):
    """A benchmark killed by signal N exits 128 + N (subprocess's -N became 256 - N through sys.exit)."""
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, -9))
    assert cli.main(["bench", "rope"]) == 137

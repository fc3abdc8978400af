"""The kernel report compiles what runs: every Triton kernel that kernels/*.py launches is declared in
fineviti.kernels.registry (an undeclared one would never be compiled or checked by CI), and the elementwise
launchers pass the warps and stages their registry rows declare. No compiles: the modules' source is read with `ast`
and the launches are recorded, not run.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import kernel_report as kr  # noqa: E402

pytest.importorskip("triton")


def _is_jit(obj) -> bool:
    """A @triton.jit function (JITFunction, or InterpretedFunction under TRITON_INTERPRET), bare or autotuned."""
    try:
        return kr._python_function(obj) is not obj
    except (TypeError, AttributeError):
        return False


def _resolve(node: ast.expr, namespace: dict):
    """The object a launch subscripts (`NAME[grid](...)` or `module.NAME[grid](...)`) in the module's namespace."""
    if isinstance(node, ast.Name):
        return namespace.get(node.id, KeyError)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, namespace)
        return KeyError if base is KeyError else getattr(base, node.attr, KeyError)
    return KeyError


def _launches(files: list[tuple[Path, str]]) -> list[tuple[str, int, str, object]]:
    """(file, line, expression, object) of every `X[...](...)` call in the files, each with its module's name."""
    import importlib

    found = []
    for path, module_name in files:
        module = importlib.import_module(module_name)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                target = node.func.value
                found.append((path.name, node.lineno, ast.unparse(target), _resolve(target, vars(module))))
    return found


def _undeclared(files: list[tuple[Path, str]]) -> tuple[list[str], list[str], int]:
    """The launches of jit functions that no registry declaration holds, the launches the scan cannot resolve, and
    how many jit launches it found."""
    from fineviti.kernels import registry

    declared = {kr._python_function(d.fn) for d in registry.declared().values()}
    launches = _launches(files)
    jit_launches = [(f, line, expr, obj) for f, line, expr, obj in launches if obj is not KeyError and _is_jit(obj)]
    unresolved = [f"{f}:{line} {expr}[...](...)" for f, line, expr, obj in launches if obj is KeyError]
    undeclared = [f"{f}:{line} {expr}" for f, line, expr, obj in jit_launches
                  if kr._python_function(obj) not in declared]
    return undeclared, unresolved, len(jit_launches)


def _kernel_modules() -> list[tuple[Path, str]]:
    return [(path, "fineviti.kernels" + ("" if path.stem == "__init__" else f".{path.stem}"))
            for path in sorted((REPO / "kernels").glob("*.py"))]


def test_every_launched_triton_kernel_is_declared_in_the_registry():
    undeclared, unresolved, found = _undeclared(_kernel_modules())
    assert found >= 13  # the scan finds the launches it should (attention 4, losses 4, norm 2, SwiGLU 2, RoPE 1)
    # a subscript call through a local name cannot be told from a dict lookup: launch a kernel by its global name
    assert not unresolved, f"launches through names that are not module globals: {unresolved}"
    assert not undeclared, (f"Triton kernels launched but not declared in fineviti.kernels.registry, so the kernel "
                            f"report never compiles them: {undeclared}")


def test_the_scan_finds_an_undeclared_launch(tmp_path, monkeypatch):
    (tmp_path / "kernel_report_stray_module.py").write_text(
        "import triton\nimport triton.language as tl\n\n\n@triton.jit\ndef stray_kernel(x_ptr):\n"
        "    tl.store(x_ptr, 1.0)\n\n\ndef launch(x):\n    stray_kernel[(1,)](x)\n    local = {}\n"
        "    local['k'](x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    undeclared, unresolved, found = _undeclared([(tmp_path / "kernel_report_stray_module.py",
                                                  "kernel_report_stray_module")])
    assert found == 1 and undeclared == ["kernel_report_stray_module.py:11 stray_kernel"]
    assert unresolved == ["kernel_report_stray_module.py:13 local[...](...)"]
    sys.modules.pop("kernel_report_stray_module", None)


class _Recorder:
    """Stands in for a @triton.jit function: `kernel[grid](*args, **kwargs)` records the keyword arguments."""

    def __init__(self):
        self.launches: list[dict] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


def _launched(monkeypatch, module, kernel_attr: str, run) -> dict:
    rec = _Recorder()
    monkeypatch.setattr(module, kernel_attr, rec)
    run()
    assert len(rec.launches) == 1
    return rec.launches[0]


def _cases():
    from fineviti.kernels import rmsnorm, swiglu

    for width in rmsnorm.SHIPPED_WIDTHS:
        x, w = torch.randn(3, width), torch.randn(width)
        yield rmsnorm, "rmsnorm_fwd", "rmsnorm_fwd_kernel", lambda x=x, w=w: rmsnorm.forward(x, w, 1e-6)
        rstd = torch.rand(3)
        yield rmsnorm, "rmsnorm_bwd", "rmsnorm_bwd_kernel", lambda x=x, w=w, r=rstd: rmsnorm.backward(x, x, w, r)
    for hidden in swiglu.SHIPPED_HIDDEN:
        gu, dh = torch.randn(3, 2 * hidden), torch.randn(3, hidden)
        yield swiglu, "swiglu_fwd", "swiglu_fwd_kernel", lambda gu=gu: swiglu.forward(gu)
        yield swiglu, "swiglu_bwd", "swiglu_bwd_kernel", lambda gu=gu, dh=dh: swiglu.backward(dh, gu)


def test_elementwise_launches_pass_the_warps_and_stages_their_rows_declare(monkeypatch):
    """The report compiles a row with its num_warps and num_stages; a launch that leaves num_stages out runs with
    Triton's default instead, which is not what the report measured."""
    from fineviti.kernels import registry

    checked = 0
    for module, name, attr, run in _cases():
        kwargs = _launched(monkeypatch, module, attr, run)
        constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        rows = [r for r in registry.shipped(name) if r.constexprs == constexprs]
        assert rows, f"{name}: the launch with {constexprs} matches no shipped row"
        for r in rows:
            assert (kwargs.get("num_warps"), kwargs.get("num_stages")) == (r.num_warps, r.num_stages), \
                f"{name} [{r.label}]: launch passes num_warps={kwargs.get('num_warps')}, " \
                f"num_stages={kwargs.get('num_stages')}; the registry row {r.num_warps}, {r.num_stages}"
        monkeypatch.undo()
        checked += 1
    assert checked == 2 * 8 + 2 * 6

"""benchmarks/kernel_report.py --check as a gate: what it must not let through (a declared kernel with no rows, a
callee's spills, undeclared dynamic shared memory), a compile process that dies, and flags it must refuse before
compiling anything. Compiles only the tiny fixtures of tests/kernels_for_report.py and one small .cu.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import kernel_report as kr  # noqa: E402
from tests import kernels_for_report as fixtures  # noqa: E402
from tests.test_kernel_report import _nvcc_available  # noqa: E402

pytest.importorskip("triton")


@pytest.fixture
def run_main(monkeypatch, capsys):
    """kr.main in this process (nothing to compile in these cases); main drops TRITON_INTERPRET, put back after."""
    if "TRITON_INTERPRET" in os.environ:
        monkeypatch.setenv("TRITON_INTERPRET", os.environ["TRITON_INTERPRET"])

    def run(*argv):
        try:
            rc = kr.main(list(argv))
        except SystemExit as exc:
            rc = exc
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


# ---------------------------------------------------------------------------------------------------------------
# Declared kernels and --kernel
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def empty_declaration(monkeypatch):
    from fineviti.kernels import registry

    registry.declared()  # every real kernel first, so that the fixture is one more
    monkeypatch.setitem(registry._REGISTRY, "fixture_empty",
                        registry.Declared("fixture_empty", fixtures.tiny_copy_kernel, lambda: []))
    return "fixture_empty"


def test_a_declared_kernel_without_configurations_fails_the_check(run_main, empty_declaration, tmp_path):
    rc, out, err = run_main("--kernel", empty_declaration, "--check", "--no-csrc", "--out", str(tmp_path))
    assert rc == 1, out + err
    assert "fixture_empty: declared in fineviti.kernels.registry, but its configurations function returned no rows" \
        in err
    md = (tmp_path / "kernel_report.md").read_text()
    assert "Check: FAILED" in md and "- fixture_empty: declared" in md


def test_a_partial_report_goes_to_latest_without_out(run_main, empty_declaration, tmp_path, monkeypatch):
    """Without --out, a report of one kernel (or --quick, --rows) goes to benchmarks/results/latest/, which git
    ignores: it once replaced the committed full report in benchmarks/results/."""
    monkeypatch.setattr(kr, "DEFAULT_OUT", tmp_path / "results")
    rc, out, err = run_main("--kernel", empty_declaration, "--no-csrc")
    assert rc == 0, out + err
    assert (tmp_path / "results" / "latest" / "kernel_report.md").is_file()
    assert not (tmp_path / "results" / "kernel_report.md").exists()


def test_the_full_registry_names_its_declared_kernels_without_rows(empty_declaration):
    rows, problems = kr.load_rows(None, None)  # rows only: nothing compiles
    assert rows and [p.split(":")[0] for p in problems] == ["fixture_empty"]


def test_unknown_kernel_lists_the_registry_names(run_main, tmp_path):
    from fineviti.kernels import registry

    rc, out, err = run_main("--kernel", "no_such_kernel", "--no-csrc", "--out", str(tmp_path))
    message = str(rc)
    assert isinstance(rc, SystemExit) and "--kernel 'no_such_kernel'" in message, (rc, out, err)
    listed = re.search(r"\[(.*)\]", message)[1]
    assert sorted(n.strip(" '") for n in listed.split(",")) == sorted(registry.declared())
    assert "'contrastive_fwd'" in message and "contrastive_fwd_kernel" not in message


# ---------------------------------------------------------------------------------------------------------------
# Flags refused before anything compiles
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["arch", "out_file", "out_under_file", "rows_module", "rows_function", "csrc_file",
                                  "csrc_missing", "csrc_empty"])
def test_bad_flags_are_refused_naming_flag_and_value(run_main, tmp_path, case):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    (tmp_path / "empty").mkdir()
    no_rows = ["--rows", "tests.kernels_for_report:no_rows"]
    argv, expected = {
        "arch": (no_rows + ["--arch", "0"], "--arch 0: expected one of [90]"),
        "out_file": (no_rows + ["--out", str(a_file)], f"--out '{a_file}': expected a folder"),
        "out_under_file": (no_rows + ["--out", str(a_file / "sub")], f"--out '{a_file / 'sub'}': expected a folder"),
        "rows_module": (["--rows", "tests.no_such_module:rows"], "--rows 'tests.no_such_module:rows': cannot import "
                                                                 "module 'tests.no_such_module'"),
        "rows_function": (["--rows", "tests.kernels_for_report:no_such"],
                          "--rows 'tests.kernels_for_report:no_such': module 'tests.kernels_for_report' has no "
                          "function 'no_such'"),
        "csrc_file": (no_rows + ["--csrc", str(a_file)], f"--csrc '{a_file}': expected a folder of .cu files, got a "
                                                         "file"),
        "csrc_missing": (no_rows + ["--csrc", str(tmp_path / "absent")], "got a path that does not exist"),
        "csrc_empty": (no_rows + ["--csrc", str(tmp_path / "empty")], "got a folder with none"),
    }[case]
    if "--out" not in argv:  # so that a flag let through writes nothing into the repository
        argv = [*argv, "--out", str(tmp_path / "report")]
    rc, out, err = run_main(*argv, "--check")
    assert isinstance(rc, SystemExit) and rc.code == 2, (rc, out, err)
    assert expected in err, err
    assert "Traceback" not in err and not list(tmp_path.rglob("kernel_report.json"))


# ---------------------------------------------------------------------------------------------------------------
# A compile process that dies
# ---------------------------------------------------------------------------------------------------------------


def test_a_dying_compile_names_its_row_and_the_others_keep_their_results():
    """One job: the first row finishes in the pool, the second aborts its process (BrokenProcessPool for it and the
    third), both run again alone: the second dies again and is named with its exit code and stderr, the third
    compiles."""
    first, dying, last = kr.compile_rows(fixtures.dying_rows(), jobs=1)
    for row in (first, last):
        assert row["error"] is None and row["kernel"] == "fixture_copy" and row["regs"] > 0, row
    assert (dying["kernel"], dying["config"]) == ("fixture_aborts", "aborts")
    assert "BrokenProcessPool" not in dying["error"]
    assert dying["exit_code"] == -6 and "exit code -6 (SIGABRT)" in dying["error"]
    assert "this compile aborts on purpose" in dying["stderr_tail"]
    assert kr.failures(dying) and "compile process died" in kr.failures(dying)[0]


# ---------------------------------------------------------------------------------------------------------------
# Spills of a function the kernel calls
# ---------------------------------------------------------------------------------------------------------------


def test_parsed_ptxas_log_tells_kernels_from_their_callees():
    log = kr.parse_ptxas_verbose(
        "ptxas info    : Compiling entry function '_Z6callerPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z6callerPf\n"
        "    488 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 32 registers, used 0 barriers, 488 bytes cumulative stack size\n"
        "ptxas info    : Function properties for _Z5heavyPKfi\n"
        "    0 bytes stack frame, 532 bytes spill stores, 788 bytes spill loads\n")
    assert log["_Z6callerPf"]["entry"] == 1 and log["_Z5heavyPKfi"]["entry"] == 0
    assert kr.callee_spills(log) == {"_Z5heavyPKfi": {"spill_stores": 532, "spill_loads": 788}}
    row = {"kernel": "caller", "config": "c", "regs": 32, "shared_bytes": 0, "local_bytes": 488,
           "local_instructions": 4, "spill_store_bytes": 0, "spill_load_bytes": 0, "warnings": [], "error": None}
    kr.add_callee_spills(row, kr.callee_spills(log), {"_Z5heavyPKfi": "heavy(const float*, int)"})
    assert row["spill_store_bytes"] == 532
    assert any("532 in heavy(const float*, int)" in f for f in kr.failures(row))


def test_triton_noinline_callee_spills_fail_the_kernel():
    """A Triton noinline function's spills: ptxas logs them under the callee; the kernel shows local memory only."""
    (row,) = kr.compile_rows([fixtures.noinline_spill_row()], jobs=1)
    assert row["error"] is None, row["error"]
    assert row["local_bytes"] > 0 and row["spill_store_bytes"] > 0
    (callee,) = row["callee_spills"]
    assert "_rownorm" in callee  # the jitted function's own name
    assert not any("not register spills" in w for w in row["warnings"]), row["warnings"]
    reasons = kr.failures(row)
    assert any("spills registers" in r and "_rownorm" in r for r in reasons), reasons


CALLEE_CU = r"""
// 96 live values in a helper that is not inlined, under its caller's 32-register cap: the helper spills.
__device__ __noinline__ float heavy(const float* x, int n) {
  float acc[96];
#pragma unroll
  for (int j = 0; j < 96; ++j) acc[j] = x[threadIdx.x + j * n];
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 96; ++j) s += acc[j] * acc[95 - j] + acc[(j * 7) % 96];
  return s;
}
__global__ void __launch_bounds__(256, 8) caller_kernel(const float* x, float* y, int n) {
  y[blockIdx.x * blockDim.x + threadIdx.x] = heavy(x, n);
}
__global__ void __launch_bounds__(128) plain_kernel(float* y) { y[threadIdx.x] = 1.f; }
__global__ void __launch_bounds__(128) undeclared_dynamic_kernel(float* y) {
  extern __shared__ float staged[];  /* } a brace in a comment */
  staged[threadIdx.x] = y[threadIdx.x];
  __syncthreads();
  y[threadIdx.x] = staged[(threadIdx.x + 1) % blockDim.x];
}
// kernel-report: declared_dynamic_kernel dynamic shared memory up to 512 bytes
__global__ void __launch_bounds__(128) declared_dynamic_kernel(float* y) {
  extern __shared__ float staged[];
  staged[threadIdx.x] = y[threadIdx.x];
  __syncthreads();
  y[threadIdx.x] = staged[(threadIdx.x + 1) % blockDim.x];
}
"""




@pytest.fixture(scope="module")
def callee_cu(tmp_path_factory):
    src = tmp_path_factory.mktemp("cu") / "callee.cu"
    src.write_text(CALLEE_CU)
    rows = kr.compile_cuda_file(src, 90, include_dirs=[])
    return src, {r["kernel"].split("(")[0]: r for r in rows}


@pytest.mark.skipif(not _nvcc_available(), reason="needs nvcc")
def test_cuda_noinline_callee_spills_count_against_its_caller(callee_cu, tmp_path):
    src, rows = callee_cu
    assert set(rows) == {"caller_kernel", "plain_kernel", "undeclared_dynamic_kernel", "declared_dynamic_kernel"}
    log = subprocess.run([str(kr.cuda_home() / "bin" / "nvcc"), "-cubin", "-arch=sm_90", "-Xptxas", "-v", "-O3",
                          "-std=c++20", str(src), "-o", str(tmp_path / "again.cubin")],
                         capture_output=True, text=True, check=True).stderr
    frames = {m[0]: int(m[1]) for m in
              re.findall(r"Function properties for (\w+)\s+\d+ bytes stack frame, (\d+) bytes spill stores", log)}
    helper = next(name for name in frames if "heavy" in name)
    assert frames[helper] > 0 and frames[rows["caller_kernel"]["function"]] == 0  # ptxas: the callee spills
    caller = rows["caller_kernel"]
    assert caller["spill_store_bytes"] == frames[helper]
    assert any("spills registers" in f and "heavy" in f for f in kr.failures(caller)), kr.failures(caller)
    assert not any("not register spills" in w for w in caller["warnings"])
    plain = rows["plain_kernel"]  # no local memory: cannot be running the spilling helper
    assert plain["spill_store_bytes"] == 0 and "callee_spills" not in plain and kr.failures(plain) == []


@pytest.mark.skipif(not _nvcc_available(), reason="needs nvcc")
def test_undeclared_dynamic_shared_memory_fails_naming_the_kernel(callee_cu):
    _, rows = callee_cu
    undeclared = rows["undeclared_dynamic_kernel"]
    reasons = kr.failures(undeclared)
    assert len(reasons) == 1 and "extern __shared__, callee.cu line 17" in reasons[0], reasons
    assert "// kernel-report: undeclared_dynamic_kernel dynamic shared memory up to BYTES bytes" in reasons[0]
    declared = rows["declared_dynamic_kernel"]
    assert declared["shared_bytes"] == 512 and kr.failures(declared) == []


def test_dynamic_shared_users_reads_kernels_and_helpers():
    source = (
        "// extern __shared__ in a comment is no use\n"
        "template <typename T>\n"
        "__global__ void __launch_bounds__(kThreads, 2) k1(T* x) {\n"
        "  if (x) { extern __shared__ float a[]; }\n"
        "}\n"
        "__device__ float* helper() { extern __shared__ float b[]; return b; }\n"
        "__global__ void k2(float* y);\n"
        "__global__ void k2(float* y) { y[0] = *helper(); }\n")
    assert kr.dynamic_shared_users(source) == ({"k1": 4}, [6])

"""benchmarks/kernel_report.py: compiles for sm_90 on this machine (no GPU), flags spills, finds HGMMA, and reads the
same figures out of a cubin as cuobjdump and nvdisasm print for it.

The compiles run in spawned processes without TRITON_INTERPRET (which conftest sets for this process); the figures
are checked against the tools' own output, parsed here independently of the report's parsers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import kernel_report as kr  # noqa: E402
from tests import kernels_for_report as fixtures  # noqa: E402

triton_spec = pytest.importorskip("triton")


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every fixture row compiled once for sm_90 (in two spawned processes), cubins kept: {kernel/config: row}."""
    keep = tmp_path_factory.mktemp("cubins")
    before = os.environ.get("TRITON_INTERPRET")
    rows = kr.compile_rows(fixtures.rows(), arch=90, jobs=2, keep_dir=keep)
    assert os.environ.get("TRITON_INTERPRET") == before  # the pytest process keeps its interpreter setting
    return {f"{r['kernel']}/{r['config']}": r for r in rows}


def _row(compiled, row):
    return compiled[f"{row.kernel_name}/{row.label}"]


# ---------------------------------------------------------------------------------------------------------------
# Occupancy arithmetic, by hand
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "regs, warps, smem, expected",
    [
        # 32 regs: 1024 per warp, 16 warps per sub-partition -> 64 warps; 8-warp blocks -> 8 (a tie names regs)
        (32, 8, 0, (8, "regs")),
        # 168 regs = 5376 per warp (21 x 256): 3 warps per sub-partition -> 12 warps -> 3 blocks of 4
        (168, 4, 8192, (3, "regs")),
        # 255 regs round up to 8192 per warp: 2 per sub-partition -> 8 warps -> 8 one-warp blocks
        (255, 1, 0, (8, "regs")),
        # 40 regs = 1280 per warp: 12 per sub-partition -> 48 warps -> 12 blocks of 4 ...
        (40, 4, 0, (12, "regs")),
        # ... but 41 regs = 1312, rounded to 1536: 10 per sub-partition -> 40 warps -> 10 blocks
        (41, 4, 0, (10, "regs")),
        # 56 KB + 1 KB reserved = 58368 B: exactly 4 in 228 KB
        (64, 4, 56 * 1024, (4, "smem")),
        # one byte more rounds to the next 128 B: 3
        (64, 4, 56 * 1024 + 1, (3, "smem")),
        # 227 KB is the most a block may have: 1 block; one byte more cannot launch
        (32, 4, 227 * 1024, (1, "smem")),
        (32, 4, 227 * 1024 + 1, (0, "smem")),
        # tiny blocks: the 32-blocks-per-SM cap
        (16, 1, 0, (32, "blocks")),
        # 16-warp blocks: 64 warps per SM -> 4
        (24, 16, 0, (4, "warps")),
        # 3 warps of 255 regs: 2 per sub-partition -> 8 warps -> 2 blocks (not 8/3 rounded up)
        (255, 3, 0, (2, "regs")),
        # 32 warps x 64 regs = 65536: one block; 65 regs (2304 per warp) exceeds the per-block register file
        (64, 32, 0, (1, "regs")),
        (65, 32, 0, (0, "regs")),
        (256, 4, 0, (0, "regs")),
        (32, 33, 0, (0, "threads")),
    ],
)
def test_blocks_per_sm_by_hand(regs, warps, smem, expected):
    assert kr.blocks_per_sm(regs, warps, smem) == expected


# ---------------------------------------------------------------------------------------------------------------
# The fixture kernels
# ---------------------------------------------------------------------------------------------------------------


def test_spilling_kernel_is_flagged(compiled):
    row = _row(compiled, fixtures.spilling_row())
    assert row["error"] is None
    assert row["local_bytes"] > 0 and row["local_instructions"] > 0
    reasons = kr.failures(row)
    assert row["spill_store_bytes"] > 0
    assert any("spills registers to local memory" in r for r in reasons), reasons


def test_declared_spill_allowance_turns_a_spill_into_a_warning(compiled):
    row = _row(compiled, fixtures.spilling_row())
    spills = row["spill_store_bytes"]
    assert spills > 0
    within = {**row, "warnings": [], "spill_allowance": spills, "spill_reason": "measured faster"}
    assert kr.failures(within) == []
    assert any("within its declared allowance" in w and "measured faster" in w for w in within["warnings"])
    short = {**row, "warnings": [], "spill_allowance": spills - 1}
    assert any("spills registers to local memory" in r for r in kr.failures(short))
    # compile_row carries the declared allowance into the row that failures() reads (a row that cannot compile is
    # enough to see the fields, and costs no compile)
    import dataclasses

    declared = dataclasses.replace(fixtures.spilling_row(), signature={}, spill_allowance=7, spill_reason="why")
    assert {"spill_allowance": 7, "spill_reason": "why"}.items() <= kr.compile_row(declared).items()


def test_attention_declares_only_its_measured_spill_exceptions():
    """The 128-column dk/dv tiles (atomic dq and deterministic) are the only shipped rows allowed to spill: at head
    dim 128 each with the measurement that justified it, and in split mode "masked" (80 and 96 in 128 columns, the
    default) with the H200 timing that made it the default where there is one, and "not timed" where not. The
    opt-in bulk-reduction dq (dkdv_tma) takes the same tiles with a smaller allowance, and says it is untimed."""
    from fineviti.kernels import registry

    declared = [r for r in registry.shipped() if r.spill_allowance]
    assert {r.kernel_name for r in declared} == {"attn_bwd_dkdv_atomic", "attn_bwd_dkdv", "attn_bwd_dkdv_tma"}
    for r in declared:
        assert "M64N128" in r.label
        if r.kernel_name == "attn_bwd_dkdv_tma":
            assert "not yet timed" in r.spill_reason and r.spill_allowance <= 64
        elif r.label.startswith("d128"):
            assert "measured on an H100" in r.spill_reason and r.spill_allowance <= 96
        else:
            assert "in128" in r.label and r.spill_allowance <= 112
            # the atomic-dq tile was timed masked (H200, d80); the deterministic one was not, and says so
            assert ("timed on an H200" if r.kernel_name == "attn_bwd_dkdv_atomic" else "not timed") in r.spill_reason


def test_clean_kernel_passes_and_uses_hgmma(compiled):
    row = _row(compiled, fixtures.clean_row())
    assert row["error"] is None
    assert kr.failures(row) == []
    assert row["warnings"] == []
    assert row["mma"] == "HGMMA" and row["mma_instructions"] > 0
    assert row["dot_types"] == ["f16"]
    assert row["local_bytes"] == 0 and row["stack_bytes"] == 0
    assert row["triton"] and row["arch"] == 90
    assert row["blocks_per_sm"] == kr.blocks_per_sm(row["regs"], row["num_warps"], row["shared_bytes"])[0] > 0


def test_register_cap_reaches_ptxas(compiled):
    """A row's maxnreg (the launch's register cap) is compiled with it: the report reads what the launch runs."""
    capped, clean = _row(compiled, fixtures.capped_row()), _row(compiled, fixtures.clean_row())
    assert capped["error"] is None and clean["error"] is None
    assert capped["regs"] <= 96 < clean["regs"]


def test_hmma_fallback_is_a_warning_not_a_failure(compiled):
    row = _row(compiled, fixtures.hmma_row())
    assert row["mma"] == "HMMA"
    assert kr.failures(row) == []
    assert any("HMMA" in w and "HGMMA" in w for w in row["warnings"]), row["warnings"]


def test_warp_specialisation_detected_and_missing_one_warned(compiled):
    ws = _row(compiled, fixtures.warp_specialized_row())
    assert ws["error"] is None, ws["error"]
    assert ws["warp_specialized"] is True and ws["warnings"] == []
    assert ws["num_warps"] > fixtures.warp_specialized_row().num_warps  # the producer warps Triton added
    asked = _row(compiled, fixtures.clean_row("bf16", warp_specialize=True))
    assert asked["warp_specialized"] is False
    assert any("warp specialisation" in w for w in asked["warnings"])
    assert kr.failures(asked) == []


@pytest.mark.gpu
def test_figures_match_the_cuda_driver(compiled):
    """On a GPU: registers, local memory, static shared memory and blocks per SM (also at other dynamic shared memory
    sizes, which tests the occupancy formula) as the CUDA driver reports them for the same cubins."""
    rows = [dict(r) for r in compiled.values() if not r.get("error")]
    assert kr.device_check(rows) == []
    assert all(r["device"]["probes"] for r in rows)


def test_compile_failure_names_the_cause(compiled):
    row = _row(compiled, fixtures.broken_row())
    assert row["error"] and "multiple of 3" in row["error"]
    assert kr.failures(row) and "does not compile" in kr.failures(row)[0]


# ---------------------------------------------------------------------------------------------------------------
# The figures against the tools, parsed here independently
# ---------------------------------------------------------------------------------------------------------------


def _resource_usage(cubin: str, function: str) -> dict[str, int]:
    text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True,
                          check=True).stdout
    block = text.split(f"Function {function}:", 1)[1].splitlines()[1]
    return {k: int(v) for k, v in (item.split(":") for item in block.split() if ":" in item and "[" not in item)}


def _nvdisasm_opcodes(cubin: str) -> list[str]:
    text = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    ops = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            ops.append(m.group(2))
    return ops


@pytest.mark.parametrize("make_row", [fixtures.clean_row, fixtures.spilling_row, fixtures.warp_specialized_row,
                                      fixtures.hmma_row])
def test_figures_match_cuobjdump_nvdisasm_and_metadata(compiled, make_row):
    row = _row(compiled, make_row())
    cubin = row["files"]["cubin"]
    usage = _resource_usage(cubin, row["function"])
    assert row["regs"] == usage["REG"]
    assert row["stack_bytes"] == usage["STACK"]
    assert row["local_bytes"] == usage["LOCAL"] + usage["STACK"]
    ops = _nvdisasm_opcodes(cubin)
    assert row["mma_instructions"] == sum(op.split(".")[0] in ("HGMMA", "HMMA") for op in ops)
    assert row["local_instructions"] == sum(op.split(".")[0] in ("LDL", "STL") for op in ops)
    assert row["setmaxnreg_instructions"] == sum("SETMAXREG" in op for op in ops)
    kinds = sorted({op.split(".")[0] for op in ops if op.split(".")[0] in ("HGMMA", "HMMA")})
    assert row["mma"] == ("+".join(kinds) or "none")
    meta = json.loads(Path(row["files"]["metadata"]).read_text())
    assert row["shared_bytes"] == meta["shared"] + row["static_shared_bytes"]
    assert row["static_shared_bytes"] == 0  # Triton allocates all its shared memory dynamically
    assert row["num_warps"] == meta["num_warps"]


def test_parsers_on_known_text():
    usage = kr.parse_resource_usage(
        "Resource usage:\n Common:\n  GLOBAL:0\n Function k1:\n  REG:40 STACK:16 SHARED:1536 LOCAL:8 CONSTANT[0]:548 "
        "TEXTURE:0\n Function _ZN2ns2k2Ev:\n  REG:8 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:540\n")
    assert usage["k1"]["REG"] == 40 and usage["k1"]["STACK"] == 16 and usage["k1"]["LOCAL"] == 8
    assert usage["_ZN2ns2k2Ev"]["REG"] == 8
    sass = kr.parse_sass(
        "\t\tFunction : k1\n"
        "        /*0000*/                   LDC R1, c[0x0][0x28] ;      /* 0x00000a00ff017b82 */\n"
        "        /*0010*/              @!P0 HGMMA.64x128x16.F32 gdesc[UR4], RZ, !UPT ;\n"
        "        /*0020*/               @P1 STL [R1], R2 ;\n"
        "        /*0030*/                   USETMAXREG.DEALLOC.CTAPOOL 0x28 ;\n"
        "        /*0040*/                   USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8 ;\n")
    ops = sass["k1"]
    assert ops["HGMMA"] == 1 and ops["STL"] == 1 and ops["LDC"] == 1
    assert kr.mma_kinds(ops) == ["HGMMA"] and kr.warp_specialised(ops)
    ptxas = kr.parse_ptxas_verbose(
        "ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kPf\n"
        "    24 bytes stack frame, 20 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 512 bytes smem, 24 bytes cumulative stack size\n")
    assert ptxas["_Z1kPf"] == {"regs": 255, "stack": 24, "spill_stores": 20, "spill_loads": 12, "smem": 512,
                               "lmem": 0, "entry": 1}
    assert kr.dot_operand_types(
        "%5 = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<64x32xbf16> * tensor<32x64xbf16> -> "
        "tensor<64x64xf32> loc(#loc1)") == ["bf16"]


def test_loops_and_their_issue_over_tensor_balance():
    """parse_loops: a loop per header that a later branch jumps back to (two back edges to one header are one loop),
    its own instructions (not those of a loop nested in it) and its own HGMMA FLOPs and tensor cycles (TF32 at half
    the 16-bit rate); a forward branch and the branch-to-self trap after EXIT are no loops. loop_balance: issue
    cycles (instructions x warps / 4) over tensor cycles (x warpgroups)."""
    text = "\t\tFunction : k\n" + "".join(f"        /*{a:04x}*/   {ins} ;\n" for a, ins in [
        (0x00, "MOV R1, R2"),
        (0x10, "FADD R3, R3, R4"),                              # outer loop starts here
        (0x20, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24"),  # inner loop: 0x20-0x48, two back edges
        (0x30, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"),
        (0x38, "@P3 BRA 0x20"),
        (0x40, "HGMMA.64x64x8.F32.TF32 R24, gdesc[UR8], R24"),
        (0x48, "@P0 BRA 0x20"),
        (0x50, "MUFU.EX2 R5, R5"),
        (0x60, "@P1 BRA 0x80"),                                 # forward: not a loop
        (0x70, "FMUL R5, R5, R6"),
        (0x80, "@P2 BRA 0x10"),
        (0x90, "EXIT"),
        (0xa0, "BRA 0xa0"),                                     # the trap: not a loop
        (0xb0, "NOP")])
    loops = kr.parse_loops(text)["k"]
    inner, outer = loops
    assert (inner["start"], inner["end"]) == (0x20, 0x48)
    assert (inner["instructions"], inner["hgmma"], inner["nested_loops"]) == (5, 3, 0)
    assert inner["hgmma_flops_per_warpgroup"] == 2 * (2 * 64 * 128 * 16) + 2 * 64 * 64 * 8
    assert inner["tensor_cycles_per_warpgroup"] == pytest.approx(2 * 262144 / 4096 + 65536 / 2048)
    assert (outer["instructions"], outer["hgmma"], outer["nested_loops"]) == (5, 0, 1)
    # 8 warps: 5 * 8 / 4 = 10 issue cycles against 2 warpgroups * 160 tensor cycles
    assert kr.loop_balance(inner, 8) == pytest.approx(10 / 320)
    assert kr.loop_balance(outer, 8) is None
    row = kr.analyse({"usage": {"REG": 100}, "ops": kr.parse_sass(text)["k"], "loops": loops}, kernel="k",
                     config="c", arch=90, num_warps=8)
    assert row["hot_loop_instructions"] == 5 and row["hot_loop_issue_over_tensor"] == round(10 / 320, 2)
    assert row["outside_mma_loops_instructions"] == 13 - 5  # 14 lines, the NOP not counted


def test_an_out_of_line_retry_block_after_exit_is_no_loop():
    """ptxas puts an mbarrier wait's retry after the last EXIT (`retry: TRYWAIT; @!P0 BRA retry; BRA <back>`): the
    jump back into the body was read as a loop spanning half the kernel, with the K loop's HGMMA in it, and picked
    as the hot loop (the warp-specialised fixture: 377 instructions for a 58-instruction loop)."""
    text = "\t\tFunction : k\n" + "".join(f"        /*{a:04x}*/   {ins} ;\n" for a, ins in [
        (0x00, "MOV R1, R2"),
        (0x10, "@!P0 BRA 0x90"),                                # to the retry block
        (0x20, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24"),  # the K loop: 0x20-0x30
        (0x30, "@P1 BRA 0x20"),
        (0x40, "FADD R3, R3, R4"),
        (0x50, "EXIT"),
        (0x60, "BRA 0x60"),                                     # the trap
        (0x90, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2"),   # the retry block
        (0xa0, "@!P0 BRA 0x90"),
        (0xb0, "BRA 0x20")])                                    # back into the body: no loop
    loops = kr.parse_loops(text)["k"]
    assert [(lp["start"], lp["end"]) for lp in loops] == [(0x20, 0x30), (0x90, 0xa0)]
    row = kr.analyse({"usage": {"REG": 100}, "ops": kr.parse_sass(text)["k"], "loops": loops}, kernel="k",
                     config="c", arch=90, num_warps=8)
    assert row["hot_loop_instructions"] == 2


def test_quick_keeps_one_row_per_kernel_head_dim_and_dtype():
    from fineviti.kernels.registry import Shipped

    def row(name, d, dt, bm):
        return Shipped(name, f"d{d}-{dt}-{bm}", {"X": f"*{dt}", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr"},
                       {"HEAD_DIM": d, "BLOCK_M": bm})

    rows = [row("a", 64, "fp16", 64), row("a", 64, "fp16", 128), row("a", 64, "bf16", 64), row("a", 80, "fp16", 64),
            row("b", 64, "fp16", 64)]
    assert [r.label for r in kr.quick_rows(rows)] == ["d64-fp16-64", "d64-bf16-64", "d80-fp16-64", "d64-fp16-64"]


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernels (nvcc) and the command line
# ---------------------------------------------------------------------------------------------------------------

TINY_CU = r"""
namespace demo {
__global__ void __launch_bounds__(128) scale_kernel(const float* __restrict__ x, float* __restrict__ y, int n) {
  __shared__ float tile[128];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = i < n ? x[i] : 0.f;
  __syncthreads();
  if (i < n) y[i] = 2.f * tile[(threadIdx.x + 1) % 128];
}
// A per-thread array indexed at run time cannot live in registers: local memory.
__global__ void local_array_kernel(const int* __restrict__ idx, float* __restrict__ out, int n) {
  float buf[512];
  for (int j = 0; j < 512; ++j) buf[j] = static_cast<float>(j * n);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = buf[idx[i] & 511];
}
// 96 live values per thread under a 32-register cap (8 blocks of 256 threads): ptxas must spill.
__global__ void __launch_bounds__(256, 8) pressure_kernel(const float* x, float* y, int n) {
  float acc[96];
#pragma unroll
  for (int j = 0; j < 96; ++j) acc[j] = x[threadIdx.x + j * n];
#pragma unroll
  for (int j = 0; j < 96; ++j) y[threadIdx.x + j * n] = acc[j] * acc[95 - j] + acc[(j * 7) % 96];
}
// kernel-report: dynamic_kernel dynamic shared memory up to 8192 bytes
__global__ void __launch_bounds__(128) dynamic_kernel(const float* __restrict__ x, float* __restrict__ y, int n) {
  extern __shared__ float staged[];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  staged[threadIdx.x] = i < n ? x[i] : 0.f;
  __syncthreads();
  if (i < n) y[i] = staged[(threadIdx.x + 1) % blockDim.x];
}
}  // namespace demo
"""


def _nvcc_available() -> bool:
    try:
        kr.cuda_home()
        return True
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _nvcc_available(), reason="needs nvcc")
def test_cuda_file_rows_match_ptxas(tmp_path):
    src = tmp_path / "tiny.cu"
    src.write_text(TINY_CU)
    rows = kr.compile_cuda_file(src, 90, include_dirs=[], keep_dir=tmp_path / "keep")
    by_name = {r["kernel"].split("(")[0]: r for r in rows}
    assert set(by_name) == {"demo::scale_kernel", "demo::local_array_kernel", "demo::pressure_kernel",
                            "demo::dynamic_kernel"}, rows
    # dynamic shared memory (extern __shared__) is the launch's, not the cubin's: declared in the source
    dynamic = by_name["demo::dynamic_kernel"]
    assert dynamic["static_shared_bytes"] == 0 and dynamic["shared_bytes"] == 8192, dynamic
    assert "up to 8192 B dynamic shared memory" in dynamic["config"]
    # ptxas -v of the same compile, parsed here
    out = subprocess.run([str(kr.cuda_home() / "bin" / "nvcc"), "-cubin", "-arch=sm_90", "-Xptxas", "-v",
                          "-std=c++20", "-O3", str(src), "-o", str(tmp_path / "again.cubin")],
                         capture_output=True, text=True, check=True).stderr
    regs = dict(re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", out, re.S))
    frames = {m[0]: (int(m[1]), int(m[2])) for m in
              re.findall(r"Function properties for (\w+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores", out)}
    scale, local, pressure = (by_name[f"demo::{k}"] for k in ("scale_kernel", "local_array_kernel", "pressure_kernel"))
    for r in (scale, local, pressure):
        assert r["regs"] == int(regs[r["function"]])
        assert (r["stack_bytes"], r["spill_store_bytes"]) == frames[r["function"]]
        assert not any("ptxas -v says" in w for w in r["warnings"])  # ptxas and cuobjdump agree
    assert scale["num_warps"] == 4 and "__launch_bounds__" in scale["config"]
    assert scale["static_shared_bytes"] == 512 == scale["shared_bytes"]
    assert kr.failures(scale) == [] and scale["warnings"] == []
    # a local array is local memory but no spill: a warning
    assert local["local_bytes"] >= 2048 and local["spill_store_bytes"] == 0
    assert kr.failures(local) == [] and any("not register spills" in w for w in local["warnings"])
    assert local["num_warps"] == 8 and "assumed" in local["config"]
    # spills fail
    assert pressure["regs"] <= 32 and pressure["spill_store_bytes"] > 0
    assert any("spills registers" in f for f in kr.failures(pressure))


def _run_cli(*args, env_extra=None):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_report.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_check_fails_on_spill_naming_kernel_and_config(tmp_path):
    out = _run_cli("--rows", "tests.kernels_for_report:spilling_rows", "--check", "--out", str(tmp_path), "--jobs", "2")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "fixture_spilling_rownorm [fp32-R64-C128-w1]: spills registers" in out.stderr
    rows = json.loads((tmp_path / "kernel_report.json").read_text())
    assert [r["kernel"] for r in rows] == ["fixture_clean_matmul", "fixture_spilling_rownorm"]
    for r in rows:
        assert {"kernel", "config", "arch", "regs", "shared_bytes", "local_bytes", "mma", "blocks_per_sm",
                "stack_bytes", "warp_specialized", "warnings", "error", "triton"} <= set(r)
    assert rows[0]["mma"] == "HGMMA" and rows[0]["local_bytes"] == 0
    md = (tmp_path / "kernel_report.md").read_text()
    assert "fixture_spilling_rownorm" in md and "Check: FAILED" in md and re.search(r"\d+\.\d s in all", md)


def test_cli_with_no_rows_writes_an_empty_report(tmp_path):
    out = _run_cli("--rows", "tests.kernels_for_report:no_rows", "--check", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads((tmp_path / "kernel_report.json").read_text()) == []
    assert "Check: passed" in (tmp_path / "kernel_report.md").read_text()


def test_missing_csrc_gives_no_rows(tmp_path):
    assert kr.compile_csrc(tmp_path / "absent") == []


def test_tools_ship_with_triton():
    for name in ("cuobjdump", "nvdisasm"):
        assert Path(kr.nvidia_tool(name)).exists()
    assert shutil.which(kr.nvidia_tool("cuobjdump"))


def test_loss_sweep_flattened_candidates_compile_for_sm90():
    """The loss sweep's "flat" candidates (FLATTEN forward, PERSISTENT gradient kernel) run only on a GPU: they
    must at least compile for sm_90 (triton's loop fusion rejects a runtime branch inside the fused loop, which the
    kernels therefore leave out there). Spills are allowed: these are candidates, not shipped rows."""
    import dataclasses

    from fineviti.kernels import registry

    rows = {r.label: r for name in ("contrastive_fwd", "contrastive_bwd") for r in registry.shipped(name)}
    cases = [("siglip fwd bf16 d64,768,1152", {"FLATTEN": True}),
             ("siglip bwd +loss bf16 d64,768,1152", {"PERSISTENT": True}),
             ("clip bwd bf16 d64,768,1152", {"PERSISTENT": True})]
    variants = [dataclasses.replace(rows[label], constexprs={**rows[label].constexprs, **flags})
                for label, flags in cases]
    for (label, flags), out in zip(cases, kr.compile_rows(variants, jobs=2), strict=True):
        assert out.get("error") is None, f"{label} {flags}: {out['error'][-300:]}"

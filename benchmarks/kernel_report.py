"""Kernel report: every shipped Triton configuration and every CUDA kernel of csrc/, compiled for the H100 (sm_90)
on a machine without a GPU, with the resources each one takes.

Triton compiles ahead of time for a named target (`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`
needs no GPU); nvcc does the same for csrc/*.cu (`nvcc -cubin -Xptxas -v`). The cubins are read with the
`cuobjdump` that ships inside the triton package: registers, stack and local memory (`--dump-resource-usage`), the
SASS (`-sass`: matrix instructions HGMMA / HMMA, local loads and stores, setmaxnreg, loops) and the ELF sections
(`-elf`: __launch_bounds__, the reserved shared memory window). Spill figures are not in the cubin: they come from
ptxas's `-v` log (nvcc's, or Triton's own ptxas step run again with its log printed, for rows with local memory),
with the spills of __noinline__ callees counted against the kernels that may call them. c++filt demangles the CUDA
names. Triton's shared memory is dynamic, so it comes from the compiled kernel's metadata ("shared"), not from the
cubin; a CUDA kernel's dynamic shared memory is declared in its source (`// kernel-report: NAME dynamic shared
memory up to N bytes`). Blocks per SM follow CUDA's occupancy calculator (cuda_occupancy.h) with the H100's limits.

    python benchmarks/kernel_report.py [--arch 90] [--out DIR] [--kernel NAME] [--quick] [--check] [--jobs N]

--check exits non-zero, naming kernel and configuration, when
- a configuration does not compile, its cubin cannot be read, or its compile process dies (named with its exit code
  and the end of its stderr; the other rows keep their own results);
- it spills: ptxas reports more bytes of spill stores, in the kernel or in a function it may call (ptxas logs a
  __noinline__ callee's spills under the callee's own name), than the row's declared `spill_allowance` (0 unless
  kernels/registry.py declares one, with a reason); local memory with no ptxas log to tell whether it is spills
  counts as spills;
- it needs more shared memory (static + dynamic) than a block may have (227 KB), more than 255 registers per thread,
  or cannot launch at all (0 blocks per SM);
- a CUDA kernel uses `extern __shared__` without declaring its dynamic shared memory in the source;
- a kernel declared in the registry ships no configuration at all.
Warnings (not failures): local memory that ptxas says is not spills (a local array); spills within a declared
allowance (printed with their reason); a 16-bit matrix kernel on sm_90 that uses HMMA rather than HGMMA; warp
specialisation that was asked for and did not happen; ptxas and cuobjdump disagreeing on registers.
With --device-check on a machine with a GPU, each cubin is also loaded through the CUDA driver and the report's
registers, local memory, static shared memory and blocks per SM are compared with what the driver says.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import importlib.util
import inspect
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/kernel_report.py` puts benchmarks/ first on the path, not the root
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results"
RESERVED_SMEM_NAME = "__nv_reservedSMEM"  # symbol of the per-block system window ptxas puts in the shared section


# ----------------------------------------------------------------------------------------------------------------
# Occupancy
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """Per-SM and per-block limits of one GPU, in the terms of CUDA's occupancy calculator."""

    name: str = "H100"
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    reg_alloc_unit: int = 256  # registers are allocated per warp, rounded up to this many
    max_regs_per_thread: int = 255
    sub_partitions: int = 4  # each holds regs_per_sm / 4 registers; a warp lives in one
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024  # the most (static + dynamic) shared memory one block may ask for
    smem_reserved_per_block: int = 1024  # the system's window, on top of what the kernel asks for
    smem_alloc_unit: int = 128
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    max_threads_per_block: int = 1024
    warp_size: int = 32


H100 = SMLimits()
SUPPORTED_ARCHS = {90: H100}  # --arch: the compute capabilities whose limits the report holds


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def blocks_per_sm(regs: int, num_warps: int, shared_bytes: int, limits: SMLimits = H100) -> tuple[int, str]:
    """Resident blocks per SM and the resource that limits them ('regs', 'smem', 'warps', 'blocks').

    regs: registers per thread; num_warps: warps per block; shared_bytes: static + dynamic shared memory the kernel
    asks for per block (without the system's reserved window, which is added here). 0 blocks means the launch fails.
    """
    if num_warps < 1 or num_warps * limits.warp_size > limits.max_threads_per_block:
        return 0, "threads"
    if regs > limits.max_regs_per_thread:
        return 0, "regs"
    if shared_bytes > limits.smem_per_block:
        return 0, "smem"
    # Registers (cudaOccMaxBlocksPerSMRegsLimit): per warp, rounded up to the allocation unit; the hardware check
    # of the per-block limit assumes the warps are spread over all sub-partitions.
    regs_per_warp = _round_up(max(regs, 1) * limits.warp_size, limits.reg_alloc_unit)
    assumed_per_block = regs_per_warp * _round_up(num_warps, limits.sub_partitions)
    if assumed_per_block > limits.regs_per_block or regs_per_warp * num_warps > limits.regs_per_block:
        return 0, "regs"
    warps_per_sub_partition = (limits.regs_per_sm // limits.sub_partitions) // regs_per_warp
    by_regs = warps_per_sub_partition * limits.sub_partitions // num_warps
    # Shared memory (cudaOccMaxBlocksPerSMSmemLimit): reserved window added, rounded to the allocation unit.
    smem = _round_up(shared_bytes + limits.smem_reserved_per_block, limits.smem_alloc_unit)
    by_smem = limits.smem_per_sm // smem
    by_warps = limits.max_warps_per_sm // num_warps
    limits_by = {"regs": by_regs, "smem": by_smem, "warps": by_warps, "blocks": limits.max_blocks_per_sm}
    limiter = min(limits_by, key=lambda k: limits_by[k])
    return limits_by[limiter], limiter


# ----------------------------------------------------------------------------------------------------------------
# Reading cubins
# ----------------------------------------------------------------------------------------------------------------


def nvidia_tool(name: str) -> str:
    """Path of `cuobjdump` / `nvdisasm` / `ptxas` as shipped inside the triton package (no import of triton)."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / name
        if path.exists():
            return str(path)
    found = shutil.which(name) or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name)
    if not Path(found).exists():
        raise FileNotFoundError(f"{name} not found inside the triton package nor on PATH nor in $CUDA_HOME/bin")
    return str(found)


def _run_tool(args: list[str]) -> str:
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out.stdout


_USAGE_FN = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_USAGE_KV = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """`cuobjdump --dump-resource-usage` -> {function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}}."""
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = _USAGE_FN.match(line)
        if m:
            current = m.group(1)
            usage[current] = {}
            continue
        if current is not None and "REG:" in line:
            usage[current].update({k: int(v) for k, v in _USAGE_KV.findall(line)})
    return usage


_SASS_FN = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
# one instruction: its address, an optional predicate, the opcode, its modifiers and its operands
_SASS_INST = re.compile(
    r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*([^;]*)")


def parse_instructions(text: str) -> dict[str, list[tuple[int, str, str, str]]]:
    """`cuobjdump -sass` -> {function: [(address, opcode, modifiers, operands), ...]}: the one SASS parser, which
    parse_sass and parse_loops read."""
    functions: dict[str, list[tuple[int, str, str, str]]] = {}
    current = None
    for line in text.splitlines():
        m = _SASS_FN.match(line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _SASS_INST.match(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2), m.group(3), m.group(4).strip()))
    return functions


def parse_sass(text: str) -> dict[str, Counter]:
    """`cuobjdump -sass` -> {function: Counter of opcodes}. Counts both the base opcode ('HGMMA') and, for the few
    opcodes whose modifiers matter here, the opcode with modifiers ('USETMAXREG.DEALLOC.CTAPOOL')."""
    counts: dict[str, Counter] = {}
    for fn, ins in parse_instructions(text).items():
        counts[fn] = Counter()
        for _, op, mods, _ in ins:
            counts[fn][op] += 1
            if "SETMAXREG" in op:
                counts[fn][op + mods] += 1
    return counts

_HGMMA_SHAPE = re.compile(r"^\.(\d+)x(\d+)x(\d+)")
# Dense 16-bit tensor-core FLOPs per cycle of one H100 SM (989.4 TFLOP/s over 132 SMs at 1.83 GHz) and warp
# instructions an SM issues per cycle (four schedulers).
TENSOR_FLOPS_PER_CYCLE = 4096
ISSUE_PER_CYCLE = 4


def _tensor_rate(mods: str) -> float:
    """An HGMMA's tensor-core rate against the dense 16-bit one: TF32 half, 8-bit floats twice."""
    if ".TF32" in mods:
        return 0.5
    if ".E4M3" in mods or ".E5M2" in mods:
        return 2.0
    return 1.0


def parse_loops(text: str) -> dict[str, list[dict]]:
    """`cuobjdump -sass` -> {function: [loop, ...]}: a loop per branch target that some later branch jumps back to
    (several back edges to one header are one loop, up to the last of them), with its own instructions (those not
    in a loop nested inside it), its own HGMMA FLOPs per warpgroup (2 * M * N * K each) and their tensor-core
    cycles at the SM's rate for their type. A branch to itself (the trap after EXIT) is no loop, and neither is the
    jump back from an out-of-line block placed after the last EXIT into the body (ptxas puts an mbarrier wait's
    retry there: `retry: SYNCS.PHASECHK.TRYWAIT; @!P0 BRA retry; BRA <back>`), which would span half the kernel."""
    out = {}
    for fn, ins in parse_instructions(text).items():
        last_exit = max((a for a, op, _, _ in ins if op == "EXIT"), default=None)
        ends: dict[int, int] = {}  # loop header -> its last back edge
        for addr, op, _, operands in ins:
            target = re.search(r"\b0x([0-9a-f]+)\b", operands) if op == "BRA" else None
            if target and last_exit is not None and addr > last_exit and int(target.group(1), 16) < last_exit:
                continue  # an out-of-line block returning into the body: no loop
            if target and int(target.group(1), 16) < addr:
                lo = int(target.group(1), 16)
                ends[lo] = max(ends.get(lo, addr), addr)
        spans = sorted(ends.items(), key=lambda sp: sp[1] - sp[0])  # innermost first
        loops = []
        for lo, hi in spans:
            inner = [sp for sp in spans if sp != (lo, hi) and lo <= sp[0] and sp[1] <= hi]
            own = [(a, op, mods) for a, op, mods, _ in ins
                   if lo <= a <= hi and not any(i_lo <= a <= i_hi for i_lo, i_hi in inner)]
            flops, cycles = 0, 0.0
            for _, op, mods in own:
                shape = _HGMMA_SHAPE.match(mods) if op == "HGMMA" else None
                if shape:
                    f = 2 * int(shape[1]) * int(shape[2]) * int(shape[3])
                    flops += f
                    cycles += f / (TENSOR_FLOPS_PER_CYCLE * _tensor_rate(mods))
            loops.append({"start": lo, "end": hi, "instructions": len(own), "nested_loops": len(inner),
                          "hgmma": sum(op == "HGMMA" for _, op, _ in own), "hgmma_flops_per_warpgroup": flops,
                          "tensor_cycles_per_warpgroup": cycles})
        out[fn] = loops
    return out


def loop_balance(loop: dict, num_warps: int) -> float | None:
    """Issue cycles over tensor-core cycles of one iteration of a loop, per block: its instructions times the
    block's warps over the SM's four schedulers, against its HGMMA work (every warpgroup's) at the SM's dense rate
    for its type (16-bit: 4096 FLOPs per cycle). Above 1 the loop issues for longer than its matrix work takes, so
    no overlap of the two can bring it to the tensor cores' peak (with one block per SM; more blocks share both).
    None without HGMMA."""
    if not loop["hgmma_flops_per_warpgroup"]:
        return None
    issue = loop["instructions"] * num_warps / ISSUE_PER_CYCLE
    tensor = loop["tensor_cycles_per_warpgroup"] * (num_warps / 4)
    return issue / tensor


def mma_kinds(ops: Counter) -> list[str]:
    """Matrix instructions in a function's SASS: warpgroup (HGMMA, IGMMA, QGMMA) and warp-level (HMMA, IMMA, ...)."""
    return sorted(op for op in ops if re.fullmatch(r"[A-Z]G?MMA", op) and ops[op] > 0)


def warp_specialised(ops: Counter) -> bool:
    """Producer warps giving registers back (setmaxnreg.dec) and consumer warps taking them (setmaxnreg.inc)."""
    dealloc = sum(n for op, n in ops.items() if "SETMAXREG" in op and "DEALLOC" in op)
    alloc = sum(n for op, n in ops.items() if "SETMAXREG" in op and "ALLOC" in op and "DEALLOC" not in op)
    return dealloc > 0 and alloc > 0


_DOT_TYPES = re.compile(r"tt\.dot(?:_scaled)?\s[^\n]*?:\s*tensor<(?:[0-9?]+x)+([A-Za-z]\w*)")


def dot_operand_types(ttir: str) -> list[str]:
    """Element types of the first operand of every tt.dot in Triton IR ('f16', 'bf16', 'f32', 'f8E4M3FN', ...)."""
    return _DOT_TYPES.findall(ttir)


def read_cubin(cubin: str | Path) -> dict[str, dict]:
    """Every function in a cubin -> {"usage": resource usage, "ops": SASS opcode counts, "reserved_smem": bool}."""
    cuobjdump = nvidia_tool("cuobjdump")
    usage = parse_resource_usage(_run_tool([cuobjdump, "--dump-resource-usage", str(cubin)]))
    sass = _run_tool([cuobjdump, "-sass", str(cubin)])
    ops = parse_sass(sass)
    loops = parse_loops(sass)
    reserved = RESERVED_SMEM_NAME in _run_tool([cuobjdump, "-elf", str(cubin)])
    return {
        fn: {"usage": usage.get(fn, {}), "ops": ops.get(fn, Counter()), "reserved_smem": reserved,
             "loops": loops.get(fn, [])}
        for fn in sorted(set(usage) | set(ops))
    }


def analyse(
    fn_info: dict,
    *,
    kernel: str,
    config: str,
    arch: int,
    num_warps: int | None,
    dynamic_shared: int = 0,
    dot_types: list[str] | None = None,
    warp_specialize: bool = False,
    limits: SMLimits = H100,
) -> dict:
    """One report row from one function of a cubin (`read_cubin(...)[name]`) and what the compiler said about it.

    num_warps: warps per block as launched (Triton's metadata, which counts the extra warps of warp specialisation;
    None when the block size is not known at compile time). dynamic_shared: bytes of dynamic shared memory per block
    (Triton's metadata "shared"). dot_types: operand element types of the tl.dot calls (from the TTIR), if known.
    """
    usage, ops = fn_info["usage"], fn_info["ops"]
    regs = usage.get("REG", 0)
    stack = usage.get("STACK", 0)
    local = usage.get("LOCAL", 0) + stack  # ptxas puts spills in the stack frame, which lives in local memory
    static_shared = usage.get("SHARED", 0)
    if fn_info.get("reserved_smem") and static_shared >= limits.smem_reserved_per_block:
        static_shared -= limits.smem_reserved_per_block  # cuobjdump counts the system's window in the section
    mmas = mma_kinds(ops)
    row = {
        "kernel": kernel,
        "config": config,
        "arch": arch,
        "regs": regs,
        "shared_bytes": dynamic_shared + static_shared,
        "local_bytes": local,
        "mma": "+".join(mmas) if mmas else "none",
        "blocks_per_sm": None,
        "occupancy_limiter": None,
        "stack_bytes": stack,
        "static_shared_bytes": static_shared,
        "num_warps": num_warps,
        "mma_instructions": sum(ops[m] for m in mmas),
        "local_instructions": ops["LDL"] + ops["STL"],
        "setmaxnreg_instructions": sum(n for op, n in ops.items() if op.endswith("SETMAXREG")),
        "warp_specialized": warp_specialised(ops) if warp_specialize else None,
        "dot_types": sorted(set(dot_types)) if dot_types is not None else None,
        "warnings": [],
        "error": None,
    }
    if num_warps is not None:
        row["blocks_per_sm"], row["occupancy_limiter"] = blocks_per_sm(regs, num_warps, row["shared_bytes"], limits)
    mma_loops = [lp for lp in fn_info.get("loops", []) if lp["hgmma"]]
    row["loops"] = [{k: lp[k] for k in ("instructions", "hgmma", "hgmma_flops_per_warpgroup", "nested_loops")}
                    for lp in fn_info.get("loops", [])]
    if mma_loops and num_warps is not None:  # the HGMMA loop with the most instructions: the hot one
        hot = max(mma_loops, key=lambda lp: lp["instructions"])
        row["hot_loop_instructions"] = hot["instructions"]
        row["hot_loop_issue_over_tensor"] = round(loop_balance(hot, num_warps), 2)
        # everything else runs once per program (attention) or once per tile of K-loop trips (the losses' tile
        # epilogue, which a K loop of D / BLOCK_K trips amortises)
        executed = sum(n for op, n in ops.items() if "." not in op and op != "NOP")  # base opcodes, no padding
        row["outside_mma_loops_instructions"] = executed - sum(lp["instructions"] for lp in mma_loops)
    sixteen_bit = [t for t in (dot_types or []) if t in ("f16", "bf16")]
    if arch == 90 and sixteen_bit:
        if not any(m.endswith("GMMA") for m in mmas):
            row["warnings"].append(f"{'/'.join(sorted(set(sixteen_bit)))} matrix kernel uses {row['mma']}, not HGMMA")
        elif "HMMA" in mmas:
            row["warnings"].append(f"{ops['HMMA']} HMMA instructions beside HGMMA: some tl.dot did not become wgmma")
    elif arch == 90 and not dot_types and "HMMA" in mmas:
        row["warnings"].append("uses HMMA, not HGMMA")
    if warp_specialize and not row["warp_specialized"]:
        row["warnings"].append("warp specialisation asked for (warp_specialize=True) but the SASS has no setmaxnreg "
                               "producer/consumer split")
    return row


def note_local_memory(row: dict) -> None:
    """Local memory that ptxas says is not spilled registers is a warning, not a failure: a per-thread array indexed at
    run time, such as the one in the slow path of sin/cos argument reduction (28 bytes, rounded to 32)."""
    if row.get("local_bytes") and row.get("spill_store_bytes") == 0:
        row["warnings"].append(f"{row['local_bytes']} bytes of local memory per thread that are not register spills "
                               f"({row['local_instructions']} local loads/stores: a local array, e.g. the slow path "
                               "of sin/cos argument reduction); keep it off the hot path")


def failures(row: dict, limits: SMLimits = H100) -> list[str]:
    """Why a row fails --check (empty when it passes)."""
    if row.get("error"):
        return [f"does not compile: {row['error'].strip().splitlines()[-1][:300] if row['error'].strip() else '?'}"]
    out = []
    spills = row.get("spill_store_bytes")
    allowance = row.get("spill_allowance") or 0
    if row["local_bytes"] > 0 and spills is not None and 0 < spills <= allowance:
        note = (f"spills {spills} bytes, within its declared allowance of {allowance}: "
                f"{row.get('spill_reason') or 'no reason given'}")
        if note not in row["warnings"]:
            row["warnings"].append(note)
    elif row["local_bytes"] > 0 and (spills is None or spills > 0):
        what = f"{spills} bytes of spill stores" if spills is not None else "spills assumed (ptxas log unavailable)"
        if row.get("callee_spills"):
            what += " (" + ", ".join(f"{c['spill_stores']} in {fn}" for fn, c in row["callee_spills"].items()) + \
                    ": not inlined, so ptxas logs it apart; this kernel may call it)"
        out.append(f"spills registers to local memory: {what}, {row['local_bytes']} bytes of local memory per "
                   f"thread, {row['local_instructions']} local loads/stores")
    if row.get("undeclared_dynamic_shared"):
        out.append(row["undeclared_dynamic_shared"])
    if row["shared_bytes"] > limits.smem_per_block:
        out.append(f"needs {row['shared_bytes']} bytes of shared memory, more than the {limits.smem_per_block} a "
                   f"block may have on the {limits.name}")
    if row["regs"] > limits.max_regs_per_thread:
        out.append(f"uses {row['regs']} registers per thread, more than {limits.max_regs_per_thread}")
    if row.get("blocks_per_sm") == 0 and not out:
        out.append(f"cannot launch on the {limits.name} (limited by {row['occupancy_limiter']})")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton rows
# ----------------------------------------------------------------------------------------------------------------


def config_label(row) -> str:
    if row.label:
        return row.label
    consts = "-".join(f"{k}{v}" for k, v in row.constexprs.items())
    return f"{consts}-w{row.num_warps}-s{row.num_stages}"


def _python_function(fn):
    """The plain Python function under a JITFunction, InterpretedFunction, Autotuner or Heuristics."""
    for _ in range(10):  # wrappers keep the wrapped object in `.fn`
        if inspect.isfunction(fn) or not hasattr(fn, "fn"):
            break
        fn = fn.fn
    if not inspect.isfunction(fn):
        raise TypeError(f"row.fn: expected a @triton.jit function (or a wrapper of one), got {type(fn).__name__}")
    return fn


def jit_function(fn):
    """A compilable triton.JITFunction for `fn`, also when it was created under TRITON_INTERPRET=1."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        if fn.__class__.__name__ == "InterpretedFunction" or not hasattr(fn, "fn"):
            return JITFunction(_python_function(fn))
        fn = fn.fn
    return fn


def _locate(row) -> tuple[str, str, int]:
    """(module, name, first line) of the row's kernel: what a worker process needs to import it again."""
    py = _python_function(row.fn)
    return py.__module__, py.__name__, py.__code__.co_firstlineno


def _import_kernel(module: str, name: str, line: int):
    mod = importlib.import_module(module)
    candidates = [getattr(mod, name, None)] + list(vars(mod).values())
    for obj in candidates:
        try:
            py = _python_function(obj)
        except (TypeError, AttributeError):
            continue
        if py.__name__ == name and py.__code__.co_firstlineno == line:
            return obj
    raise LookupError(f"kernel {name!r} (line {line}) not found in module {module!r}")


def compile_attrs(row, fn) -> dict:
    """`attrs` for ASTSource reproducing the launch's divisibility-by-16 specialisation: the registry's
    `compile_attrs(row)` where it has one; otherwise (or for rows without `aligned`) every pointer argument, as the JIT
    specialises 16-byte-aligned torch allocations, and no integer argument (the conservative case)."""
    from fineviti.kernels import registry

    if hasattr(registry, "compile_attrs") and hasattr(row, "aligned"):
        return registry.compile_attrs(row)
    return {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, t in row.signature.items() if t.startswith("*")}


def _compile_options(row) -> dict:
    """triton.compile's options for a row: its warps, stages and register cap (the launch's)."""
    options = {"num_warps": row.num_warps, "num_stages": row.num_stages}
    if getattr(row, "maxnreg", None):
        options["maxnreg"] = row.maxnreg
    return options


def compile_row(row, arch: int = 90, keep_dir: str | Path | None = None, limits: SMLimits = H100) -> dict:
    """Compile one Shipped row for GPUTarget('cuda', arch, 32) in this process and analyse its cubin.

    Works in any process, also one that imported triton under TRITON_INTERPRET=1 (a kernel made by the interpreter
    is rebuilt as a JITFunction; compiling never interprets). With `keep_dir`, the cubin, PTX, TTIR and metadata are
    kept there (paths in the row's "files"). A failure is returned in the row's "error", not raised.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label = config_label(row)
    base = {"kernel": row.kernel_name, "config": label, "arch": arch, "triton": triton.__version__, "source": "triton",
            "num_stages": row.num_stages, "warp_specialize": row.warp_specialize,
            "spill_allowance": row.spill_allowance, "spill_reason": row.spill_reason}
    start = time.perf_counter()
    try:
        fn = jit_function(row.fn)
        if list(row.signature) != list(fn.arg_names):
            raise ValueError(f"signature of {row.kernel_name}: expected every argument of the kernel in order, "
                             f"{fn.arg_names}, got {list(row.signature)}")
        src = ASTSource(fn=fn, signature=dict(row.signature), constexprs=dict(row.constexprs),
                        attrs=compile_attrs(row, fn))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=_compile_options(row))
    except Exception as exc:  # noqa: BLE001  (any compile failure is a report row, not a crash)
        return {**_empty_row(row.kernel_name, label, arch), **base, "error": f"{type(exc).__name__}: {exc}",
                "compile_s": round(time.perf_counter() - start, 2)}
    try:
        return _analyse_compiled(compiled, row, label, arch, keep_dir, limits, base, start)
    except Exception as exc:  # noqa: BLE001  (a cubin the tools cannot read is reported, not a crash)
        return {**_empty_row(row.kernel_name, label, arch), **base,
                "error": f"compiled, but reading the cubin failed: {type(exc).__name__}: {exc}"}


def _analyse_compiled(compiled, row, label: str, arch: int, keep_dir, limits: SMLimits, base: dict,
                      start: float) -> dict:
    from triton.backends.compiler import GPUTarget

    meta = compiled.metadata
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(keep_dir) if keep_dir is not None else Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{row.kernel_name}__{label}")
        files = {}
        for ext in ("cubin", "ptx", "ttir", "ttgir"):
            if ext in compiled.asm:
                data = compiled.asm[ext]
                path = where / f"{stem}.{ext}"
                path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
                files[ext] = str(path)
        info = read_cubin(files["cubin"]).get(meta.name)
        if info is None:
            raise RuntimeError(f"function {meta.name} not found in the cubin of {row.kernel_name} {label}")
    out = analyse(info, kernel=row.kernel_name, config=label, arch=arch, num_warps=meta.num_warps,
                  dynamic_shared=meta.shared, dot_types=dot_operand_types(compiled.asm.get("ttir", "")),
                  warp_specialize=row.warp_specialize, limits=limits)
    out.update(base)
    out["spill_store_bytes"] = out["spill_load_bytes"] = 0
    if out["local_bytes"] > 0:
        log = ptxas_log(compiled.asm["ptx"], GPUTarget("cuda", arch, 32), _compile_options(row))
        entry = log.get(meta.name)
        out["spill_store_bytes"] = entry["spill_stores"] if entry else None
        out["spill_load_bytes"] = entry["spill_loads"] if entry else None
        add_callee_spills(out, callee_spills(log))  # one kernel per compile: every other function is its callee
        if entry and entry["regs"] != out["regs"]:
            out["warnings"].append(f"ptxas rerun for its log used {entry['regs']} registers, the cubin {out['regs']}")
        note_local_memory(out)
    out["function"] = meta.name
    out["global_scratch_bytes"] = getattr(meta, "global_scratch_size", 0) or 0
    out["compile_s"] = round(time.perf_counter() - start, 2)
    if keep_dir is not None:
        meta_path = Path(keep_dir) / f"{stem}.json"
        meta_path.write_text(json.dumps({k: v for k, v in meta._asdict().items() if k != "target"}, default=str))
        files["metadata"] = str(meta_path)
        out["files"] = files
    return out


def ptxas_log(ptx: str, target, options: dict) -> dict[str, dict[str, int]]:
    """Run Triton's own ptxas step again (same flags as its compile, whatever the version) with the log printed, and
    parse it: the spill figures that the cubin does not hold. Only for rows that use local memory."""
    import contextlib
    import io

    from triton import knobs
    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    opts = backend.parse_options(dict(options))
    before = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            backend.make_cubin(ptx, {}, opts, target.arch)
    finally:
        knobs.nvidia.dump_ptxas_log = before
    return parse_ptxas_verbose(buf.getvalue())


def _empty_row(kernel: str, config: str, arch: int) -> dict:
    return {"kernel": kernel, "config": config, "arch": arch, "regs": None, "shared_bytes": None, "local_bytes": None,
            "mma": None, "blocks_per_sm": None, "stack_bytes": None, "warp_specialized": None, "warnings": [],
            "error": None, "triton": None}


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # before this process imports triton: compile, do not interpret


def _compile_located(located: tuple[str, str, int], fields: dict, arch: int, keep_dir: str | None) -> dict:
    from fineviti.kernels.registry import Shipped

    fn = _import_kernel(*located)
    return compile_row(Shipped(**fields, fn=fn), arch, keep_dir)


def compile_rows(rows, arch: int = 90, jobs: int | None = None, keep_dir: str | Path | None = None) -> list[dict]:
    """Compile rows in a pool of fresh processes (spawned without TRITON_INTERPRET), in the rows' order. When a
    process dies (which breaks the pool), the rows not yet finished run again one per process: a row whose own
    process dies gets an error with the exit code and the end of its stderr ("exit_code", "stderr_tail")."""
    rows = list(rows)
    if not rows:
        return []
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(rows)))
    tasks = []
    for row in rows:
        fields = {f.name: getattr(row, f.name) for f in dataclasses.fields(row) if f.name != "fn"}
        tasks.append((_locate(row), fields, arch, None if keep_dir is None else str(keep_dir)))
    ctx = multiprocessing.get_context("spawn")
    saved = os.environ.pop("TRITON_INTERPRET", None)  # the spawned interpreters inherit the environment
    results: list[dict | None] = []
    try:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
            futures = [pool.submit(_compile_located, *task) for task in tasks]
            for row, fut in zip(rows, futures, strict=True):
                try:
                    results.append(fut.result())
                except concurrent.futures.process.BrokenProcessPool:
                    results.append(None)  # some worker died hard: which row killed it is found below
                except Exception as exc:  # noqa: BLE001  (any other failure names its row)
                    results.append({**_empty_row(row.kernel_name, config_label(row), arch), "source": "triton",
                                    "error": f"{type(exc).__name__}: {exc}"})
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    # A worker that dies (an LLVM abort, a segfault) breaks the whole pool: every row it had not finished fails with
    # BrokenProcessPool, the culprit among them. Each of those runs again alone, in a process of its own.
    unfinished = [i for i, r in enumerate(results) if r is None]
    if unfinished:
        with concurrent.futures.ThreadPoolExecutor(min(jobs, len(unfinished))) as threads:
            alone = threads.map(lambda i: _compile_alone(tasks[i]), unfinished)
            for i, (row_out, died) in zip(unfinished, alone, strict=True):
                results[i] = row_out if died is None else {
                    **_empty_row(rows[i].kernel_name, config_label(rows[i]), arch), "source": "triton", **died}
    return results


COMPILE_ALONE_TIMEOUT_S = 1800


def _compile_alone(task: tuple) -> tuple[dict | None, dict | None]:
    """Compile one row in a fresh Python process of its own: (its row, None), or (None, why) when the process dies,
    with its exit code and the end of its stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        task_file, out_file = Path(tmp) / "task.pickle", Path(tmp) / "row.pickle"
        task_file.write_bytes(pickle.dumps(list(sys.path)) + pickle.dumps(task))
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.kernel_report import "
                "_compile_task_file; _compile_task_file(sys.argv[1], sys.argv[2])")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        try:  # a compiler's stderr need not be UTF-8; no single row compiles for anywhere near the limit
            proc = subprocess.run([sys.executable, "-c", code, str(task_file), str(out_file)], capture_output=True,
                                  text=True, errors="replace", env=env, timeout=COMPILE_ALONE_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stderr or b"").decode(errors="replace")[-2000:] if isinstance(exc.stderr, bytes) \
                else (exc.stderr or "")[-2000:]
            return None, {"error": f"the compile process ran past {COMPILE_ALONE_TIMEOUT_S} s and was stopped",
                          "exit_code": None, "stderr_tail": tail}
        if proc.returncode == 0 and out_file.exists():
            return pickle.loads(out_file.read_bytes()), None
    rc = proc.returncode
    how = f"exit code {rc}" + (f" ({signal.Signals(-rc).name})" if rc < 0 and -rc in signal.valid_signals() else "")
    tail = proc.stderr.strip()[-2000:]
    last = tail.splitlines()[-1] if tail else "(nothing on stderr)"
    return None, {"error": f"the compile process died with {how}; the last line of its stderr: {last}",
                  "exit_code": rc, "stderr_tail": tail}


def _compile_task_file(task_file: str, out_file: str) -> None:
    """The body of `_compile_alone`'s process: the task from one pickle file, the row into another."""
    os.environ.pop("TRITON_INTERPRET", None)
    with open(task_file, "rb") as f:
        search_path = pickle.load(f)  # first the parent's sys.path, which unpickling the task may need
        sys.path[:] = search_path + [p for p in sys.path if p not in search_path]
        task = pickle.load(f)
    Path(out_file).write_bytes(pickle.dumps(_compile_located(*task)))


def quick_rows(rows) -> list:
    """One configuration per kernel, head dim (and its tiling: DIM_A / DIM_B, so that attention's split modes each
    keep a row) and dtype: the first row of each group."""
    seen, out = set(), []
    for row in rows:
        head = tuple(sorted((k, v) for k, v in row.constexprs.items()
                            if "HEAD_DIM" in k.upper() or k in ("D", "DIM", "DIM_A", "DIM_B")))
        dtypes = tuple(sorted({t for t in row.signature.values() if t.startswith("*")}))
        key = (row.kernel_name, head, dtypes)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


# ----------------------------------------------------------------------------------------------------------------
# CUDA kernels of csrc/
# ----------------------------------------------------------------------------------------------------------------


def cuda_home() -> Path:
    nvcc = shutil.which("nvcc")
    guess = Path(nvcc).resolve().parents[1] if nvcc and Path(nvcc).resolve().parent.name == "bin" else None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", guess):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home)
    raise FileNotFoundError("no CUDA toolkit: set CUDA_HOME to a folder with bin/nvcc")


def cuda_include_dirs(scratch: str | Path) -> list[str]:
    """torch's C++/CUDA headers, then the headers of the pip CUDA wheels (site-packages/nvidia/cu*/include) that the
    toolkit lacks, linked into `scratch`, as CMakeLists.txt does, so that the toolkit's own headers keep priority."""
    from torch.utils import cpp_extension

    try:
        dirs = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch before 2.6 spelled it cuda=True
        dirs = cpp_extension.include_paths(cuda=True)
    toolkit = cuda_home() / "include"
    spec = importlib.util.find_spec("nvidia")
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    for base in list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []:
        for inc in sorted(Path(base).glob("cu*/include")):
            for header in inc.glob("*.h"):
                if not (toolkit / header.name).exists() and not (scratch / header.name).exists():
                    (scratch / header.name).symlink_to(header)
    return [d for d in dirs if Path(d).is_dir() and Path(d) != Path("/usr/local/include")] + [str(scratch)]


_PTXAS_FN = re.compile(r"Function properties for (\S+)")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)'")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_LMEM = re.compile(r"(\d+) bytes lmem")


def parse_ptxas_verbose(text: str) -> dict[str, dict[str, int]]:
    """`ptxas -v` output -> {mangled function: {"regs", "stack", "spill_stores", "spill_loads", "smem", "lmem",
    "entry"}}: every function ptxas compiled, "entry" 1 for a kernel ("Compiling entry function") and 0 for a
    function it calls that was not inlined (a __noinline__ callee, a Triton noinline function), whose spills ptxas
    reports under the callee's own "Function properties" line, not the kernel's."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line) or _PTXAS_FN.search(line)
        if m:
            current = m.group(1)
            out.setdefault(current, {"regs": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0,
                                     "lmem": 0, "entry": 0})
            if _PTXAS_ENTRY.search(line):
                out[current]["entry"] = 1
            continue
        if current is None:
            continue
        if m := _PTXAS_STACK.search(line):
            out[current].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        if m := _PTXAS_USED.search(line):
            out[current]["regs"] = int(m[1])
        if m := _PTXAS_SMEM.search(line):
            out[current]["smem"] = int(m[1])
        if m := _PTXAS_LMEM.search(line):
            out[current]["lmem"] = int(m[1])
    return out


def callee_spills(ptxas: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The functions of a parsed ptxas log that are not kernels and spill: {function: {"spill_stores", "spill_loads"}}.
    The cubin holds no trace of them (their code sits inside their callers'), so their spills count against the
    kernels that may call them."""
    return {fn: {"spill_stores": p["spill_stores"], "spill_loads": p["spill_loads"]} for fn, p in ptxas.items()
            if not p.get("entry") and (p["spill_stores"] or p["spill_loads"])}


def add_callee_spills(row: dict, callees: dict[str, dict[str, int]], names: dict[str, str] | None = None) -> None:
    """Count the spills of non-inlined callees (`callee_spills`) in a kernel's row, named in "callee_spills"."""
    if not callees:
        return
    if row.get("spill_store_bytes") is not None:  # None: no log for the kernel itself, spills assumed anyway
        row["spill_store_bytes"] += sum(c["spill_stores"] for c in callees.values())
        row["spill_load_bytes"] = (row.get("spill_load_bytes") or 0) + sum(c["spill_loads"] for c in callees.values())
    row["callee_spills"] = {(names or {}).get(fn, fn): c for fn, c in callees.items()}


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines, strict=True))


_MAX_THREADS = re.compile(r"EIATTR_MAX_THREADS\s*\n\s*Format:[^\n]*\n\s*Value:\s*0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+"
                          r"0x([0-9a-f]+)")


def _launch_bounds(elf: str) -> dict[str, int]:
    """Threads per block fixed by __launch_bounds__, per function (from the .nv.info.<function> sections)."""
    out = {}
    for section in re.split(r"\n(?=\.nv\.info\.)", elf):
        head = section.split("\n", 1)[0].strip()
        if head.startswith(".nv.info.") and (m := _MAX_THREADS.search(section)):
            out[head[len(".nv.info."):]] = int(m[1], 16) * int(m[2], 16) * int(m[3], 16)
    return out


_GLOBAL_FN = re.compile(r"__global__\s+(?:void\s+)?(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?(?:void\s+)?"
                        r"(\w+)\s*\(")


def _matching(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += (text[i] == open_) - (text[i] == close)
        if depth == 0:
            return i + 1
    return len(text)


def dynamic_shared_users(source: str) -> tuple[dict[str, int], list[int]]:
    """Where a CUDA source declares `extern __shared__` (dynamic shared memory, sized by the launch): {kernel name:
    line} for declarations inside a __global__ function's body, and the lines of those outside any (in a __device__
    helper, which some kernel calls). Comments are ignored; brackets are counted, not parsed."""
    code = re.sub(r"//[^\n]*|/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m[0]), source, flags=re.S)
    bodies = []
    for m in _GLOBAL_FN.finditer(code):
        after = _matching(code, m.end() - 1, "(", ")")
        brace = re.match(r"\s*\{", code[after:])
        if brace:  # a definition, not a declaration
            begin = after + brace.end() - 1
            bodies.append((m[1], begin, _matching(code, begin, "{", "}")))
    users: dict[str, int] = {}
    stray = []
    for m in re.finditer(r"\bextern\s+__shared__\b", code):
        line = code.count("\n", 0, m.start()) + 1
        owner = next((name for name, lo, hi in bodies if lo <= m.start() < hi), None)
        if owner is None:
            stray.append(line)
        else:
            users.setdefault(owner, line)
    return users, stray


def compile_cuda_file(path: str | Path, arch: int = 90, include_dirs: list[str] | None = None,
                      assumed_threads: int = 256, limits: SMLimits = H100, keep_dir: str | Path | None = None
                      ) -> list[dict]:
    """Compile one .cu with `nvcc -cubin -arch=sm_<arch> -Xptxas -v` (flags as CMakeLists.txt builds csrc/);
    one row per __global__ function, named by its demangled name."""
    path = Path(path)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        include_dirs = cuda_include_dirs(Path(tmp) / "include") if include_dirs is None else include_dirs
        where = Path(keep_dir) if keep_dir is not None else Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        cubin = where / (path.stem + f".sm_{arch}.cubin")
        cmd = [str(cuda_home() / "bin" / "nvcc"), "-cubin", f"-arch=sm_{arch}", "-Xptxas", "-v", "-std=c++20", "-O3",
               "--expt-relaxed-constexpr", "-DFINEVITI_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
               "-I", str(path.parent), *[f"-I{d}" for d in include_dirs], str(path), "-o", str(cubin)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            row = {**_empty_row(path.name, f"nvcc sm_{arch}", arch), "source": "cuda",
                   "error": f"nvcc failed ({proc.returncode}): {proc.stderr.strip()[-3000:]}",
                   "compile_s": round(time.perf_counter() - start, 2)}
            return [row]
        ptxas = parse_ptxas_verbose(proc.stderr + proc.stdout)
        funcs = read_cubin(cubin)
        bounds = _launch_bounds(_run_tool([nvidia_tool("cuobjdump"), "-elf", str(cubin)]))
    names = demangle(sorted(funcs))
    source = path.read_text()
    # what a launch adds as dynamic shared memory (extern __shared__), which the cubin cannot say: declared in the
    # source as "kernel-report: NAME dynamic shared memory up to BYTES bytes"
    dynamic = {m[1]: int(m[2]) for m in re.finditer(r"kernel-report: (\w+) dynamic shared memory up to (\d+) bytes",
                                                    source)}
    users, stray = dynamic_shared_users(source)
    # A callee's spills cannot be pinned on its caller from the cubin (the callee's code sits inside the caller's):
    # they count against every kernel that makes calls and has the local memory a spill needs, or, if none is
    # both, every kernel with local memory, or else every kernel of the file.
    callees = callee_spills(ptxas)
    with_local = [fn for fn, info in funcs.items() if info["usage"].get("LOCAL", 0) + info["usage"].get("STACK", 0)]
    charged = ([fn for fn in with_local if funcs[fn]["ops"]["CALL"]] or with_local or list(funcs)) if callees else []
    callee_names = demangle(sorted(callees))
    rows = []
    for fn, info in funcs.items():
        threads = bounds.get(fn)
        num_warps = -(-(threads or assumed_threads) // limits.warp_size)
        declared = [name for name in dynamic if re.search(rf"\b{name}\b", names[fn])]
        extra = dynamic[declared[0]] if declared else 0
        config = f"{path.name} sm_{arch}, " + (f"{threads} threads (__launch_bounds__)" if threads
                                               else f"{assumed_threads} threads (assumed)")
        config += f", up to {extra} B dynamic shared memory (declared in the source)" if extra else ""
        row = analyse(info, kernel=names[fn], config=config, arch=arch, num_warps=num_warps, dynamic_shared=extra,
                      limits=limits)
        p = ptxas.get(fn, {})
        row.update(source="cuda", function=fn, triton=None, spill_store_bytes=p.get("spill_stores"),
                   spill_load_bytes=p.get("spill_loads"), compile_s=round(time.perf_counter() - start, 2))
        if fn in charged:
            add_callee_spills(row, callees, callee_names)
        note_local_memory(row)
        used = next((line for name, line in users.items() if re.search(rf"\b{name}\b", names[fn])), None)
        if not declared and (used or stray):
            where = (f"line {used}" if used else f"line {stray[0]}, in a function that is not a kernel (if this "
                     "kernel does not call it, declare 0)")
            short = next((name for name in users if re.search(rf"\b{name}\b", names[fn])), names[fn].split("(")[0])
            row["undeclared_dynamic_shared"] = (
                f"uses dynamic shared memory (extern __shared__, {path.name} {where}) without saying how much: "
                f"its shared memory and blocks per SM leave it out; declare it in the source with a comment "
                f"`// kernel-report: {short.split('::')[-1]} dynamic shared memory up to BYTES bytes`")
        if p and (p["regs"], p["smem"]) != (row["regs"], row["static_shared_bytes"]):
            row["warnings"].append(f"ptxas -v says {p['regs']} registers and {p['smem']} B shared memory, cuobjdump "
                                   f"{row['regs']} and {row['static_shared_bytes']}")
        if keep_dir is not None:
            row["files"] = {"cubin": str(cubin)}
        rows.append(row)
    return rows


def compile_csrc(csrc: str | Path = REPO / "csrc", arch: int = 90, jobs: int | None = None,
                 keep_dir: str | Path | None = None) -> list[dict]:
    """Every csrc/*.cu (none when the folder is missing), nvcc runs in parallel."""
    files = sorted(Path(csrc).glob("*.cu")) if Path(csrc).is_dir() else []
    if not files:
        return []
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(files)))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            include_dirs = cuda_include_dirs(Path(tmp) / "include")
        except Exception as exc:  # noqa: BLE001  (no toolkit, or a torch without headers: every file fails, named)
            return [{**_empty_row(f.name, f"nvcc sm_{arch}", arch), "source": "cuda",
                     "error": f"cannot compile csrc/ here: {type(exc).__name__}: {exc}"} for f in files]
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # nvcc is its own process: threads suffice
            per_file = pool.map(lambda f: compile_cuda_file(f, arch, include_dirs, keep_dir=keep_dir), files)
            return [row for rows in per_file for row in rows]


# ----------------------------------------------------------------------------------------------------------------
# Checking on a GPU (optional)
# ----------------------------------------------------------------------------------------------------------------


def device_check(rows: list[dict], limits: SMLimits = H100) -> list[str]:
    """On a machine with a GPU: load each kept cubin through the CUDA driver and compare the report's registers, local
    memory, static shared memory and blocks per SM with the driver's figures; blocks per SM also at other dynamic
    shared memory sizes, which tests `blocks_per_sm` itself. Fills row["device"]; returns the mismatches."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")

    def ok(res, what):
        if res != 0:
            raise RuntimeError(f"{what} failed with CUresult {res}")

    ok(cuda.cuInit(0), "cuInit")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    ok(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ok(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    ok(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    mismatches = []
    for row in rows:
        cubin = (row.get("files") or {}).get("cubin")
        if row.get("error") or not cubin or row.get("num_warps") is None:
            continue
        try:
            mismatches += _device_check_row(cuda, ok, row, limits)
        except Exception as exc:  # noqa: BLE001  (one cubin the driver rejects is a finding, not a crash)
            mismatches.append(f"{row['kernel']} [{row['config']}]: {type(exc).__name__}: {exc}")
    return mismatches


def _device_check_row(cuda, ok, row: dict, limits: SMLimits) -> list[str]:
    import ctypes

    mismatches = []
    cubin = row["files"]["cubin"]
    mod, func = ctypes.c_void_p(), ctypes.c_void_p()
    data = Path(cubin).read_bytes()
    ok(cuda.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(data)), f"cuModuleLoadData {cubin}")
    try:
        _measure(cuda, ok, func, mod, row, limits, mismatches)
    finally:
        cuda.cuModuleUnload(mod)
    return mismatches


def _measure(cuda, ok, func, mod, row: dict, limits: SMLimits, mismatches: list[str]) -> None:
    import ctypes

    ok(cuda.cuModuleGetFunction(ctypes.byref(func), mod, row["function"].encode()), "cuModuleGetFunction")
    got = {}
    for name, code in (("regs", 4), ("local_bytes", 3), ("static_shared_bytes", 1)):
        v = ctypes.c_int()
        ok(cuda.cuFuncGetAttribute(ctypes.byref(v), code, func), "cuFuncGetAttribute")
        got[name] = v.value
    static = row["static_shared_bytes"]
    dynamic = row["shared_bytes"] - static
    # the most dynamic shared memory the driver will allow this function
    ok(cuda.cuFuncSetAttribute(func, 8, ctypes.c_int(limits.smem_per_block - got["static_shared_bytes"])),
       "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")
    probes = {}
    for extra in sorted({dynamic, 0, 20 * 1024, 40 * 1024 + 8, 75 * 1024, 100 * 1024 + 1, 113 * 1024,
                         114 * 1024, 150 * 1024, limits.smem_per_block - static}):
        if extra < 0 or extra + static > limits.smem_per_block:
            continue
        n = ctypes.c_int()
        ok(cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(n), func, row["num_warps"] * limits.warp_size, ctypes.c_size_t(extra)), "cuOccupancy")
        probes[extra] = (n.value, blocks_per_sm(row["regs"], row["num_warps"], static + extra, limits)[0])
    got["blocks_per_sm"] = probes[dynamic][0]
    row["device"] = {**got, "probes": {k: {"driver": a, "formula": b} for k, (a, b) in probes.items()}}
    for key, value in got.items():
        if row.get(key) != value:
            mismatches.append(f"{row['kernel']} [{row['config']}]: {key} report {row.get(key)} driver {value}")
    for extra, (drv, formula) in probes.items():
        if drv != formula:
            mismatches.append(f"{row['kernel']} [{row['config']}]: blocks per SM at {extra} B dynamic shared "
                              f"memory: formula {formula}, driver {drv}")


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

JSON_FIELDS = ("kernel", "config", "arch", "regs", "shared_bytes", "local_bytes", "mma", "blocks_per_sm",
               "stack_bytes", "warp_specialized", "hot_loop_instructions", "hot_loop_issue_over_tensor",
               "outside_mma_loops_instructions", "warnings", "error", "triton")


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def _short(text: str) -> str:
    text = text.split(" (")[0].split(": ")[0]
    return text if len(text) <= 80 else text[:77] + "..."


def render_markdown(rows: list[dict], *, arch: int, elapsed_s: float, triton_version: str | None,
                    problems: list[str], command: str, jobs: int) -> str:
    lines = [
        f"# Kernel report (sm_{arch})",
        "",
        f"Compiled ahead of time for sm_{arch} (no GPU needed) by `{command}`: triton {triton_version or '-'}, "
        f"{len(rows)} rows, {jobs} parallel jobs, {elapsed_s:.1f} s in all.",
        "Occupancy under the H100's limits (65536 registers per SM allocated per warp in units of 256; 228 KB shared "
        "memory per SM, 1 KB reserved per block, 227 KB per block; 64 warps and 32 blocks per SM). Shared memory of "
        "Triton kernels is dynamic and comes from the compiled metadata; local memory is the per-thread stack frame "
        "plus local data, spill B the bytes of spill stores ptxas reports. CUDA kernels without `__launch_bounds__` "
        "are assumed at 256 threads.",
        "",
        "Hot loop: the loop holding HGMMA with the most instructions of its own (SASS instructions per iteration) and "
        "its issue cycles over its tensor-core cycles per block (four warp instructions issued per cycle against "
        "4096 dense 16-bit FLOPs per cycle of an SM): above 1, the loop issues longer than its matrix work takes. "
        "'outside': the function's instructions (without NOP padding) in no HGMMA loop, counted statically: set-up "
        "and epilogues, every branch of them (a loss kernel's masked and unmasked tile epilogues both count, while "
        "a tile runs one; it runs once per D / BLOCK_K trips of the K loop).",
        "",
        "| kernel | config | regs | warps | shared B | local B | spill B | MMA | WS | blocks/SM (limit) | hot loop "
        "(instr, issue/tensor) | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|---|---|",
    ]
    for r in rows:
        notes = "; ".join([f"FAIL: {_short(why)}" for why in failures(r)]
                          + [f"warn: {_short(w)}" for w in r.get("warnings") or []])
        limit = (f"{r['blocks_per_sm']} ({r.get('occupancy_limiter')})" if r.get("blocks_per_sm") is not None
                 else "-")
        ws = "-" if r.get("warp_specialized") is None else _cell(r["warp_specialized"])
        hot = (f"{r['hot_loop_instructions']}, {r['hot_loop_issue_over_tensor']:.2f}; "
               f"{r['outside_mma_loops_instructions']} outside"
               if r.get("hot_loop_issue_over_tensor") is not None else "-")
        lines.append(f"| {r['kernel']} | {r['config']} | {_cell(r.get('regs'))} | {_cell(r.get('num_warps'))} | "
                     f"{_cell(r.get('shared_bytes'))} | {_cell(r.get('local_bytes'))} | "
                     f"{_cell(r.get('spill_store_bytes'))} | {_cell(r.get('mma'))} | {ws} | {limit} | {hot} | "
                     f"{notes.replace('|', '/')} |")
    if not rows:
        lines.append("| (no rows) | | | | | | | | | | | |")
    lines += ["", f"Check: {'FAILED' if problems else 'passed'}"]
    lines += [f"- {p}" for p in problems]
    grouped: dict[str, list[str]] = {}  # the same warning on many configurations is listed once
    for r in rows:
        for w in r.get("warnings") or []:
            grouped.setdefault(w, []).append(f"{r['kernel']} [{r['config']}]")
    if grouped:
        lines += ["", "Warnings:"]
        for warning, where in grouped.items():
            shown = "; ".join(where[:3]) + (f"; and {len(where) - 3} more" if len(where) > 3 else "")
            lines.append(f"- {warning}: {shown}")
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], out_dir: str | Path, **kwargs) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_rows = []
    for r in rows:
        full = {k: r.get(k) for k in JSON_FIELDS}
        full.update({k: v for k, v in r.items() if k not in JSON_FIELDS and k != "files"})
        json_rows.append(full)
    md = out_dir / "kernel_report.md"
    js = out_dir / "kernel_report.json"
    md.write_text(render_markdown(rows, **kwargs))
    js.write_text(json.dumps(json_rows, indent=1, default=str) + "\n")
    return md, js


def rows_function(spec: str):
    """The function that `--rows MODULE:FUNCTION` names (FUNCTION defaults to `rows`), imported; a ValueError that
    names the flag, the value and what is wrong when there is none."""
    module, _, func = spec.partition(":")
    func = func or "rows"
    if not module:
        raise ValueError(f"--rows {spec!r}: expected MODULE:FUNCTION, e.g. tests.kernels_for_report:rows")
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  (whatever the import raised, it is the value that is wrong)
        raise ValueError(f"--rows {spec!r}: cannot import module {module!r} ({type(exc).__name__}: {exc}); expected "
                         "a module importable from the repository root, e.g. tests.kernels_for_report") from None
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise ValueError(f"--rows {spec!r}: module {module!r} has no function {func!r}; expected a function of it "
                         "that returns Shipped rows")
    return fn


def load_rows(spec: str | None, kernel: str | None) -> tuple[list, list[str]]:
    """The rows to compile, from `--rows` or from the registry (only `kernel`'s, when given: a registry name or a
    Shipped.kernel_name), and the problems --check fails on before any compile: a declared kernel that ships no
    configuration. SystemExit for a `kernel` that matches nothing."""
    problems: list[str] = []
    if spec:
        rows = list(rows_function(spec)())
        names = sorted({r.kernel_name for r in rows})
        what = f"the kernel names of --rows {spec}"
    else:
        from fineviti.kernels import registry

        declared = registry.declared()
        names = sorted(declared)
        what = "the registry names"
        rows = []
        for name in [kernel] if kernel in declared else declared:
            shipped = registry.shipped(name)
            if not shipped:
                problems.append(f"{name}: declared in fineviti.kernels.registry, but its configurations function "
                                "returned no rows: nothing of it is compiled or checked")
            rows += shipped
        if kernel in declared:
            return rows, problems
    if kernel:
        rows = [r for r in rows if r.kernel_name == kernel]
        if not rows:
            raise SystemExit(f"--kernel {kernel!r}: no such kernel; expected one of {what}: {names}")
        problems = []
    return rows, problems


def _check_folder_arg(p: argparse.ArgumentParser, flag: str, value: str | None) -> None:
    """A folder the report writes into: it may not exist yet, but it may not be (or lie under) a file."""
    if value is None:
        return
    for path in [Path(value), *Path(value).parents]:
        if path.exists():
            if not path.is_dir():
                p.error(f"{flag} {value!r}: expected a folder to write into (it may not exist yet), but "
                        f"{'it' if path == Path(value) else str(path)!r} is an existing file")
            return


def validate_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag checked before anything compiles; argparse's error (exit 2) names the flag and the value."""
    if args.arch not in SUPPORTED_ARCHS:
        p.error(f"--arch {args.arch}: expected one of {sorted(SUPPORTED_ARCHS)}, the compute capabilities whose "
                "limits (registers, shared memory, occupancy) the report holds")
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs {args.jobs}: expected a positive count")
    _check_folder_arg(p, "--out", args.out)
    _check_folder_arg(p, "--keep", args.keep)
    if args.csrc is not None:
        csrc = Path(args.csrc)
        if not csrc.is_dir():
            p.error(f"--csrc {args.csrc!r}: expected a folder of .cu files, got "
                    f"{'a file' if csrc.exists() else 'a path that does not exist'}")
        if not any(csrc.glob("*.cu")):
            p.error(f"--csrc {args.csrc!r}: expected a folder of .cu files, got a folder with none")
    if args.rows:
        try:
            rows_function(args.rows)
        except ValueError as exc:
            p.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU; must happen before anything imports triton
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for: "
                   f"{', '.join(map(str, sorted(SUPPORTED_ARCHS)))} (default 90)")
    p.add_argument("--out", help="folder for kernel_report.md/.json (default benchmarks/results/; with --kernel,\n"
                   "--quick or --rows benchmarks/results/latest/, which git ignores: a partial report never\n"
                   "replaces the full one)")
    p.add_argument("--kernel", help="only this kernel (its registry name or its Shipped.kernel_name)")
    p.add_argument("--quick", action="store_true", help="one configuration per kernel, head dim and dtype")
    p.add_argument("--check", action="store_true", help="exit 1 when a configuration does not compile (or its "
                   "compile process dies),\nspills more than its declared spill_allowance (0 unless declared; the "
                   "spills of\nfunctions it calls count), needs more shared memory or registers than a block may "
                   "have,\nor cannot launch; when a CUDA kernel's extern __shared__ is not declared; or when a\n"
                   "declared kernel ships no configuration. Local memory that is not spills, and spills\nwithin "
                   "an allowance, only warn.")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    p.add_argument("--no-csrc", action="store_true", help="leave out the CUDA kernels of csrc/")
    p.add_argument("--csrc", help="folder of .cu files (default csrc/, or none with --rows or --kernel)")
    p.add_argument("--rows", help="MODULE:FUNCTION returning Shipped rows, instead of the registry")
    p.add_argument("--keep", help="keep cubins, PTX and IR in this folder")
    p.add_argument("--device-check", action="store_true", help="on a GPU: compare with the CUDA driver's figures")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(DEFAULT_OUT / "latest" if args.kernel or args.quick or args.rows else DEFAULT_OUT)
    validate_args(p, args)

    start = time.perf_counter()
    rows, declared_problems = load_rows(args.rows, args.kernel)
    if args.quick:
        rows = quick_rows(rows)
    keep = args.keep
    tmp = None
    if args.device_check and keep is None:
        tmp = tempfile.TemporaryDirectory()
        keep = tmp.name
    results = compile_rows(rows, args.arch, args.jobs, keep)
    csrc = args.csrc or (None if args.rows or args.kernel else REPO / "csrc")
    if csrc is not None and not args.no_csrc:
        results += compile_csrc(csrc, args.arch, args.jobs, keep)
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    problems = declared_problems + [f"{r['kernel']} [{r['config']}]: {why}" for r in results for why in failures(r)]
    mismatches = device_check(results) if args.device_check else []
    elapsed = time.perf_counter() - start
    command = "python benchmarks/kernel_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md, js = write_report(results, args.out, arch=args.arch, elapsed_s=elapsed, triton_version=triton_version,
                          problems=problems, command=command.strip(),
                          jobs=max(1, min(args.jobs or os.cpu_count() or 1, max(len(rows), 1))))
    if mismatches:
        with md.open("a") as f:
            f.write("\nDevice check (CUDA driver vs report) mismatches:\n" + "".join(f"- {m}\n" for m in mismatches))
    print(md.read_text())
    print(f"wrote {md} and {js} ({elapsed:.1f} s)")
    if tmp is not None:
        tmp.cleanup()
    rc = 0
    if args.device_check:
        print(f"device check: {len(mismatches)} mismatches" + "".join(f"\n  {m}" for m in mismatches))
        rc |= 2 if mismatches else 0
    if args.check and problems:
        print("kernel report check FAILED:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
        rc |= 1
    return rc


if __name__ == "__main__":
    sys.exit(main())

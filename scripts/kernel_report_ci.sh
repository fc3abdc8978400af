#!/usr/bin/env bash
# The kernel report as a CI gate (run after pytest): every shipped Triton configuration and every csrc/ kernel
# compiled for sm_90 with triton 3.8 (.venv), then one configuration per kernel, head dim and dtype with triton 3.6
# (the GPU machines' version) in a second, cached environment (.venv-t36, made by scripts/triton36_env.sh).
# Fails, naming kernel and config, when a configuration does not compile (or its compile process dies), spills
# more than its declared spill_allowance (kernels/registry.py; 0 unless declared, and a __noinline__ callee's spills
# count), needs more shared memory or registers than a block may have, or cannot launch; when a csrc/ kernel uses
# extern __shared__ without a `// kernel-report: NAME dynamic shared memory up to N bytes` comment; or when a
# declared kernel ships no configuration. Local memory that is not spills (a local array) and spills within an
# allowance are warnings only (see benchmarks/kernel_report.py's docstring).
#   KERNEL_REPORT_T36_FULL=1   the full sweep with triton 3.6 too (opt-in: it doubles the time)
#   FINEVITI_TEST_T36=0        leaves the triton 3.6 part out (as scripts/test.sh leaves out its interpreter run)
#   KERNEL_REPORT_OUT=DIR      where the reports go (default out/kernel_report/, ignored by git)
#   KERNEL_REPORT_JOBS=N       parallel compiles (default: CPU count)
#   KERNEL_REPORT_PYTHON=PY    the interpreter of the triton 3.8 part (default .venv/bin/python)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${KERNEL_REPORT_PYTHON:-$ROOT/.venv/bin/python}"  # not PYTHON: scripts/setup.sh reads that one for .venv's base
OUT="${KERNEL_REPORT_OUT:-$ROOT/out/kernel_report}"
JOBS=()
[ -n "${KERNEL_REPORT_JOBS:-}" ] && JOBS=(--jobs "$KERNEL_REPORT_JOBS")
unset TRITON_INTERPRET
status=0
total_start=$SECONDS

part() {  # part NAME COMMAND...: runs it, prints its time, remembers a failure
  local name="$1" start=$SECONDS rc
  shift
  echo "== kernel report: $name"
  "$@"
  rc=$?
  echo "== kernel report: $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}

part "triton 3.8, full sweep + csrc/" "$PY" benchmarks/kernel_report.py --check --out "$OUT/triton-3.8" "${JOBS[@]}"

env_start=$SECONDS
if [ "${FINEVITI_TEST_T36:-1}" = "0" ]; then
  echo "== kernel report: triton 3.6 left out (FINEVITI_TEST_T36=0)"
elif T36_PY="$(scripts/triton36_env.sh)"; then
  echo "== kernel report: triton 3.6 environment ready in $((SECONDS - env_start)) s ($T36_PY)"
  T36_ARGS=(--quick)
  [ "${KERNEL_REPORT_T36_FULL:-0}" = "1" ] && T36_ARGS=()
  part "triton 3.6, ${T36_ARGS[*]:-full sweep}" env PYTHONPATH="$ROOT" "$T36_PY" benchmarks/kernel_report.py \
    --check --no-csrc "${T36_ARGS[@]}" --out "$OUT/triton-3.6" "${JOBS[@]}"
else
  echo "== kernel report: could not create the triton 3.6 environment (FAILED)"
  status=1
fi

echo "== kernel report: $([ $status -eq 0 ] && echo passed || echo FAILED) in $((SECONDS - total_start)) s; reports in $OUT"
exit $status

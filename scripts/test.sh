#!/usr/bin/env bash
# Sets up this checkout (scripts/setup.sh), runs the tests (arguments go to pytest; the default leaves out
# the `slow` sweeps), lints with ruff, then the kernel tests under triton 3.6's interpreter (scripts/test_triton36.sh, the GPU
# machines' triton; FINEVITI_TEST_T36=0 leaves them out) and the kernel report's CI check. Prints the time of each
# stage.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

elapsed() { local ms=$(( ($(date +%s%N) - $1) / 1000000 )); echo "$((ms / 1000)).$((ms % 1000 / 100)) s"; }

start=$(date +%s%N)
bash scripts/setup.sh
echo "== test.sh: set-up and build took $(elapsed "$start")"

start=$(date +%s%N)
status=0
.venv/bin/python -m pytest "$@" || status=$?
echo "== test.sh: tests took $(elapsed "$start")"
[ "$status" -eq 0 ] || exit "$status"

# lint (STYLE.md: ruff, the rules and line length of pyproject.toml), a second or two
.venv/bin/ruff check . || exit $?

if [ "${FINEVITI_TEST_T36:-1}" != "0" ]; then
  start=$(date +%s%N)
  bash scripts/test_triton36.sh || status=$?
  echo "== test.sh: kernel tests under triton 3.6 took $(elapsed "$start")"
  [ "$status" -eq 0 ] || exit "$status"
fi

if [ -f scripts/kernel_report_ci.sh ]; then
  start=$(date +%s%N)
  bash scripts/kernel_report_ci.sh || status=$?
  echo "== test.sh: kernel report took $(elapsed "$start")"
  [ "$status" -eq 0 ] || exit "$status"
fi

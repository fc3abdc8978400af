#!/usr/bin/env bash
# Sets up this checkout (scripts/setup.sh), runs the tests (arguments go to pytest; the default leaves out
# the `slow` sweeps) and then the kernel report's CI check when it exists. Prints the time of each stage.
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

if [ -f scripts/kernel_report_ci.sh ]; then
  start=$(date +%s%N)
  bash scripts/kernel_report_ci.sh || status=$?
  echo "== test.sh: kernel report took $(elapsed "$start")"
  [ "$status" -eq 0 ] || exit "$status"
fi

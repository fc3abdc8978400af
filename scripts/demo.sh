#!/usr/bin/env bash
# Sets up this checkout (scripts/setup.sh) and runs the main job on the embedded default.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
echo "== demo"
# The main job: synthetic data, stage 1, evaluation, stage 2 (fineviti/train/demo.py).
.venv/bin/fineviti demo --out runs/demo "$@"

#!/usr/bin/env bash
# Sets up this checkout (scripts/setup.sh) and runs the main job on the embedded default.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
echo "== demo"
# The main job. The training issue replaces this line with: .venv/bin/fineviti demo --out runs/demo "$@"
.venv/bin/fineviti demo --out runs/demo "$@"

#!/usr/bin/env bash
# Creates (once) .venv-t36: the second, small environment in which CI compiles the kernels with triton 3.6, the
# version the GPU machines run. It holds the CPU build of torch 2.13.0 (pip takes the +cpu wheel from the local
# wheel folder; it does not pin triton) and triton==3.6.0; the repository is used from PYTHONPATH, never installed.
# Idempotent: an environment that already has both versions is kept. Prints the environment's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRITON36_VENV:-$ROOT/.venv-t36}"
TORCH_VERSION="${TRITON36_TORCH:-2.13.0}"
TRITON_VERSION="${TRITON36_TRITON:-3.6.0}"
BASE_PY="${TRITON36_BASE_PYTHON:-$(command -v python3.11 || command -v python3)}"

have() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_VERSION" "$TRITON_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("torch").split("+")[0] == sys.argv[1], version("torch")
assert version("triton") == sys.argv[2], version("triton")
PY
}

if ! have; then
  echo "creating $VENV (torch $TORCH_VERSION CPU, triton $TRITON_VERSION)" >&2
  rm -rf "$VENV"
  "$BASE_PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" numpy >&2
  have || { echo "$VENV: torch $TORCH_VERSION / triton $TRITON_VERSION did not install" >&2; exit 1; }
fi
echo "$VENV/bin/python"

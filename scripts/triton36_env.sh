#!/usr/bin/env bash
# Creates (once) .venv-t36: the second, small environment with triton 3.6, the version the GPU machines run, in
# which CI compiles the kernels (the kernel report) and runs the kernel tests under triton 3.6's interpreter
# (scripts/test_triton36.sh). It holds the CPU build of torch 2.13.0 (pip takes the +cpu wheel from the local
# wheel folder; it does not pin triton), triton==3.6.0, numpy below 2.4 and pytest; the repository is used from
# PYTHONPATH, never installed. numpy 2.4 made the conversion of a one-element array to a Python scalar an error,
# which triton 3.6's interpreter does for every loop bound and index it reads from a tensor: with it, nearly every
# kernel test failed under that interpreter with "only 0-dimensional arrays can be converted to Python scalars".
# Idempotent: an environment that already has torch and triton at these versions is kept (numpy and pytest are
# installed into it when missing or wrong). Prints the environment's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRITON36_VENV:-$ROOT/.venv-t36}"
TORCH_VERSION="${TRITON36_TORCH:-2.13.0}"
TRITON_VERSION="${TRITON36_TRITON:-3.6.0}"
EXTRAS=("numpy<2.4" "pytest")
BASE_PY="${TRITON36_BASE_PYTHON:-$(command -v python3.11 || command -v python3)}"

have_core() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_VERSION" "$TRITON_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("torch").split("+")[0] == sys.argv[1], version("torch")
assert version("triton") == sys.argv[2], version("triton")
PY
}

have_extras() {
  "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
from importlib.metadata import version
major, minor = (int(x) for x in version("numpy").split(".")[:2])
assert (major, minor) < (2, 4), version("numpy")
version("pytest")
PY
}

if ! have_core; then
  echo "creating $VENV (torch $TORCH_VERSION CPU, triton $TRITON_VERSION)" >&2
  rm -rf "$VENV"
  "$BASE_PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "${EXTRAS[@]}" >&2
  have_core || { echo "$VENV: torch $TORCH_VERSION / triton $TRITON_VERSION did not install" >&2; exit 1; }
fi
if ! have_extras; then
  echo "$VENV: installing ${EXTRAS[*]}" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${EXTRAS[@]}" >&2
  have_extras || { echo "$VENV: ${EXTRAS[*]} did not install" >&2; exit 1; }
fi
echo "$VENV/bin/python"

#!/usr/bin/env bash
# Creates (once) .venv-t36: the second, small environment with triton 3.6, the version the GPU machines run, in
# which CI compiles the kernels (the kernel report) and runs the kernel tests under triton 3.6's interpreter
# (scripts/test_triton36.sh). Its own site-packages hold only triton==3.6.0 and numpy below 2.4 (installed without
# their dependencies); a .pth file puts the main environment's site-packages (.venv, made by scripts/setup.sh:
# torch, pytest and the rest) after them, so that these two shadow the main environment's triton 3.8 and numpy.
# No second torch is installed: PyPI's torch wheels pin the triton they were built with (2.13.0 pins 3.7.1), so a
# torch beside triton 3.6 only came from a local wheel folder; torch does not import triton for what runs here
# (the interpreter, triton.compile for sm_90, torch.compile with aot_eager). The repository is used from
# PYTHONPATH, never installed. numpy 2.4 made the conversion of a one-element array to a Python scalar an error,
# which triton 3.6's interpreter does for every loop bound and index it reads from a tensor: with it, nearly every
# kernel test failed under that interpreter with "only 0-dimensional arrays can be converted to Python scalars".
# Idempotent: an environment with these versions, linked to this checkout's .venv, is kept; a broken or stale one
# (another layout, an interrupted creation: the link is written last) is made again. Prints its python.
#   TRITON36_VENV      where (default .venv-t36)       TRITON36_TRITON   the triton version (default 3.6.0)
#   TRITON36_MAIN_VENV the environment it builds on (default .venv)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRITON36_VENV:-$ROOT/.venv-t36}"
MAIN="${TRITON36_MAIN_VENV:-$ROOT/.venv}"
TRITON_VERSION="${TRITON36_TRITON:-3.6.0}"
PACKAGES=("triton==$TRITON_VERSION" "numpy<2.4")
LINK=zz_fineviti_main_venv.pth  # "zz": read after the environment's own .pth files

[ -x "$MAIN/bin/python" ] || { echo "triton36_env: no main environment at $MAIN (run scripts/setup.sh first)" >&2
                               exit 1; }
MAIN_SITE="$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

ready() {
  [ -x "$VENV/bin/python" ] || return 1
  local site
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)" || return 1
  [ "$(cat "$site/$LINK" 2>/dev/null)" = "$MAIN_SITE" ] || return 1
  "$VENV/bin/python" - "$TRITON_VERSION" "$VENV" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version

import numpy
import pytest  # noqa: F401  (from the main environment)
import torch  # noqa: F401
import triton

assert triton.__version__ == sys.argv[1] and triton.__file__.startswith(sys.argv[2]), triton.__file__
assert tuple(int(x) for x in version("numpy").split(".")[:2]) < (2, 4) and numpy.__file__.startswith(sys.argv[2])
PY
}

if ! ready; then
  echo "creating $VENV (triton $TRITON_VERSION and numpy < 2.4 over $MAIN)" >&2
  rm -rf "$VENV"
  "$MAIN/bin/python" -m venv --without-pip "$VENV"
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # the main environment's pip installs into this one's site-packages (no pip of its own to bootstrap)
  "$MAIN/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$site" \
    "${PACKAGES[@]}" >&2
  echo "$MAIN_SITE" > "$site/$LINK"  # last: until it is written, ready() fails and the next run starts over
  ready || { echo "$VENV: triton $TRITON_VERSION / numpy < 2.4 over $MAIN did not come out usable" >&2; exit 1; }
fi
echo "$VENV/bin/python"

#!/usr/bin/env bash
# The CPU test suite under torch 2.11 and triton 3.6, the versions the GPU machines run (this machine's main
# environment has torch 2.14.1 and triton 3.8). Opt-in, not part of scripts/test.sh or CI: the environment is about
# 5 GB (torch 2.11.0 and its CUDA 13 libraries from PyPI, about 90 s to install here) and the suite takes about 15
# minutes on 2 cores. Run it before a GPU session when the code changed since the last one: the 2026-11-29 run found
# a gradient that torch 2.11's compile lost (qkv_split_rope's torch backend), which the GPU check's pytest would
# have failed on.
#
#   bash scripts/test_torch211.sh                      # the default test run (no gpu, no slow)
#   bash scripts/test_torch211.sh tests/test_rope.py -k compile
#
# .venv-t211 (TORCH211_VENV): torch==2.11.0 (TORCH211_TORCH) with the triton its wheel pins (3.6.0), numpy below
# 2.4 (triton 3.6's interpreter, see scripts/triton36_env.sh) and the test dependencies; made once, made again when
# its torch is another version. .t211-tree (TORCH211_TREE): a copy of this checkout's files (tracked, and untracked
# ones git does not ignore: the working tree as it is), where the extension is built against torch 2.11 with its
# own build/ and fineviti/_C*.so, so that this checkout's build (against torch 2.14) is left as it is. Files deleted
# from the checkout are deleted from the copy; its build outputs are kept between runs. Arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${TORCH211_VENV:-$ROOT/.venv-t211}")"  # absolute: the build runs from inside the copy
TREE="$(realpath -m "${TORCH211_TREE:-$ROOT/.t211-tree}")"
TORCH_VERSION="${TORCH211_TORCH:-2.11.0}"
PY="${PYTHON:-python3.11}"

if ! "$VENV/bin/python" - "$TORCH_VERSION" >/dev/null 2>&1 <<'PY'
import sys

import numpy
import pytest  # noqa: F401
import torch

assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert tuple(int(p) for p in numpy.__version__.split(".")[:2]) < (2, 4), numpy.__version__
PY
then
  echo "== test_torch211: creating $VENV (torch $TORCH_VERSION from PyPI)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  # PIP_CONSTRAINT: this machine's pip config pins torch for the main environment; this one takes its own
  PIP_CONSTRAINT= "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" \
    "numpy<2.4" pillow tokenizers safetensors pytest cmake ninja "setuptools>=70" wheel
fi
echo "== test_torch211: $("$VENV/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"

# The copy: everything but its build outputs emptied, then the checkout's files written in.
mkdir -p "$TREE"
find "$TREE" -mindepth 1 \( -path "$TREE/build" -o -name '_C*.so' -o -name '*.egg-info' \) -prune -o -type f -print0 \
  | xargs -0 -r rm -f
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
  | tar --null -T - -cf -) | tar -xf - -C "$TREE"

cd "$TREE"
echo "== test_torch211: building the extension against torch $TORCH_VERSION in $TREE"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  --no-build-isolation --no-deps -e . >"$TREE/build.log" 2>&1 || { tail -40 "$TREE/build.log"; exit 1; }
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -W "ignore::DeprecationWarning" "$@"

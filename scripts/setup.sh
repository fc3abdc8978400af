#!/usr/bin/env bash
# Sets up this checkout: .venv (Python 3.11), the dependencies pinned by constraints.txt, and the editable
# build of fineviti._C. Idempotent: each stage is skipped when its stamp (the dependencies' in .venv, the build's
# in build/) says its inputs are unchanged; a .venv that cannot run pip (an interrupted creation) is made again.
# Knobs: PYTHON (the interpreter that creates .venv), MAX_JOBS, TORCH_CUDA_ARCH_LIST,
# FINEVITI_SKIP_CUDA_BUILD=1 (C++ only). Takes a few minutes on a fresh clone (torch comes from pip).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p build

stage_start=0
stage() { stage_start=$(date +%s%N); echo "== setup: $1"; }
stage_done() { local ms=$(( ($(date +%s%N) - stage_start) / 1000000 )); echo "== setup: $1 took $((ms / 1000)).$((ms % 1000 / 100)) s"; }

stage "virtual environment"
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
  rm -rf .venv  # what an interrupted creation left (the check above fails until pip is in)
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
stage_done "virtual environment"

# The packages to install: the project's dependencies and its `test`, `dali`, `vision` and `hf` extras, at the versions of
# constraints.txt, plus the build tools (setuptools, cmake, ninja) since the build runs without isolation.
stage "dependencies"
deps_stamp=$(cat constraints.txt pyproject.toml <("$PY" -V) | sha256sum | cut -c1-16)
# the stamp lives in .venv: a new .venv (the old one deleted) installs again
if [ "$(cat .venv/.deps-stamp 2>/dev/null)" != "$deps_stamp" ]; then
  mapfile -t requirements < <("$PY" - <<'PYEOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for requirement in [*project["dependencies"], *extras["test"], *extras["dali"], *extras["vision"], *extras["hf"], "setuptools", "cmake", "ninja"]:
    print(requirement)
PYEOF
)
  "$PY" -m pip install --quiet --disable-pip-version-check -c constraints.txt "${requirements[@]}"
  echo "$deps_stamp" > .venv/.deps-stamp
else
  echo "unchanged since the last install"
fi
stage_done "dependencies"

# Rebuilt when the C++/CUDA sources, the build files, torch, the build knobs or where nvcc is change, or the
# library is gone (a build made before a CUDA toolkit was installed has no CUDA part).
stage "build of fineviti._C"
build_stamp=$(cat setup.py CMakeLists.txt pyproject.toml csrc/* \
  <(ls -d .venv/lib/python*/site-packages/torch-*.dist-info) \
  <(echo "${FINEVITI_SKIP_CUDA_BUILD:-} ${TORCH_CUDA_ARCH_LIST:-} ${FINEVITI_BUILD_TYPE:-}") \
  <(ls "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" 2>/dev/null; command -v nvcc || true) | sha256sum | cut -c1-16)
if [ "$(cat build/.build-stamp 2>/dev/null)" != "$build_stamp" ] || ! ls fineviti/_C.*.so >/dev/null 2>&1 \
  || [ ! -x .venv/bin/fineviti ]; then
  "$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
  echo "$build_stamp" > build/.build-stamp
else
  echo "unchanged since the last build"
fi
stage_done "build of fineviti._C"

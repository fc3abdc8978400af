#!/usr/bin/env bash
# The kernel tests (attention, RoPE, the losses, the norm and the SwiGLU gate) under triton 3.6's interpreter, in
# .venv-t36 (scripts/triton36_env.sh): the main test run uses triton 3.8, the GPU machines run 3.6, and the two
# front ends differ (what the interpreter accepts, how descriptors and loops lower). CPU only: TRITON_INTERPRET=1
# always, so on a GPU machine too the kernels run in the interpreter here (the device tests are pytest -m gpu in
# the main environment). Arguments go to pytest in place of the default file list.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T36_PY="$(scripts/triton36_env.sh)"
FILES=(tests/test_attention.py tests/test_rope.py tests/test_contrastive.py tests/test_norm.py tests/test_swiglu.py)
[ "$#" -gt 0 ] && FILES=("$@")
# -p no:cacheprovider: the main run's .pytest_cache is left as it was; the interpreter's numpy deprecation warnings
# (one per loop bound) are not ours to fix. FINEVITI_TEST_MATRIX=fast: the losses' (N, D) matrix at its fast
# shapes only (the main run covers the whole of it with triton 3.8); set FINEVITI_TEST_MATRIX=full for all of it.
exec env TRITON_INTERPRET=1 PYTHONPATH="$ROOT" FINEVITI_TEST_MATRIX="${FINEVITI_TEST_MATRIX:-fast}" "$T36_PY" -m pytest -q -p no:cacheprovider \
  -W "ignore::DeprecationWarning" "${FILES[@]}"

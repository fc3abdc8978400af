"""Loading of the compiled extension `fineviti._C` (C++ always, CUDA when it was built)."""

from __future__ import annotations

import importlib

_state: dict[str, object] = {"loaded": False, "error": None}


def load(required: bool = True) -> bool:
    """Import `fineviti._C`, which registers torch.ops.fineviti.*; returns whether it loaded."""
    if _state["loaded"]:
        return True
    try:
        import torch  # noqa: F401  (libtorch must be loaded before the extension)

        importlib.import_module("fineviti._C")
    except ImportError as exc:
        _state["error"] = exc
        if required:
            raise ImportError(
                "fineviti's compiled extension fineviti._C is not available "
                f"({exc}); build it with `pip install --no-build-isolation -e .`"
            ) from exc
        return False
    _state["loaded"] = True
    return True


def loaded() -> bool:
    return bool(_state["loaded"])


def load_error() -> object:
    return _state["error"]

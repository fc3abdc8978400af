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
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Fake (meta) implementations of the C++ ops that have no Python module of their own to register them, so
    that torch.compile traces torch.ops.fineviti.* right after `import fineviti` (rope_2d's are in
    fineviti.ops.rope)."""
    import torch

    @torch.library.register_fake("fineviti::build_positions")
    def _(grid_hw, merge):
        # the checks of the real op that need no values; the token count is data-dependent: a dynamic size
        if grid_hw.dtype != torch.int32 or grid_hw.dim() != 2 or grid_hw.shape[1] != 2:
            raise TypeError(f"grid_hw must be an int32 (n, 2) tensor, got {grid_hw.dtype} {tuple(grid_hw.shape)}")
        total = torch.library.get_ctx().new_dynamic_size()
        return grid_hw.new_empty(grid_hw.shape[0] + 1), grid_hw.new_empty(total, 2)


def loaded() -> bool:
    return bool(_state["loaded"])


def load_error() -> object:
    return _state["error"]

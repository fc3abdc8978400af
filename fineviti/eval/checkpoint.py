"""Loading weights for evaluation from a checkpoint of either stage, with a clear error when they do not fit.

Reads a torch.distributed.checkpoint folder (the trainer's; only the tensors the module needs are loaded), a
.safetensors file (`fineviti export`'s) or a torch.save file (a state dict, or a dict holding one under "model"
/ "state_dict"). Nested dicts are flattened with "." as DCP does, and the wrappers' name pieces ("module.",
"_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.") are dropped. The module's keys are found in
the checkpoint under one prefix, detected (or given): "" or "model." for a stage-1 model saved whole, "visual." or
"model.visual." when the vision tower of a stage-2 aligner is loaded into `model.visual`. Every key and shape is
compared before anything is copied; the first mismatch is named.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

WRAPPER_PIECES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the module (another preset, another stage, or a config override)."""


def _clean(key: str) -> str:
    for piece in WRAPPER_PIECES:
        key = key.replace(piece, "")
    return key


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = tree
    return out


class _Source:
    """The tensor names and shapes of a checkpoint, and a way to read some of them."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.kind = ""
        self.tensors: dict[str, Any] = {}  # cleaned name -> tensor (files) or original name (DCP)
        self.shapes: dict[str, tuple[int, ...]] = {}
        if self.path.is_dir():
            self._dcp()
        elif self.path.suffix == ".safetensors":
            from safetensors.torch import load_file

            self.kind = "safetensors"
            self._files(load_file(str(self.path)))
        elif self.path.is_file():
            self.kind = "torch"
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if isinstance(state, dict):
                for key in ("model", "state_dict"):
                    if isinstance(state.get(key), dict) and not any(isinstance(v, torch.Tensor) for v in
                                                                    state.values()):
                        state = state[key]
                        break
            self._files(_flatten(state) if isinstance(state, dict) else {})
        else:
            raise FileNotFoundError(f"checkpoint not found: {self.path}")
        if not self.shapes:
            raise CheckpointMismatchError(f"checkpoint {self.path} holds no tensors")

    def _files(self, flat: dict[str, Any]) -> None:
        for key, value in flat.items():
            if isinstance(value, torch.Tensor):
                self.tensors[_clean(key)] = value
                self.shapes[_clean(key)] = tuple(value.shape)

    def _dcp(self) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        if not (self.path / ".metadata").is_file():
            raise FileNotFoundError(f"{self.path} is a folder but not a torch.distributed.checkpoint one "
                                    "(no .metadata)")
        self.kind = "dcp"
        metadata = FileSystemReader(str(self.path)).read_metadata()
        for key, value in metadata.state_dict_metadata.items():
            if isinstance(value, TensorStorageMetadata):
                self.tensors[_clean(key)] = key
                self.shapes[_clean(key)] = tuple(value.size)

    def read(self, names: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{cleaned name: template tensor} -> {cleaned name: loaded tensor (CPU)}."""
        if self.kind != "dcp":
            return {name: self.tensors[name] for name in names}
        import torch.distributed.checkpoint as dcp

        buffers = {self.tensors[name]: torch.empty(t.shape, dtype=t.dtype) for name, t in names.items()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(buffers, checkpoint_id=str(self.path), no_dist=True)
        return {name: buffers[self.tensors[name]] for name in names}


def _detect_prefix(expected: dict[str, torch.Tensor], found: dict[str, tuple]) -> str:
    """The prefix P under which the module's keys appear in the checkpoint: the most keys outside numbered blocks
    first (a vision and a text tower share their blocks' key names, "blocks.0.attn.qkv.weight", not their
    embeddings and heads), then the most keys, then the shortest prefix."""
    counts: dict[str, list[int]] = {}
    for key in expected:
        own = not any(part.isdigit() for part in key.split("."))
        for name in found:
            if name == key or name.endswith("." + key):
                prefix = name[: len(name) - len(key)]
                count = counts.setdefault(prefix, [0, 0])
                count[0] += own
                count[1] += 1
    if not counts:
        return ""
    return min(counts, key=lambda p: (-counts[p][0], -counts[p][1], len(p)))


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, tuple], prefix: str,
                     source: str = "the checkpoint") -> None:
    """Raise CheckpointMismatchError naming the first mismatch between a module's state dict and a checkpoint's
    tensor shapes (looked up under `prefix`): a missing tensor, a shape that differs, or an extra tensor."""
    problems = []
    for key, tensor in expected.items():
        name = prefix + key
        if name not in found:
            problems.append(f"{source} has no tensor {name!r}, which the model needs (shape {tuple(tensor.shape)})")
        elif tuple(found[name]) != tuple(tensor.shape):
            problems.append(f"{name!r} has shape {tuple(found[name])} in {source}, but the model's {key!r} has "
                            f"shape {tuple(tensor.shape)}")
    extra = [name for name in found if name.startswith(prefix) and name[len(prefix):] not in expected]
    problems += [f"{source} has {name!r}, which the model does not have" for name in extra]
    if problems:
        more = f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise CheckpointMismatchError(
            f"checkpoint does not match the model config: {problems[0]}{more}; was it saved from another preset, "
            f"another stage or with other overrides?"
        )


def load_checkpoint(module: torch.nn.Module, path: str | os.PathLike, *, prefix: str | None = None) -> dict:
    """Load the tensors of `module` (a whole model, or e.g. `model.visual`) from the checkpoint at `path`.

    prefix: where the module's keys live in the checkpoint (detected when None). Raises CheckpointMismatchError
    before copying anything if a key is missing, a shape differs or the checkpoint has extra keys under the
    prefix. Returns {"path", "format", "prefix", "tensors"}."""
    source = _Source(path)
    expected = {_clean(k): v for k, v in module.state_dict().items()}
    if prefix is None:
        prefix = _detect_prefix(expected, source.shapes)
    check_state_dict(expected, source.shapes, prefix, f"checkpoint {source.path}")
    loaded = source.read({prefix + k: v for k, v in expected.items()})
    state = {k: loaded[prefix + k] for k in expected}
    own = module.state_dict()
    with torch.no_grad():
        for target, clean in zip(own.values(), expected, strict=True):
            target.copy_(state[clean])
    return {"path": str(source.path), "format": source.kind, "prefix": prefix, "tensors": len(state)}

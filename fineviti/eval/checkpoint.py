"""Loading weights for evaluation from a checkpoint of either stage, with a clear error when they do not fit.

Reads a torch.distributed.checkpoint folder (the trainer's; only the tensors the module needs are loaded; a run
folder or its checkpoints/ folder means the newest complete checkpoint in it, as for `--resume`), a
.safetensors file (`fineviti export`'s) or a torch.save file (a state dict, or a dict holding one under "model"
/ "state_dict"). Nested dicts are flattened with "." as DCP does, and the wrappers' name pieces ("module.",
"_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.") are dropped. The module's keys are found in
the checkpoint under one prefix, detected (or given): "" or "model." for a stage-1 model saved whole, "visual." or
"model.visual." when the vision tower of a stage-2 aligner is loaded into `model.visual`. Every key and shape is
compared before anything is copied; the first mismatch is named.

Names and shapes do not catch every other config: heads, the text pool, RoPE's theta or the pixel statistics
change no tensor. A trainer's checkpoint (its config.json) and an exported file (its metadata) carry the config
they were trained with: `saved_model_config` reads it, and `config_differences` names what differs from the
model's (the runtime choices, backends and activation checkpointing, aside).
"""

from __future__ import annotations

import json
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


def checkpoint_path(path: str | os.PathLike) -> Path:
    """`path`, or for a training run's folder or its checkpoints/ folder the newest complete checkpoint in it (what
    `fineviti train --resume` and stage2.init_from take from such a folder)."""
    path = Path(path)
    if path.is_dir() and not (path / ".metadata").is_file():
        from fineviti.train.checkpoint import list_checkpoints

        for folder in (path, path / "checkpoints"):
            found = list_checkpoints(folder)
            if found:
                return found[-1][1]
    return path


class _Source:
    """The tensor names and shapes of a checkpoint, and a way to read some of them."""

    def __init__(self, path: str | os.PathLike):
        self.path = checkpoint_path(path)
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
                                    "(no .metadata), nor a run folder with a complete checkpoint in checkpoints/")
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


# ModelConfig fields that choose how the model runs, not what it computes: free to differ from the checkpoint's
RUNTIME_FIELDS = frozenset({"attn_backend", "rope_backend", "loss_backend", "norm_backend", "swiglu_backend",
                            "grad_checkpointing", "name"})


def saved_config(path: str | os.PathLike) -> dict | None:
    """The training config a checkpoint was saved with: a trainer's checkpoint folder's config.json, or the config
    in the metadata of a `fineviti export` .safetensors file; None when there is none (a torch file, a folder
    written by something else)."""
    path = checkpoint_path(path)
    if path.is_dir():
        file = path / "config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            config = json.loads((f.metadata() or {}).get("config") or "{}")
        return config or None
    return None


def exported_part(path: str | os.PathLike) -> str | None:
    """What a `fineviti export` file holds ("vision" or "full", from its metadata); None for anything else."""
    path = checkpoint_path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return meta.get("part") if meta.get("format") == "fineviti" else None


def saved_model_config(path: str | os.PathLike, part: str = "model") -> dict | None:
    """The saved config of the checkpoint's stage-1 model (part "model"), or what of it the vision tower needs
    (part "vision": {"vision", "embed_dim"} of stage 1's model or stage 2's aligner); None when the checkpoint has
    no config, or no such part (part "model" of a stage-2 checkpoint)."""
    config = saved_config(path)
    if not config:
        return None
    stage = config.get("training", {}).get("stage", 1)
    if part == "model":
        return config.get("model") if stage == 1 else None
    holder = (config.get("model") if stage == 1 else config.get("aligner")) or {}
    return {k: holder[k] for k in ("vision", "embed_dim") if k in holder} or None


def config_differences(saved: dict, have: dict, prefix: str = "", other: str = "model") -> list[str]:
    """"vision.heads: checkpoint 4, model 8" for each field of `saved` that `have` (a config as a dict, named
    `other` in the text) sets otherwise, RUNTIME_FIELDS aside; sub-configs are compared field by field."""
    out = []
    for key in sorted(set(saved) | set(have)):
        if key in RUNTIME_FIELDS or key not in saved or key not in have:
            continue  # a field one version has and the other not keeps its default: not a difference here
        a, b = saved[key], have[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.", other)
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{prefix}{key}: checkpoint {a!r}, {other} {b!r}")
    return out


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

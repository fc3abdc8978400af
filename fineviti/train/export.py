"""`fineviti export`: a checkpoint's vision tower (or whole model) as one safetensors file with its config.

The file holds the tensors by their parameter names (the vision tower's without the "visual." prefix) and, in the
safetensors metadata, the resolved training config ("config", JSON) and what was exported ("part"); the same config
is also written beside it as <file>.json, and the tokenizer of a stage-1 run's captions as <file>.tokenizer.json
(where the checkpoint has one, with <file>.tokenizer_config.json where that has one: `fineviti eval` reads them).
Loading: safetensors.torch.load_file, then VisionTower(VisionConfig(**config["model"]["vision"]),
...).load_state_dict (fineviti.eval reads it too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from fineviti._files import as_new_file

PARTS = ("vision", "full")


def export_model(model: nn.Module, out: str | os.PathLike, *, part: str = "vision", config: dict | None = None,
                 write: bool = True, tokenizer: dict[str, bytes] | None = None) -> Path:
    """Writes `model` (a FineViT or an Aligner; part "vision": its .visual) to `out` (.safetensors), and
    `tokenizer` (data.tokenizer.tokenizer_files' result) as tokenizer_file(out); without one, an earlier export's
    tokenizer there is removed (it would belong to other weights).

    A sharded model (FSDP2's DTensors) is gathered tensor by tensor, a collective: every rank calls this, and only
    the one with write=True (rank 0) keeps the tensors and writes the file."""
    from safetensors.torch import save_file

    if part not in PARTS:
        raise ValueError(f"part must be one of {list(PARTS)}, got {part!r}")
    module = model.visual if part == "vision" else model
    state = {}
    for name, tensor in module.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        if write:
            state[name] = tensor.detach().to("cpu").contiguous()
    out = Path(out)
    if not write:
        return out
    # tied weights (the built-in LM's head) are one tensor under two names: safetensors wants distinct storage
    seen: dict[int, str] = {}
    for name in list(state):
        ptr = state[name].untyped_storage().data_ptr()
        if ptr in seen:
            state[name] = state[name].clone()
        seen[ptr] = name
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"part": part, "format": "fineviti", "config": json.dumps(config or {})}
    save_file(state, str(out), metadata=meta)
    as_new_file(out)  # (safetensors writes 0600: an export is meant to be shared)
    out.with_suffix(out.suffix + ".json").write_text(json.dumps({"part": part, "config": config or {}}, indent=2))
    from fineviti.data.tokenizer import remove_tokenizer, write_tokenizer

    if tokenizer is not None:
        write_tokenizer(tokenizer, tokenizer_file(out))
    else:
        remove_tokenizer(tokenizer_file(out))
    return out


def tokenizer_file(out: str | os.PathLike) -> Path:
    """Where an export keeps its tokenizer: <file>.tokenizer.json beside <file>.safetensors."""
    out = Path(out)
    return out.with_suffix(out.suffix + ".tokenizer.json")


def check_export_path(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """`out` as export writes it: a .safetensors file name (fineviti eval picks its loader by the suffix), not a
    folder, and not an existing file unless `overwrite` (it, its .json and .tokenizer.json would be replaced)."""
    path = Path(out)
    if path.suffix != ".safetensors":
        raise ValueError(f"--out must be a file name ending in .safetensors, got {str(out)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"--out {str(out)!r} is a folder; expected a .safetensors file name in one")
    if path.exists() and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} exists; pass --overwrite to replace it (and its .json files)")
    return path


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, part: str = "vision",
                      overwrite: bool = False) -> Path:
    """Loads a trainer checkpoint (any world size, DDP or FSDP2) on this process and exports it to `out` (see
    check_export_path: an existing file only with overwrite=True)."""
    from fineviti.model import FineViT
    from fineviti.model.aligner import Aligner, HFCausalLM
    from fineviti.train.checkpoint import load_module_state, resolve_checkpoint, saved_config
    from fineviti.train.config import from_dict

    if part not in PARTS:
        raise ValueError(f"part must be one of {list(PARTS)}, got {part!r}")
    check_export_path(out, overwrite=overwrite)
    path = resolve_checkpoint(checkpoint)
    saved = saved_config(path)
    cfg = from_dict(saved)
    with torch.device("meta"):
        if cfg.training.stage == 1:
            model = FineViT(cfg.model)
        else:  # a Hugging Face LM's architecture from its config.json: its weights come from the checkpoint
            lm = None if cfg.aligner.lm == "builtin" else HFCausalLM(cfg.aligner.lm, weights=False)
            model = Aligner(cfg.aligner, lm=lm)
    model = model.to_empty(device="cpu")
    load_module_state(path, model, "")
    from fineviti.data.tokenizer import tokenizer_files

    kept = path / "tokenizer.json"
    tokenizer = tokenizer_files(kept) if kept.is_file() else None
    return export_model(model, out, part=part, config=saved, tokenizer=tokenizer)

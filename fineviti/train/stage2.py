"""Stage 2: region tasks built from a packed batch's boxes, the aligner built from a stage-1 checkpoint's vision
tower, and the FLOPs of a step.

Tasks (coordinates as text, each normalised to 0..1000 of the resized image's width or height):
  box2caption   "<image> describe the region [x0, y0, x1, y1]:" -> the region's caption
  caption2box   "<image> find the box of: <caption>" -> " [x0, y0, x1, y1]"
Each image of a step gets up to `regions_per_image` of its boxes (each at most once), each with one task; the
choice is a pure function of (seed, step, rank). The loss is on answer tokens only (fineviti.model.aligner).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from fineviti.data.batch import PackedBatch
from fineviti.model.aligner import Aligner, BuiltinLM, build_example, collate
from fineviti.model.config import AlignerConfig, VisionConfig

BOX_PROMPT = " describe the region {box}:"
FIND_PROMPT = " find the box of:"


def box_text(box: list[int]) -> str:
    return "[{}, {}, {}, {}]".format(*box)


def normalised_box(box: torch.Tensor, height: float, width: float) -> list[int]:
    """A box in the units of height and width (the batch's: patch-grid coordinates, with the grid's rows and
    columns) -> integers 0..1000 (x by the width, y by the height)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    scale = (width, height, width, height)
    return [int(round(min(max(v / s, 0.0), 1.0) * 1000)) for v, s in zip((x0, y0, x1, y1), scale, strict=True)]


class ByteIds:
    """A stand-in tokenizer for random data (no tokenizer.json): bytes mapped to ids 4..vocab-1; <bos> 1, <eos> 2."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [4 + b % (self.vocab_size - 4) for b in text.encode()]


class TextIds:
    """Prompt pieces through the run's CaptionTokenizer, without <bos>/<eos>."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.vocab_size = tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids


@dataclasses.dataclass
class RegionBatch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 outside answers
    attention_mask: torch.Tensor  # (B, T)
    sample_image: torch.Tensor  # (B,) the image of each sample
    n_samples: int
    answer_tokens: int
    text_tokens: int  # tokens of the samples other than image placeholders and padding (<bos>, prompt, answer, <eos>)


def region_tasks(batch: PackedBatch, ids, *, tasks: list[str], regions_per_image: int,
                 merge: int, placeholder_id: int, seed: int, step: int, rank: int) -> RegionBatch | None:
    """The stage-2 samples of one step (None when the batch has no boxes)."""
    if batch.boxes is None or batch.box_image is None or batch.boxes.shape[0] == 0:
        return None
    rng = np.random.default_rng([seed, step, rank, 2])
    box_image = batch.box_image.tolist()
    rcu = batch.region_cu_seqlens.tolist()
    region_tokens = batch.region_tokens.tolist()
    grid = batch.grid_hw.tolist()
    specials = {ids.bos_id, ids.eos_id, ids.pad_id}
    examples, sample_image, answers, text = [], [], 0, 0
    by_image: dict[int, list[int]] = {}
    for j, i in enumerate(box_image):
        by_image.setdefault(i, []).append(j)
    box_prompt_cache = {}
    find_ids = ids.encode(FIND_PROMPT)
    for image in sorted(by_image):
        rows, cols = grid[image]
        n_tokens = rows * cols // (merge * merge)
        boxes = by_image[image]
        chosen = rng.permutation(len(boxes))[:regions_per_image]
        for k in chosen.tolist():
            j = boxes[k]
            caption = [t for t in region_tokens[rcu[j]:rcu[j + 1]] if t not in specials]
            coords = box_text(normalised_box(batch.boxes[j], rows, cols))
            task = tasks[int(rng.integers(len(tasks)))]
            if task == "box2caption":
                if coords not in box_prompt_cache:
                    box_prompt_cache[coords] = ids.encode(BOX_PROMPT.format(box=coords))
                prompt, answer = box_prompt_cache[coords], caption
            else:
                prompt, answer = find_ids + caption, ids.encode(" " + coords)
            examples.append(build_example(prompt, answer, n_tokens, placeholder_id, bos_id=ids.bos_id,
                                          eos_id=ids.eos_id))
            sample_image.append(image)
            answers += len(answer) + 1
            text += len(examples[-1][0]) - n_tokens
    if not examples:
        return None
    input_ids, labels, mask = collate(examples, pad_id=ids.pad_id)
    return RegionBatch(input_ids, labels, mask, torch.tensor(sample_image, dtype=torch.long), len(examples),
                       answers, text)


def lm_tokenizer(lm: str, given: str | None) -> str:
    """The tokenizer.json stage 2 reads text with when aligner.lm is a Hugging Face model's directory: that model's
    own (the ids the LM was trained on; a data set's tokenizer gave it ids that mean other tokens). data.tokenizer
    (`given`) may name a copy of it, not another vocabulary."""
    from pathlib import Path

    from fineviti.data.tokenizer import CaptionTokenizer

    own = Path(lm) / "tokenizer.json"
    if not own.is_file():
        raise FileNotFoundError(f"aligner.lm={lm!r} has no tokenizer.json: stage 2 reads its prompts and captions with "
                                f"the LM's own tokenizer, as a fast tokenizer file (save one into the directory with "
                                f"transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
    theirs = CaptionTokenizer(own)
    if given and Path(given).resolve() != own.resolve():
        mine = CaptionTokenizer(given)
        if theirs.tokenizer.get_vocab(with_added_tokens=True) != mine.tokenizer.get_vocab(with_added_tokens=True):
            raise ValueError(f"data.tokenizer={given!r} is not the tokenizer of aligner.lm={lm!r} ({own}): the LM "
                             f"reads the ids of its own vocabulary; leave data.tokenizer unset (stage 2 then takes "
                             f"the LM's) or name a copy of {own}")
    # (the LM's file even for a copy: its special tokens' names are in the tokenizer_config.json beside it)
    if theirs.eos_id is None:
        raise ValueError(f"aligner.lm={lm!r}: its tokenizer has no end-of-text token (eos_token in "
                         f"tokenizer_config.json, or <eos>): stage 2's answers end with it")
    return str(own)


def build_aligner(cfg) -> tuple[Aligner, AlignerConfig]:
    """The stage-2 model; with stage2.init_from, the vision tower's config and weights come from that
    checkpoint (stage 1 or 2)."""
    from fineviti.train.checkpoint import load_module_state, resolve_checkpoint, saved_config
    from fineviti.train.config import from_dict

    aligner_cfg = cfg.aligner
    source = None
    if cfg.stage2.init_from:
        source = resolve_checkpoint(cfg.stage2.init_from)
        saved = saved_config(source)
        section = saved["model"] if saved["training"]["stage"] == 1 else saved["aligner"]
        vision = from_dict(section["vision"], VisionConfig)
        ignored = [f"aligner.vision.{f.name}: {getattr(aligner_cfg.vision, f.name)!r} -> {getattr(vision, f.name)!r}"
                   for f in dataclasses.fields(VisionConfig)
                   if getattr(aligner_cfg.vision, f.name) != getattr(vision, f.name)]
        if aligner_cfg.embed_dim != section["embed_dim"]:
            ignored.append(f"aligner.embed_dim: {aligner_cfg.embed_dim!r} -> {section['embed_dim']!r}")
        if ignored:  # (they used to be replaced without a word)
            warnings.warn(f"stage2.init_from {source}: the vision tower's config comes from the checkpoint, so this "
                          f"run's values are replaced: {'; '.join(ignored)}", stacklevel=2)
        aligner_cfg = dataclasses.replace(aligner_cfg, vision=vision, embed_dim=section["embed_dim"])
    model = Aligner(aligner_cfg)
    if source is not None:
        load_module_state(source, model.visual, "visual.")
    return model, aligner_cfg


def _parts(model: Aligner) -> dict[str, torch.nn.Module]:
    return {"vision": model.visual, "merger": model.merger, "projector": model.projector, "lm": model.lm}


def freeze_parts(model: Aligner, parts: list[str]) -> None:
    for part in parts:
        _parts(model)[part].requires_grad_(False)


def cast_frozen(model: Aligner, parts: list[str], dtype: torch.dtype) -> None:
    """The floating-point parameters of the frozen `parts` in `dtype` (autocast casts a frozen weight at every use:
    it keeps casts of trainable leaves only); their buffers stay as they are (RoPE frequency tables: fp32). Tied
    parameters (one Parameter in two places) stay one."""
    for part in parts:
        for p in _parts(model)[part].parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def part_scales(cfg) -> dict[str, float]:
    s = cfg.stage2
    return {"visual": s.vision_lr_scale, "merger": s.merger_lr_scale, "projector": s.projector_lr_scale,
            "lm": s.lm_lr_scale}


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _output_head(lm: torch.nn.Module) -> torch.Tensor | None:
    """The LM's output projection weight (V, H): BuiltinLM's tied embedding, or the output embedding of a Hugging
    Face model (HFCausalLM's, or the module's own); None where there is none (its head, if any, is then counted
    with its blocks)."""
    if isinstance(lm, BuiltinLM):
        return lm.output_head()[0]
    getter = getattr(getattr(lm, "model", lm), "get_output_embeddings", None)
    head = getter() if getter is not None else None
    return getattr(head, "weight", None)


def _lm_depth(lm: torch.nn.Module) -> int:
    """Decoder layers: BuiltinLM's blocks, or a Hugging Face config's num_hidden_layers (0 when neither is
    there: that LM's attention goes uncounted)."""
    if hasattr(lm, "blocks"):
        return len(lm.blocks)
    config = getattr(getattr(lm, "model", lm), "config", None)
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def _chain_matmuls(modules, tokens: int, seen: bool, skip: tuple) -> tuple[int, bool]:
    """FLOPs of the matmul weights of `modules`, each over `tokens` rows: 2 forward, + 2 for the weight's gradient
    when it trains, + 2 for its input's gradient when a parameter before it trains (`seen`: one before these
    modules). Weights in `skip` (a lookup embedding, the output head) cost nothing here, but a trained one still
    makes the gradients flow past it. "Before" is registration order, which is the execution order of the merger,
    the projector and BuiltinLM; Hugging Face decoder layers register their norms after their attention and MLP,
    which only matters for a freeze inside the LM (stage2.freeze freezes whole parts, and the LM's embedding, first
    in both orders, decides for all of it)."""
    flops = 0
    for module in modules:
        for p in module.parameters():
            if p.dim() == 2 and not any(p is q for q in skip):
                flops += (2 + 2 * p.requires_grad + 2 * seen) * p.numel() * tokens
            seen = seen or p.requires_grad
    return flops, seen


def stage2_flops(model: Aligner, seqlens: list[int], region: RegionBatch | None) -> int:
    """Model FLOPs of a training step (a multiply-add is 2 FLOPs; recomputation, e.g. the chunked LM loss's
    second pass over the logits, not counted), by what the backward computes:
    - the vision tower's patch tokens (fineviti.model.flops.vision_flops without the pooling head, which stage 2
      never runs): as training when the tower trains, else its forward only;
    - each matmul weight of the merger, the projector and the LM's blocks, per token it sees: 2 forward, + 2 for
      its weight's gradient when it trains, + 2 for its input's gradient when any parameter before it trains
      (a norm's weight or a bias included);
    - the output head (tied or not) on the answer positions when the loss takes the head's product by chunks
      (Aligner._head_loss_supported), else on every token: 2 forward, + 2 for the hidden states' gradient, + 2
      when it trains;
    - the LM's causal attention: 2 x T^2 x width per layer and sample forward, twice that backward;
    - the token embedding is a lookup: 0."""
    from fineviti.model.flops import vision_flops

    seen = _trains(model.visual)
    flops = vision_flops(model.visual.cfg, model.cfg.embed_dim, seqlens, training=seen, pool=False).model
    merged, more = _chain_matmuls((model.merger, model.projector), sum(seqlens) // 4, seen, ())
    flops += merged
    if region is not None:
        lm = model.lm
        head = _output_head(lm)
        tokens = int(region.attention_mask.sum())
        skip = (lm.get_input_embeddings().weight,) + ((head,) if head is not None else ())
        body, more = _chain_matmuls((lm,), tokens, more, skip)
        flops += body
        if head is not None:
            positions = region.answer_tokens if model._head_loss_supported() else tokens
            flops += (2 + 2 * more + 2 * head.requires_grad) * head.numel() * positions
        lengths = region.attention_mask.sum(1).tolist()
        flops += (2 + 4 * more) * _lm_depth(lm) * getattr(lm, "hidden_size", 0) * sum(n * n for n in lengths)
    return int(flops)

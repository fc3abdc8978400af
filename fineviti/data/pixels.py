"""Pixels: decode, resize to the planner's size, patchify, normalise; and the assembly of a PackedBatch.

Every pixel path (PIL here, DALI in fineviti.data.dali, torchvision's nvJPEG in fineviti.data.nvjpeg) implements
`decode_resize(images, targets) -> list[Decoded | BadSample]`: each image decoded to RGB and resized to its
planned (height, width) with a bicubic, antialiased filter, as a uint8 (height, width, 3) tensor on the path's
device. The rest is shared, so every path gives the same layout:

- patches: an image of h x w pixels is cut into (h / p) x (w / p) patches, each flattened channel, then row, then
  column of the patch (c * p * p + i * p + j, Qwen2-VL's processor order), in `build_positions`' token order (the
  tokens of each merge x merge group contiguous); patch t of an image holds the pixels of rows
  pos[t, 0] * p ... + p and columns pos[t, 1] * p ... + p;
- normalisation: (x / 255 - mean) / std per channel; SigLIP's 0.5 / 0.5 by default, CLIP's mean and std as an
  option; in float32 unless another dtype is asked for;
- boxes: scaled from the decoded image's pixels to the resized image's pixels (x by w' / w, y by h' / h).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections import Counter

import torch
from PIL import Image

from fineviti import _ext
from fineviti.data.batch import PackedBatch
from fineviti.data.dataset import BadSample, RawSample
from fineviti.data.positions import build_positions, build_positions_ref

NORMS = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


@dataclasses.dataclass
class Decoded:
    pixels: torch.Tensor  # uint8 (height, width, 3), resized to the target
    source_hw: tuple[int, int]  # the decoded image's size before resizing


class PilPath:
    """Decode and resize with PIL on the CPU (Image.BICUBIC, which antialiases when it shrinks)."""

    name = "pil"
    device = torch.device("cpu")

    def decode_resize(self, images: list[bytes], targets: list[tuple[int, int]]) -> list[Decoded | BadSample]:
        out = []
        for data, (height, width) in zip(images, targets, strict=True):
            try:
                with Image.open(io.BytesIO(data)) as image:
                    source = image.convert("RGB")
            except Exception as exc:  # noqa: BLE001 (PIL raises many types for bad data)
                out.append(BadSample("undecodable_image", f"{type(exc).__name__}: {exc}"))
                continue
            source_w, source_h = source.size
            if source.size != (width, height):
                source = source.resize((width, height), Image.BICUBIC)
            pixels = torch.frombuffer(bytearray(source.tobytes()), dtype=torch.uint8).view(height, width, 3)
            out.append(Decoded(pixels, (source_h, source_w)))
        return out


def patchify(pixels: torch.Tensor, patch: int, merge: int) -> torch.Tensor:
    """uint8 or float (h, w, 3) -> (h * w / p^2, 3 * p * p): patches in build_positions' order, each flattened
    channel, row, column."""
    h, w, c = pixels.shape
    gh, gw = h // patch, w // patch
    if gh * patch != h or gw * patch != w or gh % merge or gw % merge:
        raise ValueError(f"patchify: a {h}x{w} image is not a whole number of {merge}x{merge} groups of "
                         f"{patch}x{patch} patches")
    x = pixels.view(gh // merge, merge, patch, gw // merge, merge, patch, c)
    # (group row, group col, row in group, col in group, channel, row in patch, col in patch)
    return x.permute(0, 3, 1, 4, 6, 2, 5).reshape(gh * gw, c * patch * patch)


def normalise(patches: torch.Tensor, patch: int, norm: str | tuple = "siglip",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 patches (n, 3 * p * p) -> (x / 255 - mean) / std per channel, in `dtype` (computed in float32)."""
    mean, std = NORMS[norm] if isinstance(norm, str) else norm
    mean = torch.tensor(mean, dtype=torch.float32, device=patches.device).repeat_interleave(patch * patch)
    std = torch.tensor(std, dtype=torch.float32, device=patches.device).repeat_interleave(patch * patch)
    scale = 1.0 / (255.0 * std)
    return torch.addcmul(-mean / std, patches.float(), scale).to(dtype)


def _positions(grid_hw: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _ext.load(required=False):
        return build_positions(grid_hw, merge)
    return build_positions_ref(grid_hw, merge)


def _boxes(raw: RawSample, source_hw: tuple[int, int], target_hw: tuple[int, int], counters: Counter):
    """Boxes scaled to the resized image and their captions; boxes not inside the image are skipped, counted."""
    (src_h, src_w), (dst_h, dst_w) = source_hw, target_hw
    boxes, captions = [], []
    for region in raw.regions:
        try:
            x0, y0, x1, y1 = (float(v) for v in region["bbox"])
            caption = str(region["caption"])
        except (KeyError, TypeError, ValueError):
            counters["bad_box"] += 1
            continue
        finite = all(math.isfinite(v) for v in (x0, y0, x1, y1))
        if not (finite and 0 <= x0 < x1 <= src_w and 0 <= y0 < y1 <= src_h and caption.strip()):
            counters["bad_box"] += 1
            continue
        sx, sy = dst_w / src_w, dst_h / src_h
        boxes.append((x0 * sx, y0 * sy, x1 * sx, y1 * sy))
        captions.append(caption)
    return boxes, captions


def assemble(samples: list[RawSample], decoded: list[Decoded | BadSample], targets: list[tuple[int, int]], *,
             patch: int, merge: int, tokenizer, max_text_tokens: int = 256, norm: str | tuple = "siglip",
             dtype: torch.dtype = torch.float32, pad_to: int | None = None,
             counters: Counter | None = None) -> PackedBatch:
    """The PackedBatch of the samples whose image decoded (the others are counted and left out).

    pad_to: pad patches and pos with zeros up to this many tokens (static shapes); cu_seqlens and seqlens still
    end at the real tokens, and PackedBatch.padding_tokens says how many were added."""
    counters = counters if counters is not None else Counter()
    kept = []
    for raw, result, target in zip(samples, decoded, targets, strict=True):
        if isinstance(result, BadSample):
            counters[result.reason] += 1
            continue
        if result.source_hw != (raw.height, raw.width):
            counters["size_mismatch"] += 1  # the json lied: boxes follow the decoded size, the plan keeps its size
        kept.append((raw, result, target))
    device = kept[0][1].pixels.device if kept else torch.device("cpu")
    grid = torch.tensor([[h // patch, w // patch] for _, _, (h, w) in kept], dtype=torch.int32).view(-1, 2)
    cu_seqlens, pos = _positions(grid, merge)
    seqlens = [int(h * w) for h, w in grid.tolist()]
    pieces = [patchify(d.pixels, patch, merge) for _, d, _ in kept]
    flat = torch.cat(pieces) if pieces else torch.zeros(0, 3 * patch * patch, dtype=torch.uint8, device=device)
    padding = 0
    if pad_to is not None:
        padding = pad_to - flat.shape[0]
        if padding < 0:
            raise ValueError(f"assemble: pad_to = {pad_to} is below the batch's {flat.shape[0]} tokens")
        flat = torch.cat([flat, flat.new_zeros(padding, flat.shape[1])])
        pos = torch.cat([pos, pos.new_zeros(padding, 2)])
    patches = normalise(flat, patch, norm, dtype)
    if padding:
        patches[-padding:] = 0

    captions = [raw.caption for raw, _, _ in kept]
    ids, cut = tokenizer.encode_batch(captions, max_length=max_text_tokens) if captions else ([], 0)
    all_boxes, box_image, region_texts = [], [], []
    for image, (raw, d, target) in enumerate(kept):
        boxes, texts = _boxes(raw, d.source_hw, target, counters)
        all_boxes += boxes
        box_image += [image] * len(boxes)
        region_texts += texts
    region_ids, region_cut = (tokenizer.encode_batch(region_texts, max_length=max_text_tokens) if region_texts
                              else ([], 0))
    text_seqlens = [len(t) for t in ids]
    region_seqlens = [len(t) for t in region_ids]
    return PackedBatch(
        patches=patches,
        cu_seqlens=cu_seqlens,
        pos=pos,
        max_seqlen=max(seqlens, default=0),
        seqlens=seqlens,
        grid_hw=grid,
        tokens=torch.tensor([t for seq in ids for t in seq], dtype=torch.int64),
        text_cu_seqlens=_cumulative(text_seqlens),
        text_max_seqlen=max(text_seqlens, default=0),
        text_seqlens=text_seqlens,
        text_image=None,
        boxes=torch.tensor(all_boxes, dtype=torch.float32).view(-1, 4),
        box_image=torch.tensor(box_image, dtype=torch.int64),
        region_tokens=torch.tensor([t for seq in region_ids for t in seq], dtype=torch.int64),
        region_cu_seqlens=_cumulative(region_seqlens),
        keys=[raw.key for raw, _, _ in kept],
        padding_tokens=padding,
        truncated_tokens=cut + region_cut,
    )


def _cumulative(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return out

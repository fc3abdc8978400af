"""Pixels: decode, resize to the planner's size, patchify, normalise; and the assembly of a PackedBatch.

Every pixel path (PIL here, DALI in fineviti.data.dali, torchvision's nvJPEG in fineviti.data.nvjpeg) implements
`decode_resize(images, targets) -> list[Decoded | BadSample]`: each image decoded to RGB and resized to its
planned (height, width) with a bicubic, antialiased filter, as a planar uint8 (3, height, width) tensor on the
path's device (planar, so that cutting patches copies runs of p contiguous bytes). Paths decode the stored pixels
and never apply an EXIF orientation themselves. The rest is shared, so every path gives the same layout:

- orientation: `assemble` turns each image upright by its EXIF orientation (read_orientation, orient_pixels) and
  its boxes with it (orient_boxes), unless the loader's `exif_orientation` is off;
- patches: an image of h x w pixels is cut into (h / p) x (w / p) patches, each flattened channel, then row, then
  column of the patch (c * p * p + i * p + j, Qwen2-VL's processor order), in `build_positions`' token order (the
  tokens of each merge x merge group contiguous); patch t of an image holds the pixels of rows
  pos[t, 0] * p ... + p and columns pos[t, 1] * p ... + p;
- normalisation: (x / 255 - mean) / std per channel; SigLIP's 0.5 / 0.5 by default, CLIP's mean and std as an
  option; in float32 unless another dtype is asked for;
- boxes: in patch-grid coordinates, floats: x in patch columns, y in patch rows of the image's grid (the
  decoded image's pixels scaled by the grid's columns / w and rows / h; a box's pixels in the resized image are
  these times p).
"""

from __future__ import annotations

import dataclasses
import io
import math
import zlib
from collections import Counter
from typing import NamedTuple

import numpy as np
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
    pixels: torch.Tensor  # uint8 (3, height, width), resized to the target
    source_hw: tuple[int, int]  # the decoded image's size before resizing


def rgb8(image: Image.Image) -> Image.Image:
    """An RGB image of 8 bits a channel. 16-bit grayscale (PIL's I;16 modes, and mode I, as PIL opens 16-bit PNGs)
    keeps its high byte, as DALI's decoder and the nvJPEG path do: convert("RGB") would clip it at 255 (white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(values.astype(np.uint8), "L")
    return image.convert("RGB")


def open_rgb(data: bytes) -> Image.Image | BadSample:
    """The encoded image `data` as rgb8 decodes it (any format PIL reads), or a BadSample saying why not."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return rgb8(image)
    except Exception as exc:  # noqa: BLE001 (PIL raises many types for bad data)
        return BadSample("undecodable_image", f"{type(exc).__name__}: {exc}")


# EXIF orientation (tag 0x0112): how the stored pixels turn into the upright picture, as steps on a (..., h, w)
# image in order: "x" mirrors left-right, "y" top-bottom, "t" transposes (rows become columns). PIL's
# ImageOps.exif_transpose table: 2 FLIP_LEFT_RIGHT, 3 ROTATE_180, 4 FLIP_TOP_BOTTOM, 5 TRANSPOSE, 6 ROTATE_270
# (a quarter turn clockwise), 7 TRANSVERSE, 8 ROTATE_90.
ORIENTATION_STEPS = {1: "", 2: "x", 3: "xy", 4: "y", 5: "t", 6: "tx", 7: "txy", 8: "ty"}


BOX_FRAMES = ("auto", "stored", "upright")


class Orientation(NamedTuple):
    """How one image is turned upright.

    code: its EXIF orientation (1 when it has none, or orientation is off).
    declared_upright: the sample's declared size (a json's width and height, which the planner sized it by) is the
    upright picture's: the stored size transposed, for codes 5-8 on a non-square image. The pixels are then decoded
    at the planned size transposed, so that they have the planned size once turned.
    boxes_upright: its boxes are in the upright picture's pixels (kept as they are), not in the stored pixels' (turned
    with the image)."""

    code: int = 1
    declared_upright: bool = False
    boxes_upright: bool = False

    @property
    def steps(self) -> str:
        return ORIENTATION_STEPS[self.code]

    def decode_size(self, planned: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) to decode and resize the stored pixels to, for the planned size."""
        return (planned[1], planned[0]) if self.declared_upright else planned

    def box_steps(self) -> str:
        """The steps to apply to the boxes, given in their frame (see boxes_upright)."""
        return "" if self.boxes_upright else self.steps

    def box_frame_size(self, stored_hw: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) of the boxes' frame for an image whose stored pixels are stored_hw."""
        return stored_hw[::-1] if self.boxes_upright and "t" in self.steps else stored_hw

    def upright_size(self, stored_hw: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) of the upright picture of stored pixels of stored_hw."""
        return stored_hw[::-1] if "t" in self.steps else stored_hw

    def upright_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The stored pixels (..., h, w) turned upright (orient_pixels)."""
        return orient_pixels(pixels, self.steps)

    def upright_boxes(self, boxes: list, stored_hw: tuple[int, int]) -> list[tuple[float, float, float, float]]:
        """Boxes given in their frame (box_frame_size), in original pixels, as boxes of the upright picture."""
        return orient_boxes(boxes, *self.box_frame_size(stored_hw), self.box_steps())


def read_orientation(data: bytes, declared_hw: tuple[int, int] | None = None, box_frame: str = "auto") -> Orientation:
    """The EXIF orientation of encoded image `data` as PIL's ImageOps.exif_transpose reads it (EXIF or XMP), without
    decoding pixels: from its header, and for a PNG also from the eXIf and text chunks after its pixel data (which
    PIL reads once it has decoded the image; here the chunk headers are walked, the pixel data skipped). An
    unreadable header or a code outside 1-8 counts as 1.

    declared_hw: the sample's declared (height, width) (a json's), to tell whether it is the upright picture's.
    box_frame: the frame of the sample's boxes: "stored" (the pixels as stored, as a header gives their size, and as
    tools that show the raw bitmap annotate), "upright" (as tools that show the photo upright annotate), or "auto":
    the declared size's frame where it tells (a non-square image with codes 5-8 whose declared size is the upright
    one), else stored. Auto cannot tell for codes 2-4 (the size does not change) nor for square images: a data set
    annotated upright says "upright"."""
    _check_box_frame(box_frame)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return orientation_of(image, declared_hw, box_frame)
    except Exception:  # noqa: BLE001 (PIL raises many types for bad data; the decoders report those)
        return Orientation()


def _check_box_frame(box_frame: str) -> None:
    if box_frame not in BOX_FRAMES:
        raise ValueError(f"box_frame must be one of {list(BOX_FRAMES)}, got {box_frame!r}")


def orientation_of(image: Image.Image, declared_hw: tuple[int, int] | None = None,
                   box_frame: str = "auto") -> Orientation:
    """read_orientation of an opened PIL image (its header, and a PNG's chunks after its pixel data while its file is
    open; a malformed EXIF block raises)."""
    _check_box_frame(box_frame)
    code = _exif(image).get(0x0112, 1)
    if code not in ORIENTATION_STEPS:
        return Orientation()
    width, height = image.size
    declared_upright = (declared_hw is not None and "t" in ORIENTATION_STEPS[code] and height != width
                        and tuple(declared_hw) == (width, height))
    boxes_upright = declared_upright if box_frame == "auto" else box_frame == "upright"
    return Orientation(code, declared_upright, boxes_upright and code != 1)


def _exif(image: Image.Image) -> Image.Exif:
    """`image`'s EXIF block (with an XMP orientation) as exif_transpose finds it once the pixels are loaded."""
    fp = getattr(image, "fp", None)
    if image.format == "PNG" and fp is not None and not getattr(fp, "closed", False):
        without_pixels = _png_without_pixels(fp, getattr(image, "is_animated", False))
        if without_pixels is not None:
            with Image.open(io.BytesIO(without_pixels), formats=["PNG"]) as header:
                return Image.Image.getexif(header)
    return Image.Image.getexif(image)  # the base method: PNG's own decodes the whole image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_LATE_CHUNKS = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")  # after the pixels, what getexif reads (EXIF, XMP, raw)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _png_without_pixels(fp, animated: bool) -> bytes | None:
    """The PNG file `fp` cut to the chunks before its first IDAT, then the EXIF and text chunks that follow its pixel
    data (up to IEND, or an animation's next frame), then IEND: PIL opens it to the info that loading the pixels
    gives. None when no such chunk follows the pixels. Only chunk headers and those chunks are read (fp's position
    is kept); their CRCs are not checked, as PIL does not check them after the pixels."""
    start = fp.tell()
    try:
        fp.seek(0)
        if fp.read(8) != _PNG_SIGNATURE:
            return None
        pixels_at, late = None, []
        # PIL stops at a type that is not 4 of [A-Za-z0-9_] as a broken chunk
        while len(header := fp.read(8)) == 8 and header[4:].replace(b"_", b"a").isalnum():
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"IEND" or (pixels_at is not None and animated and kind == b"fcTL"):
                break
            if pixels_at is None and kind == b"IDAT":
                pixels_at = fp.tell() - 8
            if pixels_at is not None and kind in _PNG_LATE_CHUNKS:
                data = fp.read(length)
                if len(data) < length:
                    break
                late.append(_png_chunk(kind, data))
                fp.seek(4, io.SEEK_CUR)
            else:
                fp.seek(length + 4, io.SEEK_CUR)  # the pixel data (and other chunks) skipped, never read
        if not late:
            return None
        fp.seek(0)
        return fp.read(pixels_at) + b"".join(late) + _png_chunk(b"IEND", b"")
    finally:
        fp.seek(start)


def orient_pixels(pixels: torch.Tensor, steps: str) -> torch.Tensor:
    """A (..., h, w) image after `steps` (ORIENTATION_STEPS' letters): at most one copy (the flips, done before the
    transpose, which is a view), so the result need not be contiguous; the same tensor for no steps."""
    if "t" not in steps:
        dims = [d for d, step in ((-1, "x"), (-2, "y")) if step in steps]
        return pixels.flip(dims) if dims else pixels
    # a flip after the transpose is the other axis' flip before it
    dims = [d for d, step in ((-2, "x"), (-1, "y")) if step in steps]
    return (pixels.flip(dims) if dims else pixels).transpose(-2, -1)


def orient_boxes(boxes: list, height: float, width: float, steps: str) -> list[tuple[float, float, float, float]]:
    """Boxes (x0, y0, x1, y1) in an image of height x width after `steps`: they cover the same content in the
    turned image as `orient_pixels` turns it (any units, the image's size in the same units)."""
    out = []
    for x0, y0, x1, y1 in boxes:
        h, w = height, width
        for step in steps:
            if step == "x":
                x0, x1 = w - x1, w - x0
            elif step == "y":
                y0, y1 = h - y1, h - y0
            else:
                x0, y0, x1, y1, h, w = y0, x0, y1, x1, w, h
        out.append((x0, y0, x1, y1))
    return out


class PilPath:
    """Decode and resize with PIL on the CPU (Image.BICUBIC, which antialiases when it shrinks)."""

    name = "pil"
    device = torch.device("cpu")

    def decode_resize(self, images: list[bytes], targets: list[tuple[int, int]]) -> list[Decoded | BadSample]:
        out = []
        for data, (height, width) in zip(images, targets, strict=True):
            source = open_rgb(data)
            if isinstance(source, BadSample):
                out.append(source)
                continue
            source_w, source_h = source.size
            if source.size != (width, height):
                source = source.resize((width, height), Image.BICUBIC)
            planes = np.stack([np.asarray(band) for band in source.split()])  # numpy: 4x faster than torch.stack
            out.append(Decoded(torch.from_numpy(planes), (source_h, source_w)))
        return out


def _patch_view(pixels: torch.Tensor, patch: int, merge: int) -> torch.Tensor:
    c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    if c != 3 or gh * patch != h or gw * patch != w or gh % merge or gw % merge:
        raise ValueError(f"patchify: a {c}x{h}x{w} image is not 3 planes of a whole number of {merge}x{merge} "
                         f"groups of {patch}x{patch} patches")
    x = pixels.view(c, gh // merge, merge, patch, gw // merge, merge, patch)
    # (group row, group col, row in group, col in group, channel, row in patch, col in patch)
    return x.permute(1, 4, 2, 5, 0, 3, 6)


def patchify(pixels: torch.Tensor, patch: int, merge: int) -> torch.Tensor:
    """(3, h, w) -> (h * w / p^2, 3 * p * p): patches in build_positions' order, each flattened channel, row,
    column (same dtype and device)."""
    _, h, w = pixels.shape
    return _patch_view(pixels, patch, merge).reshape(h * w // patch**2, 3 * patch * patch)


def _norm_vectors(patch: int, norm: str | tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, shift (3 * p * p,) float32 with x_normalised = x_uint8 * scale + shift."""
    mean, std = NORMS[norm] if isinstance(norm, str) else norm
    mean = torch.tensor(mean, dtype=torch.float32, device=device).repeat_interleave(patch * patch)
    std = torch.tensor(std, dtype=torch.float32, device=device).repeat_interleave(patch * patch)
    return 1.0 / (255.0 * std), -mean / std


def normalise(patches: torch.Tensor, patch: int, norm: str | tuple = "siglip",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 patches (n, 3 * p * p) -> (x / 255 - mean) / std per channel, in `dtype` (computed in float32)."""
    scale, shift = _norm_vectors(patch, norm, patches.device)
    return torch.addcmul(shift, patches.float(), scale).to(dtype)


def _positions(grid_hw: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _ext.load(required=False):
        return build_positions(grid_hw, merge)
    return build_positions_ref(grid_hw, merge)


def _boxes(raw: RawSample, source_hw: tuple[int, int], counters: Counter):
    """The sample's boxes (in pixels of an image of source_hw, their frame) and their captions; boxes not inside the
    image are skipped, counted."""
    src_h, src_w = source_hw
    boxes, captions = [], []
    for region in raw.regions:
        try:
            bbox, caption = region["bbox"], region["caption"]
            if isinstance(bbox, (str, bytes)) or not isinstance(caption, str):  # "1234" is no box, null no caption
                raise TypeError(f"bbox {bbox!r}, caption {caption!r}")
            x0, y0, x1, y1 = (float(v) for v in bbox)
        except (KeyError, TypeError, ValueError):
            counters["bad_box"] += 1
            continue
        finite = all(math.isfinite(v) for v in (x0, y0, x1, y1))
        if not (finite and 0 <= x0 < x1 <= src_w and 0 <= y0 < y1 <= src_h and caption.strip()):
            counters["bad_box"] += 1
            continue
        boxes.append((x0, y0, x1, y1))
        captions.append(caption)
    return boxes, captions


def assemble(samples: list[RawSample], decoded: list[Decoded | BadSample], *, patch: int, merge: int, tokenizer,
             max_text_tokens: int = 256, norm: str | tuple = "siglip", dtype: torch.dtype = torch.float32,
             pad_to: int | None = None, counters: Counter | None = None,
             orientations: list[Orientation] | None = None) -> PackedBatch:
    """The PackedBatch of the samples whose image decoded (the others are counted and left out).

    decoded: each sample's stored pixels as a pixel path decoded and resized them (to its Orientation's
    decode_size of the planned size). orientations: how each image turns upright (default: none does); the pixels
    and the boxes are turned here, so every pixel path gives the same batch.
    pad_to: pad patches and pos with zeros up to this many tokens (static shapes); cu_seqlens and seqlens still
    end at the real tokens, and PackedBatch.padding_tokens says how many were added."""
    counters = counters if counters is not None else Counter()
    orientations = orientations if orientations is not None else [Orientation()] * len(samples)
    kept = []
    for raw, result, turn in zip(samples, decoded, orientations, strict=True):
        if isinstance(result, BadSample):
            counters[result.reason] += 1
            continue
        source_hw = result.source_hw[::-1] if turn.declared_upright else result.source_hw  # in the declared frame
        if source_hw != (raw.height, raw.width):
            counters["size_mismatch"] += 1  # the json lied: boxes follow the decoded size, the plan keeps its size
        kept.append((raw, result, turn))
    device = kept[0][1].pixels.device if kept else torch.device("cpu")
    upright = [turn.upright_pixels(d.pixels) for _, d, turn in kept]
    grid = torch.tensor([[p.shape[1] // patch, p.shape[2] // patch] for p in upright], dtype=torch.int32).view(-1, 2)
    cu_seqlens, pos = _positions(grid, merge)
    seqlens = [int(h * w) for h, w in grid.tolist()]
    total = sum(seqlens)
    padding = 0
    if pad_to is not None:
        padding = pad_to - total
        if padding < 0:
            raise ValueError(f"assemble: pad_to = {pad_to} is below the batch's {total} tokens")
        pos = torch.cat([pos, pos.new_zeros(padding, 2)])
    # one float32 buffer: each image's patches are cut straight into it (the uint8 -> float conversion rides on
    # the copy), then normalised in place
    patches = torch.empty(total + padding, 3 * patch * patch, dtype=torch.float32, device=device)
    for pixels, start, length in zip(upright, cu_seqlens.tolist()[:-1], seqlens, strict=True):
        source = _patch_view(pixels, patch, merge)
        target = patches[start:start + length].view(source.shape)
        if device.type == "cpu":  # numpy's strided uint8 -> float copy is ~1.5x torch's on the CPU
            np.copyto(target.numpy(), source.numpy())
        else:
            target.copy_(source)
    scale, shift = _norm_vectors(patch, norm, device)
    real = patches[:total]
    real.mul_(scale).add_(shift)
    patches[total:] = 0
    if dtype != torch.float32:
        patches = patches.to(dtype)

    captions = [raw.caption for raw, _, _ in kept]
    ids, cut = tokenizer.encode_batch(captions, max_length=max_text_tokens) if captions else ([], 0)
    all_boxes, box_image, region_texts = [], [], []
    for image, ((raw, d, turn), (rows, cols)) in enumerate(zip(kept, grid.tolist(), strict=True)):
        boxes, texts = _boxes(raw, turn.box_frame_size(d.source_hw), counters)
        src_h, src_w = turn.upright_size(d.source_hw)  # the boxes, upright, scaled to the grid
        all_boxes += [(x0 * cols / src_w, y0 * rows / src_h, x1 * cols / src_w, y1 * rows / src_h)
                      for x0, y0, x1, y1 in turn.upright_boxes(boxes, d.source_hw)]
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

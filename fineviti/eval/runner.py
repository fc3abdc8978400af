"""The evaluation runner: records -> packed native-resolution batches -> embeddings -> metrics -> report.

    evaluator = Evaluator(model, tokenizer, EvalConfig(token_budget=16384))
    report = evaluator.run({"retrieval": RetrievalTask(records), "zero_shot": ZeroShotTask(records, names)})
    write_report(report, out_dir)          # report.json and report.md (rank 0 only under torchrun)

Images go through the data path's own pieces (fineviti.data: the size rule, a pixel path's decode and bicubic
resize, patchify in build_positions' merge order, normalisation with the vision tower's mean/std), packed
first-fit in record order into batches of at most `token_budget` patch tokens, so an image is seen exactly as
in training. Captions are tokenized with the run's tokenizer, cut to the text tower's context (first tokens
kept, as training does) and packed the same way. All under torch.no_grad, the model in eval mode (restored
after).

Distributed (torchrun, any backend): rank r embeds items r, r + world, ...; embeddings are gathered with
all_gather_object, so every rank computes the same metrics. Every rank makes the same number of model calls per
phase (short ranks run a one-image / one-token call and drop it), so FSDP-sharded towers never wait on each
other.

Model contract: `model.encode_image(patches, cu_seqlens, pos, max_seqlen, seqlens=None, return_tokens=False)`,
`model.encode_text(tokens, cu_seqlens, max_seqlen, seqlens=None)`, `model.visual.patch_size` and
`model.visual.merge` (fineviti.model.FineViT has them).
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image

from fineviti import _ext
from fineviti._errors import work
from fineviti._json import finite_or_null
from fineviti.data import pixels as pixels_mod
from fineviti.data.dataset import BadSample
from fineviti.data.pixels import Orientation, normalise, patchify
from fineviti.data.positions import build_positions, build_positions_ref
from fineviti.data.sizes import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, DEFAULT_TOKEN_BUDGET, SizeRule
from fineviti.eval import metrics, regions, zeroshot
from fineviti.eval.loaders import EvalSet
from fineviti.eval.zeroshot import DEFAULT_TEMPLATES, Template

# ---- tasks -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RetrievalTask:
    """Image-text retrieval (one or several captions per image; long captions too): records (image, captions)."""

    records: Sequence
    info: dict = dataclasses.field(default_factory=dict)  # the loaded set's info (EvalSet.info): into the report


@dataclasses.dataclass
class ZeroShotTask:
    """Zero-shot classification: records (image, label), class names in label order, prompt templates."""

    records: Sequence
    classnames: Sequence[str]
    templates: Sequence[Template] = DEFAULT_TEMPLATES
    info: dict = dataclasses.field(default_factory=dict)  # the loaded set's info (EvalSet.info): into the report


@dataclasses.dataclass
class HardNegativeTask:
    """Each image's true caption against its hard negatives: records (image, caption, negatives)."""

    records: Sequence
    info: dict = dataclasses.field(default_factory=dict)  # the loaded set's info (EvalSet.info): into the report


@dataclasses.dataclass
class RegionTask:
    """Box classification: records (image, boxes in original pixels, labels); boxes pooled from the patch tokens
    (`method` "mean" or "roi_align", see fineviti.eval.regions), projected by `project` (default:
    `default_box_projection(model)`), compared with the class prompts' embeddings."""

    records: Sequence
    classnames: Sequence[str]
    templates: Sequence[Template] = DEFAULT_TEMPLATES
    method: str = "mean"
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    info: dict = dataclasses.field(default_factory=dict)  # the loaded set's info (EvalSet.info): into the report


Task = RetrievalTask | ZeroShotTask | HardNegativeTask | RegionTask


def task_for(evalset: EvalSet, templates: Sequence[Template] | None = None) -> Task:
    """The task that evaluates a loaded benchmark (fineviti.eval.loaders); its info goes into the task's report."""
    info = dict(evalset.info)
    if evalset.kind == "retrieval":
        return RetrievalTask(evalset.records, info)
    if evalset.kind == "hard_negatives":
        return HardNegativeTask(evalset.records, info)
    if evalset.kind == "zero_shot":
        return ZeroShotTask(evalset.records, evalset.classnames, templates or DEFAULT_TEMPLATES, info)
    if evalset.kind == "regions":
        return RegionTask(evalset.records, evalset.classnames, templates or DEFAULT_TEMPLATES, info=info)
    raise ValueError(f"unknown evaluation kind {evalset.kind!r} of set {evalset.name!r}")


# The synthetic scenes' region classes are "colour shape"; their sizes are averaged over as prompt templates.
SYNTHETIC_REGION_TEMPLATES: tuple[str, ...] = ("a small {}", "a medium {}", "a large {}")


def synthetic_tasks(heldout: str | os.PathLike, *, region_method: str = "mean", project=None) -> dict[str, Task]:
    """The three tasks of fineviti's synthetic held-out shards (fineviti.data.synth): "retrieval" (long captions),
    "hard_negatives" (one attribute or position changed) and "regions" (each object's box against every
    "colour shape"). Each task's info holds what the shard reader skipped (see `loaders.shard_captions`)."""
    from fineviti.eval import loaders

    # One scan for the three sets: the same skip counts in each (a second scan of a truncated shard would find the
    # index the first one rewrote and count nothing).
    shards = loaders.open_shards(heldout)
    boxes = loaders.shard_regions(shards, classnames=loaders.synthetic_region_classes())
    captions, negatives = loaders.shard_captions(shards), loaders.shard_hard_negatives(shards)
    return {
        "retrieval": RetrievalTask(captions.records, captions.info),
        "hard_negatives": HardNegativeTask(negatives.records, negatives.info),
        "regions": RegionTask(boxes.records, boxes.classnames, SYNTHETIC_REGION_TEMPLATES, region_method, project,
                              boxes.info),
    }


def default_box_projection(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """For fineviti.model.FineViT: the image pooling with its attention spread evenly over the box's tokens, i.e.
    the pool's value projection and output Linear applied to the pooled tokens (both linear, so pooling then
    projecting equals projecting then pooling)."""
    pool = getattr(getattr(model, "visual", None), "pool", None)
    kv, out = getattr(pool, "kv", None), getattr(pool, "out", None)
    if not (isinstance(kv, torch.nn.Linear) and isinstance(out, torch.nn.Linear)):
        raise ValueError(
            "RegionTask.project is not set and the model has no visual.pool.kv / visual.pool.out to build one from; "
            "pass project=callable(pooled tokens (n_boxes, width)) -> (n_boxes, embed_dim)"
        )
    width = kv.in_features

    def project(pooled: torch.Tensor) -> torch.Tensor:
        value = torch.nn.functional.linear(pooled, kv.weight[width:], kv.bias[width:] if kv.bias is not None else None)
        return out(value)

    return project


# ---- configuration and the pieces of a batch -----------------------------------------------------------------


@dataclasses.dataclass
class EvalConfig:
    token_budget: int = DEFAULT_TOKEN_BUDGET  # patch tokens per image batch (images larger than it are shrunk)
    text_token_budget: int = 65536  # caption tokens per text batch
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS  # lowered to token_budget * patch^2 when that is smaller
    max_aspect: float = 8.0
    context_length: int | None = None  # caption tokens kept; default: the text tower's context_length
    pixel_path: str = "pil"  # fineviti.data.loader.make_pixel_path: pil | dali | nvjpeg | auto
    exif_orientation: bool = True  # turn images upright by their EXIF orientation, boxes with them, as training
    box_frame: str = "auto"  # boxes of a tagged image: auto | stored | upright (fineviti.data.pixels.read_orientation)
    norm: str | tuple | None = None  # default: the vision tower's image_mean / image_std, else SigLIP's 0.5 / 0.5
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 on a GPU

    def __post_init__(self):
        for name in ("token_budget", "text_token_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.context_length is not None and self.context_length < 1:
            raise ValueError(f"EvalConfig.context_length must be >= 1, got {self.context_length}")
        if self.box_frame not in pixels_mod.BOX_FRAMES:
            raise ValueError(f"EvalConfig.box_frame must be one of {list(pixels_mod.BOX_FRAMES)}, got "
                             f"{self.box_frame!r}")


def image_bytes(image: Any) -> bytes:
    """The encoded bytes of a record's image: a path, bytes, a PIL image (encoded as PNG) or an object with read()."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if isinstance(image, Image.Image):  # its orientation tag kept: it turns the image as it turns a file
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "PNG", exif=_orientation_only(image))
        return buffer.getvalue()
    if callable(getattr(image, "read", None)):
        return image.read()
    raise TypeError(f"a record's image must be a path, bytes, a PIL image or have read(); got {type(image).__name__}")


def _orientation_only(image: Image.Image) -> Image.Exif:
    """An EXIF block holding only `image`'s orientation tag (none when it has none, or its EXIF does not parse: read
    as untagged, as the loader reads a malformed block); the rest of a camera's EXIF could fail to write."""
    exif = Image.Exif()
    try:  # the reader of every other path: for a PNG, with the chunks after its pixels, as exif_transpose reads it
        code = pixels_mod.orientation_of(image).code
    except Exception:  # noqa: BLE001 (PIL raises many types for a malformed EXIF block)
        code = 1
    if code != 1:
        exif[0x0112] = code
    return exif


def _read_once(record):
    """`record` with its image read into bytes when it is a stream (has read()): the box check and the encoding each
    take the image, and a stream may not be read twice."""
    image = record[0]
    stream = callable(getattr(image, "read", None)) and not isinstance(image, (str, os.PathLike, Image.Image))
    if not stream:
        return record
    data = image_bytes(image)
    return record._replace(**{record._fields[0]: data}) if hasattr(record, "_replace") else (data, *record[1:])


def _positions(grid: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    return build_positions(grid, merge) if _ext.load(required=False) else build_positions_ref(grid, merge)


class TextEncoder:
    """Captions -> token ids cut to `context_length` (first tokens kept), and how many tokens were cut.

    tokenizer: a fineviti.data.tokenizer.CaptionTokenizer or the path of a tokenizer.json (its truncation keeps the
    final <eos>), a `tokenizers.Tokenizer` (same rule with its "<eos>" when it has one), or a callable
    text -> list of ids."""

    def __init__(self, tokenizer: Any, context_length: int | None):
        if isinstance(tokenizer, (str, os.PathLike)):
            from fineviti.data.tokenizer import CaptionTokenizer

            tokenizer = CaptionTokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos_id = None
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover (a dependency of the package)
            Tokenizer = ()  # noqa: N806
        self.raw = isinstance(tokenizer, Tokenizer)
        if self.raw:
            self.eos_id = tokenizer.token_to_id("<eos>")
        elif not (hasattr(tokenizer, "encode_batch") or callable(tokenizer)):
            raise TypeError(f"tokenizer must be a CaptionTokenizer, a tokenizers.Tokenizer, a tokenizer.json path "
                            f"or a callable text -> ids; got {type(tokenizer).__name__}")

    def __call__(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        texts = list(texts)
        if not texts:
            return [], 0
        if not self.raw and hasattr(self.tokenizer, "encode_batch"):
            ids, cut = self.tokenizer.encode_batch(texts, max_length=self.context_length)
        else:
            if self.raw:
                full = [e.ids for e in self.tokenizer.encode_batch(texts)]
            else:
                full = [list(self.tokenizer(t)) for t in texts]
            ids, cut = [], 0
            limit = self.context_length
            for seq in full:
                if limit is not None and len(seq) > limit:
                    cut += len(seq) - limit
                    keep_eos = self.eos_id is not None and seq[-1] == self.eos_id and limit >= 2
                    seq = seq[: limit - 1] + [seq[-1]] if keep_eos else seq[:limit]
                ids.append([int(t) for t in seq])
        for i, seq in enumerate(ids):
            if not seq:
                raise ValueError(f"caption {texts[i]!r} has no tokens; expected at least one")
        return ids, cut


def _context_length(model) -> int | None:
    text = getattr(model, "text", None)
    for owner in (text, getattr(text, "cfg", None), model):
        value = getattr(owner, "context_length", None)
        if isinstance(value, int):
            return value
    return None


# ---- the evaluator ---------------------------------------------------------------------------------------------


class Evaluator:
    """Embeds records with a model and computes the metrics of tasks (see the module docstring)."""

    def __init__(self, model, tokenizer, cfg: EvalConfig | None = None, *, device: torch.device | str | None = None,
                 group=None):
        while not hasattr(model, "encode_image") and hasattr(model, "module"):
            model = model.module  # a DDP wrapper: its forward is the training step, the towers are inside
        self.model = model
        self.cfg = cfg = cfg or EvalConfig()
        visual = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "patch_size"):
            raise ValueError("model must have .visual with .patch_size (and .merge): see the model contract")
        self.patch = int(visual.patch_size)
        self.merge = int(getattr(visual, "merge", 1))
        params = [p for p in model.parameters()]
        self.device = torch.device(device) if device is not None else (params[0].device if params else
                                                                       torch.device("cpu"))
        floats = [p.dtype for p in params if p.is_floating_point()]
        self.dtype = floats[0] if floats else torch.float32
        self.rule = SizeRule.for_budget(cfg.token_budget, patch=self.patch, merge=self.merge,
                                        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                        max_aspect=cfg.max_aspect)
        if cfg.norm is not None:
            self.norm = cfg.norm
        elif hasattr(visual, "image_mean") and hasattr(visual, "image_std"):
            self.norm = (tuple(visual.image_mean), tuple(visual.image_std))
        else:
            self.norm = "siglip"
        from fineviti.data.loader import make_pixel_path

        self.pixels = make_pixel_path(cfg.pixel_path, str(self.device) if self.device.type == "cuda" else None)
        context = cfg.context_length or _context_length(model)
        self.text = TextEncoder(tokenizer, context)
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world = dist.get_world_size(group) if self.distributed else 1
        self._last_text_stats: dict = {}

    # -- distributed helpers --

    def _comm_device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _equalize(self, calls: int, dummy: Callable[[], None]) -> None:
        if self.world == 1:
            return
        most = torch.tensor([calls], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.group)
        for _ in range(int(most) - calls):
            dummy()

    def _gather(self, local: Any) -> list:
        if self.world == 1:
            return [local]
        parts: list = [None] * self.world
        dist.all_gather_object(parts, local, group=self.group)
        return parts

    def _on_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The similarity chunks run where the model runs: a GPU does n = 100k in seconds, a CPU in minutes.
        return tuple(t.to(self.device) for t in tensors)

    def _autocast(self):
        if self.cfg.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.cfg.autocast_dtype)

    # -- images --

    def _image_call(self, decoded: list, targets: list[tuple[int, int]], boxes: list | None, project, method,
                    turns: list[Orientation]):
        """decoded: the stored pixels at their targets; each is turned upright here (turns), its boxes with it."""
        upright = [turn.upright_pixels(d.pixels) for d, turn in zip(decoded, turns, strict=True)]
        grid = torch.tensor([[p.shape[1] // self.patch, p.shape[2] // self.patch] for p in upright],
                            dtype=torch.int32)
        flat = torch.cat([patchify(p, self.patch, self.merge) for p in upright])
        patches = normalise(flat, self.patch, self.norm)
        sources = [turn.upright_size(d.source_hw) for d, turn in zip(decoded, turns, strict=True)]
        targets = [turn.upright_size(t) for t, turn in zip(targets, turns, strict=True)]
        if boxes is not None:  # into the upright frame, in original pixels
            boxes = [turn.upright_boxes(b, d.source_hw) for b, d, turn in zip(boxes, decoded, turns, strict=True)]
        return self._forward(patches, grid, sources, targets, boxes, project, method)

    def _forward(self, patches, grid, sources, targets, boxes, project, method):
        cu_seqlens, pos = _positions(grid, self.merge)
        seqlens = [int(r * c) for r, c in grid.tolist()]
        patches = patches.to(self.device, self.dtype)
        cu_dev, pos_dev = cu_seqlens.to(self.device), pos.to(self.device)
        with self._autocast():
            out = self.model.encode_image(patches, cu_dev, pos_dev, max(seqlens), seqlens,
                                          return_tokens=boxes is not None)
        if boxes is None:
            return out.float().cpu(), None
        emb, tokens = out
        all_boxes, box_image = [], []
        for k, ((src_h, src_w), (h, w), image_boxes) in enumerate(zip(sources, targets, boxes, strict=True)):
            for x0, y0, x1, y1 in image_boxes:
                all_boxes.append((x0 * w / src_w, y0 * h / src_h, x1 * w / src_w, y1 * h / src_h))
                box_image.append(k)
        box_tensor = torch.tensor(all_boxes, dtype=torch.float32).view(-1, 4)  # (0, 4) when no image has a box
        box_index = torch.tensor(box_image, dtype=torch.int64)
        pooled = regions.pool_boxes(tokens, cu_dev, grid, pos_dev, box_tensor, box_index, self.patch, self.merge,
                                    method=method)
        with self._autocast():
            box_emb = project(pooled).float().cpu()
        return emb.float().cpu(), list(torch.split(box_emb, [len(b) for b in boxes]))

    def _dummy_image_call(self) -> None:
        # One image of one merge group, only to keep the ranks' model calls in step.
        patches = torch.zeros(self.merge * self.merge, 3 * self.patch * self.patch)
        side = self.merge * self.patch
        self._forward(patches, torch.tensor([[self.merge, self.merge]], dtype=torch.int32), [(side, side)],
                      [(side, side)], None, None, "mean")

    def _header(self, source: Any, what: str, declared=None) -> tuple[int, int, Orientation]:
        """(width, height) of an image as stored and how it turns upright, from its header (no pixels read).
        source: a path, encoded bytes or a PIL image."""
        try:
            if isinstance(source, Image.Image):
                return *source.size, self._orientation(source, declared)
            with Image.open(source if isinstance(source, (str, os.PathLike)) else io.BytesIO(source)) as header:
                return *header.size, self._orientation(header, declared)
        except Exception as exc:  # noqa: BLE001 (PIL raises many types for bad data)
            raise ValueError(f"{what} is not a readable image: {exc}") from exc

    def _orientation(self, image: Image.Image, declared) -> Orientation:
        if not self.cfg.exif_orientation:
            return Orientation()
        try:
            return pixels_mod.orientation_of(image, declared, self.cfg.box_frame)
        except Exception:  # noqa: BLE001 (a malformed EXIF block: read as untagged, as the loader reads it)
            return Orientation()

    def _box_frame(self, record, what: str) -> tuple[int, int]:
        """(width, height) of the frame a region record's boxes are in (the stored image, or the upright one)."""
        image = record[0]
        width, height, turn = self._header(image if isinstance(image, (str, os.PathLike, Image.Image))
                                           else image_bytes(image), f"{what} ({_describe(image)})", _declared(record))
        height, width = turn.box_frame_size((height, width))
        return width, height

    def encode_images(self, images: Sequence, boxes: Sequence | None = None, project=None, method: str = "mean",
                      sizes: Sequence | None = None) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Embeddings (n, embed_dim) fp32 on the CPU of every image (all ranks get all of them), and with `boxes`
        (per image a list of x0, y0, x1, y1 in its original pixels, as stored: with `exif_orientation` they turn upright
        with the image; see EvalConfig.box_frame) the box embeddings, one tensor per image. sizes: per image the
        (height, width) its set declares, or None (read_orientation's declared_hw)."""
        n = len(images)
        local: dict[int, tuple] = {}
        calls = 0
        pack: list[tuple[int, bytes, tuple[int, int], Orientation]] = []
        pack_tokens = 0

        def flush():
            nonlocal calls
            decoded = self.pixels.decode_resize([data for _, data, _, _ in pack], [t for _, _, t, _ in pack])
            for (i, _, _, _), d in zip(pack, decoded, strict=True):
                if isinstance(d, BadSample):
                    raise ValueError(f"image {i} ({_describe(images[i])}) does not decode: {d}")
            pack_boxes = [boxes[i] for i, _, _, _ in pack] if boxes is not None else None
            emb, box_emb = self._image_call(decoded, [t for _, _, t, _ in pack], pack_boxes, project, method,
                                            [turn for _, _, _, turn in pack])
            for k, (i, _, _, _) in enumerate(pack):
                local[i] = (emb[k], box_emb[k] if box_emb is not None else None)
            calls += 1

        for i in range(self.rank, n, self.world):
            data = image_bytes(images[i])
            width, height, turn = self._header(data, f"image {i} ({_describe(images[i])})",
                                               sizes[i] if sizes is not None else None)
            target = self.rule.target(height, width)  # the stored size: turning upright keeps its tokens
            tokens = target[0] * target[1] // (self.patch * self.patch)
            if pack and pack_tokens + tokens > self.cfg.token_budget:
                flush()
                pack, pack_tokens = [], 0
            pack.append((i, data, target, turn))
            pack_tokens += tokens
        if pack:
            flush()
        self._equalize(calls, self._dummy_image_call)
        merged: dict[int, tuple] = {}
        for part in self._gather(local):
            merged.update(part)
        if len(merged) != n:
            raise RuntimeError(f"encode_images: gathered {len(merged)} of {n} images")
        emb = torch.stack([merged[i][0] for i in range(n)]) if n else torch.zeros(0, 0)
        return emb, ([merged[i][1] for i in range(n)] if boxes is not None else None)

    # -- texts --

    def _text_call(self, seqs: list[list[int]]) -> torch.Tensor:
        seqlens = [len(s) for s in seqs]
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seqlens).cumsum(0)
        tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.int64, device=self.device)
        with self._autocast():
            out = self.model.encode_text(tokens, cu.to(self.device), max(seqlens), seqlens)
        return out.float().cpu()

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings (n, embed_dim) fp32 on the CPU of every caption; token statistics in `last_text_stats`."""
        n = len(texts)
        mine = list(range(self.rank, n, self.world))
        ids, cut = self.text([texts[i] for i in mine])
        local: dict[int, tuple] = {}
        calls, start = 0, 0
        while start < len(mine):
            stop, total = start, 0
            while stop < len(mine) and (stop == start or total + len(ids[stop]) <= self.cfg.text_token_budget):
                total += len(ids[stop])
                stop += 1
            emb = self._text_call(ids[start:stop])
            for k in range(start, stop):
                local[mine[k]] = (emb[k - start], len(ids[k]))
            calls += 1
            start = stop
        self._equalize(calls, lambda: self._text_call([[0]]))
        merged: dict[int, tuple] = {}
        total_cut = 0
        for part, part_cut in self._gather((local, cut)):
            merged.update(part)
            total_cut += part_cut
        if len(merged) != n:
            raise RuntimeError(f"encode_texts: gathered {len(merged)} of {n} captions")
        lengths = [merged[i][1] for i in range(n)]
        self._last_text_stats = {
            "caption_tokens_mean": sum(lengths) / max(n, 1),
            "caption_tokens_max": max(lengths, default=0),
            "truncated_tokens": total_cut,
        }
        return torch.stack([merged[i][0] for i in range(n)]) if n else torch.zeros(0, 0)

    @property
    def last_text_stats(self) -> dict:
        return dict(self._last_text_stats)

    def class_embeddings(self, classnames: Sequence[str], templates: Sequence[Template]) -> torch.Tensor:
        return zeroshot.build_classifier(self.encode_texts, classnames, templates)

    # -- tasks --

    def retrieval(self, task: RetrievalTask) -> dict:
        records = list(task.records)
        if not records:
            raise ValueError("RetrievalTask has no records")
        texts, txt_image = [], []
        for i, record in enumerate(records):
            captions = record[1]
            if isinstance(captions, str) or not captions:
                raise ValueError(f"record {i} ({record[-1] if len(record) > 2 else i}): captions must be a "
                                 f"non-empty list of strings, got {captions!r}")
            texts += list(captions)
            txt_image += [i] * len(captions)
        img = self.encode_images([r[0] for r in records])[0]
        txt = self.encode_texts(texts)
        if len(texts) == len(records):
            out = metrics.retrieval_metrics(*self._on_device(img, txt))
        else:
            out = metrics.retrieval_metrics_multi(*self._on_device(img, txt, torch.tensor(txt_image)))
        return {**out, **self.last_text_stats}

    def zero_shot(self, task: ZeroShotTask) -> dict:
        records = list(task.records)
        classes = self.class_embeddings(task.classnames, task.templates)
        img = self.encode_images([r[0] for r in records])[0]
        labels = torch.tensor([int(r[1]) for r in records])
        accuracy = zeroshot.zero_shot_accuracy(*self._on_device(img, classes, labels))
        return {**accuracy, "templates": len(task.templates)}

    def hard_negatives(self, task: HardNegativeTask) -> dict:
        records = list(task.records)
        img = self.encode_images([r[0] for r in records])[0]
        pos = self.encode_texts([r[1] for r in records])
        negatives = [(i, text) for i, r in enumerate(records) for text in r[2]]
        if not negatives:
            raise ValueError(f"HardNegativeTask: no image of {len(records)} has a hard negative; expected at least "
                             f"one")
        neg = self.encode_texts([text for _, text in negatives])
        neg_image = torch.tensor([i for i, _ in negatives], dtype=torch.int64)
        return metrics.hard_negative_accuracy(*self._on_device(img, pos, neg, neg_image))

    def regions(self, task: RegionTask) -> dict:
        all_records = [_read_once(r) for r in task.records]
        for i, r in enumerate(all_records):  # i: the index in task.records, before the records without boxes go
            if len(r[1]) != len(r[2]):
                raise ValueError(f"region record {i}: {len(r[1])} boxes but {len(r[2])} labels")
            size = None
            for j, (x0, y0, x1, y1) in enumerate(r[1]):  # named here: pool_boxes sees a batch's boxes only
                if not (x0 < x1 and y0 < y1):
                    raise ValueError(f"region record {i}, box {j} = {[x0, y0, x1, y1]}: expected x0 < x1 and "
                                     f"y0 < y1 (pixels of the original image)")
                width, height = size = size or self._box_frame(r, f"region record {i}")
                if not (x0 < width and y0 < height and x1 > 0 and y1 > 0):
                    raise ValueError(f"region record {i}, box {j} = {[x0, y0, x1, y1]} lies outside its "
                                     f"{width}x{height} image (width x height); expected some of the box inside "
                                     f"0 <= x < {width}, 0 <= y < {height} (pixels of the original image)")
        records = [r for r in all_records if len(r[1])]
        if not records:
            raise ValueError("RegionTask has no record with boxes")
        project = task.project or default_box_projection(self.model)
        classes = self.class_embeddings(task.classnames, task.templates)
        _, box_emb = self.encode_images([r[0] for r in records], [r[1] for r in records], project, task.method,
                                        [_declared(r) for r in records])
        emb = torch.cat(box_emb)
        labels = torch.tensor([int(label) for r in records for label in r[2]])
        out = metrics.classification_accuracy(*self._on_device(emb, classes, labels))
        return {**out, "n_images": len(records), "method": task.method, "templates": len(task.templates)}

    def run_task(self, task: Task) -> dict:
        start = time.perf_counter()
        if isinstance(task, RetrievalTask):
            out = self.retrieval(task)
        elif isinstance(task, ZeroShotTask):
            out = self.zero_shot(task)
        elif isinstance(task, HardNegativeTask):
            out = self.hard_negatives(task)
        elif isinstance(task, RegionTask):
            out = self.regions(task)
        else:
            raise TypeError(f"unknown task type {type(task).__name__}")
        info = {"info": dict(task.info)} if task.info else {}  # e.g. the samples a shard set skipped
        return {**out, **info, "seconds": round(time.perf_counter() - start, 3)}

    def run(self, tasks: dict[str, Task], meta: dict | None = None) -> dict:
        """{name: metrics} for every task plus "meta"; the model is put in eval mode and restored."""
        was_training = self.model.training
        self.model.eval()
        report: dict[str, Any] = {}
        try:
            with torch.no_grad():
                for name, task in tasks.items():
                    report[name] = self.run_task(task)
        finally:
            self.model.train(was_training)
        report["meta"] = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": str(self.device), "world_size": self.world, "patch_size": self.patch, "merge": self.merge,
            "token_budget": self.cfg.token_budget, "max_pixels": self.rule.max_pixels,
            "exif_orientation": self.cfg.exif_orientation, "box_frame": self.cfg.box_frame,
            "context_length": self.text.context_length, **(meta or {}),
        }
        return report


def _declared(record) -> tuple[int, int] | None:
    """A region record's declared (height, width) (RegionRecord.size), None when it gives none."""
    return tuple(record[4]) if len(record) > 4 and record[4] is not None else None


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return repr(image) if not isinstance(image, (bytes, bytearray)) else f"{len(image)} bytes"


def evaluate(model, tokenizer, tasks: dict[str, Task], *, cfg: EvalConfig | None = None,
             out_dir: str | os.PathLike | None = None, device=None, group=None, meta: dict | None = None) -> dict:
    """Run `tasks` and, with out_dir, write report.json and report.md there (on rank 0). Returns the report."""
    evaluator = Evaluator(model, tokenizer, cfg, device=device, group=group)
    with work():  # the forwards: an error here keeps its traceback on the command line
        report = evaluator.run(tasks, meta)
    if out_dir is not None and evaluator.rank == 0:
        write_report(report, out_dir)
    return report


# ---- report ----------------------------------------------------------------------------------------------------

_HEADLINE = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "chance_r1", "top1", "top5",
             "chance_top1", "accuracy", "chance")


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(report: dict) -> str:
    """One row per task: its size and headline metrics (fractions in [0, 1]); the rest stays in report.json, except
    a line under the table for each task whose data reader skipped samples (they are not in its n)."""
    lines = ["| task | n | metric | value |", "| --- | ---: | --- | ---: |"]
    notes = []
    for name, result in report.items():
        if name == "meta" or not isinstance(result, dict):
            continue
        keys = [k for k in _HEADLINE if k in result]
        for j, key in enumerate(keys):
            n = _format(result.get("n", "")) if j == 0 else ""
            lines.append(f"| {name if j == 0 else ''} | {n} | {key} | {_format(result[key])} |")
        skipped = result.get("info", {}).get("skipped")
        if skipped:
            notes.append(f"{name}: the shard reader counted {skipped} (skipped or repaired samples; see report.json)")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_report(report: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """report.json (everything; NaN as null) and report.md (the table) in out_dir; written to a temporary name,
    then renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "report.json", out / "report.md")
    report_json = json.dumps(finite_or_null(report), indent=2, sort_keys=True) + "\n"  # (a NaN recall: null)
    for path, text in zip(paths, (report_json, markdown_table(report)), strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths

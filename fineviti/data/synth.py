"""The embedded default data set: deterministic synthetic scenes with dense captions, written as webdataset shards.

Each image (64-1024 px a side, aspect ratio up to 1:4 either way, JPEG quality 90) holds 1-8 objects in distinct
cells of a 3 x 3 grid (top left ... bottom right); each object has a shape, a colour and a size (small, medium,
large: 30/55/85% of the cell's shorter side), and about a third carry a rendered word. Sample `i` of seed `s`
depends only on (s, split, i) (numpy Generator seeded from them), so the same seed gives byte-identical shards
whatever the number of processes. Per sample:

- `key.txt`: the global caption (50-250 words): every object with its attributes and position, then details,
  spatial relations between objects and counts, sentences chosen to fit a budget of 232 words and punctuation
  marks, so that the longest caption fits 256 tokens of the tokenizer trained on them;
- `key.json`: {"width", "height", "regions": [{"bbox": [x0, y0, x1, y1], "caption"}], "objects": [...]} with
  one local caption and pixel box per object; held-out samples add "hard_negatives": captions that differ from
  the true one in exactly one attribute (shape, colour, size, word) or the position of one object.

`generate(out, images, seed, heldout)` writes `out/train/*.tar` (+ .idx), `out/heldout/*.tar`, `out/tokenizer.json`
(a byte-level BPE trained on the training captions, see fineviti.data.tokenizer) and `out/info.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fineviti.data.shards import ShardWriter

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (240, 220, 30),
    "orange": (250, 140, 20), "purple": (130, 50, 170), "pink": (245, 130, 190), "cyan": (40, 200, 220),
    "brown": (120, 70, 30), "black": (20, 20, 20), "white": (250, 250, 250),
}
BACKGROUNDS = {
    "light gray": (200, 200, 200), "dark gray": (80, 80, 80), "beige": (225, 210, 180),
    "pale blue": (190, 210, 235), "pale green": (200, 230, 200), "navy": (30, 35, 80),
}
SIZES = {"small": 0.30, "medium": 0.55, "large": 0.85}
CELLS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom middle", "bottom right")
WORDS = ("cat", "sun", "tree", "fine", "vit", "moon", "fish", "bird", "rain", "star", "code", "map", "key", "door",
         "ship", "gold", "wind", "lamp", "hill", "rose")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
JPEG_QUALITY = 90
WORD_MIN_SIDE = 12  # pixels: a smaller object carries no word (it would not be legible)
CAPTION_PIECES = 232  # words + punctuation marks; 256 tokens hold it with room for bos/eos and split words
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 64, 1024, 4.0
TRAIN_SPLIT, HELDOUT_SPLIT = 0, 1


@dataclasses.dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: int
    word: str | None
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def position(self) -> str:
        return CELLS[self.cell]

    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def phrase(self) -> str:
        word = f' with the word "{self.word}" written on it' if self.word else ""
        return f"{self.size} {self.colour} {self.shape}{word}"


@dataclasses.dataclass
class Scene:
    width: int
    height: int
    background: str
    objects: list[SceneObject]
    template_seed: int  # drives the choice of sentences, shared by the true caption and its hard negatives


def _pieces(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def draw_scene(rng: np.random.Generator) -> Scene:
    long_side = math.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE + 1)))
    long_side = min(MAX_SIDE, int(long_side))
    max_aspect = min(MAX_ASPECT, long_side / MIN_SIDE)
    aspect = math.exp(rng.uniform(0.0, math.log(max_aspect))) if max_aspect > 1 else 1.0
    short_side = max(MIN_SIDE, int(round(long_side / aspect)))
    width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    n = int(rng.integers(1, 9))
    cells = rng.choice(9, size=n, replace=False)
    pairs = rng.choice(len(SHAPES) * len(COLOURS), size=n, replace=False)  # distinct (shape, colour) per scene
    objects = []
    for cell, pair in zip(cells.tolist(), pairs.tolist(), strict=True):
        shape, colour = SHAPES[pair // len(COLOURS)], list(COLOURS)[pair % len(COLOURS)]
        size = list(SIZES)[rng.integers(3)]
        word = WORDS[rng.integers(len(WORDS))] if rng.random() < 0.35 else None
        objects.append(SceneObject(shape, colour, size, cell, word))
    scene = Scene(width, height, background, objects, int(rng.integers(2**31)))
    place_objects(scene, rng)
    return scene


def place_objects(scene: Scene, rng: np.random.Generator) -> None:
    cell_w, cell_h = scene.width / 3, scene.height / 3
    for obj in scene.objects:
        side = max(4.0, SIZES[obj.size] * min(cell_w, cell_h))
        row, col = divmod(obj.cell, 3)
        slack_x, slack_y = (cell_w - side) / 2, (cell_h - side) / 2
        cx = (col + 0.5) * cell_w + rng.uniform(-slack_x, slack_x) * 0.8
        cy = (row + 0.5) * cell_h + rng.uniform(-slack_y, slack_y) * 0.8
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        x1, y1 = int(round(cx + side / 2)), int(round(cy + side / 2))
        obj.bbox = (max(0, x0), max(0, y0), min(scene.width, x1), min(scene.height, y1))
        if min(obj.bbox[2] - obj.bbox[0], obj.bbox[3] - obj.bbox[1]) < WORD_MIN_SIDE:
            obj.word = None  # too small to carry a legible word: none is drawn, so the captions name none


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _polygon(kind: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2
    if kind == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if kind == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if kind == "hexagon":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    if kind == "star":
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
        return [(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(radii, angles, strict=True)]
    raise ValueError(kind)


def render_scene(scene: Scene) -> Image.Image:
    top = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    # a faint vertical gradient, made at 1 x 2 px and stretched (cheap at 1024 px)
    tiny = np.stack([top, np.clip(top * 0.85 + 10, 0, 255)])[:, None, :].astype(np.uint8)
    image = Image.fromarray(tiny).resize((scene.width, scene.height), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        box = obj.bbox
        x0, y0, x1, y1 = box
        side = min(x1 - x0, y1 - y0)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "ring":
            draw.ellipse(box, outline=fill, width=max(1, side // 6))
        elif obj.shape == "cross":
            t = max(1, side // 5)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
            draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, box), fill=fill)
        if obj.word:  # (place_objects dropped the words of objects under WORD_MIN_SIDE)
            font = _font(max(6, side // 4))
            ink = (0, 0, 0) if sum(fill) > 380 or obj.shape == "ring" else (255, 255, 255)
            draw.text(((x0 + x1) / 2, (y0 + y1) / 2), obj.word, fill=ink, font=font, anchor="mm")
    return image


def _count_words(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _intro(scene: Scene, t: np.random.Generator) -> str:
    ratio = scene.width / scene.height
    shape = "wide" if ratio > 1.3 else "tall" if ratio < 1 / 1.3 else "roughly square"
    n = len(scene.objects)
    things = "a single object" if n == 1 else f"{_count_words(n)} objects"
    templates = (
        f"A {shape} image with a {scene.background} background showing {things}.",
        f"This {shape} picture has a plain {scene.background} background and contains {things}.",
        f"A synthetic {shape} scene on a {scene.background} background with {things} drawn on it.",
    )
    return templates[t.integers(len(templates))]


def _object_sentence(obj: SceneObject, k: int) -> str:
    templates = (
        f"In the {obj.position} there is a {obj.phrase()}.",
        f"A {obj.phrase()} sits in the {obj.position}.",
        f"The {obj.position} of the image holds a {obj.phrase()}.",
    )
    return templates[k]


def _detail_sentence(scene: Scene, obj: SceneObject, k: int) -> str:
    x0, y0, x1, y1 = obj.bbox
    share = max(1, round(100 * (x1 - x0) * (y1 - y0) / (scene.width * scene.height)))
    templates = (
        f"The {obj.name()}'s bounding box covers about {share} percent of the picture, and the shape is "
        + (f"drawn as a {obj.colour} outline." if obj.shape == "ring" else f"filled with solid {obj.colour}."),
        f"Its {obj.colour} {obj.shape} shape is {obj.size}, its box taking roughly {share} percent of the frame.",
    )
    return templates[k]


def _relation_sentence(a: SceneObject, b: SceneObject) -> str:
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    horizontal = "to the left of" if ca < cb else "to the right of" if ca > cb else "in the same column as"
    vertical = "above" if ra < rb else "below" if ra > rb else "in the same row as"
    return f"The {a.name()} is {horizontal} the {b.name()} and {vertical} it."


def _closing(scene: Scene) -> str:
    counts = {s: sum(o.size == s for o in scene.objects) for s in SIZES}
    n = len(scene.objects)
    words = sum(o.word is not None for o in scene.objects)
    return (f"In total there {'is' if n == 1 else 'are'} {_count_words(n)} {'object' if n == 1 else 'objects'}: "
            f"{_count_words(counts['small'])} small, {_count_words(counts['medium'])} medium and "
            f"{_count_words(counts['large'])} large, {_count_words(words)} of them with a word.")


@dataclasses.dataclass
class CaptionPlan:
    """Which sentences a caption holds, fixed once for a scene so that its hard negatives differ only where the
    scene does."""

    object_templates: list[int]
    optional: list[tuple[str, int, int]]  # ("detail", object, template) or ("relation", a, b), in caption order


def plan_caption(scene: Scene) -> CaptionPlan:
    t = np.random.default_rng(scene.template_seed)
    n = len(scene.objects)
    object_templates = [int(t.integers(3)) for _ in range(n)]
    candidates = [("detail", i, int(t.integers(2))) for i in range(n)]
    candidates += [("relation", i, j) for i in range(n) for j in range(i + 1, n)]
    order = t.permutation(len(candidates))
    plan = CaptionPlan(object_templates, [])
    budget = CAPTION_PIECES
    used = _pieces(render_caption(scene, plan))
    for k in order.tolist():
        extra = _pieces(_optional_sentence(scene, candidates[k]))
        if used + extra + 2 <= budget:  # + 2: room for a hard negative's longer word
            plan.optional.append(candidates[k])
            used += extra
    return plan


def _optional_sentence(scene: Scene, item: tuple[str, int, int]) -> str:
    kind, a, b = item
    if kind == "detail":
        return _detail_sentence(scene, scene.objects[a], b)
    return _relation_sentence(scene.objects[a], scene.objects[b])


def render_caption(scene: Scene, plan: CaptionPlan) -> str:
    t = np.random.default_rng(scene.template_seed + 1)
    parts = [_intro(scene, t)]
    details = {a: (kind, a, b) for kind, a, b in plan.optional if kind == "detail"}
    for i, obj in enumerate(scene.objects):
        parts.append(_object_sentence(obj, plan.object_templates[i]))
        if i in details:
            parts.append(_optional_sentence(scene, details[i]))
    parts += [_optional_sentence(scene, item) for item in plan.optional if item[0] == "relation"]
    if len(scene.objects) == 1:
        parts.append(f"The rest of the picture is empty {scene.background} space with nothing else in it.")
    parts.append(_closing(scene))
    return " ".join(parts)


def local_caption(obj: SceneObject) -> str:
    return f"a {obj.phrase()} in the {obj.position} of the image"


def hard_negatives(scene: Scene, plan: CaptionPlan, rng: np.random.Generator, count: int = 4) -> list[dict]:
    """Captions of scenes that differ from `scene` in one attribute or the position of one object."""
    kinds = ["colour", "shape", "size", "position"]
    if any(o.word for o in scene.objects):
        kinds.append("word")
    out = []
    for kind in rng.permutation(kinds)[:count].tolist():
        candidates = [i for i, o in enumerate(scene.objects) if kind != "word" or o.word]
        i = int(candidates[rng.integers(len(candidates))])
        obj = scene.objects[i]
        changed = dataclasses.replace(obj)
        if kind == "colour":
            changed.colour = str(rng.choice([c for c in COLOURS if c != obj.colour]))
        elif kind == "shape":
            changed.shape = str(rng.choice([s for s in SHAPES if s != obj.shape]))
        elif kind == "size":
            changed.size = str(rng.choice([s for s in SIZES if s != obj.size]))
        elif kind == "word":
            changed.word = str(rng.choice([w for w in WORDS if w != obj.word]))
        else:
            free = sorted(set(range(9)) - {o.cell for o in scene.objects})
            changed.cell = int(free[rng.integers(len(free))])
        objects = list(scene.objects)
        objects[i] = changed
        negative = dataclasses.replace(scene, objects=objects)
        out.append({"caption": render_caption(negative, plan), "kind": kind, "object": i})
    return out


def make_sample(seed: int, split: int, index: int) -> tuple[str, bytes, bytes, bytes]:
    """(key, jpg, txt, json) of sample `index` of `split` (0 train, 1 held-out) for `seed`."""
    rng = np.random.default_rng([seed, split, index])
    scene = draw_scene(rng)
    plan = plan_caption(scene)
    caption = render_caption(scene, plan)
    buffer = io.BytesIO()
    render_scene(scene).save(buffer, "JPEG", quality=JPEG_QUALITY)
    meta = {
        "key": f"{index:09d}",
        "width": scene.width,
        "height": scene.height,
        "regions": [{"bbox": list(o.bbox), "caption": local_caption(o)} for o in scene.objects],
        "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position, "word": o.word}
                    for o in scene.objects],
    }
    if split == HELDOUT_SPLIT:
        meta["hard_negatives"] = hard_negatives(scene, plan, rng)
    return meta["key"], buffer.getvalue(), caption.encode(), json.dumps(meta, sort_keys=True).encode()


def _make(args: tuple[int, int, int]) -> tuple[str, bytes, bytes, bytes]:
    return make_sample(*args)


def _clear_split(out: Path) -> None:
    """The shards (and their indexes) an earlier generate() wrote to this split's folder: a new data set replaces
    them (left there, a smaller or reseeded set would be read together with the rest of the old one)."""
    for old in [*out.glob("shard-[0-9]*.tar"), *out.glob("shard-[0-9]*.idx")]:
        old.unlink()


def _write_split(out: Path, seed: int, split: int, n: int, per_shard: int, processes: int) -> list[str]:
    captions = []
    jobs = [(seed, split, i) for i in range(n)]
    _clear_split(out)
    with ShardWriter(out, prefix="shard", samples_per_shard=per_shard) as writer:
        if processes > 1 and n > 16:  # one chunk of 16 or less: not worth a pool
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                samples = pool.imap(_make, jobs, chunksize=16)
                for key, jpg, txt, meta in samples:
                    writer.write(key, [("jpg", jpg), ("txt", txt), ("json", meta)])
                    captions.append(txt.decode())
                    captions += [r["caption"] for r in json.loads(meta)["regions"]]
        else:
            for job in jobs:
                key, jpg, txt, meta = _make(job)
                writer.write(key, [("jpg", jpg), ("txt", txt), ("json", meta)])
                captions.append(txt.decode())
                captions += [r["caption"] for r in json.loads(meta)["regions"]]
    return captions


_MARK = ".fineviti-synth"  # written first: a folder being (or cut short while being) generated is ours too


def _only_shards(out: Path) -> bool:
    """Whether `out` holds nothing but train/ and heldout/ folders of shards and their indexes (what a generation
    cut short before its tokenizer left, this version's marker aside), and the files a desktop leaves behind."""
    litter = (".DS_Store", "Thumbs.db")
    for entry in out.iterdir():
        if entry.name in litter:
            continue
        if entry.name not in ("train", "heldout") or not entry.is_dir():
            return False
        if any(p.suffix not in (".tar", ".idx") and p.name not in litter for p in entry.iterdir()):
            return False
    return True


def _check_out(out: Path) -> None:
    """generate rewrites out/train, out/heldout, tokenizer.json and info.json: a folder it did not write (no info.json
    of this generator) must be empty, so that nobody's files are replaced or cleared."""
    if not str(out).strip():
        raise ValueError("generate: out must name a folder, got an empty path")
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"generate: out {str(out)!r} is a file; expected a folder")
    try:
        ours = json.loads((out / "info.json").read_text()).get("generator") == "fineviti.data.synth"
    except (OSError, ValueError, AttributeError):
        ours = (out / _MARK).is_file() or _only_shards(out)  # a generation cut short: info.json comes last
    if not ours and any(out.iterdir()):
        raise FileExistsError(f"generate: out {str(out)!r} holds files that are not a synthetic data set of this "
                              f"generator (no info.json of it); its train/, heldout/, tokenizer.json and info.json "
                              f"would be replaced: choose an empty or new folder")


def generate(out: str | os.PathLike, images: int, seed: int = 0, heldout: int = 500, *,
             samples_per_shard: int = 1000, processes: int | None = None, vocab_size: int = 2000) -> dict:
    """Writes the synthetic data set to `out` (see the module docstring); returns the info it saved."""
    from fineviti.data.tokenizer import CaptionTokenizer, train_tokenizer

    if images < 1 or heldout < 0:
        raise ValueError(f"generate: images must be >= 1 and heldout >= 0, got images={images}, heldout={heldout}")
    if processes is not None and processes < 1:
        raise ValueError(f"generate: processes must be >= 1 (or None: the CPU count), got {processes}")
    out = Path(out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARK).write_text("written by fineviti.data.synth.generate\n")
    # the old set's info.json goes first: a regeneration cut short must not pass for the old set (the demo reuses a
    # folder whose info.json names the images, held-out count and seed it wants)
    (out / "info.json").unlink(missing_ok=True)
    processes = processes or min(os.cpu_count() or 1, 8)
    start = time.perf_counter()
    captions = _write_split(out / "train", seed, TRAIN_SPLIT, images, samples_per_shard, processes)
    if heldout:
        _write_split(out / "heldout", seed, HELDOUT_SPLIT, heldout, samples_per_shard, processes)
    else:
        _clear_split(out / "heldout")
    generated = time.perf_counter() - start
    tokenizer_path = train_tokenizer(captions, out / "tokenizer.json", vocab_size=vocab_size)
    tokenizer = CaptionTokenizer(tokenizer_path)
    longest = max(len(ids) for ids in tokenizer.encode_batch(captions, max_length=None)[0])
    info = {
        "generator": "fineviti.data.synth", "version": 1, "seed": seed, "images": images, "heldout": heldout,
        "samples_per_shard": samples_per_shard, "longest_caption_tokens": longest,
        "seconds": round(time.perf_counter() - start, 2), "generation_seconds": round(generated, 2),
    }
    (out / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info

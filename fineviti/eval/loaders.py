"""Loaders for the formats the field's benchmarks ship in, as lists of records for `runner`.

Records are named tuples, so they unpack as plain tuples: `(image, captions)`, `(image, label)`, ... An image is
a path, a PIL image, bytes, or an object whose `read()` returns the bytes (`ShardImage`); nothing is decoded at
load time. Each loader names the source its layout follows.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

# torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively, as ImageFolder does).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class CaptionRecord(NamedTuple):
    image: Any  # path, PIL image, bytes or an object with read() -> bytes
    captions: list[str]
    key: str = ""


class LabelRecord(NamedTuple):
    image: Any
    label: int
    key: str = ""


class RegionRecord(NamedTuple):
    image: Any
    boxes: list[tuple[float, float, float, float]]  # x0, y0, x1, y1 in pixels of the original image
    labels: list[int]
    key: str = ""
    # the (height, width) the set declares for the image (COCO's, a shard's json): with an EXIF orientation tag, a
    # declared size that is the upright one says the boxes are upright too (fineviti.data.pixels.read_orientation)
    size: tuple[int, int] | None = None


class HardNegativeRecord(NamedTuple):
    image: Any
    caption: str
    negatives: list[str]
    key: str = ""


@dataclass
class EvalSet:
    """A loaded benchmark: its records and, for classification, the class names in label order."""

    name: str
    kind: str  # "retrieval", "zero_shot", "regions" or "hard_negatives"
    records: list
    classnames: list[str] | None = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


# ---- COCO and Flickr30k captions: the Karpathy split ------------------------------------------------------------


def karpathy_captions(annotations: str | os.PathLike, image_root: str | os.PathLike, split: str = "test",
                      *, check_files: bool = True) -> EvalSet:
    """COCO / Flickr30k / Flickr8k captions in Karpathy's split files (dataset_coco.json, dataset_flickr30k.json).

    Format (Karpathy's neuraltalk2 `caption_datasets.zip`): {"dataset": ..., "images": [{"filepath" (COCO only,
    e.g. "val2014"), "filename", "split" ("train", "val", "test", "restval"), "sentences": [{"raw", "tokens",
    ...}], "imgid", "cocoid" ...}]}. The image is image_root/filepath/filename, or image_root/filename when there
    is no filepath (Flickr30k; image_root/flickr30k-images/filename is tried too). The standard test split has
    5000 COCO and 1000 Flickr30k images with five captions each.
    """
    annotations = _need_file(Path(annotations), "Karpathy split file")
    image_root = Path(image_root)
    data = json.loads(annotations.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{annotations}: expected a json object with an 'images' list (Karpathy's format)")
    splits = sorted({str(entry.get("split")) for entry in data["images"]})
    records = []
    for i, entry in enumerate(data["images"]):
        if entry.get("split") != split:
            continue
        try:
            filename, sentences = entry["filename"], entry["sentences"]
        except KeyError as exc:
            raise ValueError(f"{annotations}: images[{i}] lacks {exc}; expected 'filename' and 'sentences'") from None
        candidates = [image_root / entry.get("filepath", "") / filename]
        if "filepath" not in entry:
            candidates.append(image_root / "flickr30k-images" / filename)
        path = next((p for p in candidates if p.is_file()), candidates[0])
        if check_files and not path.is_file():
            raise FileNotFoundError(f"image of {annotations.name} images[{i}] not found; tried {candidates}")
        captions = [s["raw"].strip() for s in sentences]
        if not captions:
            raise ValueError(f"{annotations}: images[{i}] ({filename}) has no sentences")
        records.append(CaptionRecord(str(path), captions, Path(filename).stem))
    if not records:
        raise ValueError(f"{annotations}: no image has split {split!r}; the file has splits {splits}")
    name = str(data.get("dataset") or annotations.stem.removeprefix("dataset_"))
    return EvalSet(f"{name}_{split}", "retrieval", records, info={"source": str(annotations), "split": split})


# ---- ImageNet-style class folders --------------------------------------------------------------------------------


def _read_class_names(path: Path, first_synonym: bool) -> dict[str, str]:
    """Folder name -> class name, from LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca" per line), a json
    {"n01440764": "tench"}, or Keras' imagenet_class_index.json {"0": ["n01440764", "tench"]}."""
    text = _need_file(path, "class-name mapping file").read_text()
    mapping: dict[str, str] = {}
    if path.suffix == ".json":
        data = json.loads(text)
        for key, value in data.items():
            if isinstance(value, list) and len(value) == 2:
                mapping[str(value[0])] = str(value[1])
            elif isinstance(value, str):
                mapping[str(key)] = value
            else:
                raise ValueError(f"{path}: entry {key!r} = {value!r}; expected a name or a [folder, name] pair")
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{number}: expected 'folder class name', got {line!r}")
            mapping[parts[0]] = parts[1]
    if first_synonym:  # a first synonym that two classes share keeps its whole list ("maillot, tank suit")
        short = {k: v.split(",")[0].strip() for k, v in mapping.items()}
        shared = Counter(short.values())
        mapping = {k: short[k] if shared[short[k]] == 1 else v.strip() for k, v in mapping.items()}
    return {k: v.replace("_", " ") for k, v in mapping.items()}


def _class_images(folder: Path) -> list[Path]:
    """The images under one class folder at any depth, in the order of torchvision's `make_dataset`: os.walk
    following links, its (folder, ...) tuples sorted, file names sorted within a folder, extension matched
    case-insensitively."""
    walked = []
    ancestors = {str(folder): {os.path.realpath(folder)}}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        # A link back to a folder above this one would repeat its images, once per level, until the path is too
        # long: such links are not followed (links elsewhere are, as ImageFolder follows them).
        chain = ancestors.pop(dirpath)
        kept = []
        for name in dirnames:
            real = os.path.realpath(os.path.join(dirpath, name))
            if real not in chain:
                kept.append(name)
                ancestors[os.path.join(dirpath, name)] = chain | {real}
        dirnames[:] = kept
        walked.append((dirpath, filenames))
    return [Path(dirpath) / name for dirpath, filenames in sorted(walked) for name in sorted(filenames)
            if name.lower().endswith(IMAGE_EXTENSIONS)]


def image_folder(root: str | os.PathLike, class_names: str | os.PathLike | None = None, *,
                 first_synonym: bool = True) -> EvalSet:
    """root/<class>/.../<image> as torchvision's ImageFolder reads it: classes = sorted folder names, label = index;
    the files with IMAGE_EXTENSIONS at any depth, in `_class_images` order; a class folder without one is an error.
    Class names come from the folder names ("_" read as a space) or from a mapping file (see `_read_class_names`);
    `first_synonym` keeps "tench" of "tench, Tinca tinca"."""
    root = _need_dir(Path(root), "image folder root")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root}: no class folders; expected root/<class>/<image>")
    mapping = _read_class_names(Path(class_names), first_synonym) if class_names is not None else None
    names = []
    for folder in folders:
        if mapping is None:
            names.append(folder.replace("_", " "))
        elif folder not in mapping:
            raise ValueError(f"class folder {folder!r} is missing from the mapping file {class_names}")
        else:
            names.append(mapping[folder])
    images = {folder: _class_images(root / folder) for folder in folders}
    empty = [folder for folder in folders if not images[folder]]
    if empty:  # ImageFolder raises here too: an empty class would still take a label and a column of the classifier
        shown = ", ".join(map(repr, empty[:10])) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise ValueError(f"{root}: {len(empty)} of {len(folders)} class folders ({shown}) hold no image with "
                         f"extensions {IMAGE_EXTENSIONS} at any depth; expected at least one image per class")
    records = []
    for label, folder in enumerate(folders):
        for path in images[folder]:  # key: folder/sub/stem, unique where stems repeat in subfolders
            key = (Path(folder) / path.relative_to(root / folder).with_suffix("")).as_posix()
            records.append(LabelRecord(str(path), label, key))
    info: dict[str, Any] = {"source": str(root)}
    repeated = {name: [f for f, n in zip(folders, names, strict=True) if n == name]
                for name, count in Counter(names).items() if count > 1}
    if repeated:  # ImageNet's own mapping names two classes "crane" (the bird, the machine)
        info["duplicate_class_names"] = repeated
        warnings.warn(f"{root}: classes with the same name get the same prompts and text embedding, so their images "
                      f"tie and never count as correct at top-1: {repeated}; pass a class-name file that tells them "
                      f"apart", stacklevel=2)
    return EvalSet(root.name, "zero_shot", records, names, info=info)


# ---- long-caption sets -------------------------------------------------------------------------------------------


def urban1k(root: str | os.PathLike) -> EvalSet:
    """Urban1k (Long-CLIP; huggingface.co/datasets/BeichenZhang/Urban1k): root/image/<stem>.jpg and
    root/caption/<stem>.txt, one long caption per image; pairs by stem, as beichenzbc/Long-CLIP
    `eval/retrieval/Urban1k.py` does (it reads the file's first line; the files are one line)."""
    root = Path(root)
    images, captions = _need_dir(root / "image", "Urban1k image/ folder"), _need_dir(root / "caption", "caption/")
    records = []
    for txt in sorted(captions.glob("*.txt")):
        candidates = [images / (txt.stem + ext) for ext in (".jpg", ".jpeg", ".png", ".JPG")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"Urban1k: caption {txt.name} has no image {txt.stem}.jpg in {images}")
        text = txt.read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"Urban1k: caption file {txt} is empty")
        records.append(CaptionRecord(str(path), [text.splitlines()[0].strip()], txt.stem))
    if not records:
        raise ValueError(f"{captions}: no .txt captions")
    return EvalSet("urban1k", "retrieval", records, info={"source": str(root)})


def dci(root: str | os.PathLike, split: str = "all", caption: str = "extended") -> EvalSet:
    """Densely Captioned Images (facebookresearch/DCI): densely_captioned_images/{photos/, annotations/ or
    complete/, splits.json}. Each annotation json holds "image" (a file in photos/), "short_caption",
    "extra_caption" and "mask_data"; splits.json maps "train" / "valid" / "test" to annotation file names.
    caption="extended" gives short_caption + "\\n" + extra_caption (DCI's `get_extended_caption`, and the text
    wuw2019/LoTLIP's long-text retrieval uses, over all splits: split="all"); "short" gives short_caption.
    `root` is the densely_captioned_images folder or its parent.
    """
    if caption not in ("extended", "short"):
        raise ValueError(f"caption must be 'extended' or 'short', got {caption!r}")
    root = Path(root)
    if (root / "densely_captioned_images").is_dir():
        root = root / "densely_captioned_images"
    photos = _need_dir(root / "photos", "DCI photos/ folder")
    annotation_dir = next((root / d for d in ("annotations", "complete") if (root / d).is_dir()), None)
    if annotation_dir is None:
        raise FileNotFoundError(f"DCI: neither {root / 'annotations'} nor {root / 'complete'} exists")
    splits_file = root / "splits.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())
        if split == "all":
            names = [name for part in splits.values() for name in part]
        elif split in splits:
            names = list(splits[split])
        else:
            raise ValueError(f"DCI: split {split!r} is not in {splits_file} (it has {sorted(splits)}, or 'all')")
    elif split == "all":
        names = sorted(p.name for p in annotation_dir.glob("*.json"))
    else:
        raise FileNotFoundError(f"DCI: split {split!r} needs {splits_file}, which does not exist")
    records = []
    for name in names:
        anno = json.loads(_need_file(annotation_dir / name, "DCI annotation").read_text())
        try:
            short, extra, image = anno["short_caption"], anno["extra_caption"], anno["image"]
        except KeyError as exc:
            raise ValueError(f"DCI: {annotation_dir / name} lacks {exc}") from None
        text = f"{short}\n{extra}" if caption == "extended" else short
        records.append(CaptionRecord(str(_need_file(photos / image, "DCI photo")), [text.strip()], Path(name).stem))
    if not records:
        raise ValueError(f"DCI: split {split!r} is empty")
    return EvalSet(f"dci_{split}", "retrieval", records, info={"source": str(root), "caption": caption})


def docci(root: str | os.PathLike, split: str = "test") -> EvalSet:
    """DOCCI (google.github.io/docci): root/docci_descriptions.jsonlines (one json per line with "example_id",
    "split" in train / test / qual_dev / qual_test, "image_file", "description") and root/images/ from
    docci_images.tar.gz. The test split has 5000 images, one long description each."""
    root = Path(root)
    listing = _need_file(root / "docci_descriptions.jsonlines", "DOCCI descriptions file")
    images = _need_dir(root / "images", "DOCCI images/ folder")
    records, seen = [], set()
    for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        seen.add(row.get("split"))
        if row.get("split") != split:
            continue
        try:
            image_file, description = row["image_file"], row["description"]
        except KeyError as exc:
            raise ValueError(f"{listing}:{number} lacks {exc}") from None
        key = str(row.get("example_id", Path(image_file).stem))
        records.append(CaptionRecord(str(_need_file(images / image_file, "DOCCI image")), [description.strip()], key))
    if not records:
        raise ValueError(f"{listing}: no row has split {split!r}; it has {sorted(map(str, seen))}")
    return EvalSet(f"docci_{split}", "retrieval", records, info={"source": str(root), "split": split})


# ---- boxes: COCO instances (FG-CLIP's box classification) ---------------------------------------------------------


def coco_instances(annotations: str | os.PathLike, image_root: str | os.PathLike, *, skip_crowd: bool = False,
                   min_size: float = 1.0) -> EvalSet:
    """COCO detection annotations (instances_val2017.json: "images" [{"id", "file_name", ...}], "annotations"
    [{"image_id", "bbox": [x, y, w, h], "category_id", "iscrowd"}], "categories" [{"id", "name"}]) as region
    records, classes in the order of "categories". FG-CLIP's protocol scores every box (crowd boxes included);
    boxes narrower or shorter than `min_size` pixels are dropped (counted in info["dropped_boxes"])."""
    annotations = _need_file(Path(annotations), "COCO instances file")
    image_root = Path(image_root)
    data = json.loads(annotations.read_text())
    categories = data["categories"]
    index = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict[int, list] = {}
    dropped = 0
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        if (skip_crowd and ann.get("iscrowd")) or w < min_size or h < min_size:
            dropped += 1
            continue
        if ann["category_id"] not in index:
            raise ValueError(f"{annotations}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
        per_image.setdefault(ann["image_id"], []).append(((x, y, x + w, y + h), index[ann["category_id"]]))
    records = []
    for image in sorted(data["images"], key=lambda im: im["id"]):
        boxes = per_image.get(image["id"])
        if not boxes:
            continue
        path = _need_file(image_root / image["file_name"], "COCO image")
        declared = (image["height"], image["width"]) if "height" in image and "width" in image else None
        records.append(RegionRecord(str(path), [b for b, _ in boxes], [c for _, c in boxes], str(image["id"]),
                                    declared))
    names = [c["name"] for c in categories]
    info = {"source": str(annotations), "dropped_boxes": dropped}
    return EvalSet(annotations.stem, "regions", records, names, info=info)


# ---- webdataset shards (img2dataset layout), through the data path's reader ----------------------------------------


class ShardImage:
    """The image of sample `index` of a fineviti.data.dataset.ShardDataset, read when the runner opens it."""

    def __init__(self, dataset, index: int):
        self.dataset, self.index = dataset, index

    def read(self) -> bytes:
        return self.dataset.load(self.index).image

    def __repr__(self) -> str:
        return f"ShardImage({self.dataset.keys[self.index]!r})"


def open_shards(shards) -> Any:
    """A fineviti.data.dataset.ShardDataset of a shard folder (or one tar); one already open is returned as it is,
    so the loaders of one folder share a scan and its skip counts (see `runner.synthetic_tasks`)."""
    from fineviti.data.dataset import ShardDataset

    return shards if isinstance(shards, ShardDataset) else ShardDataset(shards)


def _shard_samples(dataset):
    """(ShardImage, RawSample) of every usable sample (fineviti.data.dataset: img2dataset's key.jpg / key.txt /
    key.json with a wds2idx index; samples without image or caption are skipped and counted there)."""
    from fineviti.data.dataset import BadSample

    for i in range(len(dataset)):
        try:
            raw = dataset.load(i)
        except BadSample as exc:
            raise ValueError(f"{dataset.path}: sample {dataset.keys[i]} cannot be read ({exc.reason}: {exc})") from exc
        yield ShardImage(dataset, i), raw


def _shard_info(dataset) -> dict:
    """The EvalSet info of a shard set: its source, the samples the shard reader kept, and the ones it skipped by
    reason (fineviti.data.dataset.SKIP_REASONS), which the runner copies into the report; a warning when any."""
    skipped = dict(sorted(dataset.stats.items()))
    if skipped:
        # The same text for every loader of one folder and stacklevel 1, so Python's default filter shows it once
        # (synthetic_tasks reads one scan three times), not once per task.
        warnings.warn(f"{dataset.path}: the shard reader kept {len(dataset)} samples and counted {skipped}; samples "
                      f"left out are in no task's n, and a bad_json sample is kept without its json (so without its "
                      f"regions, hard negatives and json captions); the counts are in the report's info['skipped']",
                      stacklevel=1)
    return {"source": str(dataset.path), "samples": len(dataset), "skipped": skipped}


def shard_captions(shards) -> EvalSet:
    """Caption records from shards (a folder, a tar or an `open_shards` dataset): every caption of json "captions"
    when the sample has several, else key.txt. info["skipped"]: the samples the shard reader left out, by reason."""
    dataset = open_shards(shards)
    records = []
    for image, raw in _shard_samples(dataset):
        many = raw.meta.get("captions")
        texts = [str(c).strip() for c in many] if isinstance(many, list) and many else [raw.caption.strip()]
        records.append(CaptionRecord(image, texts, raw.key))
    info = _shard_info(dataset)
    if not records:
        raise ValueError(f"{dataset.path}: no sample with an image and a caption (skipped: {info['skipped']})")
    return EvalSet(dataset.path.name, "retrieval", records, info=info)


def shard_hard_negatives(shards, *, field_name: str = "hard_negatives") -> EvalSet:
    """Hard-negative records: key.txt is the true caption, json[field_name] the captions that differ from it in one
    attribute or one object's position (fineviti.data.synth writes [{"caption", "kind", "object"}] there on the
    held-out split; plain strings are accepted too). Samples without negatives are left out (counted in
    info["without_negatives"]); info["skipped"] as in `shard_captions`."""
    dataset = open_shards(shards)
    records = []
    for image, raw in _shard_samples(dataset):
        negatives = raw.meta.get(field_name) or []
        texts = [n["caption"] if isinstance(n, dict) else str(n) for n in negatives]
        if texts:
            records.append(HardNegativeRecord(image, raw.caption.strip(), texts, raw.key))
    info = {**_shard_info(dataset), "without_negatives": len(dataset) - len(records)}
    if not records:
        raise ValueError(f"{dataset.path}: no sample has json[{field_name!r}] (hard negatives; skipped: "
                         f"{info['skipped']})")
    return EvalSet(f"{dataset.path.name}_hard_negatives", "hard_negatives", records, info=info)


def synthetic_region_classes() -> list[str]:
    """The classes of the synthetic scenes' objects: every "colour shape" of fineviti.data.synth."""
    from fineviti.data import synth

    return [f"{colour} {shape}" for colour in synth.COLOURS for shape in synth.SHAPES]


def shard_regions(shards, *, label_of=None, classnames: Sequence[str] | None = None) -> EvalSet:
    """Region records from json {"regions": [{"bbox": [x0, y0, x1, y1], "caption"}]} (pixels of the original image).

    label_of(region, meta, j) gives region j's class name; the default reads the synthetic generator's
    json["objects"][j] as "colour shape" when present, else the region's caption. classnames: the classes in
    label order (default: every distinct label, sorted; `synthetic_region_classes()` for the synthetic set).
    Samples without regions are left out (info["without_regions"]); info["skipped"] as in `shard_captions`."""
    def default_label(region, meta, j):
        objects = meta.get("objects")
        if isinstance(objects, list) and j < len(objects):
            return f"{objects[j]['colour']} {objects[j]['shape']}"
        return str(region["caption"])

    label_of = label_of or default_label
    dataset = open_shards(shards)
    samples = [(image, raw) for image, raw in _shard_samples(dataset) if raw.regions]
    labelled = [[label_of(r, raw.meta, j) for j, r in enumerate(raw.regions)] for _, raw in samples]
    if classnames is None:
        classnames = sorted({n for names in labelled for n in names})
    index = {name: i for i, name in enumerate(classnames)}
    records = []
    for (image, raw), names in zip(samples, labelled, strict=True):
        for name in names:
            if name not in index:
                raise ValueError(f"{dataset.path}: sample {raw.key} has a region of class {name!r}, not in classnames")
        boxes = [tuple(float(v) for v in r["bbox"]) for r in raw.regions]
        records.append(RegionRecord(image, boxes, [index[n] for n in names], raw.key, (raw.height, raw.width)))
    info = {**_shard_info(dataset), "without_regions": len(dataset) - len(records)}
    if not records:
        raise ValueError(f"{dataset.path}: no sample with an image and regions (skipped: {info['skipped']})")
    return EvalSet(f"{dataset.path.name}_regions", "regions", records, list(classnames), info=info)


FORMATS = ("coco", "flickr30k", "imagenet", "urban1k", "dci", "docci", "coco_instances", "shards", "synthetic")

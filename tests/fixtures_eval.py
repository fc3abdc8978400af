"""Tiny fixtures in the layouts of the evaluation benchmarks (small PIL-made images), and a fake two-tower model
that obeys the model contract with answers that are known in advance.

Images are solid colours (or colour blocks), captions name the colours, and the fake model embeds an image as its
mean normalised RGB and a caption as the mean of its words' RGB directions, so that a caption naming an image's
colour matches it exactly and retrieval / zero-shot / region answers can be asserted exactly.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn

# Colours whose normalised RGB ((x / 255 - 0.5) / 0.5) directions are pairwise distinct.
COLOURS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "cyan": (0, 255, 255), "magenta": (255, 0, 255), "white": (255, 255, 255), "black": (0, 0, 0),
}
WORDS = ["a", "photo", "of", "the", "picture", "is", "bad", "mostly", *COLOURS]


def solid(path: Path, colour: str, size=(40, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path, format=fmt)
    return path


def blocks(size, boxes_colours, background="black") -> Image.Image:
    image = Image.new("RGB", size, COLOURS[background])
    for (x0, y0, x1, y1), colour in boxes_colours:
        image.paste(COLOURS[colour], (x0, y0, x1, y1))
    return image


def encoded(fmt: str, w: int = 30, h: int = 20, **save) -> bytes:
    """Two colour blocks side by side, encoded as `fmt` (PIL's format name: "GIF", "BMP", ...)."""
    image = Image.new("RGB", (w, h), (200, 40, 90))
    image.paste((20, 220, 60), (0, 0, w // 2, h))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def build_karpathy(root: Path, dataset: str = "coco") -> Path:
    """dataset_coco.json (with filepath) or dataset_flickr30k.json (without, images in flickr30k-images/)."""
    images = []
    colours = list(COLOURS)
    for i, colour in enumerate(colours[:6]):
        split = "test" if i < 4 else "train"
        filename = f"COCO_val2014_{i:012d}.jpg" if dataset == "coco" else f"{1000 + i}.jpg"
        folder = root / "val2014" if dataset == "coco" else root / "flickr30k-images"
        solid(folder / filename, colour)
        entry = {
            "filename": filename, "imgid": i, "split": split, "sentids": [2 * i, 2 * i + 1],
            "sentences": [{"raw": f"A {colour} picture.", "tokens": ["a", colour, "picture"], "imgid": i,
                           "sentid": 2 * i},
                          {"raw": f"mostly {colour}", "tokens": ["mostly", colour], "imgid": i, "sentid": 2 * i + 1}],
        }
        if dataset == "coco":
            entry.update(filepath="val2014", cocoid=100 + i)
        images.append(entry)
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path


def build_image_folder(root: Path) -> tuple[Path, Path]:
    """root/<wnid>/*.JPEG with 3 classes, plus a LOC_synset_mapping.txt naming them."""
    folders = {"n00000002": "green", "n00000001": "red", "n00000003": "blue"}
    for wnid, colour in folders.items():
        for k in range(2):
            solid(root / "train" / wnid / f"{wnid}_{k}.JPEG", colour, size=(30 + 10 * k, 28), fmt="JPEG")
    (root / "train" / "n00000001" / "notes.txt").write_text("not an image")
    mapping = root / "LOC_synset_mapping.txt"
    mapping.write_text("".join(f"{w} {c}, {c} thing\n" for w, c in sorted(folders.items())))
    return root / "train", mapping


def build_urban1k(root: Path) -> Path:
    for i, colour in enumerate(["red", "green", "blue"]):
        solid(root / "Urban1k" / "image" / f"{i + 1}.jpg", colour)
        (root / "Urban1k" / "caption").mkdir(parents=True, exist_ok=True)
        (root / "Urban1k" / "caption" / f"{i + 1}.txt").write_text(f"A long {colour} caption about the photo.\n")
    return root / "Urban1k"


def build_dci(root: Path) -> Path:
    base = root / "densely_captioned_images"
    names = {"train": ["sa_1.json"], "valid": ["sa_2.json"], "test": ["sa_3.json"]}
    for (_split, files), colour in zip(names.items(), ["red", "green", "blue"], strict=True):
        for name in files:
            solid(base / "photos" / name.replace(".json", ".jpg"), colour)
            anno = {"image": name.replace(".json", ".jpg"), "short_caption": f"A {colour} picture.",
                    "extra_caption": f"It is mostly {colour}.", "mask_data": {}, "mask_keys": []}
            (base / "annotations").mkdir(parents=True, exist_ok=True)
            (base / "annotations" / name).write_text(json.dumps(anno))
    (base / "splits.json").write_text(json.dumps(names))
    return root


def build_docci(root: Path) -> Path:
    rows = []
    for i, (colour, split) in enumerate([("red", "test"), ("green", "train"), ("blue", "test"), ("cyan", "qual_dev")]):
        name = f"{split}_{i:05d}.jpg"
        solid(root / "images" / name, colour)
        rows.append({"example_id": f"{split}_{i:05d}", "split": split, "image_file": name,
                     "description": f"A {colour} photo."})
    (root / "docci_descriptions.jsonlines").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def build_coco_instances(root: Path) -> Path:
    images = [{"id": 7, "file_name": "000000000007.jpg", "width": 64, "height": 48},
              {"id": 3, "file_name": "000000000003.jpg", "width": 32, "height": 32},
              {"id": 9, "file_name": "000000000009.jpg", "width": 32, "height": 32}]
    blocks((64, 48), [((0, 0, 32, 24), "red"), ((32, 24, 64, 48), "blue")]).save(root / "000000000007.jpg")
    blocks((32, 32), [((0, 0, 32, 32), "green")]).save(root / "000000000003.jpg")
    blocks((32, 32), []).save(root / "000000000009.jpg")
    categories = [{"id": 1, "name": "red"}, {"id": 5, "name": "green"}, {"id": 2, "name": "blue"}]
    annotations = [
        {"id": 1, "image_id": 7, "bbox": [0, 0, 32, 24], "category_id": 1, "iscrowd": 0, "area": 768},
        {"id": 2, "image_id": 7, "bbox": [32, 24, 32, 24], "category_id": 2, "iscrowd": 1, "area": 768},
        {"id": 3, "image_id": 3, "bbox": [4, 4, 20, 20], "category_id": 5, "iscrowd": 0, "area": 400},
        {"id": 4, "image_id": 3, "bbox": [4, 4, 0.5, 20], "category_id": 5, "iscrowd": 0, "area": 10},
    ]
    path = root / "instances_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def build_shards(root: Path, n: int = 6) -> Path:
    """Held-out-style shards: key.jpg (colour blocks), key.txt, key.json with regions, objects, hard negatives."""
    from fineviti.data.shards import ShardWriter

    colours = list(COLOURS)[:6]
    with ShardWriter(root, prefix="shard", samples_per_shard=4) as writer:
        for i in range(n):
            a, b = colours[i % 6], colours[(i + 1) % 6]
            image = blocks((56, 28), [((0, 0, 28, 28), a), ((28, 0, 56, 28), b)])
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            meta = {
                "width": 56, "height": 28,
                "regions": [{"bbox": [0, 0, 28, 28], "caption": f"a {a} square"},
                            {"bbox": [28, 0, 56, 28], "caption": f"a {b} square"}],
                "objects": [{"shape": "square", "colour": a}, {"shape": "square", "colour": b}],
                "hard_negatives": [{"caption": f"{b} {a}", "kind": "position", "object": 0}],
            }
            if i == 5:
                meta["captions"] = [f"{a} {b}", f"{a} then {b}"]
            writer.write(f"{i:09d}", [("png", buffer.getvalue()), ("txt", f"{a} {b}".encode()),
                                      ("json", json.dumps(meta).encode())])
    return root


class FakeVisual(nn.Module):
    """patch_size, merge; tokens = per-patch mean normalised RGB (width 3)."""

    def __init__(self, patch_size: int = 14, merge: int = 2):
        super().__init__()
        self.patch_size, self.merge = patch_size, merge
        p2 = patch_size * patch_size
        channel_mean = torch.zeros(3 * p2, 3)
        for c in range(3):
            channel_mean[c * p2 : (c + 1) * p2, c] = 1.0 / p2  # patches are flattened channel, row, column
        self.register_buffer("channel_mean", channel_mean)
        self.scale = nn.Parameter(torch.ones(()))

    def tokens(self, patches):
        return patches @ self.channel_mean * self.scale


class FakeModel(nn.Module):
    """The model contract of fineviti.model.FineViT: encode_image / encode_text on packed inputs.

    Image embedding: the mean of its patch tokens (mean normalised RGB) in the first 3 of `embed_dim` dims.
    Text embedding: the mean over its tokens of a table whose colour words hold their normalised RGB, other words
    zero. Records every call's batch size, so tests can check packing."""

    def __init__(self, vocab: list[str] = WORDS, embed_dim: int = 5, patch_size: int = 14, merge: int = 2,
                 context_length: int = 32):
        super().__init__()
        self.visual = FakeVisual(patch_size, merge)
        self.embed_dim = embed_dim
        self.context_length = context_length
        table = torch.zeros(len(vocab) + 1, embed_dim)
        for i, word in enumerate(vocab):
            if word in COLOURS:
                table[i + 1, :3] = torch.tensor(COLOURS[word], dtype=torch.float32) / 127.5 - 1
        self.token_table = nn.Parameter(table)
        self.image_calls: list[int] = []
        self.text_calls: list[int] = []

    def _pad(self, x):
        return torch.nn.functional.pad(x, (0, self.embed_dim - x.shape[1]))

    def encode_image(self, patches, cu_seqlens, pos, max_seqlen, seqlens=None, return_tokens=False):
        assert patches.shape[0] == pos.shape[0] == int(cu_seqlens[-1])
        assert max(seqlens) == max_seqlen
        self.image_calls.append(cu_seqlens.numel() - 1)
        tokens = self.visual.tokens(patches)
        lengths = torch.tensor(seqlens, device=patches.device)
        seg = torch.repeat_interleave(torch.arange(len(seqlens), device=patches.device), lengths)
        sums = tokens.new_zeros(len(seqlens), 3).index_add(0, seg, tokens)
        emb = self._pad(sums / lengths[:, None].float())
        return (emb, tokens) if return_tokens else emb

    def encode_text(self, tokens, cu_seqlens, max_seqlen, seqlens=None):
        assert max(seqlens) == max_seqlen <= self.context_length
        self.text_calls.append(cu_seqlens.numel() - 1)
        lengths = torch.tensor(seqlens, device=tokens.device)
        seg = torch.repeat_interleave(torch.arange(len(seqlens), device=tokens.device), lengths)
        sums = self.token_table.new_zeros(len(seqlens), self.embed_dim).index_add(0, seg, self.token_table[tokens])
        return sums / lengths[:, None].float()


def word_tokenizer(vocab: list[str] = WORDS):
    """text -> ids: lower-cased words without punctuation, 1 + their index in vocab (0 for unknown words)."""
    index = {w: i + 1 for i, w in enumerate(vocab)}

    def encode(text: str) -> list[int]:
        words = "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()
        return [index.get(w, 0) for w in words]

    return encode


def box_projection(pooled: torch.Tensor) -> torch.Tensor:
    """The fake model's projection of pooled patch tokens (width 3) into its 5-dim joint embedding."""
    return torch.nn.functional.pad(pooled, (0, 2))

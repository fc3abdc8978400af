"""A folder of indexed webdataset shards as a table of samples: what the planner needs (image sizes) and what the
pixel paths need (the bytes of one sample), with bad data skipped and counted.

Scanning reads each shard's wds2idx index (writing it when missing or when it does not describe the tar) and each
sample's json; the image size comes from the json's "width"/"height" (img2dataset writes them) or else from the
image header (PIL reads only the header), never from a full decode; a header gives the stored pixels' size, before
any EXIF orientation (which the loader applies: fineviti.data.loader). A sample is left out at scan time, and
counted, when it has no image, no caption (`.txt`, or a json "caption"/"captions"), an image whose header does not
parse, or bytes past the end of a shard cut short. Failures found later (an image body that does not decode, a
bad box) are counted by the loader.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from fineviti.data import shards as shards_mod

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Why samples were left out or repaired; the keys of `ShardDataset.stats` and of the loader's counters.
SKIP_REASONS = ("missing_image", "missing_caption", "unreadable_header", "truncated_shard", "bad_json",
                "undecodable_image", "size_mismatch", "bad_box", "empty_pack", "too_large")


def max_image_pixels() -> int:
    """The largest image (height * width) any pixel path takes: what PIL decodes before it raises
    DecompressionBombError (twice Image.MAX_IMAGE_PIXELS, about 179 MP by default; raise that to take larger ones).
    The planner leaves larger images out for every path ("too_large"): DALI and nvJPEG decoded them while PIL
    refused, so which samples a run saw depended on the pixel path."""
    limit = Image.MAX_IMAGE_PIXELS
    return 2 * int(limit) if limit else 2**62


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class RawSample:
    key: str
    image: bytes
    caption: str
    regions: list[dict]  # [{"bbox": [x0, y0, x1, y1], "caption": str}] in pixels of the original image
    height: int  # as planned (json or header)
    width: int
    meta: dict = dataclasses.field(default_factory=dict)  # the whole json (held-out: "hard_negatives", "objects")


class ShardDataset:
    """The usable samples of a folder of shards (or one tar), in shard then index order.

    Attributes: keys (list[str]), heights and widths (int64 arrays, original pixels), stats (Counter of skipped
    samples by reason), shards (the tar paths)."""

    def __init__(self, path: str | os.PathLike, *, caption_key: str = "txt"):
        self.path = Path(path)
        self.shards = shards_mod.list_shards(self.path)
        self.caption_key = caption_key
        self.reader = shards_mod.ShardReader(self.shards)
        self.stats: Counter = Counter()
        keys, shard_ids, heights, widths = [], [], [], []
        image_off, image_size, text_off, text_size, json_off, json_size = [], [], [], [], [], []
        for shard_id, tar in enumerate(self.shards):
            indexed = self._index(tar)
            file_size = os.path.getsize(tar)
            for sample in indexed:
                kept = self._scan_sample(shard_id, sample, file_size)
                if kept is None:
                    continue
                height, width, image, text, meta = kept
                keys.append(sample.key)
                shard_ids.append(shard_id)
                heights.append(height)
                widths.append(width)
                for member, offs, sizes in ((image, image_off, image_size), (text, text_off, text_size),
                                            (meta, json_off, json_size)):
                    offs.append(member.offset if member else -1)
                    sizes.append(member.size if member else 0)
        self.keys = keys
        self.shard_ids = np.asarray(shard_ids, dtype=np.int32)
        self.heights = np.asarray(heights, dtype=np.int64)
        self.widths = np.asarray(widths, dtype=np.int64)
        self._members = {name: (np.asarray(o, dtype=np.int64), np.asarray(s, dtype=np.int64)) for name, o, s in
                         (("image", image_off, image_size), ("text", text_off, text_size),
                          ("json", json_off, json_size))}
        self.reader.close()

    def _index(self, tar: Path) -> list:
        """The shard's samples from its index; the index is written when missing, or when it does not describe
        this tar (a tar rewritten since: its offsets would point into other samples' bytes; shards_mod.index_matches
        reads a few tar headers, where file times say nothing after a copy). On a read-only folder the scan is used
        as it is, with a warning."""
        idx = shards_mod.index_path(tar)
        if idx.is_file():
            try:
                indexed = shards_mod.read_index(idx)
            except ValueError:
                indexed = None
            if indexed is not None and shards_mod.index_matches(tar, indexed):
                return indexed
        samples, damage = shards_mod.scan_tar(tar)
        if damage is not None:  # indexed up to its last whole sample; what followed is lost (uncounted)
            self._skip("truncated_shard")
        try:
            shards_mod.write_index(tar, idx, scanned=(samples, damage))
        except OSError as exc:
            warnings.warn(f"could not write the index {idx} ({exc}); its scan is used for this run only",
                          stacklevel=3)
        return samples

    def __len__(self) -> int:
        return len(self.keys)

    def _skip(self, reason: str) -> None:
        self.stats[reason] += 1

    def _scan_sample(self, shard_id, sample, file_size):
        members = sample.members
        if any(m.offset + m.size > file_size for m in members.values()):
            self._skip("truncated_shard")
            return None
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image is None:
            self._skip("missing_image")
            return None
        meta = {}
        json_member = members.get("json")
        if json_member is not None:
            try:
                meta = json.loads(self.reader.read(shard_id, json_member))
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError, EOFError):
                self._skip("bad_json")  # counted, and the sample goes on without its json
                meta, json_member = {}, None
        text = members.get(self.caption_key)
        has_caption = (text is not None and text.size > 0) or bool(meta.get("caption")) or bool(meta.get("captions"))
        if not has_caption:
            self._skip("missing_caption")
            return None
        height, width = meta.get("height"), meta.get("width")
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # (counted below if too large)
                    with Image.open(io.BytesIO(self.reader.read(shard_id, image))) as header:
                        width, height = header.size
            except Image.DecompressionBombError:
                self._skip("too_large")
                return None
            except Exception:  # noqa: BLE001 (PIL raises many types for bad headers)
                self._skip("unreadable_header")
                return None
        if height * width > max_image_pixels():
            self._skip("too_large")
            return None
        return height, width, image, text, json_member

    def load(self, i: int, epoch: int = 0) -> RawSample:
        """The bytes and texts of sample `i`; raises BadSample (never another error) when they cannot be read.
        With several captions (json "captions"), epoch e uses captions[(e + i) % n]."""
        shard = int(self.shard_ids[i])
        try:
            image = self._read("image", shard, i)
            text = self._read("text", shard, i)
            raw_json = self._read("json", shard, i)
        except (EOFError, OSError) as exc:
            raise BadSample("truncated_shard", str(exc)) from exc
        meta = {}
        if raw_json is not None:
            try:
                meta = json.loads(raw_json)
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadSample("bad_json", f"sample {self.keys[i]}: {exc}") from exc
        captions = meta.get("captions") if isinstance(meta.get("captions"), list) else None
        if captions:
            caption = str(captions[(epoch + i) % len(captions)])
        elif text and text.strip():  # a blank .txt leaves the json's caption in charge
            caption = text.decode("utf-8", errors="replace")
        else:
            caption = str(meta.get("caption") or "")
        if not caption.strip():
            raise BadSample("missing_caption", f"sample {self.keys[i]} has an empty caption")
        regions = meta.get("regions") or []
        if not isinstance(regions, list):
            regions = []
        return RawSample(self.keys[i], image, caption, regions, int(self.heights[i]), int(self.widths[i]), meta)

    def _read(self, name: str, shard: int, i: int) -> bytes | None:
        offsets, sizes = self._members[name]
        if offsets[i] < 0:
            return None
        return self.reader.read(shard, shards_mod.Member(int(offsets[i]), int(sizes[i]), self.keys[i]))

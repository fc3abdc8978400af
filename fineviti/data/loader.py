"""The packed loader: shards -> planner -> pixel path -> PackedBatch, one per step for one rank, prefetched.

    loader = PackedLoader(DataConfig(path="data/train"), rank=rank, world_size=world)
    for batch in loader:           # batch: PackedBatch on the CPU (pinned when CUDA is there) or the pixel path's GPU
        step(batch)
        if due: save({"data": loader.state_dict(), ...})
    loader.load_state_dict(saved["data"])   # the next iteration yields exactly the batches that were still to come

State: the planner's global state (seed, epoch, pack, step; see fineviti.data.planner), advanced only by batches
the consumer has consumed. By default a batch counts as consumed when the loader hands it out (the batches
prefetched behind it do not count); with `manual_consume=True` only `mark_consumed()` advances it, for a
trainer that saves between receiving a batch and stepping on it. Prefetch: a background thread
(`num_workers=0`) or DataLoader worker processes (`num_workers>0`, steps dealt round robin, yielded in step
order); `prefetch` batches ahead per worker. Batches are a pure function of (state, step, rank, world size), so
a resumed run's batches are byte-identical to the ones it would have seen, with any number of workers. GPU
decoding (pixel_path nvjpeg, dali on cuda, auto on a GPU machine) runs in the thread: forked workers cannot use
CUDA, so there auto decodes with PIL and the GPU paths are refused (DataConfig.validate).

Static shapes: `pad_to_budget=True` pads patches and pos with zeros to token_budget rows; cu_seqlens and seqlens
still cover only the real tokens, and PackedBatch.padding_tokens says how many rows were added.

Orientation (`exif_orientation`, on by default): a photo stored sideways with an EXIF orientation tag is turned
upright, as PIL's ImageOps.exif_transpose and DALI's and Hugging Face's image loaders turn it, the same way for every
pixel path (fineviti.data.pixels.assemble), its boxes with it. The planner sizes an image by its declared size
(transposing an image keeps its tokens). The json's width/height are the stored pixels' (as the header gives them)
unless they are the stored ones transposed (a tool that wrote the upright size). Boxes (`box_frame`): "stored" (as
tools that show the raw bitmap annotate; they turn with the image), "upright" (as tools that show the photo upright
annotate; kept), or "auto" (the default): upright where the json's size is, else stored. Auto cannot tell for
orientations that keep the size (mirrors, half turns) nor for square images: a data set annotated upright says so.
Off: the stored pixels and boxes as they are, which is what open_clip's and webdataset's decoders give.

Bad data is skipped and counted (`loader.stats`, also in state_dict and `summary()`); a batch's counts are added when
it is consumed, with the state (a batch saved unconsumed and replayed after a resume counts once). A pack whose images
all fail yields a batch with no images (counted as empty_pack) so that every rank still reaches the step (the trainer
then skips it on every rank, fineviti.train.trainer).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fineviti.data.batch import PackedBatch
from fineviti.data.dataset import BadSample, ShardDataset
from fineviti.data.planner import Planner, PlanState
from fineviti.data.sizes import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, DEFAULT_TOKEN_BUDGET, SizeRule
from fineviti.data.tokenizer import CaptionTokenizer

PIXEL_PATHS = ("pil", "dali", "nvjpeg", "auto")
# The DataConfig fields that shape the plan a saved position points into (the samples and their planned lengths,
# the packing): resumed under other values, the position means other packs (PackedLoader._plan_fingerprint)
PLAN_FIELDS = ("path", "token_budget", "patch", "merge", "min_pixels", "max_pixels", "max_aspect", "aspect",
               "window", "cost_block", "seed", "exif_orientation")


@dataclasses.dataclass
class DataConfig:
    path: str = "data/train"  # a folder of .tar shards (or one .tar)
    tokenizer: str | None = None  # tokenizer.json; default: the one in `path` or its parent folder
    token_budget: int = DEFAULT_TOKEN_BUDGET  # patch tokens per pack (per rank and step)
    patch: int = 14
    merge: int = 1
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS  # lowered to token_budget * patch^2 when that is smaller
    max_aspect: float = 8.0
    aspect: str = "clamp"
    window: int = 128  # packer lookahead
    cost_block: int = 64  # packs sorted by attention cost within blocks of this many
    seed: int = 0
    epochs: int | None = None  # None: endless
    pixel_path: str = "pil"  # pil | dali | nvjpeg | auto (nvjpeg or DALI on a GPU, else PIL)
    device: str | None = None  # where GPU paths put pixels (default cuda when available)
    norm: str = "siglip"  # or "clip"
    dtype: str = "float32"  # of the patches
    max_text_tokens: int = 256
    pad_to_budget: bool = False  # static shapes: patches padded to token_budget
    exif_orientation: bool = True  # turn images upright by their EXIF orientation, boxes with them (see below)
    box_frame: str = "auto"  # the frame of the json's boxes for a tagged image: auto | stored | upright (see below)
    num_workers: int = 0
    prefetch: int = 2
    planner_backend: str = "auto"  # cpp | python | auto

    def validate(self, prefix: str = "DataConfig.") -> None:
        """The numeric fields' ranges, each error naming the field (prefix: how the caller spells this config)."""
        import operator

        def integer(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            try:
                ok = not isinstance(value, bool) and operator.index(value) >= low
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"{prefix}{name} must be an integer >= {low}{' or None' if optional else ''}, "
                                 f"got {value!r}")

        for name in ("token_budget", "patch", "merge", "min_pixels", "max_pixels", "window", "cost_block",
                     "max_text_tokens", "prefetch"):
            integer(name, 1)
        integer("seed", 0)  # numpy's generators take no negative seed
        integer("num_workers", 0)
        integer("epochs", 1, optional=True)
        if not (isinstance(self.max_aspect, (int, float)) and self.max_aspect >= 1):
            raise ValueError(f"{prefix}max_aspect must be a number >= 1, got {self.max_aspect!r}")
        from fineviti.data.pixels import BOX_FRAMES, NORMS

        if self.box_frame not in BOX_FRAMES:
            raise ValueError(f"{prefix}box_frame must be one of {list(BOX_FRAMES)}, got {self.box_frame!r}")
        if self.norm not in NORMS:
            raise ValueError(f"{prefix}norm must be one of {sorted(NORMS)}, got {self.norm!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{prefix}dtype must be one of ['bfloat16', 'float16', 'float32'] (the patches'), "
                             f"got {self.dtype!r}")
        if self.max_text_tokens < 2:
            raise ValueError(f"{prefix}max_text_tokens must be >= 2 (<bos> and <eos>), got {self.max_text_tokens}")
        for name, allowed in (("pixel_path", PIXEL_PATHS), ("aspect", ("clamp", "error")),
                              ("planner_backend", ("auto", "cpp", "python"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{prefix}{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        device = "" if self.device is None else str(self.device)  # (nvjpeg's default is cuda, DALI's the CPU)
        on_gpu = (self.pixel_path == "nvjpeg" and not device.startswith("cpu")) or (
            self.pixel_path == "dali" and device.startswith("cuda"))
        if on_gpu and self.num_workers > 0:
            raise ValueError(f"{prefix}pixel_path={self.pixel_path!r} decodes on the GPU, which only the loader's "
                             f"own process can: its {self.num_workers} DataLoader workers are forked processes, "
                             f"where CUDA cannot start. Set {prefix}num_workers=0 (the loader's prefetch thread "
                             f"decodes, on the GPU) or {prefix}pixel_path='pil' (the workers decode on the CPU)")


def _tokenizer_path(cfg: DataConfig) -> Path:
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    root = Path(cfg.path)
    root = root if root.is_dir() else root.parent
    for candidate in (root / "tokenizer.json", root.parent / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"DataConfig: no tokenizer given and no tokenizer.json in {root} or its parent")


def make_pixel_path(name: str, device: str | None = None):
    if name not in PIXEL_PATHS:
        raise ValueError(f"pixel_path must be one of {PIXEL_PATHS}, got {name!r}")
    if name == "auto":
        # a DataLoader worker (a forked process: CUDA cannot start there, though is_available says what the parent
        # saw) decodes on the CPU
        if torch.cuda.is_available() and torch.utils.data.get_worker_info() is None:
            from fineviti.data import dali, nvjpeg

            name = "dali" if dali.available() else "nvjpeg" if nvjpeg.available() else "pil"
            device = device or "cuda"
        else:
            name = "pil"
    if name == "pil":
        from fineviti.data.pixels import PilPath

        return PilPath()
    if name == "dali":
        from fineviti.data.dali import DaliPath

        return DaliPath(device=device)
    from fineviti.data.nvjpeg import NvjpegPath

    return NvjpegPath(device=device or "cuda")


class _Producer:
    """Builds the batch of one step for one rank; picklable (sent to DataLoader workers), opens files lazily."""

    def __init__(self, cfg: DataConfig, dataset: ShardDataset, planner: Planner, targets: np.ndarray,
                 rank: int, world_size: int):
        self.cfg, self.dataset, self.planner, self.targets = cfg, dataset, planner, targets
        self.rank, self.world_size = rank, world_size
        self.tokenizer = CaptionTokenizer(_tokenizer_path(cfg))
        self._pixels = None

    @property
    def pixels(self):
        if self._pixels is None:
            self._pixels = make_pixel_path(self.cfg.pixel_path, self.cfg.device)
        return self._pixels

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pixels"] = None
        return state

    def __call__(self, start: PlanState, step: int) -> tuple[PackedBatch, Counter] | None:
        from fineviti.data.pixels import Orientation, assemble, read_orientation

        packs = self.planner.step_samples(start, step, self.world_size)
        if packs is None:
            return None
        epoch, ids = packs[self.rank]
        ids = ids.tolist()
        counters: Counter = Counter()
        cfg = self.cfg
        samples, images, targets, turns = [], [], [], []
        for i in ids:
            try:
                raw = self.dataset.load(i, epoch)
            except BadSample as bad:
                counters[bad.reason] += 1
                continue
            turn = (read_orientation(raw.image, (raw.height, raw.width), cfg.box_frame) if cfg.exif_orientation
                    else Orientation())
            samples.append(raw)
            images.append(raw.image)
            targets.append(turn.decode_size((int(self.targets[0][i]), int(self.targets[1][i]))))
            turns.append(turn)
        decoded = self.pixels.decode_resize(images, targets) if images else []
        batch = assemble(samples, decoded, patch=cfg.patch, merge=cfg.merge, tokenizer=self.tokenizer,
                         max_text_tokens=cfg.max_text_tokens, norm=cfg.norm, dtype=getattr(torch, cfg.dtype),
                         pad_to=cfg.token_budget if cfg.pad_to_budget else None, counters=counters,
                         orientations=turns)
        if batch.n_images == 0:
            counters["empty_pack"] += 1
        return batch, counters


class _StepStream(torch.utils.data.IterableDataset):
    """DataLoader side: worker w of W yields steps first + w, first + w + W, ... (the DataLoader interleaves the
    workers round robin, so batches come out in step order)."""

    def __init__(self, producer: _Producer, start: PlanState):
        super().__init__()
        self.producer, self.start = producer, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = worker
        while True:
            out = self.producer(self.start, step)
            if out is None:
                return
            yield out
            step += workers


class PackedLoader:
    """Packed batches of one rank; see the module docstring."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, *, manual_consume: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"PackedLoader: rank must be in [0, world_size = {world_size}), got {rank}")
        cfg.validate()
        if cfg.pixel_path not in PIXEL_PATHS:
            raise ValueError(f"PackedLoader: pixel_path must be one of {PIXEL_PATHS}, got {cfg.pixel_path!r}")
        self.cfg, self.rank, self.world_size, self.manual_consume = cfg, rank, world_size, manual_consume
        self.dataset = ShardDataset(cfg.path)
        if len(self.dataset) == 0:
            raise ValueError(f"PackedLoader: no usable samples in {cfg.path} (skipped: {dict(self.dataset.stats)})")
        self.rule = SizeRule.for_budget(cfg.token_budget, patch=cfg.patch, merge=cfg.merge,
                                        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                        max_aspect=cfg.max_aspect, aspect=cfg.aspect)
        heights, widths = self.rule.targets(self.dataset.heights, self.dataset.widths)
        self.targets = np.stack([heights, widths])
        self.lengths = (heights // cfg.patch) * (widths // cfg.patch)
        self.planner = Planner(self.lengths, cfg.token_budget, seed=cfg.seed, window=cfg.window,
                               cost_block=cfg.cost_block, epochs=cfg.epochs, backend=cfg.planner_backend)
        self.state = PlanState(seed=cfg.seed)
        self._fingerprint = self._plan_fingerprint()  # once: a CRC over every sample's length
        self.stats: Counter = Counter(self.dataset.stats)
        self._producer = _Producer(cfg, self.dataset, self.planner, self.targets, rank, world_size)
        self._pending: collections.deque = collections.deque()  # (keys, skip counters) handed out, not consumed
        self._iterator = None

    @property
    def tokenizer(self) -> CaptionTokenizer:
        """The caption tokenizer the batches are encoded with (vocab_size, pad/bos/eos/image ids, decode)."""
        return self._producer.tokenizer

    # -- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The planner's global state, and this rank's skip counters under a key of its own (a JSON string: a key
        per reason would exist only in the run that met it, and a checkpoint loads the keys the fresh state has;
        one key for every rank would keep one rank's counts)."""
        return {"planner": self.state.state_dict(), "world_size": self.world_size, "plan": self._fingerprint,
                f"stats_rank{self.rank}": json.dumps(dict(self.stats), sort_keys=True)}

    def _plan_fingerprint(self) -> str:
        """What the saved position means: the samples' planned lengths (a CRC of them: the data set, the size rule)
        and the packing settings. A position resumed under others points into other packs: samples lost and
        others seen twice, silently."""
        import zlib

        return json.dumps({"samples": int(len(self.lengths)),
                           "lengths_crc32": zlib.crc32(np.ascontiguousarray(self.lengths, dtype=np.int64).tobytes()),
                           "token_budget": self.cfg.token_budget, "window": self.cfg.window,
                           "cost_block": self.cfg.cost_block}, sort_keys=True)

    def load_state_dict(self, state: dict) -> None:
        """The planner's state; this rank's counters where the state has them ("stats", a plain dict, in states saved
        before they were per rank); else (another world size) the counters stay as they are."""
        planned = PlanState.from_state_dict(state["planner"])
        if planned.seed != self.cfg.seed:
            raise ValueError(f"PackedLoader.load_state_dict: the state's seed {planned.seed} differs from "
                             f"DataConfig.seed = {self.cfg.seed}; expected the seed the run started with")
        saved_plan = state.get("plan")
        if saved_plan is not None:  # (the keys both have: a key added later leaves older states loadable)
            saved, now = json.loads(saved_plan), json.loads(self._fingerprint)
            differ = [f"{k}: saved {saved[k]!r}, now {now[k]!r}" for k in sorted(now)
                      if k in saved and saved[k] != now[k]]
        else:
            differ = []
        if differ:
            raise ValueError("PackedLoader.load_state_dict: the saved position belongs to another plan (" +
                             "; ".join(differ) + "); resuming it would lose some samples and repeat others. "
                             "Resume with the data and DataConfig the run started with, or start a new run")
        self.close()
        self.state = planned
        stats = state.get(f"stats_rank{self.rank}")
        if stats is not None:
            self.stats = Counter(json.loads(stats))
        elif "stats" in state:
            self.stats = Counter(state["stats"])

    def mark_consumed(self, batch: PackedBatch | None = None) -> None:
        """The oldest batch handed out and not yet consumed is now consumed (with `batch`, checks it is that one)."""
        if not self._pending:
            raise RuntimeError("PackedLoader.mark_consumed: no batch handed out is waiting to be consumed")
        keys, counters = self._pending[0]
        if batch is not None and list(batch.keys) != keys:
            raise ValueError("PackedLoader.mark_consumed: batches are consumed in the order they are handed out; "
                             f"got one with keys {batch.keys[:3]}..., expected {keys[:3]}...")
        self._pending.popleft()
        self.state = self.planner.consumed(self.state, 1, self.world_size)
        self.stats.update(counters)

    def pending_stats(self) -> Counter:
        """The skip counters of the batches handed out and not consumed yet (they join `stats` when consumed)."""
        total: Counter = Counter()
        for _, counters in self._pending:
            total.update(counters)
        return total

    def steps_left(self) -> int:
        """Steps this loader yields from its state until the stream ends (DataConfig.epochs must be set)."""
        return self.planner.steps_left(self.state, self.world_size)

    def left_out(self) -> int:
        """Samples the stream leaves untrained after its last step (fewer than world_size were left for it)."""
        return self.planner.left_out(self.state, self.world_size)

    def summary(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items())) or "none"
        return (f"data: {len(self.dataset)} samples, epoch {self.state.epoch} pack {self.state.pack}, "
                f"step {self.state.step}; skipped or repaired: {skipped}")

    # -- iteration ---------------------------------------------------------------------------------------------

    def __iter__(self):
        self.close()
        start = dataclasses.replace(self.state)
        self._pending.clear()
        source = self._thread_source(start) if self.cfg.num_workers == 0 else self._worker_source(start)
        self._iterator = source
        try:
            for batch, counters in source:
                self._pending.append((list(batch.keys), counters))
                if not self.manual_consume:
                    self.mark_consumed()
                yield batch
        finally:
            # this iteration's own prefetching only: an older iterator dropped after a newer one started must not
            # stop the newer one's thread (its consumer would then wait for a batch forever)
            source.close()
            if self._iterator is source:
                self._iterator = None

    def _worker_source(self, start: PlanState):
        loader = torch.utils.data.DataLoader(
            _StepStream(self._producer, start), batch_size=None, num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch, pin_memory=torch.cuda.is_available(),
            multiprocessing_context="fork" if os.name == "posix" else None)
        yield from loader

    def _thread_source(self, start: PlanState):
        results: queue.Queue = queue.Queue(maxsize=self.cfg.prefetch)
        stop = threading.Event()
        cuda_out = self.cfg.pixel_path in ("dali", "nvjpeg", "auto") and torch.cuda.is_available()
        pin = torch.cuda.is_available()
        device_index = torch.cuda.current_device() if cuda_out else None  # threads start on device 0

        def put(item) -> None:
            """Waits for room in the queue until the consumer stops (then the item is dropped)."""
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def work():
            if device_index is not None:
                torch.cuda.set_device(device_index)
            stream = torch.cuda.Stream() if cuda_out else None
            step = 0
            try:
                while not stop.is_set():
                    with torch.cuda.stream(stream) if stream is not None else _nullcontext():
                        out = self._producer(start, step)
                        if out is not None and pin:
                            out = (_pin(out[0]), out[1])
                        event = stream.record_event() if stream is not None else None
                    put(("end", None) if out is None else ("batch", (out, event)))
                    if out is None:
                        return
                    step += 1
            except BaseException as exc:  # noqa: BLE001 (handed to the consumer, which re-raises)
                put(("error", exc))  # (a plain put on a full queue blocked forever once the consumer stopped)

        thread = threading.Thread(target=work, name="fineviti-loader", daemon=True)
        self._thread = (thread, stop)
        thread.start()
        try:
            while True:
                kind, payload = results.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise RuntimeError("PackedLoader: the prefetch thread failed") from payload
                (batch, counters), event = payload
                if event is not None:
                    current = torch.cuda.current_stream()
                    current.wait_event(event)
                    for value in vars(batch).values():
                        if isinstance(value, torch.Tensor) and value.is_cuda:
                            value.record_stream(current)
                yield batch, counters
        finally:  # this source's thread, whichever thread self._thread names by now
            stop.set()
            thread.join(timeout=10)
            if self._thread is not None and self._thread[0] is thread:
                self._thread = None

    def _stop(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread[1].set()
            thread[0].join(timeout=10)
            self._thread = None

    def close(self) -> None:
        """Stops prefetching (batches handed out and not consumed are forgotten: the state does not include them)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None
        self._stop()
        self._pending.clear()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _pin(batch: PackedBatch) -> PackedBatch:
    # (patches decoded on the GPU stay there; the small host tensors beside them are pinned all the same: the
    # trainer's non-blocking copy of a pageable one would wait for the GPU)
    return batch.pin_memory()

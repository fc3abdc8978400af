"""What the trainer needs from data: a batch source per rank (the packed loader over shards, or random packed
batches), captions cut to the text-length schedule, and a batch split into chunks of images (GradCache).

A source yields PackedBatch objects, saves and restores its state, and counts a batch as consumed only when the
trainer says so (after the optimizer step), so that a checkpoint holds exactly the batches already trained on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fineviti.data.batch import PackedBatch

# ---------------------------------------------------------------------------------------------------------------
# Random packed batches


class RandomBatches:
    """Random packed batches at a token budget: images of random patch grids (sides multiples of `merge`) with
    random normalised patches, one random caption per image, and for stage 2 one to four random boxes per image
    with random region captions. Step k of rank r depends only on (seed, k, r)."""

    def __init__(self, cfg, *, patch_size: int, merge: int, vocab_size: int, rank: int = 0, world_size: int = 1,
                 with_regions: bool = False):
        self.cfg = cfg
        self.patch_size, self.merge, self.vocab_size = patch_size, merge, vocab_size
        self.rank, self.world_size = rank, world_size
        self.with_regions = with_regions
        self.step = 0  # batches consumed
        self._handed = 0  # batches handed out since the last (re)start

    def state_dict(self) -> dict:
        return {"random_step": self.step, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["random_step"])

    def mark_consumed(self, batch: PackedBatch | None = None) -> None:
        self.step += 1

    def close(self) -> None:
        pass

    def summary(self) -> str:
        return f"random data: step {self.step}"

    def __iter__(self):
        step = self.step
        while True:
            yield self.make(step)
            step += 1

    def make(self, step: int) -> PackedBatch:
        from fineviti.data.positions import build_positions_ref

        cfg = self.cfg
        seed = int(np.random.SeedSequence([cfg.seed, step, self.rank]).generate_state(1, np.uint64)[0] >> 1)
        gen = torch.Generator().manual_seed(seed)
        m = self.merge
        low, high = max(1, cfg.min_side // m), max(1, cfg.max_side // m)
        sides, total = [], 0
        while True:
            h, w = (int(v) * m for v in torch.randint(low, high + 1, (2,), generator=gen))
            if total + h * w > cfg.token_budget:
                if not sides:  # the budget holds no image of the drawn size: take the smallest one that fits
                    h = w = m
                    if h * w > cfg.token_budget:
                        raise ValueError(f"random_data.token_budget = {cfg.token_budget} holds no {m}x{m} image")
                else:
                    break
            sides.append((h, w))
            total += h * w
        grid = torch.tensor(sides, dtype=torch.int32)
        try:
            from fineviti.data.positions import build_positions

            cu, pos = build_positions(grid, m)
        except (ImportError, RuntimeError):  # the compiled extension is missing: the reference is the same
            cu, pos = build_positions_ref(grid, m)
        seqlens = [h * w for h, w in sides]
        patch_dim = 3 * self.patch_size**2
        patches = torch.randn(total, patch_dim, generator=gen)
        n = len(sides)
        text_lens = torch.randint(cfg.min_text, cfg.max_text + 1, (n,), generator=gen).tolist()
        tokens = torch.randint(4, self.vocab_size, (sum(text_lens),), generator=gen)
        batch = PackedBatch(patches=patches, cu_seqlens=cu.to(torch.int32), pos=pos.to(torch.int32),
                            max_seqlen=max(seqlens), seqlens=seqlens, grid_hw=grid, tokens=tokens,
                            text_cu_seqlens=_cumulative(text_lens), text_max_seqlen=max(text_lens),
                            text_seqlens=text_lens, keys=[f"random-{step}-{self.rank}-{i}" for i in range(n)])
        if self.with_regions:
            boxes, owner, region_lens = [], [], []
            for i, (h, w) in enumerate(sides):
                height, width = h * self.patch_size, w * self.patch_size
                for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
                    x = sorted(torch.randint(0, width + 1, (2,), generator=gen).tolist())
                    y = sorted(torch.randint(0, height + 1, (2,), generator=gen).tolist())
                    boxes.append([x[0], y[0], max(x[1], x[0] + 1), max(y[1], y[0] + 1)])
                    owner.append(i)
                    region_lens.append(int(torch.randint(4, 17, (1,), generator=gen)))
            batch.boxes = torch.tensor(boxes, dtype=torch.float32) / self.patch_size  # patch-grid coordinates
            batch.box_image = torch.tensor(owner, dtype=torch.int64)
            batch.region_tokens = torch.randint(4, self.vocab_size, (sum(region_lens),), generator=gen)
            batch.region_cu_seqlens = _cumulative(region_lens)
        return batch


def _cumulative(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return out


class LoaderSource:
    """The packed loader over shards (fineviti.data.loader.PackedLoader), consumed only on the trainer's word."""

    def __init__(self, data_cfg, rank: int, world_size: int):
        from fineviti.data.loader import PackedLoader

        self.loader = PackedLoader(data_cfg, rank=rank, world_size=world_size, manual_consume=True)
        self.tokenizer = self.loader.tokenizer

    def __iter__(self):
        return iter(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def mark_consumed(self, batch: PackedBatch | None = None) -> None:
        self.loader.mark_consumed(batch)

    def close(self) -> None:
        self.loader.close()

    def summary(self) -> str:
        return self.loader.summary()

    def steps_left(self) -> int:
        return self.loader.steps_left()

    def left_out(self) -> int:
        return self.loader.left_out()

    def skipped(self) -> int:
        """This rank's share of the skipped or repaired samples so far (and empty packs), all reasons, such that
        the sum over the ranks counts each once: the samples its loads met, and on rank 0 also those the scan of
        the data set dropped (every rank scans the whole set and starts from those counts)."""
        scanned = sum(self.loader.dataset.stats.values())
        # (with the batches handed out and not consumed yet: the step being taken's own skips, which join the stats
        # when it is marked consumed, after its row)
        pending = sum(self.loader.pending_stats().values())
        return int(sum(self.loader.stats.values()) + pending - scanned + (scanned if self.loader.rank == 0 else 0))


# ---------------------------------------------------------------------------------------------------------------
# Captions cut to the schedule


def truncate_captions(batch: PackedBatch, max_tokens: int) -> PackedBatch:
    """A copy of `batch` whose captions hold at most `max_tokens` tokens: the first max_tokens - 1 and the last
    one (the <eos> of the data path's tokenizer). The cut tokens add to `truncated_tokens`."""
    if max_tokens < 2:
        raise ValueError(f"truncate_captions: max_tokens must be >= 2, got {max_tokens}")
    lengths = batch.text_seqlens
    if not lengths or max(lengths) <= max_tokens:
        return batch
    keep = []
    starts = batch.text_cu_seqlens.tolist()
    for start, length in zip(starts, lengths, strict=False):
        if length <= max_tokens:
            keep.append(torch.arange(start, start + length))
        else:
            keep.append(torch.cat([torch.arange(start, start + max_tokens - 1), torch.tensor([start + length - 1])]))
    index = torch.cat(keep).to(batch.tokens.device)
    new_lengths = [min(n, max_tokens) for n in lengths]
    cut = sum(lengths) - sum(new_lengths)
    return dataclasses.replace(batch, tokens=batch.tokens[index],
                               text_cu_seqlens=_cumulative(new_lengths).to(batch.text_cu_seqlens.device),
                               text_max_seqlen=max(new_lengths), text_seqlens=new_lengths,
                               truncated_tokens=batch.truncated_tokens + cut)


# ---------------------------------------------------------------------------------------------------------------
# Chunks of images (GradCache)


def take_images(batch: PackedBatch, first: int, last: int) -> tuple[PackedBatch, list[int]]:
    """Images first..last-1 of `batch` with their captions (text_image renumbered from 0), and the indices of
    those captions in `batch`."""
    cu = batch.cu_seqlens.tolist()
    tcu = batch.text_cu_seqlens.tolist()
    text_image = batch.text_image.tolist() if batch.text_image is not None else None
    texts = list(range(first, last)) if text_image is None else [j for j, i in enumerate(text_image)
                                                                  if first <= i < last]
    lo, hi = cu[first], cu[last]
    text_lens = [batch.text_seqlens[j] for j in texts]
    token_index = [t for j in texts for t in range(tcu[j], tcu[j + 1])]
    seqlens = batch.seqlens[first:last]
    chunk = PackedBatch(
        patches=batch.patches[lo:hi], cu_seqlens=(batch.cu_seqlens[first:last + 1] - lo),
        pos=batch.pos[lo:hi], max_seqlen=max(seqlens, default=0), seqlens=seqlens, grid_hw=batch.grid_hw[first:last],
        tokens=batch.tokens[torch.tensor(token_index, dtype=torch.long, device=batch.tokens.device)],
        text_cu_seqlens=_cumulative(text_lens).to(batch.text_cu_seqlens.device),
        text_max_seqlen=max(text_lens, default=0), text_seqlens=text_lens,
        text_image=(None if text_image is None else
                    torch.tensor([text_image[j] - first for j in texts], dtype=torch.int64,
                                 device=batch.text_image.device)),
        keys=batch.keys[first:last])
    return chunk, texts


def split_images(batch: PackedBatch, n_chunks: int) -> tuple[list[PackedBatch], int, torch.Tensor | None]:
    """The batch cut into `n_chunks` chunks of consecutive images (sizes differing by at most one), each with its
    own captions. When the batch has fewer images than chunks, the missing chunks repeat its first image: they are
    fillers (every rank must run as many forwards under FSDP2) whose gradients the caller zeroes.

    Returns the chunks, how many of them are real (the fillers come last) and, when the batch maps captions to
    images (`text_image`), the caption order of the concatenated real chunks as indices into the batch's
    captions (None otherwise: captions follow their images)."""
    n = batch.n_images
    if n == 0 or n_chunks < 1:
        raise ValueError(f"split_images needs a batch with images and n_chunks >= 1, got {n} images and n_chunks "
                         f"{n_chunks} (the trainer skips a step where a rank has no image)")
    real = min(n, n_chunks)
    bounds = [round(k * n / real) for k in range(real + 1)]
    chunks, order = [], []
    for first, last in zip(bounds[:-1], bounds[1:], strict=True):
        chunk, texts = take_images(batch, first, last)
        chunks.append(chunk)
        order += texts
    chunks += [take_images(batch, 0, 1)[0] for _ in range(n_chunks - real)]
    return chunks, real, (None if batch.text_image is None else torch.tensor(order, dtype=torch.long))

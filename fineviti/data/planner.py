"""The global planner: a seeded order per epoch, packs of at most `budget` patch tokens, and the dealing of packs to
ranks and loader workers. All integers, no pixels; its state is what a checkpoint saves.

Plan of epoch e (independent of the number of ranks and workers):
1. order: a permutation of the samples from numpy's Generator seeded with (seed, e);
2. packing: windowed first-fit over that order (`plan_packs`: C++ op `torch.ops.fineviti.plan_packs`, Python
   reference `plan_packs_ref`, identical results): a buffer of the next `window` pending samples; each pack takes,
   in buffer order, every sample that still fits, and each sample taken lets the next one of the stream into the
   buffer (scanned by the same pack); skipped samples wait (at most `window` packs) for a later one;
3. balance: within each block of `cost_block` consecutive packs, packs are sorted by attention cost
   sum(L_i^2) (descending), then tokens (descending), then position (stable), so that neighbouring packs cost
   about the same.

The stream is the packs of epoch 0, then those of epoch 1, and so on. Dealing for R ranks: global step k takes the
next R packs of the stream, rank r gets the r-th; after step 3 they have about the same cost whatever R is, and
every rank runs the same number of steps. Loader workers of a rank take its steps round robin (worker w: steps
k = w mod W) and the loader yields them in step order. A step whose R packs straddle an epoch boundary takes the
last packs of one epoch and the first of the next: no sample is dropped or repeated within an epoch (the remainder
of an epoch is deferred to the next step, not dropped). A stream limited to a number of epochs ends with fewer than
R packs left, in general: its last step splits them (`split_tail`) into R smaller packs, one a rank, so that every
sample is trained; only when fewer than R samples are left (a rank would have none) are they left out.

State (`PlanState`): seed, epoch, pack (packs of that epoch consumed) and step (global batches consumed).
Consumed means taken by the optimizer (see the loader's mark_consumed), not produced by a prefetching loader.
Resuming from (epoch, pack) with any number of ranks continues the same stream at the same pack, so every sample
is seen exactly once per epoch across a change of world size; only the grouping of later packs into steps changes.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

import numpy as np
import torch

from fineviti import _ext


def _check(lengths: np.ndarray, budget: int, window: int) -> None:
    if budget < 1:
        raise ValueError(f"plan_packs: budget must be >= 1, got {budget}")
    if window < 1:
        raise ValueError(f"plan_packs: window must be >= 1, got {window}")
    if lengths.ndim != 1:
        raise ValueError(f"plan_packs: lengths must be 1-D, got shape {list(lengths.shape)}")
    bad = np.flatnonzero((lengths < 1) | (lengths > budget))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"plan_packs: lengths[{i}] = {int(lengths[i])} is outside [1, budget = {budget}]; every "
                         "sample must fit one pack")


def plan_packs_ref(lengths, budget: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Python reference of `plan_packs`: (pack_offsets int64 (n_packs + 1,), order int64 (n,))."""
    lengths = np.asarray(lengths, dtype=np.int64)
    _check(lengths, budget, window)
    values = lengths.tolist()
    n = len(values)
    shortest = min(values, default=1)  # below it nothing fits: a pack stops scanning (the C++ op does the same)
    order: list[int] = []
    offsets = [0]
    buffer: list[int] = []
    next_in = 0
    while len(buffer) < window and next_in < n:
        buffer.append(next_in)
        next_in += 1
    while buffer:
        room = budget
        kept = []
        k = 0
        while k < len(buffer) and room >= shortest:  # grows while scanned: each sample placed lets the next one in
            sample = buffer[k]
            k += 1
            if values[sample] <= room:
                order.append(sample)
                room -= values[sample]
                if next_in < n:
                    buffer.append(next_in)
                    next_in += 1
            else:
                kept.append(sample)
        buffer = kept + buffer[k:]
        offsets.append(len(order))
    return np.asarray(offsets, dtype=np.int64), np.asarray(order, dtype=np.int64)


def plan_packs(lengths, budget: int, window: int, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Windowed first-fit packing. lengths: (n,) ints in [1, budget]. Returns numpy int64 (pack_offsets, order):
    pack j holds samples order[pack_offsets[j]:pack_offsets[j + 1]] (indices into `lengths`).
    backend: "cpp" (the C++ op), "python" (the reference) or "auto" (C++ when the extension is built)."""
    if backend not in ("auto", "cpp", "python"):
        raise ValueError(f"plan_packs: backend must be 'auto', 'cpp' or 'python', got {backend!r}")
    if backend == "python" or (backend == "auto" and not _ext.load(required=False)):
        return plan_packs_ref(lengths, budget, window)
    _ext.load(required=True)
    tensor = torch.as_tensor(np.ascontiguousarray(lengths, dtype=np.int64))
    offsets, order = torch.ops.fineviti.plan_packs(tensor, int(budget), int(window))
    return offsets.numpy(), order.numpy()


def balance_packs(order: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                  block: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorts the packs within each block of `block` packs by attention cost sum(L^2), then tokens, descending
    (stable), so that any R consecutive packs cost about the same. Returns the new (order, offsets)."""
    n_packs = len(offsets) - 1
    if n_packs == 0 or block <= 1:
        return order, offsets
    sizes = np.diff(offsets)
    taken = lengths[order]
    starts = offsets[:-1]
    tokens = np.add.reduceat(taken, starts) if len(taken) else np.zeros(0, np.int64)
    cost = np.add.reduceat(taken.astype(np.float64) ** 2, starts)
    block_id = np.arange(n_packs) // block
    new = np.lexsort((np.arange(n_packs), -tokens, -cost, block_id))
    new_offsets = np.zeros(n_packs + 1, dtype=np.int64)
    np.cumsum(sizes[new], out=new_offsets[1:])
    gather = np.repeat(offsets[new] - new_offsets[:-1], sizes[new]) + np.arange(len(order))
    return order[gather], new_offsets


def split_tail(packs: list[tuple[int, np.ndarray]], lengths: np.ndarray,
               parts: int) -> list[tuple[int, np.ndarray]] | None:
    """`packs` ((epoch, sample ids), fewer than `parts`) split into `parts` packs, or None when they hold fewer
    than `parts` samples. Splitting never merges, so every pack stays within the budget and one epoch: while there
    are fewer than `parts`, the costliest pack (sum(L^2); of those with two samples or more) is cut in two of about
    equal cost (its samples longest first, each to the lighter half; each half keeps the pack's order). The result
    is sorted by cost, tokens, then position, descending, as `balance_packs` sorts."""
    if sum(len(ids) for _, ids in packs) < parts:
        return None
    out = [(int(epoch), np.asarray(ids, dtype=np.int64)) for epoch, ids in packs]

    def cost(ids: np.ndarray) -> float:
        return float((lengths[ids].astype(np.float64) ** 2).sum())

    costs = [cost(ids) for _, ids in out]
    while len(out) < parts:
        j = max((i for i in range(len(out)) if len(out[i][1]) > 1), key=lambda i: (costs[i], -i))
        epoch, ids = out[j]
        halves, weight = ([], []), [0.0, 0.0]
        for k in sorted(range(len(ids)), key=lambda k: (-int(lengths[ids[k]]), k)):
            side = int(weight[1] < weight[0])
            halves[side].append(k)
            weight[side] += float(lengths[ids[k]]) ** 2
        out[j:j + 1] = [(epoch, ids[np.sort(np.asarray(h, dtype=np.int64))]) for h in halves]
        costs[j:j + 1] = [cost(out[j][1]), cost(out[j + 1][1])]
    keys = sorted(range(parts), key=lambda i: (-costs[i], -int(lengths[out[i][1]].sum()), i))
    return [out[i] for i in keys]


@dataclasses.dataclass
class EpochPlan:
    epoch: int
    order: np.ndarray  # int64 sample ids, pack after pack
    offsets: np.ndarray  # int64 (n_packs + 1,)

    @property
    def n_packs(self) -> int:
        return len(self.offsets) - 1

    def pack(self, j: int) -> np.ndarray:
        return self.order[self.offsets[j]:self.offsets[j + 1]]


@dataclasses.dataclass
class PlanState:
    """The planner's global state: what a checkpoint saves (identical on every rank)."""

    seed: int
    epoch: int = 0
    pack: int = 0  # packs of `epoch` consumed
    step: int = 0  # global batches consumed since the start of training

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> PlanState:
        return cls(**{f.name: int(state[f.name]) for f in dataclasses.fields(cls)})


class Planner:
    """Plans epochs of `lengths` (patch tokens per sample) into packs of at most `budget` tokens; deals them.

    epochs: None for an endless stream, else the number of epochs after which the stream ends."""

    def __init__(self, lengths, budget: int, *, seed: int = 0, window: int = 128, cost_block: int = 64,
                 epochs: int | None = None, backend: str = "auto"):
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        if self.lengths.size == 0:
            raise ValueError("Planner: no samples to plan (lengths is empty)")
        _check(self.lengths, budget, window)
        if cost_block < 1:
            raise ValueError(f"Planner: cost_block must be >= 1, got {cost_block}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"Planner: epochs must be None or >= 1, got {epochs}")
        self.budget, self.seed, self.window, self.cost_block = int(budget), int(seed), int(window), int(cost_block)
        self.epochs, self.backend = epochs, backend
        self._cache: OrderedDict[int, EpochPlan] = OrderedDict()
        self._n_packs: dict[int, int] = {}  # every epoch planned so far: its pack count (advance() walks them)
        self._lock = threading.Lock()  # the loader's prefetch thread and its consumer both read plans

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]
        state["_cache"] = OrderedDict()
        state["_n_packs"] = dict(self._n_packs)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _packing(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Steps 1 and 2 of `epoch`'s plan: (its order, pack_offsets, positions in that order)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
        offsets, positions = plan_packs(self.lengths[perm], self.budget, self.window, self.backend)
        return perm, offsets, positions

    def n_packs(self, epoch: int) -> int:
        """The number of packs of `epoch`, without planning it whole: the balancing (step 3, more than half of a
        plan's time at 10M samples) reorders packs but keeps their number."""
        with self._lock:
            known = self._n_packs.get(epoch)
            if known is None:
                known = self._n_packs[epoch] = len(self._packing(epoch)[1]) - 1
            return known

    def epoch(self, epoch: int) -> EpochPlan:
        """The plan of `epoch` (the last two are cached)."""
        with self._lock:
            plan = self._cache.get(epoch)
            if plan is None:
                perm, offsets, positions = self._packing(epoch)
                order, offsets = balance_packs(perm[positions], offsets, self.lengths, self.cost_block)
                plan = self._cache[epoch] = EpochPlan(epoch, order, offsets)
                self._n_packs[epoch] = plan.n_packs
                while len(self._cache) > 2:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(epoch)
            return plan

    def advance(self, epoch: int, pack: int, count: int) -> tuple[int, int] | None:
        """The stream position `count` packs after (epoch, pack), or None when it lies past the last epoch. Walks
        the epochs in between by their pack counts, kept for every epoch planned (the plans themselves: the last
        two), so that a loader counting steps from the start of a run does not plan every past epoch again at
        every step."""
        pack += count
        while True:
            if self.epochs is not None and epoch >= self.epochs:
                return None
            n_packs = self._n_packs.get(epoch)
            if n_packs is None:
                n_packs = self.epoch(epoch).n_packs
            if pack < n_packs:
                return epoch, pack
            pack -= n_packs
            epoch += 1

    def step_packs(self, state: PlanState, step: int, world_size: int) -> list[tuple[int, int]] | None:
        """Stream positions of the `world_size` packs of the `step`-th global step after `state` (rank r gets the
        r-th), or None when the stream ends before the step is complete."""
        if world_size < 1:
            raise ValueError(f"Planner.step_packs: world_size must be >= 1, got {world_size}")
        first = self.advance(state.epoch, state.pack, step * world_size)
        if first is None:
            return None
        positions = [first]
        for _ in range(world_size - 1):
            following = self.advance(*positions[-1], 1)
            if following is None:
                return None
            positions.append(following)
        return positions

    def step_samples(self, state: PlanState, step: int, world_size: int) -> list[tuple[int, np.ndarray]] | None:
        """(epoch, sample ids) of each rank's pack at the `step`-th global step after `state` (rank r gets the r-th),
        or None past the end of the stream. The packs of `step_packs`, except at the last step of a stream limited
        to a number of epochs, which finds fewer than `world_size` packs left: those are split into `world_size`
        (`split_tail`), or, with fewer samples than ranks left, the stream ends there (None)."""
        positions = self.step_packs(state, step, world_size)
        if positions is not None:
            return [(epoch, self.pack_samples(epoch, pack)) for epoch, pack in positions]
        left = self._packs_from(state, step * world_size, world_size)
        if not left:
            return None
        return split_tail([(epoch, self.pack_samples(epoch, pack)) for epoch, pack in left], self.lengths,
                          world_size)

    def _packs_from(self, state: PlanState, skip: int, limit: int) -> list[tuple[int, int]]:
        """Stream positions of at most `limit` packs, from `skip` packs after `state`."""
        positions = []
        position = self.advance(state.epoch, state.pack, skip)
        while position is not None and len(positions) < limit:
            positions.append(position)
            position = self.advance(*position, 1)
        return positions

    def steps_left(self, state: PlanState, world_size: int) -> int:
        """Global steps of `world_size` packs after `state` until the stream ends, its split last step included
        (packs every epoch not counted yet, without balancing it: `n_packs`). Needs a stream limited to a number of
        epochs."""
        if self.epochs is None:
            raise ValueError("Planner.steps_left: the stream is endless (epochs=None); expected a number of epochs")
        if world_size < 1:
            raise ValueError(f"Planner.steps_left: world_size must be >= 1, got {world_size}")
        packs = -state.pack + sum(self.n_packs(epoch) for epoch in range(state.epoch, self.epochs))
        if packs <= 0:
            return 0
        full, rest = divmod(packs, world_size)
        return full + int(rest > 0 and self.step_samples(state, full, world_size) is not None)

    def left_out(self, state: PlanState, world_size: int) -> int:
        """Samples a stream limited to a number of epochs leaves untrained after `state`: those of a last step
        with fewer samples than ranks (0 for an endless stream)."""
        if self.epochs is None:
            return 0
        full = self.steps_left(state, world_size)
        left = self._packs_from(state, full * world_size, world_size)
        return int(sum(len(self.pack_samples(epoch, pack)) for epoch, pack in left))

    def consumed(self, state: PlanState, steps: int, world_size: int) -> PlanState:
        """The state after the next `steps` global steps of `world_size` packs are consumed."""
        position = self.advance(state.epoch, state.pack, steps * world_size)
        if position is None:  # the stream ended: park past the last epoch
            position = (self.epochs, 0)
        return PlanState(state.seed, position[0], position[1], state.step + steps)

    def pack_samples(self, epoch: int, pack: int) -> np.ndarray:
        return self.epoch(epoch).pack(pack)

"""The planner: windowed first-fit packing (C++ op against the Python reference), epoch plans, dealing, resume."""

import numpy as np
import pytest

from fineviti import _ext
from fineviti.data.planner import Planner, PlanState, balance_packs, plan_packs, plan_packs_ref

needs_ext = pytest.mark.skipif(not _ext.load(required=False), reason="fineviti._C is not built")


def check_packs(lengths, budget, offsets, order):
    assert offsets[0] == 0 and offsets[-1] == len(lengths) and (np.diff(offsets) > 0).all()
    assert sorted(order.tolist()) == list(range(len(lengths)))  # every sample exactly once
    tokens = np.add.reduceat(lengths[order], offsets[:-1]) if len(order) else np.zeros(0)
    assert (tokens <= budget).all()


def test_reference_on_a_hand_example():
    offsets, order = plan_packs_ref([5, 3, 8, 2, 7, 1, 4], budget=10, window=3)
    # buffer [5, 3, 8]: takes 5 (2 comes in), 3 (7 comes in), skips 8, takes 2: full. [8, 7, 1]: takes 8 (4 comes
    # in), skips 7, takes 1, skips 4. [7, 4]: takes 7. [4].
    assert offsets.tolist() == [0, 3, 5, 6, 7] and order.tolist() == [0, 1, 3, 2, 5, 4, 6]
    offsets, order = plan_packs_ref([6, 6, 3, 1], budget=10, window=4)
    assert offsets.tolist() == [0, 3, 4] and order.tolist() == [0, 2, 3, 1]


@needs_ext
@pytest.mark.parametrize("n", [0, 1, 7, 300, 5000])
@pytest.mark.parametrize("budget, window", [(64, 1), (64, 8), (256, 64), (1000, 10000)])
def test_cpp_equals_python(n, budget, window):
    rng = np.random.default_rng(n + budget + window)
    lengths = np.minimum(budget, rng.integers(1, budget + 1, n) // rng.integers(1, 6, n) + 1)
    lengths[:: max(1, n // 5)] = budget  # some full packs
    for dtype in (np.int64, np.int32):
        cpp = plan_packs(lengths.astype(dtype), budget, window, backend="cpp")
        ref = plan_packs(lengths.astype(dtype), budget, window, backend="python")
        assert cpp[0].dtype == cpp[1].dtype == np.int64
        np.testing.assert_array_equal(cpp[0], ref[0])
        np.testing.assert_array_equal(cpp[1], ref[1])
    check_packs(lengths, budget, *ref)


def test_no_sample_waits_longer_than_the_window():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 3000)
    window = 16
    offsets, order = plan_packs(lengths, 256, window)
    pack_of = np.empty(len(lengths), dtype=np.int64)
    pack_of[order] = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    # every pack places at least one sample, so sample i is in the buffer by pack max(0, i - window + 1); every pack
    # takes the buffer's oldest sample, so fewer than `window` packs later it is placed
    assert (pack_of <= np.arange(len(lengths)) + window).all()


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_ext)])
def test_bad_arguments(backend):
    with pytest.raises(ValueError, match=r"lengths\[1\] = 11 is outside \[1, budget = 10\]"):
        plan_packs(np.array([3, 11]), 10, 4, backend=backend)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 0"):
        plan_packs(np.array([0]), 10, 4, backend=backend)
    with pytest.raises(ValueError, match="window must be >= 1"):
        plan_packs(np.array([1]), 10, 0, backend=backend)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        plan_packs(np.array([1]), 0, 1, backend=backend)


def test_balance_keeps_packs_and_sorts_blocks_by_cost():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 500, 2000)
    offsets, order = plan_packs(lengths, 1024, 32)
    new_order, new_offsets = balance_packs(order, offsets, lengths, block=8)
    before = sorted(tuple(sorted(order[a:b].tolist())) for a, b in zip(offsets[:-1], offsets[1:], strict=True))
    after = [tuple(sorted(new_order[a:b].tolist())) for a, b in zip(new_offsets[:-1], new_offsets[1:], strict=True)]
    assert sorted(after) == before
    cost = [float((lengths[new_order[a:b]].astype(float) ** 2).sum())
            for a, b in zip(new_offsets[:-1], new_offsets[1:], strict=True)]
    for start in range(0, len(cost), 8):
        block = cost[start:start + 8]
        assert block == sorted(block, reverse=True)


def test_epoch_plans_are_seeded_and_differ_by_epoch():
    lengths = np.random.default_rng(2).integers(1, 300, 500)
    a, b = Planner(lengths, 512, seed=5), Planner(lengths, 512, seed=5)
    np.testing.assert_array_equal(a.epoch(0).order, b.epoch(0).order)
    np.testing.assert_array_equal(a.epoch(3).offsets, b.epoch(3).offsets)
    assert not np.array_equal(a.epoch(0).order, a.epoch(1).order)
    assert not np.array_equal(a.epoch(0).order, Planner(lengths, 512, seed=6).epoch(0).order)
    for e in range(3):
        check_packs(lengths, 512, a.epoch(e).offsets, a.epoch(e).order)


def run_steps(planner, state, world, steps=None):
    """Packs (sample id arrays) per step and rank from `state` on, until the stream ends or `steps` are taken."""
    out, k = [], 0
    while steps is None or k < steps:
        packs = planner.step_samples(state, k, world)
        if packs is None:
            break
        out.append([ids for _, ids in packs])
        k += 1
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_ranks_get_equal_steps_and_disjoint_samples(world):
    lengths = np.random.default_rng(3).integers(1, 300, 701)
    planner = Planner(lengths, 600, seed=1, epochs=1, cost_block=16)
    steps = run_steps(planner, PlanState(seed=1), world)
    n_packs = planner.epoch(0).n_packs
    assert n_packs % world or world == 1  # (the case under test: packs left for a last, split step)
    assert len(steps) == -(-n_packs // world) == planner.steps_left(PlanState(seed=1), world)
    assert all(len(s) == world and all(len(p) for p in s) for s in steps)  # every rank has samples at every step
    seen = np.concatenate([p for s in steps for p in s])
    assert sorted(seen.tolist()) == list(range(len(lengths)))  # every sample once, the last packs' included
    assert all(lengths[p].sum() <= 600 for s in steps for p in s)
    assert planner.left_out(PlanState(seed=1), world) == 0
    for step in steps[:-1]:  # the steps before the last are the plan's packs, in order
        assert all(any(np.array_equal(p, planner.pack_samples(0, j)) for j in range(n_packs)) for p in step)
    # the same stream and dealing from a fresh planner: deterministic
    again = run_steps(Planner(lengths, 600, seed=1, epochs=1, cost_block=16), PlanState(seed=1), world)
    assert all(np.array_equal(x, y) for s, t in zip(steps, again, strict=True) for x, y in zip(s, t, strict=True))


def test_endless_stream_defers_the_remainder_to_the_next_epoch():
    lengths = np.random.default_rng(4).integers(1, 300, 401)
    planner = Planner(lengths, 600, seed=2)
    n0 = planner.epoch(0).n_packs
    world = 3 if n0 % 3 else 4  # a world size that does not divide the epoch
    steps = run_steps(planner, PlanState(seed=2), world, steps=n0 // world + 2)
    stream = [p for s in steps for p in s]
    epoch0 = np.concatenate(stream[:n0])
    assert sorted(epoch0.tolist()) == list(range(len(lengths)))
    assert np.array_equal(stream[n0], planner.pack_samples(1, 0))  # the step straddling the boundary


@pytest.mark.parametrize("consumed", [0, 3, 7])
def test_resume_on_two_ranks_from_one_keeps_every_sample_once(consumed):
    lengths = np.random.default_rng(5).integers(1, 300, 333)
    planner = Planner(lengths, 600, seed=3)
    state = PlanState(seed=3)
    first = run_steps(planner, state, 1, steps=consumed)
    state = planner.consumed(state, consumed, 1)
    assert (state.epoch, state.pack, state.step) == (0, consumed, consumed)
    resumed = Planner(lengths, 600, seed=3)  # a new process: only the state carries over
    n0 = resumed.epoch(0).n_packs
    rest = run_steps(resumed, PlanState.from_state_dict(state.state_dict()), 2, steps=(n0 - consumed + 1) // 2)
    stream = [p for s in first for p in s] + [p for s in rest for p in s]
    assert sorted(np.concatenate(stream[:n0]).tolist()) == list(range(len(lengths)))
    after = resumed.consumed(state, len(rest), 2)
    assert after.step == consumed + len(rest)
    assert (after.epoch, after.pack) == divmod_stream(n0, consumed + 2 * len(rest))


def divmod_stream(n0, packs):
    return (0, packs) if packs < n0 else (1, packs - n0)


def test_cost_balance_evens_out_the_ranks():
    rng = np.random.default_rng(6)
    lengths = np.where(rng.random(4000) < 0.2, rng.integers(1500, 4000, 4000), rng.integers(16, 400, 4000))

    def imbalance(cost_block):
        planner = Planner(lengths, 8192, seed=0, epochs=1, cost_block=cost_block)
        ratios = []
        for step in run_steps(planner, PlanState(seed=0), 4):
            costs = [float((lengths[p].astype(float) ** 2).sum()) for p in step]
            ratios.append(max(costs) / np.mean(costs))
        return float(np.mean(ratios))

    assert imbalance(64) < imbalance(1) - 0.05


def test_advancing_over_past_epochs_does_not_plan_them_again(monkeypatch):
    """A loader counts its steps from where it started: advance() walks every epoch since then. With only the plans
    of the last two epochs kept, from the third epoch on every step planned each past epoch again (3 s each at 10M
    samples); their pack counts are now kept."""
    import fineviti.data.planner as planner_mod

    calls = []
    plan = planner_mod.plan_packs
    monkeypatch.setattr(planner_mod, "plan_packs", lambda *a: calls.append(1) or plan(*a))
    p = Planner(np.random.default_rng(0).integers(1, 100, size=200), 400, seed=1)
    state = PlanState(1, 0, 0, 0)
    n0 = p.epoch(0).n_packs
    for step in range(6 * n0):
        assert p.step_packs(state, step, 1) is not None
    assert len(calls) == len(p._n_packs) >= 5  # each epoch reached planned once
    before = len(calls)
    for step in range(6 * n0 - 5, 6 * n0):
        p.step_packs(state, step, 1)
    assert len(calls) == before


def test_steps_left_counts_packs_without_balancing(monkeypatch):
    """Counting the steps of a run of several epochs packs each epoch once and balances none (the balancing keeps
    the number of packs); the counts equal the full plans'."""
    from fineviti.data import planner as planner_mod

    balanced = []
    balance = planner_mod.balance_packs
    monkeypatch.setattr(planner_mod, "balance_packs", lambda *a: balanced.append(1) or balance(*a))
    p = Planner(np.random.default_rng(3).integers(1, 100, size=300), 400, seed=2, epochs=4, cost_block=4)
    steps = p.steps_left(PlanState(2), 3)
    assert steps > 0 and len(balanced) <= 1  # (the last epoch's, planned whole for a split last step)
    full = Planner(p.lengths, 400, seed=2, epochs=4, cost_block=4)
    assert [p.n_packs(e) for e in range(4)] == [full.epoch(e).n_packs for e in range(4)]
    assert steps == full.steps_left(PlanState(2), 3)


def test_split_tail_cuts_the_costliest_packs_within_the_budget():
    from fineviti.data.planner import split_tail

    lengths = np.array([500, 10, 20, 30, 400, 5, 90, 7])
    packs = [(2, np.array([0, 1, 2, 3])), (2, np.array([4, 5, 6, 7]))]
    out = split_tail(packs, lengths, 4)
    assert len(out) == 4 and all(e == 2 for e, _ in out)
    assert sorted(np.concatenate([ids for _, ids in out]).tolist()) == list(range(8))
    # each piece lies within one of the packs, in that pack's order
    assert all(any(set(ids) <= set(p) for _, p in packs) and list(ids) == sorted(ids) for _, ids in out)
    costs = [float((lengths[ids].astype(float) ** 2).sum()) for _, ids in out]
    assert costs == sorted(costs, reverse=True)
    assert list(out[0][1]) == [0] and list(out[1][1]) == [4]  # the 500 and the 400 alone: the cut goes by cost
    assert split_tail(packs, lengths, 9) is None  # fewer samples than parts
    assert [list(ids) for _, ids in split_tail([(0, np.array([3, 1]))], lengths, 2)] == [[3], [1]]


def test_the_last_step_spans_two_epochs_and_leaves_out_fewer_samples_than_ranks():
    """Packs left from two epochs (an epoch of fewer packs than ranks) keep their epochs; a tail with fewer
    samples than ranks is left out, and counted."""
    lengths = np.array([300, 300, 300, 200, 100])
    planner = Planner(lengths, 600, seed=0, epochs=2, window=8)
    n_packs = planner.epoch(0).n_packs + planner.epoch(1).n_packs
    world = n_packs + 1  # so the only step is a split one, of packs of both epochs
    packs = planner.step_samples(PlanState(seed=0), 0, world)
    assert packs is not None and len(packs) == world and {e for e, _ in packs} == {0, 1}
    assert sorted(np.concatenate([ids for e, ids in packs if e == 1]).tolist()) == list(range(len(lengths)))
    assert planner.steps_left(PlanState(seed=0), world) == 1
    for more in (len(lengths) * 2 + 1, 64):  # more ranks than the two epochs have samples
        assert planner.step_samples(PlanState(seed=0), 0, more) is None
        assert planner.steps_left(PlanState(seed=0), more) == 0
        assert planner.left_out(PlanState(seed=0), more) == 2 * len(lengths)
    state = planner.consumed(PlanState(seed=0), 1, world)
    assert (state.epoch, state.step) == (2, 1)  # the split step consumes the rest of the stream
    assert planner.steps_left(state, 3) == 0 and planner.left_out(state, 3) == 0
    with pytest.raises(ValueError, match="endless"):
        Planner(lengths, 600).steps_left(PlanState(seed=0), 2)


@pytest.mark.parametrize("world", [2, 5])
def test_steps_left_counts_the_rest_of_the_stream_after_a_resume(world):
    lengths = np.random.default_rng(8).integers(1, 300, 257)
    planner = Planner(lengths, 600, seed=4, epochs=3)
    state = PlanState(seed=4)
    total = planner.steps_left(state, world)
    assert total == len(run_steps(planner, state, world))
    for done in (1, total // 2, total - 1, total):
        after = planner.consumed(state, done, world)
        assert planner.steps_left(after, world) == total - done
        assert len(run_steps(planner, after, world)) == total - done

"""The size rule (Qwen2-VL smart_resize) at its edges, its numpy twin, and its invariants."""

import math

import numpy as np
import pytest

from fineviti.data.sizes import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, SizeRule


def qwen2_vl_smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 1280):
    """Transcribed from transformers' Qwen2-VL image processor (the aspect check left out)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@pytest.mark.parametrize("merge", [1, 2])
def test_matches_qwen2_vl_within_the_aspect_limit(merge):
    rule = SizeRule(patch=14, merge=merge)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 4000, size=(3000, 2))
    sizes = sizes[np.maximum(sizes[:, 0], sizes[:, 1]) / np.minimum(sizes[:, 0], sizes[:, 1]) <= 8]
    for h, w in sizes.tolist():
        assert rule.target(h, w) == qwen2_vl_smart_resize(h, w, rule.factor, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)


def test_edges():
    rule = SizeRule()  # factor 14
    assert rule.target(1, 1) == (56, 56)  # raised to min_pixels
    assert rule.target(21, 3000) == (28, 168)  # clamped to 21 x 168 (8:1); 1.5 rounds to 2
    assert rule.target(224, 224) == (224, 224)  # already a multiple: unchanged
    assert rule.target(35 * 4, 35 * 4) == (140, 140)
    assert SizeRule(min_pixels=1).target(35, 35) == (28, 28)  # 2.5 rounds half to even, like Python's round
    assert SizeRule(min_pixels=1).target(49, 49) == (56, 56)  # 3.5 -> 4
    assert SizeRule(min_pixels=1).target(3, 3) == (14, 14)  # never below one factor
    big = rule.target(4000, 3000)
    assert big[0] * big[1] <= DEFAULT_MAX_PIXELS and big[0] % 14 == 0 and big[1] % 14 == 0
    assert rule.target(1002, 1001) == (994, 994)  # rounds to 1008 x 1008 > max_pixels: scaled by beta, floored
    exact = SizeRule(min_pixels=1, max_pixels=28 * 28)  # one 2 x 2 patch grid, a side may not grow past 28
    assert exact.target(1000, 1000) == (28, 28)
    assert exact.target(28, 10) == (28, 14)


def test_aspect_limit_clamps_or_raises():
    clamp = SizeRule(max_aspect=4, min_pixels=1)
    assert clamp.target(100, 1000) == clamp.target(100, 400)
    assert clamp.target(1000, 100) == clamp.target(400, 100)
    h, w = clamp.target(10, 5000)
    assert w / h <= 4 + 1e-9
    with pytest.raises(ValueError, match="aspect ratio 10 .* max_aspect = 4"):
        SizeRule(max_aspect=4, aspect="error").target(100, 1000)
    with pytest.raises(ValueError, match="max_aspect = 4"):
        SizeRule(max_aspect=4, aspect="error").targets(np.array([100, 100]), np.array([100, 1000]))


def test_guard_when_min_pixels_meets_max_pixels():
    rule = SizeRule(min_pixels=28 * 28 * 3, max_pixels=28 * 28 * 3, merge=2)  # no 28-multiple rectangle has 3
    for h, w in [(1, 1), (10, 500), (500, 10), (333, 333)]:
        th, tw = rule.target(h, w)
        assert th * tw <= rule.max_pixels and th % 28 == 0 and tw % 28 == 0


@pytest.mark.parametrize("rule", [SizeRule(), SizeRule(merge=2), SizeRule(max_aspect=2, min_pixels=1),
                                  SizeRule.for_budget(64, merge=2), SizeRule(min_pixels=28 * 28 * 3,
                                                                            max_pixels=28 * 28 * 3, merge=2)])
def test_numpy_twin_equals_scalar_and_invariants_hold(rule):
    rng = np.random.default_rng(1)
    h = np.concatenate([rng.integers(1, 5000, 2000), [1, 1, 7000, 14, 28, 35, 10]])
    w = np.concatenate([rng.integers(1, 5000, 2000), [1, 7000, 1, 14, 28, 35, 4000]])
    th, tw = rule.targets(h, w)
    assert [rule.target(a, b) for a, b in zip(h.tolist(), w.tolist(), strict=True)] == list(
        zip(th.tolist(), tw.tolist(), strict=True))
    f = rule.factor
    assert (th % f == 0).all() and (tw % f == 0).all() and (th >= f).all() and (tw >= f).all()
    assert (th * tw <= rule.max_pixels).all()
    tokens = rule.tokens(h, w)
    assert (tokens == (th // rule.patch) * (tw // rule.patch)).all()


@pytest.mark.parametrize("rule", [SizeRule(), SizeRule(merge=2), SizeRule.for_budget(64, merge=2),
                                  SizeRule(patch=16, merge=2, min_pixels=5120, max_pixels=6144, max_aspect=3),
                                  SizeRule(min_pixels=28 * 28 * 3, max_pixels=28 * 28 * 3, merge=2),
                                  SizeRule(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 2, merge=2, max_aspect=1)])
def test_a_transposed_image_gets_the_transposed_size(rule):
    """The loader turns a photo upright after the planner sized it as stored (fineviti.data.pixels): that is the
    upright photo's own size only if the rule commutes with transposition. The guard's tie went to the height, so a
    tall 29 x 24 image got a wide 64 x 96 grid under the tight rule here (tokens equal, shape not)."""
    rng = np.random.default_rng(3)
    h, w = rng.integers(1, 3000, 3000), rng.integers(1, 3000, 3000)
    th, tw = rule.targets(h, w)
    wt, ht = rule.targets(w, h)
    assert (th == ht).all() and (tw == wt).all()
    assert rule.target(24, 29) == rule.target(29, 24)[::-1]


def test_for_budget_bounds_every_image_by_the_budget():
    rule = SizeRule.for_budget(256)
    assert rule.max_pixels == 256 * 14 * 14
    assert SizeRule.for_budget(100000).max_pixels == DEFAULT_MAX_PIXELS
    rng = np.random.default_rng(2)
    assert rule.tokens(rng.integers(1, 3000, 500), rng.integers(1, 3000, 500)).max() <= 256
    with pytest.raises(ValueError, match="token_budget"):
        SizeRule.for_budget(3, merge=2)


@pytest.mark.parametrize("kwargs, match", [({"patch": 0}, "patch"), ({"merge": 1.5}, "merge"),
                                           ({"max_pixels": 100}, "max_pixels"), ({"min_pixels": 0}, "min_pixels"),
                                           ({"max_aspect": 0.5}, "max_aspect"), ({"aspect": "crop"}, "aspect")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SizeRule(**kwargs)
    with pytest.raises(ValueError, match="positive"):
        SizeRule().target(0, 10)
    with pytest.raises(ValueError, match=r"image 2 has size 5x0 \(height x width\); expected both >= 1"):
        SizeRule().targets(np.array([10, 20, 5]), np.array([10, 20, 0]))

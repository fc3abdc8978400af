"""The size rule: Qwen2-VL's `smart_resize`, which gives every image the patch grid its size earns.

With factor f = patch * merge, for an image of height h and width w (after the aspect-ratio limit below):

    h' = max(f, round(h / f) * f),  w' = max(f, round(w / f) * f)          (round: Python's, half to even)
    if h' * w' > max_pixels:  beta = sqrt(h * w / max_pixels)
                              h' = max(f, floor(h / beta / f) * f),  w' = max(f, floor(w / beta / f) * f)
    elif h' * w' < min_pixels: beta = sqrt(min_pixels / (h * w))
                              h' = ceil(h * beta / f) * f,  w' = ceil(w * beta / f) * f

then, as a guard Qwen2-VL lacks, while h' * w' > max_pixels the longer side loses f, on a tie the side that was
shorter before (so that the transposed image gets the transposed size; this only fires when min_pixels is close to
max_pixels or a side was raised to f). The result: both sides multiples of f, at least f,
h' * w' <= max_pixels, and the patch grid (h' / patch, w' / patch) has `h' * w' / patch**2` tokens.

Aspect ratio: Qwen2-VL raises above 200:1. Here `max_aspect` (default 8) with `aspect="clamp"` (default) shrinks
the longer side to max_aspect times the shorter one before the rule, so that the image is squashed, never
cropped: every pixel and every box stays in the picture (boxes scale by the per-axis factors). `aspect="error"`
raises instead. A clamp, not an error, because a loader must not stop in the middle of a run on one odd image.

Defaults (`SizeRule()`): patch 14, merge 1 (factor 14; stage 2 uses merge 2, factor 28), min_pixels 3136
(56 x 56, Qwen2-VL's), max_pixels 1003520 (28 x 28 x 1280, Qwen2-VL's: 5120 patch tokens of 14 px). The
default token budget per step and rank is 16384 patch tokens (`DEFAULT_TOKEN_BUDGET`); `SizeRule.for_budget`
lowers max_pixels to budget * patch**2 when the budget is smaller, so that every image fits a pack.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

DEFAULT_TOKEN_BUDGET = 16384
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


@dataclasses.dataclass(frozen=True)
class SizeRule:
    patch: int = 14
    merge: int = 1
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = 8.0
    aspect: str = "clamp"  # "clamp" (squash to max_aspect) or "error"

    def __post_init__(self):
        for name in ("patch", "merge"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SizeRule: {name} must be an integer >= 1, got {value!r}")
        if self.max_pixels < self.factor**2:
            raise ValueError(f"SizeRule: max_pixels = {self.max_pixels} is below factor**2 = {self.factor**2} "
                             f"(factor = patch * merge = {self.factor}); expected at least one merge group")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"SizeRule: min_pixels = {self.min_pixels} must be in (0, max_pixels = "
                             f"{self.max_pixels}]")
        if not self.max_aspect >= 1:
            raise ValueError(f"SizeRule: max_aspect must be >= 1, got {self.max_aspect}")
        if self.aspect not in ("clamp", "error"):
            raise ValueError(f"SizeRule: aspect must be 'clamp' or 'error', got {self.aspect!r}")

    @property
    def factor(self) -> int:
        return self.patch * self.merge

    @classmethod
    def for_budget(cls, token_budget: int = DEFAULT_TOKEN_BUDGET, **kwargs) -> SizeRule:
        """A rule whose max_pixels (default or given) is at most what `token_budget` patch tokens hold."""
        rule = cls(**kwargs)
        limit = token_budget * rule.patch**2
        if limit < rule.factor**2:
            raise ValueError(f"SizeRule.for_budget: token_budget = {token_budget} holds fewer than one merge group "
                             f"of {rule.merge}x{rule.merge} patches")
        if rule.max_pixels > limit:
            rule = dataclasses.replace(rule, max_pixels=limit, min_pixels=min(rule.min_pixels, limit))
        return rule

    def target(self, height: int, width: int) -> tuple[int, int]:
        """(height', width') in pixels for an image of `height` x `width` pixels."""
        if height < 1 or width < 1:
            raise ValueError(f"SizeRule.target: image size must be positive, got height={height}, width={width}")
        h, w = float(height), float(width)
        if max(h, w) / min(h, w) > self.max_aspect:
            if self.aspect == "error":
                raise ValueError(f"SizeRule.target: aspect ratio {max(h, w) / min(h, w):.3g} of a {height}x{width} "
                                 f"image exceeds max_aspect = {self.max_aspect}")
            if h > w:
                h = w * self.max_aspect
            else:
                w = h * self.max_aspect
        f = self.factor
        h_bar, w_bar = max(f, round(h / f) * f), max(f, round(w / f) * f)
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(h * w / self.max_pixels)
            h_bar, w_bar = max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (h * w))
            h_bar, w_bar = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
        while h_bar * w_bar > self.max_pixels:
            # a tie: the side that was shorter before the aspect clamp (which can make both equal), so that a
            # transposed image gets the transposed size
            if h_bar > w_bar or (h_bar == w_bar and height < width):
                h_bar -= f
            else:
                w_bar -= f
        return int(h_bar), int(w_bar)

    def targets(self, heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`target` of many images at once (numpy, the same arithmetic in float64): int64 arrays."""
        h = h0 = np.asarray(heights, dtype=np.float64)
        w = w0 = np.asarray(widths, dtype=np.float64)
        if h.shape != w.shape:
            raise ValueError(f"SizeRule.targets: heights {h.shape} and widths {w.shape} differ in shape")
        if h.size and (h.min() < 1 or w.min() < 1):
            i = int(np.argmax((h < 1) | (w < 1)))
            raise ValueError(f"SizeRule.targets: image {i} has size {h.flat[i]:g}x{w.flat[i]:g} (height x width); "
                             f"expected both >= 1")
        ratio = np.maximum(h, w) / np.minimum(h, w)
        over = ratio > self.max_aspect
        if over.any():
            if self.aspect == "error":
                i = int(np.argmax(over))
                raise ValueError(f"SizeRule.targets: aspect ratio {ratio[i]:.3g} of image {i} ({int(h[i])}x"
                                 f"{int(w[i])}) exceeds max_aspect = {self.max_aspect}")
            tall = h > w
            h, w = np.where(over & tall, w * self.max_aspect, h), np.where(over & ~tall, h * self.max_aspect, w)
        f = self.factor
        h_bar = np.maximum(f, np.round(h / f) * f)
        w_bar = np.maximum(f, np.round(w / f) * f)
        big = h_bar * w_bar > self.max_pixels
        small = ~big & (h_bar * w_bar < self.min_pixels)
        beta = np.sqrt(h * w / self.max_pixels)
        h_bar = np.where(big, np.maximum(f, np.floor(h / beta / f) * f), h_bar)
        w_bar = np.where(big, np.maximum(f, np.floor(w / beta / f) * f), w_bar)
        beta = np.sqrt(self.min_pixels / (h * w))
        h_bar = np.where(small, np.ceil(h * beta / f) * f, h_bar).astype(np.int64)
        w_bar = np.where(small, np.ceil(w * beta / f) * f, w_bar).astype(np.int64)
        for i in np.flatnonzero(h_bar * w_bar > self.max_pixels).tolist():  # the rare guard case
            while h_bar[i] * w_bar[i] > self.max_pixels:
                if h_bar[i] > w_bar[i] or (h_bar[i] == w_bar[i] and h0[i] < w0[i]):
                    h_bar[i] -= f
                else:
                    w_bar[i] -= f
        return h_bar, w_bar

    def tokens(self, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
        """Patch tokens of each image under the rule (int64)."""
        h_bar, w_bar = self.targets(heights, widths)
        return (h_bar // self.patch) * (w_bar // self.patch)

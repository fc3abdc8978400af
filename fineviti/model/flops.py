"""FLOPs of one step of the two-tower model on a packed batch, for throughput and MFU.

With w the width, h the SwiGLU hidden size, d the depth, E the joint embedding, p the patch size, and a
multiply-add counted as 2 FLOPs; a training step (forward + backward) costs 3x the forward (backward = 2x):

  matmul     6 x (weights of the matmuls a token passes through) x tokens, per tower:
               vision, per patch token:  3p^2*w (patch embedding: 4x, not 6x, as the pixels take no gradient)
                                         + d*(4w^2 + 3wh) (qkv, out, SwiGLU) + 2w^2 (the pool's key/value
                                         projection)
               vision, per image:        w*E (the pool's output projection)
               text, per caption token:  d*(4w^2 + 3wh)   (the embedding is a lookup: 0 FLOPs)
               text, per caption:        w*E (projection of the pooled caption)
  attention  12 x sum_i(L_i^2) x w per layer (QK^T and PV, 2 L^2 w each forward, twice that backward), over
             the images' patch counts L_i in the vision tower and the captions' lengths in the text tower;
             the vision pool's one-query attention is 12 x L_i x w per image
  loss       6 x N x M x E: the (N, M) logits forward, then the gradients of both feature sets, for N pairs
             (one per caption) against M captions (M = all ranks' captions when negatives come from every rank)
  recompute  with activation checkpointing, each block's forward runs again in the backward, up to the last
             tensor the backward needs (torch.utils.checkpoint's early stop: the SwiGLU down projection's output
             is never needed, so it is not recomputed): 2 x d*(4w^2 + 2wh) x tokens + 4 x sum(L^2) x w x d per
             tower. Hardware FLOPs, not model FLOPs: MFU uses `model`, the hardware rate `hardware`.

Biases, norms, RoPE, softmax and other elementwise work are not counted (a few percent at most). A forward-only
count (training=False) uses 2x, 4x and 2x instead of 6x, 12x and 6x, and never recomputes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fineviti.model.config import ModelConfig, TextConfig, VisionConfig


@dataclasses.dataclass
class FlopCount:
    vision_matmul: int = 0
    vision_attention: int = 0
    vision_pool_attention: int = 0
    text_matmul: int = 0
    text_attention: int = 0
    loss: int = 0
    recompute: int = 0

    @property
    def model(self) -> int:
        """Model FLOPs (what MFU divides by the peak rate)."""
        return (self.vision_matmul + self.vision_attention + self.vision_pool_attention + self.text_matmul
                + self.text_attention + self.loss)

    @property
    def hardware(self) -> int:
        """FLOPs the hardware executes, recomputation included."""
        return self.model + self.recompute

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "model": self.model, "hardware": self.hardware}


def _lengths(name: str, seqlens: Sequence[int]) -> list[int]:
    lengths = [int(n) for n in seqlens]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-negative lengths, got {lengths}")
    return lengths


def _recompute(cfg: VisionConfig | TextConfig, tokens: int, sum_sq: int) -> int:
    w = cfg.width
    return 2 * cfg.depth * (4 * w * w + 2 * w * cfg.mlp_hidden) * tokens + 4 * sum_sq * w * cfg.depth


def vision_flops(cfg: VisionConfig, embed_dim: int, seqlens: Sequence[int], *, training: bool = True,
                 recompute: bool = False, pool: bool = True) -> FlopCount:
    """The vision tower's part of `count_flops` for images of `seqlens` patch tokens; pool=False: the patch
    tokens only (stage 2 feeds them to the merger and never runs the pooling head)."""
    lengths = _lengths("seqlens", seqlens)
    mm, attn = (6, 12) if training else (2, 4)
    w, tokens, sq = cfg.width, sum(lengths), sum(n * n for n in lengths)
    block = 4 * w * w + 3 * w * cfg.mlp_hidden
    patch_embed = (mm - 2 if training else mm) * cfg.patch_dim * w * tokens  # no gradient for the pixels
    matmul = patch_embed + mm * cfg.depth * block * tokens
    if pool:
        matmul += mm * (2 * w * w * tokens + w * embed_dim * len(lengths))
    recomputed = _recompute(cfg, tokens, sq) if (training and recompute) else 0
    return FlopCount(vision_matmul=matmul, vision_attention=attn * sq * w * cfg.depth,
                     vision_pool_attention=attn * tokens * w if pool else 0, recompute=recomputed)


def text_flops(cfg: TextConfig, embed_dim: int, seqlens: Sequence[int], *, training: bool = True,
               recompute: bool = False) -> FlopCount:
    """The text tower's part of `count_flops` for captions of `seqlens` tokens."""
    lengths = _lengths("text_seqlens", seqlens)
    mm, attn = (6, 12) if training else (2, 4)
    w, tokens, sq = cfg.width, sum(lengths), sum(n * n for n in lengths)
    block = 4 * w * w + 3 * w * cfg.mlp_hidden
    recomputed = _recompute(cfg, tokens, sq) if (training and recompute) else 0
    return FlopCount(text_matmul=mm * (cfg.depth * block * tokens + w * embed_dim * len(lengths)),
                     text_attention=attn * sq * w * cfg.depth, recompute=recomputed)


def count_flops(cfg: ModelConfig, image_seqlens: Sequence[int], text_seqlens: Sequence[int], *,
                training: bool = True, recompute: bool | None = None,
                world_negatives: int | None = None) -> FlopCount:
    """FLOPs of one step of the two-tower model (formula in the module docstring).

    image_seqlens: patch tokens per image (PackedBatch.seqlens); text_seqlens: tokens per caption. recompute:
    activation checkpointing on (default: cfg.grad_checkpointing). world_negatives: captions the loss scores
    each image against (default: this batch's captions; all ranks' captions when distributed)."""
    recompute = cfg.grad_checkpointing if recompute is None else recompute
    vision = vision_flops(cfg.vision, cfg.embed_dim, image_seqlens, training=training, recompute=recompute)
    text = text_flops(cfg.text, cfg.embed_dim, text_seqlens, training=training, recompute=recompute)
    pairs = len(list(text_seqlens))  # the loss has one row per caption (captions pair with images)
    negatives = pairs if world_negatives is None else int(world_negatives)
    loss = (6 if training else 2) * pairs * negatives * cfg.embed_dim
    return FlopCount(vision_matmul=vision.vision_matmul, vision_attention=vision.vision_attention,
                     vision_pool_attention=vision.vision_pool_attention, text_matmul=text.text_matmul,
                     text_attention=text.text_attention, loss=loss, recompute=vision.recompute + text.recompute)

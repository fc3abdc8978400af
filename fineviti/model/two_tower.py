"""The stage-1 two-tower model (open_clip's interface): `.visual`, `.text`, `encode_image`, `encode_text`, and a
forward over a PackedBatch that returns the normalised features and the contrastive loss.

SigLIP (default): learnable logit scale and bias, stored as log(10) and -10 and used as exp(log scale) and bias,
as SigLIP initialises them. CLIP (option): logit scale stored as log(1/0.07), used as min(exp(.), 100) (its
gradient kept) and capped at log(100) after every optimizer step, no bias.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fineviti.model import config as config_mod
from fineviti.model.config import ModelConfig
from fineviti.model.layers import set_norm_backend, set_swiglu_backend
from fineviti.model.text import TextTower
from fineviti.model.vision import VisionTower

CLIP_MAX_SCALE = 100.0


class FineViT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, cfg.embed_dim, cfg.attn_backend, cfg.rope_backend,
                                  cfg.grad_checkpointing)
        self.text = TextTower(cfg.text, cfg.embed_dim, cfg.attn_backend, cfg.grad_checkpointing)
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.logit_bias = nn.Parameter(torch.empty(())) if cfg.loss == "siglip" else None
        set_norm_backend(self, cfg.norm_backend)
        set_swiglu_backend(self, cfg.swiglu_backend)
        self._init_logits()

    def _init_logits(self) -> None:
        with torch.no_grad():
            self.logit_scale.fill_(math.log(self.cfg.init_logit_scale))
            if self.logit_bias is not None:
                self.logit_bias.fill_(self.cfg.init_logit_bias)

    def init_weights(self) -> None:
        """Re-initialise every parameter (after `to_empty` from a model built on the meta device)."""
        self.visual.init_weights()
        self.text.init_weights()
        self._init_logits()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, patches: torch.Tensor, cu_seqlens: torch.Tensor, pos: torch.Tensor, max_seqlen: int,
                     seqlens: list[int] | None = None, return_tokens: bool = False, normalize: bool = False,
                     padding_tokens: int = 0):
        """(n_images, embed_dim) image features (unit norm with normalize), and with return_tokens the
        (total, width) patch tokens too. Arguments as PackedBatch's fields of the same names."""
        out = self.visual(patches, cu_seqlens, pos, max_seqlen, seqlens, return_tokens=return_tokens,
                          padding_tokens=padding_tokens)
        features, tokens = out if return_tokens else (out, None)
        if normalize:
            features = _normalize(features)
        return (features, tokens) if return_tokens else features

    def encode_text(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                    seqlens: list[int] | None = None, normalize: bool = False) -> torch.Tensor:
        """(n_texts, embed_dim) caption features (unit norm with normalize)."""
        features = self.text(tokens, cu_seqlens, max_seqlen, seqlens)
        return _normalize(features) if normalize else features

    def logit_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logit scale as the loss uses it (exp of the stored log, at most 100 for CLIP) and the bias."""
        log_scale = self.logit_scale
        if self.cfg.loss == "clip":  # capped with the gradient kept (a clamp's is 0 at a cap that rounds below the
            # parameter: fp32's log(100) above the float's, or a bf16 copy under FSDP2), see clamp_logit_scale_
            log_scale = log_scale - (log_scale - math.log(CLIP_MAX_SCALE)).clamp(min=0).detach()
        return log_scale.exp(), self.logit_bias

    def clamp_logit_scale_(self) -> None:
        """CLIP: the stored log scale capped at log(100) in place, as open_clip does after every optimizer step (the
        trainer does too). Only capped in the forward, a log that an update took past the cap got no gradient
        there, and stayed above it for good even when the loss wanted a smaller scale."""
        if self.cfg.loss == "clip":
            with torch.no_grad():
                self.logit_scale.clamp_(max=math.log(CLIP_MAX_SCALE))

    def forward(self, batch, *, group="default", compute_loss: bool = True, host_group=None) -> dict[str, Any]:
        """batch: a fineviti.data.batch.PackedBatch. Returns image_features (n_images, D) and text_features
        (n_texts, D), unit norm; logit_scale (the multiplier) and logit_bias (None for CLIP); and loss.

        Captions pair with images one to one unless batch.text_image maps each caption to its image; then each
        caption is a positive of its image and every other pair a negative (several captions of one image are
        then negatives of each other's images: give one caption per image per step to avoid that).
        group: passed to the loss, for negatives from every rank (see fineviti.ops.siglip_loss): "default" (the
        world group when torch.distributed is initialised), a ProcessGroup, or None (this process's pairs only);
        host_group: a gloo group of the same processes, for the loss's first exchange (see siglip_loss)."""
        image_features = self.encode_image(batch.patches, batch.cu_seqlens, batch.pos, batch.max_seqlen,
                                           batch.seqlens, normalize=True, padding_tokens=batch.padding_tokens)
        text_features = self.encode_text(batch.tokens, batch.text_cu_seqlens, batch.text_max_seqlen,
                                         batch.text_seqlens, normalize=True)
        scale, bias = self.logit_params()
        out = {"image_features": image_features, "text_features": text_features, "logit_scale": scale,
               "logit_bias": bias}
        if compute_loss:
            out["loss"] = self.contrastive_loss(image_features, text_features, batch.text_image, group=group,
                                                host_group=host_group)
        return out

    def contrastive_loss(self, image_features: torch.Tensor, text_features: torch.Tensor,
                         text_image: torch.Tensor | None = None, *, group="default",
                         host_group=None) -> torch.Tensor:
        """The configured loss of normalised features; text_image (n_texts,) pairs caption j with image
        text_image[j] (default: caption i with image i)."""
        scale, bias = self.logit_params()
        return pair_loss(self.cfg, image_features, text_features, text_image, scale, bias, group=group,
                         host_group=host_group)

    def flops(self, batch, *, training: bool = True, world_negatives: int | None = None):
        """The FlopCount of one step on `batch` (fineviti.model.flops.count_flops)."""
        from fineviti.model.flops import count_flops

        return count_flops(self.cfg, batch.seqlens, batch.text_seqlens, training=training,
                           recompute=self.visual.grad_checkpointing, world_negatives=world_negatives)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1).to(x.dtype)


def resolve_config(preset: str | ModelConfig = "tiny", **overrides: Any) -> ModelConfig:
    """A preset's config (or a copy of `preset` when it is a config) with overrides: field names, dotted paths
    ("vision.depth") or sub-config dicts (text={"vocab_size": 5000})."""
    cfg = config_mod.preset(preset) if isinstance(preset, str) else dataclasses.replace(preset)
    return config_mod.apply_overrides(cfg, overrides)


def create_model(preset: str | ModelConfig = "tiny", *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, **overrides: Any) -> FineViT:
    """The stage-1 two-tower model of a preset ("tiny", "base", "large", "fine") or a ModelConfig.

    create_model("tiny", text={"vocab_size": tokenizer_vocab}, attn_backend="torch"); device="meta" builds it
    without memory (then `to_empty(device=...)` and `init_weights()`)."""
    cfg = resolve_config(preset, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = FineViT(cfg)
    return model.to(dtype) if dtype is not None else model


def pair_loss(cfg, image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor | None,
              scale: torch.Tensor, bias: torch.Tensor | None, *, group="default", host_group=None) -> torch.Tensor:
    """The loss `cfg` (a ModelConfig) names, SigLIP or CLIP, of normalised features with a given logit scale
    (multiplier) and bias: FineViT.contrastive_loss with its own parameters, and GradCache's loss (the trainer)
    with their detached copies. text_image as in FineViT.contrastive_loss; group and host_group as in siglip_loss."""
    from fineviti.ops.contrastive import clip_loss, siglip_loss

    if text_image is not None:
        image_features = image_features[text_image]
    elif image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"the batch has {image_features.shape[0]} images and {text_features.shape[0]} "
                         f"captions; without text_image they must pair one to one")
    text_features = text_features.to(image_features.dtype)
    if cfg.loss == "siglip":
        return siglip_loss(image_features, text_features, scale, bias, backend=cfg.loss_backend, group=group,
                           host_group=host_group)
    return clip_loss(image_features, text_features, scale, backend=cfg.loss_backend, group=group,
                     host_group=host_group)

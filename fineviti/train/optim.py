"""The optimizer (AdamW; apex's FusedAdam on request) with parameter groups, and the warmup + decay schedule.

Weight decay skips vectors and scalars (biases, norm weights, the pooling query, the logit scale and bias).
Stage 2 gives each part (vision, merger, projector, lm) its own learning rate, a multiple of optimizer.lr.
apex's FusedAdam is unverified: no machine of this project has run it.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

UNVERIFIED = ("apex_fused_adam",)


def _decays(name: str, param: torch.Tensor) -> bool:
    return param.ndim >= 2 and not name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float, lr: float,
                 part_scales: dict[str, float] | None = None) -> list[dict]:
    """Trainable parameters grouped by (part, decays). part_scales maps a top-level child name (e.g. "visual",
    "lm") to its learning-rate multiple; children not named get 1."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = name.split(".")[0]
        scale = (part_scales or {}).get(part, 1.0)
        key = (part if part_scales else "", _decays(name, param))
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": weight_decay if key[1] else 0.0,
                           "lr": lr * scale, "part": key[0]}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg, *, device: torch.device,
                    part_scales: dict[str, float] | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.lr, part_scales)
    if not groups:
        raise ValueError("the model has no trainable parameters (is every part frozen? see stage2.freeze)")
    for group in groups:
        group.pop("names")
    if cfg.name == "apex_fused_adam":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as err:
            raise ImportError("optimizer.name=apex_fused_adam needs NVIDIA apex built with its CUDA extensions "
                              "(apex.optimizers.FusedAdam); install apex or use optimizer.name=adamw") from err
        if device.type != "cuda":
            raise ValueError(f"optimizer.name=apex_fused_adam runs on CUDA only; the device is {device}")
        warnings.warn("apex FusedAdam is unverified: no machine of this project has run it", stacklevel=2)
        return FusedAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                         adam_w_mode=True)
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, **kwargs)


class WarmupDecay:
    """lr multiplier at step s (0-based count of optimizer steps taken): linear warmup from warmup_init to 1 over
    warmup_steps, then cosine/linear decay to min_lr_ratio at total_steps (constant stays at 1)."""

    def __init__(self, cfg, total_steps: int):
        self.warmup, self.init = cfg.warmup_steps, cfg.warmup_init
        self.decay, self.floor = cfg.decay, cfg.min_lr_ratio
        self.total = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.init + (1.0 - self.init) * (step + 1) / self.warmup
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        if self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.floor + (1.0 - self.floor) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(cfg, total_steps))

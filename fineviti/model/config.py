"""Model configs: one small dataclass per part, presets as functions returning a full config, and the parameter
count of each part computed from its config (tests hold the modules to it).

Override a preset with `apply_overrides(cfg, {"vision.depth": 2, "text": {"vocab_size": 4000}})`: dotted keys or
nested dicts; an unknown key is an error that lists the known ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

LOSSES = ("siglip", "clip")
TEXT_POOLS = ("mean", "last")


@dataclasses.dataclass
class VisionConfig:
    """The native-resolution vision tower: pre-RMSNorm blocks, fused QKV (bias), 2D RoPE, varlen attention,
    SwiGLU; attention pooling with one learned query into the joint embedding."""

    patch_size: int = 14  # p: a patch is 3 * p * p values, flattened channel, row, column (Qwen2-VL's order)
    width: int = 768
    depth: int = 12
    heads: int = 12  # head_dim = width / heads, a multiple of 4 (row and column halves of the 2D RoPE)
    mlp_hidden: int = 2048  # SwiGLU hidden size
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    merge: int = 2  # side of the token groups that are contiguous in the packed order (stage 2's patch merger)
    # Pixel normalisation the data path applies before patching (SigLIP's), kept here so an exported tower says
    # what it expects; the model itself takes patches already normalised.
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size

    def validate(self) -> None:
        _positive(self, "patch_size", "width", "depth", "heads", "mlp_hidden", "merge")
        if self.patch_size not in (14, 16):
            raise ValueError(f"vision.patch_size must be 14 or 16, got {self.patch_size}")
        _check_heads("vision", self.width, self.heads)
        _check_rope_and_eps("vision", self)
        for name in ("image_mean", "image_std"):  # (a zero std divided the patches by zero)
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) or (
                    name == "image_std" and min(values) <= 0):
                least = " > 0" if name == "image_std" else ""
                raise ValueError(f"vision.{name} must be three finite numbers{least}, got {tuple(values)!r}")

    def block_params(self) -> int:
        """Parameters of one block: qkv (with bias), output projection (with bias), SwiGLU (no bias), 2 norms."""
        w, h = self.width, self.mlp_hidden
        return (w * 3 * w + 3 * w) + (w * w + w) + 3 * w * h + 2 * w

    def num_params(self, embed_dim: int) -> int:
        """Patch embedding (with bias) + blocks + final norm + attention pool (query, k/v projection with bias,
        output projection into the joint embedding with bias)."""
        w = self.width
        patch_embed = self.patch_dim * w + w
        pool = w + (w * 2 * w + 2 * w) + (w * embed_dim + embed_dim)
        return patch_embed + self.depth * self.block_params() + w + pool


@dataclasses.dataclass
class TextConfig:
    """The text tower: a bidirectional transformer with 1D RoPE over packed captions, pooled into the joint
    embedding. vocab_size must match the tokenizer of the data (the data path reports it)."""

    vocab_size: int = 32000
    context_length: int = 256  # longest caption in tokens (long, dense captions are the point)
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_hidden: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # "mean": mean of the caption's tokens (default: robust to truncation, which can cut a final EOS);
    # "last": the caption's last token (an EOS pool when the tokenizer appends EOS and nothing was cut).
    pool: str = "mean"

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def validate(self) -> None:
        _positive(self, "vocab_size", "context_length", "width", "depth", "heads", "mlp_hidden")
        if self.context_length < 256:
            raise ValueError(f"text.context_length must be at least 256 (long captions), got {self.context_length}")
        if self.pool not in TEXT_POOLS:
            raise ValueError(f"text.pool must be one of {TEXT_POOLS}, got {self.pool!r}")
        _check_heads("text", self.width, self.heads)
        _check_rope_and_eps("text", self)

    def block_params(self) -> int:
        w, h = self.width, self.mlp_hidden
        return (w * 3 * w + 3 * w) + (w * w + w) + 3 * w * h + 2 * w

    def num_params(self, embed_dim: int) -> int:
        """Token embedding + blocks + final norm + projection into the joint embedding (no bias)."""
        w = self.width
        return self.vocab_size * w + self.depth * self.block_params() + w + w * embed_dim


@dataclasses.dataclass
class ModelConfig:
    """The stage-1 two-tower model and how its layers run."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    embed_dim: int = 768
    loss: str = "siglip"  # "siglip" (scale 10, bias -10, learnable) or "clip" (scale 1/0.07 clamped at 100)
    attn_backend: str = "auto"  # fineviti.ops.varlen_attention backend
    rope_backend: str = "auto"  # fineviti.ops.rope_2d backend
    loss_backend: str = "auto"  # fineviti.ops.siglip_loss / clip_loss backend
    norm_backend: str = "auto"  # fineviti.ops.rms_norm backend of every RMSNorm
    swiglu_backend: str = "auto"  # fineviti.ops.swiglu backend of every SwiGLU
    grad_checkpointing: bool = False  # recompute each block in the backward (torch.utils.checkpoint)
    name: str = "custom"

    @property
    def init_logit_scale(self) -> float:
        return 10.0 if self.loss == "siglip" else 1.0 / 0.07

    @property
    def init_logit_bias(self) -> float | None:
        return -10.0 if self.loss == "siglip" else None

    def validate(self) -> None:
        _positive(self, "embed_dim")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        _fused_backends(self)
        self.vision.validate()
        self.text.validate()

    def num_params(self) -> int:
        logit_params = 2 if self.loss == "siglip" else 1
        return self.vision.num_params(self.embed_dim) + self.text.num_params(self.embed_dim) + logit_params


@dataclasses.dataclass
class BuiltinLMConfig:
    """The small causal decoder of the demo and the tests (RMSNorm, 1D RoPE, SwiGLU, tied output head)."""

    vocab_size: int = 8192
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_hidden: int = 704
    max_length: int = 1024  # longest sequence (image tokens + prompt + answer)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def validate(self) -> None:
        _positive(self, "vocab_size", "width", "depth", "heads", "mlp_hidden", "max_length")
        _check_heads("lm", self.width, self.heads)
        _check_rope_and_eps("builtin_lm", self)

    def num_params(self) -> int:
        w, h = self.width, self.mlp_hidden
        block = 4 * w * w + 3 * w * h + 2 * w  # q, k, v, o without bias; SwiGLU; two norms
        return self.vocab_size * w + self.depth * block + w  # embedding (tied with the head) + final norm


@dataclasses.dataclass
class AlignerConfig:
    """Stage 2: vision tower -> 2x2 patch merger -> 2-layer MLP projector -> causal LM.

    lm: "builtin" (BuiltinLMConfig in `builtin_lm`) or the path of a local Hugging Face causal LM directory.
    """

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    embed_dim: int = 768  # the stage-1 joint embedding (the vision tower's pooling head, unused in stage 2, keeps it)
    lm: str = "builtin"
    builtin_lm: BuiltinLMConfig = dataclasses.field(default_factory=BuiltinLMConfig)
    merger_hidden: int | None = None  # default: 4 * vision.width (Qwen2-VL's merger)
    merger_out: int | None = None  # default: vision.width
    # Token id of an image token in input_ids (never looked up in the LM's embedding): -1 means the LM's vocab_size,
    # an id no tokenizer emits; the data path's tokenizer reserves <image> = 3 for it.
    placeholder_id: int = -1
    attn_backend: str = "auto"
    rope_backend: str = "auto"
    norm_backend: str = "auto"
    swiglu_backend: str = "auto"
    grad_checkpointing: bool = False
    name: str = "custom"

    def validate(self) -> None:
        _fused_backends(self)
        self.vision.validate()
        if self.vision.merge != 2:
            raise ValueError(f"the stage-2 merger groups 2x2 tokens: vision.merge must be 2, got {self.vision.merge}")
        if self.lm == "builtin":
            self.builtin_lm.validate()


def _fused_backends(cfg) -> None:
    """Every backend field of a model or aligner config names a backend its op has."""
    from fineviti.ops import attention, contrastive, rope
    from fineviti.ops._fused import check_backend

    for name in ("norm_backend", "swiglu_backend"):
        check_backend(name, getattr(cfg, name))
    choices = {"attn_backend": ("auto", *attention.BACKENDS), "rope_backend": rope.BACKENDS,
               "loss_backend": ("auto", *contrastive.BACKENDS)}
    for name, allowed in choices.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(cfg, name)!r}")


def _check_rope_and_eps(part: str, cfg) -> None:
    theta, eps = cfg.rope_theta, cfg.norm_eps
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"{part}.rope_theta must be a finite number > 0, got {theta!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{part}.norm_eps must be a finite number >= 0, got {eps!r}")


# ---------------------------------------------------------------------------------------------------------------
# Presets


def tiny() -> ModelConfig:
    """CPU demo and tests: trains on a CPU in minutes."""
    return ModelConfig(
        vision=VisionConfig(width=192, depth=4, heads=4, mlp_hidden=512),
        text=TextConfig(vocab_size=8192, context_length=256, width=128, depth=4, heads=4, mlp_hidden=384),
        embed_dim=128, name="tiny")


def base() -> ModelConfig:
    """ViT-B sized towers (768 wide, 12 deep, 12 heads of 64)."""
    return ModelConfig(
        vision=VisionConfig(width=768, depth=12, heads=12, mlp_hidden=2048),
        text=TextConfig(vocab_size=32000, context_length=256, width=768, depth=12, heads=12, mlp_hidden=2048),
        embed_dim=768, name="base")


def large() -> ModelConfig:
    """ViT-L sized towers (1024 wide, 24 deep, 16 heads of 64)."""
    return ModelConfig(
        vision=VisionConfig(width=1024, depth=24, heads=16, mlp_hidden=2816),
        text=TextConfig(vocab_size=32000, context_length=256, width=1024, depth=12, heads=16, mlp_hidden=2816),
        embed_dim=1024, name="large")


def fine() -> ModelConfig:
    """FineViT's vision tower: 1536 wide, 28 deep, 16 heads of 96, SwiGLU hidden 4608 (about 0.86B parameters,
    the size the paper, Zhao et al. 2026, arXiv 2603.17326, reports). The shape itself comes from a secondary
    summary of the paper, not from the paper's own text; the text tower's shape is our choice (the summary
    gives none): 1024 wide, 24 deep, with a 512-token context for long captions."""
    return ModelConfig(
        vision=VisionConfig(width=1536, depth=28, heads=16, mlp_hidden=4608),
        text=TextConfig(vocab_size=32000, context_length=512, width=1024, depth=24, heads=16, mlp_hidden=2816),
        embed_dim=1536, name="fine")


PRESETS = {"tiny": tiny, "base": base, "large": large, "fine": fine}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def aligner_config(model: ModelConfig | str = "tiny", **overrides: Any) -> AlignerConfig:
    """The stage-2 config for a stage-1 preset (or config): its vision tower, the built-in LM by default."""
    model = preset(model) if isinstance(model, str) else model
    cfg = AlignerConfig(vision=dataclasses.replace(model.vision), embed_dim=model.embed_dim,
                        attn_backend=model.attn_backend, rope_backend=model.rope_backend,
                        norm_backend=model.norm_backend, swiglu_backend=model.swiglu_backend,
                        grad_checkpointing=model.grad_checkpointing, name=model.name)
    return apply_overrides(cfg, overrides)


# ---------------------------------------------------------------------------------------------------------------
# Overrides


def apply_overrides(cfg, overrides: dict[str, Any] | None):
    """A copy of dataclass `cfg` with `overrides` applied: keys are field names, dotted paths ("vision.depth") or
    a sub-config's name with a dict (or a dataclass) as value. Validates the result."""
    cfg = _deep_copy(cfg)
    for key, value in (overrides or {}).items():
        _set(cfg, key.split("."), value, key)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _deep_copy(cfg):
    changes = {f.name: _deep_copy(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
               if dataclasses.is_dataclass(getattr(cfg, f.name))}
    return dataclasses.replace(cfg, **changes)


def _set(cfg, path: list[str], value: Any, full_key: str) -> None:
    names = [f.name for f in dataclasses.fields(cfg)]
    head = path[0]
    if head not in names:
        raise KeyError(f"unknown config key {full_key!r}: {type(cfg).__name__} has no field {head!r}; "
                       f"expected one of {names}")
    current = getattr(cfg, head)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise KeyError(f"unknown config key {full_key!r}: {head!r} is not a sub-config")
        _set(current, path[1:], value, full_key)
        return
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
        for sub_key, sub_value in value.items():
            _set(current, sub_key.split("."), sub_value, f"{full_key}.{sub_key}")
        return
    if dataclasses.is_dataclass(current) and not isinstance(value, type(current)):
        raise TypeError(f"config key {full_key!r} takes a {type(current).__name__} or a dict, "
                        f"got {type(value).__name__}")
    setattr(cfg, head, value)


def _positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


def _check_heads(part: str, width: int, heads: int) -> None:
    if width % heads:
        raise ValueError(f"{part}.width={width} must be divisible by {part}.heads={heads}")
    head_dim = width // heads
    if head_dim % 4 or not 16 <= head_dim <= 256:
        raise ValueError(f"{part}: head_dim = width / heads = {head_dim} must be a multiple of 4 in [16, 256] "
                         f"(width={width}, heads={heads})")


def count_params(module) -> int:
    """Parameters of a module (meta tensors included): what `num_params` is tested against."""
    return sum(math.prod(p.shape) for p in module.parameters())

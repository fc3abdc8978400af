"""The public ops of fineviti: packed, variable-length inputs; each with a pure-torch reference.

Names resolve lazily, so that importing one op does not import the others' kernels.
"""

import importlib

_WHERE = {
    "varlen_attention": "attention",
    "varlen_attention_ref": "attention",
    "varlen_attention_rope": "attention",
    "rope_2d": "rope",
    "rope_2d_qk": "rope",
    "rope_2d_ref": "rope",
    "qkv_split_rope": "rope",
    "siglip_loss": "contrastive",
    "siglip_loss_ref": "contrastive",
    "clip_loss": "contrastive",
    "clip_loss_ref": "contrastive",
    "rms_norm": "norm",
    "rms_norm_ref": "norm",
    "swiglu": "glu",
    "swiglu_ref": "glu",
    "linear_cross_entropy": "lm_loss",
    "linear_cross_entropy_ref": "lm_loss",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'fineviti.ops' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fineviti.ops.{_WHERE[name]}"), name)


def __dir__():
    # (the ops resolve lazily: listed here, dir(), help() and tab completion show them before their first use)
    return sorted({*globals(), *_WHERE})

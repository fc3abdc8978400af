"""The native-resolution vision tower: patches of many images packed along dim 0, no position table.

patches (total, 3*p*p) -> Linear patch embedding -> depth x [RMSNorm, fused QKV (bias) + 2D RoPE (Qwen2-VL's
vision RoPE on each patch's (row, col)), varlen attention within each image, RMSNorm, SwiGLU] -> RMSNorm ->
per-image attention pooling (one learned query, multi-head, a softmax over each image's own tokens computed as a
segment softmax over the packed tokens) -> Linear into the joint embedding.

Batches padded to a static token count (PackedBatch.padding_tokens rows after cu_seqlens[-1]) run the padding as
one extra sequence, so it never attends to an image or enters a pool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fineviti import _checks
from fineviti.model.config import VisionConfig
from fineviti.model.layers import Block, Packed, RMSNorm, init_transformer, run_blocks, segment_ids
from fineviti.ops.rope import check_positions, qkv_split_rope


class AttentionPool(nn.Module):
    """One learned query per head attends over each image's tokens; the pooled heads go through one Linear into
    the joint embedding.

    The softmax over an image's tokens is a segment softmax over the packed (total, heads) scores: a per-image
    max (scatter_reduce amax, detached: the softmax does not depend on it), exp, a per-image sum (index_add),
    then a weighted per-image sum of the values. All in fp32 (fp64 for fp64 inputs); no padding, no cross-attention
    kernel.
    """

    def __init__(self, width: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.query = nn.Parameter(torch.zeros(width))
        self.kv = nn.Linear(width, 2 * width, bias=True)
        self.out = nn.Linear(width, out_dim, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        total, width = x.shape
        n = cu_seqlens.numel() - 1
        k, v = self.kv(x).view(total, 2, self.heads, self.head_dim).unbind(1)
        acc = torch.promote_types(k.dtype, torch.float32)
        query = self.query.to(acc).view(self.heads, self.head_dim)
        scores = (k.to(acc) * query).sum(-1) * self.head_dim**-0.5  # (total, heads)
        seg = segment_ids(cu_seqlens, total)
        seg_heads = seg[:, None].expand(total, self.heads)
        smax = scores.new_full((n, self.heads), float("-inf"))
        smax = smax.scatter_reduce(0, seg_heads, scores.detach(), reduce="amax", include_self=True)
        weights = torch.exp(scores - smax[seg])
        denom = scores.new_zeros((n, self.heads)).index_add(0, seg, weights)
        probs = weights / denom[seg]
        pooled = scores.new_zeros((n, self.heads, self.head_dim)).index_add(0, seg, probs[..., None] * v.to(acc))
        return self.out(pooled.view(n, width).to(x.dtype))


class VisionTower(nn.Module):
    """Packed images in, one embedding per image (and optionally the patch tokens) out."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, attn_backend: str = "auto", rope_backend: str = "auto",
                 grad_checkpointing: bool = False):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.merge = cfg.merge
        self.width = cfg.width
        self.heads = cfg.heads
        self.image_mean, self.image_std = tuple(cfg.image_mean), tuple(cfg.image_std)
        self.rope_backend = rope_backend
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.width, bias=True)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.norm_eps, attn_backend)
                                    for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.pool = AttentionPool(cfg.width, cfg.heads, embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        init_transformer(self, self.cfg.depth)
        nn.init.normal_(self.pool.query, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _check(self, patches, cu_seqlens, pos, max_seqlen, seqlens) -> None:
        if not isinstance(patches, torch.Tensor) or patches.dim() != 2 or patches.shape[1] != self.cfg.patch_dim:
            got = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
            raise ValueError(f"patches must have shape (total, 3 * {self.patch_size}**2 = {self.cfg.patch_dim}), "
                             f"got {got}")
        if not patches.is_floating_point():
            raise TypeError(f"patches must be floating point (normalised pixels), got {patches.dtype}")
        total = patches.shape[0]
        if not isinstance(pos, torch.Tensor) or pos.shape != (total, 2):
            got = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
            raise ValueError(f"pos must have shape (total={total}, 2) holding each patch's (row, col), got {got}")
        if pos.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"pos must be int32 or int64, got {pos.dtype}")
        for name, t in (("cu_seqlens", cu_seqlens), ("pos", pos)):
            if t.device != patches.device:
                raise ValueError(f"{name} is on {t.device} but patches are on {patches.device}; they must match")
        if seqlens is not None and len(seqlens) != cu_seqlens.numel() - 1:
            raise ValueError(f"seqlens must have one length per image ({cu_seqlens.numel() - 1}), "
                             f"got {len(seqlens)}")
        _checks.check_cu_seqlens(cu_seqlens, total, "cu_seqlens", max_seqlen, "max_seqlen", seqlens=seqlens,
                                 what="image")
        if _checks.value_checks_enabled(pos):
            check_positions(pos)

    def _with_padding(self, cu_seqlens, max_seqlen, seqlens, padding_tokens, total):
        """Trailing padding (a static-shape batch) becomes one more sequence, so it attends only to itself."""
        if isinstance(padding_tokens, bool) or not isinstance(padding_tokens, int) or padding_tokens < 0:
            raise ValueError(f"padding_tokens must be a non-negative Python int, got {padding_tokens!r}")
        if padding_tokens == 0:
            return cu_seqlens, max_seqlen, seqlens
        if isinstance(cu_seqlens, torch.Tensor) and _checks.value_checks_enabled(cu_seqlens) and cu_seqlens.numel():
            last = int(cu_seqlens[-1])
            if last + padding_tokens != total:
                raise ValueError(f"cu_seqlens[-1] + padding_tokens must equal the number of patches {total}, got "
                                 f"{last} + {padding_tokens}")
        cu_seqlens = F.pad(cu_seqlens, (0, 1), value=total)
        seqlens = None if seqlens is None else [*seqlens, padding_tokens]
        return cu_seqlens, max(max_seqlen, padding_tokens), seqlens

    def forward_tokens(self, patches: torch.Tensor, cu_seqlens: torch.Tensor, pos: torch.Tensor, max_seqlen: int,
                       seqlens: list[int] | None = None, padding_tokens: int = 0) -> torch.Tensor:
        """The patch tokens after the last block and the final norm: (total, width), in the packed order (the
        padding rows included, at the end)."""
        cu_all, max_all, seqlens_all = self._with_padding(cu_seqlens, max_seqlen, seqlens, padding_tokens,
                                                          patches.shape[0])
        self._check(patches, cu_all, pos, max_all, seqlens_all)
        theta, backend = self.cfg.rope_theta, self.rope_backend

        def split_rotate(qkv: torch.Tensor, heads: int):
            # Always the fused split: one read of the projection, q and k rotated, three contiguous outputs (the
            # Triton kernel on a GPU); on the CPU backends it is exactly splitting, then rope_2d_qk.
            return qkv_split_rope(qkv, pos, heads, theta, backend=backend, check_values=False)

        packed = Packed(cu_all, max_all, seqlens_all, split_rotate)
        x = self.patch_embed(patches)
        x = run_blocks(self.blocks, x, packed, self.grad_checkpointing)
        return self.norm(x)

    def forward(self, patches: torch.Tensor, cu_seqlens: torch.Tensor, pos: torch.Tensor, max_seqlen: int,
                seqlens: list[int] | None = None, return_tokens: bool = False, padding_tokens: int = 0):
        """patches (total, 3*p*p) float, cu_seqlens (n+1,) int32, pos (total, 2) int (row, col), max_seqlen int,
        seqlens: optional host list of the n lengths; padding_tokens: rows of padding after cu_seqlens[-1]
        (PackedBatch.padding_tokens; they never mix with the images). Returns (n, embed_dim) in the activations'
        dtype, and with return_tokens also the (total, width) patch tokens."""
        tokens = self.forward_tokens(patches, cu_seqlens, pos, max_seqlen, seqlens, padding_tokens)
        real = tokens[:tokens.shape[0] - padding_tokens] if padding_tokens else tokens
        pooled = self.pool(real, cu_seqlens)
        return (pooled, tokens) if return_tokens else pooled

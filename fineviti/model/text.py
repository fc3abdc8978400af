"""The text tower: captions packed along dim 0 with their own cu_seqlens (no padding), token embedding ->
depth x [RMSNorm, fused QKV (bias) + 1D RoPE on each token's position in its caption, bidirectional varlen
attention within each caption, RMSNorm, SwiGLU] -> RMSNorm -> pool -> Linear (no bias) into the joint embedding.

Pooling is the mean over a caption's tokens by default: it needs nothing from the tokenizer (a last-token pool
reads an arbitrary token when a tokenizer adds no EOS or truncation cuts it), and in a bidirectional encoder every
token already sees the whole caption. `pool="last"` takes each caption's last token instead: an EOS pool with the
data path's tokenizer, which ends every caption with <eos> and keeps it through truncation.
"""

from __future__ import annotations

import torch
from torch import nn

from fineviti import _checks
from fineviti.model.config import TextConfig
from fineviti.model.layers import (
    Block,
    Packed,
    RMSNorm,
    init_transformer,
    rope_1d,
    rope_1d_cos_sin,
    run_blocks,
    segment_ids,
)


class TextTower(nn.Module):
    """Packed captions in, one embedding per caption out."""

    def __init__(self, cfg: TextConfig, embed_dim: int, attn_backend: str = "auto",
                 grad_checkpointing: bool = False):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.context_length = cfg.context_length
        self.grad_checkpointing = grad_checkpointing
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.norm_eps, attn_backend)
                                    for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        init_transformer(self, self.cfg.depth)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _check(self, tokens, cu_seqlens, max_seqlen, seqlens) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a 1-D tensor of packed caption token ids, got {got}")
        if tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tokens must be int64 (or int32) token ids, got {tokens.dtype}")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen > self.context_length:
            raise ValueError(f"text max_seqlen must be a Python int <= the context length {self.context_length}, "
                             f"got {max_seqlen!r}; truncate the captions or raise text.context_length")
        if cu_seqlens.device != tokens.device:
            raise ValueError(f"text cu_seqlens is on {cu_seqlens.device} but tokens are on {tokens.device}")
        if seqlens is not None and len(seqlens) != cu_seqlens.numel() - 1:
            raise ValueError(f"text seqlens must have one length per caption ({cu_seqlens.numel() - 1}), "
                             f"got {len(seqlens)}")
        _checks.check_cu_seqlens(cu_seqlens, tokens.shape[0], "text cu_seqlens", max_seqlen, "text max_seqlen",
                                 seqlens=seqlens, seqlens_name="text seqlens", what="caption")
        if _checks.value_checks_enabled(tokens) and tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"tokens must be ids in [0, vocab_size={self.vocab_size}), got {bad}; "
                                 f"text.vocab_size must match the tokenizer")

    def forward_tokens(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       seqlens: list[int] | None = None) -> torch.Tensor:
        """(total, width) token features after the last block and the final norm."""
        self._check(tokens, cu_seqlens, max_seqlen, seqlens)
        total = tokens.shape[0]
        seg = segment_ids(cu_seqlens, total)
        positions = torch.arange(total, device=tokens.device) - cu_seqlens.long()[seg]
        cos, sin = rope_1d_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)

        def split_rotate(qkv: torch.Tensor, heads: int):
            q, k, v = qkv.view(total, 3, heads, -1).unbind(1)
            return rope_1d(q, cos, sin), rope_1d(k, cos, sin), v.contiguous()

        packed = Packed(cu_seqlens, max_seqlen, seqlens, split_rotate)
        x = self.token_embed(tokens)
        x = run_blocks(self.blocks, x, packed, self.grad_checkpointing)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                seqlens: list[int] | None = None) -> torch.Tensor:
        """tokens (total,) int64 ids in [0, vocab_size), cu_seqlens (n+1,) int32, max_seqlen int <= context_length,
        seqlens: optional host list of the n lengths. Returns (n, embed_dim)."""
        x = self.forward_tokens(tokens, cu_seqlens, max_seqlen, seqlens)
        n = cu_seqlens.numel() - 1
        if self.cfg.pool == "last":
            pooled = x[cu_seqlens[1:].long() - 1]
        else:
            seg = segment_ids(cu_seqlens, x.shape[0])
            sums = x.new_zeros((n, x.shape[1]), dtype=torch.float32).index_add(0, seg, x.float())
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=1).to(torch.float32)
            pooled = (sums / lengths[:, None]).to(x.dtype)
        return self.proj(pooled)

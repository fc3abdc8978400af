"""The transformer pieces both towers share: RMSNorm, SwiGLU, attention over packed sequences, the pre-norm
block, 1D RoPE, segment ids, and the per-block activation checkpointing."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fineviti.ops import glu as swiglu_ops
from fineviti.ops import norm as norm_ops
from fineviti.ops._fused import check_backend
from fineviti.ops.attention import varlen_attention
from fineviti.ops.rope import rotate_half


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, returned in the input's dtype (bf16 activations under autocast keep an fp32
    statistic): fineviti.ops.rms_norm with `backend` ("auto": the fused Triton kernels on a GPU, the plain torch
    expression on a CPU; set_norm_backend sets it for a whole model)."""

    def __init__(self, width: int, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        check_backend("norm backend", backend)
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_ops.rms_norm(x, self.weight, self.eps, backend=self.backend)


def _set_backend(model: nn.Module, cls: type, backend: str, what: str) -> int:
    check_backend(f"{what} backend", backend)
    found = [m for m in model.modules() if isinstance(m, cls)]
    for m in found:
        m.backend = backend
    return len(found)


def set_norm_backend(model: nn.Module, backend: str) -> int:
    """Set the rms_norm backend of every RMSNorm in `model`; returns how many there are."""
    return _set_backend(model, RMSNorm, backend, "norm")


def set_swiglu_backend(model: nn.Module, backend: str) -> int:
    """Set the swiglu backend of every SwiGLU in `model`; returns how many there are."""
    return _set_backend(model, SwiGLU, backend, "swiglu")


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up in one Linear (no biases); the gate is fineviti.ops.swiglu with
    `backend` ("auto": the fused Triton kernels on a GPU, the plain torch expression on a CPU and under compile;
    set_swiglu_backend sets it for a whole model)."""

    def __init__(self, width: int, hidden: int, backend: str = "auto"):
        super().__init__()
        check_backend("swiglu backend", backend)
        self.backend = backend
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(swiglu_ops.swiglu(self.gate_up(x), backend=self.backend))


class Packed:
    """What every block of one forward needs about the packed sequences: their bounds, their host-side lengths,
    and how to split a fused QKV projection into rotated q, k and v."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, seqlens: list[int] | None,
                 split_rotate: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = max_seqlen
        self.seqlens = list(seqlens) if seqlens is not None else None
        # the same lengths as a CPU tensor, for compiled blocks: an input of their graphs, not a specialisation
        self.seqlens_host = torch.tensor(self.seqlens, dtype=torch.int32) if seqlens is not None else None
        self.split_rotate = split_rotate


class Attention(nn.Module):
    """Fused QKV Linear (with bias, output laid out [q | k | v], each (heads, head_dim)), RoPE, non-causal varlen
    attention within each packed sequence, output projection (with bias)."""

    def __init__(self, width: int, heads: int, backend: str = "auto"):
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width, bias=True)

    def forward(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        q, k, v = packed.split_rotate(self.qkv(x), self.heads)
        # The towers check cu_seqlens once per forward; the layers do not repeat it. Under torch.compile the host
        # lengths go as a CPU tensor: the list would make dynamo guard on its length and values and recompile for
        # every pack, the tensor is a graph input that the attention op reads when it runs.
        seqlens = packed.seqlens_host if torch.compiler.is_compiling() else packed.seqlens
        out = varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen, backend=self.backend,
                               seqlens=seqlens, check_values=False)
        return self.proj(out.reshape(x.shape[0], -1))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, eps: float, backend: str = "auto"):
        super().__init__()
        self.norm1 = RMSNorm(width, eps)
        self.attn = Attention(width, heads, backend)
        self.norm2 = RMSNorm(width, eps)
        self.mlp = SwiGLU(width, mlp_hidden)

    def forward(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), packed)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, packed: Packed, grad_checkpointing: bool) -> torch.Tensor:
    """Run the blocks in order; with grad_checkpointing (and autograd on), each block keeps only its input and
    recomputes its forward in the backward."""
    recompute = grad_checkpointing and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, packed, use_reentrant=False) if recompute else block(x, packed)
    return x


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the index of the sequence each packed token belongs to. output_size=total spares the host
    read repeat_interleave would otherwise need to size its output."""
    n = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(n, device=cu_seqlens.device), lengths, output_size=total)


def rope_1d_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (total, 1, head_dim) fp32, of 1D RoPE (RoFormer; Llama's rotate-half layout):
    head_dim/2 frequencies theta ** (-2i / head_dim), angle position * frequency, repeated for both halves.

    This is not `rope_2d` with row = col = position: that uses head_dim/4 frequencies of a different base and
    gives both quarter-blocks the same angles, a different (coarser) embedding."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))
    angles = positions.float()[:, None] * inv_freq  # (total, head_dim/2)
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]
    return emb.cos(), emb.sin()


def rope_1d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (total, heads, head_dim) rotated as x*cos + rotate_half(x)*sin in fp32 (fp64 for fp64 x); returns x's
    dtype."""
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def init_transformer(module: nn.Module, depth: int) -> None:
    """GPT-2 style initialisation: Linear and Embedding weights N(0, 0.02), biases 0, norms 1, and the
    projections that write into the residual stream scaled by 1/sqrt(2 * depth) (named attn.proj or mlp.down, or
    marked `writes_residual`)."""
    residual_std = 0.02 / math.sqrt(2 * depth)
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            residual = name.endswith(("attn.proj", "mlp.down")) or getattr(sub, "writes_residual", False)
            std = residual_std if residual else 0.02
            nn.init.trunc_normal_(sub.weight, std=std, a=-3 * std, b=3 * std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=0.02)
        elif isinstance(sub, RMSNorm):
            nn.init.ones_(sub.weight)

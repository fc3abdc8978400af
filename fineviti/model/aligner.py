"""Stage 2: the vision tower aligned with a causal language model on region-level tasks.

packed images -> vision tower (patch tokens) -> 2x2 patch merger (RMSNorm, the 4 tokens of each 2x2 group
concatenated, Linear-GELU-Linear; the groups are contiguous in the packed order, as build_positions(merge=2)
lays them out) -> 2-layer MLP projector into the LM's hidden size -> spliced into the LM's input embeddings at the
placeholder tokens of each sample -> causal LM -> next-token loss on the answer tokens only (labels -100
elsewhere).

A sample is [n_image_tokens placeholders, prompt, answer(, eos)]: `build_example` makes its (input_ids, labels)
and `collate` right-pads a list of them. The LM is `BuiltinLM` (a small decoder for the demo and the tests) or
any Hugging Face causal LM from a local directory (`HFCausalLM`; never downloaded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fineviti import _checks
from fineviti.model import config as config_mod
from fineviti.model.config import AlignerConfig, BuiltinLMConfig
from fineviti.model.layers import (
    RMSNorm,
    SwiGLU,
    init_transformer,
    rope_1d,
    rope_1d_cos_sin,
    set_norm_backend,
    set_swiglu_backend,
)
from fineviti.model.vision import VisionTower

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------------
# Merger and projector


class PatchMerger(nn.Module):
    """(total, width) tokens, each 2x2 group contiguous -> (total / 4, out_dim): RMSNorm per token, the group's
    4 tokens concatenated, Linear-GELU-Linear (Qwen2-VL's PatchMerger with RMSNorm)."""

    def __init__(self, width: int, hidden: int, out_dim: int, eps: float = 1e-6, group: int = 4):
        super().__init__()
        self.group = group
        self.norm = RMSNorm(width, eps)
        self.fc1 = nn.Linear(group * width, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[0] % self.group:
            raise ValueError(f"the patch merger needs whole 2x2 groups: got {tokens.shape[0]} tokens, not a "
                             f"multiple of {self.group}")
        x = self.norm(tokens).reshape(tokens.shape[0] // self.group, -1)
        return self.fc2(F.gelu(self.fc1(x)))


class Projector(nn.Module):
    """2-layer MLP from the merger's output into the LM's hidden size."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# ---------------------------------------------------------------------------------------------------------------
# Language models: forward(inputs_embeds (B, T, H), attention_mask (B, T) or None) -> logits (B, T, V)


class _CausalBlock(nn.Module):
    def __init__(self, cfg: BuiltinLMConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = RMSNorm(cfg.width, cfg.norm_eps)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.proj.writes_residual = True  # init_transformer scales it as the towers' attn.proj
        self.norm2 = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.width, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b * t, 3, self.heads, -1).unbind(1)
        q, k = rope_1d(q, cos, sin), rope_1d(k, cos, sin)
        q, k, v = (y.view(b, t, self.heads, -1).transpose(1, 2) for y in (q, k, v))
        # Causal: with right padding no real token ever attends to a pad, so no padding mask is needed.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(out.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.norm2(x))


class BuiltinLM(nn.Module):
    """A small causal decoder (RMSNorm, 1D RoPE, SwiGLU, output head tied to the embedding). Takes right-padded
    batches; positions count from 0 at each row's first token."""

    def __init__(self, cfg: BuiltinLMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.width
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(_CausalBlock(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.grad_checkpointing = False
        init_transformer(self, cfg.depth)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The final hidden states (B, T, width), after the last norm: what the output head multiplies."""
        b, t, _ = inputs_embeds.shape
        if t > self.cfg.max_length:
            raise ValueError(f"sequence length {t} exceeds the built-in LM's max_length {self.cfg.max_length}")
        if attention_mask is not None and _checks.value_checks_enabled(attention_mask) and t > 1:
            if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
                raise ValueError("the built-in LM takes right-padded batches: attention_mask must be 1s then 0s "
                                 "in every row (use collate)")
        positions = torch.arange(t, device=inputs_embeds.device).repeat(b)
        cos, sin = rope_1d_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = inputs_embeds
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.norm(x)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab)."""
        return F.linear(self.hidden_states(inputs_embeds, attention_mask), self.embed.weight)

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the output head: logits = F.linear(hidden_states(...), weight, bias)."""
        return self.embed.weight, None


def decoder_layer_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The ModuleLists of a Hugging Face model whose entries are of the classes it names in `_no_split_modules`
    (its decoder layers: LlamaDecoderLayer, Qwen2DecoderLayer, GPT2Block...), the unit that accelerate's and
    transformers' FSDP wrapping shard by. Left out: a list whose layers share parameters (Zamba's shared
    block). Empty for a model that names none: the LM is then one unit (parallelize warns)."""
    names = set(getattr(model, "_no_split_modules", None) or ())

    def is_layer(m: nn.Module) -> bool:  # also inside a checkpoint wrapper, or as FSDP2's subclass of it
        return any(c.__name__ in names for c in type(getattr(m, "_checkpoint_wrapped_module", m)).__mro__)

    def shares_parameters(layers: nn.ModuleList) -> bool:
        # (Zamba's layers share one transformer block: FSDP2 cannot give a parameter to two units)
        seen: set[int] = set()
        for layer in layers:
            own = {id(p) for p in layer.parameters()}
            if own & seen:
                return True
            seen |= own
        return False

    return [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and all(map(is_layer, m))
            and not shares_parameters(m)]


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM loaded from a local directory (local_files_only: never downloaded).

    dtype: of the parameters, float32 by default whatever the checkpoint's (transformers 5 loads a bf16 checkpoint
    in bf16): the optimizer keeps fp32 weights as for the vision tower, mixed precision computes in bf16, and
    FSDP2 takes one dtype per unit (the root holds the LM's embeddings beside the fp32 merger and projector).
    weights: False builds the architecture of DIR/config.json alone, without reading its weights (also on the meta
    device, where from_pretrained refuses to run), for a checkpoint of ours to be loaded into."""

    def __init__(self, path: str, dtype: torch.dtype | None = torch.float32, weights: bool = True):
        super().__init__()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"lm={path!r} is neither 'builtin' nor a local directory holding a Hugging Face "
                                    f"causal LM (config.json and weights)")
        try:
            import transformers
        except ImportError as err:
            raise ImportError(f"lm={path!r} needs the `transformers` package to load a Hugging Face causal LM; "
                              f"install it (`pip install transformers`) or use lm='builtin'") from err
        kwargs = {}
        if dtype is not None:  # (`dtype` since transformers 4.56; `torch_dtype` before, deprecated after)
            from packaging.version import Version  # (a dependency of transformers)

            kwargs["dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"] = dtype
        if weights:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
        else:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            self.model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.hidden_size = self.model.get_input_embeddings().embedding_dim

    def layer_lists(self) -> list[nn.ModuleList]:
        """The decoder's layer stacks (`decoder_layer_lists`): what the trainer's activation checkpointing,
        compile and FSDP2 treat as blocks, as they do the towers' and the built-in LM's."""
        return decoder_layer_lists(self.model)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # use_cache=False: a key/value cache filled in the forward would be filled again when a checkpointed layer
        # recomputes (parallel.activation_checkpointing wraps the decoder layers), doubling its keys
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).logits

    # config attributes of Hugging Face models whose logits are not just F.linear(last hidden state, head): soft
    # capping (Gemma 2 and 3, xLSTM), a logit scale (Cohere), logits scaling (Granite), a head multiplier
    # (Falcon-H1). Such a model keeps the full logits. A soft cap barely moves small logits, so the numeric check
    # in head_loss_supported cannot be relied on to catch it: it is named here.
    LOGIT_TRANSFORMS = ("final_logit_softcapping", "output_logit_soft_cap", "logit_scale", "logits_scaling",
                        "lm_head_multiplier")

    def head_loss_supported(self) -> bool:
        """Whether logits are F.linear(hidden_states(...), *output_head()): the base model under
        base_model_prefix, an output embedding with a weight, none of LOGIT_TRANSFORMS set, and, checked once on
        a 4-token input (eval mode, no gradient), the same logits both ways (to 1e-3 of their largest)."""
        if getattr(self, "_head_loss_supported", None) is None:
            self._head_loss_supported = self._head_loss_check()
        return self._head_loss_supported

    def _head_loss_check(self) -> bool:
        config = getattr(self.model, "config", None)
        if any(getattr(config, name, None) not in (None, 1, 1.0) for name in self.LOGIT_TRANSFORMS):
            return False
        head = self.model.get_output_embeddings()
        prefix = getattr(self.model, "base_model_prefix", "")
        if not (isinstance(getattr(head, "weight", None), torch.Tensor)
                and isinstance(getattr(self.model, prefix, None), nn.Module)):
            return False
        embed = self.get_input_embeddings().weight
        probe = torch.randn(1, 4, embed.shape[1], device=embed.device, generator=torch.Generator(
            device=embed.device).manual_seed(0)).to(embed.dtype)
        was_training = self.model.training
        try:
            self.model.eval()
            # eager: in compiled layers the probe's no-grad call compiled a graph that no step uses
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                want = self.forward(probe).float()
                got = F.linear(self.hidden_states(probe), *self.output_head()).float()
        finally:
            self.model.train(was_training)
        return got.shape == want.shape and bool(
            (got - want).abs().max() <= 1e-3 * want.abs().max().clamp_min(1e-6))

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        base = getattr(self.model, self.model.base_model_prefix)
        return base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)


# ---------------------------------------------------------------------------------------------------------------
# Samples


def build_example(prompt_ids: Sequence[int], answer_ids: Sequence[int], n_image_tokens: int, placeholder_id: int,
                  *, bos_id: int | None = None, eos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), int64 of one length: [bos] + n_image_tokens placeholders + prompt + answer + [eos].

    labels equal input_ids on the answer (and eos) and are -100 elsewhere; the loss predicts token t + 1 from
    position t, so only answer tokens are ever targets. n_image_tokens: the image's merged token count
    (patch rows * cols / 4)."""
    if n_image_tokens < 0:
        raise ValueError(f"n_image_tokens must be >= 0, got {n_image_tokens}")
    if len(answer_ids) == 0 and eos_id is None:
        raise ValueError("answer_ids is empty and there is no eos_id: the sample would have no target")
    head = ([bos_id] if bos_id is not None else []) + [placeholder_id] * n_image_tokens + list(prompt_ids)
    answer = list(answer_ids) + ([eos_id] if eos_id is not None else [])
    input_ids = torch.tensor(head + answer, dtype=torch.long)
    labels = torch.tensor([IGNORE_INDEX] * len(head) + answer, dtype=torch.long)
    return input_ids, labels


def collate(examples: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs into (input_ids, labels, attention_mask), each (B, T_max)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    longest = max(ids.numel() for ids, _ in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        if ids.shape != lab.shape:
            raise ValueError(f"example {i}: input_ids {tuple(ids.shape)} and labels {tuple(lab.shape)} differ")
        input_ids[i, :ids.numel()] = ids
        labels[i, :ids.numel()] = lab
        mask[i, :ids.numel()] = 1
    return input_ids, labels, mask


def image_token_count(rows: int, cols: int, merge: int = 2) -> int:
    """Merged tokens of an image of rows x cols patches: what its sample's placeholders must number."""
    if rows % merge or cols % merge:
        raise ValueError(f"an image of {rows}x{cols} patches does not split into {merge}x{merge} groups")
    return rows * cols // (merge * merge)


# ---------------------------------------------------------------------------------------------------------------
# The aligner


def _check_merge_groups(cu_seqlens: torch.Tensor, pos: torch.Tensor) -> None:
    """The merger concatenates each 4 consecutive tokens: they must be a 2x2 group of patches, (r, c), (r, c + 1),
    (r + 1, c), (r + 1, c + 1) with r and c even, as build_positions orders them with merge=2 (data.merge=2)."""
    if bool((cu_seqlens % 4 != 0).any()):
        raise ValueError(f"every image must have a whole number of 2x2 groups: cu_seqlens must be multiples "
                         f"of 4, got {cu_seqlens.tolist()}")
    groups = pos[:int(cu_seqlens[-1])].to(torch.int64).view(-1, 4, 2)
    offsets = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], device=pos.device)
    bad = ((groups - groups[:, :1]) != offsets).any(-1).any(-1) | (groups[:, 0] % 2 != 0).any(-1)
    if bool(bad.any()):
        g = int(bad.nonzero()[0, 0])
        raise ValueError(f"pos must order each image's patches in 2x2 groups, (r, c), (r, c+1), (r+1, c), (r+1, c+1) "
                         f"with r and c even (build_positions with merge=2; data.merge=2): tokens {4 * g}..{4 * g + 3} "
                         f"are at {groups[g].tolist()}")


class Aligner(nn.Module):
    """Vision tower + merger + projector + causal LM. `visual` may be a stage-1 model's tower (shared, not
    copied); its pooling head gets no gradient in stage 2 and is frozen here, so that DDP finds no unused
    parameters."""

    def __init__(self, cfg: AlignerConfig, visual: VisionTower | None = None, lm: nn.Module | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if visual is None:
            visual = VisionTower(cfg.vision, cfg.embed_dim, cfg.attn_backend, cfg.rope_backend,
                                 cfg.grad_checkpointing)
        if visual.merge != 2:
            raise ValueError(f"the vision tower's tokens must come in 2x2 groups (merge=2), got merge={visual.merge}")
        self.visual = visual
        self.visual.pool.requires_grad_(False)
        if lm is None:
            lm = BuiltinLM(cfg.builtin_lm) if cfg.lm == "builtin" else HFCausalLM(cfg.lm)
        self.lm = lm
        width = visual.width
        merger_out = cfg.merger_out or width
        self.merger = PatchMerger(width, cfg.merger_hidden or 4 * width, merger_out, cfg.vision.norm_eps)
        self.projector = Projector(merger_out, lm.hidden_size)
        self.placeholder_id = cfg.placeholder_id if cfg.placeholder_id >= 0 else lm.vocab_size
        set_norm_backend(self, cfg.norm_backend)
        set_swiglu_backend(self, cfg.swiglu_backend)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        if isinstance(self.lm, BuiltinLM):
            self.lm.grad_checkpointing = enable
        elif enable and hasattr(self.lm, "model"):
            self.lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def encode_images(self, patches: torch.Tensor, cu_seqlens: torch.Tensor, pos: torch.Tensor, max_seqlen: int,
                      seqlens: list[int] | None = None, padding_tokens: int = 0) -> torch.Tensor:
        """(cu_seqlens[-1] / 4, lm hidden): each image's merged tokens in the packed order, projected for the LM
        (padding rows, if any, dropped)."""
        if _checks.value_checks_enabled(cu_seqlens):
            _check_merge_groups(cu_seqlens, pos)
        tokens = self.visual.forward_tokens(patches, cu_seqlens, pos, max_seqlen, seqlens, padding_tokens)
        if padding_tokens:
            tokens = tokens[:tokens.shape[0] - padding_tokens]
        return self.projector(self.merger(tokens))

    def splice(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, cu_merged: torch.Tensor,
               sample_image: torch.Tensor | None = None, image_tokens: int | None = None) -> torch.Tensor:
        """The LM's input embeddings (B, T, H): token embeddings, with the placeholders of each sample (row
        order) replaced by its image's merged tokens. Sample b uses image sample_image[b] (default: image b).
        image_tokens: the number of placeholders in input_ids, where the caller knows it on the host (else it is
        read from the device: a synchronisation)."""
        is_image = input_ids == self.placeholder_id
        lengths = cu_merged[1:] - cu_merged[:-1]
        n_images = lengths.numel()
        if sample_image is None:
            if n_images != input_ids.shape[0]:
                raise ValueError(f"{input_ids.shape[0]} samples but {n_images} images; pass sample_image to say "
                                 f"which image each sample uses")
            rows = image_embeds
            per_sample = lengths
        else:
            if sample_image.shape != (input_ids.shape[0],):
                raise ValueError(f"sample_image must have shape ({input_ids.shape[0]},), got "
                                 f"{tuple(sample_image.shape)}")
            per_sample = lengths[sample_image]
            starts = cu_merged[:-1][sample_image].long()
            # the gathered rows' count sizes the gather: the caller's, or a host read
            total = int(per_sample.sum()) if image_tokens is None else image_tokens
            owner = torch.repeat_interleave(torch.arange(per_sample.numel(), device=input_ids.device),
                                            per_sample.long(), output_size=total)
            offset = torch.arange(total, device=input_ids.device) - (per_sample.long().cumsum(0) - per_sample)[owner]
            rows = image_embeds[starts[owner] + offset]
        if _checks.value_checks_enabled(input_ids):
            counts = is_image.sum(1)
            if not torch.equal(counts.to(per_sample.dtype), per_sample):
                raise ValueError(f"placeholder tokens (id {self.placeholder_id}) per sample {counts.tolist()} do not "
                                 f"match the merged image tokens per sample {per_sample.tolist()}")
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        return embeds.masked_scatter(is_image[..., None], rows.to(embeds.dtype))

    def forward(self, patches: torch.Tensor, cu_seqlens: torch.Tensor, pos: torch.Tensor, max_seqlen: int,
                input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, seqlens: list[int] | None = None,
                sample_image: torch.Tensor | None = None, padding_tokens: int = 0,
                return_logits: bool | None = None, image_tokens: int | None = None,
                n_targets: int | None = None) -> dict[str, Any]:
        """Packed images (PackedBatch's fields), input_ids / labels / attention_mask (B, T) as `collate` makes
        them. Returns, with labels, the mean next-token cross-entropy over answer tokens (`loss`) and their count
        (`n_targets`); and the logits (B, T, V) (`logits`) when return_logits (default: only without labels).

        Without logits, the loss runs the output head on the answer positions only, in chunks
        (fineviti.ops.linear_cross_entropy): no (B, T, V) tensor exists, and the image and prompt positions,
        most of a region sample, cost no head FLOPs. Finding those positions reads their count on the host (one
        synchronisation), and so does sizing the images' rows for samples that share images (sample_image); a
        caller that knows both on the host passes them, and the forward reads nothing from the device:
        image_tokens, the placeholders in input_ids, and n_targets, the labels[:, 1:] other than -100 (with value
        checks, both are checked). A Hugging Face LM whose logits are more than its head's product
        (HFCausalLM.head_loss_supported) takes the full logits."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        image_embeds = self.encode_images(patches, cu_seqlens, pos, max_seqlen, seqlens, padding_tokens)
        if _checks.value_checks_enabled(input_ids):
            flags = {"image_tokens": (image_tokens, input_ids == self.placeholder_id)}
            if labels is not None:
                flags["n_targets"] = (n_targets, labels[:, 1:] != IGNORE_INDEX)
            for name, (given, counted) in flags.items():
                if given is not None and given != int(counted.sum()):
                    raise ValueError(f"{name}={given} but the batch has {int(counted.sum())}")
        inputs_embeds = self.splice(input_ids, image_embeds, torch.div(cu_seqlens, 4, rounding_mode="floor"),
                                    sample_image, image_tokens=image_tokens)
        if return_logits is None:
            return_logits = labels is None
        if labels is None and not return_logits:
            raise ValueError("return_logits=False without labels leaves nothing to return: pass labels (for the "
                             "loss) or return_logits=True")
        if labels is not None and not return_logits and self._head_loss_supported():
            hidden = self.lm.hidden_states(inputs_embeds, attention_mask)
            loss, count = answer_token_loss(hidden, labels, *self.lm.output_head(), n_targets=n_targets)
            return {"loss": loss, "n_targets": count}
        logits = self.lm(inputs_embeds, attention_mask)
        out: dict[str, Any] = {"logits": logits} if return_logits else {}
        if labels is not None:
            out["loss"], out["n_targets"] = next_token_loss(logits, labels)
        return out

    def _head_loss_supported(self) -> bool:
        if not (hasattr(self.lm, "hidden_states") and hasattr(self.lm, "output_head")):
            return False  # an LM module of the caller's own: its forward's logits
        check = getattr(self.lm, "head_loss_supported", None)
        return check() if check is not None else True

    @torch.no_grad()
    def generate(self, patches: torch.Tensor, cu_seqlens: torch.Tensor, pos: torch.Tensor, max_seqlen: int,
                 input_ids: torch.Tensor, max_new_tokens: int = 32, eos_id: int | None = None) -> torch.Tensor:
        """Greedy decoding for one image and one prompt (input_ids (T,) with its placeholders): returns the new
        tokens (up to max_new_tokens, stopping after eos_id). Recomputes the whole sequence per token (no cache):
        for the demo and the evaluation of small models."""
        image_embeds = self.encode_images(patches, cu_seqlens, pos, max_seqlen)
        cu_merged = torch.div(cu_seqlens, 4, rounding_mode="floor")
        ids = input_ids.view(1, -1)
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = self.lm(self.splice(ids, image_embeds, cu_merged), None)
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token == eos_id:
                break
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        return torch.tensor(new, dtype=torch.long)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of logits[:, t] against labels[:, t + 1] over targets != -100 (fp32), and their count.
    A batch without targets gives 0 (with a gradient of 0), not NaN."""
    targets = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum()
    return total / count.clamp(min=1), count


def answer_token_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None, n_targets: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """next_token_loss without the logits: the final hidden states (B, T, H) at the positions whose next token is
    a target, through the output head (weight (V, H), bias) in chunks. Same value and gradients as
    next_token_loss(F.linear(hidden, weight, bias), labels), up to the order of the sums. n_targets: the number of
    targets, where the caller knows it on the host (else read from the device: a synchronisation)."""
    from fineviti.ops import linear_cross_entropy

    targets = labels[:, 1:]
    is_target = targets != IGNORE_INDEX
    if n_targets is None:
        where = is_target.nonzero(as_tuple=True)  # the host read: the number of targets
    else:  # the targets' positions in order, without a read: first after a stable sort of the flags
        flat = torch.sort(is_target.reshape(-1).to(torch.int8), descending=True, stable=True).indices[:n_targets]
        where = (flat // targets.shape[1], flat % targets.shape[1])
    # (indexed, not reshaped: hidden[:, :-1] is a view, and a reshape would copy all of it)
    loss, count = linear_cross_entropy(hidden[:, :-1][where], weight, targets[where], bias, reduction="mean")
    return loss, count


def create_aligner(preset: str | config_mod.ModelConfig | AlignerConfig = "tiny", *, visual: VisionTower | None = None,
                   lm: nn.Module | None = None, device: torch.device | str | None = None,
                   **overrides: Any) -> Aligner:
    """The stage-2 model for a stage-1 preset (or config) or an AlignerConfig, with overrides (dotted keys as in
    create_model, e.g. lm="/path/to/local/hf_model", **{"builtin_lm.vocab_size": 5000}). visual: a trained
    stage-1 tower to start from (its config wins over the preset's vision config)."""
    if isinstance(preset, AlignerConfig):
        cfg = config_mod.apply_overrides(preset, overrides)
    else:
        cfg = config_mod.aligner_config(preset, **overrides)
    if visual is not None:
        cfg = dataclasses.replace(cfg, vision=visual.cfg)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return Aligner(cfg, visual=visual, lm=lm)

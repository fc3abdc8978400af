"""Process groups, and parallelism applied in one place in a fixed order: activation checkpointing, compile, then
FSDP2 (fully_shard per block, then the root) or DDP. On one process only the first two apply.

Launch with torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment); gloo on CPUs, NCCL on
GPUs. The blocks are every nn.ModuleList named `blocks` in the model (the two towers, the built-in LM) and a
Hugging Face LM's decoder layers (`block_lists`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    group: object = None  # the process group of the contrastive negatives (None on one process)
    owns_group: bool = False  # this World created the default process group (and destroys it on close)
    # every rank, on gloo: for host values (counts, flags, the loss for the metrics), which on NCCL would go
    # through the GPU and make the host wait for every kernel queued before them
    host_group: object = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_world(cfg, device: str) -> World:
    """The device, and the process group when torchrun started several processes (an existing default group is
    used as it is, and left to its owner)."""
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("training.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        return World(device=dev)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("parallel.backend=nccl needs training.device=cuda")
    owns = not dist.is_initialized()
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if owns:
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    # (new_group is collective over every rank: each calls init_world at the same point)
    host = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                 group=dist.group.WORLD, owns_group=owns, host_group=host)


def close_world(world: World) -> None:
    if not dist.is_initialized():
        return
    if world.owns_group:
        dist.destroy_process_group()  # (every group with it)
    elif world.host_group is not None and world.host_group is not dist.group.WORLD:
        dist.destroy_process_group(world.host_group)  # ours, in the caller's default group


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """Every nn.ModuleList named `blocks`, and the lists a module declares with a `layer_lists()` method (a Hugging
    Face LM's decoder layers, model.aligner.HFCausalLM): each once."""
    found = [m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "blocks"]
    for module in model.modules():
        declared = getattr(module, "layer_lists", None)
        if callable(declared):
            found += [m for m in declared() if not any(m is f for f in found)]
    return found


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> int:
    """Wraps blocks in torch's non-reentrant checkpoint wrapper: all of them ("full") or every `every`-th
    ("selective", torchtitan's layer-level selection). Returns how many blocks were wrapped."""
    if mode == "none":
        return 0
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    wrapped = 0
    for blocks in block_lists(model):
        for i in range(len(blocks)):
            if mode == "full" or i % every == 0:
                blocks[i] = checkpoint_wrapper(blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                wrapped += 1
    return wrapped


def apply_compile(model: nn.Module) -> int:
    """torch.compile each block (in place: parameter names do not change), with dynamic shapes from the first call:
    the packed token count changes every step, and compiled static first, each tower's blocks compiled twice (the
    first step's shapes, then dynamic ones at the second step)."""
    count = 0
    for blocks in block_lists(model):
        for block in blocks:
            block.compile(dynamic=True)
            count += 1
    return count


def mixed_precision_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[setting]


def apply_fsdp(model: nn.Module, cfg, param_dtype: torch.dtype | None) -> nn.Module:
    """fully_shard per block, then the root. Scalar parameters (the logit scale and bias) cannot be sharded: they
    stay replicated, outside FSDP, and `reduce_replicated_grads` averages their gradients."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for blocks in block_lists(model):
        for block in blocks:
            fully_shard(block, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    scalars = {p for p in model.parameters() if p.dim() == 0}
    fully_shard(model, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward,
                ignored_params=scalars or None)
    return model


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters FSDP2 left unsharded (plain tensors among DTensors): their gradients need an
    all-reduce of their own."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    if not any(isinstance(p, DTensor) for p in params):
        return []
    return [p for p in params if not isinstance(p, DTensor)]


def reduce_replicated_grads(params: list[nn.Parameter], world: World) -> None:
    """Averages the gradients of `params` over the ranks (what DDP or FSDP would have done)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world.world_size
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


class LossScaler:
    """Dynamic loss scaling for fp16 (torch.amp.GradScaler's rule: start at 2**16, halve the scale after an
    overflow, double it after `growth_interval` clean steps), kept on the host and driven by the global gradient
    norm that clip_grad_norm computes, so that every rank takes the same decision (under FSDP2 each rank sees only
    its shards; GradScaler's own check is per rank and cannot take DTensor and plain gradients in one call)."""

    MIN_SCALE = 2.0**-24  # fp16's smallest subnormal: gradients still non-finite at a scale below it are no overflow

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self.clean_steps, self.overflows_in_a_row = growth_interval, 0, 0

    def scaled(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.scale

    def unscale_(self, params: list[nn.Parameter]) -> None:
        """Divides the gradients by the scale, in place (DTensor shards and plain tensors alike)."""
        for group in grad_groups(params):
            if group:
                torch._foreach_mul_(group, 1.0 / self.scale)

    def update(self, finite: bool) -> None:
        """After a step: an overflow (`finite` False: the update was skipped) halves the scale, a run of clean
        steps doubles it."""
        if not finite:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.overflows_in_a_row += 1
            return
        self.overflows_in_a_row = 0
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "overflows_in_a_row": self.overflows_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        """(A checkpoint from before overflows_in_a_row was saved restores 0.)"""
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
        self.overflows_in_a_row = int(state.get("overflows_in_a_row", 0))


def grad_groups(params: list[nn.Parameter]) -> list[list[torch.Tensor]]:
    """The parameters' gradients as [DTensor shards, plain tensors]: a foreach op takes one kind at a time."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    return [[g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]]


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, read: bool = True):
    """The global gradient norm (over DTensor shards and plain tensors alike), and the gradients scaled down to
    max_norm when it is larger (max_norm = inf: only the norm). read=False: the norm stays a device tensor (fp64,
    0-d) and the gradients are scaled by a factor computed on the device, min(1, max_norm / (norm + 1e-6)), the
    same as the host's; nothing is read (a non-finite norm then makes the gradients non-finite)."""
    from torch.distributed.tensor import DTensor

    groups = grad_groups(params)
    norms = []
    for group in groups:
        if group:
            norm = torch.nn.utils.get_total_norm(group, norm_type=2.0, foreach=True)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    # both groups (FSDP2's shards and its replicated parameters) in float64, as the host summed them before: one
    # group's norm comes back exactly
    device = params[0].device if params else torch.device("cpu")
    on_device = (torch.stack([n.double() for n in norms]).square().sum().sqrt() if norms
                 else torch.zeros((), dtype=torch.float64, device=device))
    if not read:
        if max_norm != float("inf"):
            # (a true division, as the host's: max_norm / tensor is reciprocal() * max_norm, rounded otherwise)
            coef = torch.div(torch.full_like(on_device, max_norm), on_device + 1e-6).clamp(max=1.0)
            for group in groups:
                if group:
                    _scale_grads(group, coef)
        return on_device
    total = float(on_device)  # the one read of the device
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for group in groups:
            if group:
                torch._foreach_mul_(group, coef)
    return total


def _scale_grads(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    """grads *= coef (a 0-d fp64 device tensor) rounded to each gradient's dtype: as the host's float factor for
    fp32 gradients; for 16-bit ones as on a CPU (CUDA multiplies them by a float factor in fp32: the last bit can
    differ; no trained parameter has 16-bit gradients here, FSDP2 reduces in fp32)."""
    from torch.distributed.tensor import DTensor

    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]  # (a shard scales like its whole)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in local:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, same in by_dtype.items():
        torch._foreach_mul_(same, coef.to(dtype))


def apply_ddp(model: nn.Module, world: World) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def parallelize(model: nn.Module, cfg, world: World, mp_dtype: torch.dtype | None) -> nn.Module:
    """The model, moved to the device, with activation checkpointing, compile and FSDP2/DDP applied in that
    order. With FSDP2 the mixed-precision policy casts the parameters (the trainer then skips autocast)."""
    model.to(world.device)
    fsdp = world.distributed and cfg.strategy == "fsdp"
    uses_blocks = cfg.activation_checkpointing != "none" or cfg.compile or fsdp
    for name, module in model.named_modules():
        declared = getattr(module, "layer_lists", None)
        if uses_blocks and callable(declared) and not declared():
            import warnings

            warnings.warn(f"{name or 'the model'} ({type(getattr(module, 'model', module)).__name__}) declares no "
                          f"layer list (a Hugging Face model without _no_split_modules, or whose layers share "
                          f"parameters): parallel.activation_checkpointing and parallel.compile leave it as it is, "
                          f"and FSDP2 shards it as one unit", stacklevel=2)
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.selective_every)
    if cfg.compile:
        apply_compile(model)
    if not world.distributed:
        return model
    if cfg.strategy == "fsdp":
        return apply_fsdp(model, cfg, mp_dtype)
    return apply_ddp(model, world)


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (FSDP2 shards in place: the model is itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Every FSDP2 module of `model` gathered (for calls that bypass forward, such as encode_image); nothing
    without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()


def no_grad_sync(model: nn.Module, sync: bool):
    """Context (DDP) or switch (FSDP2) that holds back the gradient reduction of a backward when sync is False."""
    if sync:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and isinstance(getattr(model, "module", None), nn.Module):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()

"""Training configs: one small dataclass per component, a JobConfig that holds them, presets as functions, and
`key=value` overrides from the command line.

    cfg = preset("tiny")                                   # a full JobConfig
    cfg = apply_cli_overrides(cfg, ["training.steps=50", "optimizer.lr=3e-4", "model.vision.depth=2"])

A value is parsed by the type of the field it sets (int, float, bool, str, `X | None` with "none", tuples as
comma-separated lists); an unknown key or a value of the wrong type is an error that names the key, the value and
what was expected. The model (`model`, stage 1) and the aligner (`aligner`, stage 2) configs are the model
package's own dataclasses; the data config is the loader's (fineviti.data.loader.DataConfig).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from fineviti._json import infinities_as_text
from fineviti.model.config import AlignerConfig, BuiltinLMConfig, ModelConfig
from fineviti.model.config import preset as model_preset


def _data_config_cls():
    from fineviti.data.loader import DataConfig

    return DataConfig


def _default_data():
    return _data_config_cls()(path="data/synthetic/train", token_budget=4096, max_text_tokens=256)


@dataclasses.dataclass
class RandomDataConfig:
    """Random packed batches (no files): benchmarks and tests. Batch k of rank r is a pure function of
    (seed, k, r), so a resumed run sees the batches it would have seen."""

    token_budget: int = 4096  # patch tokens per rank and step
    min_side: int = 4  # patch-grid side range of an image (rounded to multiples of the model's merge)
    max_side: int = 32
    min_text: int = 16  # caption lengths in tokens
    max_text: int = 256
    seed: int = 0


@dataclasses.dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw (torch) | apex_fused_adam (apex.optimizers.FusedAdam: unverified)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to biases, norms, the pooling query and the logit scale/bias
    implementation: str = "auto"  # auto (fused on CUDA, foreach otherwise) | fused | foreach | for_loop


@dataclasses.dataclass
class SchedulerConfig:
    # linear from warmup_init * lr to lr: the warmup's step s (0-based) takes init + (1 - init) * (s + 1) / warmup,
    # so its last step is at lr already and the first step above warmup_init (as timm's and torchtitan's)
    warmup_steps: int = 100
    warmup_init: float = 0.0
    # cosine | linear | constant: after the warmup, from lr toward min_lr_ratio * lr, which the schedule reaches at
    # step training.steps (0-based), one past the last step taken (Hugging Face's convention: no step at the floor)
    decay: str = "cosine"
    min_lr_ratio: float = 0.0


@dataclasses.dataclass
class TrainingConfig:
    stage: int = 1  # 1: contrastive two-tower; 2: vision tower + merger + projector + LM on region tasks
    steps: int = 1000  # optimizer steps; 0: as many as data.epochs give (the last, split, step included)
    seed: int = 0
    data_source: str = "shards"  # shards (the data set at data.path) | random (RandomDataConfig)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    # stage 1: caption tokens per step: "64" or a schedule "0:64,800:256" (from step 0 on 64 tokens, from 800 on
    # 256); captions are cut keeping their first tokens and the final <eos> (stage 2 keeps its region samples whole)
    text_length: str = "256"
    # stage 1: GradCache chunk size in images; 0: the whole batch in one forward/backward (stage 2 refuses > 0)
    grad_cache_images: int = 0
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, none on CPU) | bf16 | fp16 (dynamic loss scaling) | none
    device: str = "auto"  # auto | cpu | cuda


@dataclasses.dataclass
class ParallelConfig:
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard); ignored on one process
    activation_checkpointing: str = "none"  # none | full (every block) | selective (every `selective_every` block)
    selective_every: int = 2
    compile: bool = False  # torch.compile each block
    reshard_after_forward: bool = True  # FSDP2
    backend: str = "auto"  # process group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: int = 600


@dataclasses.dataclass
class CheckpointConfig:
    interval: int = 0  # save every `interval` steps (0: only at the end)
    keep: int = 2  # checkpoints kept (the newest); 0 keeps all
    async_save: bool = False  # torch.distributed.checkpoint.async_save: the step goes on while it writes
    # "" (start fresh), "auto" (the newest checkpoint of the run dir if any), or a checkpoint path; a run that saves
    # moves the run dir's checkpoints of later steps than its start (and of its start step, if it resumed from
    # elsewhere) to checkpoints/superseded-<time>/ (see train.checkpoint)
    resume: str = ""
    save_final: bool = True
    export: str = ""  # at the end, also write model.safetensors: "" | vision | full


@dataclasses.dataclass
class MetricsConfig:
    # a JSONL and TensorBoard row every N steps (and at the last step, checkpoints and evaluations); the steps
    # between rows read nothing from the device: their loss and gradient norm are checked, in one read, at the next
    # row or checkpoint (a non-finite one then stops the run there, naming its step). fp16 reads every step (its
    # loss scale): its rows every N steps and at the last, each with that step's rates
    log_every: int = 1
    tensorboard: str = "auto"  # auto (when installed) | on | off
    progress: str = "auto"  # auto (a bar on a TTY) | on | off
    profile: str = ""  # "START:END": a torch.profiler trace of steps START..END (inclusive) in run_dir/profile
    nvtx: bool = True  # NVTX ranges around the phases of a step (CUDA only)


@dataclasses.dataclass
class EvalConfig:
    """Evaluation during stage-1 training (fineviti.eval): retrieval on a held-out folder of shards."""

    every: int = 0  # evaluate every `every` steps (0: never during training)
    path: str = ""  # held-out shards (e.g. data/synthetic/heldout); the training tokenizer reads their captions
    max_images: int = 500  # the first images of the folder (0: all of them)
    token_budget: int = 8192  # patch tokens per evaluation batch


@dataclasses.dataclass
class Stage2Config:
    init_from: str = ""  # a stage-1 checkpoint (folder) whose vision tower stage 2 starts from; "" = random init
    freeze: str = ""  # comma-separated parts kept frozen: vision, merger, projector, lm (e.g. "lm")
    # the frozen parts' weights: auto (in the mixed-precision dtype, which autocast computes with anyway: half the
    # memory, no cast per step; fp32 without mixed precision and under FSDP2, whose policy casts per unit) | fp32
    frozen_dtype: str = "auto"
    vision_lr_scale: float = 0.1  # learning rate of each part as a multiple of optimizer.lr
    merger_lr_scale: float = 1.0
    projector_lr_scale: float = 1.0
    lm_lr_scale: float = 1.0
    regions_per_image: int = 4  # region tasks drawn per image and step (each box once at most)
    tasks: str = "box2caption,caption2box"  # box -> caption, caption -> box (coordinates as text, 0..1000)


@dataclasses.dataclass
class JobConfig:
    name: str = "run"
    run_dir: str = ""  # default: runs/<name>
    model: ModelConfig = dataclasses.field(default_factory=lambda: model_preset("tiny"))
    aligner: AlignerConfig = dataclasses.field(default_factory=AlignerConfig)
    data: Any = dataclasses.field(default_factory=_default_data)  # fineviti.data.loader.DataConfig
    random_data: RandomDataConfig = dataclasses.field(default_factory=RandomDataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    stage2: Stage2Config = dataclasses.field(default_factory=Stage2Config)

    @property
    def out_dir(self) -> str:
        return self.run_dir or f"runs/{self.name}"

    def validate(self) -> None:
        _choice("training.stage", self.training.stage, (1, 2))
        _choice("training.data_source", self.training.data_source, ("shards", "random"))
        _choice("training.mixed_precision", self.training.mixed_precision, ("auto", "bf16", "fp16", "none"))
        _choice("stage2.frozen_dtype", self.stage2.frozen_dtype, ("auto", "fp32"))
        _choice("training.device", self.training.device, ("auto", "cpu", "cuda"))
        _choice("optimizer.name", self.optimizer.name, ("adamw", "apex_fused_adam"))
        _choice("optimizer.implementation", self.optimizer.implementation, ("auto", "fused", "foreach", "for_loop"))
        _choice("scheduler.decay", self.scheduler.decay, ("cosine", "linear", "constant"))
        _choice("parallel.strategy", self.parallel.strategy, ("ddp", "fsdp"))
        _choice("parallel.activation_checkpointing", self.parallel.activation_checkpointing,
                ("none", "full", "selective"))
        _choice("parallel.backend", self.parallel.backend, ("auto", "nccl", "gloo"))
        _choice("checkpoint.export", self.checkpoint.export, ("", "vision", "full"))
        _choice("metrics.tensorboard", self.metrics.tensorboard, ("auto", "on", "off"))
        _choice("metrics.progress", self.metrics.progress, ("auto", "on", "off"))
        if hasattr(self.data, "validate"):
            self.data.validate("data.")
        if self.training.steps == 0 and (self.training.data_source != "shards" or self.data.epochs is None):
            if self.training.data_source != "shards":
                source, fix = (f"training.data_source={self.training.data_source!r}",
                               "training.data_source=shards with data.path")
            else:
                source, fix = "data.epochs=None (endless)", "data.epochs"
            raise ValueError(f"training.steps=0 (run to the end of data.epochs) needs data from shards with "
                             f"data.epochs set, got {source}; set {fix}, or training.steps >= 1")
        for key in ("training.steps", "metrics.log_every", "parallel.selective_every", "stage2.regions_per_image",
                    "random_data.token_budget", "random_data.min_side", "random_data.min_text"):
            value = get_key(self, key)
            if value < (0 if key == "training.steps" else 1):
                raise ValueError(f"{key} must be >= 1{' (or 0 with data.epochs)' if key == 'training.steps' else ''}"
                                 f", got {value}")
        name = Path(self.name)  # ("." and "" have no parts)
        if not self.run_dir and (not self.name.strip() or name.is_absolute() or not name.parts or ".." in name.parts):
            raise ValueError(f"name must name a folder inside runs/ (the run folder is runs/<name> unless run_dir is "
                             f"set), got {self.name!r}")
        for key in ("training.grad_cache_images", "checkpoint.interval", "checkpoint.keep",
                    "scheduler.warmup_steps", "eval.every", "eval.max_images", "random_data.seed"):
            value = get_key(self, key)
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        for key, value in _float_fields(self):  # (inf can mean "no limit": data.max_aspect, training.grad_clip)
            if math.isnan(value):
                raise ValueError(f"{key} must be a number, got nan")
        for key in ("scheduler.min_lr_ratio", "scheduler.warmup_init"):
            value = get_key(self, key)
            if not 0 <= value <= 1:
                raise ValueError(f"{key} must be in [0, 1] (a fraction of optimizer.lr), got {value}")
        window = parse_profile(self.metrics.profile)
        if window is not None and 0 < self.training.steps < window[1]:  # (0: known once the data is planned)
            raise ValueError(f"metrics.profile (--profile) {self.metrics.profile!r} ends after the run's last step "
                             f"(training.steps = {self.training.steps}): no trace would be written")
        if not 0 < self.optimizer.lr < math.inf:
            raise ValueError(f"optimizer.lr must be a finite number > 0, got {self.optimizer.lr}")
        betas = self.optimizer.betas
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1) (e.g. 0.9,0.95), got {betas}")
        if not 0 <= self.optimizer.eps < math.inf:
            raise ValueError(f"optimizer.eps must be a finite number >= 0, got {self.optimizer.eps}")
        if self.training.stage == 2 and self.training.seed < 0:  # seeds stage 2's region sampling (numpy's rng)
            raise ValueError(f"training.seed must be >= 0 in stage 2, got {self.training.seed}")
        if not 0 <= self.optimizer.weight_decay < math.inf:
            raise ValueError(f"optimizer.weight_decay must be a finite number >= 0, got {self.optimizer.weight_decay}")
        if self.eval.every:
            if self.eval.token_budget < 1:
                raise ValueError(f"eval.token_budget must be >= 1, got {self.eval.token_budget}")
            if self.training.data_source != "shards":
                raise ValueError(f"eval.every needs training.data_source=shards (the evaluation reads captions with "
                                 f"the data set's tokenizer), got {self.training.data_source!r}")
        if self.training.grad_clip < 0:
            raise ValueError(f"training.grad_clip must be >= 0 (0 disables clipping), got {self.training.grad_clip}")
        if self.random_data.max_side < self.random_data.min_side:
            raise ValueError(f"random_data.max_side ({self.random_data.max_side}) must be >= random_data.min_side "
                             f"({self.random_data.min_side})")
        if self.random_data.max_text < self.random_data.min_text:
            raise ValueError(f"random_data.max_text ({self.random_data.max_text}) must be >= random_data.min_text "
                             f"({self.random_data.min_text})")
        if self.eval.every and not self.eval.path:
            raise ValueError("eval.every is set but eval.path is empty; expected a folder of held-out shards")
        if self.training.grad_cache_images and self.training.stage != 1:
            raise ValueError(f"training.grad_cache_images ({self.training.grad_cache_images}) is GradCache for stage "
                             f"1's contrastive loss; stage 2 runs each batch in one forward and backward: set it to 0 "
                             f"(or lower data.token_budget for memory)")
        if self.eval.every and self.training.stage != 1:
            raise ValueError("eval.every: evaluation during training is for stage 1 (retrieval)")
        parse_text_schedule(self.training.text_length)
        parse_profile(self.metrics.profile)
        parse_parts(self.stage2.freeze, "stage2.freeze", STAGE2_PARTS)
        parse_parts(self.stage2.tasks, "stage2.tasks", STAGE2_TASKS)
        if self.training.stage == 1:
            self.model.validate()
        else:
            self.aligner.validate()


STAGE2_PARTS = ("vision", "merger", "projector", "lm")
STAGE2_TASKS = ("box2caption", "caption2box")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")


def parse_parts(text: str, key: str, allowed) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    for part in parts:
        _choice(key, part, allowed)
    return parts


def parse_text_schedule(text: str) -> list[tuple[int, int]]:
    """"64" -> [(0, 64)]; "0:64,800:256" -> [(0, 64), (800, 256)] (from step s on, captions of at most n tokens;
    s counts the optimizer steps taken before, so 800 applies from the row logged as step 801)."""
    schedule = []
    for piece in str(text).split(","):
        piece = piece.strip()
        try:
            step, length = (int(v) for v in piece.split(":")) if ":" in piece else (0, int(piece))
        except ValueError:
            raise ValueError(f"training.text_length must be 'N' or 'STEP:N,STEP:N,...' with integers, got "
                             f"{text!r}") from None
        if length < 2 or step < 0:
            raise ValueError(f"training.text_length: {piece!r} needs a step >= 0 and a length >= 2 (<bos> and <eos>)")
        schedule.append((step, length))
    starts = [step for step, _ in schedule]
    twice = sorted({step for step in starts if starts.count(step) > 1})
    if twice:  # (sorted, the larger length won whatever the order written)
        raise ValueError(f"training.text_length gives step {twice[0]} more than one length, got {text!r}; expected "
                         f"each start step once")
    schedule.sort()
    if schedule[0][0] != 0:
        raise ValueError(f"training.text_length must start at step 0, got {text!r}")
    return schedule


def text_length_at(schedule: list[tuple[int, int]], step: int) -> int:
    length = schedule[0][1]
    for start, n in schedule:
        if step >= start:
            length = n
    return length


def _float_fields(cfg, prefix: str = ""):
    """(dotted key, value) of every float field of a config tree."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value, f"{prefix}{field.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{field.name}", value
        elif isinstance(value, tuple) and all(isinstance(v, float) for v in value):
            yield from ((f"{prefix}{field.name}[{i}]", v) for i, v in enumerate(value))


def parse_profile(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        start, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"metrics.profile (--profile) must be START:END with step numbers, got {text!r}") from None
    if not 1 <= start <= end:
        raise ValueError(f"metrics.profile (--profile) must satisfy 1 <= START <= END, got {text!r}")
    return start, end


# ---------------------------------------------------------------------------------------------------------------
# Presets: functions returning a full JobConfig


def _stage1(name: str, model: str, **data) -> JobConfig:
    cfg = JobConfig(name=name, model=model_preset(model))
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def tiny() -> JobConfig:
    """Stage 1 of the CPU demo: the `tiny` model on the synthetic data set, small native-resolution images (at most
    112 x 112 pixels, 64 patches), about 40 images a step. CLIP's softmax loss: SigLIP's bias starts at -10 for
    batches of thousands, and at 40 pairs a step it learned several times slower on this set (measured). At
    lr 1e-3 and above the towers stalled (gradient norm near 0) for about 100 steps early on; 5e-4 with a
    50-step warmup did not (held-out R@1 after 400 steps: 0.05 image->text, 0.08 text->image; chance 0.002)."""
    cfg = _stage1("tiny", "tiny", path="data/synthetic/train", token_budget=2048, max_pixels=112 * 112,
                  min_pixels=56 * 56, max_text_tokens=256, merge=2)
    cfg.model.text.vocab_size = 2000  # the synthetic data set's tokenizer
    cfg.model.loss = "clip"
    cfg.training.steps = 400
    cfg.training.text_length = "0:64,250:256"  # short captions first; the evaluation reads whole ones
    cfg.optimizer.lr = 5e-4
    cfg.optimizer.weight_decay = 0.05
    cfg.scheduler.warmup_steps = 50
    cfg.checkpoint.interval = 100
    return cfg


def tiny_stage2() -> JobConfig:
    """Stage 2 of the CPU demo: the tiny vision tower (from a stage-1 checkpoint) with the built-in LM."""
    cfg = tiny()
    cfg.name = "tiny-stage2"
    cfg.training.stage = 2
    cfg.training.steps = 80
    cfg.data.merge = 2
    cfg.aligner = AlignerConfig(vision=dataclasses.replace(cfg.model.vision), embed_dim=cfg.model.embed_dim,
                                builtin_lm=BuiltinLMConfig(vocab_size=2000, width=192, depth=2, heads=4,
                                                           mlp_hidden=512, max_length=512), name="tiny")
    cfg.stage2.regions_per_image = 2
    cfg.optimizer.lr = 1e-3
    cfg.scheduler.warmup_steps = 10
    cfg.checkpoint.interval = 40
    return cfg


def _gpu(name: str, model: str, budget: int) -> JobConfig:
    # the GPU decoders (DALI, nvJPEG) in the loader's prefetch thread: forked workers cannot use CUDA
    cfg = _stage1(name, model, path="data/train", token_budget=budget, num_workers=0, pixel_path="auto")
    cfg.model.text.vocab_size = 32000
    cfg.training.steps = 100_000
    cfg.training.text_length = "0:64,80000:256"
    cfg.optimizer.lr = 1e-3 if model == "base" else 5e-4
    cfg.optimizer.weight_decay = 0.1
    cfg.scheduler.warmup_steps = 2000
    cfg.checkpoint.interval = 1000
    cfg.checkpoint.async_save = True
    cfg.parallel.activation_checkpointing = "selective" if model == "base" else "full"
    return cfg


def base() -> JobConfig:
    """Stage 1 of the `base` model on GPUs (16k patch tokens per rank and step)."""
    return _gpu("base", "base", 16384)


def large() -> JobConfig:
    """Stage 1 of the `large` model on GPUs, FSDP2."""
    cfg = _gpu("large", "large", 16384)
    cfg.parallel.strategy = "fsdp"
    return cfg


def fine() -> JobConfig:
    """Stage 1 of the FineViT-sized model (0.86B vision tower) on GPUs, FSDP2 with full activation checkpointing."""
    cfg = _gpu("fine", "fine", 16384)
    cfg.parallel.strategy = "fsdp"
    cfg.optimizer.lr = 3e-4
    return cfg


def debug() -> JobConfig:
    """A model of a few thousand parameters on random packed batches, for tests and for trying the engine out:
    a step takes milliseconds on a CPU."""
    from fineviti.model.config import TextConfig, VisionConfig

    cfg = JobConfig(name="debug")
    cfg.model = ModelConfig(vision=VisionConfig(width=32, depth=2, heads=2, mlp_hidden=64),
                            text=TextConfig(vocab_size=96, context_length=256, width=32, depth=2, heads=2,
                                            mlp_hidden=64), embed_dim=16, name="debug")
    cfg.aligner = AlignerConfig(vision=dataclasses.replace(cfg.model.vision), embed_dim=16,
                                builtin_lm=BuiltinLMConfig(vocab_size=96, width=32, depth=2, heads=2, mlp_hidden=64,
                                                           max_length=512), name="debug")
    cfg.training.data_source = "random"
    cfg.training.steps = 6
    cfg.training.text_length = "0:16,3:24"
    cfg.random_data = RandomDataConfig(token_budget=192, min_side=2, max_side=8, min_text=4, max_text=24)
    cfg.optimizer.lr = 3e-3
    cfg.scheduler.warmup_steps = 2
    cfg.metrics.progress = "off"
    cfg.metrics.tensorboard = "off"
    return cfg


PRESETS = {"debug": debug, "tiny": tiny, "tiny-stage2": tiny_stage2, "base": base, "large": large, "fine": fine}


def preset(name: str) -> JobConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------------------------
# Overrides


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def get_key(cfg, key: str):
    value = cfg
    for piece in key.split("."):
        value = getattr(value, piece)
    return value


def _parse_value(key: str, text: str, hint, current):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return _parse_value(key, text, candidate, current)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if hint is Any:  # an untyped field: keep the current value's type
        hint = type(current) if current is not None else str
    if origin is tuple:
        pieces = [p.strip() for p in text.strip("()[] ").split(",") if p.strip()]
        element = args[0] if args else str
        if args and args[-1] is not Ellipsis and len(pieces) != len(args):
            raise ValueError(f"config key {key!r} takes {len(args)} comma-separated values, got {text!r}")
        return tuple(_parse_value(key, p, element, None) for p in pieces)
    if hint is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config key {key!r} takes a bool (true/false), got {text!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"config key {key!r} takes an int, got {text!r}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"config key {key!r} takes a float, got {text!r}") from None
    if hint is str:
        return text
    raise ValueError(f"config key {key!r} has a type ({hint}) that cannot be set from the command line")


def set_key(cfg, key: str, text: str) -> None:
    """Sets dotted `key` of the config tree from its text form (parsed by the field's type)."""
    node = cfg
    pieces = key.split(".")
    for depth, piece in enumerate(pieces):
        if not dataclasses.is_dataclass(node):
            raise KeyError(f"unknown config key {key!r}: {'.'.join(pieces[:depth])!r} is not a section")
        names = [f.name for f in dataclasses.fields(node)]
        if piece not in names:
            where = ".".join(pieces[:depth]) or "the top level"
            raise KeyError(f"unknown config key {key!r}: {where} has no {piece!r}; expected one of {names}")
        if depth == len(pieces) - 1:
            current = getattr(node, piece)
            if dataclasses.is_dataclass(current):
                raise KeyError(f"config key {key!r} is a section; set one of its fields "
                               f"({[f.name for f in dataclasses.fields(current)]})")
            hint = _field_types(type(node))[piece]
            setattr(node, piece, _parse_value(key, text, hint, current))
        else:
            node = getattr(node, piece)


def apply_cli_overrides(cfg: JobConfig, overrides: list[str]) -> JobConfig:
    """A copy of `cfg` with `key=value` strings applied, validated."""
    cfg = copy_config(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. training.steps=100)")
        key, text = item.split("=", 1)
        set_key(cfg, key.strip(), text.strip())
    cfg.validate()
    return cfg


def copy_config(cfg):
    changes = {f.name: copy_config(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
               if dataclasses.is_dataclass(getattr(cfg, f.name))}
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
    return json.dumps(infinities_as_text(to_dict(cfg)), indent=2, sort_keys=False, default=str)


def from_dict(data: dict, cls=JobConfig):
    """Rebuilds a config tree saved with `to_dict` (unknown keys are an error, missing ones keep defaults)."""
    if cls is Any:
        cls = _data_config_cls()
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise KeyError(f"{cls.__name__} has no field {key!r} (a config saved by another version?)")
        hint = hints[key]
        sub = hint if dataclasses.is_dataclass(hint) else (_data_config_cls() if hint is Any else None)
        if sub is not None and isinstance(value, dict):
            kwargs[key] = from_dict(value, sub)
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        elif value in ("inf", "-inf") and float in (hint, *typing.get_args(hint)):  # (to_json's infinities)
            kwargs[key] = float(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)

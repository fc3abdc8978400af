"""Training throughput: steps/s, images/s, tokens/s, TFLOP/s and MFU of a full stage-1 step (forward, backward,
optimizer) for the `base` and `large` presets on synthetic packed native-resolution batches, ours beside the same
model built from torch's own pieces and torch.compile, in the same run.

Providers:
  ours          the model as the trainer runs it by default: our Triton varlen attention, fused QKV split + 2D
                RoPE, Triton RMSNorm and SwiGLU gate, Triton SigLIP, the rest eager
  ours_compile  the same with the trainer's `parallel.compile` (torch.compile per block, our attention, RoPE and
                loss as opaque custom ops in the graphs): the norms, SwiGLU and residuals fused by Inductor, as
                in `torch` (the norm and SwiGLU ops' "auto" backend is the plain expression under compile)
  torch         the same modules with torch's attention (torch.nn.attention.varlen where this torch has it, else
         FlexAttention with a document mask), the plain-torch RoPE, RMSNorm and SwiGLU and the chunked torch
         loss, every block compiled (torch.compile)
A step runs under bf16 autocast with fused AdamW and the preset's activation checkpointing. A row's time per step
(`median_ms`, with `p20_ms` and `p80_ms`) is the median over the timed steps after the warm-up, each step timed by
CUDA events recorded between the steps (on a CPU, the host clock), with one synchronisation after the last; rates
and TFLOP/s use the median. The batch: images
of random native-resolution patch grids (sides 8..64 patches, multiples of 2) packed to `--budget` patch tokens
plus one 64-token caption per image; the same batch every step, so shapes are static. TFLOP/s and MFU count model
FLOPs (fineviti.model.flops, recomputation excluded) against the device's dense bf16 peak
(fineviti.train.metrics.PEAK_BF16_TFLOPS; none for an unknown device). Every provider starts from the same weights
and batch: its first step's loss must be finite and, where `torch` ran in the same invocation, its first forward
within benchmarks.common.CHECK_TOLERANCE of torch's (relative errors of the loss and of the image and text
features; stage 2: the loss and the projector's output, the vision tokens the LM reads); otherwise an error row
voids its timed row and the script exits 1. The check covers the forward only (the ops' benchmarks check their
gradients); at initialisation the loss hardly depends on the towers, the features do.

    python benchmarks/bench_train.py --quick                 # base and large, ours and torch (the GPU check)
    python benchmarks/bench_train.py --preset large --provider ours --budget 32768 --steps 20
    python benchmarks/bench_train.py --quick --device cpu    # the debug model, a smoke test of this script
    python benchmarks/bench_train.py --profile --preset base --provider ours --provider torch   # GPU only

--stage 2: the aligner's step (benchmark "train_stage2"): the preset's vision tower, the 2x2 merger and projector,
and on a GPU a built-in LM of Qwen2-0.5B's shape (width 896, 24 layers, 14 heads, SwiGLU 4864, tied head over a
151936-token vocabulary; the debug preset's small LM on a CPU), on region samples (box2caption and caption2box, the
preset's regions per image) of the same random packed batch. `ours` takes the output head's loss without logits
(fineviti.ops.linear_cross_entropy, on the answer positions only); `torch` computes the full (samples, length,
vocab) logits and their cross-entropy, as a plain model would. Both count the same model FLOPs
(fineviti.train.stage2.stage2_flops: the output head on the answer positions, where the loss needs it), so their
TFLOP/s compare as their times do.

    python benchmarks/bench_train.py --stage 2 --quick       # base at 12k patch tokens, three providers (GPU check)

--profile: where one step's time goes, per provider (benchmark "train_profile"): the GPU time per step of each
kernel family (our Triton kernels, matmuls, torch's eager elementwise and reductions, Inductor's fused kernels,
the rest), the heaviest kernels, and the host's wall time per step beside the kernels' sum (well above it: the
host's launches set the pace).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CHECK_TOLERANCE,
    exit_if_wrong,
    percentiles,
    record_if_wrong,
    relative_error,
)

PROVIDERS = ("ours", "ours_compile", "torch")
QUICK = [("large", 16384), ("base", 16384)]  # large first: the GPU check gives this script 150 s
QUICK_CPU = [("debug", 256)]
QUICK_STAGE2 = [("base", 12288)]  # 12 images, 28 region samples, 8k LM tokens (20k padded), 418 answers
# The stage-2 LM on a GPU: Qwen2-0.5B's shape (its tied head included); BuiltinLMConfig's fields.
LM_GPU = {"vocab_size": 151936, "width": 896, "depth": 24, "heads": 14, "mlp_hidden": 4864, "max_length": 4096}


def torch_attention_backend() -> str:
    try:
        from torch.nn.attention import varlen  # noqa: F401

        return "torch_varlen"
    except ImportError:
        return "flex"


def build(preset_name: str, provider: str, device: torch.device):
    from fineviti.model import FineViT
    from fineviti.train.config import preset

    cfg = preset(preset_name)
    if provider == "torch":
        cfg.model.attn_backend = torch_attention_backend() if device.type == "cuda" else "torch"
        cfg.model.rope_backend = "torch"
        cfg.model.loss_backend = "chunked"
        cfg.model.norm_backend = cfg.model.swiglu_backend = "torch"
    return _prepared(cfg, lambda: FineViT(cfg.model), provider, device)


def _prepared(cfg, make_model, provider: str, device: torch.device):
    """(cfg, model, optimizer): the model built with seed 0 on `device`, the preset's activation checkpointing,
    its blocks compiled for the compiled providers, fused AdamW (foreach on a CPU)."""
    from fineviti.train import parallel

    torch.manual_seed(0)
    model = make_model().to(device)
    parallel.apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing,
                                            cfg.parallel.selective_every)
    if provider in ("torch", "ours_compile"):
        parallel.apply_compile(model)
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **fused)
    return cfg, model, optimizer


def make_batch(cfg, budget: int, device: torch.device, seed: int = 0):
    from fineviti.train.config import RandomDataConfig
    from fineviti.train.data import RandomBatches

    low, high = (8, 64) if budget >= 4096 else (2, 8)
    random = RandomDataConfig(token_budget=budget, min_side=low, max_side=high, min_text=64, max_text=64, seed=seed)
    source = RandomBatches(random, patch_size=cfg.model.vision.patch_size, merge=cfg.model.vision.merge,
                           vocab_size=cfg.model.text.vocab_size)
    return source.make(0).to(device)


def build_stage2(preset_name: str, provider: str, device: torch.device):
    """The aligner for `preset_name`'s vision tower with the LM above (the preset's own built-in LM on a CPU), the
    providers' backends as in build()."""
    from fineviti.model.aligner import Aligner
    from fineviti.model.config import BuiltinLMConfig, aligner_config
    from fineviti.train.config import preset

    cfg = preset(preset_name)
    lm = BuiltinLMConfig(**LM_GPU) if device.type == "cuda" else cfg.aligner.builtin_lm
    overrides = {"builtin_lm": lm}
    if provider == "torch":
        overrides.update(attn_backend=torch_attention_backend() if device.type == "cuda" else "torch",
                         rope_backend="torch", norm_backend="torch", swiglu_backend="torch")
    acfg = aligner_config(cfg.model, **overrides)
    return _prepared(cfg, lambda: Aligner(acfg), provider, device)


def stage2_step(preset_name: str, provider: str, budget: int, device: torch.device):
    """(model, batch, region samples, step): one aligner training step on a fixed batch with its region samples
    (bf16 autocast on a GPU); `torch` through the full logits (return_logits=True), ours without them."""
    from fineviti.train import stage2
    from fineviti.train.config import RandomDataConfig
    from fineviti.train.data import RandomBatches

    cfg, model, optimizer = build_stage2(preset_name, provider, device)
    low, high = (8, 64) if budget >= 4096 else (2, 8)
    random = RandomDataConfig(token_budget=budget, min_side=low, max_side=high, min_text=64, max_text=64, seed=0)
    batch = RandomBatches(random, patch_size=model.visual.patch_size, merge=2, vocab_size=model.lm.vocab_size,
                          with_regions=True).make(0)
    region = stage2.region_tasks(batch, stage2.ByteIds(model.lm.vocab_size),
                                 tasks=["box2caption", "caption2box"], regions_per_image=cfg.stage2.regions_per_image,
                                 merge=2, placeholder_id=model.placeholder_id,
                                 seed=0, step=0, rank=0)
    if region is None:
        raise RuntimeError("the random batch has no region boxes")
    batch = batch.to(device)
    ids, labels, mask, sample_image = (t.to(device) for t in (region.input_ids, region.labels,
                                                               region.attention_mask, region.sample_image))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    projected = []  # the projector's output of each step (the vision tokens the LM reads); check_first_steps
    model.projector.register_forward_hook(lambda module, args, output: projected.append(output.detach()))

    def step():
        projected.clear()
        with autocast:
            out = model(batch.patches, batch.cu_seqlens, batch.pos, batch.max_seqlen, ids, labels=labels,
                        attention_mask=mask, seqlens=batch.seqlens, sample_image=sample_image,
                        return_logits=provider == "torch")
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": out["loss"].detach(), "vision_tokens": projected[0]}

    return cfg, model, batch, region, step


def run_stage2_case(rec, preset_name: str, provider: str, budget: int, steps: int, warmup: int,
                    device: torch.device):
    from fineviti.train.metrics import device_name, peak_tflops
    from fineviti.train.stage2 import stage2_flops

    cfg, model, batch, region, step = stage2_step(preset_name, provider, budget, device)
    timing, peak_mem, first = _time_steps(step, steps, warmup, device)
    seconds = timing["median_ms"] / 1000
    tflops = stage2_flops(model, batch.seqlens, region) / seconds / 1e12
    peak = peak_tflops(device_name(device)) if device.type == "cuda" else None
    lm_tokens = int(region.attention_mask.sum())
    shape = {"preset": preset_name, "patch_tokens": sum(batch.seqlens), "images": batch.n_images,
             "samples": region.n_samples, "lm_tokens": lm_tokens, "text_tokens": region.text_tokens,
             "answer_tokens": region.answer_tokens,
             "lm_length": int(region.input_ids.shape[1]), "vocab": model.lm.vocab_size,
             "ac": cfg.parallel.activation_checkpointing}
    timing["peak_mem_mb"] = peak_mem
    return rec.add(provider=provider, mode="train_stage2", shape=shape,
                   dtype="bf16" if device.type == "cuda" else "fp32", timing=timing, tflops=tflops,
                   steps_per_s=1 / seconds, images_per_s=batch.n_images / seconds,
                   tokens_per_s=(sum(batch.seqlens) + region.text_tokens) / seconds,
                   mfu=tflops / peak if peak else None, first_loss=first["loss"]), first


def _time_steps(step, steps: int, warmup: int, device: torch.device) -> tuple[dict, float | None, dict]:
    """The timing fields of `steps` steps after `warmup` untimed ones (median, p20, p80 in ms: per step, from CUDA
    events recorded between the steps, or the host clock on a CPU; one synchronisation, after the last), the
    peak memory (MiB) of the timed ones, and what the first step returned (before any update: what
    check_first_steps compares; fp32 on the host, "loss" a float), read after the timing."""
    first = None
    for _ in range(warmup):
        loss = step()
        first = loss if first is None else first
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        marks[0].record()
        for mark in marks[1:]:
            loss = step()
            first = loss if first is None else first
            mark.record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in zip(marks, marks[1:], strict=False)]
    else:
        clock = [time.perf_counter()]
        for _ in range(steps):
            loss = step()
            first = loss if first is None else first
            clock.append(time.perf_counter())
        times = [(b - a) * 1000 for a, b in zip(clock, clock[1:], strict=False)]
    first = {k: float(v) if k == "loss" else v.float().cpu() for k, v in first.items()}
    return percentiles(times), torch.cuda.max_memory_allocated() / 2**20 if cuda else None, first


def check_first_steps(rec, wrong: list[str], results: dict[str, tuple[dict, dict]], case: str, mode: str) -> None:
    """results: provider -> (row, first step's outputs). Each provider's first loss (the same weights and batch:
    seed 0) must be finite and, where `torch` ran in the same case, each of its first outputs within CHECK_TOLERANCE
    of torch's (relative_error). A provider that fails gets an error row saying its timed row is void, and joins
    `wrong` (exit_if_wrong: the GPU check's section fails)."""
    reference = results["torch"][1] if "torch" in results else None
    void = "its timed row above is void"
    for provider, (row, first) in results.items():
        tolerance = CHECK_TOLERANCE[torch.bfloat16 if row["dtype"] == "bf16" else torch.float32]
        where = {"provider": provider, "mode": mode, "shape": row["shape"], "dtype": row["dtype"]}
        if not math.isfinite(first["loss"]):
            wrong.append(f"{case} {provider}")
            rec.error(**where, error=f"wrong result: first-step loss {first['loss']}; {void}")
        elif provider != "torch" and reference is not None:
            errors = {name: relative_error(torch.tensor(value), torch.tensor(reference[name])) if name == "loss"
                      else relative_error(value, reference[name]) for name, value in first.items()}
            record_if_wrong(rec, wrong, f"{case} {provider}", errors, tolerance, "torch's first step", **where,
                            timing=void)


def training_step(preset_name: str, provider: str, budget: int, device: torch.device):
    """(config, batch, step): one full training step of `provider`'s model on a fixed batch of `budget` patch
    tokens (forward under bf16 autocast on a GPU, backward, optimizer step)."""
    cfg, model, optimizer = build(preset_name, provider, device)
    batch = make_batch(cfg, budget, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            out = model(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": out["loss"].detach(), "image_features": out["image_features"].detach(),
                "text_features": out["text_features"].detach()}

    return cfg, batch, step


def run_case(rec, preset_name: str, provider: str, budget: int, steps: int, warmup: int, device: torch.device):
    from fineviti.model.flops import count_flops
    from fineviti.train.metrics import device_name, peak_tflops

    cfg, batch, step = training_step(preset_name, provider, budget, device)
    timing, peak_mem, first = _time_steps(step, steps, warmup, device)
    seconds = timing["median_ms"] / 1000
    flops = count_flops(cfg.model, batch.seqlens, batch.text_seqlens, training=True, recompute=False).model
    tflops = flops / seconds / 1e12
    peak = peak_tflops(device_name(device)) if device.type == "cuda" else None
    images, tokens = batch.n_images, sum(batch.seqlens) + sum(batch.text_seqlens)
    timing["peak_mem_mb"] = peak_mem
    shape = {"preset": preset_name, "patch_tokens": sum(batch.seqlens), "images": images,
             "text_tokens": sum(batch.text_seqlens), "ac": cfg.parallel.activation_checkpointing}
    return rec.add(provider=provider, mode="train", shape=shape, dtype="bf16" if device.type == "cuda" else "fp32",
                   timing=timing, tflops=tflops, steps_per_s=1 / seconds, images_per_s=images / seconds,
                   tokens_per_s=tokens / seconds, mfu=tflops / peak if peak else None,
                   first_loss=first["loss"]), first


# Kernel families by name (first match wins): which part of the stack a kernel of a profiled step comes from.
FAMILIES = (
    ("ours (Triton)", ("_attn_", "contrastive_", "rope_2d", "rmsnorm_", "swiglu_")),
    ("inductor (fused)", ("triton_poi_", "triton_red_", "triton_per_", "triton_tem_")),
    # before matmul: FlashAttention's kernels name cutlass types, cuDNN's SDPA kernels sm90
    ("attention (torch)", ("flash", "fmha", "cudnn", "sdpa", "attention")),
    ("matmul", ("gemm", "xmma", "cutlass", "cublas", "nvjet", "sm90_", "sm80_", "wgmma")),
    ("optimizer", ("adam", "multi_tensor")),
    ("elementwise / reduce (eager)", ("elementwise", "reduce", "vectorized", "unrolled", "at::native", "cat",
                                      "copy", "fill", "index", "scatter", "gather", "cumsum", "softmax", "norm")),
)


def family(kernel: str) -> str:
    name = kernel.lower()
    for label, keys in FAMILIES:
        if any(key in name for key in keys):
            return label
    return "other"


def profile_case(rec, preset_name: str, provider: str, budget: int, device: torch.device, steps: int = 3):
    """Rows of benchmark "train_profile" for one provider: "PROVIDER: FAMILY" (GPU ms per step of that kernel
    family, share of the kernels' sum), "PROVIDER: kernel NAME" for the eight heaviest kernels, and "PROVIDER:
    wall" (host wall ms per step, kernels_ms the kernels' sum)."""
    from benchmarks.common import gpu_kernel_times

    cfg, batch, step = training_step(preset_name, provider, budget, device)

    shape = {"preset": preset_name, "patch_tokens": sum(batch.seqlens), "images": batch.n_images,
             "ac": cfg.parallel.activation_checkpointing}
    per_kernel, wall_ms = gpu_kernel_times(step, steps=steps, warmup=2, wall_repeats=2)
    total = sum(per_kernel.values())
    families: dict[str, float] = {}
    for name, ms in per_kernel.items():
        families[family(name)] = families.get(family(name), 0.0) + ms
    for label, ms in sorted(families.items(), key=lambda kv: -kv[1]):
        rec.add(provider=f"{provider}: {label}", mode="train", shape=shape, dtype="bf16", timing={"median_ms": ms},
                share=ms / total if total else None)
    for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:8]:
        rec.add(provider=f"{provider}: kernel {name[:60]}", mode="train", shape=shape, dtype="bf16",
                timing={"median_ms": ms}, share=ms / total if total else None, family=family(name))
    rec.add(provider=f"{provider}: wall", mode="train", shape=shape, dtype="bf16", timing={"median_ms": wall_ms},
            kernels_ms=total)
    print(f"train_profile {preset_name} {provider}: {total:.1f} ms of GPU kernels per step over {len(per_kernel)} "
          f"kernel names, {wall_ms:.1f} ms wall; "
          + ", ".join(f"{label} {ms:.1f}" for label, ms in sorted(families.items(), key=lambda kv: -kv[1])),
          flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="base and large at a 16k budget, both providers")
    parser.add_argument("--preset", default="base", help="training preset (base, large, fine, tiny, debug)")
    parser.add_argument("--provider", action="append", choices=(*PROVIDERS, "all"),
                        help="repeatable (default: all)")
    parser.add_argument("--profile", action="store_true",
                        help="GPU time per kernel family and the host's wall time per step (GPU only)")
    parser.add_argument("--budget", type=int, default=16384, help="patch tokens per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation, autotuning)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1,
                        help="1: the two towers' contrastive step; 2: the aligner's region-caption step")
    args = parser.parse_args(argv)
    from benchmarks.common import Recorder

    device = torch.device(args.device)
    providers = PROVIDERS if not args.provider or "all" in args.provider else tuple(args.provider)
    if args.profile:
        if args.stage == 2:
            parser.error("--profile times the stage-1 step only")
        if device.type != "cuda":
            parser.error("--profile needs a GPU")
        rec = Recorder("train_profile")
        for provider in providers:
            try:
                profile_case(rec, args.preset, provider, args.budget, device)
            except Exception as exc:  # noqa: BLE001 (one failing provider must not hide the others' rows)
                rec.error(provider=provider, mode="train", shape={"preset": args.preset, "patch_tokens": args.budget},
                          dtype="bf16", error=f"{type(exc).__name__}: {exc}")
            torch.cuda.empty_cache()
        return 0
    rec = Recorder("train" if args.stage == 1 else "train_stage2")
    quick = (QUICK if args.stage == 1 else QUICK_STAGE2) if device.type == "cuda" else QUICK_CPU
    cases = quick if args.quick else [(args.preset, args.budget)]
    steps, warmup = (5, 2) if args.quick else (args.steps, args.warmup)
    run = run_case if args.stage == 1 else run_stage2_case
    wrong: list[str] = []
    for preset_name, budget in cases:
        results = {}
        for provider in providers:
            try:
                results[provider] = run(rec, preset_name, provider, budget, steps, warmup, device)
            except Exception as exc:  # noqa: BLE001 (one failing provider must not hide the others' rows)
                rec.error(provider=provider, mode="train" if args.stage == 1 else "train_stage2",
                          shape={"preset": preset_name, "patch_tokens": budget}, dtype="bf16",
                          error=f"{type(exc).__name__}: {exc}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        check_first_steps(rec, wrong, results, f"{preset_name}:{budget}",
                          "train" if args.stage == 1 else "train_stage2")
        for ours in ("ours", "ours_compile"):
            if {ours, "torch"} <= set(results):
                ratio = results[ours][0]["tokens_per_s"] / results["torch"][0]["tokens_per_s"]
                mfu = results[ours][0]["mfu"]
                print(f"{preset_name}: {ours} / torch+compile throughput {ratio:.2f}x; MFU "
                      f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'}", flush=True)
    exit_if_wrong(rec.benchmark, wrong)
    return 0


if __name__ == "__main__":
    sys.exit(main())

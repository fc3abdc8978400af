"""2D RoPE: ours (Triton, CUDA C++, the fused QKV split) against Qwen2-VL's eager path and torch.compile of it.

Rows are GB/s of the bytes the rotation must move (q and k read and written once; the split also reads and writes v),
beside the copy bandwidth measured on the same device (`copy`: one device-to-device copy of q and k). The eager
provider is Hugging Face's apply_rotary_pos_emb_vision with its cos/sin tables built beforehand (Qwen2-VL builds
them once per forward and shares them across layers), so it is timed without building them; ours computes cos/sin
on the fly. `attn_block` rows time QKV split (+ rotation) + varlen attention, forward and backward: the cost of
the rotation inside the attention block, against torch's copying split, a split at copy bandwidth (a Triton copy,
`attn_triton_split_no_rope`) and attention reading strided views of the fused projection with no split at all.
`attn_rope_in_kernel` (varlen_attention_rope) includes building its cos/sin tables, with one host read of the
positions, per call.

    python benchmarks/bench_rope.py                 # the sweep: 16k-256k tokens, head dims 64/80/96/128, bf16
    python benchmarks/bench_rope.py --quick         # a fixed small set (part of the GPU check)
    python benchmarks/bench_rope.py --provider triton --tokens 65536 --head-dim 80 --mode fwd
    python benchmarks/bench_rope.py --sweep-configs # Triton block-size candidates, forward of q and k
    python benchmarks/bench_rope.py --provider attn_block --tokens 65536 --head-dim 128  # rotation in the block
On a CPU it runs tiny shapes (providers that run there) as a smoke check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CHECK_TOLERANCE,
    Recorder,
    bench,
    comparable,
    cpu_dtype,
    exit_if_wrong,
    percentiles,
    record_if_wrong,
    relative_error,
)
from fineviti._checks import triton_interpreting  # noqa: E402
from fineviti.ops import rope as rope_ops  # noqa: E402

PROVIDERS = ("copy", "torch_eager", "torch_compile", "triton", "cuda", "cpp", "eager_split", "split_copy",
             "triton_split", "attn_block")
# The stock path each provider is compared with (speedup_vs_stock in its rows).
STOCK = {"torch_compile": "torch_eager", "triton": "torch_eager", "cuda": "torch_eager", "cpp": "torch_eager",
         "split_copy": "eager_split", "triton_split": "eager_split"}
MODES = ("fwd", "bwd", "full")


# ---------------------------------------------------------------------------------------------------------------
# The stock path: Qwen2-VL's vision RoPE as transformers writes it


def qwen2_vl_cos_sin(pos: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """VisionRotaryEmbedding(head_dim // 2) + rot_pos_emb + cat + cos/sin: (total, head_dim) fp32 tables."""
    dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=pos.device) / dim))
    seq = torch.arange(int(pos.max()) + 1, device=pos.device, dtype=inv_freq.dtype)
    freqs = torch.outer(seq, inv_freq)
    rotary_pos_emb = freqs[pos.long()].flatten(1)
    emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb_vision(q, k, cos, sin):
    orig_q_dtype, orig_k_dtype = q.dtype, k.dtype
    q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed.to(orig_q_dtype), k_embed.to(orig_k_dtype)


_COMPILED = {}


def compiled_apply():
    if "apply" not in _COMPILED:
        _COMPILED["apply"] = torch.compile(apply_rotary_pos_emb_vision, dynamic=False)
    return _COMPILED["apply"]


# ---------------------------------------------------------------------------------------------------------------
# Inputs and providers


def grid_positions(tokens: int, side: int, device) -> torch.Tensor:
    """(tokens, 2) int32 positions of a pack of side x side images (the last one cut short)."""
    idx = torch.arange(tokens, device=device) % (side * side)
    return torch.stack((idx // side, idx % side), dim=1).to(torch.int32)


def make_case(provider, tokens, heads, head_dim, dtype, device):
    """Returns (forward fn returning outputs, inputs that need gradients, bytes moved by one forward)."""
    pos = grid_positions(tokens, 32, device)
    elem = torch.tensor([], dtype=dtype).element_size()
    qk_bytes = 2 * 2 * tokens * heads * head_dim * elem  # q and k, read and written
    split_bytes = 3 * 2 * tokens * heads * head_dim * elem  # q, k, v read (as qkv) and written
    if provider in ("triton_split", "split_copy", "eager_split"):
        qkv = torch.randn(tokens, 3 * heads * head_dim, device=device, dtype=dtype, requires_grad=True)
        if provider == "triton_split":
            return (lambda: rope_ops.qkv_split_rope(qkv, pos, heads, backend="triton", check_values=False)), \
                [qkv], split_bytes
        if provider == "split_copy":  # the split the attention kernel needs anyway, without the rotation
            def split():
                return qkv.view(tokens, 3, heads, head_dim).permute(1, 0, 2, 3).contiguous().unbind(0)
            return split, [qkv], split_bytes
        cos, sin = qwen2_vl_cos_sin(pos, head_dim)

        def eager_split():
            q, k, v = qkv.view(tokens, 3, heads, head_dim).unbind(1)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            return q, k, v.contiguous()
        return eager_split, [qkv], split_bytes

    q = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    if provider == "copy":
        both = torch.randn(2, tokens, heads, head_dim, device=device, dtype=dtype)
        dest = torch.empty_like(both)
        return (lambda: dest.copy_(both)), [], qk_bytes
    if provider in ("triton", "cuda", "cpp"):
        return (lambda: rope_ops.rope_2d_qk(q, k, pos, backend=provider, check_values=False)), [q, k], qk_bytes
    cos, sin = qwen2_vl_cos_sin(pos, head_dim)
    fn = apply_rotary_pos_emb_vision if provider == "torch_eager" else compiled_apply()
    return (lambda: fn(q, k, cos, sin)), [q, k], qk_bytes


def mode_closures(forward, inputs, mode):
    """(prepare, fn) for a mode: fn(state) runs the forward, the backward of the forward `prepare` stored, or both."""
    if mode == "fwd" or not inputs:
        def run_fwd(state):
            with torch.no_grad():
                return forward()
        return (lambda: None), run_fwd

    def prepare():
        outs = forward()
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return outs, [torch.randn_like(o) for o in outs]

    if mode == "bwd":
        return prepare, lambda state: torch.autograd.grad(state[0], inputs, state[1], retain_graph=True)

    def run_full(state):
        new = forward()
        return torch.autograd.grad(new if isinstance(new, (tuple, list)) else (new,), inputs, state[1])
    return prepare, run_full


def graph_timing(prepare, fn, inner: int = 5, reps: int = 40) -> dict:
    """Device time per call: `inner` calls captured in a CUDA graph, replayed `reps` times (median, 20/80 %).

    Graph replay leaves out the host's launch overhead (Python dispatch, autograd bookkeeping), which a training
    step hides behind the GPU's queue; `host_median_ms` in each row keeps the eager, host-inclusive figure.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        state = prepare()
        for _ in range(3):
            fn(state)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(inner):
                fn(state)
    torch.cuda.current_stream().wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    reps = max(5, min(reps, int(150 / max(start.elapsed_time(end), 1e-3))))  # about 150 ms of replays at most
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    del graph, state
    return percentiles(times)


def measure(forward, inputs, mode) -> dict:
    """common.bench (host-inclusive do_bench, peak memory), and on a GPU the CUDA-graph device time as the median."""
    prepare, fn = mode_closures(forward, inputs, mode)
    state = [prepare()]
    timing = bench(lambda: fn(state[0]))
    state.clear()
    if not torch.cuda.is_available():
        timing["timer"] = "host"
        return timing
    timing.update(host_median_ms=timing["median_ms"], host_p20_ms=timing["p20_ms"], host_p80_ms=timing["p80_ms"])
    try:
        timing.update(graph_timing(prepare, fn), timer="cuda_graph")
    except Exception as exc:  # a provider that cannot be captured keeps the do_bench figure
        timing["timer"] = f"do_bench ({type(exc).__name__})"
    torch.cuda.empty_cache()
    return timing


def available(provider, device) -> str | None:
    """None when the provider runs here, else why not."""

    if provider in ("triton", "triton_split") and device.type != "cuda" and not triton_interpreting():
        return "Triton needs a GPU (or TRITON_INTERPRET=1)"
    if provider == "cuda" and (device.type != "cuda" or not rope_ops._HAS_CPP_OPS):
        return "needs a GPU and the built extension"
    if provider == "cpp" and (device.type != "cpu" or not rope_ops._HAS_CPP_OPS):
        return "CPU tensors and the built extension only"
    if provider == "attn_block" and device.type != "cuda":
        return "attention block rows need a GPU"
    return None


# ---------------------------------------------------------------------------------------------------------------
# A QKV split without rotation at copy bandwidth (the attention block's fair baseline: torch's permute copy runs at
# about half the copy bandwidth, so beating it says nothing about the rotation's own cost)

_COPY_KERNEL = None


def _strided_copy_kernel():
    global _COPY_KERNEL
    if _COPY_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def strided_copy(SRC, DST, rows, width, src_stride, dst_stride, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):
            r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
            c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = (r < rows)[:, None] & (c < width)[None, :]
            x = tl.load(SRC + r[:, None] * src_stride + c[None, :], mask=mask)
            tl.store(DST + r[:, None] * dst_stride + c[None, :], x, mask=mask)

        _COPY_KERNEL = strided_copy
    return _COPY_KERNEL


def _copy_rows(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[:] = src for (rows, width) views with unit column strides."""
    import triton

    rows, width = src.shape
    grid = (triton.cdiv(rows, 16), triton.cdiv(width, 256))
    _strided_copy_kernel()[grid](src, dst, rows, width, src.stride(0), dst.stride(0), BLOCK_R=16, BLOCK_C=256,
                                 num_warps=4)


class _TritonSplit(torch.autograd.Function):
    """(total, 3 * width) -> three contiguous (total, width) tensors, and back for the gradient, with a Triton copy."""

    @staticmethod
    def forward(ctx, qkv, width):
        ctx.width = width
        outs = [torch.empty((qkv.shape[0], width), device=qkv.device, dtype=qkv.dtype) for _ in range(3)]
        for i, out in enumerate(outs):
            _copy_rows(qkv[:, i * width:(i + 1) * width], out)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        w = ctx.width
        out = torch.empty((grads[0].shape[0], 3 * w), device=grads[0].device, dtype=grads[0].dtype)
        for i, g in enumerate(grads):
            if g is None:
                out[:, i * w:(i + 1) * w].zero_()
            else:
                _copy_rows(g.contiguous(), out[:, i * w:(i + 1) * w])
        return out, None


# ---------------------------------------------------------------------------------------------------------------
# The attention block: split (+ rotation) + varlen attention, forward and backward


def run_attn_block(rec, tokens, heads, head_dim, dtype, device, seqlen=1024):
    from fineviti.ops import varlen_attention, varlen_attention_rope

    side = int(seqlen ** 0.5)
    pos = grid_positions(tokens, side, device)
    cu = torch.arange(0, tokens + 1, side * side, device=device, dtype=torch.int32)
    if cu[-1] != tokens:
        cu = torch.cat((cu, torch.tensor([tokens], device=device, dtype=torch.int32)))
    max_seqlen = side * side
    qkv = torch.randn(tokens, 3 * heads * head_dim, device=device, dtype=dtype, requires_grad=True)

    def split_only():
        return qkv.view(tokens, 3, heads, head_dim).permute(1, 0, 2, 3).contiguous().unbind(0)

    def views_only():  # no split copy at all: the attention kernels read strided views of the fused projection
        return qkv.view(tokens, 3, heads, head_dim).unbind(1)

    def triton_split_only():  # the split at copy bandwidth, no rotation
        return tuple(t.view(tokens, heads, head_dim) for t in _TritonSplit.apply(qkv, heads * head_dim))

    def fused():
        return rope_ops.qkv_split_rope(qkv, pos, heads, backend="triton", check_values=False)

    def standalone():
        q, k, v = split_only()
        q, k = rope_ops.rope_2d_qk(q, k, pos, backend="triton", check_values=False)
        return q, k, v

    variants = {"attn_no_rope": split_only, "attn_triton_split_no_rope": triton_split_only,
                "attn_views_no_rope": views_only, "attn_fused_split": fused, "attn_standalone": standalone,
                "attn_rope_in_kernel": None}
    baselines = ("attn_no_rope", "attn_triton_split_no_rope", "attn_views_no_rope")
    shape = {"tokens": tokens, "heads": heads, "head_dim": head_dim, "seqlen": max_seqlen}
    times = {}
    for name, make_qkv in variants.items():
        def forward(make_qkv=make_qkv):
            if make_qkv is None:  # variant (b): strided views, rotated inside the attention kernel
                q, k, v = views_only()
                return varlen_attention_rope(q, k, v, cu, max_seqlen, pos, check_values=False)
            q, k, v = make_qkv()
            return varlen_attention(q, k, v, cu, max_seqlen)
        try:
            timing = measure(forward, [qkv], "full")
        except Exception as exc:  # a variant that fails is recorded, the others still run
            rec.error(provider=name, mode="full", shape=shape, dtype=str(dtype).replace("torch.", ""),
                      error=f"{type(exc).__name__}: {exc}"[:300])
            continue
        times[name] = timing
        extra = {}
        for key, base in (("rope_share", "attn_no_rope"), ("rope_share_vs_triton_split", "attn_triton_split_no_rope"),
                          ("rope_share_vs_views", "attn_views_no_rope")):
            if name not in baselines and base in times:  # against each baseline, by one timer
                ours, theirs, timer = comparable(timing, times[base])
                extra[key] = (ours - theirs) / theirs
                extra[f"{key}_timer"] = timer
        rec.add(provider=name, mode="full", shape=shape, dtype=str(dtype).replace("torch.", ""), timing=timing,
                **extra)


# ---------------------------------------------------------------------------------------------------------------
# Triton block-size sweep (forward of q and k)


def sweep_configs(rec, tokens, heads, head_dims, dtype, device):
    from fineviti.kernels import rope as kernels

    for head_dim in head_dims:
        pos = grid_positions(tokens, 32, device)
        q = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype)
        k = torch.randn_like(q)
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        nbytes = 4 * q.numel() * q.element_size()
        for tile_pairs in (1024, 2048, 4096):
            for max_block_h in (8, 16):
                for num_warps in (4, 8):
                    config = kernels.launch_config(head_dim, heads, tile_pairs, max_block_h, num_warps)
                    def launch(q=q, k=k, q_out=q_out, k_out=k_out, pos=pos, config=config):
                        kernels.launch(q, k, None, q_out, k_out, None, pos, 10000.0, False, config)
                    timing = measure(launch, [], "fwd")
                    rec.add(provider="triton_cfg", mode="fwd",
                            shape={"tokens": tokens, "heads": heads, "head_dim": head_dim},
                            dtype=str(dtype).replace("torch.", ""), timing=timing,
                            gbps=nbytes / timing["median_ms"] / 1e6,
                            config={"tile_pairs": tile_pairs, "max_block_h": max_block_h, "num_warps": num_warps,
                                    "BLOCK_T": config["BLOCK_T"], "BLOCK_H": config["BLOCK_H"]})


# ---------------------------------------------------------------------------------------------------------------


OURS = ("triton", "cuda", "cpp", "triton_split")  # checked before they are timed (below)
WRONG: list[str] = []  # ours' cases that failed their check, for main's exit status


def check_errors(provider, forward, inputs, mode, tokens, heads) -> dict[str, float]:
    """{quantity: relative error} of one of OURS against the torch backend on the same inputs (make_case's
    positions): the outputs and, in the backward modes, the inputs' gradients (one random upstream for both)."""
    pos = grid_positions(tokens, 32, inputs[0].device)
    if provider == "triton_split":
        names = ("q", "k", "v")
        ref = lambda: rope_ops.qkv_split_rope(inputs[0], pos, heads, backend="torch")  # noqa: E731
    else:
        names = ("q", "k")
        ref = lambda: rope_ops.rope_2d_qk(inputs[0], inputs[1], pos, backend="torch")  # noqa: E731
    results, upstream = [], None
    for call in (forward, ref):
        outs = call()
        got = {name: out.detach() for name, out in zip(names, outs, strict=True)}
        if mode != "fwd":
            if upstream is None:
                gen = torch.Generator(outs[0].device).manual_seed(1)
                upstream = [torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in outs]
            grads = torch.autograd.grad(outs, inputs, upstream)
            got.update({f"d{i}": g for i, g in enumerate(grads)})
        results.append(got)
    return {name: relative_error(results[0][name], want) for name, want in results[1].items()}


def run_case(rec, provider, mode, tokens, heads, head_dim, dtype, device, copy_gbps, stock_ms):
    shape = {"tokens": tokens, "heads": heads, "head_dim": head_dim}
    dtype_name = str(dtype).replace("torch.", "")
    try:
        forward, inputs, nbytes = make_case(provider, tokens, heads, head_dim, dtype, device)
        if mode != "fwd" and not inputs:
            return None
        if provider in OURS:  # a wrong result is an error row, not a time, and a non-zero exit
            errors = check_errors(provider, forward, inputs, mode, tokens, heads)
            if record_if_wrong(rec, WRONG, f"{provider} {mode} tokens={tokens} head_dim={head_dim}", errors,
                               CHECK_TOLERANCE[dtype], "the torch backend", provider=provider, mode=mode,
                               shape=shape, dtype=dtype_name):
                return None
        timing = measure(forward, inputs, mode)
    except Exception as exc:
        rec.error(provider=provider, mode=mode, shape=shape, dtype=dtype_name,
                  error=f"{type(exc).__name__}: {exc}"[:300])
        return None
    if provider == "copy" and "host_median_ms" in timing:
        # A captured copy_ becomes a graph memcpy node, which ran slower than the same copy launched eagerly
        # (H100: 443 vs 363 us for 1 GB moved); the reference is the faster of the two.
        if timing["host_median_ms"] < timing["median_ms"]:  # the percentiles of the timer whose median is kept
            timing.update(median_ms=timing["host_median_ms"], p20_ms=timing["host_p20_ms"],
                          p80_ms=timing["host_p80_ms"])
        timing["timer"] = "best of cuda_graph and do_bench"
    moved = nbytes * (2 if mode == "full" else 1)
    gbps = moved / timing["median_ms"] / 1e6
    extra = {}
    if copy_gbps and provider != "copy":
        extra["copy_gbps"] = copy_gbps
        extra["copy_fraction"] = gbps / copy_gbps
    stock_ms[(provider, mode, tokens, head_dim)] = timing
    stock = stock_ms.get((STOCK.get(provider), mode, tokens, head_dim))
    if stock:
        ours, theirs, timer = comparable(timing, stock)
        extra["speedup_vs_stock"] = theirs / ours
        extra["stock"] = STOCK[provider]
        extra["speedup_timer"] = timer
    rec.add(provider=provider, mode=mode, shape=shape, dtype=dtype_name, timing=timing, gbps=gbps, **extra)
    return gbps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the fixed small set of the GPU check")
    parser.add_argument("--provider", choices=PROVIDERS, action="append", help="run only these providers")
    parser.add_argument("--tokens", type=int, action="append", help="token counts (default 16k, 64k, 256k)")
    parser.add_argument("--head-dim", type=int, action="append", help="head dims (default 64, 80, 96, 128)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--mode", choices=MODES, action="append", help="modes (default all)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--sweep-configs", action="store_true", help="time Triton block-size candidates instead")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cpu_dtype(getattr(torch, args.dtype), device)
    rec = Recorder("rope_2d")
    on_gpu = device.type == "cuda"
    if args.quick:
        tokens_list, head_dims = [65536] if on_gpu else [512], [80, 128] if on_gpu else [64]
    else:
        tokens_list = args.tokens or ([16384, 65536, 262144] if on_gpu else [256, 1024])
        head_dims = args.head_dim or ([64, 80, 96, 128] if on_gpu else [64])
    heads = args.heads if on_gpu else min(args.heads, 4)
    if args.tokens and not args.quick:
        tokens_list = args.tokens
    if args.sweep_configs:
        sweep_configs(rec, tokens_list[0], heads, head_dims, dtype, device)
        return
    default_providers = [p for p in PROVIDERS if p != "attn_block"]
    if not on_gpu:  # torch.compile's CPU code generation takes minutes on a small machine; ask for it by name
        default_providers.remove("torch_compile")
    providers = sorted(set(args.provider or default_providers), key=PROVIDERS.index)
    modes = args.mode or list(MODES)

    for tokens in tokens_list:
        for head_dim in head_dims:
            if args.quick and "torch_compile" in providers and head_dim != head_dims[-1]:
                case_providers = [p for p in providers if p != "torch_compile"]  # one compiled shape in --quick
            else:
                case_providers = providers
            copy_gbps = None
            stock_ms: dict = {}
            if "copy" not in case_providers and on_gpu:
                copy_gbps = run_case(rec, "copy", "fwd", tokens, heads, head_dim, dtype, device, None, stock_ms)
            for provider in case_providers:
                if provider == "attn_block":
                    continue
                reason = available(provider, device)
                if reason:
                    print(f"rope_2d      {provider:16s} skipped: {reason}")
                    continue
                for mode in ("fwd",) if provider in ("copy",) else modes:
                    gbps = run_case(rec, provider, mode, tokens, heads, head_dim, dtype, device, copy_gbps, stock_ms)
                    if provider == "copy":
                        copy_gbps = gbps
    if "attn_block" in providers:  # opt-in: the attention kernels' compile time would not fit --quick's budget
        if available("attn_block", device) is None:
            run_attn_block(rec, tokens_list[-1], heads, head_dims[-1], dtype, device)
    exit_if_wrong("bench_rope", WRONG)


if __name__ == "__main__":
    main()

"""SigLIP (sigmoid) and CLIP (softmax) contrastive losses that never hold the N x N logits, on one process or many.

Backends (one contract):

  triton     ours (kernels/contrastive.py): the forward reduces logit tiles to per-row sums / log-sum-exps in
             registers (CLIP: both directions in one pass); the gradient pass computes the tiles of one chunk of
             rows into a (chunk, N) dL/dz buffer in the features' dtype (fp16: scaled by 2**14, so that small
             gradients stay normal numbers) and multiplies it with cuBLAS into fp32. SigLIP's
             dL/dz needs no normaliser, so when a gradient is wanted its forward is that gradient pass, which also
             sums the loss: three logit matmuls in all, as a plain implementation does, and the backward only
             scales the saved gradients (create_graph is not supported). CLIP needs its log-sum-exps first: four.
             Memory: O(N * D): the saved gradients of img and txt between forward and backward (fp32 for fp16
             features, whose small gradients would flush before a loss scale reached them; else the features'
             dtype), a dL/dz buffer of at most _GPU_CHUNK_BYTES, and for CLIP's forward column partials of at most
             kernels.contrastive.COL_PARTIAL_BYTES (and their reduction's temporary of the same size).
  chunked    memory-efficient torch path (the default on the CPU): the same algorithm with torch matmuls in fp32
             (fp64 for fp64 features), at most a (chunk, N) block alive in the forward or the backward.
  reference  plain torch with autograd over the full logits (siglip_loss_ref / clip_loss_ref).

`backend="auto"` is a fixed rule: triton for CUDA tensors in bf16/fp16/fp32, chunked otherwise;
FINEVITI_LOSS_BACKEND overrides it. On one process, triton and chunked run as torch.library custom ops
(fineviti::siglip_loss_fwd / _bwd, fineviti::clip_loss_fwd / _bwd), which torch.compile traces without a break.
Distributed (a process group): negatives come from every rank, by an all-gather of the features (the default) or a
ring of point-to-point transfers (`dist_impl="ring"`). Conventions are open_clip's (ClipLoss, SigLipLoss); the
SigLIP paper (Zhai et al., 2023) describes the ring, Inf-CL (Cheng et al., 2024) the tiling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import torch
import torch.nn.functional as F

from fineviti._checks import env_backend, refuse_interpreted_bf16, triton_interpreting, value_checks_enabled

BACKENDS = ("triton", "chunked", "reference")
DIST_IMPLS = ("all_gather", "ring")
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_CPU_CHUNK_ELEMS = 1 << 22  # chunked path: a (chunk, N) fp32 block of at most 16 MiB
_GPU_CHUNK_BYTES = 256 << 20  # triton path: the (chunk, N) dL/dz buffer of the gradient pass (SigLIP's forward too)
LOGITS_MODES = ("fused", "gemm")


def logits_mode() -> str:
    """Where the triton backend's passes over the logits (the gradient pass: SigLIP's forward with a gradient and
    both losses' backward; CLIP's forward, its log-sum-exps) take their dot products x.y from
    (FINEVITI_LOSS_LOGITS): "fused" (the default), inside the Triton kernel, tile by tile; "gemm" (opt-in, not yet
    timed; 16-bit features, on a torch whose torch.mm writes fp32 from them, else fused), a cuBLAS product per
    chunk of rows with fp32 output, then an elementwise Triton pass over it (contrastive_bwd_dots_kernel,
    contrastive_fwd_dots_kernel): the products at cuBLAS's rate (the H200 ran the fused gradient kernel at about
    233 TFLOP/s against cuBLAS's 800 for the same product) for an fp32 (chunk, N) block written and read once (6
    bytes a logit with the gradient pass's 16-bit dL/dz, 4 in CLIP's forward)."""
    mode = os.environ.get("FINEVITI_LOSS_LOGITS") or "fused"
    if mode not in LOGITS_MODES:
        raise ValueError(f"FINEVITI_LOSS_LOGITS must be one of {LOGITS_MODES}, got {mode!r}")
    return mode


@contextlib.contextmanager
def using_logits_mode(mode: str):
    """FINEVITI_LOSS_LOGITS=mode inside the block (the gradient pass reads it when it runs: put the backward inside
    too), the previous setting restored after."""
    if mode not in LOGITS_MODES:
        raise ValueError(f"mode must be one of {LOGITS_MODES}, got {mode!r}")
    before = os.environ.get("FINEVITI_LOSS_LOGITS")
    os.environ["FINEVITI_LOSS_LOGITS"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FINEVITI_LOSS_LOGITS", None)
        else:
            os.environ["FINEVITI_LOSS_LOGITS"] = before


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------


def siglip_loss_ref(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                    upcast: bool = False) -> torch.Tensor:
    """Plain-torch SigLIP loss over the full (N, N) logits: -sum(logsigmoid(labels * (scale * img @ txt.T + bias)))
    / N with labels +1 on the diagonal and -1 elsewhere. Computes in the features' dtype (the error budget a kernel
    in that dtype is held to), in fp32 with `upcast`; pass fp64 tensors for a gold reference."""
    compute = torch.float32 if upcast and img.dtype in (torch.float16, torch.bfloat16) else img.dtype
    img, txt = img.to(compute), txt.to(compute)
    logits = logit_scale.to(compute) * (img @ txt.T) + logit_bias.to(compute)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=compute) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def clip_loss_ref(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                  upcast: bool = False) -> torch.Tensor:
    """Plain-torch CLIP loss over the full logits: the mean of the image-to-text and text-to-image cross-entropies
    of scale * img @ txt.T with labels arange(N) (open_clip's ClipLoss). Dtypes as siglip_loss_ref."""
    compute = torch.float32 if upcast and img.dtype in (torch.float16, torch.bfloat16) else img.dtype
    img, txt = img.to(compute), txt.to(compute)
    logits = logit_scale.to(compute) * (img @ txt.T)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ----------------------------------------------------------------------------------------------------------------
# Block primitives: rows of x against all rows of y. Both backends give, in fp32:
#   rows(...)  per row of x: SigLIP sum_j softplus(-label_ij * z_ij), or CLIP logsumexp_j z_ij
#   rows_cols(x, y, scale)  CLIP only, bias 0: (logsumexp_j z_ij per row, logsumexp_i z_ij per column, z_ii per
#              row: 0 for rows past N), one pass
#   grads(...) with g = dL/dz per pair (no 1/N): (g @ y, g.T @ x, sum(g * x.y), sum(g)), fp32; with `mult` (a
#              (1,) fp32 tensor), the first two come back multiplied by it, in dx_dtype / dy_dtype (default x's and
#              y's dtypes; the triton backend then folds mult into its dL/dz buffer, so that cuBLAS writes them
#              straight out, with no pass over an fp32 (M, D) or (N, D) product), the sums stay raw; with
#              with_loss (SigLIP), a fifth: the sum of rows(...), from the same pass
# where z = scale * x @ y.T + bias and the positive of row i is column i + diag_offset.
# ----------------------------------------------------------------------------------------------------------------


def _positives(start: int, stop: int, diag_offset: int, n_cols: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(start, stop, device=device)
    cols = rows + diag_offset
    keep = (cols >= 0) & (cols < n_cols)
    return rows[keep] - start, cols[keep]


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the torch paths compute and accumulate in: fp32 for 16-bit and fp32 features, fp64 for fp64 ones
    (the docstrings accept fp64 there; computed in fp32 it lost 1e-7 against the fp64 reference)."""
    return torch.promote_types(t.dtype, torch.float32)


class _Chunked:
    """torch matmuls in fp32 (fp64 for fp64 features: _acc_dtype) over chunks of rows: never more than a few
    (chunk, N) blocks of that dtype alive."""

    name = "chunked"

    def __init__(self, chunk_elems: int | None = None):
        self.chunk_elems = chunk_elems or _CPU_CHUNK_ELEMS

    def _chunks(self, m: int, n: int):
        step = max(1, self.chunk_elems // max(n, 1))
        return [(start, min(m, start + step)) for start in range(0, m, step)]

    def rows(self, x, y, scale, bias, loss, diag_offset=0):
        acc = _acc_dtype(x)
        y32 = y.to(acc)
        out = torch.empty(x.shape[0], device=x.device, dtype=acc)
        for start, stop in self._chunks(x.shape[0], y.shape[0]):
            z = (x[start:stop].to(acc) @ y32.T).mul_(scale).add_(bias)
            if loss == "siglip":
                r, c = _positives(start, stop, diag_offset, y.shape[0], x.device)
                z[r, c] = -z[r, c]  # now -label * z
                out[start:stop] = F.softplus(z).sum(1)
            else:
                out[start:stop] = torch.logsumexp(z, dim=1)
        return out

    def rows_cols(self, x, y, scale):
        """CLIP log-sum-exps of z = scale * x @ y.T along both axes, and the positives' z_ii, from one pass:
        ((M,), (N,), (M,); rows past N: 0) in _acc_dtype(x)."""
        acc = _acc_dtype(x)
        y32 = y.to(acc)
        lse_row = torch.empty(x.shape[0], device=x.device, dtype=acc)
        lse_col = torch.full((y.shape[0],), float("-inf"), device=x.device, dtype=acc)
        positive = torch.zeros(x.shape[0], device=x.device, dtype=acc)
        for start, stop in self._chunks(x.shape[0], y.shape[0]):
            z = (x[start:stop].to(acc) @ y32.T).mul_(scale)
            lse_row[start:stop] = torch.logsumexp(z, dim=1)
            lse_col = torch.logaddexp(lse_col, torch.logsumexp(z, dim=0))
            r, c = _positives(start, stop, 0, y.shape[0], x.device)
            positive[start + r] = z[r, c]
        return lse_row, lse_col, positive

    def grads(self, x, y, scale, bias, loss, diag_offset=0, lse_row=None, lse_col=None, mult=None, dx_dtype=None,
              dy_dtype=None, with_loss=False):
        m, n = x.shape[0], y.shape[0]
        acc = _acc_dtype(x)
        y32 = y.to(acc)
        dx = torch.empty(x.shape, device=x.device, dtype=acc if mult is None else (dx_dtype or x.dtype))
        dy = torch.zeros(y.shape, device=x.device, dtype=acc)
        ds_db = torch.zeros(3, device=x.device, dtype=acc)
        for start, stop in self._chunks(m, n):
            xc = x[start:stop].to(acc)
            dots = xc @ y32.T
            r, c = _positives(start, stop, diag_offset, n, x.device)
            if loss == "siglip":
                z = dots * scale + bias
                if with_loss:
                    u = z.clone()
                    u[r, c] = -u[r, c]  # -label * z
                    ds_db[2] += F.softplus(u).sum()
                    del u
                z_pos = z[r, c]
                g = torch.sigmoid_(z)  # -label * sigmoid(-label * z): sigmoid(z) for the negatives,
                g[r, c] = -torch.sigmoid(-z_pos)  # -sigmoid(-z) for the positives (not sigmoid(z) - 1: no cancellation)
            else:
                z = dots * scale
                g = (z - lse_row[start:stop, None]).exp_()
                g += z.sub_(lse_col[None, :]).exp_()
                del z
                g[r, c] -= 2
            ds_db[0] += torch.dot(g.view(-1), dots.view(-1))
            ds_db[1] += g.sum()
            del dots
            dx[start:stop] = (g @ y32) if mult is None else (g @ y32).mul_(mult)  # chunk by chunk: no fp32 (M, D)
            dy.addmm_(g.T, xc)
        if mult is not None:
            dy = dy.mul_(mult).to(dy_dtype or y.dtype)
        return (dx, dy, ds_db[0], ds_db[1]) + ((ds_db[2],) if with_loss else ())


_FP32_OUT_MM = {"mm": True, "addmm": True}  # whether this torch has mm/addmm(out_dtype=float32); found on first use


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32: from 16-bit CUDA inputs with fp32 output where torch has it (torch.mm(out_dtype=...)), else
    rounded to the inputs' dtype first."""
    if a.dtype == torch.float32 or a.device.type != "cuda":
        return a.float() @ b.float()
    if _FP32_OUT_MM["mm"]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise  # not a missing feature: keep the fp32-output products for the next call
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT_MM["mm"] = False
    return (a @ b).float()


def _dots_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """a @ b.T of 16-bit features as exact fp32 products (fp32 accumulation and output), or None where this torch
    cannot write a CUDA product in fp32 (rounding the logits to 16 bits first would bias the gradient)."""
    if a.device.type != "cuda":
        return a.float() @ b.float().T
    if not _FP32_OUT_MM["mm"]:
        return None
    out = _mm_f32(a, b.T)
    return out if _FP32_OUT_MM["mm"] else None


def _gemm_logits(x: torch.Tensor) -> bool:
    """Whether the triton backend takes its dot products from cuBLAS (logits_mode() "gemm"): 16-bit features
    only; fp32 ones stay with the fused kernels, whose products are IEEE fp32 whatever
    torch.set_float32_matmul_precision says."""
    return logits_mode() == "gemm" and x.dtype in (torch.bfloat16, torch.float16)


def _addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 acc: in place in cuBLAS (beta = 1) where torch has addmm(out_dtype=...), so that no
    second acc-sized buffer exists."""
    if a.device.type == "cuda" and a.dtype != torch.float32 and _FP32_OUT_MM["addmm"]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT_MM["addmm"] = False
    acc += _mm_f32(a, b)


class _Triton:
    """Our kernels: forward reductions in Triton; backward dL/dz in Triton chunk by chunk, its products in cuBLAS."""

    name = "triton"

    def __init__(self, chunk_bytes: int | None = None):
        self.chunk_bytes = chunk_bytes or _GPU_CHUNK_BYTES

    @staticmethod
    def _kernels():
        from fineviti.kernels import contrastive

        return contrastive

    def rows(self, x, y, scale, bias, loss, diag_offset=0):
        if x.shape[0] == 0 or y.shape[0] == 0:  # no columns: an empty sum, or the log of one
            fill = 0.0 if loss == "siglip" else float("-inf")
            return torch.full((x.shape[0],), fill, device=x.device, dtype=torch.float32)
        if loss == "clip" and _gemm_logits(x):  # CLIP's bias is zero (it cancels), as the dots kernel assumes
            out = self._clip_from_dots(x.contiguous(), y.contiguous(), scale, cols=False)
            if out is not None:
                return out[0]
        return self._kernels().loss_rows(x.contiguous(), y.contiguous(), scale, bias, loss=loss,
                                         diag_offset=diag_offset)

    def rows_cols(self, x, y, scale):
        if x.shape[0] == 0 or y.shape[0] == 0:
            return (torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=torch.float32),
                    torch.full((y.shape[0],), float("-inf"), device=x.device, dtype=torch.float32),
                    torch.zeros(x.shape[0], device=x.device, dtype=torch.float32))
        if _gemm_logits(x):
            out = self._clip_from_dots(x.contiguous(), y.contiguous(), scale, cols=True)
            if out is not None:
                return out
        return self._kernels().loss_rows_cols(x.contiguous(), y.contiguous(), scale)

    def _clip_from_dots(self, x, y, scale, cols):
        """CLIP's forward in the gemm logits mode: per chunk of rows, the fp32 dot products from one product, then
        one elementwise pass (clip_partials_from_dots): (lse_row, lse_col or None, the positives z_ii, rows past
        N: 0), as loss_rows_cols gives them; None where this torch has no fp32-output product (the fused path
        then runs instead)."""
        kc = self._kernels()
        m, n = x.shape[0], y.shape[0]
        block_m = kc.DOTS_CONFIG["BLOCK_M"]
        step = max(block_m, self.chunk_bytes // (4 * n) // block_m * block_m)  # the (chunk, N) fp32 products
        lse_row = torch.empty(m, device=x.device, dtype=torch.float32)
        positive = torch.zeros(m, device=x.device, dtype=torch.float32)
        lse_col = None
        for start in range(0, m, step):
            stop = min(m, start + step)
            dots = _dots_f32(x[start:stop], y)
            if dots is None:
                return None
            row_part, col_part = kc.clip_partials_from_dots(dots, scale, cols=cols)
            lse_row[start:stop] = kc.lse_of_partials(row_part)
            if cols:
                part = kc.lse_of_partials(col_part)
                lse_col = part if lse_col is None else torch.logaddexp(lse_col, part)
            diagonal = dots.diagonal(offset=start)  # (r, start + r): row start + r's positive, where it exists
            torch.mul(diagonal, scale, out=positive[start:start + diagonal.shape[0]])
            del dots
        return lse_row, lse_col, positive

    def grads(self, x, y, scale, bias, loss, diag_offset=0, lse_row=None, lse_col=None, mult=None, dx_dtype=None,
              dy_dtype=None, with_loss=False):
        kc = self._kernels()
        x, y = x.contiguous(), y.contiguous()
        m, n = x.shape[0], y.shape[0]
        dx_dtype = torch.float32 if mult is None else (dx_dtype or x.dtype)
        dy_dtype = torch.float32 if mult is None else (dy_dtype or y.dtype)
        # mult folded into the stored dL/dz, so that cuBLAS writes the scaled products straight out: not for fp16,
        # whose buffer holds 2**14 * dL/dz (grad_scale) and has no room for a factor of unknown size
        fold = mult is not None and x.dtype != torch.float16
        gemm = _gemm_logits(x)
        block_m = kc.config(x.shape[1], x.dtype, "bwd_loss" if with_loss else "bwd", loss)["BLOCK_M"]
        row_bytes = n * (x.element_size() + (4 if gemm else 0))  # dL/dz (and the fp32 dot products)
        step = max(block_m, self.chunk_bytes // max(1, row_bytes) // block_m * block_m)
        starts = list(range(0, m if n else 0, step))
        g = kc.new_grad_buffer(min(step, m), n, x)
        dx = (torch.empty if starts else torch.zeros)(x.shape, device=x.device, dtype=dx_dtype)
        dy = dy32 = None  # dy32: the fp32 sum over chunks of rows
        sums = torch.zeros(3 if with_loss else 2, device=x.device, dtype=torch.float32)  # sum(g), sum(g x.y)[, loss]
        unscale = 1.0 / kc.grad_scale(x.dtype)  # g is stored scaled up in fp16
        store_mult = mult if fold else torch.ones(1, device=x.device, dtype=torch.float32)
        for start in starts:
            stop = min(m, start + step)
            gc, xc = g[:stop - start], x[start:stop]
            args = dict(loss=loss, diag_offset=diag_offset + start,
                        lse_row=None if lse_row is None else lse_row[start:stop], lse_col=lse_col, with_loss=with_loss,
                        store_cols=kc.padded_cols(n), mult=store_mult)
            dots = _dots_f32(xc, y) if gemm else None
            if dots is not None:
                sums += kc.loss_grad_from_dots(dots, scale, bias, gc, **args)
                del dots
            else:  # the fused kernel (also where this torch has no fp32-output product: then for every chunk)
                sums += kc.loss_grad_logits(xc, y, scale, bias, gc, **args)
            if fold and dx_dtype == x.dtype:
                # cuBLAS accumulates in fp32 and rounds once, as every bf16 nn.Linear does (split-K partial sums
                # follow torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction, as there)
                torch.mm(gc, y, out=dx[start:stop])
            else:
                gy = _mm_f32(gc, y)
                if unscale != 1.0:
                    gy.mul_(unscale)  # a power of two: exact
                if mult is not None and not fold:
                    gy.mul_(mult)
                dx[start:stop] = gy
                del gy
            if fold and len(starts) == 1 and dy_dtype == x.dtype:
                dy = torch.mm(gc.T, xc)  # one chunk of rows: straight out, no fp32 sum
            elif dy32 is None:
                dy32 = _mm_f32(gc.T, xc)
            else:
                _addmm_f32(dy32, gc.T, xc)
        if dy is None:
            if dy32 is None:  # no rows or no columns: nothing contributes
                dy32 = torch.zeros(y.shape, device=x.device, dtype=torch.float32)
            if unscale != 1.0:
                dy32.mul_(unscale)
            if mult is not None and not fold:
                dy32.mul_(mult)
            dy = dy32.to(dy_dtype)
        db, ds, *total = sums.unbind()
        return (dx, dy, ds, db, *total)


def _backend_impl(name: str):
    if name not in ("triton", "chunked"):
        raise ValueError(f"backend must be 'triton' or 'chunked' here, got {name!r}")
    return _Triton() if name == "triton" else _Chunked()


# ----------------------------------------------------------------------------------------------------------------
# Process groups: counts per rank, padded all-gathers, the autograd all-gather and the ring.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Dist:
    group: object  # a ProcessGroup, or None on one process
    world: int
    rank: int
    counts: tuple[int, ...]  # rows of every rank

    @property
    def offsets(self) -> list[int]:
        out = [0]
        for c in self.counts[:-1]:
            out.append(out[-1] + c)
        return out

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def row_start(self) -> int:
        return self.offsets[self.rank]

    @property
    def n_max(self) -> int:
        return max(self.counts)


def _resolve_group(group):
    import torch.distributed as dist

    if group is None:
        return None
    if isinstance(group, str):
        if group != "default":
            raise ValueError(f"group must be None, 'default' or a ProcessGroup, got {group!r}")
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None  # one process: nothing to exchange
        return dist.group.WORLD
    return group


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _make_dist(group, img, failed: bool = False, host_group=None) -> _Dist | None:
    """The ranks' row counts, in one all-gather that also carries each rank's D, dtype and whether its inputs
    failed their checks: an error on one rank (a bad input, a D or dtype that differs from the others') is raised
    on every rank, where a rank that raised alone left the others waiting in the collective (or, with another
    dtype, crashed gloo). A rank that `failed` gets None after the exchange, and raises its own error.

    The exchange goes over `host_group` when one is given (a gloo group of the same processes in the same order,
    _check_host_group): host tensors, so reading the result does not wait for the device. Over an NCCL `group` it
    goes through the GPU, and reading it back waits for every kernel queued before the loss."""
    if group is None:
        return None if failed else _Dist(None, 1, 0, (img.shape[0],))
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shaped = isinstance(img, torch.Tensor) and img.dim() == 2
    via = group if host_group is None else host_group
    mine = torch.tensor([img.shape[0] if shaped else -1, img.shape[1] if shaped else -1,
                         _DTYPE_CODES.get(img.dtype, -1) if shaped else -1, int(failed)],
                        device=_comm_device(via, img if isinstance(img, torch.Tensor) else None), dtype=torch.int64)
    # (a bad input's rank still joins the exchange, on the group's device, and raises after it)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=via)
    # one read of all ranks' rows (not one per rank), a host synchronisation when they are on the GPU: the shapes
    # below depend on it
    rows = torch.stack(every).tolist()
    if failed:
        return None
    failed = [r for r, row in enumerate(rows) if row[3]]
    if failed:
        raise ValueError(f"the contrastive loss's inputs failed their checks on rank(s) {failed} (the reason is "
                         f"raised there); every rank of the group stops")
    widths = {row[1] for row in rows}
    if len(widths) != 1:
        raise ValueError(f"img and txt must have the same D on every rank, got D per rank {[r[1] for r in rows]}")
    names = {code: str(dtype).replace("torch.", "") for dtype, code in _DTYPE_CODES.items()}
    if len({r[2] for r in rows}) != 1:
        raise TypeError(f"img and txt must have the same dtype on every rank, got "
                        f"{[names.get(r[2], 'other') for r in rows]} per rank")
    return _Dist(group, world, rank, tuple(r[0] for r in rows))


def _check_host_group(host_group, group) -> None:
    """host_group: None, or a gloo group of the processes of `group`, in the same order. Checked on each rank from
    the groups' member lists, before any collective: every rank of `group` reaches the same verdict (a rank outside
    host_group raises its own error), so none is left waiting in the exchange."""
    if host_group is None or group is None:
        return
    import torch.distributed as dist

    if isinstance(host_group, int) and host_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"host_group must hold the processes of group, and this rank ({dist.get_rank()}) is no "
                         f"member of it")
    if isinstance(host_group, str) or not isinstance(host_group, dist.ProcessGroup):
        raise TypeError(f"host_group must be None or a gloo ProcessGroup, got {type(host_group).__name__}")
    backend = dist.get_backend(host_group)
    if backend != "gloo":
        raise ValueError(f"host_group must be a gloo group (its exchange stays on the host), got backend {backend!r}")
    members = dist.get_process_group_ranks(host_group), dist.get_process_group_ranks(group)
    if members[0] != members[1]:
        raise ValueError(f"host_group must hold the processes of group in the same order: it holds global ranks "
                         f"{members[0]}, group {members[1]}")


def _comm_device(group, t: torch.Tensor | None) -> torch.device:
    """Where a collective's tensors live: the CPU for gloo, else t's device, or (t missing or not on an
    accelerator: a bad input, which the exchange reports on every rank) the device the NCCL group is bound to,
    or this rank's current CUDA device."""
    import torch.distributed as dist

    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    if t is not None and t.device.type != "cpu":
        return t.device
    bound = getattr(group, "bound_device_id", None)
    return bound if bound is not None else torch.device("cuda", torch.cuda.current_device())


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows, *t.shape[1:]))
    out[:t.shape[0]] = t
    return out


def _gather_rows(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    """Concatenation over ranks of every rank's `t` (counts[r] rows each), without autograd."""
    if d.world == 1:
        return t
    import torch.distributed as dist

    padded = _pad_rows(t.detach(), d.n_max)
    parts = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded, group=d.group)
    return torch.cat([p[:c] for p, c in zip(parts, d.counts, strict=True)], 0)


_GLOO_REDUCE_SCATTER = [True]  # until a gloo without reduce-scatter (older torch) says otherwise


def _reduce_scatter(out: torch.Tensor, padded: torch.Tensor, group) -> None:
    """dist.reduce_scatter_single where torch has it (it replaces the deprecated reduce_scatter_tensor)."""
    import torch.distributed as dist

    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, padded, group=group)


def _reduce_rows(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    """Sum over ranks of the (total, ...) tensor `t`, returning this rank's rows: a reduce-scatter (NCCL, and gloo
    where it has one, so that the CPU tests run the GPUs' path), else an all-reduce and a slice."""
    if d.world == 1:
        return t
    import torch.distributed as dist

    if all(c == d.n_max for c in d.counts):  # equal shares: already laid out as the collective wants
        padded = t.contiguous()
    else:
        padded = torch.cat([_pad_rows(t[o:o + c], d.n_max) for o, c in zip(d.offsets, d.counts, strict=True)], 0)
    out = padded.new_empty((d.n_max, *t.shape[1:]))
    gloo = dist.get_backend(d.group) == "gloo"
    if not gloo or _GLOO_REDUCE_SCATTER[0]:
        try:
            _reduce_scatter(out, padded, d.group)
            return out[:d.counts[d.rank]]
        except (RuntimeError, NotImplementedError):  # raised on every rank alike, before any transfer
            if not gloo:
                raise
            _GLOO_REDUCE_SCATTER[0] = False
    if padded.data_ptr() == t.data_ptr():
        padded = padded.clone()  # the all-reduce works in place: not on the caller's tensor
    dist.all_reduce(padded, group=d.group)
    return padded[d.rank * d.n_max:(d.rank + 1) * d.n_max][:d.counts[d.rank]]


class _AllGatherRows(torch.autograd.Function):
    """All-gather of rows whose gradient flows back to the owner (the reference backend's): the backward sums every
    rank's gradient of the gathered tensor and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, t, d):
        ctx.d = d
        return _gather_rows(t, d)

    @staticmethod
    def backward(ctx, grad):
        summed = _reduce_rows(grad.to(_saved_grad_dtype(grad)).contiguous(), ctx.d)  # fp16: summed in fp32
        return summed.to(grad.dtype), None


def _exchange(send: torch.Tensor, recv: torch.Tensor, d: _Dist, tag: int):
    """Post send -> rank + 1 and recv <- rank - 1 (asynchronous); returns the requests to wait on."""
    import torch.distributed as dist

    nxt = dist.get_global_rank(d.group, (d.rank + 1) % d.world)
    prv = dist.get_global_rank(d.group, (d.rank - 1) % d.world)
    ops = [dist.P2POp(dist.isend, send, nxt, d.group, tag), dist.P2POp(dist.irecv, recv, prv, d.group, tag)]
    return dist.batch_isend_irecv(ops)


def _ring(local_padded: torch.Tensor, d: _Dist):
    """Yield (owner, buffer) for every rank's block in ring order, starting with ours; the transfer of the next
    block is in flight while the caller computes on the current one."""
    current = local_padded
    for step in range(d.world):
        owner = (d.rank - step) % d.world
        requests = None
        if step < d.world - 1:
            incoming = torch.empty_like(current)
            requests = _exchange(current, incoming, d, tag=0)
        yield owner, current
        if requests is not None:
            for req in requests:
                req.wait()
            current = incoming


def _ring_grads(impl, x, y, scale, bias, loss, d: _Dist, lse_row=None, lse_col_all=None):
    """Backward of the ring: text blocks travel again and their gradient accumulators travel with them, one hop
    behind, so that after a full turn each accumulator reaches its owner. Returns fp32 (dx, dy_local, ds, db)."""
    dx = torch.zeros(x.shape, device=x.device, dtype=_acc_dtype(x))
    ds_db = torch.zeros(2, device=x.device, dtype=_acc_dtype(x))
    pending, received = None, None
    offsets = d.offsets
    for owner, block in _ring(_pad_rows(y, d.n_max), d):
        count = d.counts[owner]
        lse_col = None if lse_col_all is None else lse_col_all[offsets[owner]:offsets[owner] + count]
        dxk, dyk, ds, db = impl.grads(x, block[:count], scale, bias, loss, diag_offset=d.row_start - offsets[owner],
                                      lse_row=lse_row, lse_col=lse_col)
        dx += dxk
        ds_db[0] += ds
        ds_db[1] += db
        acc = _pad_rows(dyk, d.n_max)
        if pending is not None:  # the accumulator of this block from the rank before us
            for req in pending:
                req.wait()
            acc += received
        if d.world == 1:
            return dx, acc[:count], ds_db[0], ds_db[1]
        received = torch.empty_like(acc)
        pending = _exchange(acc, received, d, tag=1)
    for req in pending:
        req.wait()
    return dx, received[:d.counts[d.rank]], ds_db[0], ds_db[1]


# ----------------------------------------------------------------------------------------------------------------
# Forward and backward bodies, shared by the custom ops (one process) and the autograd Functions (a process group).
# coef = world / total rows: each rank's loss is (its rows' share) * world / N_global, so that the mean over ranks
# of the losses is the global loss and the mean of the gradients is the global gradient.
# ----------------------------------------------------------------------------------------------------------------


def _row_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x_i . y_i per row in _acc_dtype(x), a few thousand rows at a time: no fp32 copies of the whole features."""
    acc = _acc_dtype(x)
    out = torch.empty(x.shape[0], device=x.device, dtype=acc)
    step = max(1, _CPU_CHUNK_ELEMS // max(1, x.shape[1]))
    for start in range(0, x.shape[0], step):
        out[start:start + step] = (x[start:start + step].to(acc) * y[start:start + step].to(acc)).sum(-1)
    return out


def _scalar(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar parameter as a (1,) tensor on the features' device, in the dtype they are computed in."""
    return t.detach().to(device=like.device, dtype=_acc_dtype(like)).reshape(1)


def _param_grad(raw: torch.Tensor, factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (raw * factor).reshape(like.shape).to(like.dtype)


def _feature_grad(raw: torch.Tensor, factor: torch.Tensor, like: torch.Tensor,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """The gradient of a feature tensor from the ring's fp32 accumulator (scaled here, in place), in `like`'s dtype
    unless `dtype` is given."""
    return raw.mul_(factor).to(dtype or like.dtype)


def _siglip_forward(x, y, scale, bias, impl, d: _Dist, ring: bool) -> torch.Tensor:
    """Local image rows against all text columns (gathered, or this process's own); or, with `ring`, text blocks
    passed around the ring."""
    s32, b32 = _scalar(scale, x), _scalar(bias, x)
    total = torch.zeros((), device=x.device, dtype=_acc_dtype(x))
    if ring:
        for owner, block in _ring(_pad_rows(y, d.n_max), d):
            total += impl.rows(x, block[:d.counts[owner]], s32, b32, "siglip",
                               diag_offset=d.row_start - d.offsets[owner]).sum()
    else:
        total += impl.rows(x, y, s32, b32, "siglip", diag_offset=d.row_start).sum()
    return total * (d.world / d.total)


def _saved_grad_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a feature gradient is kept in between forward and backward: fp32 for fp16 features (their small
    gradients would flush to zero or lose bits before the upstream gradient, a loss scale, multiplies them); the
    features' own dtype otherwise (bf16 has fp32's range: one more rounding where the upstream gradient is not 1)."""
    return torch.float32 if t.dtype == torch.float16 else t.dtype


def _siglip_forward_with_grads(x, y, scale, bias, impl, d: _Dist):
    """The loss and, from the same pass over the logits, (d_img, d_txt, d_scale, d_bias) for an upstream gradient of
    1, in the shapes of the inputs and the dtypes of _saved_grad_dtype (parameters: their own): SigLIP's dL/dz needs
    no normaliser, so the forward can produce them and the backward only multiplies (three logit matmuls in all
    instead of four). Texts: all of them (gathered)."""
    s32, b32 = _scalar(scale, x), _scalar(bias, x)
    coef = torch.full((1,), d.world / d.total, device=x.device, dtype=_acc_dtype(x))
    dx, dy, ds, db, total = impl.grads(x, y, s32, b32, "siglip", diag_offset=d.row_start, mult=coef * s32,
                                       dx_dtype=_saved_grad_dtype(x), dy_dtype=_saved_grad_dtype(y), with_loss=True)
    return total * coef[0], dx, dy, _param_grad(ds, coef, scale), _param_grad(db, coef, bias)


def _apply_upstream(grad: torch.Tensor, saved, dtypes) -> tuple:
    """The saved gradients (for an upstream gradient of 1) times the upstream gradient, in the inputs' dtypes. A
    double backward (create_graph=True) would need the second-order terms, which the saved gradients do not carry:
    it raises instead of returning a wrong answer."""
    _first_order_only("siglip_loss")
    return tuple((g * grad).to(dtype) for g, dtype in zip(saved, dtypes, strict=True))


def _first_order_only(name: str) -> None:
    """Raise in a backward run with create_graph=True (the only way grad mode is on in there): the gradients these
    backwards return carry no second-order terms, and a gradient penalty would silently miss them."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name} does not support a double backward (create_graph=True through the loss): its "
                           "gradients carry no second-order terms; use backend='reference' for that")


@contextlib.contextmanager
def _no_autocast(device: torch.device, dtype: torch.dtype | None = None):
    """The ops' bodies run with autocast off (their matmuls choose their own precision: fp32 accumulation, fp32 for
    fp32 features; a surrounding autocast region would recast them) and, unless the features are bf16, with fp32
    matmuls in IEEE fp32 whatever torch.set_float32_matmul_precision or allow_tf32 say (TF32 on a GPU, or bf16 on a
    CPU under "medium", gave errors of 1e-3 in fp32 gradients; the Triton logits are IEEE already; bf16 features
    upcast to fp32 lose nothing in bf16 products). Not while torch.compile traces."""
    try:
        available = torch.amp.is_autocast_available(device.type)
    except AttributeError:  # a torch without the query
        available = device.type in ("cuda", "cpu")
    exact = _ieee_fp32() if dtype != torch.bfloat16 else contextlib.nullcontext()
    with torch.autocast(device.type, enabled=False) if available else contextlib.nullcontext(), exact:
        yield


def _precision_settings() -> list:
    """The matmul precision settings of torch's per-backend API (torch >= 2.9), else none."""
    found = []
    for owner in (torch.backends.cuda, getattr(torch.backends, "mkldnn", None)):
        matmul = getattr(owner, "matmul", None)
        if matmul is not None and hasattr(matmul, "fp32_precision"):
            found.append(matmul)
    return found


_IEEE_LOCK = threading.Lock()
_IEEE_STATE = {"depth": 0, "restore": None}  # the ops inside _ieee_fp32 now (every thread), and how to undo it


@contextlib.contextmanager
def _ieee_fp32():
    """IEEE fp32 matmuls inside, the caller's settings restored after, exactly: the legacy setting (when it can be
    read: torch raises on a mix of the two APIs) through set_float32_matmul_precision, which keeps both APIs
    consistent while the op runs, then each backend's fp32_precision as it was. A process-wide setting: another
    thread's fp32 matmuls in the same moments run in IEEE fp32 too (slower, not less accurate). Counted across
    threads: the first op in sets it, the last out restores it (each restoring its own, a thread leaving first put
    TF32 back under another's running loss)."""
    if torch.compiler.is_compiling():
        yield
        return
    with _IEEE_LOCK:
        if _IEEE_STATE["depth"] == 0:
            _IEEE_STATE["restore"] = _set_ieee_fp32()
        _IEEE_STATE["depth"] += 1
    try:
        yield
    finally:
        with _IEEE_LOCK:
            _IEEE_STATE["depth"] -= 1
            if _IEEE_STATE["depth"] == 0 and _IEEE_STATE["restore"] is not None:
                restore, _IEEE_STATE["restore"] = _IEEE_STATE["restore"], None
                restore()


def _set_ieee_fp32():
    """Sets IEEE fp32 matmuls; returns what restores the settings before (None where they were IEEE already)."""
    settings = _precision_settings()
    saved = [m.fp32_precision for m in settings]
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller mixed the two APIs
        legacy = None
    if legacy == "highest" or (legacy is None and all(v == "ieee" for v in saved)):
        return None
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
    else:
        for m in settings:
            m.fp32_precision = "ieee"

    def restore():
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for m, value in zip(settings, saved, strict=True):
            m.fp32_precision = value

    return restore


def _siglip_backward(grad, x, y, scale, bias, impl, d: _Dist, ring: bool, dy_dtype=None):
    """(d_img, d_txt, d_scale, d_bias) in the dtypes and shapes of the inputs (d_txt: in `dy_dtype` if given); with
    `ring`, the text blocks travel again, with their gradient accumulators."""
    s32, b32 = _scalar(scale, x), _scalar(bias, x)
    factor = grad.to(_acc_dtype(x)) * (d.world / d.total)
    if ring:
        dx, dy, ds, db = _ring_grads(impl, x, y, s32, b32, "siglip", d)
        dx, dy = _feature_grad(dx, factor * s32, x), _feature_grad(dy, factor * s32, y, dtype=dy_dtype)
    else:
        dx, dy, ds, db = impl.grads(x, y, s32, b32, "siglip", diag_offset=d.row_start, mult=factor * s32,
                                    dy_dtype=dy_dtype)
    return dx, dy, _param_grad(ds, factor, scale), _param_grad(db, factor, bias)


def _clip_forward(x, y, scale, x_all, impl, d: _Dist, ring: bool):
    """CLIP over this rank's image rows and text rows: image-to-text log-sum-exps of the local images against all
    texts, text-to-image ones of the local texts against all images, and their positives. Returns the loss, the
    local images' log-sum-exps and every text's (an all-gather of N floats), both fp32 (fp64 for fp64 features),
    for the backward."""
    s32 = _scalar(scale, x)
    zero = torch.zeros(1, device=x.device, dtype=_acc_dtype(x))
    n = d.counts[d.rank]
    y_loc = y if ring else y[d.row_start:d.row_start + n]
    positive = None  # s32 * x_i . y_i, where no pass over the logits gives them
    if ring:
        lse_row = torch.full((n,), float("-inf"), device=x.device, dtype=_acc_dtype(x))
        lse_col = torch.full((n,), float("-inf"), device=x.device, dtype=_acc_dtype(x))
        both = torch.cat([_pad_rows(x, d.n_max), _pad_rows(y, d.n_max)], 0)
        for owner, block in _ring(both, d):
            count = d.counts[owner]
            lse_row = torch.logaddexp(lse_row, impl.rows(x, block[d.n_max:d.n_max + count], s32, zero, "clip"))
            lse_col = torch.logaddexp(lse_col, impl.rows(y_loc, block[:count], s32, zero, "clip"))
    elif d.world == 1:  # both directions and the positives from one pass over the logits
        lse_row, lse_col, positive = impl.rows_cols(x, y, s32)
    else:
        lse_row = impl.rows(x, y, s32, zero, "clip")
        lse_col = impl.rows(y_loc, x_all, s32, zero, "clip")
    if positive is None:
        positive = s32 * _row_dots(x, y_loc)
    total = (lse_row - positive).sum() + (lse_col - positive).sum()
    return total * (d.world / (2 * d.total)), lse_row, _gather_rows(lse_col, d)


def _clip_backward(grad, x, y, scale, lse_row, lse_col_all, impl, d: _Dist, ring: bool, dy_dtype=None):
    """dL/dz of both directions for the pairs (local image, every text): (d_img, d_txt, d_scale), the texts' for
    all texts (the caller sums them to their owners), d_txt in `dy_dtype` if given."""
    s32 = _scalar(scale, x)
    zero = torch.zeros(1, device=x.device, dtype=_acc_dtype(x))
    factor = grad.to(_acc_dtype(x)) * (d.world / (2 * d.total))
    if ring:
        dx, dy, ds, _ = _ring_grads(impl, x, y, s32, zero, "clip", d, lse_row=lse_row, lse_col_all=lse_col_all)
        dx, dy = _feature_grad(dx, factor * s32, x), _feature_grad(dy, factor * s32, y, dtype=dy_dtype)
    else:
        dx, dy, ds, _ = impl.grads(x, y, s32, zero, "clip", diag_offset=d.row_start, lse_row=lse_row,
                                   lse_col=lse_col_all, mult=factor * s32, dy_dtype=dy_dtype)
    return dx, dy, _param_grad(ds, factor, scale)


# ----------------------------------------------------------------------------------------------------------------
# One process: torch.library custom ops with an autograd formula and fake implementations, so that torch.compile
# traces them whole. `backend` is "triton" or "chunked"; the gradients come back in the inputs' dtypes and shapes.
# ----------------------------------------------------------------------------------------------------------------


def _one_process(img: torch.Tensor) -> _Dist:
    return _Dist(None, 1, 0, (img.shape[0],))


@torch.library.custom_op("fineviti::siglip_loss_fwd", mutates_args=())
def _siglip_fwd_op(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                   backend: str, with_grad: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d_img, d_txt, d_scale, d_bias): with `with_grad`, the gradients for an upstream gradient of 1 come
    from the forward's own pass over the logits (the backward scales them); without it they are empty."""
    impl, d = _backend_impl(backend), _one_process(img)
    with _no_autocast(img.device, img.dtype):
        if with_grad:
            return _siglip_forward_with_grads(img, txt, logit_scale, logit_bias, impl, d)
        loss = _siglip_forward(img, txt, logit_scale, logit_bias, impl, d, ring=False)
    return (loss, *(t.new_empty((0,)) for t in (img, txt, logit_scale, logit_bias)))


@_siglip_fwd_op.register_fake
def _(img, txt, logit_scale, logit_bias, backend, with_grad=False):
    loss = img.new_empty((), dtype=_acc_dtype(img))
    if with_grad:
        return (loss, img.new_empty(img.shape, dtype=_saved_grad_dtype(img)),
                txt.new_empty(txt.shape, dtype=_saved_grad_dtype(txt)), *(t.new_empty(t.shape) for t in
                                                                         (logit_scale, logit_bias)))
    return (loss, *(t.new_empty((0,)) for t in (img, txt, logit_scale, logit_bias)))


@torch.library.custom_op("fineviti::siglip_loss_bwd", mutates_args=())
def _siglip_bwd_op(grad: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                   logit_bias: torch.Tensor,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _no_autocast(img.device, img.dtype):
        return _siglip_backward(grad, img, txt, logit_scale, logit_bias, _backend_impl(backend), _one_process(img),
                                ring=False)


@_siglip_bwd_op.register_fake
def _(grad, img, txt, logit_scale, logit_bias, backend):
    return tuple(t.new_empty(t.shape) for t in (img, txt, logit_scale, logit_bias))


def _siglip_setup_context(ctx, inputs, output):
    *tensors, ctx.backend, ctx.with_grad = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.dtypes = [t.dtype for t in tensors]  # the dtypes the gradients come back in
    ctx.save_for_backward(*(output[1:] if ctx.with_grad else tensors))


def _siglip_fwd_backward(ctx, grad, *_):
    if ctx.with_grad:  # the forward's gradients, for an upstream gradient of 1
        return *_apply_upstream(grad, ctx.saved_tensors, ctx.dtypes), None, None
    return *_siglip_bwd_op(grad, *ctx.saved_tensors, ctx.backend), None, None


torch.library.register_autograd("fineviti::siglip_loss_fwd", _siglip_fwd_backward,
                                setup_context=_siglip_setup_context)


@torch.library.custom_op("fineviti::clip_loss_fwd", mutates_args=())
def _clip_fwd_op(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse_row, lse_col): the loss and the (N,) image-to-text and text-to-image log-sum-exps, fp32 (fp64 for
    fp64 features)."""
    with _no_autocast(img.device, img.dtype):
        return _clip_forward(img, txt, logit_scale, img, _backend_impl(backend), _one_process(img), ring=False)


@_clip_fwd_op.register_fake
def _(img, txt, logit_scale, backend):
    lse = img.new_empty((img.shape[0],), dtype=_acc_dtype(img))
    return img.new_empty((), dtype=lse.dtype), lse, torch.empty_like(lse)


@torch.library.custom_op("fineviti::clip_loss_bwd", mutates_args=())
def _clip_bwd_op(grad: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                 lse_row: torch.Tensor, lse_col: torch.Tensor,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _no_autocast(img.device, img.dtype):
        return _clip_backward(grad, img, txt, logit_scale, lse_row, lse_col, _backend_impl(backend),
                              _one_process(img), ring=False)


@_clip_bwd_op.register_fake
def _(grad, img, txt, logit_scale, lse_row, lse_col, backend):
    return tuple(t.new_empty(t.shape) for t in (img, txt, logit_scale))


def _clip_setup_context(ctx, inputs, output):
    img, txt, logit_scale, ctx.backend = inputs
    _, lse_row, lse_col = output
    ctx.save_for_backward(img, txt, logit_scale, lse_row, lse_col)
    ctx.mark_non_differentiable(lse_row, lse_col)


def _clip_fwd_backward(ctx, grad, grad_lse_row, grad_lse_col):
    _first_order_only("clip_loss")
    return *_clip_bwd_op(grad, *ctx.saved_tensors, ctx.backend), None


torch.library.register_autograd("fineviti::clip_loss_fwd", _clip_fwd_backward, setup_context=_clip_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# A process group: autograd Functions (collectives and the ring do not go through torch.library).
# ----------------------------------------------------------------------------------------------------------------


class _SiglipFn(torch.autograd.Function):
    """SigLIP on a process group. y: this rank's texts, all-gathered in here (or passed around the ring), so that
    the backward sums the gathered texts' gradients over the ranks before they take y's dtype: in fp32 for fp16
    features (_saved_grad_dtype), where a sum of fp16 partial gradients lost about 3 roundings per entry."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, impl, d, ring, with_grad):
        ctx.impl, ctx.d, ctx.ring = impl, d, ring
        # gathered texts: with a gradient wanted (decided by the caller: grad mode is off in here), the gradients
        # come from the forward's pass over the logits (the ring passes its text blocks again in the backward
        # instead, so that no rank holds the gradients of every text)
        ctx.with_grad = with_grad and not ring
        ctx.dtypes = [t.dtype for t in (x, y, scale, bias)]
        y_cols = y if ring else _gather_rows(y, d)
        with _no_autocast(x.device, x.dtype):
            if ctx.with_grad:
                loss, *grads = _siglip_forward_with_grads(x, y_cols, scale, bias, impl, d)
                ctx.save_for_backward(*grads)
                return loss
            ctx.save_for_backward(x, y_cols, scale, bias)
            return _siglip_forward(x, y_cols, scale, bias, impl, d, ring)

    @staticmethod
    def backward(ctx, grad):
        _first_order_only("siglip_loss")
        d, dtypes = ctx.d, list(ctx.dtypes)
        if not ctx.ring:
            dtypes[1] = _saved_grad_dtype(ctx.saved_tensors[1])  # every text's gradient, summed below
        if ctx.with_grad:
            grads = _apply_upstream(grad, ctx.saved_tensors, dtypes)
        else:
            with _no_autocast(grad.device, ctx.saved_tensors[0].dtype):
                grads = _siglip_backward(grad, *ctx.saved_tensors, ctx.impl, d, ctx.ring, dy_dtype=dtypes[1])
        dx, dy, ds, db = grads
        if not ctx.ring:
            dy = _reduce_rows(dy.contiguous(), d).to(ctx.dtypes[1])
        return dx, dy, ds, db, None, None, None, None


class _ClipFn(torch.autograd.Function):
    """CLIP on a process group. y: this rank's texts; images and texts are all-gathered in here (or passed around
    the ring), and the gathered texts' gradients are summed over the ranks as in _SiglipFn."""

    @staticmethod
    def forward(ctx, x, y, scale, impl, d, ring):
        y_cols, x_all = (y, x) if ring else (_gather_rows(y, d), _gather_rows(x, d))
        with _no_autocast(x.device, x.dtype):
            loss, lse_row, lse_col_all = _clip_forward(x, y_cols, scale, x_all, impl, d, ring)
        ctx.save_for_backward(x, y_cols, scale, lse_row, lse_col_all)
        ctx.impl, ctx.d, ctx.ring, ctx.y_dtype = impl, d, ring, y.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        _first_order_only("clip_loss")
        y_cols = ctx.saved_tensors[1]
        dy_dtype = ctx.y_dtype if ctx.ring else _saved_grad_dtype(y_cols)
        with _no_autocast(grad.device, ctx.saved_tensors[0].dtype):
            dx, dy, ds = _clip_backward(grad, *ctx.saved_tensors, ctx.impl, ctx.d, ctx.ring, dy_dtype=dy_dtype)
        if not ctx.ring:
            dy = _reduce_rows(dy.contiguous(), ctx.d).to(ctx.y_dtype)
        return dx, dy, ds, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------


def _as_param(value, name: str, img: torch.Tensor) -> torch.Tensor:
    if isinstance(value, bool):  # an int to isinstance: logit_scale=True was a scale of 1
        raise TypeError(f"{name} must be a tensor or a number, got the bool {value!r}")
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), device=img.device, dtype=torch.float32)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (or a number), got {type(value).__name__}")
    if value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor with one element, got shape {tuple(value.shape)} "
                         f"dtype {value.dtype}")
    if value.device != img.device:
        raise ValueError(f"{name} must be on the features' device {img.device}, got {value.device}")
    return value


def _check_inputs(img, txt, params: dict, check_values, distributed: bool) -> dict:
    """The checked inputs' scalar parameters (numbers become tensors on img's device)."""
    for name, t in (("img", img), ("txt", txt)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (N, D), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if txt.shape != img.shape:
        raise ValueError(f"txt must have img's shape {tuple(img.shape)} (one text per image), got {tuple(txt.shape)}")
    if txt.dtype != img.dtype:
        raise TypeError(f"txt must have img's dtype {img.dtype}, got {txt.dtype}")
    if txt.device != img.device:
        raise ValueError(f"txt must be on img's device {img.device}, got {txt.device}")
    if img.shape[1] == 0:
        raise ValueError(f"img and txt need D >= 1 features, got shape {tuple(img.shape)}")
    if img.shape[0] == 0 and not distributed:
        raise ValueError("img and txt are empty (N = 0): a contrastive loss needs at least one pair")
    params = {name: _as_param(value, name, img) for name, value in params.items()}
    for name, value in params.items():
        if value_checks_enabled(value, check_values) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be finite, got {value.detach().reshape(-1).tolist()[0]}")
    return params


def _resolve_backend(backend: str, img: torch.Tensor) -> str:
    if backend == "auto":
        backend = env_backend("FINEVITI_LOSS_BACKEND", BACKENDS, "contrastive loss") or "auto"
    if backend == "auto":
        return "triton" if img.device.type == "cuda" and img.dtype in _KERNEL_DTYPES else "chunked"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if img.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"backend='triton' takes bf16, fp16 or fp32 features, got {img.dtype}")
        if img.device.type != "cuda" and not triton_interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {img.device}")
        refuse_interpreted_bf16("contrastive loss", img, "backend='chunked'")
    return backend


def _prepare(img, txt, params, backend, group, dist_impl, check_values, host_group=None):
    """(backend, the ranks' layout, the checked scalar parameters). On a process group, a rank whose inputs fail
    their checks raises after the first collective, and every other rank with it (_make_dist)."""
    group = _resolve_group(group)
    _check_host_group(host_group, group)
    failure = None
    try:
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")
        params = _check_inputs(img, txt, params, check_values, distributed=group is not None)
        backend = _resolve_backend(backend, img)
        if backend == "triton" and not torch.compiler.is_compiling():
            logits_mode()  # a bad FINEVITI_LOSS_LOGITS fails here, not in the gradient pass halfway through a step
    except Exception as exc:  # noqa: BLE001 (any failure here is raised on every rank, after the exchange)
        failure = exc
    d = _make_dist(group, img, failed=failure is not None, host_group=host_group)
    if failure is not None:
        try:
            raise failure
        finally:
            # the traceback holds this frame, whose locals hold the exception and the process group: a cycle that
            # kept the group, and gloo's threads, alive past destroy_process_group (until a garbage collection;
            # at exit, an abort)
            failure = None
    if d.total == 0:
        raise ValueError("img and txt are empty on every rank (global N = 0): a contrastive loss needs a pair")
    return backend, d, params


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                backend: str = "auto", group="default", dist_impl: str = "all_gather",
                check_values: bool | None = None, host_group=None) -> torch.Tensor:
    """SigLIP's sigmoid loss without the N x N logits.

    img, txt: (N, D) image and text features of one dtype (bf16, fp16 or fp32; fp64 on the torch paths), already
    normalised by the caller; row i of each is a positive pair. logit_scale (the multiplier, already exponentiated)
    and logit_bias: one-element tensors, learnable. Returns an fp32 scalar (fp64 for fp64 features, which the torch
    paths compute in fp64; the reference backend: the features' dtype) equal on one process to
    -sum_ij logsigmoid(label_ij * (scale * img_i . txt_j + bias)) / N, labels +1 for i == j and -1 otherwise;
    gradients flow to img, txt, logit_scale and logit_bias.

    group: "default" (the default: the world group when torch.distributed is initialised, else this process
    alone), a ProcessGroup, or None (this process's pairs only, also under torch.distributed). On a group, every
    rank must call the loss (its first collective exchanges the row counts, D, dtypes and whether each rank's
    inputs passed their checks: a bad input on one rank raises on all), every rank's texts are negatives for every
    rank's images, N may differ per rank, and this rank's loss is
    world_size / N_global * sum over its own images i, all texts j of the term above.
    So the mean of the ranks' losses is the global loss, and after DDP or FSDP average the gradients over the
    ranks every parameter's gradient is that of the single-process loss over the global batch (the features'
    gradients from other ranks' losses reach their owner through the all-gather's backward, a sum).
    dist_impl: "all_gather" gathers the texts (gradient: a reduce-scatter, in fp32 for fp16 features; every rank
    runs it, also when the texts need no gradient, so that ranks never disagree on the collectives);
    "ring" passes text blocks to the next rank with isend/irecv while the current block is computed, and in the
    backward passes them again together with their gradient accumulators, which end at their owners: no rank
    ever holds more than two text blocks. The reference backend always all-gathers.
    host_group: None, or a gloo group of the same processes (torch.distributed.new_group(backend="gloo"), as the
    trainer keeps): the first exchange then runs on the host. Without one, on an NCCL group, that exchange goes
    through the GPU and reading it back waits for every kernel queued before the loss (the forward); with one, the
    host queues the loss and the backward while the forward still runs. Ignored on one process.
    check_values: check that logit_scale and logit_bias are finite (always on CPU; on CUDA only when True or
    FINEVITI_CHECKS=1, since it synchronises).

    With grad mode on and any input requiring a gradient, the forward also computes the gradients (one pass over
    the logits gives both; the backward only scales them) and keeps them until the backward (except with
    dist_impl="ring", whose backward passes the text blocks again): a validation loss should run under
    torch.no_grad(). A backward with create_graph=True through this loss raises (no second-order terms).
    """
    backend, d, params = _prepare(img, txt, {"logit_scale": logit_scale, "logit_bias": logit_bias}, backend, group,
                                  dist_impl, check_values, host_group)
    logit_scale, logit_bias = params["logit_scale"], params["logit_bias"]
    if backend == "reference":
        if d.world == 1:
            return siglip_loss_ref(img, txt, logit_scale, logit_bias)
        txt_all = _AllGatherRows.apply(txt, d)
        logits = logit_scale.to(img.dtype) * (img @ txt_all.T) + logit_bias.to(img.dtype)
        labels = -torch.ones_like(logits)
        r, c = _positives(0, img.shape[0], d.row_start, d.total, img.device)
        labels[r, c] = 1
        return -F.logsigmoid(labels * logits).sum() * (d.world / d.total)
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (img, txt, logit_scale, logit_bias))
    if d.world == 1:
        return _siglip_fwd_op(img, txt, logit_scale, logit_bias, backend, with_grad)[0]
    return _SiglipFn.apply(img, txt, logit_scale, logit_bias, _backend_impl(backend), d, dist_impl == "ring",
                           with_grad)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, *, backend: str = "auto",
              group="default", dist_impl: str = "all_gather", check_values: bool | None = None,
              host_group=None) -> torch.Tensor:
    """CLIP's softmax loss without the N x N logits: the mean of the image-to-text and text-to-image
    cross-entropies of logit_scale * img @ txt.T with labels arange(N) (open_clip's ClipLoss).

    Shapes, dtypes, backend, group, dist_impl, check_values and host_group as in siglip_loss. Distributed, the
    labels of this rank's rows are offset by its position in the global batch, and this rank's loss is
    world_size / (2 N_global) * (sum over its images of their image-to-text cross-entropy against all texts +
    sum over its texts of their text-to-image cross-entropy against all images); the mean over ranks is the global
    loss. The gradient each rank returns is a different split of the global gradient (its images' rows of dL/dz
    for both directions); their sum over ranks, which DDP and FSDP average, is exact, so after averaging every
    parameter's gradient is that of the single-process loss over the global batch. "all_gather" gathers images and
    texts (texts with a gradient: its backward sums to the owner); "ring" passes (image, text) blocks in the
    forward and (text, gradient accumulator) blocks in the backward; the text log-sum-exps (N floats) are
    all-gathered in both.
    """
    backend, d, params = _prepare(img, txt, {"logit_scale": logit_scale}, backend, group, dist_impl, check_values,
                                  host_group)
    logit_scale = params["logit_scale"]
    if backend == "reference":
        if d.world == 1:
            return clip_loss_ref(img, txt, logit_scale)
        img_all, txt_all = _AllGatherRows.apply(img, d), _AllGatherRows.apply(txt, d)
        scale = logit_scale.to(img.dtype)
        labels = torch.arange(img.shape[0], device=img.device) + d.row_start
        i2t = F.cross_entropy(scale * (img @ txt_all.T), labels, reduction="sum")
        t2i = F.cross_entropy(scale * (txt @ img_all.T), labels, reduction="sum")
        return (i2t + t2i) * (d.world / (2 * d.total))
    if d.world == 1:
        return _clip_fwd_op(img, txt, logit_scale, backend)[0]
    return _ClipFn.apply(img, txt, logit_scale, _backend_impl(backend), d, dist_impl == "ring")

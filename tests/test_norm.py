"""rms_norm: the Triton kernels (under the interpreter on a CPU) and the torch path against an fp64 reference,
forward and both gradients; awkward shapes, strided and NaN-padded inputs, bad inputs, dispatch, compile."""

import pytest
import torch

from fineviti.kernels import rmsnorm as kernels
from fineviti.model.layers import RMSNorm, set_norm_backend
from fineviti.ops import _fused, norm, rms_norm, rms_norm_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _grads(fn, x, weight, dy):
    x = x.detach().requires_grad_()  # detach, not clone: a strided view stays strided
    weight = weight.detach().requires_grad_()
    y = fn(x, weight)
    dx, dw = torch.autograd.grad(y, (x, weight), dy)
    return y, dx, dw


def check_against_reference(shape, dtype, backend="triton", eps=1e-6, x=None, weight=None, dy=None, atol=None,
                            sync_free=False):
    """Ours and the same-dtype reference against fp64: err <= 2 * err(reference in dtype) + atol, for y, dx, dw.
    x, weight, dy: given (strided ones too) or random. sync_free: ours runs under
    torch.cuda.set_sync_debug_mode("error") (no launch may wait for the device)."""
    width = shape[-1]
    x = x if x is not None else torch.randn(shape, device=DEVICE, dtype=torch.float32).to(dtype)
    weight = weight if weight is not None else 1 + 0.5 * torch.randn(width, device=DEVICE)
    dy = dy if dy is not None else torch.randn(x.shape, device=DEVICE, dtype=torch.float32).to(dtype)
    if sync_free:
        torch.cuda.set_sync_debug_mode("error")
    try:
        ours = _grads(lambda a, w: rms_norm(a, w, eps, backend=backend), x, weight, dy)
    finally:
        if sync_free:
            torch.cuda.set_sync_debug_mode(0)
    same = _grads(lambda a, w: rms_norm_ref(a, w, eps), x, weight, dy)
    exact = _grads(lambda a, w: rms_norm_ref(a, w, eps), x.double(), weight.double(), dy.double())
    atol = atol if atol is not None else (1e-5 if dtype == torch.float32 else 2e-3)
    for name, a, s, e in zip(("y", "dx", "dweight"), ours, same, exact, strict=True):
        assert a.dtype == s.dtype and a.shape == s.shape, name
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = (a.double() - e).abs().max().item() if a.numel() else 0.0
        budget = (2 * (s.double() - e).abs().max().item() if s.numel() else 0.0) + atol * max(1.0, e.abs().max()
                                                                                               .item() if e.numel()
                                                                                               else 1.0)
        assert err <= budget, f"{name}: max error {err:.3e} > budget {budget:.3e} (shape {shape}, {dtype})"
    return ours


CASES = [
    ((7, 768), torch.float32),
    ((3, 5, 80), torch.float16),  # 3-D, width not a power of two
    ((300, 64), torch.float32),  # 19 row blocks of 16: each of the backward's 8 programs loops over several
    ((1, 1), torch.float32),  # one feature
    ((9, 1000), torch.float16),
    ((2, 4096), torch.float32),
]


@pytest.mark.parametrize("shape,dtype", CASES)
def test_triton_matches_reference(shape, dtype):
    check_against_reference(shape, dtype)


@pytest.mark.parametrize("shape,dtype", [CASES[0], CASES[1]])
def test_torch_backend_is_the_reference(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    weight = torch.randn(shape[-1])
    assert torch.equal(rms_norm(x, weight, backend="torch"), rms_norm_ref(x, weight))
    check_against_reference(shape, dtype, backend="torch")


def test_empty_rows():
    x = torch.empty(0, 64, requires_grad=True)
    weight = torch.ones(64, requires_grad=True)
    y = rms_norm(x, weight, backend="triton")
    assert y.shape == (0, 64)
    dx, dw = torch.autograd.grad(y.sum(), (x, weight), allow_unused=True)
    assert dx.shape == (0, 64) and torch.equal(dw, torch.zeros(64))


def test_strided_rows_read_only_their_features(monkeypatch):
    """x a column slice of a NaN-filled buffer (row stride 90 > width 80) reaches the kernel as it is: any read
    past the width would bring NaN."""
    base = torch.full((33, 90), float("nan"))
    base[:, :80] = torch.randn(33, 80)
    x = base[:, :80]
    strides = []
    forward = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda x2d, *args: strides.append(x2d.stride()) or forward(x2d, *args))
    check_against_reference((33, 80), torch.float32, x=x)
    assert strides == [(90, 1)]


def test_strided_weight_x_and_upstream_gradient():
    """A weight with stride 2, x with a non-unit last stride and a transposed dy: copied where the kernels need
    it, the same results as contiguous inputs (a strided weight read as contiguous was wrong by 7 in y)."""
    weight = (1 + 0.5 * torch.randn(128))[::2]
    x = torch.randn(64, 9).t()  # (9, 64), strides (1, 9)
    dy = torch.randn(64, 9).t()
    assert weight.stride() == (2,) and x.stride(-1) != 1 and dy.stride(-1) != 1
    check_against_reference((9, 64), torch.float32, x=x, weight=weight, dy=dy)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_double_backward_matches_reference(weight_grad):
    """create_graph=True through the triton norm (a gradient penalty): the second-order gradients are those of the
    reference expression (the kernel's backward has no graph; it raised "no autograd formula" before)."""
    x0, w0 = torch.randn(6, 40, device=DEVICE), torch.randn(40, device=DEVICE)
    results = []
    for backend in ("triton", "torch"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_(weight_grad)
        y = rms_norm(x, w, backend=backend)
        wanted = (x, w) if weight_grad else (x,)
        grads = torch.autograd.grad((y * y.detach().cos()).sum(), wanted, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        results.append(torch.autograd.grad(penalty, wanted))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: the fake implementations agree with the real ops (shapes, dtypes, strides), and the
    ops are registered as torch.compile and AOT autograd need."""
    for x in (torch.randn(5, 48), torch.randn(48, 5).t()):  # contiguous, and a transposed x the op copies
        weight = torch.randn(48)
        y, rstd = torch.ops.fineviti.rms_norm_triton(x, weight, 1e-6)
        torch.library.opcheck(torch.ops.fineviti.rms_norm_triton, (x, weight, 1e-6))
        torch.library.opcheck(torch.ops.fineviti.rms_norm_triton_bwd, (torch.randn_like(y), x, weight, rstd))


def test_zero_rows_and_eps():
    """A row of zeros: y = 0 and finite gradients (rstd = 1/sqrt(eps)), as the reference."""
    x = torch.randn(4, 32)
    x[2] = 0
    check_against_reference((4, 32), torch.float32, x=x, eps=1e-5)


def test_weight_gradient_in_its_dtype_and_x_dtype_kept():
    x = torch.randn(5, 64, dtype=torch.float16, requires_grad=True)
    weight = torch.randn(64, dtype=torch.float16, requires_grad=True)
    y = rms_norm(x, weight, backend="triton")
    assert y.dtype == torch.float16
    dx, dw = torch.autograd.grad(y.float().sum(), (x, weight))
    assert dx.dtype == torch.float16 and dw.dtype == torch.float16


@pytest.mark.parametrize("bad,match", [
    (dict(weight=torch.ones(63)), r"weight must have shape \(64,\)"),
    (dict(weight=torch.ones(64, 1)), r"weight must have shape \(64,\)"),
    (dict(x=torch.ones(3, 64, dtype=torch.int32)), "x must be a floating-point tensor, got torch.int32"),
    (dict(weight=torch.ones(64, dtype=torch.int64)), "weight must be a floating-point tensor"),
    (dict(eps=-1e-6), r"eps must be a finite number >= 0, got -1e-06"),
    (dict(eps=float("nan")), "eps must be a finite number >= 0, got nan"),
    (dict(eps=float("inf")), "eps must be a finite number >= 0, got inf"),
    (dict(eps=True), "eps must be a finite number >= 0, got True"),
    (dict(backend="cuda"), r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"),
    (dict(x=torch.ones(3, 0), weight=torch.ones(0)), "last dim of at least 1 feature"),
])
def test_bad_inputs_name_the_argument(bad, match):
    args = dict(x=torch.ones(3, 64), weight=torch.ones(64), eps=1e-6, backend="auto")
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        rms_norm(args["x"], args["weight"], args["eps"], backend=args["backend"])


def test_triton_limits_are_errors_and_auto_falls_back(monkeypatch):
    wide = torch.ones(2, kernels.MAX_WIDTH + 1)
    with pytest.raises(ValueError, match=f"takes rows of up to {kernels.MAX_WIDTH} features, got x.shape\\[-1\\]="
                                         f"{kernels.MAX_WIDTH + 1}"):
        rms_norm(wide, torch.ones(wide.shape[-1]), backend="triton")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 x, got x.dtype=torch.float64"):
        rms_norm(torch.ones(2, 8, dtype=torch.float64), torch.ones(8), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA x .* got x.device=cpu"):
        rms_norm(torch.ones(2, 8), torch.ones(8), backend="triton")


def test_auto_rule_and_environment(monkeypatch):
    monkeypatch.delenv("FINEVITI_NORM_BACKEND", raising=False)
    x = torch.ones(2, 8)
    assert norm.resolve_backend("auto", x) == "torch"  # a CPU tensor
    monkeypatch.setenv("FINEVITI_NORM_BACKEND", "triton")
    assert norm.resolve_backend("auto", x) == "triton"
    assert norm.resolve_backend("auto", x.double()) == "torch"  # what the kernel does not take: the reference
    assert norm.resolve_backend("torch", x) == "torch"  # an explicit backend wins over the environment
    assert _fused.auto_backend("cuda", compiling=False) == "triton"
    assert _fused.auto_backend("cuda", compiling=True) == "torch"  # the plain expression, which Inductor fuses
    assert _fused.auto_backend("cpu", compiling=False) == "torch"
    monkeypatch.setenv("FINEVITI_NORM_BACKEND", "fast")
    with pytest.raises(ValueError, match="FINEVITI_NORM_BACKEND='fast' is not a rms_norm backend"):
        norm.resolve_backend("auto", x)


def test_custom_ops_trace_without_graph_breaks():
    """torch.compile(fullgraph=True) through the custom ops and their fake implementations (aot_eager: the
    interpreter runs the kernels when the compiled graph calls them)."""
    x = torch.randn(6, 48, requires_grad=True)
    weight = torch.randn(48, requires_grad=True)

    def f(x, weight):
        return rms_norm(x, weight, backend="triton") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(x, weight)
    dx, dw = torch.autograd.grad(y.sum(), (x, weight))
    y_ref = f(x, weight)
    dx_ref, dw_ref = torch.autograd.grad(y_ref.sum(), (x, weight))
    for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(a, b)


def test_module_follows_its_backend(monkeypatch):
    """The towers' RMSNorm: the torch path is the reference expression; set_norm_backend switches every norm of
    a model, and the triton path computes the same function."""
    calls = []
    real = norm.rms_norm

    def spy(x, weight, eps=1e-6, *, backend="auto"):
        calls.append(backend)
        return real(x, weight, eps, backend=backend)

    monkeypatch.setattr(norm, "rms_norm", spy)
    model = torch.nn.Sequential(RMSNorm(32), torch.nn.Linear(32, 32), RMSNorm(32))
    assert set_norm_backend(model, "triton") == 2
    x = torch.randn(5, 32)
    out_triton = model(x)
    set_norm_backend(model, "torch")
    out_torch = model(x)
    assert calls == ["triton", "triton", "torch", "torch"]
    torch.testing.assert_close(out_triton, out_torch, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        set_norm_backend(model, "fast")


def test_registry_declares_both_kernels():
    from fineviti.kernels import registry

    names = {row.kernel_name for row in registry.shipped()}
    assert {"rmsnorm_fwd_kernel", "rmsnorm_bwd_kernel"} <= names


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [768, 1152, 4096])
def test_gpu_matches_reference(dtype, width):
    check_against_reference((4099, width), dtype, sync_free=True)

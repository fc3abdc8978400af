"""swiglu: the Triton kernels (under the interpreter on a CPU) and the torch path against an fp64 reference,
forward and gradient; awkward shapes, strided and NaN-padded inputs, bad inputs, dispatch, compile."""

import pytest
import torch

from fineviti.kernels import swiglu as kernels
from fineviti.model.layers import SwiGLU, set_swiglu_backend
from fineviti.ops import glu as swiglu_mod
from fineviti.ops import swiglu, swiglu_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def run(fn, gate_up, dh):
    leaf = gate_up.detach().requires_grad_()  # detach, not clone: a strided view stays strided
    h = fn(leaf)
    (dgu,) = torch.autograd.grad(h, leaf, dh)
    return h, dgu


def compare(gate_up, dh=None, backend="triton", atol=None, sync_free=False):
    """Ours and the same-dtype reference against fp64: err <= 2 * err(reference in dtype) + atol * scale."""
    dtype = gate_up.dtype
    dh = dh if dh is not None else torch.randn(*gate_up.shape[:-1], gate_up.shape[-1] // 2, device=gate_up.device,
                                               dtype=torch.float32).to(dtype)
    if sync_free:
        torch.cuda.set_sync_debug_mode("error")
    try:
        ours = run(lambda t: swiglu(t, backend=backend), gate_up, dh)
    finally:
        if sync_free:
            torch.cuda.set_sync_debug_mode(0)
    same = run(swiglu_ref, gate_up, dh)
    exact = run(swiglu_ref, gate_up.double(), dh.double())
    atol = atol if atol is not None else (1e-6 if dtype == torch.float32 else 2e-3)
    for name, a, s, e in zip(("h", "d gate_up"), ours, same, exact, strict=True):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        if not a.numel():
            continue
        err = (a.double() - e).abs().max().item()
        budget = 2 * (s.double() - e).abs().max().item() + atol * max(1.0, e.abs().max().item())
        assert err <= budget, f"{name}: max error {err:.3e} > budget {budget:.3e} ({tuple(gate_up.shape)}, {dtype})"
    return ours


CASES = [
    ((7, 768), torch.float32),
    ((3, 5, 160), torch.float16),  # 3-D, hidden 80
    ((300, 128), torch.float32),  # many row blocks
    ((1, 2), torch.float32),  # hidden 1
    ((9, 2000), torch.float16),  # hidden 1000
    ((4, 4200), torch.float32),  # hidden 2100: three column blocks of 1024
]


@pytest.mark.parametrize("shape,dtype", CASES)
def test_triton_matches_reference(shape, dtype):
    compare(4 * torch.randn(shape, device=DEVICE).to(dtype))  # gates from -12 to 12: both tails of the sigmoid


def test_torch_backend_is_the_reference():
    gate_up = torch.randn(6, 64)
    assert torch.equal(swiglu(gate_up, backend="torch"), swiglu_ref(gate_up))
    compare(gate_up, backend="torch")


def test_strided_input_and_upstream_gradient(monkeypatch):
    """[gate | up] a column slice of a NaN-filled buffer (row stride 150 > 128) reaches the kernels as it is (any
    read past the row would bring NaN), and a transposed dh is copied for them."""
    base = torch.full((33, 150), float("nan"))
    base[:, :128] = torch.randn(33, 128)
    gate_up = base[:, :128]
    strides = []
    forward = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda t: strides.append(t.stride()) or forward(t))
    dh = torch.randn(64, 33).t()
    assert dh.stride(-1) != 1
    compare(gate_up, dh=dh)
    assert strides == [(150, 1)]


def test_double_backward_matches_reference():
    """create_graph=True through the triton gate: the second-order gradients are those of the reference expression
    (the kernel's backward has no graph; it raised "no autograd formula" before)."""
    x0 = torch.randn(5, 48, device=DEVICE)
    results = []
    for backend in ("triton", "torch"):
        x = x0.clone().requires_grad_()
        h = swiglu(x, backend=backend)
        (g,) = torch.autograd.grad((h * h.detach().sin()).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(g.pow(2).sum(), x)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 64), (0, 5, 64), (2, 0, 64), (64,)])
def test_empty_and_unbatched_shapes(shape):
    gate_up = torch.randn(shape, requires_grad=True)
    h = swiglu(gate_up, backend="triton")
    assert h.shape == (*shape[:-1], 32)
    (dgu,) = torch.autograd.grad(h, gate_up, torch.ones_like(h))
    assert dgu.shape == gate_up.shape
    torch.testing.assert_close(h, swiglu_ref(gate_up))


@pytest.mark.parametrize("bad,error,match", [
    (torch.ones(3, 7), ValueError, r"last dim must be 2 \* hidden with hidden >= 1 \(\[gate \| up\]\), got shape "
                                   r"\(3, 7\)"),
    (torch.ones(3, 0), ValueError, r"got shape \(3, 0\)"),
    (torch.ones(3, 8, dtype=torch.int64), TypeError, "gate_up must be a floating-point tensor, got torch.int64"),
    ([1.0, 2.0], TypeError, "gate_up must be a tensor, got list"),
])
def test_bad_inputs_name_the_argument(bad, error, match):
    with pytest.raises(error, match=match):
        swiglu(bad)


def test_backend_rule(monkeypatch):
    monkeypatch.delenv("FINEVITI_SWIGLU_BACKEND", raising=False)
    x = torch.ones(2, 8)
    assert swiglu_mod.resolve_backend("auto", x) == "torch"  # a CPU tensor
    monkeypatch.setenv("FINEVITI_SWIGLU_BACKEND", "triton")
    assert swiglu_mod.resolve_backend("auto", x) == "triton"
    assert swiglu_mod.resolve_backend("auto", x.double()) == "torch"  # what the kernels do not take
    with pytest.raises(ValueError, match=r"swiglu: backend must be one of \('auto', 'triton', 'torch'\), got 'x'"):
        swiglu(x, backend="x")
    with pytest.raises(TypeError, match="backend='triton' takes a float32, float16 or bfloat16 gate_up, got "
                                        "gate_up.dtype=torch.float64"):
        swiglu(x.double(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="swiglu: backend='triton' needs a CUDA gate_up .* got gate_up.device=cpu"):
        swiglu(x, backend="triton")
    with pytest.raises(ValueError, match="swiglu backend must be one of"):
        SwiGLU(8, 8, backend="cuda")


def test_custom_ops_pass_opcheck_and_trace():
    """opcheck (the fake implementations agree with the real ops), and torch.compile(fullgraph=True) through them
    (aot_eager: the interpreter runs the kernels when the compiled graph calls them)."""
    gate_up = torch.randn(5, 96)
    h = torch.ops.fineviti.swiglu_triton(gate_up)
    torch.library.opcheck(torch.ops.fineviti.swiglu_triton, (gate_up,))
    torch.library.opcheck(torch.ops.fineviti.swiglu_triton_bwd, (torch.randn_like(h), gate_up))
    leaf = gate_up.clone().requires_grad_()
    compiled = torch.compile(lambda t: swiglu(t, backend="triton") * 3, fullgraph=True, backend="aot_eager")
    out = compiled(leaf)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    ref_leaf = gate_up.clone().requires_grad_()
    ref = swiglu_ref(ref_leaf) * 3
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_leaf)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_module_follows_its_backend():
    model = torch.nn.Sequential(SwiGLU(32, 48), torch.nn.ReLU(), SwiGLU(32, 16))
    x = torch.randn(7, 32)
    results = []
    for backend in ("triton", "torch"):
        assert set_swiglu_backend(model, backend) == 2
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results.append([out] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-5)
    with pytest.raises(ValueError, match="swiglu backend must be one of"):
        set_swiglu_backend(model, "fast")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [2048, 2816])
def test_gpu_matches_reference(dtype, hidden):
    compare(4 * torch.randn(4099, 2 * hidden, device="cuda").to(dtype), sync_free=True)

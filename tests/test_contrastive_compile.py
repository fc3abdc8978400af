"""SigLIP and CLIP losses under torch.compile: on one process both backends go through the torch.library custom ops
fineviti::{siglip,clip}_loss_{fwd,bwd}, so fullgraph=True traces them without a break, and the compiled loss and
gradients equal the eager ones. torch.library.opcheck checks the ops' schemas, fake implementations and autograd.

aot_eager (not inductor) on the CPU: it traces with the fake implementations and then runs the ops eagerly, so the
triton backend runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a GPU).
The value checks of logit_scale / logit_bias read the tensors on the host (the default on CPU tensors), which
cannot be traced: while torch.compile traces, the default skips them (fineviti._checks.value_checks_enabled), so
these calls leave check_values at its default.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from fineviti.ops import clip_loss, siglip_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["chunked", "triton"]


def make_inputs(n, d, dtype=torch.float32, param_shape=(), param_dtype=torch.float32):
    img = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(n, d, dtype=torch.float64), dim=-1)
    scale = torch.full(param_shape, 10.0 + torch.rand(()).item(), dtype=param_dtype)
    bias = torch.full(param_shape, -5.0 + torch.rand(()).item(), dtype=param_dtype)
    return [t.to(DEVICE, dtype if t.dim() == 2 else param_dtype).requires_grad_() for t in (img, txt, scale, bias)]


def loss_and_grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward()
    return [out.detach()] + [t.grad for t in leaves]


def loss_fn(loss, backend):
    if loss == "siglip":
        return lambda img, txt, scale, bias: siglip_loss(img, txt, scale, bias, backend=backend)
    # bias unused: its gradient stays None in both runs
    return lambda img, txt, scale, bias: clip_loss(img, txt, scale, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["siglip", "clip"])
@pytest.mark.parametrize("dtype,param_shape,param_dtype", [(torch.float32, (), torch.float32),
                                                           (torch.float16, (1,), torch.float64)],
                         ids=["fp32", "fp16-params1-fp64"])
def test_compiled_matches_eager(loss, backend, dtype, param_shape, param_dtype):
    fn = loss_fn(loss, backend)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for n in (7, 13):  # the second N recompiles with a dynamic N: the fake implementations see a symbolic size
        inputs = make_inputs(n, 32, dtype, param_shape, param_dtype)
        want = loss_and_grads(fn, inputs)
        got = loss_and_grads(compiled, inputs)
        for name, g, w in zip(("loss", "d_img", "d_txt", "d_scale", "d_bias"), got, want, strict=True):
            if w is None:
                assert g is None, f"{name}: eager gives no gradient, compiled does"
                continue
            assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype} {tuple(g.shape)} != eager's"
            # exact: the compiled graph runs the same op implementations (deterministic kernels) as eager
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m, name=name: f"{loss} {backend} {name}: {m}")
    op = getattr(torch.ops.fineviti, f"{loss}_loss_fwd").default
    called = {node.target for gm in counter.graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert op in called, f"the traced graph does not call {op}"


def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_siglip(backend):
    img, txt, scale, bias = make_inputs(7, 32)
    for with_grad in (False, True):
        _opcheck(torch.ops.fineviti.siglip_loss_fwd.default, (img, txt, scale, bias, backend, with_grad))
    grad = torch.rand((), device=DEVICE) + 0.5
    _opcheck(torch.ops.fineviti.siglip_loss_bwd.default,
             (grad, *(t.detach() for t in (img, txt, scale, bias)), backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_clip(backend):
    img, txt, scale, _ = make_inputs(7, 32)
    _opcheck(torch.ops.fineviti.clip_loss_fwd.default, (img, txt, scale, backend))
    img, txt, scale = img.detach(), txt.detach(), scale.detach()
    _, lse_row, lse_col = torch.ops.fineviti.clip_loss_fwd(img, txt, scale, backend)
    grad = torch.rand((), device=DEVICE) + 0.5
    _opcheck(torch.ops.fineviti.clip_loss_bwd.default, (grad, img, txt, scale, lse_row, lse_col, backend))


def test_ops_reject_an_unknown_backend():
    img, txt, scale, bias = [t.detach() for t in make_inputs(3, 8)]
    with pytest.raises(ValueError, match="backend must be 'triton' or 'chunked' here, got 'reference'"):
        torch.ops.fineviti.siglip_loss_fwd(img, txt, scale, bias, "reference")

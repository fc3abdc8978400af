"""build_positions: the C++ CPU op (and the CUDA op on a GPU) against the Python reference."""

import pytest
import torch

from fineviti.data.positions import build_positions, build_positions_ref


def random_grids(n: int, merge: int, max_groups: int = 9) -> torch.Tensor:
    sides = torch.randint(1, max_groups + 1, (n, 2)) * merge
    return sides.to(torch.int32)


def test_reference_matches_hand_written_order():
    # One 2 x 4 image with merge 2: group (0, 0) then group (0, 1), each row-major; then a 1 x 2 image.
    cu, pos = build_positions_ref(torch.tensor([[2, 4], [1, 2]], dtype=torch.int32), merge=1)
    assert cu.tolist() == [0, 8, 10]
    assert pos.tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [1, 3], [0, 0], [0, 1]]
    cu, pos = build_positions_ref(torch.tensor([[2, 4]], dtype=torch.int32), merge=2)
    assert cu.tolist() == [0, 8]
    assert pos.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]


@pytest.mark.parametrize("merge", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_cpu_op_matches_reference(n, merge):
    grid = random_grids(n, merge)
    cu, pos = build_positions(grid, merge)
    cu_ref, pos_ref = build_positions_ref(grid, merge)
    assert cu.dtype == pos.dtype == torch.int32
    assert cu.shape == (n + 1,) and pos.shape == (int(cu_ref[-1]), 2)
    torch.testing.assert_close(cu, cu_ref, rtol=0, atol=0)
    torch.testing.assert_close(pos, pos_ref, rtol=0, atol=0)
    # Every image covers its grid exactly once, and each merge group is contiguous.
    for i, (rows, cols) in enumerate(grid.tolist()):
        image = pos[cu[i] : cu[i + 1]].long()
        assert sorted((image[:, 0] * cols + image[:, 1]).tolist()) == list(range(rows * cols))
        groups = (image[:, 0] // merge) * (cols // merge) + image[:, 1] // merge
        assert torch.equal(groups, torch.arange(rows * cols // merge**2).repeat_interleave(merge * merge))


def test_cpu_op_edge_cases():
    cu, pos = build_positions(torch.empty(0, 2, dtype=torch.int32), 2)
    assert cu.tolist() == [0] and pos.shape == (0, 2)
    grid = torch.tensor([[4, 1], [1, 1], [1, 5]], dtype=torch.int32)  # single rows and columns
    for got, want in zip(build_positions(grid), build_positions_ref(grid), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    strided = torch.tensor([[6, 4, 99], [2, 8, 99]], dtype=torch.int32)[:, :2]  # not contiguous
    for got, want in zip(build_positions(strided, 2), build_positions_ref(strided.contiguous(), 2), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


BAD_INPUTS = [
    (torch.tensor([[2, 2], [0, 4]], dtype=torch.int32), 1, ValueError, r"grid_hw\[1\] = \(0, 4\).*non-positive"),
    (torch.tensor([[-2, 2]], dtype=torch.int32), 1, ValueError, r"grid_hw\[0\] = \(-2, 2\).*non-positive"),
    (torch.tensor([[4, 4], [2, 2], [4, 6]], dtype=torch.int32), 4, ValueError, r"grid_hw\[1\] = \(2, 2\).*merge = 4"),
    (torch.tensor([[2, 2]], dtype=torch.int64), 1, TypeError, r"int32.*(Long|int64)"),
    (torch.tensor([[2, 2, 2]], dtype=torch.int32), 1, ValueError, r"shape \(n, 2\).*\[1, 3\]"),
    (torch.tensor([2, 2], dtype=torch.int32), 1, ValueError, r"shape \(n, 2\).*\[2\]"),
    (torch.tensor([[2, 2]], dtype=torch.int32), 0, ValueError, r"merge must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("grid, merge, error, message", BAD_INPUTS)
def test_bad_inputs_are_named(grid, merge, error, message):
    with pytest.raises(error, match=message):
        build_positions_ref(grid, merge)
    with pytest.raises(error, match=message):
        build_positions(grid, merge)
    # The op itself checks too (the wrapper's Python checks are not what callers of torch.ops rely on).
    with pytest.raises(error, match=message):
        torch.ops.fineviti.build_positions(grid, merge)


def test_int32_overflow_is_refused():
    grid = torch.tensor([[46341, 46341]], dtype=torch.int32)  # 46341**2 > 2**31 - 1
    with pytest.raises(ValueError, match=r"grid_hw\[0\].*does not fit in int32"):
        torch.ops.fineviti.build_positions(grid, 1)
    # the reference built every piece first: 65536 x 65536 asked for 32 GB before its check
    with pytest.raises(ValueError, match=r"total token count 4294967296 does not fit in int32"):
        build_positions_ref(torch.tensor([[65536, 65536]], dtype=torch.int32), 1)


def test_op_registration_for_compile():
    # Schema, fake (meta) implementation with a data-dependent size, and autograd registration.
    grid = torch.tensor([[2, 4], [4, 6]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fineviti.build_positions.default, (grid, 2))


def test_the_op_compiles_right_after_import_fineviti():
    """The fake was registered by fineviti.data.positions only: torch.ops.fineviti.build_positions after a plain
    `import fineviti` failed under torch.compile ("does not support running with fake tensors"), and the fake
    took an int64 grid (int64 outputs) that the real op refuses. (A fresh process: this one imported the module.)"""
    import subprocess
    import sys

    code = """
import torch, fineviti
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
f = torch.compile(lambda g: [t.sum() for t in torch.ops.fineviti.build_positions(g, 1)], fullgraph=True,
                  backend="aot_eager", dynamic=True)
print([int(t) for t in f(torch.tensor([[2, 3], [1, 4]], dtype=torch.int32))])
with FakeTensorMode(shape_env=ShapeEnv()):
    try:
        torch.ops.fineviti.build_positions(torch.empty(2, 2, dtype=torch.int64), 1)
    except TypeError as exc:
        print("refused:", exc)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[16, 15]" in done.stdout and "refused: grid_hw must be an int32" in done.stdout, done.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("merge", [1, 2])
def test_cuda_op_matches_reference(merge):
    assert torch.ops.fineviti.cuda_built(), "fineviti._C was built without its CUDA sources"
    grid = random_grids(37, merge, max_groups=40)
    cu, pos = build_positions(grid.cuda(), merge)
    cu_ref, pos_ref = build_positions_ref(grid, merge)
    assert cu.is_cuda and pos.is_cuda
    torch.testing.assert_close(cu.cpu(), cu_ref, rtol=0, atol=0)
    torch.testing.assert_close(pos.cpu(), pos_ref, rtol=0, atol=0)
    cu, pos = build_positions(torch.empty(0, 2, dtype=torch.int32, device="cuda"), merge)
    assert cu.tolist() == [0] and pos.shape == (0, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("grid, merge, error, message", BAD_INPUTS)
def test_cuda_bad_inputs_are_named(grid, merge, error, message):
    with pytest.raises(error, match=message):
        torch.ops.fineviti.build_positions(grid.cuda(), merge)

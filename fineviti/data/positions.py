"""Packed patch positions: cu_seqlens and the (row, col) of every patch of a batch of image grids.

Token order is Qwen2-VL's vision tower: images one after another; within an image the tokens of each
merge x merge group are contiguous, groups in row-major order, and row-major inside a group. With
merge 1 this is plain row-major. The op is `torch.ops.fineviti.build_positions` (csrc/positions.*);
on CUDA it reads the grid (n * 8 bytes) to the host once, since the output length is a sum of its values.
"""

from __future__ import annotations

import torch

from fineviti import _ext


def _check_args(grid_hw: torch.Tensor, merge: int) -> None:
    if isinstance(merge, bool) or not isinstance(merge, int) or merge < 1:
        raise ValueError(f"build_positions: merge must be an integer >= 1, got {merge!r}")
    if not isinstance(grid_hw, torch.Tensor) or grid_hw.dtype != torch.int32:
        got = grid_hw.dtype if isinstance(grid_hw, torch.Tensor) else type(grid_hw).__name__
        raise TypeError(f"build_positions: grid_hw must be an int32 tensor, got {got}")
    if grid_hw.dim() != 2 or grid_hw.shape[1] != 2:
        raise ValueError(
            "build_positions: grid_hw must have shape (n, 2) holding each image's (rows, cols), "
            f"got shape {list(grid_hw.shape)}"
        )


def build_positions_ref(grid_hw: torch.Tensor, merge: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of `build_positions` (Qwen2-VL's `rot_pos_emb` index construction)."""
    _check_args(grid_hw, merge)
    grid = grid_hw.tolist()
    total = sum(rows * cols for rows, cols in grid if rows > 0 and cols > 0)
    if total > torch.iinfo(torch.int32).max:  # before any piece is built (a 65536 x 65536 grid asked for 32 GB)
        raise ValueError(f"build_positions: the total token count {total} does not fit in int32")
    lengths, pieces = [], []
    for i, (rows, cols) in enumerate(grid):
        if rows <= 0 or cols <= 0:
            raise ValueError(
                f"build_positions: grid_hw[{i}] = ({rows}, {cols}) has a non-positive side; "
                "expected rows >= 1 and cols >= 1"
            )
        if rows % merge or cols % merge:
            raise ValueError(
                f"build_positions: grid_hw[{i}] = ({rows}, {cols}) is not divisible by merge = {merge}; "
                "expected both sides to be multiples of it"
            )
        shape = (rows // merge, merge, cols // merge, merge)
        row = torch.arange(rows).view(-1, 1).expand(rows, cols).reshape(shape).permute(0, 2, 1, 3)
        col = torch.arange(cols).view(1, -1).expand(rows, cols).reshape(shape).permute(0, 2, 1, 3)
        pieces.append(torch.stack([row.flatten(), col.flatten()], dim=1))
        lengths.append(rows * cols)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu_seqlens[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    pos = torch.cat(pieces) if pieces else torch.empty(0, 2, dtype=torch.int64)
    device = grid_hw.device
    return cu_seqlens.to(device=device, dtype=torch.int32), pos.to(device=device, dtype=torch.int32)


def build_positions(grid_hw: torch.Tensor, merge: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens and (row, col) positions of a packed batch of patch grids.

    grid_hw: int32 (n, 2), each image's patch grid (rows, cols); both sides multiples of `merge`.
    Returns (cu_seqlens int32 (n + 1,), starting at 0; pos int32 (total, 2)), on grid_hw's device.
    """
    _check_args(grid_hw, merge)
    _ext.load(required=True)
    return torch.ops.fineviti.build_positions(grid_hw, merge)

# (its fake implementation, for torch.compile and meta tensors, is registered when the extension loads: _ext)

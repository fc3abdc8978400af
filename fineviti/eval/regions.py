"""Region-level classification (FG-CLIP's box-classification protocol) on the vision tower's patch tokens.

A box's feature is pooled from the patch tokens of its image, then passed through a caller-given projection
into the joint embedding and classified against text prompts of the category names (see `zeroshot`). FG-CLIP
(lazymieie/FG-CLIP `fgclip2/eval/coco_box_ddp.py`) pools with RoIAlign over the dense feature map and scores
COCO val2017 boxes against the 80 category names; top-1 and top-5 over all boxes.

Two poolings, both written as a weight matrix over the image's tokens (so packed order never matters; tokens
are placed on the grid by `pos`, never assumed row-major):
- "mean" (default): the mean of the tokens whose cells the box covers, each weighted by the fraction of its
  cell inside the box; for a box on cell boundaries this is the plain masked mean.
- "roi_align": torchvision's `roi_align(aligned=True)` averaged over its output bins, computed here in torch
  (bilinear samples on the cell-centre grid), so it runs without torchvision; tests compare the two where
  torchvision is installed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fineviti.eval.metrics import classification_accuracy


def _check(tokens, cu_seqlens, grid_hw, pos, boxes, box_image, patch_size, merge):
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a (total, width) tensor, got {getattr(tokens, 'shape', type(tokens))}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape (n_images + 1,), got {tuple(cu_seqlens.shape)}")
    n_images = cu_seqlens.numel() - 1
    if grid_hw.shape != (n_images, 2):
        raise ValueError(f"grid_hw must have shape ({n_images}, 2) to match cu_seqlens, got {tuple(grid_hw.shape)}")
    total = int(cu_seqlens[-1])
    if pos.shape != (total, 2):
        raise ValueError(f"pos must have shape ({total}, 2) (one (row, col) per patch), got {tuple(pos.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n_boxes, 4) holding x0, y0, x1, y1, got {tuple(boxes.shape)}")
    if box_image.shape != (boxes.shape[0],):
        raise ValueError(f"box_image must have shape ({boxes.shape[0]},), got {tuple(box_image.shape)}")
    if boxes.shape[0] and (int(box_image.min()) < 0 or int(box_image.max()) >= n_images):
        bad = int(((box_image < 0) | (box_image >= n_images)).nonzero()[0, 0])
        raise ValueError(f"box_image[{bad}] = {int(box_image[bad])}; expected an image index in [0, {n_images})")
    if patch_size < 1 or merge < 1:
        raise ValueError(f"patch_size and merge must be >= 1, got patch_size={patch_size}, merge={merge}")
    if tokens.shape[0] == total:
        return 1
    if merge > 1 and tokens.shape[0] * merge * merge == total:
        return merge
    raise ValueError(
        f"tokens has {tokens.shape[0]} rows; expected one per patch ({total}) or, after a {merge}x{merge} merger, "
        f"one per group ({total / (merge * merge):g})"
    )


def _clip_boxes(boxes: torch.Tensor, height: float, width: float, index: torch.Tensor) -> torch.Tensor:
    """boxes clipped to the image; index: each box's row in the caller's boxes (named in the error)."""
    limit = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    clipped = torch.minimum(boxes.clamp(min=0), limit)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if bool(empty.any()):
        bad = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"boxes[{int(index[bad])}] = {boxes[bad].tolist()} has no area inside its {width:g}x{height:g} image; "
            "expected x0 < x1 and y0 < y1 overlapping the image (boxes are in pixels of the resized image)"
        )
    return clipped


def _area_weights(cells: torch.Tensor, boxes: torch.Tensor, cell: float) -> torch.Tensor:
    """(n_boxes, n_tokens): fraction of each token's cell inside each box."""
    top, left = cells[:, 0] * cell, cells[:, 1] * cell
    ox = (torch.minimum(boxes[:, 2:3], left + cell) - torch.maximum(boxes[:, 0:1], left)).clamp(min=0)
    oy = (torch.minimum(boxes[:, 3:4], top + cell) - torch.maximum(boxes[:, 1:2], top)).clamp(min=0)
    return ox * oy / (cell * cell)


def _bilinear_weights(cells: torch.Tensor, rows: int, cols: int, boxes: torch.Tensor, cell: float,
                      output_size: int, sampling_ratio: int) -> torch.Tensor:
    """(n_boxes, n_tokens): RoIAlign (aligned=True) averaged over its output bins, as weights on the tokens.

    Follows torchvision's roi_align kernel: sample points on a regular grid inside each bin, coordinates in
    feature-map units shifted by half a cell, points beyond one cell outside the map contribute zero, others
    are clamped to the map and interpolated bilinearly; the average runs over all sample points.
    """
    steps = output_size * sampling_ratio
    frac = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps  # sample positions in [0, 1] of the box
    b = boxes.double() / cell - 0.5
    ys = b[:, 1:2] + frac[None, :] * (b[:, 3:4] - b[:, 1:2])  # (n_boxes, steps)
    xs = b[:, 0:1] + frac[None, :] * (b[:, 2:3] - b[:, 0:1])

    def axis(coord: torch.Tensor, size: int) -> torch.Tensor:
        # (n_boxes, steps, size): interpolation weight of each sample on each grid line of one axis.
        valid = (coord >= -1.0) & (coord <= size)
        c = coord.clamp(min=0)
        low = c.floor().clamp(max=size - 1)
        c = torch.where(low >= size - 1, low, c)
        high = (low + 1).clamp(max=size - 1)
        frac_high = c - low
        grid = torch.arange(size, dtype=torch.float64)
        w = (1 - frac_high)[..., None] * (grid == low[..., None]) + frac_high[..., None] * (grid == high[..., None])
        return w * valid[..., None]

    wy = axis(ys, rows).sum(dim=1)  # (n_boxes, rows): summed over the sample rows
    wx = axis(xs, cols).sum(dim=1)
    dense = wy[:, :, None] * wx[:, None, :] / (steps * steps)  # (n_boxes, rows, cols)
    return dense[:, cells[:, 0], cells[:, 1]].float()


def pool_boxes(tokens: torch.Tensor, cu_seqlens: torch.Tensor, grid_hw: torch.Tensor, pos: torch.Tensor,
               boxes: torch.Tensor, box_image: torch.Tensor, patch_size: int, merge: int = 1, *,
               method: str = "mean", output_size: int = 7, sampling_ratio: int = 2) -> torch.Tensor:
    """Pool one feature per box from packed patch tokens.

    tokens (total, width): per-patch tokens, or per merge group after a merge x merge merger (then
    total * merge^2 patches); cu_seqlens (n_images + 1,), grid_hw (n_images, 2) and pos (total_patches, 2) of
    the patches, as `build_positions` gives them; boxes (n_boxes, 4) float x0, y0, x1, y1 in pixels of the
    resized image (the patch grid times patch_size), clipped to the image; box_image (n_boxes,) int.
    method: "mean" (area-weighted masked mean) or "roi_align" (output_size x output_size bins, sampling_ratio^2
    points each, averaged). Returns (n_boxes, width) in tokens' dtype.
    """
    if method not in ("mean", "roi_align"):
        raise ValueError(f"method must be 'mean' or 'roi_align', got {method!r}")
    group = _check(tokens, cu_seqlens, grid_hw, pos, boxes, box_image, patch_size, merge)
    cu = cu_seqlens.long().cpu()
    grid = grid_hw.long().cpu()
    box_image = box_image.long().cpu()
    boxes = boxes.float().cpu()
    out = tokens.new_empty(boxes.shape[0], tokens.shape[1])
    cell = float(patch_size * group)
    for image in box_image.unique().tolist():
        which = (box_image == image).nonzero().flatten()
        rows, cols = grid[image].tolist()
        start, stop = int(cu[image]), int(cu[image + 1])
        cells = pos[start:stop].long().cpu()
        if group > 1:  # a merged token sits where its group's first patch sits (Qwen2-VL order)
            cells = cells[:: group * group] // group
            rows, cols = rows // group, cols // group
            start, stop = start // (group * group), stop // (group * group)
        image_boxes = _clip_boxes(boxes[which], rows * cell, cols * cell, which)
        if method == "mean":
            weights = _area_weights(cells.float(), image_boxes, cell)
            weights = weights / weights.sum(dim=1, keepdim=True)
        else:  # already an average over the sample points, as torchvision divides by their count
            weights = _bilinear_weights(cells, rows, cols, image_boxes, cell, output_size, sampling_ratio)
        pooled = weights.to(tokens.device) @ tokens[start:stop].float()
        out[which.to(tokens.device)] = pooled.to(tokens.dtype)
    return out


def region_classification(box_features: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
                          class_emb: torch.Tensor, labels: torch.Tensor, *,
                          ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of pooled box features, projected by `project` into the joint embedding and compared with
    the class embeddings (from `zeroshot.class_embeddings`). labels (n_boxes,) int category indices."""
    emb = project(box_features)
    if emb.dim() != 2 or emb.shape[0] != box_features.shape[0]:
        raise ValueError(
            f"project returned shape {tuple(emb.shape)}; expected ({box_features.shape[0]}, embed_dim), one row per box"
        )
    return classification_accuracy(emb.float(), class_emb.to(emb.device), labels, ks=ks)

"""The packed batch: what the data path produces and the model, the losses and the evaluation consume.

Images are packed along dim 0 (patch tokens of image 0, then image 1, ...; within an image, the tokens of each
merge x merge group contiguous, as `build_positions` orders them); captions are packed the same way along their
own dim 0. Every tensor has a host-side twin of its lengths (`seqlens`, `text_seqlens`) because the planner knows
them: kernels use them to launch exact grids without reading the device.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class PackedBatch:
    # images
    patches: torch.Tensor  # (total, 3 * p * p) float, flattened channel, row, column; normalised
    cu_seqlens: torch.Tensor  # (n_images + 1,) int32
    pos: torch.Tensor  # (total, 2) int32: (row, col) of each patch in its image's patch grid
    max_seqlen: int
    seqlens: list[int]  # host-side patch counts per image
    grid_hw: torch.Tensor  # (n_images, 2) int32: patch-grid rows and cols per image
    # captions: one per image unless `text_image` says otherwise
    tokens: torch.Tensor  # (total_text,) int64
    text_cu_seqlens: torch.Tensor  # (n_texts + 1,) int32
    text_max_seqlen: int
    text_seqlens: list[int]
    text_image: torch.Tensor | None = None  # (n_texts,) int64: which image each caption belongs to
    # regions (stage 2): boxes in patch-grid coordinates, x in patch columns and y in patch rows of their image's
    # grid (pixels of the resized image / patch size); x0 = 1.5 is the middle of the second patch column
    boxes: torch.Tensor | None = None  # (n_boxes, 4) float32 x0, y0, x1, y1
    box_image: torch.Tensor | None = None  # (n_boxes,) int64: which image each box belongs to
    region_tokens: torch.Tensor | None = None  # (total_region_text,) int64: one caption per box, packed
    region_cu_seqlens: torch.Tensor | None = None  # (n_boxes + 1,) int32
    # bookkeeping
    keys: list[str] = dataclasses.field(default_factory=list)  # sample keys, one per image
    padding_tokens: int = 0  # patch tokens of padding added to reach a static budget (0 when not padded)
    truncated_tokens: int = 0  # caption tokens cut by truncation in this batch

    @property
    def n_images(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def n_texts(self) -> int:
        return self.text_cu_seqlens.numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on `device` (host lists stay). non_blocking to a GPU: host tensors not yet in
        pinned memory are pinned first (`to_device`)."""
        moved = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                value = to_device(value, device, non_blocking)
            moved[field.name] = value
        return PackedBatch(**moved)

    def pin_memory(self) -> PackedBatch:
        """A copy whose host tensors are in pinned memory (tensors already on a GPU stay)."""
        pinned = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in pinned.items():
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                pinned[name] = value.pin_memory()
        return PackedBatch(**pinned)


def to_device(tensor: torch.Tensor, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
    """tensor.to(device, non_blocking); to a GPU from host memory that is not pinned, pinned first: CUDA copies
    from pageable memory after synchronising the stream, so a non-blocking copy of such a tensor would still make
    the host wait for all the GPU's queued work (the pinned staging buffer comes from torch's caching allocator)."""
    device = torch.device(device)
    if (non_blocking and device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned()
            and torch.cuda.is_available()):
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=non_blocking)

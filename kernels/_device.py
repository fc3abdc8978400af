"""What the launchers ask of the device."""

from __future__ import annotations

import torch


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 elsewhere (the interpreter), small so that the tests still
    split work across programs and loop within them."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2

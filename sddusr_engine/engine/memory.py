"""How much memory a pass needs, how much the device has free, and the tile that fits.

`auto_tile` picks the whole image (tile 0) when its estimated peak fits in the memory the device
has free, and tiles otherwise: a whole-image pass does the 2x stage once, where tiles pay a second
pass over every tile for the fusion block's whole-image statistic.

The estimate is the peak measured on the CPU for the shipped 32-channel network, fp32, in one
whole-image pass over the bundled 640x480 pair (RSS growth 2.35 GB, 2-core CPU, 2026-12-04):
about 63 values per LR pixel per feature channel. It is scaled by the network's width and the
dtype's size, and only half of the free memory is counted on, for what the estimate misses
(allocator slack, other programs, the ensemble's accumulator).
"""

from __future__ import annotations

import torch

VALUES_PER_LR_PIXEL_PER_CHANNEL = 63.0
USABLE_SHARE = 0.5  # of the free memory
TILED_TILE = 256  # the LR tile side when the whole image does not fit


def whole_pass_bytes(lr_hw: tuple[int, int], channels: int, dtype: torch.dtype) -> int:
    """The estimated peak of one whole-image pass over an LR image of `lr_hw` pixels."""
    elem = torch.empty((), dtype=dtype).element_size()
    return int(VALUES_PER_LR_PIXEL_PER_CHANNEL * channels * elem * lr_hw[0] * lr_hw[1])


def free_bytes(device: torch.device) -> int | None:
    """Memory the device has free now (None when it cannot be read): on a GPU what the driver
    reports free plus what PyTorch's cache holds unused; on the CPU Linux's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def auto_tile(lr_hw: tuple[int, int], channels: int, dtype: torch.dtype, device) -> int:
    """0 (the whole image) when its pass fits in the usable free memory, else TILED_TILE."""
    free = free_bytes(torch.device(device))
    if free is None:
        return TILED_TILE
    fits = whole_pass_bytes(lr_hw, channels, dtype) <= USABLE_SHARE * free
    return 0 if fits else TILED_TILE

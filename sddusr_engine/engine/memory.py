"""How much memory a pass needs, how much the device has free, and the plan that fits.

Three ways to run the network over an image (`engine.tiling`): the whole image in one pass;
tiles that keep the fusion block's input and gated map for the whole output, so that the 2x stage
runs once ("kept maps"); tiles that run the 2x stage twice, the first time for the fusion block's
whole-image statistic, with a peak that follows the tile, not the image ("bounded"). On a GPU the
bounded plan keeps the whole maps (trunk, LR features, F_Ref_align's block table, output) in host
memory (`host_maps`), so that the GPU's peak follows the tile and not the photo's size.

`auto_plan` picks, from the memory the device has free:
- on a GPU, the whole image when it fits, else kept maps when they fit, else bounded tiles;
- on the CPU, kept maps in small tiles when they fit, else bounded tiles: there the tiles' maps
  stay in the caches, and kept maps in 128-pixel tiles ran the bundled pair's network faster
  than one whole pass and with a lower peak (bench/RESULTS.md).

The whole-pass estimate is the peak measured on the CPU for the shipped 32-channel network, fp32,
in one whole-image pass over the bundled 640x480 pair (RSS growth 2.35 GB, 2-core CPU,
2026-12-04): about 63 values per LR pixel per feature channel, scaled by the network's width and
the dtype's size. Kept maps peaked at about 0.7 of that on the same pair (2026-12-06). Only half
of the free memory is counted on, for what the estimates miss (allocator slack, other programs,
the ensemble's accumulator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VALUES_PER_LR_PIXEL_PER_CHANNEL = 63.0
KEPT_MAPS_SHARE = 0.7  # of the whole pass's peak
USABLE_SHARE = 0.5  # of the free memory
TILED_TILE = 256  # the LR tile side when the whole image does not fit
CPU_KEPT_TILE = 128  # the LR tile side of kept maps on the CPU


@dataclass(frozen=True)
class TilePlan:
    """How one pass runs: `tile` LR pixels (0: whole image) and whether the 2x stage keeps the
    fusion maps (`engine.tiling.tiled_forward`'s `keep_fusion_maps`)."""

    tile: int
    keep_fusion_maps: bool = False
    host_maps: bool = False  # the whole maps in host memory (bounded tiles on a GPU)


def bounded_plan(tile: int, device, host_maps: bool | None = None) -> TilePlan:
    """Bounded tiles of `tile` LR pixels, with the whole maps in host memory where `host_maps`
    says (None: on a GPU)."""
    if host_maps is None:
        host_maps = torch.device(device).type == "cuda"
    return TilePlan(tile, False, bool(host_maps) and tile > 0)


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


def auto_plan(lr_hw: tuple[int, int], channels: int, dtype: torch.dtype, device) -> TilePlan:
    """The fastest plan whose estimated peak fits in the usable free memory (module docstring);
    bounded tiles when the free memory cannot be read."""
    device = torch.device(device)
    free = free_bytes(device)
    if free is None:
        return bounded_plan(TILED_TILE, device)
    usable = USABLE_SHARE * free
    whole = whole_pass_bytes(lr_hw, channels, dtype)
    kept = KEPT_MAPS_SHARE * whole <= usable
    if device.type == "cpu":
        return TilePlan(CPU_KEPT_TILE, True) if kept else TilePlan(TILED_TILE)
    if whole <= usable:
        return TilePlan(0)
    return TilePlan(TILED_TILE, True) if kept else bounded_plan(TILED_TILE, device)

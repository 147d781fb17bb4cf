"""Kernels of sddusr-engine: Triton launchers and their plain PyTorch references.

`get_ops("torch")` returns the references (CPU or GPU, always importable), except for inference
on the CPU (no autograd), where the deformable convolution runs `deform_conv2d_sampled` (~1e-5
relative to its reference, a tenth of the time), the patch warp `patch_warp_blocked` (to fp32
rounding, a third of the time) and the matching `patch_match_blocked` (the same products in
cache-sized blocks, less than half the time); `get_ops("triton")` the Triton launchers (CUDA, or
the CPU under TRITON_INTERPRET=1), with `fused_detail` for the fusion input's reference detail.
Both sets share signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ._launch import HAS_TRITON
from .attention import attention, attention_reference
from .deform_conv2d import deform_conv2d, deform_conv2d_reference, deform_conv2d_sampled
from .fused_detail import fused_detail, fused_detail_reference
from .patch_match import (
    KeySide,
    key_side,
    match_descriptors,
    patch_descriptors,
    patch_match,
    patch_match_blocked,
    patch_match_reference,
)
from .patch_warp import (
    PatchTable,
    patch_grid,
    patch_table,
    patch_warp,
    patch_warp_blocked,
    patch_warp_reference,
    table_part,
)

__all__ = [
    "HAS_TRITON",
    "KernelOps",
    "KeySide",
    "PatchTable",
    "attention",
    "attention_reference",
    "deform_conv2d",
    "deform_conv2d_reference",
    "deform_conv2d_sampled",
    "fused_detail",
    "fused_detail_reference",
    "get_ops",
    "key_side",
    "match_descriptors",
    "patch_descriptors",
    "patch_grid",
    "patch_table",
    "patch_match",
    "patch_match_blocked",
    "patch_match_reference",
    "patch_warp",
    "patch_warp_blocked",
    "patch_warp_reference",
    "table_part",
]


class KernelOps(NamedTuple):
    """The ops of one backend (a NamedTuple: immutable, unpackable). `warp_source(value)` is
    what `patch_warp` should be given for many calls against the same value map: the map itself,
    or on the CPU its block table, cut once."""

    patch_match: Callable
    patch_warp: Callable
    attention: Callable
    deform_conv2d: Callable
    warp_source: Callable = lambda value, ksize=9, stride=4: value
    # the reference detail times its gate in one kernel (inference; None: the model's own
    # PyTorch arithmetic, which autograd can follow)
    fused_detail: Callable | None = None


def _deform_conv2d_torch(x, *args, **kwargs):
    """The torch backend's deformable convolution: the reference where gradients flow (training)
    or on a GPU, the sampled path for inference on the CPU."""
    if x.device.type == "cpu" and not torch.is_grad_enabled():
        return deform_conv2d_sampled(x, *args, **kwargs)
    return deform_conv2d_reference(x, *args, **kwargs)


def _patch_match_torch(query, *args, **kwargs):
    """The torch backend's matching: in cache-sized blocks for inference on the CPU, else the
    reference."""
    if query.device.type == "cpu" and not torch.is_grad_enabled():
        return patch_match_blocked(query, *args, **kwargs)
    return patch_match_reference(query, *args, **kwargs)


def _patch_warp_torch(value, *args, **kwargs):
    """The torch backend's patch warp: by blocks for inference on the CPU (or from a block table
    that `_warp_source_torch` cut), else the reference."""
    if isinstance(value, PatchTable) or (
        value.device.type == "cpu" and not torch.is_grad_enabled()
    ):
        return patch_warp_blocked(value, *args, **kwargs)
    return patch_warp_reference(value, *args, **kwargs)


def _warp_source_torch(value, ksize: int = 9, stride: int = 4):
    """For inference on the CPU, `value`'s block table (cut once for every tile's warp)."""
    if (
        value.device.type == "cpu"
        and not torch.is_grad_enabled()
        and (ksize - 1) // 2 % stride == 0
    ):
        return patch_table(value, ksize, stride)
    return value


_TORCH = KernelOps(
    _patch_match_torch,
    _patch_warp_torch,
    attention_reference,
    _deform_conv2d_torch,
    _warp_source_torch,
)
_TRITON = KernelOps(patch_match, patch_warp, attention, deform_conv2d, fused_detail=fused_detail)


def get_ops(backend: str) -> KernelOps:
    """The ops of `backend`: "torch" (plain PyTorch references) or "triton" (the kernels)."""
    if backend == "torch":
        return _TORCH
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend 'triton' needs the triton package, which is not importable")
        return _TRITON
    raise ValueError(f"unknown kernel backend {backend!r}; use 'torch' or 'triton'")

"""Kernels of sddusr-engine: Triton launchers and their plain PyTorch references.

`get_ops("torch")` returns the references (CPU or GPU, always importable); `get_ops("triton")`
the Triton launchers (CUDA, or the CPU under TRITON_INTERPRET=1). Both sets share signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ._launch import HAS_TRITON
from .attention import attention, attention_reference
from .deform_conv2d import deform_conv2d, deform_conv2d_reference
from .patch_match import match_descriptors, patch_descriptors, patch_match, patch_match_reference
from .patch_warp import patch_grid, patch_warp, patch_warp_reference

__all__ = [
    "HAS_TRITON",
    "KernelOps",
    "attention",
    "attention_reference",
    "deform_conv2d",
    "deform_conv2d_reference",
    "get_ops",
    "match_descriptors",
    "patch_descriptors",
    "patch_grid",
    "patch_match",
    "patch_match_reference",
    "patch_warp",
    "patch_warp_reference",
]


class KernelOps(NamedTuple):
    """The four ops of one backend (a NamedTuple: immutable, unpackable)."""

    patch_match: Callable
    patch_warp: Callable
    attention: Callable
    deform_conv2d: Callable


_TORCH = KernelOps(
    patch_match_reference, patch_warp_reference, attention_reference, deform_conv2d_reference
)
_TRITON = KernelOps(patch_match, patch_warp, attention, deform_conv2d)


def get_ops(backend: str) -> KernelOps:
    """The ops of `backend`: "torch" (plain PyTorch references) or "triton" (the kernels)."""
    if backend == "torch":
        return _TORCH
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend 'triton' needs the triton package, which is not importable")
        return _TRITON
    raise ValueError(f"unknown kernel backend {backend!r}; use 'torch' or 'triton'")

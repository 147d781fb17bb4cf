"""Launch settings shared by the kernels: one place that knows the device, dtype and interpreter.

Triton is optional at import time (it ships Linux wheels only): without it the references still work,
`HAS_TRITON` is False and `require_triton()` raises a clear RuntimeError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # pragma: no cover - exercised by the platform, not by a test
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _TRITON_ERROR: str | None = None
except Exception as exc:  # ImportError on macOS/Windows, anything else on a broken install
    HAS_TRITON = False
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"

    class _Stub:
        """Stands in for `triton` / `triton.language` so the kernel definitions still parse."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            raise RuntimeError(f"triton is not available ({_TRITON_ERROR})")

    triton = _Stub()
    tl = _Stub()

__all__ = [
    "HAS_TRITON",
    "Config",
    "dot_ieee",
    "is_interpreter",
    "launch_config",
    "next_pow2",
    "require_triton",
    "tl",
    "triton",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_interpreter() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_triton(*tensors: torch.Tensor) -> None:
    """Raise RuntimeError unless Triton can run these tensors (CUDA, or CPU under the interpreter)."""
    if not HAS_TRITON:
        raise RuntimeError(
            f"the triton backend needs triton (not importable here: {_TRITON_ERROR}); "
            "use backend='torch'"
        )
    for t in tensors:
        if t.device.type == "cpu" and not is_interpreter():
            raise RuntimeError(
                "triton kernels need CUDA tensors; on the CPU set TRITON_INTERPRET=1 before "
                "importing triton, or use backend='torch'"
            )


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_ieee(dtype: torch.dtype) -> bool:
    # fp32 inputs: exact fp32 products (tf32 would change argmaxes and miss the 1e-5 goldens).
    return dtype == torch.float32


@dataclass(frozen=True)
class Config:
    blocks: dict
    num_warps: int = 4
    num_stages: int = 2


# Block sizes per kernel. The GPU entries are the best of bench/sweep_configs.py on one H200
# (2026-11-26, CameraFusion sizes; bench/RESULTS.md has the table) where a candidate beat the
# first guess by more than the run-to-run spread; the interpreter entries only keep the number of
# programs small, since each program costs ~0.4 ms there.
_GPU = {
    "patch_match": Config({"BLOCK_Q": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    "patch_match_fp32": Config({"BLOCK_Q": 64, "BLOCK_K": 64}, num_warps=4),
    "patch_warp": Config({"BLOCK_C": 8, "BLOCK_P": 256}, num_warps=4),
    "attention": Config({"BLOCK_Q": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    "deform_conv2d": Config({"BLOCK_P": 128, "BLOCK_N": 64, "BLOCK_C": 16}, num_warps=4),
    "deform_conv2d_fp32": Config({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_C": 16}, num_warps=4),
    # first guesses, not yet swept: rows of pixels for NCHW, wide channel tiles for channels_last
    "fused_detail": Config(
        {"BLOCK_C": 8, "BLOCK_H": 1, "BLOCK_W": 64, "BLOCK_Y": 1, "BLOCK_X": 256}, num_warps=4
    ),
    "fused_detail_cl": Config(
        {"BLOCK_C": 64, "BLOCK_H": 1, "BLOCK_W": 8, "BLOCK_Y": 1, "BLOCK_X": 32}, num_warps=4
    ),
}
_INTERP = {
    "patch_match": Config({"BLOCK_Q": 64, "BLOCK_K": 64}),
    "patch_match_fp32": Config({"BLOCK_Q": 64, "BLOCK_K": 64}),
    "patch_warp": Config({"BLOCK_C": 16, "BLOCK_P": 256}),
    "attention": Config({"BLOCK_Q": 32, "BLOCK_K": 32}),
    "deform_conv2d": Config({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_C": 32}),
    "fused_detail": Config(
        {"BLOCK_C": 64, "BLOCK_H": 8, "BLOCK_W": 32, "BLOCK_Y": 16, "BLOCK_X": 64}
    ),
    "fused_detail_cl": Config(
        {"BLOCK_C": 64, "BLOCK_H": 8, "BLOCK_W": 32, "BLOCK_Y": 16, "BLOCK_X": 64}
    ),
}


def launch_config(kernel: str, dtype: torch.dtype) -> Config:
    """Block sizes and warps for `kernel` at `dtype` on the current backend."""
    table = _INTERP if is_interpreter() else _GPU
    key = f"{kernel}_fp32" if dtype == torch.float32 and f"{kernel}_fp32" in table else kernel
    return table[key]

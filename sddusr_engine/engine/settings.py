"""Run settings: every option of an engine resolved and validated once, in one frozen object.

`RunSettings.resolve(...)` turns what a user passes ("auto", "fp16", a tile side, ...) into the
concrete device, dtype and backend, or raises `SettingsError` with a sentence that says what is
allowed. `device_flags(settings)` sets the process-wide library flags a run wants and restores
them afterwards, so an engine never changes them for the rest of the process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import SettingsError
from ..kernels import HAS_TRITON
from ..kernels._launch import is_interpreter
from .adapt import AdaptSettings

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ENSEMBLE_SIZES = (1, 2, 4, 8)
MAX_ADAPT_STEPS = 10_000  # self-adaptation steps per pair (a typo guard, not a tuned limit)
MIN_TILE = 32


@dataclass(frozen=True)
class RunSettings:
    """How an engine runs: all resolved (no "auto" left) and checked."""

    device: torch.device
    dtype: torch.dtype
    backend: str  # "triton" or "torch"
    tile: int | None  # LR tile side, a multiple of 4; 0 = the whole image; None = by free memory
    channels_last: bool = False
    ensemble: int = 1  # passes averaged (geometric self-ensemble)
    adapt: AdaptSettings = AdaptSettings(steps=0)  # steps == 0: no self-adaptation
    # tiled runs: keep the fusion maps (the 2x stage once) or not; None: only where the tile is
    # picked from the free memory, and then as `memory.auto_plan` says
    keep_fusion_maps: bool | None = None
    # bounded tiles: the whole-image maps in host memory (True), on the device (False); None: as
    # `memory.bounded_plan` says (host memory on a GPU)
    host_maps: bool | None = None

    @classmethod
    def resolve(
        cls,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        backend: str = "auto",
        tile: int | None = None,
        channels_last: bool | None = None,
        ensemble: int = 1,
        adapt: int = 0,
        keep_fusion_maps: bool | None = None,
        host_maps: bool | None = None,
    ) -> RunSettings:
        """`tile=None` picks per image from the free memory (`engine.memory.auto_plan`);
        `channels_last=None` is NHWC on the CPU and NCHW on a GPU (see `Engine`)."""
        if ensemble not in ENSEMBLE_SIZES:
            sizes = ", ".join(map(str, ENSEMBLE_SIZES))
            raise SettingsError(f"ensemble must be one of {sizes}, got {ensemble}.")
        if not 0 <= int(adapt) <= MAX_ADAPT_STEPS:
            raise SettingsError(f"adapt must be 0 (off) to {MAX_ADAPT_STEPS} steps, got {adapt}.")
        if tile is not None and tile != 0 and tile < MIN_TILE:
            raise SettingsError(
                f"tile must be 0 (whole image) or at least {MIN_TILE} pixels, got {tile}."
            )
        dev = resolve_device(device)
        if channels_last is None:
            channels_last = dev.type == "cpu"
        return cls(
            device=dev,
            dtype=_resolve_dtype(dtype, dev),
            backend=_resolve_backend(backend, dev),
            tile=None if tile is None else int(tile) // 4 * 4,
            channels_last=bool(channels_last),
            ensemble=int(ensemble),
            adapt=AdaptSettings(steps=int(adapt)),
            keep_fusion_maps=None if keep_fusion_maps is None else bool(keep_fusion_maps),
            host_maps=None if host_maps is None else bool(host_maps),
        )

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingsError(
            f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N."
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise SettingsError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError("CUDA was asked for, but no CUDA GPU is available; use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise SettingsError(
            f"there is no GPU {device!r}: this machine has {n} (cuda:0 to cuda:{n - 1})."
        )
    return dev


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SettingsError(f"unknown precision {dtype!r}; expected auto, fp32, fp16 or bf16.")
    if device.type == "cpu" and dtype != "fp32":
        raise SettingsError(f"{dtype} runs on a GPU only; use fp32 on the CPU.")
    return DTYPES[dtype]


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if backend not in ("triton", "torch"):
        raise SettingsError(f"unknown backend {backend!r}; expected auto, triton or torch.")
    if backend == "triton" and not HAS_TRITON:
        raise SettingsError(
            "the triton backend needs the triton package, which is not installed; "
            "use --backend torch."
        )
    if backend == "triton" and device.type != "cuda" and not is_interpreter():
        raise SettingsError(
            "the triton backend runs on a CUDA GPU only; use --backend torch (or auto) on the CPU."
        )
    return backend


@contextmanager
def device_flags(settings: RunSettings) -> Iterator[None]:
    """The library flags a run wants, restored on the way out.

    cuDNN's autotuner: every tile has the same shape, so picking the fastest convolution once
    pays for itself within a run."""
    if settings.device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before

"""Device timing: one way to time work on the CPU or a GPU, and one probe of the device's peaks.

Everything in the project that reports a duration or a fraction of the hardware's peak uses these,
so `sddusr profile`, the benchmarks, the engine's stage timings and training's step times agree.
A GPU runs asynchronously: every measurement synchronises the device before reading the clock.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

StageHook = Callable[[str], AbstractContextManager]
# Told each stage's name as it starts (a progress display names the stage running now).
StageStart = Callable[[str], None]

# One probe size for everyone: an 8192^3 product fills an H100/H200 (a smaller one reads low);
# the CPU gets a size that finishes in well under a second.
PEAK_MATMUL_N = {"cuda": 8192, "cpu": 1024}
PEAK_COPY_BYTES = {"cuda": 256 * 2**20, "cpu": 16 * 2**20}


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device | str,
    repeats: int,
    warmup: int = 1,
    best: bool = False,
) -> float:
    """Milliseconds per call of `fn`: the median (or, with `best`, the minimum) of `repeats`
    synchronised calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return min(times) if best else statistics.median(times)


class StageTimer:
    """Adds each stage's synchronised wall time (ms) to `timings[stage]`; `hook(stage)`, when
    given, is entered around the stage too (the profiler counts FLOPs and memory with it)."""

    def __init__(
        self, device: torch.device, timings: dict[str, float], hook: StageHook | None = None
    ):
        self.device, self.timings, self.hook = torch.device(device), timings, hook

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        sync(self.device)
        t0 = time.perf_counter()
        with self.hook(stage) if self.hook is not None else nullcontext():
            yield
        sync(self.device)
        self.timings[stage] = self.timings.get(stage, 0.0) + 1e3 * (time.perf_counter() - t0)


def announcing(on_start: StageStart | None, hook: StageHook | None = None) -> StageHook | None:
    """A stage hook that calls `on_start(stage)` as each stage starts, then enters `hook`'s
    context (when given): the engine passes one hook down, so a progress display and a
    profiler can both watch the same stages."""
    if on_start is None:
        return hook

    @contextmanager
    def both(stage: str) -> Iterator[None]:
        on_start(stage)
        with hook(stage) if hook is not None else nullcontext():
            yield

    return both


def measured_peaks(device: torch.device | str, dtype: torch.dtype) -> dict[str, float]:
    """This device's matrix-product rate (TFLOP/s, in `dtype`) and copy bandwidth (GB/s,
    read + write), measured now: the denominators of every "fraction of peak"."""
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    n = PEAK_MATMUL_N[kind]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, repeats=5, warmup=2, best=True)
    src = torch.empty(PEAK_COPY_BYTES[kind], dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, repeats=5, warmup=2, best=True)
    return {
        "matmul_tflops": 2 * n**3 / ms / 1e9,
        "copy_gbs": 2 * src.numel() / copy_ms / 1e6,
        "matmul_n": n,
    }

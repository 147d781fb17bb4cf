"""What the `sddusr` command sets for its own process (importing the library never does): glibc's
malloc keeps large freed blocks for reuse instead of handing them back to the kernel.

Each network stage allocates tensors of tens to hundreds of MB. glibc serves blocks above its
mmap threshold (at most 32 MB by default) with fresh mappings and unmaps them on free, so every
stage pays page faults to zero its memory again: 12.9 s of system time in a 24.9 s run of
`sddusr sr` on the bundled pair (2-core CPU, 2026-12-04). With the threshold at 1 GiB and the
trim threshold at its maximum, freed blocks stay in the heap and are reused: 4.5 s of system
time, 16.7 s in all, at a peak 1.6 GB higher (4.4 GB). A Python caller can do the same before
its first large allocation with `keep_freed_memory()`.

Kept memory is reused only by blocks that fit in it: a stage whose maps are larger than the mmap
threshold (a 12 MP photo's 1.6 GB maps) gets fresh mappings beside everything the previous stage
left in the heap. So at each stage's start the command hands the heap's free pages back
(`releasing`, glibc's malloc_trim): the stages reuse memory within themselves, and the peak is
the largest stage's, not the sum of what each left behind. Within a long stage, tiles of
different sizes fragment the heap as well (a 12 MP pair's 2x stage grew RSS by 2.4 GB over its
live maps), so the command also hands free pages back every few seconds of progress
(`trimming`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import time
from collections.abc import Callable

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where there is no glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # no glibc: musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    )


@functools.cache  # find_library runs ldconfig: once per process, not at every stage
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel now; False where there is no glibc."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    trim(0)
    return True


def releasing(on_stage: Callable[[str], None]) -> Callable[[str], None]:
    """`on_stage` that first hands the freed memory of the stage before back (module docstring)."""

    def start(name: str) -> None:
        release_freed_memory()
        on_stage(name)

    return start


TRIM_INTERVAL_S = 5.0


def trimming(progress: Callable[[int, int], None] | None, every_s: float | None = None):
    """`progress(done, total)` that also hands the heap's free pages back, at most once every
    `every_s` seconds (None: TRIM_INTERVAL_S; module docstring); `progress` None gives a
    callback that only does that."""
    last = [time.monotonic()]
    interval = TRIM_INTERVAL_S if every_s is None else every_s

    def tick(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= interval:
            release_freed_memory()
            last[0] = now
        if progress is not None:
            progress(done, total)

    return tick

"""The errors a user can act on: one base class, so the CLI's error boundary is one `isinstance`.

Every error raised for bad input, a bad option or a resource the engine cannot get derives from
`SddusrError` and carries a message that is one complete sentence (more lines may follow, e.g. a
list of missing weight keys). `exit_code` is the CLI's exit status for it: 2 for a usage error
(an option out of range, a folder in neither layout), 1 for everything else. Anything that is not
an `SddusrError` is a bug and is reported as one.

Each subclass also derives from the built-in exception its callers would reach for first
(`ValueError`, `OSError`, `MemoryError`), so library code that catches those still works.

`memory_advice` turns a memory error of any origin (the GPU's, the CPU allocator's `RuntimeError`,
a plain `MemoryError`) into that one sentence, with the option that lowers the peak.
"""

from __future__ import annotations

import re


class SddusrError(Exception):
    """Base of every user-facing error."""

    exit_code = 1


class UsageError(SddusrError, ValueError):
    """An option or argument out of range, or a combination that does not make sense."""

    exit_code = 2


class EngineError(SddusrError, ValueError):
    """A request the engine cannot serve: inputs of the wrong shape, a device that is not there."""


class OutOfMemoryError(EngineError, MemoryError):
    """The device ran out of memory even at the smallest tile."""


class ImageReadError(SddusrError, ValueError):
    """An image file that is missing, unreadable, truncated or of an unsupported kind."""


class WeightsError(SddusrError, ValueError):
    """A weights file that is missing, corrupt, or does not fit the network."""


class FootprintNotFoundError(SddusrError, ValueError):
    """The telephoto could not be found in the wide image, or its footprint is not plausible."""


class DatasetError(SddusrError, ValueError):
    """A dataset folder in neither supported layout, or an item with a missing part."""


class DatasetLayoutError(DatasetError, UsageError):
    """A folder that holds neither layout at all (a usage error: exit status 2)."""

    exit_code = 2


class EvalError(DatasetError):
    """An evaluation that cannot be run on the data given."""


class EvalUsageError(EvalError, UsageError):
    """A dataset folder in no layout `eval` reads, or an option that selects nothing (exit 2)."""

    exit_code = 2


class OutputError(SddusrError, OSError):
    """An output that cannot be written: a read-only folder, a path under a file, a full disk."""


class TrainingError(SddusrError, ValueError):
    """A training run that cannot start or go on: a bad option, a checkpoint that does not fit."""


class SettingsError(EngineError, UsageError):
    """An engine setting out of range (tile, ensemble, adaptation steps, precision, backend)."""

    exit_code = 2


def memory_advice(e: BaseException, tile: int | None = None) -> str | None:
    """One sentence for a memory error (None if `e` is not one), naming the option that fits.

    `tile` is the LR tile side the run used (0 = whole image; None = unknown)."""
    if isinstance(e, OutOfMemoryError):
        return str(e).strip()
    text = str(e).lower()
    gpu = type(e).__name__ == "OutOfMemoryError" or "cuda out of memory" in text
    cpu = isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
    )
    if not (gpu or cpu):
        return None
    if tile is None:
        smaller = "a smaller --tile (e.g. --tile 128)"
    elif tile == 0:
        smaller = "--tile 256 (tiles, rather than the whole image at once)"
    elif tile // 2 >= 32:
        smaller = f"a smaller --tile (e.g. --tile {tile // 2 // 4 * 4})"
    else:
        smaller = "a smaller image"
    asked = re.search(r"allocate (\d+) bytes", text)
    more = f" (one step asked for {int(asked.group(1)) / 2**30:.1f} GiB)" if asked else ""
    if gpu:
        return f"out of GPU memory{more}; try {smaller}, --precision fp16, or --device cpu."
    if smaller != "a smaller image":
        smaller += " or a smaller image"
    return f"out of memory on the CPU{more}; try {smaller}."

"""What every benchmark row carries, and how the tables are printed: the benchmarks' shared harness.

The benchmarks time with `sddusr_engine.timing` (one timer, one peak probe for the whole project);
this module adds what only benchmarks need: where and when a row was measured (device, versions,
date, commit), the extra device memory a call allocates, the CameraFusion-Real sizes, and one
table printer. A script in bench/ imports it as `harness` (Python puts the script's folder first
on the path), so nothing here is private to one script.
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# CameraFusion-Real's sizes: LR 1280x1792, LRC 640x896, Ref 1280x1792 (bench/README.md, floors).
# The kernels see them on their own grids: matching queries at 1/2 LR, keys at 1/2 LRC, 16
# descriptor channels; the warp's values at LR size with 64 channels; TDL's two attention shapes.
CAMERAFUSION_SIZES = dict(
    c=16, q=(640, 896), k=(320, 448), cw=64, v=(1280, 1792),
    att_many=(573_440, 128), att_few=(128, 2_293_760), dc=(64, 1280, 1792),
)  # fmt: skip
# Small sizes with the same structure, for a CPU run that only shows the harness works.
SMALL_SIZES = dict(
    c=4, q=(13, 17), k=(11, 9), cw=8, v=(20, 24), att_many=(300, 128), att_few=(128, 3000),
    dc=(16, 13, 17),
)  # fmt: skip


def commit(short: bool = False) -> str:
    """SDDUSR_COMMIT if set (a copy of the tree without .git), else git's HEAD, else "unknown"."""
    sha = os.environ.get("SDDUSR_COMMIT", "")
    if not sha:
        try:
            sha = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
        except OSError:
            sha = ""
    sha = sha or "unknown"
    return sha[:10] if short and sha != "unknown" else sha


def stamp(device: torch.device) -> dict:
    """Where and when a benchmark ran: the device's name, torch and triton versions, date, commit.
    `not_gpu_numbers` is True off CUDA, and every table title then says so."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton ships Linux wheels only
        triton_version = "unavailable"
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "CPU",
        "not_gpu_numbers": not cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
    }


def title(meta: dict, what: str) -> str:
    """One line naming the benchmark, the device, the versions, the date and the commit."""
    line = (
        f"{what} | {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
        f"{meta['date'][:10]} | {meta['commit'][:10]}"
    )
    return line + (" | CPU: NOT GPU NUMBERS" if meta["not_gpu_numbers"] else "")


def extra_memory(fn: Callable[[], object], device: torch.device) -> float:
    """MiB that one call of `fn` allocates on a GPU above what was allocated before it (NaN on
    the CPU, where PyTorch keeps no such count)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def fmt(x: float | None, spec: str) -> str:
    """`x` in `spec`, or "-" where there is no number (None or NaN)."""
    return "-" if x is None or x != x else format(x, spec)


def print_table(heading: str, headers: Sequence[str], body: Sequence[Sequence[str]]) -> None:
    """Print `body` (rows of strings) under `headers` as aligned plain-text columns; the first
    columns that hold text align left, numbers right."""
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]  # fmt: skip
    numeric = [all(_is_number(r[i]) for r in body) for i in range(len(headers))]

    def line(cells):
        return "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    print(f"\n{heading}")
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for r in body:
        print(line(r))


def _is_number(cell: str) -> bool:
    try:
        float(cell.rstrip("%x").replace(",", ""))
        return True
    except ValueError:
        return cell == "-"

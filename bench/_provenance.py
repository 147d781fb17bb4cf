"""Which commit a benchmark row came from, for the bench scripts' JSON and tables."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit(short: bool = False) -> str:
    """SDDUSR_COMMIT if set (the device machine's copy has no .git), else git's HEAD, else
    "unknown"; `short` keeps the first 10 characters."""
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


def cpu_run_stamp() -> dict[str, str]:
    """Where and when a CPU measurement ran: hardware and threads, torch, commit, date."""
    import platform
    import time

    import torch

    cpu = platform.processor() or platform.machine()
    return {
        "hardware": f"{cpu}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "commit": commit(short=True),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }

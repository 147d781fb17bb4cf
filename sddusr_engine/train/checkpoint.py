"""Checkpoints of a training run: the RNG states, and saving and loading the checkpoint file."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    st = np.random.get_state()
    s = {
        "torch": torch.get_rng_state(),
        "numpy": [
            st[0],
            torch.from_numpy(st[1].astype(np.int64)),
            int(st[2]),
            int(st[3]),
            float(st[4]),
        ],
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate((3, tuple(s["python"]), s["python_gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# --time-budget: steps 1-5 warm up (allocator, cuDNN, first-call costs), steps 6-15 are timed.
BUDGET_WARM_STEPS, BUDGET_PROBE_STEPS = 5, 10


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint (weights_only: only tensors and plain Python values inside)."""
    return torch.load(path, map_location="cpu", weights_only=True)

"""Where the files shipped with the package lie: the default weights and the bundled sample pair.

They live in the repository's top-level `weights/` and `assets/` folders and are installed as the
data packages `sddusr_engine.pretrained` and `sddusr_engine.assets` (setup.py), so the same
lookup works from a clone, an editable install and a wheel.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEFAULT_WEIGHTS_NAME = "sddusr_default.safetensors"


def default_weights() -> Path:
    """The shipped SDDuSR weights (weights/sddusr_default.safetensors)."""
    return Path(str(files("sddusr_engine.pretrained") / DEFAULT_WEIGHTS_NAME))


def sample_dir() -> Path:
    """The bundled sample pair's folder (wide.jpg, tele.jpg, truth.json, SOURCE.md)."""
    return Path(str(files("sddusr_engine.assets") / "sample"))

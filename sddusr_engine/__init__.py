"""sddusr-engine: dual-lens (wide + telephoto) x2 super-resolution with SDDuSR and KeDuSR.

The public API. Importing the package stays cheap (no OpenCV, no Triton) until a name that needs
them is used:

    from sddusr_engine import Engine
    engine = Engine.from_pretrained()          # shipped weights; device/dtype/backend "auto"
    sr = engine.super_resolve(wide, tele)      # RGB arrays in, RGB array out
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import PRESETS, ModelConfig, get_config
from .errors import SddusrError

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Engine",
    "ModelConfig",
    "SddusrError",
    "build_model",
    "estimate_footprint",
    "get_config",
    "load_model",
]

if TYPE_CHECKING:
    from .engine import Engine
    from .registration import estimate_footprint
    from .weights import load_model


def build_model(variant: str = "sddusr", **overrides: Any):
    """Build the `variant` network ("sddusr" or "kedusr") with config fields overridden."""
    from .model.network import build_model as _build

    return _build(variant, **overrides)


_LAZY = {
    "Engine": ("engine", "Engine"),
    "estimate_footprint": ("registration", "estimate_footprint"),
    "load_model": ("weights", "load_model"),
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        module, attr = _LAZY[name]
        return getattr(import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'sddusr_engine' has no attribute {name!r}")

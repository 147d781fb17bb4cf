"""sddusr-engine: dual-lens (wide + telephoto) x2 super-resolution with SDDuSR and KeDuSR."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import PRESETS, ModelConfig, get_config

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Engine",
    "ModelConfig",
    "build_model",
    "estimate_footprint",
    "get_config",
]

if TYPE_CHECKING:
    from .engine import Engine
    from .registration import estimate_footprint


def build_model(variant: str = "sddusr", **overrides: Any):
    """Build the `variant` network ("sddusr" or "kedusr") with config fields overridden."""
    from .model.network import build_model as _build

    return _build(variant, **overrides)


def __getattr__(name: str):
    # Lazy: importing the package stays cheap (no cv2, no triton) until these are used.
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "estimate_footprint":
        from .registration import estimate_footprint

        return estimate_footprint
    raise AttributeError(f"module 'sddusr_engine' has no attribute {name!r}")

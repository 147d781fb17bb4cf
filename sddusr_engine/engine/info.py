"""RunInfo: what one engine call did (stage timings, registration, SFM statistics, maps)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..geometry import Box


@dataclass
class RunInfo:
    """What one call did: stage timings (ms), registration, SFM statistics, optional maps."""

    timings: dict[str, float] = field(default_factory=dict)
    tile: int = 0
    footprint: Any = None  # registration.Footprint for raw pairs
    box_lr: Box | None = None  # where LRC lies in LR, in LR pixels (y0, y1, x0, x1)
    mask_fraction_lr: float | None = None
    mask_fraction_lrc: float | None = None
    matching: dict[str, Any] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ensemble: int = 1  # passes averaged (geometric self-ensemble); timings are their sums
    adapt_steps: int = 0  # self-adaptation steps run (0: none)
    fusion_maps: bool = False  # tiles kept the fusion maps: the 2x stage ran once (engine.memory)
    host_maps: bool = False  # the whole maps lived in host memory, tiles crossed to the device

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("footprint", "maps")}
        fp = self.footprint
        if fp is not None:
            d["footprint"] = {
                "homography": np.asarray(fp.homography).tolist(),
                "corners": np.asarray(fp.corners).tolist(),
                "confidence": float(fp.confidence),
                "inliers": int(fp.inliers),
                "zoom": float(fp.zoom),
                "rotation_deg": float(fp.rotation_deg),
                "method": fp.method,
                # the verification's bound on the corner error, wide pixels (None: not verified)
                "corner_error_px": None if np.isnan(fp.corner_error_px) else fp.corner_error_px,
                "zoom_prior": fp.zoom_prior,
                "notes": fp.notes,
            }
        d["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return d

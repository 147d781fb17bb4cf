"""Model configuration: one dataclass and its named presets.

`sddusr` is the paper's network (KeDuSR + Sparse Feature Matching + Token Dictionary Learning);
`kedusr` is the published KeDuSR network, whose released state dicts load into it strictly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

VARIANTS = ("sddusr", "kedusr")
CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "sddusr"
    channels: int = 64  # n: width of every feature map
    trunk_groups: int = 3
    trunk_blocks: int = 8  # residual blocks per trunk group
    encoder_blocks: int = 4  # LRC encoder, Ref encoder
    decoder_blocks: int = 4
    trunk_channel_attention: bool = True  # kedusr keeps the CA weights but never applies them
    ca_reduction: int = 16
    match_channels: int = 16  # channels of the matching map whose 3x3 patches are compared
    patch_size: int = 9  # warp patches on the Ref-feature grid
    patch_stride: int = 4
    use_sfm: bool = True  # Sparse Feature Matching (mask generator)
    mask_hidden: int = 32  # width of the mask generator
    use_tdl: bool = True  # Token Dictionary Learning
    tokens: int = 128  # N
    token_dim: int = 64  # d
    scale: int = 2
    # Add bicubic(LR) to the decoder's output (the last conv starts at zero, so an untrained
    # network is bicubic). Not in the paper or the published code (both False); the project's
    # shipped weights use it because it makes a short CPU training budget useful.
    global_skip: bool = False
    # Temperature of the training-form softmax over the LRC axis (paper eq. 3 uses the plain
    # softmax, i.e. 1). Cosines lie in [-1, 1], so at 1 the softmax over thousands of keys is
    # nearly uniform and the straight-through gradient barely shapes the matching features.
    match_temperature: float = 1.0
    # Channel order the weights were trained with: KeDuSR's release was trained on BGR images.
    channel_order: str = "rgb"
    # How the summed warp of overlapping patches becomes the fusion's detail input:
    # "constant" divides by the mean overlap and high-passes as the published code does;
    # "coverage" divides by the true overlap count and ignores the mask's holes
    # (matching.high_pass_covered). Not in the paper; weights record which they were trained with.
    warp_norm: str = "constant"
    # With "coverage": also pass the warp's low band (the part the detail map subtracts), scaled
    # by a learned per-channel gain that starts at zero (so the network starts as without it).
    # The detail map keeps only what lies above about 1/8 cycle per pixel; where the LR's own low
    # band is wrong (aliasing, JPEG) and the Ref's is right, the network could not take it from
    # the Ref. Not in the paper; weights record it.
    warp_low_band: bool = False
    # Low-band projection (engine/postprocess.py, model/low_band.py): outside the telephoto's footprint, the
    # engine takes the output's band below `low_band_sigma` HR pixels from a linear x2
    # upsampler of `low_band_taps` x `low_band_taps` LR taps, fitted on the training pairs and
    # stored in the weights. 0 and 0.0: off. Not in the paper; weights record it.
    low_band_taps: int = 0
    low_band_sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {VARIANTS}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(
                f"unknown channel order {self.channel_order!r}; expected one of {CHANNEL_ORDERS}"
            )
        if self.warp_norm not in ("constant", "coverage"):
            raise ValueError(f"warp_norm must be 'constant' or 'coverage', got {self.warp_norm!r}")
        if self.warp_low_band and self.warp_norm != "coverage":
            raise ValueError('warp_low_band needs warp_norm="coverage"')
        if (self.low_band_taps > 0) != (self.low_band_sigma > 0):
            raise ValueError("low_band_taps and low_band_sigma must both be set, or both be 0")
        if self.low_band_taps and self.low_band_taps % 2 == 0:
            raise ValueError(f"low_band_taps must be odd, got {self.low_band_taps}")
        if self.scale != 2:
            raise ValueError(f"only x2 is supported, got scale={self.scale}")
        if self.channels % self.ca_reduction:
            raise ValueError(
                f"channels ({self.channels}) must be a multiple of ca_reduction ({self.ca_reduction})"
            )

    @property
    def fusion_channels(self) -> int:
        """Channels entering the fusion block (paper eq. 1 for sddusr; cat(hf*gate, F_LR) for kedusr)."""
        return 3 * self.channels if self.variant == "sddusr" else 2 * self.channels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config fields: {', '.join(unknown)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    "sddusr": ModelConfig(variant="sddusr"),
    "kedusr": ModelConfig(
        variant="kedusr",
        trunk_channel_attention=False,
        use_sfm=False,
        use_tdl=False,
        channel_order="bgr",
    ),
}


def get_config(variant: str = "sddusr", **overrides: Any) -> ModelConfig:
    """The preset named `variant`, with any fields overridden."""
    if variant not in PRESETS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {tuple(PRESETS)}")
    return replace(PRESETS[variant], **overrides)

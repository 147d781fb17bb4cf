"""Flow-guided modulated deformable alignment of the Ref features onto the LRC-feature grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import conv3x3
from .flow import flow_warp


class DeformConvPack(nn.Module):
    """Modulated deformable 3x3 conv whose offsets and masks are predicted by `conv_offset`.

    Offsets are 15*tanh(.) around the flow, as in the published code. The deformable convolution
    itself comes from `ops` (the PyTorch reference, or the Triton kernel on a GPU).
    """

    MAX_RESIDUE = 15.0

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.conv_offset = conv3x3(channels, 3 * groups * 9)
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        # Start from the flow alone: zero residual offsets, masks at 0.5.
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    @property
    def offset_channels(self) -> slice:
        """The output channels of `conv_offset` that are offsets (o1, o2); the rest are masks."""
        return slice(0, 2 * self.groups * 9)

    def forward(self, x, feat, flow, deform_conv2d, rows: slice | None = None, row0=None):
        """`rows`, `row0`: the band of output rows from row0 whose context `feat` holds at `rows`
        of its rows (and `flow` holds the band); x stays whole."""
        o = self.conv_offset(feat)
        o1, o2, m = torch.chunk(o if rows is None else o[..., rows, :], 3, dim=1)
        # flow is (dx, dy); offsets are (dy, dx) per group and tap, hence the flip.
        offset = self.MAX_RESIDUE * torch.tanh(torch.cat([o1, o2], dim=1))
        offset = offset + flow.flip(1).repeat(1, offset.shape[1] // 2, 1, 1)
        mask = torch.sigmoid(m)
        band = {} if row0 is None else {"row0": row0}
        return deform_conv2d(x, offset, mask, self.weight, self.bias, padding=1, **band)


class FlowGuidedAlign(nn.Module):
    """F_Ref_align = lrelu0.1(DCN(F_Ref; offsets from cat(warp(F_Ref), F_LRC, flow)))."""

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        self.offset_conv1 = conv3x3(2 * channels + 2, channels)
        self.offset_conv2 = conv3x3(channels, channels)
        self.dcnpack = DeformConvPack(channels, groups)

    # rows of context a band needs: offset_conv1, offset_conv2 and conv_offset are 3x3 convs
    HALO = 3

    def forward(self, f_ref, f_lrc, flow_lrc, deform_conv2d) -> torch.Tensor:
        """f_ref, f_lrc: [B,C,2h,2w]; flow_lrc: [B,2,h,w] at LRC resolution."""
        return self.band(f_ref, f_lrc, self.upsampled_flow(flow_lrc), 0, None, deform_conv2d)

    def band(
        self, f_ref, f_lrc_rows, flow_rows, a0: int, rows: slice | None, deform_conv2d, ref0=0
    ):
        """`forward`'s output rows a0 + rows.start .. a0 + rows.stop, given F_LRC and the x2 flow
        (`upsampled_flow`) for Ref rows a0 .. (the band and `HALO` rows around it, clipped to
        the map) and F_Ref's rows from `ref0` on: the whole map, or the rows `reach` names
        (the flow's warp and the deformable samples reach no further). The offset convolutions'
        maps (2C + 2, C, C and 27 x groups channels per pixel) then exist for one band at a
        time. `rows` None: all of them (`forward`)."""
        warped = flow_warp(f_ref, flow_rows, row0=a0 - ref0)
        feat = torch.cat([warped, f_lrc_rows, flow_rows], dim=1)
        feat = F.leaky_relu(self.offset_conv1(feat), 0.1)
        feat = F.leaky_relu(self.offset_conv2(feat), 0.1)
        if rows is None:
            return F.leaky_relu(self.dcnpack(f_ref, feat, flow_rows, deform_conv2d), 0.1)
        out = self.dcnpack(
            f_ref, feat, flow_rows[..., rows, :], deform_conv2d, rows, a0 + rows.start - ref0
        )
        return F.leaky_relu(out, 0.1)

    def reach(self, flow_rows: torch.Tensor, a0: int, height: int) -> tuple[int, int]:
        """The rows lo:hi of F_Ref (`height` rows) that `band` reads for Ref rows a0.. given
        their x2 flow: where the flow's warp points (bilinear: one row either side) and where
        the deformable taps can land (the 3x3 kernel's row and `MAX_RESIDUE` around the flow),
        always including the band's own rows. Reading only those rows gives the same output."""
        ys = torch.arange(a0, a0 + flow_rows.shape[-2], device=flow_rows.device)
        target = flow_rows[:, 1] + ys.to(flow_rows.dtype)[:, None]
        margin = int(DeformConvPack.MAX_RESIDUE) + 3  # the kernel's row, bilinear, rounding
        low, high = torch.stack([target.min().floor(), target.max().ceil()]).tolist()  # one sync
        lo, hi = int(low) - margin, int(high) + margin + 1
        return max(min(lo, a0), 0), min(max(hi, a0 + flow_rows.shape[-2]), height)

    @staticmethod
    def upsampled_flow(flow_lrc: torch.Tensor) -> torch.Tensor:
        """The LRC-resolution flow on the Ref grid, in Ref pixels (as `forward` uses it)."""
        return 2.0 * F.interpolate(flow_lrc, scale_factor=2, mode="bilinear", align_corners=True)

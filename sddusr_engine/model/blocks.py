"""Building blocks shared by both networks: residual blocks, attention gates, pixel shuffle.

Module and parameter names follow the published KeDuSR code so that its state dicts load strictly.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)


def lrelu(x: torch.Tensor, slope: float = 0.2) -> torch.Tensor:
    return F.leaky_relu(x, slope)


def _in_place() -> bool:
    """Whether blocks may compute in place: in inference, where no autograd graph needs the
    intermediate maps. Same values (x + y and y + x round alike), fewer maps alive at once: each
    activation and residual sum is written into the map that holds its input, not a new one."""
    return not torch.is_grad_enabled()


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: global mean, 1x1 C -> C/r, ReLU, 1x1 back, sigmoid, scale.

    `pooled` lets a tiled caller supply the whole image's channel means, so that a tile's output
    equals the whole-image pass (the global mean is the only non-local operation in the network).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        return x * self.scale(x, pooled)

    def scale(self, x: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The per-channel factors [B,C,1,1] that `forward` multiplies x by."""
        if pooled is None:
            pooled = x.mean(dim=(2, 3), keepdim=True)  # [B,C,1,1]
        return self.conv_du(pooled)


class SpatialAttention(nn.Module):
    """cat(channel max, channel mean) -> conv 2->1 7x7 -> ReLU -> sigmoid -> scale."""

    def __init__(self):
        super().__init__()
        self.spatial = nn.Conv2d(2, 1, 7, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(F.relu(self.spatial(stats)))


class ResBlock(nn.Module):
    """Encoder/decoder block: x + conv2(lrelu(conv1(x))), no activation after conv2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _in_place():
            return self.conv2(F.leaky_relu_(self.conv1(x), 0.2)).add_(x)
        return x + self.conv2(lrelu(self.conv1(x)))


class ResList(nn.Module):
    """Residual blocks, a tail conv, plus the list's input (encoders, decoder, trunk groups)."""

    def __init__(
        self, channels: int, num_blocks: int, block: Callable[[int], nn.Module] = ResBlock
    ):
        super().__init__()
        self.RBs = nn.ModuleList(block(channels) for _ in range(num_blocks))
        self.conv_tail = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for block in self.RBs:
            y = block(y)
        if _in_place():
            return self.conv_tail(y).add_(x)
        return x + self.conv_tail(y)


class TrunkBlock(nn.Module):
    """Trunk block: x + lrelu(conv2(CA(lrelu(conv1(x))))); KeDuSR holds the CA but skips it."""

    def __init__(self, channels: int, reduction: int, use_attention: bool):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)
        self.channel_attention = ChannelAttention(channels, reduction)
        self.use_attention = use_attention

    def pool_input(self, x: torch.Tensor) -> torch.Tensor:
        """The map whose global channel mean the channel attention pools."""
        return lrelu(self.conv1(x))

    def forward(self, x: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """`pooled` [B,C,1,1]: the whole image's mean of `pool_input(x)`, for a tiled caller."""
        if _in_place():
            y = F.leaky_relu_(self.conv1(x), 0.2)
            if self.use_attention:
                y.mul_(self.channel_attention.scale(y, pooled))
            return F.leaky_relu_(self.conv2(y), 0.2).add_(x)
        y = lrelu(self.conv1(x))
        if self.use_attention:
            y = self.channel_attention(y, pooled)
        return x + lrelu(self.conv2(y))


class Trunk(nn.Module):
    """The LR feature trunk: head conv, groups, tail conv, plus the head output (runs at LR)."""

    def __init__(
        self, channels: int, groups: int, blocks: int, reduction: int, use_attention: bool
    ):
        super().__init__()
        self.head = conv3x3(3, channels)
        block = partial(TrunkBlock, reduction=reduction, use_attention=use_attention)
        for i in range(groups):  # a group: trunk blocks, a tail conv, plus the group input
            self.add_module(f"body{i + 1}", ResList(channels, blocks, block))
        self.num_groups = groups
        self.tail = conv3x3(channels, channels)

    def groups(self) -> list[ResList]:
        return [getattr(self, f"body{i + 1}") for i in range(self.num_groups)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.head(x)
        y = head
        for group in self.groups():
            y = group(y)
        if _in_place():
            return self.tail(y).add_(head)
        return head + self.tail(y)


class PixelShuffleUp(nn.Module):
    """conv 3x3 to 4C channels, then pixel_shuffle(2); no activation."""

    def __init__(self, channels: int):
        super().__init__()
        self.upsample_conv = conv3x3(channels, 4 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.upsample_conv(x), 2)


class FusionBlock(nn.Module):
    """out = CA(SA(lrelu(conv1 x))); x + lrelu(conv2 out).  `pooled` feeds CA in tiled runs."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)
        self.spatial_attention = SpatialAttention()
        self.channel_attention = ChannelAttention(channels, reduction)

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """The map whose global channel mean the channel attention pools."""
        return self.spatial_attention(lrelu(self.conv1(x)))

    def forward(self, x: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        return self.finish(x, self.gated(x), pooled)

    def finish(
        self, x: torch.Tensor, gated: torch.Tensor, pooled: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The block's output from its input `x` and `gated(x)`, computed before."""
        return x + lrelu(self.conv2(self.channel_attention(gated, pooled)))


class MeanShift(nn.Conv2d):
    """Fixed 1x1 conv computing (x - mean) / std per channel, in the tensor's channel order."""

    def __init__(self, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__(3, 3, 1)
        # from Python lists, with no tensor arithmetic: under the loader's torch.device("meta")
        # an op such as torch.diag imports torch's reference decompositions, 1.5 s of every start
        diag = [[[[1.0 / std[i] if i == j else 0.0]] for j in range(3)] for i in range(3)]
        with torch.no_grad():
            self.weight.copy_(torch.tensor(diag))
            self.bias.copy_(torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]))
        for p in self.parameters():
            p.requires_grad_(False)

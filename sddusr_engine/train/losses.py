"""Training losses (paper 3.4): L = L_rec + 1e-3 L_mask + 1e-3 L_per + 1e-4 L_adv.

- `charbonnier`: L_rec, mean of sqrt((sr - hr)^2 + eps^2) (or the squared error: `rec="mse"`).
- `mask_label` / `mask_loss`: detail of each HR pixel = sum over channels |HR - up(down(HR))|
  (bicubic x2 down, then up, align_corners=False), average-pooled onto the mask grid; label 1 above
  the per-image median, else 0; L_mask = MSE(mask probability, label).
- `PerceptualLoss`: L1 between VGG19 features before the last activation (conv5_4, as ESRGAN),
  from a user-supplied weights file in torchvision's key layout (`features.N.weight`). Nothing is
  downloaded; without a file the term is simply off.
- `Discriminator` (ESRGAN's VGG-style discriminator, adaptive pooling so any input size works)
  and `relativistic_gan_losses` (RaGAN with BCE-with-logits).
- `matching_loss` (not in the paper; weight 0 by default): cross-entropy of the patch-matching
  softmax against the known correspondence of synthetic pairs, whose LRC is an exact crop of LR.
  Without it the from-scratch matching descriptors stay nearly uniform (weights/MODEL_CARD.md).
- `flow_photometric_loss` (not in the paper; weight 0 by default): unsupervised alignment for a
  SpyNet trained from scratch (colour-standardised warp error plus flow smoothness).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Discriminator",
    "LossWeights",
    "PerceptualLoss",
    "REC_LOSSES",
    "SDDuSRLoss",
    "charbonnier",
    "flow_epe_loss",
    "flow_photometric_loss",
    "mask_label",
    "mask_loss",
    "matching_loss",
    "matching_targets",
    "relativistic_gan_losses",
]


def charbonnier(sr: torch.Tensor, hr: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean(sqrt((sr - hr)^2 + eps^2)); equal tensors give exactly eps."""
    if sr.shape != hr.shape:
        raise ValueError(f"charbonnier: sr {tuple(sr.shape)} and hr {tuple(hr.shape)} differ")
    return torch.sqrt((sr - hr).square() + eps * eps).mean()


def hr_detail(hr: torch.Tensor) -> torch.Tensor:
    """Σ_c |HR − up(down(HR))|, bicubic x2 both ways: [B,3,H,W] -> [B,1,H,W]."""
    h, w = hr.shape[-2:]
    down = F.interpolate(hr, scale_factor=0.5, mode="bicubic", align_corners=False, antialias=True)
    up = F.interpolate(down, size=(h, w), mode="bicubic", align_corners=False)
    return (hr - up).abs().sum(dim=1, keepdim=True)


@torch.no_grad()
def mask_label(hr: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Binary "high frequency" label on the mask grid: [B,3,H,W] -> float [B,1,gh,gw].

    The detail map is average-pooled onto `grid_hw` (adaptive pooling, so grids that do not divide
    the image still work); label 1 where it is above the image's median, else 0. `torch.median`
    returns the lower middle value, so with distinct values exactly floor(n/2) positions are 1.
    """
    d = F.adaptive_avg_pool2d(hr_detail(hr.float()), grid_hw)
    med = d.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
    return (d > med).to(hr.dtype)


def mask_loss(mask_prob: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """MSE between the mask generator's P(high) [B,1,gh,gw] and `mask_label(hr, (gh, gw))`."""
    if mask_prob.dim() != 4 or mask_prob.shape[1] != 1:
        raise ValueError(f"mask_prob must be [B,1,gh,gw], got {tuple(mask_prob.shape)}")
    label = mask_label(hr, tuple(mask_prob.shape[-2:]))
    return F.mse_loss(mask_prob, label.to(mask_prob.dtype))


# --------------------------------------------------------------------------------------------
# Perceptual loss: VGG19 features from a user-supplied file
# --------------------------------------------------------------------------------------------

# torchvision's vgg19 `features` layout: conv channels, "M" = max-pool.
_VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]  # fmt: skip
CONV5_4 = 34  # index of conv5_4 in `features` (relu5_4 is 35)


def _vgg19_features(last: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
            cin = v
    return nn.Sequential(*layers[: last + 1])


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key in ("state_dict", "params_ema", "params", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


class PerceptualLoss(nn.Module):
    """L1 between VGG19 features (up to `layer`, default conv5_4 = before its ReLU, as ESRGAN) of
    SR and HR. Inputs in [0,1] RGB are normalised with ImageNet's mean/std. Frozen weights.

    `vgg19_weights_path`: .pth/.pt or .safetensors with keys `features.N.weight/bias` (torchvision
    layout; classifier keys are ignored). Raises FileNotFoundError / ValueError naming the
    problem (missing file, missing or mis-shaped keys).
    """

    def __init__(self, vgg19_weights_path: str | os.PathLike, layer: int = CONV5_4):
        super().__init__()
        path = Path(vgg19_weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"VGG19 weights not found at {path}; the perceptual loss needs a local file "
                "(torchvision's vgg19 layout, features.N.weight) and never downloads one."
            )
        try:
            state = _load_state(path)
        except Exception as e:  # a corrupt or foreign file: say which one
            raise ValueError(f"could not read VGG19 weights from {path}: {e}") from e
        self.features = _vgg19_features(layer)
        want = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        missing = sorted(k for k in want if k not in state)
        bad = sorted(
            k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)
        )
        if missing or bad:
            raise ValueError(
                f"{path} is not a VGG19 state dict in torchvision's layout: "
                f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                f"wrong shape {[(k, tuple(state[k].shape)) for k in bad[:4]]}"
            )
        self.features.load_state_dict(
            {k.removeprefix("features."): state[k].float() for k in want}, strict=True
        )
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.features.eval()  # no BN/dropout, but keep it fixed regardless
        return self

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        f_sr = self.features((sr - self.mean) / self.std)
        with torch.no_grad():
            f_hr = self.features((hr - self.mean) / self.std)
        return F.l1_loss(f_sr, f_hr)


# --------------------------------------------------------------------------------------------
# Adversarial loss
# --------------------------------------------------------------------------------------------


class Discriminator(nn.Module):
    """ESRGAN's VGG-style discriminator (VGG128): 5 stages of (conv3 s1, conv4 s2) with BN and
    LeakyReLU(0.2), widths nf..8nf; adaptive average pooling to 4x4 makes any input >= 32 px work;
    then Linear(8nf*16 -> 100) -> LeakyReLU -> Linear(100 -> 1). [B,3,H,W] -> [B,1] logits."""

    def __init__(self, in_channels: int = 3, nf: int = 64):
        super().__init__()
        widths = [nf, nf * 2, nf * 4, nf * 8, nf * 8]
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, 1, 1, bias=i == 0)]
            if i > 0:
                layers.append(nn.BatchNorm2d(w))
            layers += [
                nn.LeakyReLU(0.2),
                nn.Conv2d(w, w, 4, 2, 1, bias=False),
                nn.BatchNorm2d(w),
                nn.LeakyReLU(0.2),
            ]
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(nn.Linear(cin * 16, 100), nn.LeakyReLU(0.2), nn.Linear(100, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def relativistic_gan_losses(
    real_logits: torch.Tensor, fake_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RaGAN (Jolicoeur-Martineau 2018, as ESRGAN): returns (generator loss, discriminator loss).

    D_ra(a, b) = a - mean(b).
    L_D = BCE(D_ra(real, fake), 1) + BCE(D_ra(fake, real), 0), halved;
    L_G = BCE(D_ra(real, fake), 0) + BCE(D_ra(fake, real), 1), halved.
    For the discriminator step pass `fake_logits` of detached SR; for the generator step both
    logits may carry gradients (the real ones through D only, which the generator step does not
    update).
    """
    bce = F.binary_cross_entropy_with_logits
    rf = real_logits - fake_logits.mean()
    fr = fake_logits - real_logits.mean()
    g = 0.5 * (bce(rf, torch.zeros_like(rf)) + bce(fr, torch.ones_like(fr)))
    d = 0.5 * (bce(rf, torch.ones_like(rf)) + bce(fr, torch.zeros_like(fr)))
    return g, d


# --------------------------------------------------------------------------------------------
# Matching supervision
# --------------------------------------------------------------------------------------------


def _cell_overlap(n_q: int, n_k: int, offset: torch.Tensor) -> torch.Tensor:
    """One axis: [B, n_q, n_k], the share of query cell i's two pixels that fall in key cell j.

    Matching cells are 2 pixels wide (the features are pooled 2x2). Query cell i covers LR-crop
    pixels 2i, 2i+1, i.e. LRC-crop pixels 2i - o, 2i + 1 - o; key cell j covers 2j, 2j + 1. An even
    offset gives one key with weight 1, an odd one two keys with 1/2 each.
    """
    px = 2 * torch.arange(n_q, device=offset.device)[None, :, None] - offset.view(-1, 1, 1)
    kx = 2 * torch.arange(n_k, device=offset.device)[None, None, :]
    hits = ((px >= kx) & (px <= kx + 1)).float() + ((px + 1 >= kx) & (px + 1 <= kx + 1)).float()
    return hits / 2


def matching_targets(
    q_hw: tuple[int, int], k_hw: tuple[int, int], offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft correspondence of query cells to key cells, and which queries have one.

    offset [B,2] (LR-crop pixels of the LRC crop's origin) -> (target [B, hq*wq, hk*wk] summing
    to 1 on valid rows, valid bool [B, hq*wq]: the query's pixels lie wholly inside the LRC crop).
    """
    wy = _cell_overlap(q_hw[0], k_hw[0], offset[:, 0])  # [B,hq,hk]
    wx = _cell_overlap(q_hw[1], k_hw[1], offset[:, 1])  # [B,wq,wk]
    b = offset.shape[0]
    target = torch.einsum("bik,bjl->bijkl", wy, wx).reshape(b, q_hw[0] * q_hw[1], -1)
    valid = (wy.sum(-1) == 1)[:, :, None] & (wx.sum(-1) == 1)[:, None, :]
    return target, valid.reshape(b, -1)


def matching_loss(
    q_map: torch.Tensor, k_map: torch.Tensor, offset: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Mean cross-entropy of softmax(cos / temperature) over all keys against the true cells.

    q_map [B,c,hq,wq] (LR crop), k_map [B,c,hk,wk] (LRC crop): the matching maps, descriptors as
    the network forms them (3x3 neighbourhoods, L2-normalised). Only queries whose true match lies
    inside the LRC crop count; a batch with none gives 0 (still attached to the graph).
    """
    from ..model.matching import batch_patch_descriptors

    target, valid = matching_targets(q_map.shape[-2:], k_map.shape[-2:], offset.to(q_map.device))
    sim = batch_patch_descriptors(q_map.float()) @ batch_patch_descriptors(k_map.float()).transpose(
        1, 2
    )
    nll = -(target * (sim / temperature).log_softmax(dim=-1)).sum(dim=-1)  # [B,Mq]
    if not bool(valid.any()):
        return sim.sum() * 0.0
    return nll[valid].mean()


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel: zero mean, unit deviation (removes exposure and white balance)."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)


def flow_photometric_loss(
    lrc: torch.Tensor,
    ref: torch.Tensor,
    flow: torch.Tensor,
    border: int = 2,
    smooth_weight: float = 0.1,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Unsupervised alignment loss for SpyNet (not in the paper; weight 0 by default).

    The flow [B,2,h,w] warps the Ref, average-pooled onto LRC's grid, onto LRC [B,3,h,w]; after
    per-channel standardisation (the telephoto's exposure and colour differ) the two should agree:
    Charbonnier of the difference, `border` pixels left out, plus `smooth_weight` times the mean
    absolute flow gradient (in pixels). No pretrained SpyNet can be had here, and a random one
    leaves the Ref as misaligned as registration left it.
    """
    from ..model.flow import flow_warp

    pooled = F.avg_pool2d(ref, 2)
    warped = flow_warp(pooled, flow, padding_mode="border")
    inner = (..., slice(border, -border or None), slice(border, -border or None))
    diff = _standardise(warped[inner]) - _standardise(lrc[inner])
    photo = torch.sqrt(diff.square() + eps * eps).mean()
    smooth = (flow[..., 1:, :] - flow[..., :-1, :]).abs().mean() + (
        flow[..., :, 1:] - flow[..., :, :-1]
    ).abs().mean()
    return photo + smooth_weight * smooth


def flow_epe_loss(flow: torch.Tensor, true_flow: torch.Tensor) -> torch.Tensor:
    """Mean end-point error (pixels) of a predicted flow [B,2,h,w] against the true one, for
    synthetic pairs that carry it (`data.make_pair` knows the geometry it rendered)."""
    return (flow - true_flow.to(flow)).square().sum(dim=1).add(1e-12).sqrt().mean()


# --------------------------------------------------------------------------------------------
# The total
# --------------------------------------------------------------------------------------------


# L_rec: the paper's Charbonnier (~L1: the per-pixel median), or the squared error, whose
# optimum is the per-pixel mean and so the highest PSNR (a last, short fine-tuning stage).
REC_LOSSES = ("charbonnier", "mse")


@dataclass(frozen=True)
class LossWeights:
    mask: float = 1e-3
    perceptual: float = 1e-3
    adversarial: float = 1e-4
    match: float = 0.0  # matching_loss; not in the paper, needs pairs with known geometry
    match_loss_temperature: float = 0.07
    flow: float = 0.0  # flow_photometric_loss; not in the paper
    flow_epe: float = 0.0  # flow_epe_loss against the true flow of synthetic pairs


class SDDuSRLoss(nn.Module):
    """L = L_rec + 1e-3 L_mask + 1e-3 L_per + 1e-4 L_adv (paper eq. 12).

    The perceptual term is on only when `vgg19_weights_path` is given; the adversarial term only
    with `adversarial=True` (then `self.discriminator` exists and `discriminator_loss` trains it).
    `forward(sr, hr, mask_prob=None, match=None, flow=None)` returns (total, dict of the
    detached terms);
    `match` = (query map, key map, offset) adds `w.match * matching_loss` when `w.match` > 0;
    `flow` = (LRC, Ref, flow[, true flow]) adds `w.flow * flow_photometric_loss` when `w.flow`
    > 0, and `w.flow_epe * flow_epe_loss` when the true flow is given and `w.flow_epe` > 0.
    """

    def __init__(
        self,
        vgg19_weights_path: str | os.PathLike | None = None,
        adversarial: bool = False,
        weights: LossWeights = LossWeights(),
        eps: float = 1e-3,
        rec: str = "charbonnier",
    ):
        super().__init__()
        if rec not in REC_LOSSES:
            raise ValueError(f"rec must be one of {REC_LOSSES}, got {rec!r}")
        self.w, self.eps, self.rec = weights, eps, rec
        self.perceptual = PerceptualLoss(vgg19_weights_path) if vgg19_weights_path else None
        self.discriminator = Discriminator() if adversarial else None

    def forward(
        self,
        sr: torch.Tensor,
        hr: torch.Tensor,
        mask_prob: torch.Tensor | None = None,
        match: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        flow: tuple[torch.Tensor, ...] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.rec == "mse":
            if sr.shape != hr.shape:
                raise ValueError(f"mse: sr {tuple(sr.shape)} and hr {tuple(hr.shape)} differ")
            rec = F.mse_loss(sr, hr)
        else:
            rec = charbonnier(sr, hr, self.eps)
        total = rec
        terms = {"rec": rec.detach()}
        if mask_prob is not None and self.w.mask:
            lm = mask_loss(mask_prob, hr)
            total = total + self.w.mask * lm
            terms["mask"] = lm.detach()
        if match is not None and self.w.match:
            lmatch = matching_loss(*match, temperature=self.w.match_loss_temperature)
            total = total + self.w.match * lmatch
            terms["match"] = lmatch.detach()
        if flow is not None and self.w.flow:
            lflow = flow_photometric_loss(*flow[:3])
            total = total + self.w.flow * lflow
            terms["flow"] = lflow.detach()
        if flow is not None and len(flow) > 3 and self.w.flow_epe:
            lepe = flow_epe_loss(flow[2], flow[3])
            total = total + self.w.flow_epe * lepe
            terms["flow_epe"] = lepe.detach()
        if self.perceptual is not None and self.w.perceptual:
            lp = self.perceptual(sr, hr)
            total = total + self.w.perceptual * lp
            terms["per"] = lp.detach()
        if self.discriminator is not None and self.w.adversarial:
            d = self.discriminator
            d.requires_grad_(False)
            g, _ = relativistic_gan_losses(d(hr).detach(), d(sr))
            d.requires_grad_(True)
            total = total + self.w.adversarial * g
            terms["adv_g"] = g.detach()
        terms["total"] = total.detach()
        return total, {k: float(v) for k, v in terms.items()}

    def discriminator_loss(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """The RaGAN discriminator loss on detached SR (for the discriminator's own optimizer)."""
        if self.discriminator is None:
            raise RuntimeError("SDDuSRLoss was built with adversarial=False")
        _, d = relativistic_gan_losses(self.discriminator(hr), self.discriminator(sr.detach()))
        return d

"""Weight surgery before training: loading another file's tensors, resetting or shifting the alignment, calibrating the reference path, freezing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch


def _zero_flow(model: torch.nn.Module) -> None:
    """No pretrained SpyNet can be downloaded here, and a random one predicts a shift of about a
    pixel everywhere. The Ref arrives coarsely aligned, so zero flow is the better start: zero the
    last conv of every pyramid level (each level then passes the coarser flow through)."""
    spynet = getattr(model, "spynet", None)
    for level in getattr(spynet, "basic_module", []):
        convs = [m for m in level.modules() if isinstance(m, torch.nn.Conv2d)]
        if convs:
            with torch.no_grad():
                convs[-1].weight.zero_()
                if convs[-1].bias is not None:
                    convs[-1].bias.zero_()


def init_from(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Copy every tensor of the weights file at `path` whose name and shape match `model`'s.

    A different configuration is allowed (e.g. a KeDuSR `.pth` into `sddusr`: the shared parts
    load, SFM and TDL start fresh); what was skipped is reported. Raises `WeightsError` for an
    unreadable file and ValueError when nothing matches.
    """
    from ..weights import read_weights

    state, src_cfg = read_weights(path)
    want = model.config.channel_order
    if src_cfg.channel_order != want:
        # Every layer that sees pixels (heads, SpyNet, matching features) would get its input
        # channels swapped; training feeds `want`-ordered images.
        raise ValueError(
            f"{path} was trained on {src_cfg.channel_order.upper()} images and this model on "
            f"{want.upper()}: set channel_order={src_cfg.channel_order} in --model to fine-tune it"
        )
    own = model.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not loaded:
        raise ValueError(f"{path}: no tensor matches this model's names and shapes")
    with torch.no_grad():
        for k, v in loaded.items():
            own[k].copy_(v.to(own[k].dtype))
    return {
        "init": str(path),
        "loaded": len(loaded),
        "fresh": sorted(set(own) - set(loaded)),
        "ignored": sorted(set(state) - set(loaded)),
    }


@torch.no_grad()
def calibrate_reference_path(model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Give the warped-reference input of the fusion the magnitude of the LR features, without
    changing what the network computes.

    The fusion sees gate * hf, with hf = 2 alpha (warp - lowpass(warp)) (`reference_detail`) and
    gate = alphaConf2X(C).
    From scratch, hf is ~50x smaller than F_LR and the gate ~0.03, so the warp enters the fusion
    ~1000x weaker than F_LR. Adam moves every weight by about the learning rate per step, so
    the scalar alpha and the gate's weights would need tens of thousands of steps to open the
    path, and the fusion weights reading it learn equally slowly. This multiplies the gate's
    last conv (a positive factor passes through its leaky ReLU) and alpha so that on `batch` the
    mean |gate| over positions with a warp is 1 and rms(gate * hf) = rms(F_LR), and divides the
    fusion weights that read gate * hf (the fusion block's first conv and, through its
    residual, the fusion tail) by the same total factor: the output is unchanged (to rounding),
    and the weights reading the path become as trainable as those reading F_LR. Returns the
    factors applied.
    """
    from ..model.network import MatchResult

    was_training = model.training
    model.train()
    lr, lrc, ref = (batch[k].to(next(model.parameters()).device) for k in ("lr", "lrc", "ref"))
    _, aux = model(lr, lrc, ref, return_aux=True)
    model.train(was_training)
    gate = model.confidence_gate(aux["confidence"])
    m = MatchResult(aux["warp_sum"], aux["confidence"], aux["index"], None, aux.get("mask_lr"))
    hf = model.reference_detail(m)
    has_warp = (aux["warp_sum"].abs().sum(1, keepdim=True) > 0).expand_as(gate)
    if not bool(has_warp.any()):
        raise ValueError("calibration batch has no matched position: nothing to calibrate")
    k_gate = 1.0 / float(gate[has_warp].abs().mean().clamp_min(1e-12))
    k_alpha = float(aux["f_lr"].square().mean().sqrt()) / float(
        (k_gate * gate * hf).square().mean().sqrt().clamp_min(1e-12)
    )
    gate_out = [m for m in model.alphaConf2X if isinstance(m, torch.nn.Conv2d)][-1]
    gate_out.weight.mul_(k_gate)
    gate_out.bias.mul_(k_gate)
    model.alpha.mul_(k_alpha)
    group = model.warp_channels
    total = k_gate * k_alpha
    fusion = model.AdaFuison
    fusion.conv1.weight[:, group] /= total
    # The block adds lrelu(conv2(...)) to its input, channel by channel: scale those output
    # channels up too (lrelu is positively homogeneous), so that the fusion tail, divided by
    # `total` on this group, sees exactly what it saw before.
    fusion.conv2.weight[group] *= total
    fusion.conv2.bias[group] *= total
    model.fusion_tail[0].weight[:, group] /= total
    return {"gate_factor": k_gate, "alpha_factor": k_alpha, "fusion_divisor": total}


def _zero_alignment(model: torch.nn.Module) -> None:
    """Back to the alignment's starting point: SpyNet predicts zero flow (`_zero_flow`) and the
    deformable conv adds no learned offset to it. For fine-tuning weights whose alignment went
    wrong (e.g. a SpyNet that drifted to flows of ~1000 px)."""
    _zero_flow(model)
    offset_conv = model.Ref_align.dcnpack.conv_offset
    with torch.no_grad():
        offset_conv.weight.zero_()
        offset_conv.bias.zero_()


@torch.no_grad()
def compensate_warp_shift(model: torch.nn.Module) -> dict[str, float]:
    """Move the deformable conv's residual offsets by -`patch_warp_shift` in both axes (through
    the bias of its offset conv), so that the aligned Ref features reach the output grid where
    they belong after the patch warp, which displaces them by +shift. The paper's network has to
    learn this from the reconstruction loss alone; started here, an exact match brings the right
    Ref pixel (`test_warp_shift_init_puts_exact_matches_in_place`). Not in the paper; changes
    the network's output."""
    from ..model.matching import patch_warp_shift

    dcn = model.Ref_align.dcnpack
    shift = patch_warp_shift()  # the network's warp: 9x9 patches at stride 4
    offsets = dcn.conv_offset.bias[dcn.offset_channels]
    t = torch.tanh(offsets) - shift / dcn.MAX_RESIDUE
    offsets.copy_(torch.atanh(t.clamp(-0.999, 0.999)))
    return {"warp_shift_px": float(-shift)}


def freeze_all_but(model: torch.nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Stop the gradient of every parameter whose name starts with none of `prefixes`; return
    the frozen names. With the LR path frozen, the loss can only fall through what is left (e.g.
    the reference path), which is how a path a network learned to ignore is re-opened."""
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unknown:
        raise ValueError(f"--train-only: no parameter starts with {', '.join(unknown)}")
    frozen = []
    for n, p in model.named_parameters():
        if not any(n.startswith(pre) for pre in prefixes):
            p.requires_grad_(False)
            frozen.append(n)
    return frozen

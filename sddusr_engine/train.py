"""Training loop (paper 4.1): Adam, cosine decay of the learning rate from `lr` to `lr_min` over
the run, random LR crops, batch 4, L_rec + 1e-3 L_mask (perceptual and adversarial terms optional).

- Resumes from `out/checkpoint.pt` (model, optimizer, scheduler, step, RNG states; discriminator
  too when adversarial): the resumed run reproduces the uninterrupted one, because the training
  sample k is a pure function of (seed, k) (see `data.DualLensDataset`) and the torch RNG (Gumbel
  noise of the mask) is restored.
- Logs every `log_every` steps to stdout and `out/log.jsonl`; validation PSNR (full image, vs the
  bicubic x2 of the LR) on the held-out `test` split every `val_every` steps.
- Runs on any torch device (`device="cuda"` on a GPU). `torch.use_deterministic_algorithms` is on
  (warn-only: ops without a deterministic kernel warn instead of failing). On the CPU a seeded run
  repeats bit for bit; on CUDA the backward passes of bicubic upsampling and grid_sample add in
  atomic order, so two seeded runs agree to ~2e-5 (relative loss, 24 steps, H200), not exactly.
  `--fast` gives up repeatability on CUDA for speed (cuDNN autotuning, TF32; `_backend_flags`).
- `--time-budget SECONDS` fits a run into a wall-clock budget: steps 6-15 are timed, `steps`
  shrinks to what fits, and the cosine follows; the log records the count for an exact rerun.
- Exports the final weights with `weights.save_weights` (safetensors, config in the metadata).

Entry point: `python -m sddusr_engine.train --data DIR --out DIR --steps N [...]`, or `train(cfg)`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .config import ModelConfig, get_config
from .data import DualLensDataset, Triplet, load_pairs, to_tensor
from .losses import REC_LOSSES, LossWeights, SDDuSRLoss
from .model.network import upsample_bicubic as bicubic_x2  # psnr() below clamps it

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything a run depends on (recorded in each checkpoint and in the log's first line)."""

    data: str
    out: str
    steps: int = 1000
    stop_after: int | None = None  # stop (checkpoint, export) at this step; schedule still `steps`
    time_budget: float | None = None  # seconds of stepping: after a probe, `steps` shrinks to fit
    batch_size: int = 4
    crop: int = 128  # LR crop side
    ctx: int | None = None  # LRC context side (Ref = 2x); default = crop
    p_center: float = 0.8  # share of crops overlapping the LRC context
    lr: float = 1e-4
    lr_min: float = 1e-6
    warmup: int = 0  # linear warm-up steps before the cosine
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads on CPU
    workers: int = 0
    fast: bool = False  # CUDA: cuDNN autotuning, TF32, nondeterministic kernels (_backend_flags)
    variant: str = "sddusr"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides
    mask_weight: float = 1e-3
    match_weight: float = 0.0  # losses.matching_loss (not in the paper): supervised matching
    match_temperature: float = 0.07
    vgg19: str | None = None  # VGG19 weights file: turns the perceptual term on
    perceptual_weight: float = 1e-3
    adversarial: bool = False
    adversarial_weight: float = 1e-4
    log_every: int = 10
    val_every: int = 500  # 0: never during training
    val_limit: int | None = None  # at most this many held-out pairs per validation
    val_split: str = "test"
    ckpt_every: int = 200
    resume: bool = True  # continue from out/checkpoint.pt when it exists
    export: str | None = None  # final weights; default out/weights.safetensors
    train_limit: int | None = None  # use only the first N training pairs (tests)
    zero_flow_init: bool = True  # fresh start: SpyNet predicts zero flow (see _zero_flow)
    init: str | None = None  # weights file to start from (fine-tuning); see init_from
    calibrate_reference: bool = False  # see calibrate_reference_path (fresh or --init runs)
    reset_alignment: bool = False  # with --init: SpyNet and the DCN offsets back to zero flow
    grow: bool = False  # with --init into a deeper config: new residual blocks start as identity
    flow_weight: float = 0.0  # losses.flow_photometric_loss (not in the paper)
    flow_epe_weight: float = 0.0  # losses.flow_epe_loss, pairs with a true flow (not in the paper)
    flow_pretrain: int = 0  # SpyNet-only steps on flow_epe_loss before step 1 (fresh/--init runs)
    warp_shift_init: bool = False  # DCN offsets start at -patch_warp_shift (compensate_warp_shift)
    train_only: tuple[str, ...] = ()  # parameter-name prefixes to train; empty = all (see freeze)
    ref_dropout: float = 0.0  # share of steps run with the reference switched off (not in paper)
    rec_loss: str = "charbonnier"  # L_rec: the paper's Charbonnier, or "mse" (PSNR fine-tuning)
    ref_noise: float = 0.0  # max std (8-bit levels) of noise added to half the Refs (not in paper)


# --------------------------------------------------------------------------------------------


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _backend_flags(device: torch.device, fast: bool):
    """The kernels' settings for one run, restored afterwards (they are process-wide).

    Default: deterministic algorithms (warn-only) and, on CUDA, no cuDNN autotuning, so a seeded
    run repeats. `fast` on CUDA trades that for speed: cuDNN picks the fastest convolution for
    each shape, matmuls and convolutions run in TF32 (10-bit mantissa products, fp32 sums), and
    ops keep their atomic-add kernels.
    """
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    fast = fast and device.type == "cuda"
    if device.type == "cuda" and not fast:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(not fast, warn_only=True)
    torch.backends.cudnn.benchmark = fast
    if fast:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[3:]


def _reference_dropped(cfg: TrainConfig, step: int) -> bool:
    """Whether step `step` (0-based) runs without the reference: a pure function of (seed, step),
    so a resumed run drops the same steps."""
    if not cfg.ref_dropout:
        return False
    return bool(np.random.default_rng([cfg.seed, 0x5EF, step]).uniform() < cfg.ref_dropout)


def _last_step(cfg: TrainConfig) -> int:
    """Where the run stops: `steps`, or `stop_after` when that comes first."""
    return cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)


def cosine_lambda(cfg: TrainConfig):
    """Multiplier of cfg.lr at each step: linear warm-up, then cosine down to lr_min at `steps`."""
    floor = cfg.lr_min / cfg.lr

    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        # cfg.steps is read at each call: a --time-budget run fixes it after its probe steps
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0,1] (computed on [0,255], no border shave)."""
    mse = F.mse_loss(a.clamp(0, 1).double() * 255, b.double() * 255).item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _channel_order(x: torch.Tensor, bgr: bool) -> torch.Tensor:
    """The data is RGB; a model configured for BGR (KeDuSR's convention) gets BGR tensors."""
    return x.flip(-3) if bgr else x


@torch.no_grad()
def validate(model: torch.nn.Module, pairs: Sequence[Triplet], device: str) -> dict[str, float]:
    """Mean PSNR over `pairs` in eval mode (the inference SFM): full image, SR and bicubic; and
    in the centre box, SR minus the same network with the reference switched off (the reference
    gain: 0 while the network ignores the telephoto)."""
    was_training = model.training
    model.eval()
    sr_db, bic_db, ref_gain, act = [], [], [], []
    bgr = model.config.channel_order == "bgr"
    for t in pairs:
        lr, hr, lrc, ref = (
            _channel_order(to_tensor(a)[None].to(device), bgr) for a in (t.lr, t.hr, t.lrc, t.ref)
        )
        sr, aux = model(lr, lrc, ref, return_aux=True)
        sr_db.append(psnr(sr, hr))
        bic_db.append(psnr(bicubic_x2(lr), hr))
        y0, y1, x0, x1 = t.box_hr
        centre = (..., slice(y0, y1), slice(x0, x1))
        no_ref = model(lr, None, None)
        ref_gain.append(psnr(sr[centre], hr[centre]) - psnr(no_ref[centre], hr[centre]))
        if aux.get("mask_lr") is not None:
            act.append(aux["mask_lr"].float().mean().item())
    model.train(was_training)
    out = {"val_psnr": float(np.mean(sr_db)), "val_psnr_bicubic": float(np.mean(bic_db))}
    out["val_gain_db"] = out["val_psnr"] - out["val_psnr_bicubic"]
    out["val_ref_gain_db"] = float(np.mean(ref_gain))
    if act:
        out["val_mask_active"] = float(np.mean(act))
    return out


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint (weights_only: only tensors and plain Python values inside)."""
    return torch.load(path, map_location="cpu", weights_only=True)


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
    from .weights import read_weights

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


def grow_identity(model: torch.nn.Module, fresh: list[str]) -> list[str]:
    """Make every residual block or group that `init_from` left wholly fresh an identity map, so
    that a deeper network (more trunk blocks or groups, more encoder/decoder blocks) starts out
    computing exactly what the loaded, shallower one did. Zeroing a block's last conv does it:
    x + lrelu(0) = x + 0 = x. The block's first conv gets gradient once the last one moves (the
    zero-initialised residual of Fixup/ReZero). Returns the zeroed convs' names; other fresh
    tensors (e.g. TDL when a kedusr file starts an sddusr model) are left as they are."""
    from .model.blocks import ResBlock, ResList, TrunkBlock

    fresh_set = set(fresh)
    last_conv = {TrunkBlock: "conv2", ResBlock: "conv2", ResList: "conv_tail"}
    zeroed: list[str] = []
    done: list[str] = []  # zeroed modules' prefixes: their sub-blocks stay random
    for name, module in model.named_modules():
        attr = last_conv.get(type(module))
        if attr is None or any(name.startswith(d + ".") for d in done):
            continue
        names = [f"{name}.{k}" for k, _ in module.named_parameters()]
        if not names or not all(n in fresh_set for n in names):
            continue
        conv = getattr(module, attr)
        with torch.no_grad():
            conv.weight.zero_()
            if conv.bias is not None:
                conv.bias.zero_()
        zeroed.append(f"{name}.{attr}")
        done.append(name)
    return zeroed


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
    from .model.network import MatchResult

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


def pretrain_flow(model: torch.nn.Module, ds: DualLensDataset, cfg: TrainConfig, log) -> None:
    """`cfg.flow_pretrain` Adam steps of SpyNet alone on the end-point error against the true
    flow, before the network trains: the reference branch then starts with aligned features.
    Samples come from indices past the main run's (deterministic in the seed like the rest)."""
    from .losses import flow_epe_loss

    if not ds.with_flow:
        raise ValueError("--flow-pretrain needs pairs with a true flow (Flow/ from data prepare)")
    device = next(model.parameters()).device
    spynet = model.spynet
    opt = torch.optim.Adam(spynet.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    start = 10**8 * cfg.batch_size  # disjoint from the main run's sample indices
    loader = DataLoader(
        ds,
        batch_size=cfg.batch_size,
        sampler=range(start, start + cfg.flow_pretrain * cfg.batch_size),
    )
    t0, acc = time.perf_counter(), []
    bgr = model.config.channel_order == "bgr"
    for k, batch in enumerate(loader, 1):
        lrc, ref = (_channel_order(batch[key].to(device), bgr) for key in ("lrc", "ref"))
        loss = flow_epe_loss(spynet(lrc, F.avg_pool2d(ref, 2)), batch["flow"].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc.append(loss.item())
        if k % cfg.log_every == 0 or k == cfg.flow_pretrain:
            log(
                {
                    "event": "flow_pretrain",
                    "step": k,
                    "epe": float(np.mean(acc)),
                    "elapsed_s": time.perf_counter() - t0,
                }
            )
            acc = []


def _zero_alignment(model: torch.nn.Module) -> None:
    """Back to the alignment's starting point: SpyNet predicts zero flow (`_zero_flow`) and the
    deformable conv adds no learned offset to it. For fine-tuning weights whose alignment went
    wrong (the first shipped weights' SpyNet had drifted to flows of ~1000 px)."""
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
    from .model.matching import patch_warp_shift

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


def model_config_of(cfg: TrainConfig) -> ModelConfig:
    return get_config(cfg.variant, **cfg.model)


def train(cfg: TrainConfig, on_log=None) -> Path:
    """Run (or resume) the training described by `cfg`; return the exported weights' path.

    `on_log(record: dict)`, if given, receives every log record (tests use it).
    """
    with _backend_flags(torch.device(cfg.device), cfg.fast):
        return _train(cfg, on_log)


def _train(cfg: TrainConfig, on_log) -> Path:
    from . import build_model

    cfg = dataclasses.replace(cfg)  # a --time-budget run changes its own copy's `steps`
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # denormals in fresh nets make CPU steps several times slower
    _seed_all(cfg.seed)

    mcfg = model_config_of(cfg)
    model = build_model(cfg.variant, **cfg.model).to(device).train()
    if cfg.zero_flow_init:
        _zero_flow(model)
    frozen = freeze_all_but(model, cfg.train_only) if cfg.train_only else []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(cfg))
    loss_fn = SDDuSRLoss(
        vgg19_weights_path=cfg.vgg19,
        adversarial=cfg.adversarial,
        weights=LossWeights(
            cfg.mask_weight,
            cfg.perceptual_weight,
            cfg.adversarial_weight,
            cfg.match_weight,
            cfg.match_temperature,
            cfg.flow_weight,
            cfg.flow_epe_weight,
        ),
        rec=cfg.rec_loss,
    ).to(device)
    d_opt = None
    if loss_fn.discriminator is not None:
        d_opt = torch.optim.Adam(
            loss_fn.discriminator.parameters(), lr=cfg.lr, betas=tuple(cfg.betas)
        )

    step = 0
    budget_resolved = False
    init_report: dict[str, Any] | None = None
    ckpt_path = out / CHECKPOINT
    if cfg.resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if ck["model_config"] != mcfg.to_dict():
            raise ValueError(
                f"{ckpt_path} was made with another model config: {ck['model_config']}"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if d_opt is not None and "discriminator" in ck:
            loss_fn.discriminator.load_state_dict(ck["discriminator"])
            d_opt.load_state_dict(ck["d_optimizer"])
        step = int(ck["step"])
        _set_rng_state(ck["rng"])
        if cfg.time_budget and ck.get("budget_steps"):
            cfg.steps = int(ck["budget_steps"])  # the length the interrupted run settled on
            budget_resolved = True
    elif cfg.init:
        init_report = init_from(model, cfg.init)
        if cfg.grow:
            init_report["grown"] = grow_identity(model, init_report["fresh"])
        if cfg.reset_alignment:
            _zero_alignment(model)
    shift_report = compensate_warp_shift(model) if step == 0 and cfg.warp_shift_init else None

    log_path = out / "log.jsonl"
    logf = log_path.open("a")

    def log(rec: dict[str, Any]) -> None:
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
        print(
            " ".join(
                f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
            ),
            flush=True,
        )
        if on_log:
            on_log(rec)

    log(
        {
            "event": "start",
            "step": step,
            "config": json.dumps(dataclasses.asdict(cfg)),
            "model_config": json.dumps(mcfg.to_dict()),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
    )
    if init_report:
        log({"event": "init", **init_report})
    if shift_report:
        log({"event": "warp_shift_init", **shift_report})
    if frozen:
        log({"event": "train_only", "prefixes": ",".join(cfg.train_only),
             "trainable": sum(p.numel() for p in params), "frozen_tensors": len(frozen)})  # fmt: skip

    pairs = load_pairs(cfg.data, "train", limit=cfg.train_limit)
    ds = DualLensDataset(
        pairs, crop=cfg.crop, ctx=cfg.ctx, seed=cfg.seed, p_center=cfg.p_center,
        ref_noise=cfg.ref_noise,
    )  # fmt: skip
    val_pairs = []
    if cfg.val_every and (Path(cfg.data) / cfg.val_split / "LR").is_dir():
        val_pairs = load_pairs(cfg.data, cfg.val_split, limit=cfg.val_limit)
    B = cfg.batch_size
    last_step = _last_step(cfg)
    loader = DataLoader(
        ds,
        batch_size=B,
        sampler=range(step * B, last_step * B),
        num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=False,
        pin_memory=device.type == "cuda",
    )

    def checkpoint() -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "rng": _rng_state(),
            "model_config": mcfg.to_dict(),
            "train_config": json.dumps(dataclasses.asdict(cfg)),
            "budget_steps": cfg.steps if budget_resolved else None,
        }
        if d_opt is not None:
            state["discriminator"] = loss_fn.discriminator.state_dict()
            state["d_optimizer"] = d_opt.state_dict()
        _save_checkpoint(ckpt_path, state)

    if step == 0 and cfg.flow_pretrain:
        pretrain_flow(model, ds, cfg, log)

    t_run = time.perf_counter()
    t_last, acc, seen, n_acc = t_run, {}, {}, 0
    bgr = mcfg.channel_order == "bgr"
    first_step, t_probe, val_total = step, None, 0.0
    for batch in loader:
        if step >= last_step:  # a --time-budget run can end before the sampler does
            break
        lr, hr, lrc, ref = (
            _channel_order(batch[k].to(device, non_blocking=True), bgr)
            for k in ("lr", "hr", "lrc", "ref")
        )
        if step == 0 and cfg.calibrate_reference:
            factors = calibrate_reference_path(model, {"lr": lr, "lrc": lrc, "ref": ref})
            log({"event": "calibrate_reference", **factors})
        dropped = _reference_dropped(cfg, step)
        if dropped:
            # the whole batch without its reference, as `--no-reference-ok` runs a pair: the
            # single-image path must stand alone. No matching term (nothing to match; an empty
            # context has no flow either) and no mask statistic (no query can be active).
            sr, aux = model(lr, None, None, return_aux=True)
            aux = {k: v for k, v in aux.items() if k not in ("query_map", "mask_lr")}
        else:
            sr, aux = model(lr, lrc, ref, return_aux=True)
        match = None
        if "offset" in batch and aux.get("query_map") is not None:
            match = (aux["query_map"], aux["key_map"], batch["offset"])
        flow = None
        if "flow" in aux:
            true_flow = batch["flow"].to(device) if "flow" in batch else None
            flow = (lrc, ref, aux["flow"]) + (() if true_flow is None else (true_flow,))
        loss, terms = loss_fn(sr, hr, aux.get("mask_prob_lr"), match, flow)
        if dropped:  # logged apart: avg_rec stays the loss with the reference
            terms["rec_no_ref"] = terms.pop("rec")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            terms["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        if d_opt is not None:
            d_loss = loss_fn.discriminator_loss(sr, hr)
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            terms["adv_d"] = float(d_loss)
        sched.step()
        step += 1
        if cfg.time_budget and not budget_resolved:
            if step - first_step == BUDGET_WARM_STEPS:
                _sync(device)
                t_probe = time.perf_counter()
            elif step - first_step == BUDGET_WARM_STEPS + BUDGET_PROBE_STEPS:
                _sync(device)
                now = time.perf_counter()
                per_step = (now - t_probe) / BUDGET_PROBE_STEPS
                left = cfg.time_budget - (now - t_run - val_total)
                cfg.steps = min(cfg.steps, step + max(0, int(left / per_step)))
                last_step = _last_step(cfg)
                budget_resolved = True
                # the rate for the next step was set on the old length: set it on the new one
                for g, base, fn in zip(
                    opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
                ):
                    g["lr"] = base * fn(sched.last_epoch)
                sched._last_lr = [g["lr"] for g in opt.param_groups]
                log({"event": "time_budget", "step": step, "steps": cfg.steps,
                     "probe_step_s": per_step})  # fmt: skip
        if aux.get("mask_lr") is not None:
            terms["mask_active"] = float(aux["mask_lr"].detach().float().mean())
        for k, v in terms.items():
            acc[k] = acc.get(k, 0.0) + v
            seen[k] = seen.get(k, 0) + 1  # a term can be absent (reference-dropped steps)
        n_acc += 1
        if step % cfg.log_every == 0 or step == last_step or step == 1:
            now = time.perf_counter()
            rec = {"step": step, "lr": sched.get_last_lr()[0], "loss": terms["total"]}
            rec.update({f"avg_{k}": v / seen[k] for k, v in acc.items()})
            rec["step_s"] = (now - t_last) / n_acc
            rec["elapsed_s"] = now - t_run
            log(rec)
            t_last, acc, seen, n_acc = now, {}, {}, 0
        if step % cfg.ckpt_every == 0 or step == last_step:
            checkpoint()
        if val_pairs and (step % cfg.val_every == 0 or step == last_step):
            t0 = time.perf_counter()
            rec = {"step": step, **validate(model, val_pairs, str(device))}
            rec["val_s"] = time.perf_counter() - t0
            log(rec)
            t_last += rec["val_s"]
            val_total += rec["val_s"]
    logf.close()
    export = Path(cfg.export) if cfg.export else out / "weights.safetensors"
    return _export(model, export, mcfg)


def _export(model: torch.nn.Module, path: Path, mcfg: ModelConfig) -> Path:
    from .weights import save_weights

    return save_weights(model, path, mcfg)


# --------------------------------------------------------------------------------------------


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    out: dict[str, Any] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or k not in types:
            raise SystemExit(f"--model expects KEY=VALUE with KEY a ModelConfig field, got {it!r}")
        t = str(types[k])
        if "bool" in t:
            out[k] = v.lower() in ("1", "true", "yes", "on")
        elif "int" in t:
            out[k] = int(v)
        elif "float" in t:
            out[k] = float(v)
        else:
            out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m sddusr_engine.train", description=__doc__.split("\n")[0]
    )
    d = TrainConfig(data="", out="")
    ap.add_argument("--data", required=True, help="dataset root in the KeDuSR layout")
    ap.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl, weights")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop and export at this step, keeping the schedule of --steps (resumable)",
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="fit the run into this much stepping time (validation not counted): after 15 "
        "steps, --steps shrinks to what fits and the cosine follows it; the log's time_budget "
        "event gives the step count, which --steps repeats exactly",
    )
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--crop", type=int, default=d.crop)
    ap.add_argument("--ctx", type=int, default=None)
    ap.add_argument("--p-center", type=float, default=d.p_center)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--lr-min", type=float, default=d.lr_min)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--grad-clip", type=float, default=None)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=d.workers, help="data-loading processes")
    ap.add_argument(
        "--fast",
        action="store_true",
        help="on CUDA: cuDNN autotuning, TF32 and nondeterministic kernels (faster; a seeded "
        "run then no longer repeats exactly)",
    )
    ap.add_argument("--variant", default=d.variant, choices=("sddusr", "kedusr"))
    ap.add_argument(
        "--model",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="ModelConfig overrides, e.g. channels=32 trunk_groups=2",
    )
    ap.add_argument(
        "--rec-loss",
        choices=REC_LOSSES,
        default=d.rec_loss,
        help="L_rec: charbonnier (the paper) or mse (squared error: its optimum is the highest "
        "PSNR; for a short last stage)",
    )
    ap.add_argument("--mask-weight", type=float, default=d.mask_weight)
    ap.add_argument(
        "--match-weight",
        type=float,
        default=d.match_weight,
        help="weight of the supervised matching loss (synthetic pairs; 0 = off, the paper)",
    )
    ap.add_argument("--match-temperature", type=float, default=d.match_temperature)
    ap.add_argument(
        "--init", default=None, help="weights file to start from (tensors matching by name+shape)"
    )
    ap.add_argument(
        "--reset-alignment",
        action="store_true",
        help="with --init: restart SpyNet and the deformable offsets from zero flow",
    )
    ap.add_argument(
        "--grow",
        action="store_true",
        help="with --init into a deeper --model (more trunk/encoder/decoder blocks or trunk "
        "groups): the new blocks start as identity, so training begins from the loaded network's "
        "output",
    )
    ap.add_argument(
        "--train-only",
        default="",
        metavar="PREFIXES",
        help="comma-separated parameter-name prefixes to train (e.g. AdaFuison,fusion_tail,"
        "ref_encoder); every other parameter is frozen",
    )
    ap.add_argument(
        "--warp-shift-init",
        action="store_true",
        help="start the deformable offsets at the patch warp's 2-px displacement, compensated "
        "(fresh or --init runs; not in the paper)",
    )
    ap.add_argument(
        "--flow-weight",
        type=float,
        default=d.flow_weight,
        help="weight of the unsupervised alignment loss on SpyNet's flow (0 = off, the paper)",
    )
    ap.add_argument(
        "--flow-epe-weight",
        type=float,
        default=d.flow_epe_weight,
        help="weight of SpyNet's end-point error against the true flow of synthetic pairs "
        "(0 = off; pairs from `sddusr_engine.data prepare` carry it in Flow/)",
    )
    ap.add_argument(
        "--flow-pretrain",
        type=int,
        default=0,
        metavar="STEPS",
        help="SpyNet-only steps on the true flow before step 1 (synthetic pairs with Flow/)",
    )
    ap.add_argument(
        "--calibrate-reference",
        action="store_true",
        help="before step 1, scale the warped-reference path up to the LR features' magnitude "
        "(output unchanged; the path then learns at the LR path's pace)",
    )
    ap.add_argument(
        "--ref-dropout",
        type=float,
        default=0.0,
        metavar="P",
        help="run this share of the steps with the reference switched off, so that the network "
        "also works without a telephoto (--no-reference-ok); not in the paper",
    )
    ap.add_argument(
        "--ref-noise",
        type=float,
        default=d.ref_noise,
        metavar="LEVELS",
        help="add Gaussian noise of std up to this many 8-bit levels to half the training Refs, "
        "so that the fusion learns to trust a noisy telephoto less; not in the paper",
    )
    ap.add_argument("--vgg19", default=None, help="VGG19 weights file: turns on L_per")
    ap.add_argument("--adversarial", action="store_true", help="turn on the RaGAN term")
    ap.add_argument("--log-every", type=int, default=d.log_every)
    ap.add_argument("--val-every", type=int, default=d.val_every)
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument(
        "--no-zero-flow-init", action="store_true", help="keep SpyNet's random initial flow"
    )
    ap.add_argument("--export", default=None)
    return ap


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Path:
    parser = parser or build_parser()
    a = parser.parse_args(argv)
    if a.grow and not a.init:
        parser.error("--grow needs --init: the weights file of the shallower network to grow from")
    cfg = TrainConfig(
        data=a.data,
        out=a.out,
        steps=a.steps,
        stop_after=a.stop_after,
        time_budget=a.time_budget,
        batch_size=a.batch_size,
        crop=a.crop,
        ctx=a.ctx,
        p_center=a.p_center,
        lr=a.lr,
        lr_min=a.lr_min,
        warmup=a.warmup,
        grad_clip=a.grad_clip,
        seed=a.seed,
        device=a.device,
        threads=a.threads,
        workers=a.workers,
        fast=a.fast,
        variant=a.variant,
        model=_parse_overrides(a.model),
        mask_weight=a.mask_weight,
        match_weight=a.match_weight,
        match_temperature=a.match_temperature,
        init=a.init,
        grow=a.grow,
        calibrate_reference=a.calibrate_reference,
        reset_alignment=a.reset_alignment,
        warp_shift_init=a.warp_shift_init,
        train_only=tuple(p for p in a.train_only.split(",") if p),
        flow_weight=a.flow_weight,
        flow_epe_weight=a.flow_epe_weight,
        flow_pretrain=a.flow_pretrain,
        ref_dropout=a.ref_dropout,
        rec_loss=a.rec_loss,
        ref_noise=a.ref_noise,
        vgg19=a.vgg19,
        adversarial=a.adversarial,
        log_every=a.log_every,
        val_every=a.val_every,
        val_limit=a.val_limit,
        ckpt_every=a.ckpt_every,
        resume=not a.no_resume,
        zero_flow_init=not a.no_zero_flow_init,
        export=a.export,
    )
    path = train(cfg)
    print(f"weights: {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()

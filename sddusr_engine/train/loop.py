"""The training loop (paper 4.1): Adam, cosine decay of the learning rate from `lr` to `lr_min`
over the run, random LR crops, batch 4, L_rec + 1e-3 L_mask (perceptual and adversarial terms
optional); validation, export, and the `python -m sddusr_engine.train` entry point.

- Resumes from `out/checkpoint.pt` (model, optimizer, scheduler, step, RNG states; discriminator
  too when adversarial): the resumed run reproduces the uninterrupted one, because the training
  sample k is a pure function of (seed, k) (see `data.DualLensDataset`) and the torch RNG (Gumbel
  noise of the mask) is restored.
- Logs every `log_every` steps to stdout and `out/log.jsonl`; validation PSNR (full image, vs the
  bicubic x2 of the LR) on the held-out `test` split every `val_every` steps, and as `phone_*` on
  its phone-like twin `test_phone` where the data has one.
- Runs on any torch device (`device="cuda"` on a GPU). `torch.use_deterministic_algorithms` is on
  (warn-only: ops without a deterministic kernel warn instead of failing). On the CPU a seeded run
  repeats bit for bit; on CUDA the backward passes of bicubic upsampling and grid_sample add in
  atomic order, so two seeded runs agree to ~2e-5 (relative loss, 24 steps, H200), not exactly.
  `--fast` gives up repeatability on CUDA for speed (cuDNN autotuning, TF32; `_backend_flags`).
- `--time-budget SECONDS` fits a run into a wall-clock budget: steps 6-15 are timed, `steps`
  shrinks to what fits, and the cosine follows; the log records the count for an exact rerun.
- Exports the final weights with `weights.save_weights` (safetensors, config in the metadata).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..config import ModelConfig, get_config
from ..data import DualLensDataset
from ..data.prepare import PHONE_SPLIT
from ..datasets import Triplet, load_triplets
from ..errors import TrainingError
from ..io import to_tensor
from ..metrics import psnr_tensor
from ..model.network import build_model, upsample_bicubic
from .checkpoint import (
    CHECKPOINT,
    _rng_state,
    _save_checkpoint,
    _seed_all,
    _set_rng_state,
    load_checkpoint,
)
from .config import TrainConfig, build_parser, config_from_args
from .losses import LossWeights, SDDuSRLoss, flow_epe_loss
from .surgery import (
    _zero_alignment,
    _zero_flow,
    calibrate_reference_path,
    compensate_warp_shift,
    freeze_all_but,
    init_from,
)

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
            _channel_order(to_tensor(a).to(device), bgr) for a in (t.lr, t.hr, t.lrc, t.ref)
        )
        sr, aux = model(lr, lrc, ref, return_aux=True)
        sr_db.append(psnr_tensor(sr, hr))
        bic_db.append(psnr_tensor(upsample_bicubic(lr), hr))
        y0, y1, x0, x1 = t.box_hr
        centre = (..., slice(y0, y1), slice(x0, x1))
        no_ref = model(lr, None, None)
        ref_gain.append(
            psnr_tensor(sr[centre], hr[centre]) - psnr_tensor(no_ref[centre], hr[centre])
        )
        if aux.get("mask_lr") is not None:
            act.append(aux["mask_lr"].float().mean().item())
    model.train(was_training)
    out = {"val_psnr": float(np.mean(sr_db)), "val_psnr_bicubic": float(np.mean(bic_db))}
    out["val_gain_db"] = out["val_psnr"] - out["val_psnr_bicubic"]
    out["val_ref_gain_db"] = float(np.mean(ref_gain))
    if act:
        out["val_mask_active"] = float(np.mean(act))
    return out


def pretrain_flow(model: torch.nn.Module, ds: DualLensDataset, cfg: TrainConfig, log) -> None:
    """`cfg.flow_pretrain` Adam steps of SpyNet alone on the end-point error against the true
    flow, before the network trains: the reference branch then starts with aligned features.
    Samples come from indices past the main run's (deterministic in the seed like the rest)."""

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


def model_config_of(cfg: TrainConfig) -> ModelConfig:
    try:
        return get_config(cfg.variant, **cfg.model)
    except (ValueError, TypeError) as e:  # a --model KEY=VALUE the configuration refuses
        raise TrainingError(f"--model: {str(e).rstrip('.')}.") from None


def train(cfg: TrainConfig, on_log=None) -> Path:
    """Run (or resume) the training described by `cfg`; return the exported weights' path.

    `on_log(record: dict)`, if given, receives every log record (tests use it).
    """
    with _backend_flags(torch.device(cfg.device), cfg.fast):
        return _train(cfg, on_log)


def _train(cfg: TrainConfig, on_log) -> Path:
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
            cfg.match_loss_temperature,
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

    pairs = load_triplets(cfg.data, "train", limit=cfg.train_limit)
    ds = DualLensDataset(
        pairs, crop=cfg.crop, ctx=cfg.ctx, seed=cfg.seed, p_center=cfg.p_center,
    )  # fmt: skip
    val_pairs, phone_pairs = [], []
    if cfg.val_every and (Path(cfg.data) / cfg.val_split / "LR").is_dir():
        val_pairs = load_triplets(cfg.data, cfg.val_split, limit=cfg.val_limit)
        # the same validation photos with a phone's degradations (data.prepare's test_phone/)
        if cfg.val_split == "test" and (Path(cfg.data) / PHONE_SPLIT / "LR").is_dir():
            phone_pairs = load_triplets(cfg.data, PHONE_SPLIT, limit=cfg.val_limit)
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
            if phone_pairs:
                phone = validate(model, phone_pairs, str(device))
                rec.update({f"phone_{k}": v for k, v in phone.items()})
            rec["val_s"] = time.perf_counter() - t0
            log(rec)
            t_last += rec["val_s"]
            val_total += rec["val_s"]
    logf.close()
    export = Path(cfg.export) if cfg.export else out / "weights.safetensors"
    return _export(model, export, mcfg)


def _export(model: torch.nn.Module, path: Path, mcfg: ModelConfig) -> Path:
    from ..weights import save_weights

    return save_weights(model, path, mcfg)


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Path:
    parser = parser or build_parser()
    a = parser.parse_args(argv)
    cfg = config_from_args(a)
    path = train(cfg)
    print(f"weights: {path}", file=sys.stderr)
    return path

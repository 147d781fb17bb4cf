"""What a training run depends on: `TrainConfig`, and the command-line parser generated from its
fields (each field's help, flag and argparse extras live in its `metadata`)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig
from .losses import REC_LOSSES


def _opt(help: str, cli: bool = True, **extra: Any) -> Any:
    """`field` metadata: `help`, and `extra` keys passed to `add_argument` (`flag` names an
    option other than `--field-name`; `convert` maps the parsed value onto the field's)."""
    return {"help": help, "cli": cli, **extra}


def parse_model_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings -> ModelConfig overrides, each value converted to the field's type."""
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


def _prefixes(text: str) -> tuple[str, ...]:
    return tuple(p for p in text.split(",") if p)


@dataclass
class TrainConfig:
    """Everything a run depends on (recorded in each checkpoint and in the log's first line)."""

    data: str = field(metadata=_opt("dataset root in the KeDuSR layout", required=True))
    out: str = field(metadata=_opt("run folder: checkpoint.pt, log.jsonl, weights", required=True))
    steps: int = field(default=1000, metadata=_opt("training steps (the cosine's length)"))
    stop_after: int | None = field(
        default=None,
        metadata=_opt("stop and export at this step, keeping the schedule of --steps (resumable)"),
    )
    time_budget: float | None = field(
        default=None,
        metadata=_opt(
            "fit the run into this much stepping time (validation not counted): after 15 "
            "steps, --steps shrinks to what fits and the cosine follows it; the log's "
            "time_budget event gives the step count, which --steps repeats exactly",
            metavar="SECONDS",
        ),
    )
    batch_size: int = field(default=4, metadata=_opt("crops per step"))
    crop: int = field(default=128, metadata=_opt("LR crop side"))
    ctx: int | None = field(
        default=None, metadata=_opt("LRC context side (Ref = 2x); default = crop")
    )
    p_center: float = field(
        default=0.8, metadata=_opt("share of crops overlapping the LRC context")
    )
    lr: float = field(default=1e-4, metadata=_opt("peak learning rate"))
    lr_min: float = field(default=1e-6, metadata=_opt("learning rate at the end of the cosine"))
    warmup: int = field(default=0, metadata=_opt("linear warm-up steps before the cosine"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=_opt("Adam", cli=False))
    seed: int = field(default=0, metadata=_opt("seed of the crops, the RNGs and the schedule"))
    device: str = field(default="cpu", metadata=_opt("torch device, e.g. cuda"))
    threads: int | None = field(default=None, metadata=_opt("torch.set_num_threads on CPU"))
    workers: int = field(default=0, metadata=_opt("data-loading processes"))
    fast: bool = field(
        default=False,
        metadata=_opt(
            "on CUDA: cuDNN autotuning, TF32 and nondeterministic kernels (faster; a seeded "
            "run then no longer repeats exactly)"
        ),
    )
    variant: str = field(
        default="sddusr", metadata=_opt("network variant", choices=("sddusr", "kedusr"))
    )
    model: dict[str, Any] = field(
        default_factory=dict,
        metadata=_opt(
            "ModelConfig overrides, e.g. channels=32 trunk_groups=2",
            nargs="*",
            metavar="KEY=VALUE",
            arg_default=[],
            convert=parse_model_overrides,
        ),
    )
    mask_weight: float = field(default=1e-3, metadata=_opt("weight of L_mask"))
    match_weight: float = field(
        default=0.0,
        metadata=_opt(
            "weight of the supervised matching loss (synthetic pairs; 0 = off, the paper)"
        ),
    )
    match_loss_temperature: float = field(
        default=0.07, metadata=_opt("softmax temperature of the matching loss")
    )
    vgg19: str | None = field(default=None, metadata=_opt("VGG19 weights file: turns on L_per"))
    perceptual_weight: float = field(default=1e-3, metadata=_opt("weight of L_per", cli=False))
    adversarial: bool = field(default=False, metadata=_opt("turn on the RaGAN term"))
    adversarial_weight: float = field(default=1e-4, metadata=_opt("weight of L_adv", cli=False))
    log_every: int = field(default=10, metadata=_opt("steps between log records"))
    val_every: int = field(
        default=500, metadata=_opt("steps between validations (0: never during training)")
    )
    val_limit: int | None = field(
        default=None, metadata=_opt("at most this many held-out pairs per validation")
    )
    val_split: str = field(default="test", metadata=_opt("held-out split", cli=False))
    ckpt_every: int = field(default=200, metadata=_opt("steps between checkpoints"))
    resume: bool = field(
        default=True,
        metadata=_opt("start afresh even when out/checkpoint.pt exists", flag="--no-resume"),
    )
    export: str | None = field(
        default=None, metadata=_opt("final weights file; default out/weights.safetensors")
    )
    train_limit: int | None = field(
        default=None, metadata=_opt("use only the first N training pairs", cli=False)
    )
    zero_flow_init: bool = field(
        default=True,
        metadata=_opt("keep SpyNet's random initial flow", flag="--no-zero-flow-init"),
    )
    init: str | None = field(
        default=None,
        metadata=_opt("weights file to start from (tensors matching by name+shape)"),
    )
    calibrate_reference: bool = field(
        default=False,
        metadata=_opt(
            "before step 1, scale the warped-reference path up to the LR features' magnitude "
            "(output unchanged; the path then learns at the LR path's pace)"
        ),
    )
    reset_alignment: bool = field(
        default=False,
        metadata=_opt("with --init: restart SpyNet and the deformable offsets from zero flow"),
    )
    flow_weight: float = field(
        default=0.0,
        metadata=_opt(
            "weight of the unsupervised alignment loss on SpyNet's flow (0 = off, the paper)"
        ),
    )
    flow_epe_weight: float = field(
        default=0.0,
        metadata=_opt(
            "weight of SpyNet's end-point error against the true flow of synthetic pairs "
            "(0 = off; pairs from `sddusr_engine.data prepare` carry it in Flow/)"
        ),
    )
    flow_pretrain: int = field(
        default=0,
        metadata=_opt(
            "SpyNet-only steps on the true flow before step 1 (synthetic pairs with Flow/)",
            metavar="STEPS",
        ),
    )
    warp_shift_init: bool = field(
        default=False,
        metadata=_opt(
            "start the deformable offsets at the patch warp's 2-px displacement, compensated "
            "(fresh or --init runs; not in the paper)"
        ),
    )
    train_only: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "comma-separated parameter-name prefixes to train (e.g. AdaFuison,fusion_tail,"
            "ref_encoder); every other parameter is frozen",
            metavar="PREFIXES",
            arg_type=str,
            arg_default="",
            convert=_prefixes,
        ),
    )
    ref_dropout: float = field(
        default=0.0,
        metadata=_opt(
            "run this share of the steps with the reference switched off, so that the network "
            "also works without a telephoto (--no-reference-ok); not in the paper",
            metavar="P",
        ),
    )
    rec_loss: str = field(
        default="charbonnier",
        metadata=_opt(
            "L_rec: charbonnier (the paper) or mse (squared error: its optimum is the highest "
            "PSNR; for a short last stage)",
            choices=REC_LOSSES,
        ),
    )


_ARGPARSE_KEYS = ("choices", "metavar", "nargs", "required")


def _scalar_type(annotation: Any) -> Callable[[str], Any]:
    """`int`, `float` or `str` from a field's annotation (`int | None` -> `int`)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def build_parser() -> argparse.ArgumentParser:
    """The `python -m sddusr_engine.train` parser, one option per CLI field of `TrainConfig`."""
    ap = argparse.ArgumentParser(
        prog="python -m sddusr_engine.train",
        description="Train an SDDuSR network on a dual-lens pairs folder.",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        kw: dict[str, Any] = {k: meta[k] for k in _ARGPARSE_KEYS if k in meta}
        kw["help"] = meta["help"]
        kw["dest"] = f.name
        if hints[f.name] is bool:
            kw["action"] = "store_false" if f.default else "store_true"
        else:
            kw["type"] = meta.get("arg_type", _scalar_type(hints[f.name]))
            if "nargs" in kw:
                kw.pop("type")
            if not kw.get("required"):
                kw["default"] = meta.get("arg_default", f.default)
        ap.add_argument(flag, **kw)
    return ap


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of a namespace from `build_parser()`."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        value = getattr(args, f.name)
        convert = f.metadata.get("convert")
        values[f.name] = convert(value) if convert else value
    return TrainConfig(**values)

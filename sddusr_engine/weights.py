"""Weights: load, convert and save.

One loader dispatches on the file's suffix:
- `.safetensors`: this project's format, the ModelConfig as JSON in the metadata key "config";
- `.pth` / `.pt`: a KeDuSR state dict (or any container holding one: `params_ema`, `state_dict`,
  ...), read with `weights_only=True`; its config is inferred from the tensors' names and shapes,
  and its channel order is BGR (KeDuSR's release was trained on BGR images).

Every key and shape is checked before anything is loaded, and a mismatch raises `WeightsError`
naming what is missing, unexpected or of the wrong shape: never a half-loaded model.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig, get_config
from .errors import WeightsError
from .io import atomic_output
from .shipped import default_weights

FORMAT_TAG = "sddusr-engine"
_CONTAINER_KEYS = ("params_ema", "params", "state_dict", "model", "net", "generator")
DEFAULT_WEIGHTS = default_weights()


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # safetensors raises its own error types for truncation and garbage
        raise WeightsError(
            f"{path} is not a readable safetensors file (it is damaged, truncated or of "
            "another kind)."
        ) from None
    return tensors, meta


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True and torch's own warnings kept off the user's screen."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # mmap needs the zip format; older pickled files load without it
            return torch.load(str(path), map_location="cpu", weights_only=True)


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = _torch_load(path)
    except Exception as e:
        # torch's text advises weights_only=False (running the file's code): never shown
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise WeightsError(
                f"{path} holds Python objects besides tensors (e.g. {found.group(1)}), which are "
                "not loaded because loading them could run code; save the state dict alone "
                "(torch.save(model.state_dict(), FILE))."
            ) from None
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint (it is damaged, truncated or of "
            "another kind)."
        ) from None
    for _ in range(3):  # unwrap nested containers
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise WeightsError(f"{path} holds no state dict of tensors.")
    return {re.sub(r"^(module\.)+", "", k): v for k, v in obj.items()}


def _count(prefix_re: str, keys) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(prefix_re, k))}
    return max(found) + 1 if found else 0


def infer_config(state_dict: dict[str, torch.Tensor], **fixed: Any) -> ModelConfig:
    """The ModelConfig implied by a state dict's names and shapes."""
    sd = state_dict
    try:
        n = sd["SISR.head.weight"].shape[0]
        fusion = sd["AdaFuison.conv1.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(
            f"not an SDDuSR/KeDuSR state dict: it has no tensor named {e.args[0]}."
        ) from None
    variant = fixed.pop("variant", "sddusr" if fusion == 3 * n else "kedusr")
    fields: dict[str, Any] = {
        "channels": n,
        "trunk_groups": _count(r"SISR\.body(\d+)\.", sd) - 1,  # groups are numbered from 1
        "trunk_blocks": _count(r"SISR\.body1\.RBs\.(\d+)\.", sd),
        "encoder_blocks": _count(r"ref_encoder\.RBs\.(\d+)\.", sd),
        "decoder_blocks": _count(r"decoder\.RBs\.(\d+)\.", sd),
        "match_channels": sd["feature_match.feature_extract.map.0.weight"].shape[0]
        if "feature_match.feature_extract.map.0.weight" in sd
        else 16,
        "use_sfm": "mask_generator.body.0.weight" in sd,
        "use_tdl": "tdl.d_lrc" in sd,
    }
    ca = sd.get("SISR.body1.RBs.0.channel_attention.conv_du.0.weight")
    if ca is not None:
        fields["ca_reduction"] = n // ca.shape[0]
    if fields["use_sfm"]:
        fields["mask_hidden"] = sd["mask_generator.body.0.weight"].shape[0]
    if fields["use_tdl"]:
        fields["tokens"], fields["token_dim"] = sd["tdl.d_lrc"].shape
    fields.update(fixed)
    return get_config(variant, **fields)


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError naming every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(state_dict[k].shape)}, network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    )
    if not (missing or unexpected or shapes):
        return

    def listing(title: str, items: list[str]) -> str:
        more = f" (and {len(items) - 8} more)" if len(items) > 8 else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:8]) + more

    msg = f"{source} does not match the {model.config.variant} network:"
    if missing:
        msg += listing("missing", missing)
    if unexpected:
        msg += listing("unexpected", unexpected)
    if shapes:
        msg += listing("wrong shape", shapes)
    raise WeightsError(msg)


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read a weights file into (state dict, config), without building a network."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
        if "config" in meta:
            try:
                config = ModelConfig.from_dict(json.loads(meta["config"]))
            except (ValueError, TypeError) as e:
                raise WeightsError(f"{path} carries an invalid config ({e}).") from None
        else:  # a plain state dict saved as safetensors: infer, as for .pth
            config = _inferred(path, tensors)
        return tensors, config
    if suffix in (".pth", ".pt", ".ckpt", ".bin"):
        tensors = _read_pth(path)
        return tensors, _inferred(path, tensors)
    raise WeightsError(
        f"{path}: unknown weights format {suffix!r}; expected .safetensors, .pth or .pt."
    )


def _inferred(path: Path, tensors: dict[str, torch.Tensor]) -> ModelConfig:
    try:
        return infer_config(tensors)
    except WeightsError as e:
        raise WeightsError(f"{path} is {e}") from None


def load_model(
    path: str | os.PathLike | None = None,
    variant: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Build the network described by the weights file and load it strictly.

    `variant`, if given, must match the file's; `path=None` loads the shipped default weights.
    """
    from .model.network import DualLensSR

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    tensors, config = read_weights(path)
    if variant is not None and variant != config.variant:
        raise WeightsError(
            f"{path} holds {config.variant!r} weights, but the {variant!r} network was asked for."
        )
    with torch.device("meta"):
        model = DualLensSR(config)
    check_state_dict(model, tensors, str(path))
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"{path} has non-finite values in {len(bad)} tensors, e.g. {bad[0]}.")
    model.load_state_dict(tensors, strict=True, assign=True)  # keeps fixed layers frozen
    return model.to(device=device, dtype=dtype).eval()


def save_weights(
    model_or_state: nn.Module | dict, path: str | os.PathLike, config: ModelConfig | None = None
) -> Path:
    """Write safetensors with the config in the metadata, atomically (temporary file, rename)."""
    from safetensors.torch import save_file

    if isinstance(model_or_state, nn.Module):
        config = config or model_or_state.config
        state = model_or_state.state_dict()
    else:
        state = model_or_state
    if config is None:
        raise ValueError("save_weights needs a config when given a bare state dict")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": FORMAT_TAG, "config": json.dumps(config.to_dict())}
    with atomic_output(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def convert_kedusr(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert a KeDuSR .pth checkpoint to safetensors (checked against the kedusr network)."""
    from .model.network import DualLensSR

    tensors, config = read_weights(src)
    if config.variant != "kedusr":
        raise WeightsError(f"{src} is not a KeDuSR checkpoint (it looks like {config.variant!r}).")
    with torch.device("meta"):
        model = DualLensSR(config)
    check_state_dict(model, tensors, str(src))
    return save_weights(tensors, dst, config)

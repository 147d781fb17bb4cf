"""Weights: safetensors round trip, KeDuSR .pth conversion, and clear errors for bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file
from support import TINY as _SHARED_TINY

from sddusr_engine import build_model
from sddusr_engine.engine import Engine
from sddusr_engine.weights import (
    WeightsError,
    convert_kedusr,
    load_model,
    read_weights,
    save_weights,
)

TINY = {
    **_SHARED_TINY,
    "trunk_groups": 2,
    "trunk_blocks": 2,
}  # deeper than the shared one: halos and group counts


def _inputs():
    return torch.rand(1, 3, 32, 40), torch.rand(1, 3, 16, 20), torch.rand(1, 3, 32, 40)


def test_safetensors_round_trip_keeps_config_and_output(tmp_path):
    model = build_model("sddusr", **TINY).eval()
    path = save_weights(model, tmp_path / "w.safetensors")
    assert not list(tmp_path.glob("*.tmp"))  # atomic: no temporary left behind
    loaded = load_model(path)
    assert loaded.config == model.config
    lr, lrc, ref = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(lr, lrc, ref), model(lr, lrc, ref))


def test_kedusr_pth_converts_and_runs(tmp_path):
    torch.manual_seed(1)
    model = build_model(
        "kedusr",
        **{k: v for k, v in TINY.items() if k not in ("tokens", "token_dim", "mask_hidden")},
    ).eval()
    # the published checkpoints: wrapped in a container, keys prefixed by DataParallel
    state = {"params": {f"module.{k}": v for k, v in model.state_dict().items()}}
    pth = tmp_path / "kedusr.pth"
    torch.save(state, pth)
    tensors, cfg = read_weights(pth)
    assert cfg.variant == "kedusr" and cfg.channel_order == "bgr" and cfg.trunk_groups == 2
    out = convert_kedusr(pth, tmp_path / "kedusr.safetensors")
    a = Engine.from_pretrained(pth, device="cpu", backend="torch", tile=0)
    b = Engine.from_pretrained(out, device="cpu", backend="torch", tile=0)
    lr, lrc, ref = _inputs()
    ya, yb = a.run(lr, lrc, ref), b.run(lr, lrc, ref)
    assert torch.equal(ya, yb)
    with torch.no_grad():  # BGR convention honoured at the boundary
        want = model(lr.flip(1), lrc.flip(1), ref.flip(1)).flip(1).clamp(0, 1)
    assert (ya - want).abs().max() < 1e-6


def test_published_golden_weights_load_from_pth(golden_dir, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(golden_dir / "kedusr_random_weights.safetensors"))
    torch.save(sd, tmp_path / "net.pth")
    model = load_model(tmp_path / "net.pth")
    assert model.config.variant == "kedusr" and model.config.channels == 64
    assert sum(p.numel() for p in model.parameters()) == 5_625_039


def test_truncated_file_is_a_clear_error(tmp_path):
    path = save_weights(build_model("sddusr", **TINY), tmp_path / "w.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_model(tmp_path / "cut.safetensors")
    torch.save(build_model("kedusr").state_dict(), tmp_path / "k.pth")
    raw = (tmp_path / "k.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(WeightsError, match="not a readable PyTorch"):
        load_model(tmp_path / "cut.pth")


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "junk.safetensors").write_text("this is not a weights file")
    with pytest.raises(WeightsError, match="not a readable"):
        load_model(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02garbage")
    with pytest.raises(WeightsError, match="not a readable"):
        load_model(tmp_path / "junk.pth")
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="unknown weights format"):
        (tmp_path / "w.onnx").write_bytes(b"x")
        load_model(tmp_path / "w.onnx")


def test_wrong_variant_and_mismatched_tensors_name_the_keys(tmp_path):
    path = save_weights(build_model("sddusr", **TINY), tmp_path / "s.safetensors")
    with pytest.raises(WeightsError, match="holds 'sddusr' weights"):
        load_model(path, variant="kedusr")
    # a file whose config says one thing and whose tensors say another
    sd = build_model("sddusr", **TINY).state_dict()
    del sd["tdl.d_lrc"]
    sd["extra.weight"] = torch.zeros(1)
    sd["SISR.head.weight"] = torch.zeros(8, 3, 3, 3)
    meta = {"config": json.dumps(build_model("sddusr", **TINY).config.to_dict())}
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(WeightsError) as e:
        load_model(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "missing (1): tdl.d_lrc" in msg and "unexpected (1): extra.weight" in msg
    assert "SISR.head.weight: file (8, 3, 3, 3), network (16, 3, 3, 3)" in msg


def test_non_finite_weights_are_refused(tmp_path):
    model = build_model("sddusr", **TINY)
    sd = model.state_dict()
    sd["decoder.conv_tail.weight"][0, 0, 0, 0] = float("nan")
    path = save_weights(sd, tmp_path / "nan.safetensors", model.config)
    with pytest.raises(WeightsError, match="non-finite"):
        load_model(path)


def test_saved_weights_get_normal_file_permissions(tmp_path):
    import os

    path = save_weights(build_model("sddusr", **TINY), tmp_path / "w.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_shipped_default_weights_load_and_use_the_reference():
    """`Engine.from_pretrained()` with no arguments loads the shipped file, and what the network
    puts in the centre depends on the telephoto: a registered pair made from a smooth photo-like
    image, super-resolved with its own Ref and with a shuffled one, differs there."""
    from sddusr_engine.synthetic import procedural_image
    from sddusr_engine.weights import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("shipped weights not present")
    eng = Engine.from_pretrained(device="cpu", backend="torch", tile=0)
    assert eng.config.variant == "sddusr" and eng.config.warp_norm == "coverage"
    import numpy as np
    import torch.nn.functional as F

    img = procedural_image((128, 160), np.random.default_rng(7))  # uint8 RGB
    hr = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    lr = F.interpolate(hr, scale_factor=0.5, mode="bicubic", antialias=True).clamp(0, 1)
    lrc, ref = lr[..., 16:48, 20:60], hr[..., 32:96, 40:120]
    true = eng.run(lr, lrc, ref)
    wrong = eng.run(lr, lrc, ref.flip(-1).flip(-2))
    centre = (..., slice(32, 96), slice(40, 120))
    outside = (..., slice(0, 16), slice(0, 160))
    assert (true - wrong)[centre].abs().mean() > 1e-3
    # outside the centre only the whole-image statistics and unconfident matches move
    assert (true - wrong)[outside].abs().mean() < 0.5 * (true - wrong)[centre].abs().mean()


def test_loading_keeps_the_fixed_normalisation_frozen(tmp_path):
    """The matching features' mean/std shift is a fixed layer: loaded, it stays out of training."""
    path = save_weights(build_model("sddusr", **TINY), tmp_path / "w.safetensors")
    model = load_model(path)
    fixed = list(model.feature_match.sub_mean.parameters())
    assert fixed and not any(p.requires_grad for p in fixed)
    assert all(p.requires_grad for n, p in model.named_parameters() if "sub_mean" not in n)


def test_pth_errors_never_pass_on_torchs_advice(tmp_path):
    """torch's own text for a refused pickle advises weights_only=False (running the file's code):
    the sentence says what the file holds instead, and a text file is simply not a checkpoint."""
    import argparse

    torch.save({"args": argparse.Namespace(lr=1.0), "w": torch.zeros(1)}, tmp_path / "ns.pth")
    with pytest.raises(WeightsError) as e:
        load_model(tmp_path / "ns.pth")
    msg = str(e.value)
    assert "holds Python objects besides tensors (e.g. argparse.Namespace)" in msg
    assert "weights_only" not in msg and "arbitrary code" not in msg and msg.endswith(".")
    (tmp_path / "t.pth").write_text("hello")
    with pytest.raises(WeightsError, match=r"t\.pth is not a readable PyTorch checkpoint") as e:
        load_model(tmp_path / "t.pth")
    assert "KeyError" not in str(e.value)

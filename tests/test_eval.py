"""`sddusr eval` on a tiny dataset in the published layout: its PSNR must equal the one computed here
independently (numpy formula), for SR, the no-reference network and bicubic."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import invoke

from sddusr_engine.engine import Engine
from sddusr_engine.io import to_tensor, write_image

BOX = [16, 48, 24, 72]  # HR pixels: y0, y1, x0, x1 (LRC = LR[8:24, 12:36])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("DuSR-tiny")
    rng = np.random.default_rng(3)
    for sub in ("LR", "HR", "LR_center", "Ref_SIFT"):
        (root / "test" / sub).mkdir(parents=True)
    y0, y1, x0, x1 = BOX
    boxes = {}
    for name in ("0001.png", "0002.png"):
        hr = np.clip(rng.normal(128, 60, (64, 96, 3)), 0, 255).astype(np.uint8)
        lr = hr.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        lrc = lr[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2]
        write_image(root / "test" / "HR" / name, hr)
        write_image(root / "test" / "LR" / name, lr)
        write_image(root / "test" / "LR_center" / name, lrc)
        write_image(root / "test" / "Ref_SIFT" / name, hr[y0:y1, x0:x1])
        boxes[name] = BOX
    (root / "DuSR-tiny_center.json").write_text(json.dumps(boxes))
    return root


def psnr(a, b, mask=None):
    """The textbook formula on [0, 255] floats, independent of sddusr_engine.metrics."""
    se = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=2)
    mse = se.mean() if mask is None else se[mask].mean()
    return 10 * math.log10(255.0**2 / mse)


def img(t):
    return t.clamp(0, 1)[0].permute(1, 2, 0).double().numpy() * 255.0


def test_eval_matches_an_independent_psnr(dataset, tiny_weights, tmp_path):
    res = invoke("eval", dataset, "--weights", tiny_weights, "--device", "cpu",
                 "--json", tmp_path / "m.json", "--csv", tmp_path / "m.csv")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "mean over 2 images" in res.stdout
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["count"] == 2 and set(report["methods"]) == {"sr", "no_ref", "bicubic"}

    eng = Engine.from_pretrained(tiny_weights, device="cpu", dtype="fp32")
    from sddusr_engine.io import read_image

    y0, y1, x0, x1 = BOX
    inside = np.zeros((64, 96), bool)
    inside[y0:y1, x0:x1] = True
    for row in report["images"]:
        d = dataset / "test"
        lr, hr = (
            read_image(d / "LR" / f"{row['name']}.png"),
            read_image(d / "HR" / f"{row['name']}.png"),
        )
        lrc, ref = (
            read_image(d / "LR_center" / f"{row['name']}.png"),
            read_image(d / "Ref_SIFT" / f"{row['name']}.png"),
        )
        with torch.inference_mode():
            sr = img(eng.run(to_tensor(lr), to_tensor(lrc), to_tensor(ref)))
            no_ref = img(eng.run_without_reference(to_tensor(lr)))
        bic = img(F.interpolate(to_tensor(lr), scale_factor=2, mode="bicubic", align_corners=False))
        for method, out in (("sr", sr), ("no_ref", no_ref), ("bicubic", bic)):
            got = row[method]
            assert got["psnr"] == pytest.approx(psnr(out, hr), abs=1e-6), method
            assert got["psnr_center"] == pytest.approx(psnr(out, hr, inside), abs=1e-6), method
            assert got["psnr_corner"] == pytest.approx(psnr(out, hr, ~inside), abs=1e-6), method
            assert 0 < got["ssim"] <= 1
    for method in report["methods"]:
        vals = [r[method]["psnr"] for r in report["images"]]
        assert report["mean"][method]["psnr"] == pytest.approx(np.mean(vals))

    with open(tmp_path / "m.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 + 3
    first = next(r for r in rows if r["image"] == "0001" and r["method"] == "bicubic")
    assert float(first["psnr"]) == pytest.approx(report["images"][0]["bicubic"]["psnr"], abs=1e-5)


def test_eval_limit_and_errors(dataset, tiny_weights, tmp_path):
    res = invoke("eval", dataset, "--weights", tiny_weights, "--device", "cpu", "--limit", 1,
                 "--json", tmp_path / "one.json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "one.json").read_text())["count"] == 1
    res = invoke("eval", dataset, "--weights", tiny_weights, "--device", "cpu", "--limit", 1,
                 "--ensemble", 2, "--json", tmp_path / "two.json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "averaged over 2 flipped passes" in res.stdout
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["ensemble"] == 2 and json.loads((tmp_path / "one.json").read_text())["ensemble"] == 1
    assert (
        two["images"][0]["bicubic"]
        == json.loads((tmp_path / "one.json").read_text())["images"][0]["bicubic"]
    )

    res = invoke("eval", tmp_path / "nowhere", "--weights", tiny_weights)
    assert res.exit_code == 1 and "Traceback" not in res.output and "nowhere" in res.stderr
    (tmp_path / "b.json").write_text(json.dumps({"other.png": BOX}))
    res = invoke("eval", dataset, "--weights", tiny_weights, "--boxes", tmp_path / "b.json")
    assert res.exit_code == 1 and "centre rect" in res.stderr and "Traceback" not in res.output


def test_eval_projects_the_low_band_outside_the_centre_only(dataset, tiny_weights, tmp_path):
    """Weights with a low-band projection: `eval` passes the centre rect to the engine, so the
    centre's scores equal the plain network's and the corners' change; the JSON records sigma."""
    from dataclasses import replace

    from sddusr_engine.model.network import DualLensSR
    from sddusr_engine.weights import read_weights, save_weights

    tensors, config = read_weights(tiny_weights)
    model = DualLensSR(replace(config, low_band_taps=3, low_band_sigma=1.5))
    model.load_state_dict(tensors, strict=False)
    with torch.no_grad():  # a smooth upsampler, far from the network's output
        model.low_band_upsampler.taps.fill_(1 / 9)
    lb = save_weights(model, tmp_path / "lb.safetensors")
    for name, w in (("plain", tiny_weights), ("lb", lb)):
        res = invoke("eval", dataset, "--weights", w, "--device", "cpu",
                     "--json", tmp_path / f"{name}.json")  # fmt: skip
        assert res.exit_code == 0, res.output
    plain, proj = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "lb"))
    assert plain["low_band_sigma"] is None and proj["low_band_sigma"] == 1.5
    for a, b in zip(plain["images"], proj["images"], strict=True):
        assert b["sr"]["psnr_center"] == pytest.approx(a["sr"]["psnr_center"], abs=1e-9)
        assert abs(b["sr"]["psnr_corner"] - a["sr"]["psnr_corner"]) > 1e-3


def test_eval_adapts_the_corners_only(dataset, tiny_weights, tmp_path):
    """`--adapt N`: the centre's scores stay the plain network's, the corners change, the
    reference-free row is untouched, the JSON and the table say so; a negative N is refused."""
    for name, extra in (("plain", ()), ("adapt", ("--adapt", 3))):
        res = invoke("eval", dataset, "--weights", tiny_weights, "--device", "cpu",
                     "--json", tmp_path / f"{name}.json", *extra)  # fmt: skip
        assert res.exit_code == 0, res.output
    assert "self-adaptation 3 steps" in res.stdout
    plain, adapted = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "adapt"))
    assert plain["adapt"] == 0 and adapted["adapt"] == 3
    for a, b in zip(plain["images"], adapted["images"], strict=True):
        assert b["sr"]["psnr_center"] == pytest.approx(a["sr"]["psnr_center"], abs=1e-9)
        assert abs(b["sr"]["psnr_corner"] - a["sr"]["psnr_corner"]) > 1e-4
        assert b["no_ref"] == a["no_ref"]
    res = invoke("eval", dataset, "--weights", tiny_weights, "--adapt", -1)
    assert (
        res.exit_code == 2 and "--adapt must be 0" in res.stderr and "Traceback" not in res.output
    )

"""`sddusr eval` on a tiny dataset in the published layout: its PSNR must equal the one computed here
independently (numpy formula), for SR, the no-reference network, bicubic and the wrong-reference
control, photo by photo; the mask fractions, gains and summary follow from the same outputs."""

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
        res.exit_code == 2
        and "adapt must be 0 (off) to" in res.stderr
        and "Traceback" not in res.output
    )


# Three images, the third with a larger centre rect: its reference is another size, so the control
# of the image before it resizes that reference onto its own Ref grid.
BOXES3 = {"0001": BOX, "0002": BOX, "0003": [8, 40, 16, 80]}


@pytest.fixture(scope="module")
def dataset3(tmp_path_factory):
    root = tmp_path_factory.mktemp("DuSR-three")
    rng = np.random.default_rng(5)
    for sub in ("LR", "HR", "LR_center", "Ref_SIFT"):
        (root / "test" / sub).mkdir(parents=True)
    for name, (y0, y1, x0, x1) in BOXES3.items():
        hr = np.clip(rng.normal(128, 60, (64, 96, 3)), 0, 255).astype(np.uint8)
        lr = hr.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        write_image(root / "test" / "HR" / f"{name}.png", hr)
        write_image(root / "test" / "LR" / f"{name}.png", lr)
        write_image(
            root / "test" / "LR_center" / f"{name}.png", lr[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2]
        )
        ref = np.clip(
            hr[y0:y1, x0:x1].astype(int) + rng.integers(-6, 7, (y1 - y0, x1 - x0, 3)), 0, 255
        )
        write_image(root / "test" / "Ref_SIFT" / f"{name}.png", ref.astype(np.uint8))
    (root / "boxes.json").write_text(json.dumps({f"{k}.png": v for k, v in BOXES3.items()}))
    return root


def _triplet(root, name):
    from sddusr_engine.io import read_image

    return [
        read_image(root / "test" / s / f"{name}.png") for s in ("LR", "LR_center", "Ref_SIFT", "HR")
    ]


def test_evaluate_controls_and_per_photo_rows_match_an_independent_psnr(
    dataset3, tiny_weights, tmp_path
):
    """`evaluate()` (what `sddusr eval` prints and writes): every per-photo number against the
    numpy formula on the engine's own outputs, the wrong-reference control with the next photo's
    reference (resized onto this photo's grid), the SFM mask fractions against the network's own
    masks, and the summary as the mean of the per-photo differences."""
    from sddusr_engine.evaluate import SUMMARY, evaluate, write_csv
    from sddusr_engine.weights import load_model

    eng = Engine.from_pretrained(tiny_weights, device="cpu", dtype="fp32")
    report = evaluate(eng, dataset3, weights=tiny_weights)
    assert report["count"] == 3 and [r["name"] for r in report["images"]] == [
        "0001",
        "0002",
        "0003",
    ]
    assert report["dataset"] == str(dataset3) and report["weights"] == str(tiny_weights)
    assert report["device"] == "cpu" and report["ensemble"] == 1 and report["adapt"] == 0
    assert report["machine"] and report["date"] and report["torch"] == torch.__version__
    net = load_model(tiny_weights, device="cpu").eval()
    names = list(BOXES3)
    for i, row in enumerate(report["images"]):
        lr, lrc, ref, hr = _triplet(dataset3, row["name"])
        y0, y1, x0, x1 = BOXES3[row["name"]]
        assert row["box_hr"] == [y0, y1, x0, x1]
        inside = np.zeros(hr.shape[:2], bool)
        inside[y0:y1, x0:x1] = True
        other = names[(i + 1) % 3]
        other_ref = to_tensor(_triplet(dataset3, other)[2])
        wrong = F.interpolate(other_ref, size=ref.shape[:2], mode="bicubic", align_corners=False)
        with torch.inference_mode():
            sr = img(eng.run(to_tensor(lr), to_tensor(lrc), to_tensor(ref)))
            sr_wrong = img(eng.run(to_tensor(lr), to_tensor(lrc), wrong.clamp(0, 1)))
            _, aux = net(to_tensor(lr), to_tensor(lrc), to_tensor(ref), return_aux=True)
        bic = img(F.interpolate(to_tensor(lr), scale_factor=2, mode="bicubic", align_corners=False))
        assert row["sr"]["psnr_center"] == pytest.approx(psnr(sr, hr, inside), abs=1e-6)
        assert row["bicubic"]["psnr"] == pytest.approx(psnr(bic, hr), abs=1e-6)
        assert row["wrong_ref"]["other"] == other
        assert set(row["wrong_ref"]) == {"other", "psnr_center", "ssim_center"}
        assert row["wrong_ref"]["psnr_center"] == pytest.approx(
            psnr(sr_wrong, hr, inside), abs=1e-6
        )
        assert 0 < row["wrong_ref"]["ssim_center"] <= 1
        assert row["ref_gain_db"] == pytest.approx(
            psnr(sr, hr, inside) - psnr(sr_wrong, hr, inside), abs=1e-6
        )
        assert row["gain_db"] == pytest.approx(psnr(sr, hr) - psnr(bic, hr), abs=1e-6)
        assert row["no_ref_gain_db"] == pytest.approx(
            row["no_ref"]["psnr"] - psnr(bic, hr), abs=1e-9
        )
        mask_lr, mask_lrc = (float(aux[k].float().mean()) for k in ("mask_lr", "mask_lrc"))
        assert row["mask_fraction_lr"] == pytest.approx(mask_lr, abs=1e-9)
        assert row["mask_fraction_lrc"] == pytest.approx(mask_lrc, abs=1e-9)
        assert row["mask_fraction"] == pytest.approx((mask_lr + mask_lrc) / 2, abs=1e-9)
        assert row["seconds"] > 0
    # the control changes something: another photo's reference is not this one's
    assert any(abs(r["ref_gain_db"]) > 1e-5 for r in report["images"])
    for k in SUMMARY:
        want = np.mean(
            [
                r[k] if k in r else r["wrong_ref"][k.removeprefix("wrong_ref_")]
                for r in report["images"]
            ]
        )
        assert report["summary"][k] == pytest.approx(want, abs=1e-9), k
    assert report["summary"]["gain_db"] == pytest.approx(
        report["mean"]["sr"]["psnr"] - report["mean"]["bicubic"]["psnr"], abs=1e-9
    )

    write_csv(report, tmp_path / "m.csv")
    with open(tmp_path / "m.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 3 + 3
    sr1 = next(r for r in rows if r["image"] == "0001" and r["method"] == "sr")
    assert sr1["wrong_ref"] == "0002"
    assert float(sr1["ref_gain_db"]) == pytest.approx(report["images"][0]["ref_gain_db"], abs=1e-5)
    assert float(sr1["mask_fraction"]) == pytest.approx(
        report["images"][0]["mask_fraction"], abs=1e-5
    )
    bic1 = next(r for r in rows if r["image"] == "0001" and r["method"] == "bicubic")
    assert bic1["ref_gain_db"] == "" and bic1["wrong_ref"] == ""
    mean_sr = next(r for r in rows if r["image"] == "mean" and r["method"] == "sr")
    assert float(mean_sr["ref_gain_db"]) == pytest.approx(
        report["summary"]["ref_gain_db"], abs=1e-5
    )


def test_evaluate_selects_ensembles_and_refuses(dataset3, tiny_weights):
    """`only` (a glob on the names) then `limit`; the control cycles within what is evaluated and
    is absent for one photo; the ensemble is the engine's (scored as Engine(ensemble=2) gives);
    methods may be a subset; errors are EvalErrors."""
    from sddusr_engine.errors import EvalError
    from sddusr_engine.evaluate import evaluate, find_dataset

    eng = Engine.from_pretrained(tiny_weights, device="cpu", dtype="fp32", ensemble=2)
    two = evaluate(eng, dataset3, only="000[13]")
    assert [r["name"] for r in two["images"]] == ["0001", "0003"]
    assert [r["wrong_ref"]["other"] for r in two["images"]] == ["0003", "0001"]
    assert two["ensemble"] == 2
    lr, lrc, ref, hr = _triplet(dataset3, "0001")
    with torch.inference_mode():
        sr = img(eng.run(to_tensor(lr), to_tensor(lrc), to_tensor(ref)))
    assert two["images"][0]["sr"]["psnr"] == pytest.approx(psnr(sr, hr), abs=1e-6)

    one = evaluate(eng, find_dataset(dataset3), limit=1, methods=("sr", "bicubic"))
    assert (
        one["count"] == 1
        and one["methods"] == ["sr", "bicubic"]
        and "no_ref" not in one["images"][0]
    )
    assert one["images"][0]["wrong_ref"] is None and one["images"][0]["ref_gain_db"] is None
    assert one["images"][0]["no_ref_gain_db"] is None and math.isnan(one["summary"]["ref_gain_db"])
    assert one["dataset"] is None
    bare = evaluate(eng, dataset3, limit=2, methods=("bicubic",), wrong_reference=False)
    assert bare["count"] == 2 and all(r["wrong_ref"] is None for r in bare["images"])
    assert all(r["mask_fraction"] is None for r in bare["images"])
    assert bare["images"][0]["bicubic"] == one["images"][0]["bicubic"]
    off = evaluate(eng, dataset3, limit=2, methods=("sr",), wrong_reference=False)
    assert all(r["wrong_ref"] is None for r in off["images"])
    assert off["images"][0]["sr"] == one["images"][0]["sr"]

    with pytest.raises(EvalError, match="no image name matches"):
        evaluate(eng, dataset3, only="nothing*")
    with pytest.raises(EvalError, match="unknown methods"):
        evaluate(eng, dataset3, methods=("sr", "bilinear"))
    with pytest.raises(EvalError, match="dataset folder"):
        evaluate(eng, find_dataset(dataset3), boxes=dataset3 / "boxes.json")


def test_eval_command_writes_the_control_and_the_masks(dataset, tiny_weights, tmp_path):
    """What `evaluate()` adds reaches `sddusr eval`'s JSON: the control (two photos: each takes
    the other's reference), the mask fractions and the summary, with and without --adapt (the
    centre, and so the control, does not depend on the adaptation)."""
    reports = {}
    for name, extra in (("plain", ()), ("adapt", ("--adapt", 2))):
        res = invoke("eval", dataset, "--weights", tiny_weights, "--device", "cpu",
                     "--json", tmp_path / f"{name}.json", *extra)  # fmt: skip
        assert res.exit_code == 0, res.output
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    plain, adapted = reports["plain"], reports["adapt"]
    assert [r["wrong_ref"]["other"] for r in plain["images"]] == ["0002", "0001"]
    for a, b in zip(plain["images"], adapted["images"], strict=True):
        assert b["wrong_ref"]["psnr_center"] == pytest.approx(
            a["wrong_ref"]["psnr_center"], abs=1e-9
        )
        assert b["ref_gain_db"] == pytest.approx(a["ref_gain_db"], abs=1e-9)
        assert b["mask_fraction"] == pytest.approx(a["mask_fraction"], abs=1e-12)
        assert 0 <= a["mask_fraction_lr"] <= 1 and 0 <= a["mask_fraction_lrc"] <= 1
    for k in ("gain_db", "ref_gain_db", "mask_fraction", "wrong_ref_psnr_center"):
        assert isinstance(plain["summary"][k], float), k
    assert adapted["summary"]["gain_db"] != plain["summary"]["gain_db"]


def test_eval_command_selects_by_name_and_can_drop_the_control(dataset, tiny_weights, tmp_path):
    """--only picks images by a glob on their names, --no-wrong-ref leaves out the control, and
    the terminal shows what the reference adds; a glob that matches nothing is a clear error."""
    res = invoke("eval", dataset, "--weights", tiny_weights, "--device", "cpu",
                 "--only", "*2", "--no-wrong-ref", "--json", tmp_path / "only.json")  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "only.json").read_text())
    assert [r["name"] for r in report["images"]] == ["0002"]
    assert report["images"][0]["wrong_ref"] is None and report["dataset"] == str(dataset)
    assert "SR over bicubic, full image (dB)" in res.stdout
    full = invoke("eval", dataset, "--weights", tiny_weights, "--device", "cpu")
    assert full.exit_code == 0 and "true over wrong reference, centre (dB)" in full.stdout
    res = invoke("eval", dataset, "--weights", tiny_weights, "--only", "nothing*")
    assert res.exit_code == 1 and "no image name matches" in res.stderr
    assert "Traceback" not in res.output

"""The low-band projection: the fitted upsampler, the blend outside the telephoto, the engine."""

import numpy as np
import pytest
import torch
from support import TINY

from sddusr_engine import build_model
from sddusr_engine.config import ModelConfig
from sddusr_engine.engine import Engine
from sddusr_engine.engine.postprocess import gaussian_blur, project_low_band
from sddusr_engine.errors import EngineError
from sddusr_engine.geometry import RAMP_HR, locate_crop, lr_box, outside_weight
from sddusr_engine.model.low_band import LinearUpsampler
from sddusr_engine.train.low_band_fit import _main, fit_upsampler
from sddusr_engine.weights import load_model, save_weights


def _upsampler(taps: torch.Tensor) -> LinearUpsampler:
    up = LinearUpsampler(taps.shape[-1])
    up.taps.copy_(taps)
    return up


def test_upsampler_phases_follow_pixel_shuffle():
    """Phase a*2+b fills output pixels (2i+a, 2j+b): with only each phase's centre tap set to
    its own value, the output is that value times the LR pixel below it."""
    taps = torch.zeros(4, 1, 3, 3)
    for p in range(4):
        taps[p, 0, 1, 1] = p + 1.0
    lr = torch.rand(1, 3, 5, 7)
    out = _upsampler(taps)(lr)
    for a in (0, 1):
        for b in (0, 1):
            torch.testing.assert_close(out[..., a::2, b::2], (2 * a + b + 1) * lr)


def test_fit_recovers_a_known_linear_upsampler():
    """Pairs made by a known 5x5 upsampler (ragged sizes) give back its taps."""
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(4, 1, 5, 5, generator=g) * 0.1
    truth[:, 0, 2, 2] += 1.0
    up = _upsampler(truth)
    pairs = []
    for h, w in ((23, 31), (17, 40)):
        lr = torch.rand(1, 3, h, w, generator=g)
        pairs.append((lr[0], up(lr)[0]))
    got = fit_upsampler(pairs, taps=5, keep=1.0, ridge=1e-9)
    torch.testing.assert_close(got, truth, atol=1e-5, rtol=0)


def test_blur_keeps_constants_and_the_mean():
    x = torch.full((1, 3, 20, 30), 0.3)
    torch.testing.assert_close(gaussian_blur(x, 1.5), x)
    y = torch.rand(1, 3, 40, 40, dtype=torch.float64)
    assert abs(gaussian_blur(y, 1.0)[..., 8:-8, 8:-8].mean() - y[..., 8:-8, 8:-8].mean()) < 5e-3


def test_outside_weight_is_zero_in_the_box_and_ramps_out():
    w = outside_weight((60, 80), (10, 20, 15, 30), "cpu", torch.float32)[0, 0]
    assert w.shape == (60, 80)
    assert (w[20:40, 30:60] == 0).all()  # the box, x2
    assert w[20 - RAMP_HR, 45] == 1 and w[39 + RAMP_HR, 45] == 1
    assert w[19, 45] == pytest.approx(1 / RAMP_HR) and w[30, 60] == pytest.approx(1 / RAMP_HR)
    assert (outside_weight((6, 8), None, "cpu", torch.float32) == 1).all()
    for rows in [(0, 60), (17, 43), (59, 60)]:  # a band of rows is those rows of the whole
        band = outside_weight((60, 80), (10, 20, 15, 30), "cpu", torch.float32, rows=rows)
        assert torch.equal(band[0, 0], w[rows[0] : rows[1]])
    assert outside_weight((6, 8), None, "cpu", torch.float32, rows=(2, 5)).shape == (1, 1, 3, 8)
    # an HR rect as the LR box that covers it (odd ends round outward)
    assert lr_box((16, 47, 24, 71)) == (8, 24, 12, 36) and lr_box((2, 4, 6, 8)) == (1, 2, 3, 4)


def test_projection_swaps_only_the_low_band_and_only_outside():
    g = torch.Generator().manual_seed(1)
    up = _upsampler(torch.rand(4, 1, 3, 3, generator=g) / 9)
    lr = torch.rand(1, 3, 30, 40, generator=g)
    lin = up(lr)
    # the network's output = the linear one plus a constant offset: the offset is all low band
    out = project_low_band(lin + 0.05, lr, up, sigma=1.0, box_lr=None)
    torch.testing.assert_close(out, lin.clamp(0, 1), atol=1e-5, rtol=0)
    sr = torch.rand(1, 3, 60, 80, generator=g)
    box = (5, 20, 10, 30)
    out = project_low_band(sr, lr, up, sigma=1.0, box_lr=box)
    assert torch.equal(
        out[..., 10:40, 20:60], sr[..., 10:40, 20:60]
    )  # inside: untouched (in [0,1])
    far = out[..., : 10 - RAMP_HR + 10, :]
    assert not torch.allclose(far, sr[..., : far.shape[-2], :])
    # outside, the output's low band has moved onto the linear upsampler's
    before = gaussian_blur(sr - lin, 1.0)[..., :4, :].norm()
    after = gaussian_blur(out - lin, 1.0)[..., :4, :].norm()
    assert after < 0.6 * before


@pytest.mark.parametrize("hw, box", [((41, 57), (7, 30, 12, 44)), ((64, 48), (0, 20, 0, 48))])
def test_locate_crop_finds_an_exact_crop_and_refuses_a_foreign_one(hw, box):
    g = torch.Generator().manual_seed(2)
    lr = torch.rand(1, 3, *hw, generator=g)
    y0, y1, x0, x1 = box
    assert locate_crop(lr, lr[..., y0:y1, x0:x1].clone()) == box
    assert locate_crop(lr, torch.rand(1, 3, y1 - y0, x1 - x0, generator=g)) is None
    assert locate_crop(lr, torch.rand(1, 3, hw[0] + 2, 4, generator=g)) is None


def test_config_needs_both_fields():
    with pytest.raises(ValueError, match="both"):
        ModelConfig(low_band_taps=7)
    with pytest.raises(ValueError, match="odd"):
        ModelConfig(low_band_taps=6, low_band_sigma=1.0)


def _model_with_low_band(seed=0):
    torch.manual_seed(seed)
    model = build_model("sddusr", global_skip=True, low_band_taps=5, low_band_sigma=1.5, **TINY)
    with torch.no_grad():
        model.decoder_tail[-1].weight.normal_(0, 0.05)  # an output that is not bicubic
        model.low_band_upsampler.taps.copy_(torch.rand(4, 1, 5, 5) / 25)
    return model.eval()


def test_engine_projects_outside_the_box_and_finds_the_box_itself():
    model = _model_with_low_band()
    torch.manual_seed(3)
    lr = torch.rand(1, 3, 48, 64)
    box = (12, 36, 16, 48)
    lrc = lr[..., 12:36, 16:48].clone()
    ref = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        raw = model(lr, lrc, ref).clamp(0, 1)
    eng = Engine(model, "cpu", "fp32", "torch", tile=32)
    out, info = eng.run(lr, lrc, ref, box_lr=box, return_info=True)
    assert "low_band" in info.timings
    torch.testing.assert_close(out[..., 24:72, 32:96], raw[..., 24:72, 32:96], atol=2e-4, rtol=0)
    want = project_low_band(raw, lr, model.low_band_upsampler, 1.5, box)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=0)
    assert (out - raw)[..., :8, :].abs().max() > 1e-3  # the corners changed
    torch.testing.assert_close(eng.run(lr, lrc, ref), out)  # box found by locate_crop
    with pytest.raises(EngineError, match="must be LRC's rectangle"):
        eng.run(lr, lrc, ref, box_lr=(12, 36, 16, 50))
    # an LRC that is not a crop of LR: the projection is skipped, and the info says so
    other, info = eng.run(lr, torch.rand_like(lrc), ref, return_info=True)
    assert any("low-band projection was skipped" in w for w in info.warnings)
    # no reference: everywhere
    with torch.no_grad():
        raw0 = model(lr, None, None).clamp(0, 1)
    torch.testing.assert_close(
        eng.run(lr), project_low_band(raw0, lr, model.low_band_upsampler, 1.5), atol=2e-4, rtol=0
    )


def test_bgr_weights_find_the_box_in_their_own_channel_order():
    """The engine looks LRC up in LR as the network sees both (BGR weights flip both)."""
    torch.manual_seed(6)
    model = build_model(
        "sddusr", global_skip=True, low_band_taps=3, low_band_sigma=1.0, channel_order="bgr",
        **TINY,
    )  # fmt: skip
    with torch.no_grad():
        model.low_band_upsampler.taps.fill_(1 / 9)
    eng = Engine(model.eval(), "cpu", "fp32", "torch", tile=0)
    lr = torch.rand(1, 3, 32, 48)
    lrc, ref = lr[..., 8:24, 12:36].clone(), torch.rand(1, 3, 32, 48)
    found, info = eng.run(lr, lrc, ref, return_info=True)
    assert not info.warnings
    torch.testing.assert_close(found, eng.run(lr, lrc, ref, box_lr=(8, 24, 12, 36)))


def test_fit_command_writes_weights_that_load_with_the_taps(tmp_path):
    """`python -m sddusr_engine.train.low_band_fit` on a two-pair folder: the network's tensors are kept
    as stored, the taps are those `fit_upsampler` finds, the config and fit are recorded."""
    from PIL import Image
    from safetensors import safe_open

    from sddusr_engine.data import BOX_FILE, make_pair
    from sddusr_engine.datasets import load_pairs
    from sddusr_engine.io import to_tensor

    boxes = {}
    for i in range(2):
        rng = np.random.default_rng(i)
        base = rng.uniform(0, 1, size=(6, 6, 3))
        img = Image.fromarray((base * 255).astype(np.uint8)).resize((128, 96), Image.BICUBIC)
        p = make_pair(np.asarray(img, dtype=np.float32) / 255, rng)
        for sub, key in (("LR", "lr"), ("HR", "hr"), ("LR_center", "lrc"), ("Ref_SIFT", "ref")):
            (tmp_path / "pairs" / "train" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(p[key]).save(tmp_path / "pairs" / "train" / sub / f"s{i}.png")
        boxes[f"s{i}.png"] = p["box"]
    (tmp_path / "pairs" / BOX_FILE).write_text(__import__("json").dumps(boxes))
    torch.manual_seed(5)
    net = build_model("sddusr", global_skip=True, **TINY)
    src = save_weights(net, tmp_path / "net.safetensors")
    dst = tmp_path / "net_lb.safetensors"
    args = ["--data", str(tmp_path / "pairs"), "--weights", str(src), "--out", str(dst)]
    assert _main([*args, "--taps", "5", "--sigma", "2.0"]) == 0
    back = load_model(dst)
    assert (back.config.low_band_taps, back.config.low_band_sigma) == (5, 2.0)
    pairs = load_pairs(tmp_path / "pairs", "train")
    want = fit_upsampler([(to_tensor(t.lr)[0], to_tensor(t.hr)[0]) for t in pairs], 5)
    torch.testing.assert_close(back.low_band_upsampler.taps, want)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    with safe_open(str(dst), "pt") as f:
        assert '"pairs": 2' in f.metadata()["low_band_fit"]


def test_weights_without_the_projection_are_unchanged_by_it():
    torch.manual_seed(4)
    model = build_model("sddusr", global_skip=True, **TINY).eval()
    assert not hasattr(model, "low_band_upsampler")
    lr = torch.rand(1, 3, 10, 10)
    out, info = Engine(model, "cpu", "fp32", "torch", tile=0).run(lr, return_info=True)
    with torch.no_grad():
        raw = model(lr, None, None).clamp(0, 1)
    assert torch.equal(out, raw) and "low_band" not in info.timings


def test_low_band_weights_round_trip(tmp_path):
    model = _model_with_low_band()
    path = save_weights(model, tmp_path / "w.safetensors")
    back = load_model(path)
    assert back.config.low_band_taps == 5 and back.config.low_band_sigma == 1.5
    torch.testing.assert_close(back.low_band_upsampler.taps, model.low_band_upsampler.taps)
    assert back.low_band_upsampler.taps.shape == (4, 1, 5, 5)


def test_projection_out_of_gpu_memory_finishes_on_the_cpu(monkeypatch):
    """A GPU out of memory in the projection: the CPU computes it, and the info says so."""
    model = _model_with_low_band()
    eng = Engine(model, "cpu", "fp32", "torch", tile=0)
    calls = []
    import sddusr_engine.engine.core as core

    def flaky(sr, lr, upsampler, sigma, box_lr=None):
        calls.append(sr.device.type)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return project_low_band(sr, lr, upsampler, sigma, box_lr)

    monkeypatch.setattr(core, "project_low_band", flaky)
    lr = torch.rand(1, 3, 24, 32)
    out, info = eng.run(lr, return_info=True)
    assert len(calls) == 2 and any("low-band projection ran on the CPU" in w for w in info.warnings)
    with torch.no_grad():
        raw = model(lr, None, None).clamp(0, 1)
    want = project_low_band(raw, lr, model.low_band_upsampler, model.config.low_band_sigma)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_engine_keeps_the_taps_in_fp32_and_matches_fp32():
    model = _model_with_low_band()
    taps = model.low_band_upsampler.taps.clone()
    eng = Engine(model, "cuda", "fp16", "torch", tile=0)
    assert eng.model.low_band_upsampler.taps.dtype == torch.float32
    torch.testing.assert_close(eng.model.low_band_upsampler.taps.cpu(), taps)
    lr = torch.rand(1, 3, 32, 40)
    out = eng.run(lr)
    ref32 = Engine(_model_with_low_band(), "cpu", "fp32", "torch", tile=0).run(lr)
    assert (out - ref32).abs().max() < 2e-2  # the network in fp16, the projection in fp32


@pytest.mark.parametrize("band_rows", [5, 16, 1000])
@pytest.mark.parametrize("box", [None, (4, 15, 6, 20)])
def test_projection_in_bands_is_the_whole_image_formula(band_rows, box):
    """Bands of output rows, each with the blur's context and its LR rows (the upsampler's
    taps), give the whole-image projection; odd sizes and edge rows included."""
    g = torch.Generator().manual_seed(2)
    up = _upsampler(torch.rand(4, 1, 5, 5, generator=g) / 25)
    lr = torch.rand(1, 3, 23, 31, generator=g)
    sr = torch.rand(1, 3, 45, 61, generator=g) * 1.2 - 0.1  # cropped to odd sides; beyond [0, 1]
    sigma = 1.5
    lin = up(lr)[..., :45, :61]
    sr32 = sr.clamp(0, 1)
    weight = outside_weight((45, 61), box, "cpu", torch.float32)
    want = (sr32 + weight * gaussian_blur(lin - sr32, sigma)).clamp(0, 1)
    got = project_low_band(sr, lr, up, sigma, box, band_rows=band_rows)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    rows = up(lr, (7, 15))
    torch.testing.assert_close(rows, up(lr)[..., 14:30, :], atol=1e-6, rtol=0)


def test_a_16_bit_lr_is_widened_band_by_band_as_if_whole():
    """With an fp16 LR (a GPU run's), the projection widens only the rows each band reads, and
    gives what widening the whole LR first gives, bit for bit; the upsampler's `dtype` too."""
    g = torch.Generator().manual_seed(3)
    up = _upsampler(torch.rand(4, 1, 5, 5, generator=g) / 25)
    lr = torch.rand(1, 3, 23, 31, generator=g).half()
    sr = torch.rand(1, 3, 46, 62, generator=g).half()
    got = project_low_band(sr, lr, up, 1.5, (4, 15, 6, 20), band_rows=16)
    want = project_low_band(sr, lr.float(), up, 1.5, (4, 15, 6, 20), band_rows=16)
    assert got.dtype == torch.float16 and torch.equal(got, want)
    assert torch.equal(up(lr, (7, 15), torch.float32), up(lr.float(), (7, 15)))
    assert up(lr, (7, 15)).dtype == torch.float16

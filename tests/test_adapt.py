"""Self-adaptation: the per-pair fine-tune of the single-image path, and the engine around it."""

import pytest
import torch
from support import TINY

from sddusr_engine import build_model
from sddusr_engine.engine import Engine
from sddusr_engine.engine.adapt import AdaptSettings, adapt_single_image_path, crop_size
from sddusr_engine.engine.postprocess import blend_outside
from sddusr_engine.errors import EngineError


def _model(seed=0):
    torch.manual_seed(seed)
    model = build_model("sddusr", global_skip=True, low_band_taps=3, low_band_sigma=1.0, **TINY)
    with torch.no_grad():
        model.decoder_tail[-1].weight.normal_(0, 0.05)  # an output that is not bicubic
        model.low_band_upsampler.taps.fill_(1 / 9)
    return model.eval()


def _pair(seed=3):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(1, 3, 40, 56, generator=g)
    box = (8, 32, 12, 44)  # 24 x 32 LR pixels
    return lr, lr[..., 8:32, 12:44].clone(), torch.rand(1, 3, 48, 64, generator=g), box


def test_crop_size_fits_the_box_and_refuses_tiny_ones():
    assert crop_size((0, 100, 0, 100), 48) == 48
    assert crop_size((0, 25, 0, 100), 48) == 24  # the shorter side, even
    assert crop_size((0, 10, 0, 100), 48) == 0


def test_adaptation_learns_the_teacher_and_leaves_the_model_alone():
    model = _model()
    lr, _, _, box = _pair()
    y0, y1, x0, x1 = box
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        own = model(lr, None, None)[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1]
    teacher = 0.7 * own + 0.15  # a tone change: learnable from the content, unlike a fixed pattern
    settings = AdaptSettings(steps=30, lr=1e-3, crop=16, batch=2, seed=1)
    student = adapt_single_image_path(model, lr, teacher, box, settings)

    def err(net):
        with torch.no_grad():
            out = net(lr, None, None)[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1]
        return (out - teacher)[..., 8:-8, 8:-8].square().mean().item()

    assert err(student) < 0.7 * err(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in student.parameters())
    again = adapt_single_image_path(model, lr, teacher, box, settings)  # same seed, same copy
    for (k, a), b in zip(student.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="not 2x the box"):
        adapt_single_image_path(model, lr, teacher[..., :-2], box, settings)
    with pytest.raises(ValueError, match="too small"):
        adapt_single_image_path(model, lr, teacher[..., :20, :20], (8, 18, 12, 22), settings)


def test_blend_keeps_the_inside_and_takes_the_outside():
    inside, outside = torch.zeros(1, 3, 80, 112), torch.ones(1, 3, 80, 112)
    out = blend_outside(inside, outside, (8, 32, 12, 44))
    assert out[..., 16:64, 24:88].abs().max() == 0
    assert (out[..., :, :4] == 1).all() and (out[..., :, -4:] == 1).all()


def test_engine_adapts_outside_the_footprint_only():
    model = _model()
    lr, lrc, ref, box = _pair()
    plain = Engine(model, "cpu", "fp32", "torch", tile=0)
    adapted = Engine(model, "cpu", "fp32", "torch", tile=0, adapt=5)
    base = plain.run(lr, lrc, ref, box_lr=box)
    out, info = adapted.run(lr, lrc, ref, box_lr=box, return_info=True)
    torch.testing.assert_close(out[..., 16:64, 24:88], base[..., 16:64, 24:88], atol=1e-6, rtol=0)
    assert (out - base)[..., :8, :].abs().max() > 1e-4  # the corners are the adapted copy's
    assert info.adapt_steps == 5 and "adapt" in info.timings and "adapted_pass" in info.timings
    # the box found by locate_crop gives the same result
    torch.testing.assert_close(adapted.run(lr, lrc, ref), out)
    # no reference: nothing to learn from, the plain output
    torch.testing.assert_close(adapted.run(lr), plain.run(lr))
    # an LRC that is not a crop of LR and no box: skipped, and the info says so
    _, info = adapted.run(lr, torch.rand_like(lrc), ref, return_info=True)
    assert any("self-adaptation was skipped" in w for w in info.warnings)
    assert info.adapt_steps == 0


def test_engine_refuses_bad_adapt_values():
    with pytest.raises(EngineError, match="adapt must be 0"):
        Engine(_model(), "cpu", "fp32", "torch", adapt=-1)

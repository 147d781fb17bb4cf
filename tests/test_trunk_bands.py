"""The LR trunk in row bands: the whole pass's output with channel attention, on ragged shapes,
in both layouts; the sweeps it is made of; and the engine's bounded plan using it."""

import pytest
import torch
from torch import nn

from sddusr_engine import build_model
from sddusr_engine.engine import Engine
from sddusr_engine.model import trunk_bands
from sddusr_engine.model.trunk_bands import band_mean, sweep_in_place, trunk_in_bands


def random_trunk(variant="sddusr", seed=0, channels=16):
    """A trunk with random weights large enough that its channel attention matters."""
    torch.manual_seed(seed)
    model = build_model(variant, channels=channels, trunk_groups=2, trunk_blocks=2).eval()
    with torch.no_grad():
        for p in model.SISR.parameters():
            p.normal_(0, 0.15)
    return model.SISR


@pytest.mark.parametrize(
    "shape, rows",
    [((1, 3, 37, 29), 8), ((2, 3, 30, 21), 2), ((1, 3, 33, 20), 40), ((1, 3, 17, 9), 3)],
)
def test_banded_trunk_is_the_whole_trunk(shape, rows):
    trunk = random_trunk()
    lr = torch.rand(*shape)
    with torch.inference_mode():
        want = trunk(lr)
        got = trunk_in_bands(trunk, lr, rows)
    assert got.shape == want.shape
    # the same convolutions on the same rows; only the mean's summation order differs
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_banded_trunk_channels_last_and_without_attention():
    for variant in ("sddusr", "kedusr"):
        trunk = random_trunk(variant, seed=3).to(memory_format=torch.channels_last)
        lr = torch.rand(1, 3, 41, 26).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            want = trunk(lr)
            got = trunk_in_bands(trunk, lr, 8)
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item(), variant


def test_the_channel_attention_is_pooled_over_the_whole_image():
    """Each band pooling only itself would be wrong: the check above can tell the difference."""
    trunk = random_trunk(seed=5)
    lr = torch.rand(1, 3, 40, 24)
    lr[..., :20, :] *= 0.1  # the bands' own means differ from the image's
    with torch.inference_mode():
        want = trunk(lr)
        banded = torch.cat([trunk(lr[..., :20, :]), trunk(lr[..., 20:, :])], dim=-2)
        got = trunk_in_bands(trunk, lr, 20)
    assert (banded - want).abs().max().item() > 1e-3 * want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_sweep_in_place_keeps_the_rows_the_next_band_reads():
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 5, padding=2))  # radius 3
    x = torch.randn(1, 4, 29, 11)
    with torch.no_grad():
        want = conv(x)
        got = sweep_in_place(lambda band, a0, a1: conv(band), x.clone(), 5, 3)
        short = sweep_in_place(lambda band, a0, a1: conv(band), x.clone(), 5, 1)  # halo too small
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(short, want, atol=1e-3)
    with pytest.raises(ValueError, match="cannot carry"):
        sweep_in_place(lambda band, a0, a1: band, x.clone(), 2, 3)


def test_sweep_in_place_passes_the_band_rows():
    x = torch.zeros(1, 1, 23, 3)
    seen = []

    def rows_of(band, a0, a1):
        seen.append((a0, a1))
        assert band.shape[-2] == a1 - a0
        return torch.arange(a0, a1, dtype=band.dtype).view(1, 1, -1, 1).expand_as(band)

    out = sweep_in_place(rows_of, x, 8, 2)
    assert seen == [(0, 10), (6, 18), (14, 23)]
    assert torch.equal(out[0, 0, :, 0], torch.arange(23, dtype=out.dtype))


def test_band_mean_is_the_mean():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 19, 7)
    with torch.no_grad():
        want = conv(x).mean(dim=(2, 3), keepdim=True)
        got = band_mean(conv, x, 4, 1)
    assert got.shape == (2, 5, 1, 1)
    assert torch.allclose(got, want, atol=1e-6)


def test_bounded_engine_runs_the_trunk_in_bands(monkeypatch):
    """Bounded tiles run the trunk in bands (whole-pass output); kept maps and whole do not."""
    calls = []
    real = trunk_bands.trunk_in_bands

    def spy(trunk, lr, rows, tick=None, home=None):
        calls.append(rows)
        return real(trunk, lr, rows, tick, home)

    monkeypatch.setattr("sddusr_engine.model.network.trunk_in_bands", spy)
    torch.manual_seed(0)
    model = build_model("sddusr", channels=16, trunk_groups=1, trunk_blocks=2, encoder_blocks=1,
                        decoder_blocks=1, tokens=8, token_dim=16, mask_hidden=8).eval()  # fmt: skip
    lr, lrc, ref = torch.rand(1, 3, 70, 52), torch.rand(1, 3, 30, 24), torch.rand(1, 3, 60, 48)
    want = Engine(model, "cpu", "fp32", "torch", tile=0).run(lr, lrc, ref)
    ticks = []
    got = Engine(model, "cpu", "fp32", "torch", tile=32).run(
        lr, lrc, ref, progress=lambda d, t: ticks.append((d, t))
    )
    assert calls == [32]  # 3 bands of the 70 rows
    assert (got - want).abs().max().item() <= 1e-4
    assert ticks[-1][0] == ticks[-1][1]  # the trunk's steps are counted in the total
    Engine(model, "cpu", "fp32", "torch", tile=32, keep_fusion_maps=True).run(lr, lrc, ref)
    assert calls == [32]  # 3 bands of the 70 rows

"""Losses: Charbonnier, mask label/loss, perceptual (local VGG19 file), RaGAN, the total."""

import math

import pytest
import torch

from sddusr_engine.losses import (
    CONV5_4,
    Discriminator,
    PerceptualLoss,
    SDDuSRLoss,
    _vgg19_features,
    charbonnier,
    hr_detail,
    mask_label,
    mask_loss,
    relativistic_gan_losses,
)


def test_charbonnier_values():
    x = torch.rand(2, 3, 8, 8)
    assert charbonnier(x, x.clone()).item() == pytest.approx(1e-3, rel=1e-6)
    assert charbonnier(x, x.clone(), eps=0.5).item() == pytest.approx(0.5, rel=1e-6)
    y = x + 0.1
    assert charbonnier(y, x).item() == pytest.approx(math.sqrt(0.01 + 1e-6), rel=1e-4)
    with pytest.raises(ValueError, match="differ"):
        charbonnier(x, x[..., :4])


def test_mask_label_is_half_ones_on_random_image():
    hr = torch.rand(3, 3, 64, 48)
    lab = mask_label(hr, (16, 12))
    assert lab.shape == (3, 1, 16, 12)
    assert set(lab.unique().tolist()) <= {0.0, 1.0}
    assert lab.flatten(1).sum(1).tolist() == [96.0, 96.0, 96.0]  # exactly half of 192


def test_mask_label_marks_the_textured_half():
    hr = torch.full((1, 3, 64, 64), 0.5)
    hr[..., 32:] = torch.rand(1, 3, 64, 32)  # right half textured, left half flat
    lab = mask_label(hr, (8, 8))
    # interior columns only: bicubic's support lets the edge leak one column into the flat side
    assert lab[..., :3].sum() == 0
    assert lab[..., 5:].sum() == 8 * 3
    assert hr_detail(hr)[..., :20].abs().max() < 1e-5  # antialiased down + up: ~8 px reach


def test_mask_loss_value_and_gradient():
    hr = torch.rand(2, 3, 32, 32)
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    prob = torch.sigmoid(logits)
    loss = mask_loss(prob, hr)
    ref = (prob - mask_label(hr, (16, 16))).square().mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mask_prob"):
        mask_loss(prob[:, 0], hr)


def _random_vgg19_state() -> dict:
    torch.manual_seed(1)
    feats = _vgg19_features(36)  # the whole `features` stack of torchvision's vgg19
    sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
    sd["classifier.0.weight"] = torch.randn(4, 4)  # extra keys of a full checkpoint are ignored
    return sd


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_perceptual_loss_loads_a_local_file(tmp_path, suffix):
    sd = _random_vgg19_state()
    path = tmp_path / f"vgg19{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": sd}, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    per = PerceptualLoss(path)
    assert len(per.features) == CONV5_4 + 1
    torch.testing.assert_close(per.features[0].weight, sd["features.0.weight"])
    hr = torch.rand(1, 3, 32, 32)
    sr = torch.rand(1, 3, 32, 32, requires_grad=True)
    assert per(hr, hr).item() == 0.0
    loss = per(sr, hr)
    assert loss.item() > 0
    loss.backward()
    assert sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in per.parameters())


def test_perceptual_loss_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        PerceptualLoss(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"missing \['features.0.bias'"):
        PerceptualLoss(bad)
    sd = _random_vgg19_state()
    sd["features.2.weight"] = torch.zeros(64, 32, 3, 3)
    wrong = tmp_path / "wrong.pth"
    torch.save(sd, wrong)
    with pytest.raises(ValueError, match="wrong shape.*features.2.weight"):
        PerceptualLoss(wrong)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not read"):
        PerceptualLoss(junk)


def test_discriminator_any_size_and_ragan():
    d = Discriminator(nf=8)
    for s in (32, 48, 96):
        assert d(torch.rand(2, 3, s, s)).shape == (2, 1)
    z = torch.zeros(4, 1)
    g, dl = relativistic_gan_losses(z, z)
    assert g.item() == pytest.approx(math.log(2), rel=1e-6)
    assert dl.item() == pytest.approx(math.log(2), rel=1e-6)
    # a discriminator that separates well: small D loss, large G loss
    g, dl = relativistic_gan_losses(torch.full((4, 1), 5.0), torch.full((4, 1), -5.0))
    assert dl.item() < 1e-3 and g.item() > 5


def test_total_loss_terms_and_gradients():
    hr = torch.rand(2, 3, 32, 32)
    sr = torch.rand(2, 3, 32, 32, requires_grad=True)
    prob = torch.rand(2, 1, 8, 8, requires_grad=True)
    crit = SDDuSRLoss()
    total, terms = crit(sr, hr, prob)
    assert set(terms) == {"rec", "mask", "total"}
    assert terms["total"] == pytest.approx(terms["rec"] + 1e-3 * terms["mask"], rel=1e-6)
    total.backward()
    assert sr.grad.abs().sum() > 0 and prob.grad.abs().sum() > 0

    crit = SDDuSRLoss(adversarial=True)
    sr.grad = None
    total, terms = crit(sr, hr, None)
    assert {"rec", "adv_g", "total"} <= set(terms) and "mask" not in terms
    total.backward()
    assert sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in crit.discriminator.parameters())
    d_loss = crit.discriminator_loss(sr, hr)
    d_loss.backward()
    assert any(p.grad is not None for p in crit.discriminator.parameters())

"""Losses: Charbonnier, mask label/loss, perceptual (local VGG19 file), RaGAN, the total."""

import math

import pytest
import torch

from sddusr_engine.model.matching import batch_patch_descriptors
from sddusr_engine.train.losses import (
    CONV5_4,
    Discriminator,
    LossWeights,
    PerceptualLoss,
    SDDuSRLoss,
    _vgg19_features,
    charbonnier,
    flow_epe_loss,
    flow_photometric_loss,
    hr_detail,
    mask_label,
    mask_loss,
    matching_loss,
    matching_targets,
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


def test_squared_error_reconstruction_term():
    hr = torch.rand(2, 3, 16, 16)
    sr = (hr + 0.1 * torch.randn_like(hr)).requires_grad_()
    total, terms = SDDuSRLoss(rec="mse")(sr, hr, None)
    assert terms["rec"] == pytest.approx(((sr - hr) ** 2).mean().item(), rel=1e-6)
    total.backward()
    assert torch.allclose(sr.grad, 2 * (sr - hr).detach() / sr.numel(), atol=1e-9)
    # the default is the paper's Charbonnier, and the choice is checked
    assert SDDuSRLoss()(sr, hr, None)[1]["rec"] == pytest.approx(
        charbonnier(sr, hr).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="rec must be one of"):
        SDDuSRLoss(rec="l3")
    with pytest.raises(ValueError, match="differ"):
        SDDuSRLoss(rec="mse")(sr, hr[..., :8], None)


def _matching_brute_force(q_hw, k_hw, dy, dx):
    """Per query cell, the share of its 2x2 LR-crop pixels lying in each key cell, by counting."""
    t = torch.zeros(q_hw[0] * q_hw[1], k_hw[0] * k_hw[1])
    for i in range(q_hw[0]):
        for j in range(q_hw[1]):
            for py in (2 * i, 2 * i + 1):
                for px in (2 * j, 2 * j + 1):
                    ky, kx = (py - dy) // 2, (px - dx) // 2  # LRC pixel -> key cell
                    if 0 <= py - dy < 2 * k_hw[0] and 0 <= px - dx < 2 * k_hw[1]:
                        t[i * q_hw[1] + j, ky * k_hw[1] + kx] += 0.25
    return t


@pytest.mark.parametrize("dy,dx", [(0, 0), (4, -6), (3, 2), (-5, 7), (1, -1), (30, 0)])
def test_matching_targets_count_shared_pixels(dy, dx):
    q_hw, k_hw = (6, 7), (5, 4)
    target, valid = matching_targets(q_hw, k_hw, torch.tensor([[dy, dx]]))
    want = _matching_brute_force(q_hw, k_hw, dy, dx)
    torch.testing.assert_close(target[0], want, rtol=0, atol=0)
    # valid = all four pixels inside the LRC crop; such rows are distributions
    torch.testing.assert_close(valid[0], want.sum(1) == 1)
    if valid.any():
        torch.testing.assert_close(target[valid].sum(-1), torch.ones(int(valid.sum())))
    if dy % 2 == 0 and dx % 2 == 0:  # even offsets: exactly one key per valid query
        assert ((target[valid] == 1).sum(-1) == 1).all()


def test_matching_loss_rewards_the_true_correspondence():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 8, 20, 20, generator=g)
    offset = torch.tensor([[4, 6], [2, 0]])
    q_map = image[..., :12, :12]
    k_map = torch.stack([image[0, :, 4:14, 6:16], image[1, :, 2:12, 0:10]])
    # the key map is the query map shifted by offset/2 cells: descriptors away from the border
    # coincide, so the true key has cosine 1 and is (almost always) the argmax
    loss_true = matching_loss(q_map, k_map, offset * 2, temperature=0.05)
    loss_shuffled = matching_loss(q_map, k_map.flip(-1), offset * 2, temperature=0.05)
    assert loss_true < 0.5 * loss_shuffled
    target, valid = matching_targets(q_map.shape[-2:], k_map.shape[-2:], offset * 2)
    sim = batch_patch_descriptors(q_map) @ batch_patch_descriptors(k_map).transpose(1, 2)
    interior = valid.view(2, 12, 12)[:, 1:-1, 1:-1].reshape(2, -1)
    hits = target.gather(2, sim.argmax(-1, keepdim=True))[..., 0].view(2, 12, 12)
    assert (hits[:, 1:-1, 1:-1].reshape(2, -1)[interior] == 1).float().mean() > 0.95
    # it trains the maps, and a batch without any valid query gives a 0 that backpropagates
    q = q_map.clone().requires_grad_(True)
    matching_loss(q, k_map, offset * 2).backward()
    assert q.grad.abs().sum() > 0
    far = matching_loss(q, k_map, torch.tensor([[100, 100], [-100, 0]]))
    assert far.item() == 0 and far.requires_grad


def test_total_loss_adds_the_matching_term_only_when_weighted():
    sr, hr = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    maps = (torch.rand(1, 4, 8, 8), torch.rand(1, 4, 6, 6), torch.tensor([[2, 2]]))
    _, terms = SDDuSRLoss()(sr, hr, None, maps)
    assert "match" not in terms
    total, terms = SDDuSRLoss(weights=LossWeights(match=0.5))(sr, hr, None, maps)
    assert terms["match"] > 0
    assert terms["total"] == pytest.approx(terms["rec"] + 0.5 * terms["match"], rel=1e-6)


def test_flow_photometric_loss_prefers_the_true_flow_whatever_the_exposure():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.interpolate(
        torch.rand(1, 3, 12, 12, generator=g), size=(40, 40), mode="bicubic", align_corners=False
    )
    dy, dx = 2, -3
    lrc = base[..., 4:36, 4:36]
    pooled = base[..., 4 + dy : 36 + dy, 4 + dx : 36 + dx]
    ref = pooled.repeat_interleave(2, -2).repeat_interleave(2, -1)  # avg-pools back to `pooled`
    true = torch.zeros(1, 2, 32, 32)
    true[:, 0], true[:, 1] = -dx, -dy  # (dx, dy) that samples pooled at p + flow = base at p + 4
    zero = torch.zeros(1, 2, 32, 32)
    at_true = flow_photometric_loss(lrc, ref, true, border=4).item()
    assert at_true < 0.01  # Charbonnier eps + no smoothness cost for a constant flow
    assert flow_photometric_loss(lrc, ref, zero, border=4) > 10 * at_true
    # exposure and white balance of the telephoto do not matter
    tinted = ref * torch.tensor([1.2, 0.9, 1.05]).view(1, 3, 1, 1) + 0.03
    tinted_loss = flow_photometric_loss(lrc, tinted, true, border=4).item()
    assert tinted_loss == pytest.approx(at_true, abs=1e-4)
    # it gives the flow a gradient, and a rough flow costs more than a smooth one
    f = zero.clone().requires_grad_(True)
    flow_photometric_loss(lrc, ref, f).backward()
    assert f.grad.abs().sum() > 0
    rough = true + 0.5 * torch.randn(1, 2, 32, 32, generator=g)
    assert flow_photometric_loss(lrc, ref, rough, smooth_weight=1.0) > flow_photometric_loss(
        lrc, ref, true, smooth_weight=1.0
    )


def test_flow_epe_loss_is_the_mean_end_point_error():
    true = torch.zeros(1, 2, 4, 4)
    pred = torch.zeros(1, 2, 4, 4)
    pred[:, 0], pred[:, 1] = 3.0, 4.0  # every vector 5 px off
    assert flow_epe_loss(pred, true).item() == pytest.approx(5.0)
    assert flow_epe_loss(true, true).item() == pytest.approx(0.0, abs=1e-5)

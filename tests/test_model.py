"""The networks in plain PyTorch: golden taps of the published code, shapes, both SFM forms."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from support import GOLDEN_DIR, TINY

from sddusr_engine import build_model
from sddusr_engine.kernels import get_ops
from sddusr_engine.model.matching import dense_match_train, sparse_match, warp_by_index


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def triplet(h=32, w=48, hc=16, wc=24, b=1):
    lr = torch.rand(b, 3, h, w)
    lrc = torch.rand(b, 3, hc, wc)
    ref = torch.rand(b, 3, 2 * hc, 2 * wc)
    return lr, lrc, ref


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN_DIR}")
    weights = load_file(str(GOLDEN_DIR / "kedusr_random_weights.safetensors"))
    io = load_file(str(GOLDEN_DIR / "kedusr_golden_io.safetensors"))
    model = build_model("kedusr")
    model.load_state_dict(weights, strict=True)
    model.eval()
    with torch.no_grad():
        sr, aux = model(io["in_lr"], io["in_lrc"], io["in_ref"], return_aux=True)
        trunk = model.lr_trunk(io["in_lr"])
    return io, sr, aux, trunk


@pytest.mark.parametrize(
    "tap, ours",
    [
        ("trunk_out_crop64", lambda aux, trunk: trunk),
        ("lr_fea_up_crop64", lambda aux, trunk: aux["f_lr"]),
        ("lrc_fea_up_crop64", lambda aux, trunk: aux["f_lrc"]),
        ("ref_fea_crop64", lambda aux, trunk: aux["f_ref"]),
        ("flow_lrc_res", lambda aux, trunk: aux["flow"]),
        ("ref_fea_align_crop64", lambda aux, trunk: aux["f_ref_align"]),
        ("confidence", lambda aux, trunk: aux["confidence"]),
        ("warp_sum_crop64", lambda aux, trunk: aux["warp_sum"]),
        ("fusion_block_crop64", lambda aux, trunk: aux["fusion_block"]),
    ],
)
def test_kedusr_reproduces_golden_taps(golden, tap, ours):
    io, _, aux, trunk = golden
    want = io[tap]
    got = ours(aux, trunk)[..., : want.shape[-2], : want.shape[-1]]
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-4, tap


def test_kedusr_reproduces_golden_output_and_index(golden):
    io, sr, aux, _ = golden
    assert sr.shape == io["out_sr"].shape == (1, 3, 256, 384)
    assert rel_err(sr, io["out_sr"]) < 1e-4
    assert torch.equal(aux["index"].reshape(1, -1), io["index"])


def test_published_key_list_loads_strictly(golden_dir):
    weights = load_file(str(golden_dir / "kedusr_random_weights.safetensors"))
    model = build_model("kedusr")
    assert len(weights) == 367
    assert sorted(model.state_dict()) == sorted(weights)
    assert sum(p.numel() for p in model.parameters()) == 5_625_039
    model.load_state_dict(weights, strict=True)


def test_kedusr_key_layout_without_golden_files():
    # The same facts from the network alone, so a user's clone (no ../shared) still checks them.
    model = build_model("kedusr")
    sd = model.state_dict()
    assert len(sd) == 367
    assert sum(p.numel() for p in model.parameters()) == 5_625_039
    assert sd["AdaFuison.conv1.weight"].shape == (128, 128, 3, 3)
    assert sd["Ref_align.dcnpack.conv_offset.weight"].shape == (216, 64, 3, 3)
    assert sd["spynet.basic_module.5.basic_module.8.weight"].shape == (2, 16, 7, 7)


@pytest.mark.parametrize("variant", ["sddusr", "kedusr"])
@pytest.mark.parametrize("hw", [(31, 45), (44, 26), (27, 19)])
def test_output_shapes_odd_and_portrait(variant, hw):
    h, w = hw
    model = build_model(variant, **TINY).eval()
    lr, lrc, ref = triplet(h, w, hc=12, wc=10)
    with torch.no_grad():
        sr = model(lr, lrc, ref)
    assert sr.shape == (1, 3, 2 * h, 2 * w)
    assert torch.isfinite(sr).all()


def test_pair_geometry_is_checked():
    model = build_model("sddusr", **TINY).eval()
    lr, lrc, _ = triplet()
    with pytest.raises(ValueError, match="twice LRC"):
        model(lr, lrc, torch.rand(1, 3, 30, 48))
    with pytest.raises(ValueError, match="even"):
        model(lr, torch.rand(1, 3, 15, 24), torch.rand(1, 3, 30, 48))


def test_training_gradients_reach_mask_generator_and_dictionaries():
    model = build_model("sddusr", **TINY).train()
    lr, lrc, ref = triplet(b=2)
    sr, aux = model(lr, lrc, ref, return_aux=True)
    assert sr.shape == (2, 3, 64, 96)
    loss = sr.square().mean() + aux["mask_prob_lr"].mean()
    loss.backward()
    for name in ("tdl.d_lrc", "tdl.d_ref", "tdl.s_logit", "mask_generator.body.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the straight-through path alone (no mask loss) must also reach the mask generator
    model.zero_grad()
    sr = model(lr, lrc, ref)
    sr.square().mean().backward()
    assert model.mask_generator.body[0].weight.grad.abs().sum() > 0
    # hard Gumbel mask: exactly 0 or 1
    assert set(aux["mask_lr"].unique().tolist()) <= {0.0, 1.0}


def _maps(seed=0, hq=(10, 14), hk=(6, 8), c=16, ch=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, c, *hq, generator=g)
    k = torch.randn(1, c, *hk, generator=g)
    ref = torch.randn(1, ch, 4 * hk[0], 4 * hk[1], generator=g)
    return q, k, ref


def test_all_ones_masks_equal_dense_matching_and_the_training_form():
    q, k, ref = _maps()
    ops = get_ops("torch")
    ones_q = torch.ones(1, 1, *q.shape[-2:], dtype=torch.bool)
    ones_k = torch.ones(1, 1, *k.shape[-2:], dtype=torch.bool)
    conf_d, idx_d, _ = sparse_match(q, k, None, None, ops.patch_match)
    conf_m, idx_m, _ = sparse_match(q, k, ones_q, ones_k, ops.patch_match)
    assert torch.equal(idx_d, idx_m) and torch.equal(conf_d, conf_m)
    warp = warp_by_index(ref, idx_d, ops.patch_warp)
    warp_t, conf_t = dense_match_train(q, k, ref, ones_q.float())
    torch.testing.assert_close(warp_t, warp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conf_t, conf_d, rtol=1e-5, atol=1e-6)


def test_sparse_matching_computes_only_active_pairs():
    q, k, ref = _maps(seed=1)
    ops = get_ops("torch")
    g = torch.Generator().manual_seed(3)
    q_mask = torch.rand(1, 1, *q.shape[-2:], generator=g) > 0.6
    k_mask = torch.rand(1, 1, *k.shape[-2:], generator=g) > 0.5
    conf, idx, stats = sparse_match(q, k, q_mask, k_mask, ops.patch_match)
    nq, nk = int(q_mask.sum()), int(k_mask.sum())
    assert stats["active_queries"] == nq and stats["active_keys"] == nk
    assert stats["pairs_evaluated"] == nq * nk < q[0, 0].numel() * k[0, 0].numel() / 3
    # inactive queries: no match, zero confidence; active ones point at active keys only
    assert (idx[~q_mask[:, 0]] == -1).all() and (conf[~q_mask] == 0).all()
    active_keys = k_mask.flatten().nonzero().flatten()
    assert torch.isin(idx[q_mask[:, 0]], active_keys).all()
    # a masked-out LR position contributes no warped patch
    warp = warp_by_index(ref, idx, ops.patch_warp)
    dense = warp_by_index(ref, torch.where(q_mask[:, 0], idx, -1), ops.patch_warp)
    assert torch.equal(warp, dense)


def test_inference_masks_both_sides_and_reports_work():
    model = build_model("sddusr", **TINY).eval()
    with torch.no_grad():  # force roughly half the positions active on each side
        model.mask_generator.body[-1].bias.copy_(torch.tensor([0.0, 0.0]))
    lr, lrc, ref = triplet()
    with torch.no_grad():
        _, aux = model(lr, lrc, ref, return_aux=True)
    st = aux["match_stats"]
    assert st["active_queries"] == int(aux["mask_lr"].sum())
    assert st["active_keys"] == int(aux["mask_lrc"].sum())
    assert st["pairs_evaluated"] == st["active_queries"] * st["active_keys"]
    assert (aux["confidence"][~aux["mask_lr"]] == 0).all()


@pytest.mark.parametrize("variant", ["sddusr", "kedusr"])
def test_same_input_same_output(variant):
    model = build_model(variant, **TINY).eval()
    lr, lrc, ref = triplet()
    with torch.no_grad():
        a = model(lr, lrc, ref)
        b = model(lr, lrc, ref)
    assert torch.equal(a, b)


def test_kedusr_training_form_equals_inference_form():
    model = build_model("kedusr", **TINY)
    lr, lrc, ref = triplet()
    with torch.no_grad():
        a = model.eval()(lr, lrc, ref)
        b = model.train()(lr, lrc, ref)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_match_temperature_changes_gradients_not_the_forward_pass():
    q, k, ref = _maps(seed=4)
    outs, grads = [], []
    for t in (1.0, 0.05):
        qq = q.clone().requires_grad_(True)
        warp, conf = dense_match_train(qq, k, ref, torch.ones(1, 1, *q.shape[-2:]), temperature=t)
        (warp.square().mean() + conf.mean()).backward()
        outs.append((warp.detach(), conf.detach()))
        grads.append(qq.grad)
    # the forward pass is the one-hot either way (up to the rounding of onehot + soft - soft)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert grads[1].abs().sum() > 2 * grads[0].abs().sum()  # sharper softmax, stronger signal


def test_warp_coverage_counts_the_patches_the_warp_sums():
    from sddusr_engine.kernels import patch_grid, patch_warp_reference
    from sddusr_engine.model.matching import warp_coverage

    torch.manual_seed(3)
    hv, wv, hq, wq = 40, 52, 9, 11
    n = patch_grid(hv)[0] * patch_grid(wv)[0]
    index = torch.randint(-1, n, (1, hq, wq))
    index[0, 2:5, 3:7] = -1  # a hole
    want = warp_by_index(torch.ones(1, 1, hv, wv), index, patch_warp_reference)
    got = warp_coverage((index >= 0)[:, None].float())
    assert torch.equal(got, want)
    assert got.max() <= 9 and set(got[..., 24:28, 28:32].unique().tolist()) <= {4.0, 6.0, 9.0}
    assert got.eq(0).any()  # the hole's middle


def test_covered_high_pass_is_the_image_detail_for_exact_matches():
    """Exact matches warp an image into a 2-px shifted copy. Divided by the true overlap, the warp
    is that copy exactly, and its detail is the copy's own. The mean-overlap form instead imprints
    the 4/6/9 overlap pattern."""
    from sddusr_engine.kernels import patch_grid, patch_warp_reference
    from sddusr_engine.model.matching import high_pass, high_pass_covered, warp_coverage

    torch.manual_seed(4)
    h, w = 64, 96
    img = F.interpolate(torch.rand(1, 3, h // 4, w // 4), size=(h, w), mode="bicubic") + 0.05 * (
        torch.rand(1, 3, h, w)
    )
    hq, wq = h // 4, w // 4
    nw = patch_grid(w)[0]
    ii, jj = torch.meshgrid(torch.arange(hq), torch.arange(wq), indexing="ij")
    index = (ii * nw + jj)[None]
    warp = warp_by_index(img, index, patch_warp_reference)
    cover = warp_coverage(torch.ones(1, 1, hq, wq))
    shifted = (warp / cover).roll((2, 2), (-2, -1))
    inner = (..., slice(8, -8), slice(8, -8))
    torch.testing.assert_close(shifted[inner], img[inner], rtol=0, atol=1e-6)
    alpha = torch.ones(1)
    ours = high_pass_covered(warp, cover, alpha).roll((2, 2), (-2, -1))
    # the same detail filter on the image itself, on the warp's (2-px shifted) 4x4 cell grid
    unshift = img.roll((-2, -2), (-2, -1))
    direct = high_pass_covered(unshift, torch.ones(1, 1, h, w), alpha).roll((2, 2), (-2, -1))
    torch.testing.assert_close(ours[inner], direct[inner], rtol=0, atol=1e-5)
    # the published form differs from the image's own detail by the overlap pattern
    published = high_pass(warp, alpha).roll((2, 2), (-2, -1))
    assert (published - direct)[inner].abs().mean() > 10 * (ours - direct)[inner].abs().mean()
    # holes: zero detail inside, and no ring of large values around them
    index[0, 6:10, 8:14] = -1
    holed = warp_by_index(img, index, patch_warp_reference)
    cov = warp_coverage((index >= 0)[:, None].float())
    hf = high_pass_covered(holed, cov, alpha)
    assert hf[cov.expand_as(hf) == 0].abs().max() == 0
    assert hf.abs().max() < 2 * high_pass_covered(warp, cover, alpha).abs().max()


def test_warp_low_band_adds_the_low_band_the_detail_map_removes():
    """warp_low_band: detail + gain * low band, per channel, zero in the holes; the gain starts
    at zero (the network computes what it did without it) and learns (it gets gradient)."""
    from sddusr_engine import build_model
    from sddusr_engine.config import ModelConfig
    from sddusr_engine.model.matching import high_pass_covered, warp_coverage

    torch.manual_seed(6)
    warp = torch.rand(1, 3, 32, 40) * 5
    active = (torch.rand(1, 1, 8, 10) > 0.3).float()
    cov = warp_coverage(active)
    alpha, gain = torch.tensor([0.7]), torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    detail = high_pass_covered(warp, cov, alpha)
    with_low = high_pass_covered(warp, cov, alpha, gain)
    # the low band itself, from its definition: warped minus detail/(2 alpha), where covered
    covered = cov > 0
    low = (warp / cov.clamp_min(1.0)) - detail / (2 * alpha)
    want = detail + gain * low * covered
    torch.testing.assert_close(with_low, want, rtol=1e-5, atol=1e-5)
    assert with_low[~covered.expand_as(with_low)].abs().max() == 0
    torch.testing.assert_close(high_pass_covered(warp, cov, alpha, torch.zeros_like(gain)), detail)
    with pytest.raises(ValueError, match="warp_low_band needs"):
        ModelConfig(warp_low_band=True)
    # in the network: zero gain = the same output; the gain is trained
    base = build_model("sddusr", **TINY, warp_norm="coverage").eval()
    low_net = build_model("sddusr", **TINY, warp_norm="coverage", warp_low_band=True).eval()
    low_net.load_state_dict(base.state_dict(), strict=False)
    lr, lrc, ref = torch.rand(1, 3, 32, 40), torch.rand(1, 3, 16, 16), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(low_net(lr, lrc, ref), base(lr, lrc, ref), rtol=0, atol=0)
    low_net.train()
    low_net(lr, lrc, ref).square().mean().backward()
    assert low_net.low_band_gain.grad.abs().max() > 0


@pytest.mark.parametrize("variant", ["sddusr", "kedusr"])
@pytest.mark.parametrize("band_rows", [8, 16, 24])
def test_reference_context_in_bands_equals_the_whole(variant, band_rows):
    """Bands of Ref rows (ragged: 44 rows is not a multiple of any band), each stage with its
    halo, give the whole pass's context: the aligned features, the LRC matching map and its SFM
    mask, the dictionaries. Larger flows and offsets than a random network's come from scaling
    the flow network's last layer, so the alignment's samples reach outside their band."""
    torch.manual_seed(3)
    m = build_model(variant, **{**TINY, "encoder_blocks": 2}).eval()
    with torch.no_grad():
        for level in m.spynet.basic_module:
            level.basic_module[-1].weight.mul_(40.0)
        m.Ref_align.dcnpack.conv_offset.weight.normal_(0.0, 0.05)
    lrc = torch.rand(1, 3, 22, 30)
    ref = torch.rand(1, 3, 44, 60)
    ticks = []
    with torch.no_grad():
        whole = m.reference_context(lrc, ref, keep_taps=False)
        banded = m.reference_context(lrc, ref, band_rows=band_rows, tick=lambda: ticks.append(1))
    assert len(ticks) == m.reference_bands((44, 60), band_rows)
    # bands read F_Ref from a window of its rows, and the flow's warp normalises its coordinates
    # by the window's height: they round differently (6e-5 with these flows of tens of pixels)
    assert rel_err(banded.f_ref_align, whole.f_ref_align) < 2e-4
    assert rel_err(banded.key_map, whole.key_map) < 1e-5
    if variant == "sddusr":
        assert torch.equal(banded.key_mask, whole.key_mask)
        assert rel_err(banded.dicts.keys, whole.dicts.keys) < 1e-5
        assert rel_err(banded.dicts.values, whole.dicts.values) < 1e-5
    else:
        assert banded.key_mask is None and whole.key_mask is None


def test_reference_bands_are_checked():
    m = build_model("sddusr", **TINY).eval()
    with pytest.raises(ValueError, match="multiple of 8"):
        m.reference_context(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 16, 16), band_rows=12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("masked", [False, True])
def test_matching_in_row_bands_equals_one_call(backend, masked):
    """Bands of query rows (ragged: 13 rows in 4 bands), each with a row of masked-out context,
    give one call's scores and indices, and on the reference its counted work; `tick` once per
    band."""
    torch.manual_seed(7)
    q, k = torch.randn(1, 8, 13, 11), torch.randn(1, 8, 6, 9)
    qm = (torch.rand(1, 1, 13, 11) > 0.3) if masked else None
    km = (torch.rand(1, 1, 6, 9) > 0.3) if masked else None
    op = get_ops(backend).patch_match
    want = sparse_match(q, k, qm, km, op)
    ticks = []
    got = sparse_match(q, k, qm, km, op, row_bands=4, tick=lambda: ticks.append(1))
    assert len(ticks) == 4
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    if backend == "torch":
        assert got[2] == want[2]
    else:  # the kernel counts whole blocks of pairs: padded per band
        assert got[2]["active_queries"] == want[2]["active_queries"]
        assert got[2]["pairs_evaluated"] >= want[2]["pairs_evaluated"]


@pytest.mark.parametrize("hw, band_rows", [((200, 96), 8), ((130, 260), 40), ((70, 50), 64)])
def test_spynet_in_bands_is_the_whole_flow(hw, band_rows):
    """Each pyramid level's convolutions in row bands (the banded reference context's flow): the
    whole pass's flow, where the finest levels span several bands and the coarse ones one."""
    from sddusr_engine.model.flow import SpyNet

    torch.manual_seed(0)
    net = SpyNet().eval()
    with torch.no_grad():
        for p in net.basic_module.parameters():
            p.normal_(0, 0.05)  # a flow of tens of pixels: every conv matters
        a, b = torch.rand(1, 3, *hw), torch.rand(1, 3, *hw)
        want, got = net(a, b), net(a, b, band_rows)
    assert want.abs().max() > 10
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_alignment_reads_only_the_rows_its_flow_reaches():
    """A band aligned from the F_Ref rows `reach` names (flows of tens of rows, offsets at the
    tanh limit) equals the band aligned from the whole map; rows short of the reach do not."""
    from sddusr_engine.kernels import get_ops

    torch.manual_seed(0)
    align = build_model("sddusr", **TINY).Ref_align.eval()
    with torch.no_grad():
        align.dcnpack.conv_offset.weight.normal_(0.0, 0.5)  # offsets near +-15
    c, h, w = 16, 120, 24
    f_ref, f_lrc = torch.randn(1, c, h, w), torch.randn(1, c, h, w)
    flow = torch.zeros(1, 2, h, w)
    flow[:, 1] = 12.0 * torch.sin(torch.arange(h)[:, None] / 9.0 + torch.arange(w) / 5.0)
    flow[:, 0] = 3.0 * torch.randn(h, w)
    deform = get_ops("torch").deform_conv2d
    a0, a1, rows = 40, 70, slice(3, 27)
    with torch.no_grad():
        want = align.band(f_ref, f_lrc[..., a0:a1, :], flow[..., a0:a1, :], a0, rows, deform)
        lo, hi = align.reach(flow[..., a0:a1, :], a0, h)
        assert 0 < lo < a0 and a1 < hi < h  # a window, not the whole map
        got = align.band(f_ref[..., lo:hi, :], f_lrc[..., a0:a1, :], flow[..., a0:a1, :],
                         a0, rows, deform, lo)  # fmt: skip
        short = align.band(f_ref[..., lo + 12 : hi, :], f_lrc[..., a0:a1, :],
                           flow[..., a0:a1, :], a0, rows, deform, lo + 12)  # fmt: skip
    assert rel_err(got, want) < 2e-4  # the warp's normalised coordinates round differently
    assert rel_err(short, want) > 1e-2


def test_row_window_computes_each_chunk_once_going_down():
    from sddusr_engine.model.bands import RowWindow

    conv = torch.nn.Conv2d(3, 4, 5, padding=2)
    x = torch.randn(1, 3, 50, 9)
    with torch.no_grad():
        want = conv(x)
        window = RowWindow(conv, x, 8, 2)
        for lo, hi in [(0, 5), (3, 20), (10, 30), (29, 50), (44, 50)]:
            assert torch.allclose(window.rows(lo, hi), want[..., lo:hi, :], atol=1e-6)
            assert min(window.chunks) == lo // 8  # chunks above the window are let go
        assert window.computed == 7  # ceil(50 / 8): each once
        assert torch.allclose(window.rows(0, 50), want, atol=1e-6)  # back up: recomputed
        assert window.computed == 12  # the two still held are not
    with pytest.raises(ValueError, match="outside"):
        window.rows(10, 51)


def test_banded_reference_context_holds_a_window_of_f_ref(monkeypatch):
    """With flows of a few rows, the banded context never holds all of F_Ref at once, and its
    output is the whole pass's."""
    from sddusr_engine.model import bands

    most = []
    real_rows = bands.RowWindow.rows

    def spy(self, lo, hi):
        out = real_rows(self, lo, hi)
        most.append(len(self.chunks))
        return out

    monkeypatch.setattr(bands.RowWindow, "rows", spy)
    torch.manual_seed(4)
    m = build_model("sddusr", **TINY).eval()
    with torch.no_grad():
        m.Ref_align.dcnpack.conv_offset.weight.normal_(0.0, 0.05)
    lrc, ref = torch.rand(1, 3, 96, 20), torch.rand(1, 3, 192, 40)
    with torch.no_grad():
        whole = m.reference_context(lrc, ref, keep_taps=False)
        banded = m.reference_context(lrc, ref, band_rows=16)
    assert rel_err(banded.f_ref_align, whole.f_ref_align) < 1e-5
    assert rel_err(banded.dicts.values, whole.dicts.values) < 1e-5
    assert len(most) == 12 and max(most) < 12  # 12 chunks of 16 rows, never all at once

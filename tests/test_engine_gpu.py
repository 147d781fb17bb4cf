"""GPU-only engine checks (bench/gpu_check.sh runs them): precisions against fp32 on the sample
pair, and the Triton backend against the torch backend on a full-width network."""

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sddusr_engine import build_model
from sddusr_engine.engine import Engine
from sddusr_engine.io import read_image
from sddusr_engine.metrics import psnr
from sddusr_engine.weights import DEFAULT_WEIGHTS

pytestmark = pytest.mark.gpu
SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "sample"


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped weights not present")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precisions_within_a_tenth_of_a_db_of_fp32(precision):
    wide, tele = read_image(SAMPLE / "wide.jpg"), read_image(SAMPLE / "tele.jpg")
    ref32 = Engine.from_pretrained(device="cuda", dtype="fp32", backend="torch").super_resolve(
        wide, tele
    )
    out = Engine.from_pretrained(device="cuda", dtype=precision, backend="triton").super_resolve(
        wide, tele
    )
    # PSNR of each against the fp32 output's own bicubic-free reference: compare to fp32 directly
    hr_like = ref32.astype(np.float64)
    assert psnr(out.astype(np.float64), hr_like) > 40.0  # the two outputs are close overall
    # the drop in PSNR against a common target (the fp32 output blurred) is under 0.1 dB
    import cv2

    target = cv2.GaussianBlur(ref32, (0, 0), 1.0).astype(np.float64)
    assert abs(psnr(out.astype(np.float64), target) - psnr(hr_like, target)) < 0.1


@contextlib.contextmanager
def _true_fp32():
    """cuDNN's convolutions default to tf32 on these cards, and tiles and the whole image convolve
    tensors of different shapes, so tf32 alone makes them differ by ~1e-3: compare in true fp32."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _random_triplet():
    return torch.rand(1, 3, 200, 264), torch.rand(1, 3, 100, 132), torch.rand(1, 3, 200, 264)


@pytest.mark.parametrize("variant", ["sddusr", "kedusr"])
def test_triton_backend_matches_torch_backend_fp32(variant):
    torch.manual_seed(0)
    model = build_model(variant)
    lr, lrc, ref = _random_triplet()
    with _true_fp32():
        a = Engine(model, "cuda", "fp32", "torch", tile=0).run(lr, lrc, ref)
        b = Engine(model, "cuda", "fp32", "triton", tile=96).run(lr, lrc, ref)
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["kedusr", "sddusr"])
def test_bounded_gpu_memory_grows_only_by_the_small_whole_maps(variant, monkeypatch):
    """Bounded tiles on a GPU keep the whole maps in host memory: a photo with four times the
    pixels (wide and telephoto alike) adds only what the device still holds whole, per LR pixel
    with as many Ref pixels (fp16): the inputs (LR, Ref, LRC and Ref pooled: 6 + 6 + 3), the flow
    at Ref resolution (2 channels: 4), the LRC keys' map and their descriptors with a compacted
    copy (16, 144 and 144 values per key, a key per 16 Ref pixels: 38), the match index and
    score (12 bytes per query, a query per 4 LR pixels: 3). About 60 bytes (the low-band
    projection, which these weights lack, widens LR band by band); one device-resident trunk map
    alone is 128, and the plan with whole maps on the device held three and F_Ref_align besides. The matching runs in bands
    of 4096 queries here, as it does in bands of 2^19 on photos of millions of queries, and the
    sddusr trunk's maps wait on the host, as they do above `TRUNK_DEVICE_BYTES`."""
    from sddusr_engine.engine import tiling

    monkeypatch.setattr(tiling, "MATCH_BAND_QUERIES", 4096)
    monkeypatch.setattr(tiling, "TRUNK_DEVICE_BYTES", 0)  # as for a photo of more than ~4 MP
    torch.manual_seed(0)
    model = build_model(variant)
    eng = Engine(model, "cuda", "fp16", "triton", tile=128)
    peaks, pixels = {}, {}
    for k in (1, 2):
        h, w = 256 * k, 384 * k
        lr, ref = torch.rand(1, 3, h, w), torch.rand(1, 3, h, w)
        lrc = torch.rand(1, 3, h // 2, w // 2)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _, info = eng.run(lr, lrc, ref, return_info=True)
        assert info.host_maps and info.tile == 128
        peaks[k], pixels[k] = torch.cuda.max_memory_allocated() - base, h * w
    grown = (peaks[2] - peaks[1]) / (pixels[2] - pixels[1])
    assert grown < 2 * 60, f"{grown:.0f} bytes per LR pixel"


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_results_do_not_share_the_staging_buffer(dtype):
    """The page-locked buffer is reused between runs; the returned tensors must not be it."""
    torch.manual_seed(0)
    eng = Engine(build_model("sddusr", channels=16, tokens=8, token_dim=16), "cuda", dtype)
    lrc, ref = torch.rand(1, 3, 32, 48), torch.rand(1, 3, 64, 96)
    first = eng.run(torch.rand(1, 3, 96, 128), lrc, ref)
    kept = first.clone()
    second = eng.run(torch.rand(1, 3, 96, 128), lrc, ref)
    assert first.device.type == "cpu" and first.dtype == torch.float32
    assert torch.equal(first, kept) and not torch.equal(first, second)
    assert not eng.channels_last  # the default (bench/RESULTS.md says why)


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped weights not present")
def test_self_adaptation_on_the_gpu_keeps_the_centre_and_matches_fp32():
    """`--adapt` on CUDA: the fine-tune runs in fp32 on the torch ops, the adapted pass in fp16
    on the Triton kernels; the centre is the plain run's, the corners change, and the result is
    within the half-precision budget of the fp32 torch run."""
    wide, tele = read_image(SAMPLE / "wide.jpg"), read_image(SAMPLE / "tele.jpg")
    plain, _ = Engine.from_pretrained(device="cuda", dtype="fp16").super_resolve(
        wide, tele, return_info=True
    )
    fast = Engine.from_pretrained(device="cuda", dtype="fp16", backend="triton", adapt=20)
    out, info = fast.super_resolve(wide, tele, return_info=True)
    assert info.adapt_steps == 20 and info.timings["adapt"] > 0
    assert not any("self-adaptation" in w for w in info.warnings)
    y0, y1, x0, x1 = (2 * v for v in info.box_lr)
    m = 24  # beyond the blend's ramp
    inner = np.s_[y0 + m : y1 - m, x0 + m : x1 - m]
    assert np.abs(out[inner].astype(int) - plain[inner].astype(int)).max() <= 1
    assert np.abs(out[:16].astype(int) - plain[:16].astype(int)).max() > 0
    ref32 = Engine.from_pretrained(device="cuda", dtype="fp32", backend="torch", adapt=20)
    assert psnr(out.astype(np.float64), ref32.super_resolve(wide, tele).astype(np.float64)) > 40.0


@pytest.mark.parametrize("variant", ["sddusr", "kedusr"])
def test_every_plan_and_the_unfused_detail_match_the_whole_pass_fp32(variant):
    """On CUDA with the triton backend: tiles keeping the fusion maps, bounded tiles and the
    whole pass agree, and so do the fused reference detail and the PyTorch ops it replaces."""
    torch.manual_seed(0)
    model = build_model(variant)
    lr, lrc, ref = _random_triplet()
    with _true_fp32():
        whole = Engine(model, "cuda", "fp32", "triton", tile=0).run(lr, lrc, ref)
        for keep in (True, False):
            eng = Engine(model, "cuda", "fp32", "triton", tile=96, keep_fusion_maps=keep)
            out, info = eng.run(lr, lrc, ref, return_info=True)
            assert info.fusion_maps is keep
            assert (out - whole).abs().max().item() < 1e-4, keep
        eng = Engine(model, "cuda", "fp32", "triton", tile=0)
        eng.model.ops = eng.model.ops._replace(fused_detail=None)
        unfused = eng.run(lr, lrc, ref)
    assert (unfused - whole).abs().max().item() < 1e-4


def test_host_resident_trunk_and_reference_maps_on_cuda_fp32():
    """The bounded plan's pieces with their whole maps in page-locked host memory and the bands
    computed on the GPU: the banded trunk and F_Ref_align, against the device-resident ones."""
    from sddusr_engine.model.trunk_bands import trunk_in_bands

    torch.manual_seed(4)
    model = build_model("sddusr").to("cuda").eval().use_kernels("triton")
    lr, lrc, ref = (t.cuda() for t in _random_triplet())
    host = torch.device("cpu")
    with _true_fp32(), torch.inference_mode():
        # the same bands on the same device (a band copied there, not a view of a device map:
        # equal up to a convolution algorithm that might treat the two layouts differently)
        want = trunk_in_bands(model.SISR, lr, 32)
        got = trunk_in_bands(model.SISR, lr, 32, home=host)
        assert got.device == host and got.is_pinned()
        assert (got - want.cpu()).abs().max() <= 1e-6 * want.abs().max()
        on_device = model.reference_context(lrc, ref, keep_taps=False, band_rows=48)
        hosted = model.reference_context(lrc, ref, keep_taps=False, band_rows=48, home=host)
        f, g = hosted.f_ref_align, on_device.f_ref_align.cpu()
        assert f.device == host and f.is_pinned()
        assert (f - g).abs().max() <= 1e-6 * g.abs().max()


def test_banded_reference_context_and_trunk_on_cuda_fp32():
    """The bounded plan's banded pieces with the Triton kernels: the reference context in bands
    (the deformable conv reading a window of F_Ref rows from a row offset) with flows of tens of
    pixels, and the trunk in bands, against their whole passes."""
    from sddusr_engine.model.trunk_bands import trunk_in_bands

    torch.manual_seed(3)
    model = build_model("sddusr")
    with torch.no_grad():
        for level in model.spynet.basic_module:
            level.basic_module[-1].weight.mul_(40.0)
        model.Ref_align.dcnpack.conv_offset.weight.normal_(0.0, 0.05)
    model = model.to("cuda").eval().use_kernels("triton")
    lr, lrc, ref = (t.cuda() for t in _random_triplet())
    with _true_fp32(), torch.inference_mode():
        whole = model.reference_context(lrc, ref, keep_taps=False)
        banded = model.reference_context(lrc, ref, band_rows=48)
        scale = whole.f_ref_align.abs().max()
        assert (banded.f_ref_align - whole.f_ref_align).abs().max() <= 2e-4 * scale
        assert (banded.dicts.values - whole.dicts.values).abs().max() <= 1e-3
        want = model.SISR(lr)
        got = trunk_in_bands(model.SISR, lr, 32)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()

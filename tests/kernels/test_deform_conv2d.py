"""deform_conv2d: torchvision goldens, an offsets-zero = conv2d check, kernel vs reference, tl.dot K."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sddusr_engine.kernels import (
    deform_conv2d,
    deform_conv2d_reference,
    deform_conv2d_sampled,
    get_ops,
)
from sddusr_engine.kernels._launch import is_interpreter

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _inputs(b, cin, h, w, cout, g, dtype, kh=3, kw=3, device="cpu", spread=3.0):
    k = kh * kw
    x = torch.randn(b, cin, h, w, device=device)
    off = torch.randn(b, 2 * g * k, h + 3 - kh, w + 3 - kw, device=device) * spread
    mask = torch.rand(b, g * k, h + 3 - kh, w + 3 - kw, device=device)
    wt = torch.randn(cout, cin, kh, kw, device=device) / (cin * k) ** 0.5
    bias = torch.randn(cout, device=device)
    return [t.to(dtype) for t in (x, off, mask, wt, bias)]


@pytest.mark.parametrize("case", [0, 1, 2])
@pytest.mark.parametrize("impl", [deform_conv2d_reference, deform_conv2d_sampled, deform_conv2d])
def test_torchvision_golden(golden_dir, close, case, impl):
    d = load_file(str(golden_dir / "deform_conv2d_golden.safetensors"))
    x, off, mask, w, b = (d[f"case{case}_{n}"] for n in ("x", "offset", "mask", "weight", "bias"))
    got = impl(x, off, mask, w, b, padding=1, offset_groups=off.shape[1] // 18)
    close(got, d[f"case{case}_out"], 1e-5, f"{impl.__name__} case{case}")


def test_zero_offsets_unit_mask_is_conv2d(close):
    x, off, mask, w, b = _inputs(2, 6, 7, 5, 4, 2, torch.float32)
    off.zero_()
    mask.fill_(1.0)
    want = F.conv2d(x, w, b, padding=1)
    close(deform_conv2d_reference(x, off, mask, w, b), want, 1e-5, "reference")
    close(deform_conv2d_reference(x, off, None, w, b), want, 1e-5, "reference, mask None")
    close(deform_conv2d(x, off, None, w, b), want, 1e-5, "kernel, mask None")
    close(deform_conv2d_sampled(x, off, None, w, b), want, 1e-5, "sampled, mask None")


def test_integer_offsets_shift_the_sample(close):
    x, off, mask, w, _ = _inputs(1, 2, 6, 7, 3, 1, torch.float32)
    off.zero_()
    off[:, 0::2] = 1.0  # every tap samples one row lower: tap i of row y reads row y + i
    want = F.conv2d(F.pad(x, (1, 1, 0, 2)), w)
    close(deform_conv2d_reference(x, off, None, w), want, 1e-5, "reference")


@pytest.mark.parametrize("impl", [deform_conv2d_reference, deform_conv2d_sampled])
def test_row_chunks(monkeypatch, close, impl):
    """The torch paths' chunks of output rows (here one row each) change nothing."""
    import importlib

    mod = importlib.import_module("sddusr_engine.kernels.deform_conv2d")
    x, off, mask, w, b = _inputs(2, 4, 9, 6, 5, 2, torch.float32)
    whole = impl(x, off, mask, w, b)
    monkeypatch.setattr(mod, "_REF_CHUNK_ELEMS", 1)
    close(impl(x, off, mask, w, b), whole, 1e-6, "row chunks")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "b,cin,h,w,cout,g,kh,kw,pad",
    [(1, 16, 13, 17, 16, 8, 3, 3, 1), (2, 8, 7, 5, 5, 1, 3, 3, 1), (1, 12, 6, 9, 7, 3, 1, 3, 0)],
)
def test_kernel_matches_reference(close, dtype, b, cin, h, w, cout, g, kh, kw, pad):
    k = kh * kw
    ho, wo = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
    x = torch.randn(b, cin, h, w).to(dtype)
    off = (torch.randn(b, 2 * g * k, ho, wo) * 3).to(dtype)
    mask = torch.rand(b, g * k, ho, wo).to(dtype)
    wt = (torch.randn(cout, cin, kh, kw) / (cin * k) ** 0.5).to(dtype)
    bias = torch.randn(cout).to(dtype)
    got = deform_conv2d(x, off, mask, wt, bias, padding=pad)
    assert got.dtype == dtype and got.shape == (b, cout, ho, wo)
    close(got, deform_conv2d_reference(x, off, mask, wt, bias, padding=pad), TOL[dtype], "kernel")


def test_validation_errors():
    x, off, mask, w, b = _inputs(1, 8, 5, 5, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="offset_groups"):
        deform_conv2d(x, off, mask, w, b, offset_groups=4)
    with pytest.raises(ValueError, match="mask"):
        deform_conv2d(x, off, mask[:, :9], w, b)
    with pytest.raises(ValueError, match="weight"):
        deform_conv2d_reference(x, off, mask, w[:, :4], b)
    with pytest.raises(ValueError, match="dtype"):
        deform_conv2d(x, off.half(), mask, w, b)


def test_every_dot_has_k_at_least_16(record_dots):
    x, off, mask, w, b = _inputs(1, 2, 4, 5, 3, 1, torch.float32)  # Cin = 2, Cout = 3: padded
    deform_conv2d(x, off, mask, w, b)
    if is_interpreter():
        assert record_dots and all(kk >= 16 for _, kk, _ in record_dots), record_dots


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_matches_reference(close, dtype):
    x, off, mask, w, b = _inputs(2, 64, 67, 53, 64, 8, dtype, device="cuda")
    want = deform_conv2d_reference(x, off, mask, w, b)
    close(deform_conv2d(x, off, mask, w, b), want, TOL[dtype], "cuda")


@pytest.mark.gpu
def test_gpu_golden(golden_dir, close):
    d = load_file(str(golden_dir / "deform_conv2d_golden.safetensors"), device="cuda")
    for case in range(3):
        x, off, mask, w, b = (
            d[f"case{case}_{n}"] for n in ("x", "offset", "mask", "weight", "bias")
        )
        close(deform_conv2d(x, off, mask, w, b), d[f"case{case}_out"], 1e-5, f"cuda case{case}")


@pytest.mark.parametrize(
    "b,cin,h,w,cout,g,kh,kw,pad,spread",
    [
        (1, 16, 13, 17, 16, 8, 3, 3, 1, 3.0),
        (2, 8, 7, 5, 5, 1, 3, 3, 1, 3.0),
        (1, 12, 6, 9, 7, 3, 1, 3, 0, 3.0),
        (1, 6, 31, 40, 6, 2, 3, 3, 1, 25.0),  # most samples far outside the map
        (1, 6, 1, 9, 4, 3, 3, 3, 1, 3.0),  # one row: the reference's arithmetic
    ],
)
def test_sampled_path_matches_reference(close, b, cin, h, w, cout, g, kh, kw, pad, spread):
    """grid_sample's sampling agrees with the gathers on ragged shapes, offsets outside the map
    included; sample positions are rounded by the [-1, 1] normalisation, hence 1e-5."""
    k = kh * kw
    ho, wo = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
    x = torch.randn(b, cin, h, w)
    off = torch.randn(b, 2 * g * k, ho, wo) * spread
    mask = torch.rand(b, g * k, ho, wo)
    wt = torch.randn(cout, cin, kh, kw) / (cin * k) ** 0.5
    bias = torch.randn(cout)
    want = deform_conv2d_reference(x, off, mask, wt, bias, padding=pad)
    got = deform_conv2d_sampled(x, off, mask, wt, bias, padding=pad)
    assert got.shape == want.shape and got.dtype == torch.float32
    close(got, want, 1e-5, "sampled")
    half = deform_conv2d_sampled(x.half(), off.half(), mask.half(), wt.half(), bias.half(), pad)
    assert half.dtype == torch.float16
    close(half, deform_conv2d_reference(x.half(), off.half(), mask.half(), wt.half(),
                                        bias.half(), pad), TOL[torch.float16], "sampled fp16")  # fmt: skip


def test_torch_backend_samples_for_cpu_inference_and_gathers_for_training():
    """The torch backend's op: the sampled path under no_grad on the CPU, the reference (exactly)
    where gradients flow, so training keeps the reference's backward."""
    x, off, mask, w, b = _inputs(1, 8, 11, 13, 4, 2, torch.float32)
    op = get_ops("torch").deform_conv2d
    with torch.no_grad():
        assert torch.equal(op(x, off, mask, w, b), deform_conv2d_sampled(x, off, mask, w, b))
    x.requires_grad_(True)
    trained = op(x, off, mask, w, b)
    assert torch.equal(trained.detach(), deform_conv2d_reference(x, off, mask, w, b).detach())
    trained.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", [deform_conv2d_reference, deform_conv2d_sampled, deform_conv2d])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [(0, 5), (3, 11), (10, 13), (12, 13)])
def test_a_band_of_rows_is_those_rows_of_the_whole(close, impl, dtype, rows):
    """`row0`: the band's offsets and mask give exactly the band's rows of the whole output (x
    whole, samples reaching far above and below the band), on ragged sizes."""
    x, off, mask, w, b = _inputs(1, 16, 13, 17, 12, 8, dtype, spread=6.0)
    whole = impl(x, off, mask, w, b)
    r0, r1 = rows
    band = impl(x, off[:, :, r0:r1], mask[:, :, r0:r1], w, b, row0=r0)
    assert band.shape == (1, 12, r1 - r0, 17) and band.dtype == dtype
    close(band, whole[:, :, r0:r1], 1e-6 if dtype == torch.float32 else TOL[dtype], "band")


def test_a_band_must_fit_inside_the_output():
    x, off, mask, w, b = _inputs(1, 8, 9, 6, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="exceed the 9 output rows"):
        deform_conv2d_reference(x, off[:, :, 4:], mask[:, :, 4:], w, b, row0=5)
    with pytest.raises(ValueError, match="row0 must be"):
        deform_conv2d_sampled(x, off, mask, w, b, row0=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_band_of_rows_matches_the_whole(close, dtype):
    x, off, mask, w, b = _inputs(1, 64, 70, 90, 64, 8, dtype, device="cuda", spread=8.0)
    whole = deform_conv2d(x, off, mask, w, b)
    band = deform_conv2d(x, off[:, :, 24:57], mask[:, :, 24:57], w, b, row0=24)
    close(band, whole[:, :, 24:57], 1e-6 if dtype == torch.float32 else TOL[dtype], "gpu band")

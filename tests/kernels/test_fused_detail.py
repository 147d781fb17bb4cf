"""fused_detail: the reference against the model's high-pass functions, the Triton kernel against
the reference (ragged shapes, holes, both norms, both layouts of out), validation."""

from __future__ import annotations

import pytest
import torch

from sddusr_engine.kernels import fused_detail, fused_detail_reference
from sddusr_engine.model.matching import high_pass, high_pass_covered, warp_coverage

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _inputs(c, hq, wq, holes=0.3, dtype=torch.float32, device="cpu"):
    """A warp sum, a gate in (0, 1), alpha, an index map with holes and a per-channel gain."""
    shape = (c, 4 * hq, 4 * wq)
    ws = (torch.randn(shape, device=device) * 3).to(dtype)
    gate = torch.rand(shape, device=device).to(dtype)
    alpha = torch.tensor([1.7], device=device)
    index = torch.randint(0, 1000, (hq, wq), device=device)
    index[torch.rand(hq, wq, device=device) < holes] = -1
    return ws, gate, alpha, index, torch.randn(c, device=device)


@pytest.mark.parametrize(
    "norm,gain", [("constant", False), ("coverage", False), ("coverage", True)]
)
def test_reference_is_the_model_functions_times_the_gate(close, norm, gain):
    ws, gate, alpha, index, g = _inputs(5, 6, 7)
    g = g if gain else None
    if norm == "constant":
        want = high_pass(ws[None], alpha) * gate[None]
    else:
        coverage = warp_coverage((index >= 0)[None, None].float())
        gain4 = None if g is None else g.view(1, -1, 1, 1)
        want = high_pass_covered(ws[None], coverage, alpha, gain4) * gate[None]
    got = fused_detail_reference(ws, gate, alpha, norm=norm, index=index, low_gain=g)
    close(got, want[0], 1e-6, f"reference {norm}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "c,hq,wq,holes",
    [(3, 5, 7, 0.3), (33, 3, 11, 0.5), (3, 1, 1, 0.0), (33, 7, 2, 1.0), (3, 2, 37, 0.3)],
)
def test_kernel_matches_reference(close, dtype, c, hq, wq, holes):
    ws, gate, alpha, index, gain = _inputs(c, hq, wq, holes, dtype)
    for norm, g in (("constant", None), ("coverage", None), ("coverage", gain)):
        want = fused_detail_reference(ws, gate, alpha, norm=norm, index=index, low_gain=g)
        got = fused_detail(ws, gate, alpha, norm=norm, index=index, low_gain=g)
        assert got.dtype == dtype and got.shape == ws.shape
        close(got, want, TOL[dtype], f"{norm} gain={g is not None} {dtype}")


def test_coverage_footprint_and_no_matches():
    ws, gate, alpha, index, _ = _inputs(4, 3, 5, holes=0.0)
    index[:, 2:] = -1  # the queries left, in columns 0 and 1, cover pixel columns 0..8
    out = fused_detail(ws, gate, alpha, norm="coverage", index=index)
    assert out[:, :, :9].ne(0).all() and not out[:, :, 9:].any()
    index[:] = -1
    assert not fused_detail(ws, gate, alpha, norm="coverage", index=index).any()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("norm", ["constant", "coverage"])
def test_out_is_a_channel_slice_of_a_bigger_tensor(close, layout, norm):
    c, hq, wq, ctot, c0 = 6, 3, 5, 13, 4
    ws, gate, alpha, index, gain = _inputs(c, hq, wq)
    gain = gain if norm == "coverage" else None
    big = torch.full((1, ctot, 4 * hq, 4 * wq), 7.0)
    if layout == "channels_last":
        big = big.to(memory_format=torch.channels_last)
        # inputs in the same layout: channel-contiguous [C, H, W] views
        ws, gate = (t.permute(1, 2, 0).contiguous().permute(2, 0, 1) for t in (ws, gate))
        assert ws.stride() == (1, 4 * wq * c, c)
    before = big.clone()
    out = big[0, c0 : c0 + c]
    h, w = 4 * hq, 4 * wq
    assert out.stride() == ((1, w * ctot, ctot) if layout == "channels_last" else (h * w, w, 1))
    want = fused_detail_reference(ws, gate, alpha, norm=norm, index=index, low_gain=gain)
    got = fused_detail(ws, gate, alpha, norm=norm, index=index, low_gain=gain, out=out)
    assert got is out
    close(out, want, TOL[torch.float32], f"{layout} slice")
    outside = torch.ones(ctot, dtype=torch.bool)
    outside[c0 : c0 + c] = False
    assert torch.equal(big[:, outside], before[:, outside]), "channels outside the slice changed"
    ref_out = before.clone()[0, c0 : c0 + c]
    fused_detail_reference(ws, gate, alpha, norm=norm, index=index, low_gain=gain, out=ref_out)
    close(ref_out, want, 0.0, "reference into out")


def test_out_dtype_sets_the_result_dtype(close):
    ws, gate, alpha, index, _ = _inputs(3, 2, 3, dtype=torch.float16)
    out = torch.empty(ws.shape, dtype=torch.float32)
    fused_detail(ws, gate, alpha, norm="coverage", index=index, out=out)
    want = fused_detail_reference(ws, gate, alpha, norm="coverage", index=index, out=out.clone())
    close(out, want, TOL[torch.float32], "fp16 in, fp32 out")


def test_validation_errors():
    ws, gate, alpha, index, gain = _inputs(3, 2, 3)
    cases = [
        (dict(norm="mean"), "norm must be"),
        (dict(norm="constant", warp_sum=ws[0]), r"warp_sum must be float \[C, H, W\]"),
        (dict(norm="constant", warp_sum=ws.long()), "warp_sum must be float"),
        (dict(norm="constant", warp_sum=ws[:, :6], gate=gate[:, :6]), "multiples of 4"),
        (dict(norm="constant", gate=gate[:2]), r"gate must be float \(3, 8, 12\)"),
        (dict(norm="constant", alpha=torch.ones(2)), "alpha must be a 1-element"),
        (dict(norm="coverage", index=None), "needs the index"),
        (dict(norm="coverage", index=index.int()), r"index must be int64 \(2, 3\)"),
        (dict(norm="coverage", index=index[:1]), r"got torch.int64 \(1, 3\)"),
        (dict(norm="constant", low_gain=gain), "'coverage' only"),
        (dict(norm="coverage", low_gain=gain[:2]), r"low_gain must be float \(3,\)"),
        (dict(norm="coverage", out=torch.empty(3, 8, 8)), r"out must be float \(3, 8, 12\)"),
        (dict(norm="coverage", out=torch.empty(ws.shape, dtype=torch.int32)), "out must be"),
    ]
    for fn in (fused_detail, fused_detail_reference):
        for kwargs, match in cases:
            args = dict(warp_sum=ws, gate=gate, alpha=alpha, index=index) | kwargs
            with pytest.raises(ValueError, match=match):
                fn(args.pop("warp_sum"), args.pop("gate"), args.pop("alpha"), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["constant", "coverage"])
def test_gpu_camerafusion_size_matches_reference(close, dtype, norm):
    c, hq, wq = 64, 320, 448
    ws, gate, alpha, index, gain = _inputs(c, hq, wq, 0.4, dtype, "cuda")
    gain = gain if norm == "coverage" else None
    want = fused_detail_reference(ws, gate, alpha, norm=norm, index=index, low_gain=gain)
    close(fused_detail(ws, gate, alpha, norm=norm, index=index, low_gain=gain), want, TOL[dtype],
          f"cuda {norm} {dtype}")  # fmt: skip
    # a channels_last slice of a 128-channel fusion input (the kedusr layout)
    big = torch.zeros(1, 2 * c, 4 * hq, 4 * wq, device="cuda", dtype=dtype)
    big = big.to(memory_format=torch.channels_last)
    fused_detail(ws, gate, alpha, norm=norm, index=index, low_gain=gain, out=big[0, :c])
    close(big[0, :c], want, TOL[dtype], f"cuda channels_last {norm} {dtype}")
    assert not big[0, c:].any()

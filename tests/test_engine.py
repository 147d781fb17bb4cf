"""The engine: tiles equal the whole image, channel order, images in and out, raw pairs, OOM."""

import contextlib

import numpy as np
import pytest
import torch
from support import TINY as _SHARED_TINY

from sddusr_engine import build_model
from sddusr_engine.engine import Engine, core
from sddusr_engine.engine.ensemble import SYMMETRIES, apply_symmetry, undo_symmetry
from sddusr_engine.errors import EngineError
from sddusr_engine.registration import FootprintNotFoundError
from sddusr_engine.synthetic import make_synthetic_pair, procedural_image

TINY = {
    **_SHARED_TINY,
    "trunk_blocks": 2,
    "decoder_blocks": 2,
}  # deeper than the shared one: halos and group counts


class _HalfMask(torch.nn.Module):
    """A local (tile-safe) stand-in mask generator that marks about half the positions active."""

    def forward(self, f_m):
        s = torch.sin(97.0 * f_m.mean(dim=1, keepdim=True))
        return torch.cat([s, torch.zeros_like(s)], dim=1)


def tiny_model(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(variant, **TINY).eval()
    if model.config.use_sfm:  # untrained generators mark everything alike; exercise both paths
        model.mask_generator.forward = _HalfMask().forward
    return model


def whole_image(model, lr, lrc, ref):
    """The plain network on the whole image, with the engine's RGB-in/RGB-out convention."""
    flip = model.config.channel_order == "bgr"
    f = (lambda t: t.flip(1)) if flip else (lambda t: t)
    with torch.no_grad():
        return f(model(f(lr), f(lrc), f(ref))).clamp(0, 1)


@pytest.mark.parametrize("variant", ["sddusr", "kedusr"])
@pytest.mark.parametrize("tile", [32, 48])
def test_tiled_equals_whole_image(variant, tile, monkeypatch):
    """Tiles, the reference context in bands and (at tile 48, forced by a small pair budget) the
    matching in bands of query rows: the whole pass's output."""
    from sddusr_engine.engine import tiling

    if tile == 48:
        monkeypatch.setattr(tiling, "MATCH_BAND_PAIRS", 200_000)  # 45x67 x 20x30 pairs: 5 bands
    model = tiny_model(variant)
    lr, lrc, ref = torch.rand(1, 3, 90, 134), torch.rand(1, 3, 40, 60), torch.rand(1, 3, 80, 120)
    want = whole_image(model, lr, lrc, ref)
    calls = []
    got, info = Engine(model, "cpu", "fp32", "torch", tile=tile).run(
        lr, lrc, ref, return_info=True, progress=lambda d, t: calls.append((d, t))
    )
    assert got.shape == want.shape == (1, 3, 180, 268)
    assert (got - want).abs().max().item() <= 1e-4
    assert info.tile == tile and calls[-1][0] == calls[-1][1] > 4  # several tiles, all reported
    assert {"reference", "trunk", "matching", "decode"} <= set(info.timings)


def test_odd_size_tiled_equals_whole_image():
    model = tiny_model("sddusr", seed=1)
    lr, lrc, ref = torch.rand(1, 3, 71, 53), torch.rand(1, 3, 30, 24), torch.rand(1, 3, 60, 48)
    want = whole_image(model, lr, lrc, ref)
    got = Engine(model, "cpu", "fp32", "torch", tile=32).run(lr, lrc, ref)
    assert got.shape == (1, 3, 142, 106)
    assert (got - want).abs().max().item() <= 1e-4


def test_sparse_statistics_are_reported():
    model = tiny_model("sddusr")
    lr, lrc, ref = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 32, 32), torch.rand(1, 3, 64, 64)
    _, info = Engine(model, "cpu", "fp32", "torch", tile=0).run(
        lr, lrc, ref, return_info=True, keep_maps=True
    )
    m = info.matching
    assert m["queries"] == 32 * 32 and m["keys"] == 16 * 16
    assert 0 < info.mask_fraction_lr < 1 and 0 < info.mask_fraction_lrc < 1
    assert m["pairs_evaluated"] == m["active_queries"] * m["active_keys"]
    assert m["work_saved"] == pytest.approx(1 - m["pairs_evaluated"] / m["pairs_dense"])
    assert info.maps["mask_lr"].shape == info.maps["confidence"].shape == (32, 32)
    assert (info.maps["index"][~info.maps["mask_lr"]] == -1).all()


def test_arrays_in_arrays_out_with_bit_depth():
    model = tiny_model("kedusr")
    eng = Engine(model, "cpu", "fp32", "torch", tile=0)
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    lrc, ref = lr[10:30, 12:40], rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    out8 = eng.run(lr, lrc, ref)
    assert out8.dtype == np.uint8 and out8.shape == (80, 104, 3)
    out16 = eng.run(
        lr.astype(np.uint16) * 257, lrc.astype(np.uint16) * 257, ref.astype(np.uint16) * 257
    )
    assert out16.dtype == np.uint16
    # the same image at 16 bits gives the same result to within 8-bit rounding
    assert np.abs(out16 / 257.0 - out8).max() <= 1.0


def test_bgr_weights_see_bgr_but_callers_speak_rgb():
    model = tiny_model("kedusr")
    assert model.config.channel_order == "bgr"
    lr, lrc, ref = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16), torch.rand(1, 3, 32, 32)
    got = Engine(model, "cpu", "fp32", "torch", tile=0).run(lr, lrc, ref)
    with torch.no_grad():
        raw = model(lr, lrc, ref).clamp(0, 1)  # no flip: not what an RGB caller should get
    assert (got - whole_image(model, lr, lrc, ref)).abs().max() <= 1e-6
    assert (got - raw).abs().max() > 1e-3


def test_reference_switched_off_differs_and_runs():
    model = tiny_model("sddusr")
    lr, lrc, ref = torch.rand(1, 3, 32, 40), torch.rand(1, 3, 16, 20), torch.rand(1, 3, 32, 40)
    eng = Engine(model, "cpu", "fp32", "torch", tile=0)
    with_ref, info = eng.run(lr, lrc, ref, return_info=True)
    without, info0 = eng.run_without_reference(lr, return_info=True)
    assert without.shape == with_ref.shape
    assert info0.matching["pairs_evaluated"] == 0
    assert (without - with_ref).abs().max() > 1e-4


def _raw_pair(seed=0):
    rng = np.random.default_rng(seed)
    hr = procedural_image((480, 640), rng)
    wide, tele, _ = make_synthetic_pair(
        hr, zoom=2.0, rotation_deg=1.0, rng=rng, wide_shape=(120, 160), tele_shape=(120, 160)
    )
    return wide, tele


def test_super_resolve_raw_pair_reports_footprint():
    wide, tele = _raw_pair()
    eng = Engine(tiny_model("sddusr"), "cpu", "fp32", "torch", tile=0)
    out, info = eng.super_resolve(wide, tele, return_info=True)
    assert out.shape == (2 * wide.shape[0], 2 * wide.shape[1], 3) and out.dtype == wide.dtype
    y0, y1, x0, x1 = info.box_lr
    assert (y1 - y0) % 2 == 0 and (x1 - x0) % 2 == 0
    assert 1.7 < info.footprint.zoom < 2.3
    assert "registration" in info.timings
    assert info.to_dict()["footprint"]["inliers"] >= 20


def test_tele_not_found_errors_or_falls_back():
    wide, _ = _raw_pair()
    noise = np.random.default_rng(5).integers(0, 256, wide.shape, dtype=np.uint8)
    eng = Engine(tiny_model("sddusr"), "cpu", "fp32", "torch", tile=0)
    with pytest.raises(FootprintNotFoundError):
        eng.super_resolve(wide, noise)
    with pytest.warns(UserWarning, match="without the reference"):
        out, info = eng.super_resolve(wide, noise, missing_reference="skip", return_info=True)
    assert out.shape == (2 * wide.shape[0], 2 * wide.shape[1], 3)
    assert info.footprint is None and info.warnings


def test_out_of_memory_halves_the_tile(monkeypatch):
    eng = Engine(tiny_model("kedusr"), "cpu", "fp32", "torch", tile=128)

    real = core.tiled_forward
    tiles = []

    def flaky(model, lr, lrc, ref, tile, *args):
        tiles.append(tile)
        if tile > 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, lr, lrc, ref, tile, *args)

    monkeypatch.setattr(core, "tiled_forward", flaky)
    lr, lrc, ref = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 16, 16), torch.rand(1, 3, 32, 32)
    out, info = eng.run(lr, lrc, ref, return_info=True)
    assert tiles == [128, 64, 32] and info.tile == 32 and "out of memory" in info.warnings[0]

    def always(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(core, "tiled_forward", always)
    with pytest.raises(EngineError, match="ran out of memory"):
        eng.run(lr, lrc, ref)


def test_symmetries_are_the_eight_of_the_square_and_undo_exactly():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    images = {tuple(apply_symmetry(x, s).flatten().tolist()) for s in SYMMETRIES}
    assert len(SYMMETRIES) == len(images) == 8  # all distinct: the whole dihedral group
    for s in SYMMETRIES:
        assert torch.equal(undo_symmetry(apply_symmetry(x, s), s), x)
    # the first two are identity and the half turn; the first four keep the orientation
    assert torch.equal(apply_symmetry(x, SYMMETRIES[1]), x.flip(-1).flip(-2))
    assert all(apply_symmetry(x, s).shape == x.shape for s in SYMMETRIES[:4])


@pytest.mark.parametrize("n,tile", [(2, 32), (8, 0)])
def test_ensemble_averages_the_flipped_passes(n, tile):
    """Odd sides too: the engine pads to even first, so the flipped passes keep the LRC's grid."""
    model = tiny_model("sddusr", seed=3)
    lr, lrc, ref = torch.rand(1, 3, 45, 38), torch.rand(1, 3, 20, 16), torch.rand(1, 3, 40, 32)
    padded = torch.nn.functional.pad(lr, (0, 0, 0, 1), mode="replicate")
    passes = [
        undo_symmetry(whole_image(model, *(apply_symmetry(t, s) for t in (padded, lrc, ref))), s)
        for s in SYMMETRIES[:n]
    ]
    want = (sum(passes) / n)[..., :90, :76]
    single, info1 = Engine(model, "cpu", "fp32", "torch", tile=tile).run(
        lr, lrc, ref, return_info=True, keep_maps=True
    )
    calls = []
    got, info = Engine(model, "cpu", "fp32", "torch", tile=tile, ensemble=n).run(
        lr, lrc, ref, return_info=True, keep_maps=True, progress=lambda d, t: calls.append((d, t))
    )
    assert got.shape == want.shape == (1, 3, 90, 76)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got - single).abs().max().item() > 1e-3  # the passes do differ
    assert info.ensemble == n and info1.ensemble == 1
    # the statistics and maps are the identity pass's; the progress runs once to the end
    assert info.mask_fraction_lr == info1.mask_fraction_lr and info.matching == info1.matching
    assert np.array_equal(info.maps["confidence"], info1.maps["confidence"])
    assert [d for d, _ in calls] == list(range(1, len(calls) + 1))
    assert calls[-1][0] == calls[-1][1] and len({t for _, t in calls}) == 1
    assert info.to_dict()["ensemble"] == n


def test_bad_options_are_clear():
    model = tiny_model("kedusr")
    with pytest.raises(EngineError, match="GPU only"):
        Engine(model, "cpu", "fp16", "torch")
    with pytest.raises(EngineError, match="unknown backend"):
        Engine(model, "cpu", "fp32", "cuda-graphs")
    with pytest.raises(EngineError, match="tile"):
        Engine(model, "cpu", "fp32", "torch", tile=8)
    with pytest.raises(EngineError, match="ensemble must be one of"):
        Engine(model, "cpu", "fp32", "torch", ensemble=3)
    eng = Engine(model, "cpu", "fp32", "torch", tile=0)
    with pytest.raises(EngineError, match="twice"):
        eng.run(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16), torch.rand(1, 3, 30, 32))


@pytest.mark.parametrize("tile", [0, 32])
def test_triton_backend_matches_torch_under_interpreter(tile):
    """The Triton kernels (the fused reference detail among them), whole and in tiles that keep
    the fusion maps (bounded tiles: the channels-last and coverage tests below)."""
    model = tiny_model("sddusr")
    lr, lrc, ref = torch.rand(1, 3, 40, 44), torch.rand(1, 3, 12, 16), torch.rand(1, 3, 24, 32)
    want = Engine(model, "cpu", "fp32", "torch", tile=0).run(lr, lrc, ref)
    eng = Engine(model, "cpu", "fp32", "triton", tile=tile, keep_fusion_maps=bool(tile))
    got, info = eng.run(lr, lrc, ref, return_info=True)
    assert info.fusion_maps is bool(tile)
    assert (got - want).abs().max().item() <= 1e-4


def test_global_skip_starts_at_bicubic_and_tiles_exactly():
    torch.manual_seed(0)
    model = build_model("sddusr", global_skip=True, **TINY).eval()
    model.mask_generator.forward = _HalfMask().forward
    lr, lrc, ref = torch.rand(1, 3, 70, 90), torch.rand(1, 3, 30, 40), torch.rand(1, 3, 60, 80)
    bicubic = torch.nn.functional.interpolate(lr, scale_factor=2, mode="bicubic").clamp(0, 1)
    whole = Engine(model, "cpu", "fp32", "torch", tile=0).run(lr, lrc, ref)
    assert (whole - bicubic).abs().max().item() < 1e-6  # zero-initialised last conv
    with torch.no_grad():  # make the learned part non-zero, then compare tiled with whole
        model.decoder_tail[-1].weight.normal_(0, 0.05)
    want = whole_image(model, lr, lrc, ref)
    got = Engine(model, "cpu", "fp32", "torch", tile=32).run(lr, lrc, ref)
    assert (got - want).abs().max().item() <= 1e-4


def test_stage_hook_wraps_every_stage_in_order():
    seen = []

    @contextlib.contextmanager
    def hook(stage):
        seen.append(("enter", stage))
        yield
        seen.append(("exit", stage))

    eng = Engine(tiny_model("kedusr"), "cpu", "fp32", "torch", tile=32)
    lr, lrc, ref = torch.rand(1, 3, 48, 40), torch.rand(1, 3, 16, 16), torch.rand(1, 3, 32, 32)
    _, info = eng.run(lr, lrc, ref, return_info=True, stage_hook=hook)
    stages = [s for kind, s in seen if kind == "enter"]
    assert (
        stages
        == list(info.timings)
        == [
            "trunk",
            "reference",
            "match_features",
            "matching",
            "fusion_statistics",
            "decode",
        ]
    )
    assert [s for kind, s in seen if kind == "exit"] == stages


@pytest.mark.parametrize(
    "variant, backend, tile",
    [("sddusr", "torch", 32), ("kedusr", "torch", 0), ("sddusr", "triton", 32)],
)
def test_channels_last_gives_the_same_output(variant, backend, tile):
    """The NHWC layout (Engine(channels_last=True)) changes the memory order, not the
    arithmetic."""
    model = tiny_model(variant)
    # the interpreted Triton kernels cost ~0.1 s a program here: a smaller image, still 2x2 tiles
    h, w = (40, 36) if backend == "triton" else (56, 68)
    lr, lrc, ref = torch.rand(1, 3, h, w), torch.rand(1, 3, 16, 20), torch.rand(1, 3, 32, 40)
    kw = dict(return_info=True, keep_maps=True)
    eng = Engine(model, "cpu", "fp32", backend, tile=tile, channels_last=False)
    want, want_info = eng.run(lr, lrc, ref, **kw)
    eng = Engine(model, "cpu", "fp32", backend, tile=tile, channels_last=True)
    conv = next(m for m in eng.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    got, got_info = eng.run(lr, lrc, ref, **kw)
    assert got.shape == want.shape
    # Another summation order can flip a near-tie of the matching's argmax (a random network
    # has many); a flipped cell changes the 9x9 patch it pastes, and nothing else.
    flipped = got_info.maps["index"] != want_info.maps["index"]
    assert flipped.mean() < 0.005
    differs = ((got - want).abs() > 1e-5).float().mean().item()
    assert differs <= 100 * flipped.mean() and (got - want).abs().max().item() < 1e-2
    if not flipped.any():
        assert (got - want).abs().max().item() <= 1e-5
    # the default: NHWC on the CPU (oneDNN's fast layout), NCHW on a GPU
    assert Engine(tiny_model(variant), "cpu", "fp32", backend).channels_last is True


# the low band is torch arithmetic on the stitched warp: the interpreted kernels once suffice
@pytest.mark.parametrize("backend, low_band", [("torch", False), ("torch", True), ("triton", True)])
def test_coverage_warp_norm_tiles_exactly(backend, low_band):
    """warp_norm="coverage" (true overlap counts, holes ignored) is local too: tiles equal the
    whole image, on both backends; so is its low band (`warp_low_band`, a non-zero gain)."""
    torch.manual_seed(5)
    model = build_model("sddusr", **TINY, warp_norm="coverage", warp_low_band=low_band).eval()
    if low_band:
        with torch.no_grad():
            model.low_band_gain.normal_(0.0, 0.005)  # gains of order 1 (LOW_BAND_SCALE)
    model.mask_generator.forward = _HalfMask().forward
    # the interpreted Triton kernels cost ~0.1 s a program here: a smaller image, still 2x2 tiles
    h, w = (40, 44) if backend == "triton" else (72, 88)
    lr, lrc, ref = torch.rand(1, 3, h, w), torch.rand(1, 3, 20, 24), torch.rand(1, 3, 40, 48)
    want = whole_image(model, lr, lrc, ref)
    got, info = Engine(model, "cpu", "fp32", backend, tile=32).run(lr, lrc, ref, return_info=True)
    assert (got - want).abs().max().item() <= 1e-4
    assert 0.2 < info.mask_fraction_lr < 0.8  # holes present
    # and it is not the published arithmetic
    published = build_model("sddusr", **TINY).eval()
    published.load_state_dict(model.state_dict(), strict=not low_band)
    published.mask_generator.forward = _HalfMask().forward
    assert (whole_image(published, lr, lrc, ref) - want).abs().max().item() > 1e-4


def test_pipeline_benchmark_times_the_shipped_network_and_the_ensemble(tmp_path):
    """bench/bench_pipeline.py (CPU harness size): --shipped adds the default weights' network
    with and without --ensemble, each network a bounded-memory row (tiles, reference in bands),
    each variant an ensemble row with N passes' stages; every row names its network and mode and
    carries its counted work and its share of the peak measured in the same run."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_pipeline

    out = tmp_path / "pipeline.json"
    args = ["--cpu", "--size", "48x64", "--variants", "kedusr", "--no-baseline", "--repeats", "1",
            "--layouts", "nchw", "--shipped", "--ensemble", "2", "--bounded-tile", "32",
            "--json", str(out)]  # fmt: skip
    assert bench_pipeline.main(args) == 0
    result = json.loads(out.read_text())
    rows, meta = result["rows"], result  # the run's facts at the top level, beside the rows
    assert [(r["network"], r["mode"], r["what"].split("tile ")[1]) for r in rows] == [
        # the headline rows first (each network's default plan, then bounded, then kept maps),
        # the variations after; the engine's defaults on the CPU: the 48x64 image is one tile
        ("shipped", "fast", "0 nhwc ensemble 1"),
        ("kedusr", "fast", "0 nchw"),
        ("shipped", "bounded", "32 nhwc bounded"),
        ("kedusr", "bounded", "32 nhwc bounded"),
        ("shipped", "kept", "32 kept maps nhwc kept"),
        ("kedusr", "kept", "32 kept maps nhwc kept"),
        ("shipped", "fast", "0 nhwc ensemble 2"),
        ("kedusr", "fast", "0 nhwc ensemble 2"),
    ]
    assert all(r["ms"] > 0 and r["stages_ms"]["decode"] > 0 for r in rows)
    assert all(r["gflop"] > 0 and 0 < r["share_of_peak"] for r in rows)
    assert not any(r["host_maps"] for r in rows)  # the CPU keeps its maps where they are
    # tiles and bands repeat their halos' work (at this tiny size, most of it); kept maps run
    # the 2x stage once, so less than the bounded mode
    assert rows[1]["gflop"] < rows[5]["gflop"] < rows[3]["gflop"]
    assert "fusion_input" in rows[5]["stages_ms"] and "fusion_statistics" in rows[3]["stages_ms"]
    assert rows[6]["gflop"] == pytest.approx(2 * rows[0]["gflop"], rel=0.05)  # two passes
    assert meta["card"] == "CPU" and meta["peak_tflops"] > 0 and meta["commit"] and meta["date"]
    assert result["complete"] is True


def test_pipeline_benchmark_with_its_baseline_writes_every_row(tmp_path):
    """Without --no-baseline (as the GPU check runs it): the plain network's row has no counted
    work, and the rows that have it still get their share of the peak."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_pipeline

    out = tmp_path / "pipeline.json"
    args = ["--cpu", "--size", "48x64", "--variants", "kedusr", "--repeats", "1",
            "--layouts", "nchw", "--bounded-tile", "32", "--json", str(out)]  # fmt: skip
    assert bench_pipeline.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    baseline = [r for r in rows if r["what"] == "plain network torch fp32 whole image"]
    assert len(baseline) == 1 and "share_of_peak" not in baseline[0] and baseline[0]["ms"] > 0
    assert all(r["share_of_peak"] > 0 for r in rows if r is not baseline[0])


def test_pipeline_benchmark_keeps_every_row_when_one_fails_and_saves_as_it_goes(
    tmp_path, monkeypatch
):
    """A row that raises (a GPU out of memory, a bug in one plan) is recorded with its error and
    the others still run; the JSON is rewritten after every row, marked complete at the end, so
    that a run cut short by its time limit leaves the rows it measured."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_pipeline

    out = tmp_path / "pipeline.json"
    seen = []

    def failing(*a):
        seen.append(json.loads(out.read_text()))  # what was saved before this row
        raise RuntimeError("no room for the baseline")

    monkeypatch.setattr(bench_pipeline, "_baseline_row", failing)
    args = ["--cpu", "--size", "48x64", "--variants", "kedusr", "--repeats", "1",
            "--layouts", "nchw", "--bounded-tile", "32", "--json", str(out)]  # fmt: skip
    assert bench_pipeline.main(args) == 0
    result = json.loads(out.read_text())
    assert seen[0]["complete"] is False and len(seen[0]["rows"]) == 3  # fast, bounded, kept
    assert result["complete"] is True and len(result["rows"]) == 4
    failed = result["rows"][-1]
    assert failed["what"] == "failed" and failed["mode"] == "baseline"
    assert failed["error"] == "RuntimeError: no room for the baseline"


def test_pipeline_benchmark_runs_a_raw_pair_in_both_modes(pair, tmp_path):
    """`--pair WIDE TELE` (a phone's pair): the shipped weights, registration included, bounded
    then fast, each row with its stages."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_pipeline

    wide, tele, shape = pair
    out = tmp_path / "pair.json"
    args = ["--cpu", "--pair", str(wide), str(tele), "--bounded-tile", "64", "--json", str(out)]
    assert bench_pipeline.main(args) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["mode"], r["what"].split("tile ")[1]) for r in rows] == [
        ("bounded", "64 raw pair"),
        ("fast", "0 raw pair"),
    ]
    assert all(r["ms"] > 0 and r["peak_gib"] > 0 and "registration" in r["stages_ms"] for r in rows)
    assert f"wide {shape[1]}x{shape[0]}" in result["size"]


def test_auto_plan_picks_by_free_memory_and_every_plan_gives_the_whole_pass(monkeypatch):
    """tile=None: on a GPU one whole-image pass when the estimate fits in half the free memory,
    else tiles keeping the fusion maps when those fit, else bounded tiles; on the CPU kept maps
    in small tiles, else bounded tiles. Each plan gives the whole pass's output."""
    from sddusr_engine.engine import memory
    from sddusr_engine.engine.memory import TilePlan, auto_plan

    free = memory.free_bytes(torch.device("cpu"))
    assert free is None or free > 0
    need = memory.whole_pass_bytes((480, 640), 32, torch.float32)
    assert need == pytest.approx(63 * 32 * 4 * 480 * 640)
    kept = memory.KEPT_MAPS_SHARE * need
    plan = lambda dev: auto_plan((480, 640), 32, torch.float32, dev)  # noqa: E731
    bounded_gpu = TilePlan(memory.TILED_TILE, False, True)  # with the whole maps on the host
    for free, gpu, cpu in [
        (2 * need, TilePlan(0), TilePlan(memory.CPU_KEPT_TILE, True)),
        (2 * need - 1, TilePlan(memory.TILED_TILE, True), TilePlan(memory.CPU_KEPT_TILE, True)),
        (2 * kept - 1, bounded_gpu, TilePlan(memory.TILED_TILE)),
        (None, bounded_gpu, TilePlan(memory.TILED_TILE)),  # unknown: bounded
    ]:
        monkeypatch.setattr(memory, "free_bytes", lambda device, free=free: free)
        assert (plan("cuda"), plan("cpu")) == (gpu, cpu), free

    model = tiny_model("sddusr")
    lr, lrc, ref = torch.rand(1, 3, 40, 44), torch.rand(1, 3, 16, 20), torch.rand(1, 3, 32, 40)
    want = whole_image(model, lr, lrc, ref)
    eng = Engine(model, "cpu", "fp32", "torch")  # tile=None
    assert eng.tile is None
    monkeypatch.setattr(memory, "CPU_KEPT_TILE", 32)
    monkeypatch.setattr(memory, "TILED_TILE", 32)
    for free, stage, kept_maps in [(10**15, "fusion_input", True), (1, "fusion_statistics", False)]:
        monkeypatch.setattr(memory, "free_bytes", lambda device, free=free: free)
        got, info = eng.run(lr, lrc, ref, return_info=True)
        assert info.tile == 32 and info.fusion_maps is kept_maps and stage in info.timings
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["sddusr", "kedusr"])
def test_host_maps_give_the_bounded_output_and_tiles_take_parts_of_the_table(variant, monkeypatch):
    """The bounded plan with its whole maps in host memory (a GPU's, run here on the CPU, where
    the same code moves bands and tiles between the host and itself): the output of the plain
    bounded plan, bit for bit, with F_Ref_align's table kept whole where it lives and each tile
    warping from the part its matches read. A given tile on a GPU plans host maps; kept maps and
    a CPU do not."""
    from sddusr_engine.engine import memory, tiling
    from sddusr_engine.geometry import spans
    from sddusr_engine.model import network

    parts, whole_rows = [], []
    real_part = network.table_part

    def recording(src, index):
        whole_rows.append(src.table.shape[0])
        part = real_part(src, index)
        parts.append(part.table.shape[0])
        return part

    monkeypatch.setattr(network, "table_part", recording)
    model = tiny_model(variant)
    lr, lrc, ref = torch.rand(1, 3, 90, 134), torch.rand(1, 3, 40, 60), torch.rand(1, 3, 80, 120)
    eng = Engine(model, "cpu", "fp32", "torch", tile=32)
    plain, info = eng.run(lr, lrc, ref, return_info=True)
    assert not info.host_maps and not parts
    eng = Engine(model, "cpu", "fp32", "torch", tile=32, host_maps=True)
    monkeypatch.setattr(tiling, "MATCH_BAND_QUERIES", 600)  # 45x67 queries: 5 bands of 9 rows
    assert tiling.matching_bands(lr, lrc, host_maps=True) == 5
    homes = []
    real_trunk = model.lr_trunk
    model.lr_trunk = lambda *a: homes.append(a[3:]) or real_trunk(*a)  # the banded trunk's home
    for trunk_bytes in (0, 1 << 30):  # the trunk's maps in host memory, then on the device
        monkeypatch.setattr(tiling, "TRUNK_DEVICE_BYTES", trunk_bytes)
        parts.clear()
        hosted, info = eng.run(lr, lrc, ref, return_info=True)
        assert info.host_maps and torch.equal(hosted, plain)
        tiles = len(spans(180, 64)) * len(spans(268, 64))
        assert len(parts) == 2 * tiles and max(parts) < min(whole_rows)  # each tile, two passes
    if not model.tiling.trunk_tiles:  # sddusr: banded, on the host, then on the device
        assert homes == [(torch.device("cpu"),), ()]
    assert memory.bounded_plan(256, "cuda") == memory.TilePlan(256, False, True)
    assert memory.bounded_plan(256, "cuda", host_maps=False) == memory.TilePlan(256)
    assert memory.bounded_plan(256, "cpu") == memory.TilePlan(256)
    assert memory.bounded_plan(0, "cuda") == memory.TilePlan(0)
    # the option reaches the plan the engine picks from the free memory too, and kept maps win
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1)  # bounded tiles
    monkeypatch.setattr(memory, "TILED_TILE", 32)
    for host in (True, False):
        _, info = Engine(model, "cpu", "fp32", "torch", host_maps=host).run(
            lr, lrc, ref, return_info=True
        )
        assert info.tile == 32 and info.host_maps is host
    kept = Engine(model, "cpu", "fp32", "torch", tile=32, keep_fusion_maps=True, host_maps=True)
    assert not kept.run(lr, lrc, ref, return_info=True)[1].host_maps


@pytest.mark.parametrize("variant", ["sddusr", "kedusr"])
def test_kept_fusion_maps_are_the_whole_pass_maps(variant):
    """Tiles keeping the fusion maps: the fusion input and its gated map over the whole output
    equal the whole pass's (so their halo covers both), and the output equals the whole pass."""
    from sddusr_engine.engine import tiling
    from sddusr_engine.geometry import spans
    from sddusr_engine.model.network import MatchResult

    model = tiny_model(variant)
    lr, lrc, ref = torch.rand(1, 3, 90, 134), torch.rand(1, 3, 40, 60), torch.rand(1, 3, 80, 120)
    with torch.inference_mode():
        ctx = model.reference_context(lrc, ref)
        feat = model.lr_trunk(lr)
        q_map, q_mask = model.split_query_maps(model.query_maps(lr))
        conf, index, _ = model.sparse_match(q_map, q_mask, ctx)
        conf = conf.to(lr.dtype)
        match = MatchResult(model.warp(ctx, index), conf, index, None, None)
        fused_whole = model.fusion_input(model.upsample(feat), match, ctx)
        gated_whole = model.fusion_pool_input(fused_whole)
        out_spans = [(y, x) for y in spans(180, 64) for x in spans(268, 64)]
        maps = (model, lr, feat, model.with_warp_sources(ctx), conf, index)
        fused, gated, pooled = tiling._first_pass(
            maps, out_spans, model.tiling.fusion_halo_hr, lambda: None, keep=True
        )
    assert (fused - fused_whole).abs().max() <= 1e-5
    assert (gated - gated_whole).abs().max() <= 1e-5
    torch.testing.assert_close(pooled, gated_whole.mean(dim=(2, 3), keepdim=True))
    want = whole_image(model, lr, lrc, ref)
    got = Engine(model, "cpu", "fp32", "torch", tile=None)
    with pytest.MonkeyPatch.context() as mp:
        from sddusr_engine.engine import memory

        mp.setattr(memory, "CPU_KEPT_TILE", 32)
        mp.setattr(memory, "free_bytes", lambda device: 10**15)
        out, info = got.run(lr, lrc, ref, return_info=True)
    assert info.fusion_maps and (out - want).abs().max() <= 1e-5


def test_progress_keeps_the_two_argument_callback_and_names_the_stages():
    """`progress(done, total)` as before; `on_stage(name)` is told each stage as it starts,
    before that stage's tiles are counted."""
    from sddusr_engine.engine.tiling import reference_band_rows

    eng = Engine(tiny_model("sddusr"), "cpu", "fp32", "torch", tile=32)
    lr, lrc, ref = torch.rand(1, 3, 40, 44), torch.rand(1, 3, 16, 20), torch.rand(1, 3, 32, 40)
    events = []
    eng.run(lr, lrc, ref, progress=lambda done, total: events.append((done, total)))
    assert events and events[-1][0] == events[-1][1] and all(t == events[0][1] for _, t in events)
    both = []
    eng.run(
        lr, lrc, ref,
        progress=lambda done, total: both.append(("tile", done)),
        on_stage=lambda name: both.append(("stage", name)),
    )  # fmt: skip
    stages = [n for kind, n in both if kind == "stage"]
    assert stages[:2] == ["trunk", "reference"] and "decode" in stages
    assert [e for e in both if e[0] == "tile"] == [("tile", d) for d, _ in events]
    first_decode = both.index(("stage", "decode"))
    assert both[first_decode + 1][0] == "tile"  # the 2x stage's tiles come after its name
    # the reference stage counts its steps too (in a tiled run, its bands), so it shows progress
    trunk_ticks = both.index(("stage", "reference")) - 1  # one per trunk block and group tail
    assert trunk_ticks == eng.model.trunk_steps(band_rows=40) > 1  # bounded: in bands
    start = both.index(("stage", "reference")) + 1
    ref_ticks = both[start : both.index(("stage", "match_features"))]
    bands = eng.model.reference_bands((32, 40), reference_band_rows(32, 40))
    first = trunk_ticks + 1
    assert ref_ticks == [("tile", d) for d in range(first, first + bands)] and bands >= 2
    whole = []
    Engine(eng.model, "cpu", "fp32", "torch", tile=0).run(
        lr, lrc, ref, progress=lambda d, t: whole.append(d),
        on_stage=lambda name: whole.append(name),
    )  # fmt: skip
    assert whole[: whole.index("match_features")] == ["trunk", 1, "reference", 2, 3, 4, 5]


def test_super_resolve_reads_the_zoom_prior_from_two_pil_images(pair):
    """PIL images carrying FocalLengthIn35mmFilm give the registration its zoom prior; arrays
    (no EXIF) give none."""
    from io import BytesIO

    from PIL import Image

    wide_p, tele_p, _ = pair
    images = []
    for path, mm in ((wide_p, 26), (tele_p, 52)):
        im = Image.open(path).convert("RGB")
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0xA405] = mm
        buf = BytesIO()
        im.save(buf, "JPEG", quality=95, exif=exif)
        images.append(Image.open(buf))
    eng = Engine(tiny_model("sddusr"), "cpu", "fp32", "torch")
    _, info = eng.super_resolve(*images, return_info=True)
    assert info.footprint.zoom_prior == pytest.approx(2.0 * images[1].width / images[0].width)
    _, info = eng.super_resolve(*(np.asarray(im) for im in images), return_info=True)
    assert info.footprint.zoom_prior is None

"""The `sddusr` command line through typer's runner (and one real subprocess): tiny random weights,
tiny images, so that nothing needs the trained weights or a GPU."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from support import TINY, invoke
from test_eval import dataset  # noqa: F401  (a fixture shared with the eval tests)

from sddusr_engine.io import read_image, write_image
from sddusr_engine.model.network import build_model

COMMANDS = ("demo", "sr", "batch", "eval", "profile", "convert", "train")


def assert_one_line_error(res, code=None):
    assert res.exit_code != 0 if code is None else res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr


def test_help_lists_commands_and_every_help_has_an_example():
    res = invoke("--help")
    assert res.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in res.output
    for cmd in COMMANDS:
        res = invoke(cmd, "--help")
        assert res.exit_code == 0, (cmd, res.output)
        assert f"Example: sddusr {cmd}" in res.output, (cmd, res.output)


def test_sr_on_a_synthetic_pair_writes_output_maps_and_json(pair, tiny_weights, tmp_path):
    wide, tele, shape = pair
    out = tmp_path / "x2.png"
    res = invoke(
        "sr", wide, tele, "-o", out, "--weights", tiny_weights, "--device", "cpu",
        "--save-maps", tmp_path / "maps", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)  # stdout holds the JSON only
    assert read_image(out).shape == (2 * shape[0], 2 * shape[1], 3)
    assert summary["output_size"] == [2 * shape[0], 2 * shape[1]]
    assert {"registration", "reference", "decode"} <= set(summary["timings"])
    assert len(summary["footprint"]["corners"]) == 4
    assert 0.0 <= summary["matching"]["work_saved"] <= 1.0
    assert summary["mask_fraction_lr"] is not None
    assert summary["host_maps"] is False  # the plan that ran: on the CPU the maps stay put
    assert isinstance(summary["tile"], int) and isinstance(summary["fusion_maps"], bool)
    for name in ("mask_lr", "mask_lrc", "confidence", "index"):
        assert (tmp_path / "maps" / f"{name}.png").is_file()
    assert read_image(tmp_path / "maps" / "confidence.png").shape[:2] == shape[:2]


def test_demo_writes_sr_and_comparison(tiny_weights, tmp_path):
    res = invoke("demo", "-o", tmp_path / "demo", "--shrink", 4, "--device", "cpu",
                 SDDUSR_WEIGHTS=str(tiny_weights))  # fmt: skip
    assert res.exit_code == 0, res.output
    sr = read_image(tmp_path / "demo" / "sr.png")
    cmp = read_image(tmp_path / "demo" / "comparison.png")
    assert sr.shape == (240, 320, 3)  # the 640x480 sample shrunk 4x, then x2
    assert cmp.shape[1] > 2 * 320 > cmp.shape[0]  # overview beside the crops (test_compare.py)
    assert "sr.png" in res.stdout and "comparison.png" in res.stdout


def test_corrupt_weights_give_one_sentence_and_no_traceback(pair, tmp_path):
    wide, tele, _ = pair
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    res = invoke("sr", wide, tele, "-o", tmp_path / "o.png", "--weights", bad)
    assert_one_line_error(res, 1)
    assert "bad.safetensors" in res.stderr
    # the installed console script, for real: stderr only, no traceback
    p = subprocess.run(
        [sys.executable, "-m", "sddusr_engine.cli", "sr", str(wide), str(tele), "-o",
         str(tmp_path / "o.png"), "--weights", str(bad)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 1
    assert "Traceback" not in p.stderr + p.stdout
    assert p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1


def test_user_errors_are_one_sentence(pair, tiny_weights, tmp_path):
    wide, tele, _ = pair
    assert_one_line_error(invoke("sr", tmp_path / "nope.jpg", tele, "-o", tmp_path / "o.png"), 1)
    text = tmp_path / "text.png"
    text.write_text("not an image")
    assert_one_line_error(invoke("sr", wide, text, "-o", tmp_path / "o.png"), 1)
    res = invoke("sr", wide, tele, "-o", tmp_path / "o.png", "--precision", "fp8")
    assert res.exit_code == 2 and "Traceback" not in res.output
    missing_default = invoke("sr", wide, tele, "-o", tmp_path / "o.png", SDDUSR_WEIGHTS=None)
    if not (missing_default.exit_code == 0):  # the shipped weights may be installed by now
        assert_one_line_error(missing_default, 1)
        assert "--weights" in missing_default.stderr


def test_sr_ensemble_averages_passes_and_rejects_odd_sizes(pair, tiny_weights, tmp_path):
    wide, tele, shape = pair
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    common = ("--weights", tiny_weights, "--device", "cpu", "--json")
    assert invoke("sr", wide, tele, "-o", one, *common).exit_code == 0
    res = invoke("sr", wide, tele, "-o", two, "--ensemble", 2, *common)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["ensemble"] == 2
    a, b = read_image(one), read_image(two)
    assert a.shape == b.shape == (2 * shape[0], 2 * shape[1], 3) and not np.array_equal(a, b)
    res = invoke("sr", wide, tele, "-o", tmp_path / "x.png", "--ensemble", 3, *common)
    assert_one_line_error(res, 2)
    assert "ensemble must be one of 1, 2, 4, 8, got" in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_footprint_not_found_is_a_user_error(pair, tiny_weights, tmp_path):
    wide, _, shape = pair
    flat = tmp_path / "flat.png"
    write_image(flat, np.full(shape, 128, np.uint8))
    res = invoke("sr", wide, flat, "-o", tmp_path / "o.png", "--weights", tiny_weights)
    assert_one_line_error(res, 1)
    assert "telephoto" in res.stderr and "--no-reference-ok" in res.stderr
    res = invoke("sr", wide, flat, "-o", tmp_path / "o.png", "--weights", tiny_weights,
                 "--no-reference-ok", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "warning:" in res.stderr and json.loads(res.stdout)["warnings"]
    assert read_image(tmp_path / "o.png").shape == (2 * shape[0], 2 * shape[1], 3)


def test_profile_runs_on_the_cpu(tiny_weights, tmp_path):
    res = invoke("profile", "--size", "32x48", "--repeats", 1, "--device", "cpu",
                 "--weights", tiny_weights, "--json", tmp_path / "p.json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "no CUDA GPU" in res.stderr
    data = json.loads((tmp_path / "p.json").read_text())
    kernels = {r["name"] for r in data["rows"] if r["kind"] == "kernel"}
    stages = {r["name"] for r in data["rows"] if r["kind"] == "stage"}
    assert {"patch_match", "patch_warp", "deform_conv2d"} <= kernels
    assert {"reference", "trunk", "matching", "decode", "total"} <= stages
    assert all(r["ms"] > 0 for r in data["rows"] if r["name"] != "matching")
    assert data["meta"]["gpu"] is False and data["meta"]["peaks"]["matmul_tflops"] > 0


def test_convert_a_kedusr_state_dict(tmp_path):
    model = build_model(
        "kedusr",
        **{k: v for k, v in TINY.items() if k not in ("tokens", "token_dim", "mask_hidden")},
    )
    torch.save({"params_ema": model.state_dict()}, tmp_path / "k.pth")
    res = invoke("convert", tmp_path / "k.pth", tmp_path / "k.safetensors")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "k.safetensors").is_file() and "kedusr" in res.stdout
    assert_one_line_error(
        invoke("convert", tmp_path / "missing.pth", tmp_path / "x.safetensors"), 1
    )
    # an existing destination: refused (exit 2, untouched) unless --overwrite
    before = (tmp_path / "k.safetensors").stat().st_mtime_ns
    res = invoke("convert", tmp_path / "k.pth", tmp_path / "k.safetensors")
    assert_one_line_error(res, 2)
    assert "--overwrite" in res.stderr
    assert (tmp_path / "k.safetensors").stat().st_mtime_ns == before
    res = invoke("convert", tmp_path / "k.pth", tmp_path / "k.safetensors", "--overwrite")
    assert res.exit_code == 0, res.output


def test_sr_refuses_an_existing_output_and_warns_of_a_flattened_alpha(tiny_weights, tmp_path):
    """One overwrite rule (batch skips, sr refuses, both unless --overwrite); an RGBA input is
    flattened onto white with a warning, a grayscale one comes back as RGB without one."""
    from PIL import Image

    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:6, :8, 3] = 0  # a transparent corner: 6% of the pixels
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., 0], "L").save(tmp_path / "gray.png")
    write_image(tmp_path / "flat.png", np.full((24, 32, 3), 128, np.uint8))
    out = tmp_path / "o.png"
    common = ("-o", out, "--weights", tiny_weights, "--device", "cpu", "--no-reference-ok")
    res = invoke("sr", tmp_path / "rgba.png", tmp_path / "flat.png", *common)
    assert res.exit_code == 0, res.output
    assert "rgba.png': 6% of the pixels are transparent or translucent; they were flattened onto " \
        "white" in res.stderr  # fmt: skip
    first = out.stat().st_mtime_ns
    res = invoke("sr", tmp_path / "gray.png", tmp_path / "flat.png", *common)
    assert_one_line_error(res, 2)
    assert "o.png exists; pass --overwrite to replace it." in res.stderr
    assert out.stat().st_mtime_ns == first
    res = invoke("sr", tmp_path / "gray.png", tmp_path / "flat.png", *common, "--overwrite")
    assert res.exit_code == 0, res.output
    assert "transparent" not in res.stderr and out.stat().st_mtime_ns != first
    assert read_image(out).shape == (48, 64, 3)


def test_sr_uses_the_exif_focal_lengths_as_the_zoom_prior(pair, tiny_weights, tmp_path):
    """Two JPEGs with FocalLengthIn35mmFilm: the ratio (times the width ratio) narrows the
    registration's zoom search, and the run info says so; without EXIF there is no prior."""
    from PIL import Image

    wide, tele, shape = pair
    files = {}
    for name, src, mm in (("w", wide, 26), ("t", tele, 52)):
        im = Image.open(src).convert("RGB")
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0xA405] = mm  # FocalLengthIn35mmFilm
        files[name] = tmp_path / f"{name}.jpg"
        im.save(files[name], quality=95, exif=exif)
    res = invoke("sr", files["w"], files["t"], "-o", tmp_path / "x.png", "--weights",
                 tiny_weights, "--device", "cpu", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    fp = json.loads(res.stdout)["footprint"]
    tele_w = read_image(files["t"]).shape[1]
    assert fp["zoom_prior"] == pytest.approx(2.0 * tele_w / shape[1])
    assert "EXIF focal lengths 52 mm / 26 mm" in fp["notes"]
    assert fp["corner_error_px"] is not None and fp["method"] in ("features", "intensity search")
    res = invoke("sr", wide, tele, "-o", tmp_path / "y.png", "--weights", tiny_weights,
                 "--device", "cpu", "--json")  # fmt: skip
    assert res.exit_code == 0 and json.loads(res.stdout)["footprint"]["zoom_prior"] is None


ANSI = "\x1b["


def test_piped_progress_names_each_stage_in_plain_lines(pair, tiny_weights, tmp_path):
    """stderr not a terminal (the runner's, as in CI): one plain line per stage start, in the
    engine's order, and tile lines with the time left; no escape codes anywhere."""
    wide, tele, _ = pair
    res = invoke(
        "sr", wide, tele, "-o", tmp_path / "x2.png", "--weights", tiny_weights,
        "--device", "cpu", "--tile", "64",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert ANSI not in res.stderr and ANSI not in res.stdout
    order = ["loaded the network", "registration", "tiles: feature trunk", "reference context",
             "matching", "tiles: 2x stage"]  # fmt: skip
    at = [next(i for i, ln in enumerate(lines) if want in ln) for want in order]
    assert at == sorted(at), res.stderr
    # the registration's steps, the trunk's, the reference context's steps, then the tiles, each
    # with the time left; the counts end at 100 %
    assert any("] steps 4/4 (100 %)" in ln for ln in lines[at[1] : at[2]]), res.stderr
    assert any("] steps " in ln for ln in lines[at[3] : at[4]]), res.stderr
    ticks = [ln for ln in lines[at[2] :] if "] tiles " in ln]
    assert ticks and ticks[-1].endswith("(100 %)"), res.stderr
    assert 1 <= len(ticks) <= 11 and any("left" in ln for ln in ticks[:-1]), res.stderr
    assert "wrote" in res.stdout


def test_sr_hands_the_freed_memory_back_as_each_stage_starts(
    pair, tiny_weights, tmp_path, monkeypatch
):
    """The command keeps freed memory for reuse within a stage (`process`), and gives the heap's
    free pages back before the next stage starts, so that the peak is one stage's."""
    from sddusr_engine import process

    assert process.release_freed_memory() is sys.platform.startswith("linux")
    order = []
    monkeypatch.setattr(process, "release_freed_memory", lambda: order.append("release"))
    seen = process.releasing(order.append)
    seen("trunk")
    assert order == ["release", "trunk"]
    order.clear()
    monkeypatch.setattr(process, "TRIM_INTERVAL_S", 1e9)  # only the stages' releases here
    wide, tele, _ = pair
    res = invoke(
        "sr", wide, tele, "-o", tmp_path / "x2.png", "--weights", tiny_weights,
        "--device", "cpu", "--tile", "64", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    stages = json.loads(res.stdout)["timings"]
    assert "registration" in stages and len(order) == len(stages)  # once at each stage's start


def test_progress_hands_freed_memory_back_every_few_seconds(monkeypatch):
    """Within a long stage the command's progress callback also trims the heap, at most once
    per interval, and still reports every tick."""
    from sddusr_engine import process

    released, ticks = [], []
    monkeypatch.setattr(process, "release_freed_memory", lambda: released.append(1))
    always = process.trimming(lambda d, t: ticks.append((d, t)), every_s=0.0)
    for d in range(1, 4):
        always(d, 3)
    assert ticks == [(1, 3), (2, 3), (3, 3)] and len(released) == 3
    rarely = process.trimming(None, every_s=3600.0)
    rarely(1, 3)
    assert len(released) == 3


def test_quiet_prints_nothing_and_json_stays_pure(pair, tiny_weights, tmp_path):
    wide, tele, shape = pair
    res = invoke(
        "sr", wide, tele, "-o", tmp_path / "x2.png", "--weights", tiny_weights,
        "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and res.stdout == ""
    assert read_image(tmp_path / "x2.png").shape == (2 * shape[0], 2 * shape[1], 3)
    res = invoke(
        "sr", wide, tele, "-o", tmp_path / "y2.png", "--weights", tiny_weights,
        "--device", "cpu", "--json", "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    assert json.loads(res.stdout)["output_size"] == [2 * shape[0], 2 * shape[1]]
    res = invoke("sr", wide, tele, "-o", tmp_path / "y2.png", "--weights", tiny_weights, "-q")
    assert res.exit_code != 0 and res.stderr.startswith("error: ")  # errors still show


def test_batch_piped_progress_is_a_line_per_pair_and_quiet_is_silent(pair, tiny_weights, tmp_path):
    wide, tele, _ = pair
    for sub, src in (("wide", wide), ("tele", tele)):
        (tmp_path / "in" / sub).mkdir(parents=True)
        for name in ("a", "b"):
            (tmp_path / "in" / sub / f"{name}.png").write_bytes(src.read_bytes())
    res = invoke(
        "batch", tmp_path / "in", "-o", tmp_path / "o1", "-w", tiny_weights, "--device", "cpu"
    )
    assert res.exit_code == 0, res.output
    assert ANSI not in res.stderr
    assert [ln.split(":")[0] for ln in res.stderr.splitlines() if ln.startswith("pair ")] == [
        "pair 1/2 a",
        "pair 2/2 b",
    ], res.stderr
    res = invoke(
        "batch", tmp_path / "in", "-o", tmp_path / "o2", "-w", tiny_weights, "--device", "cpu", "-q"
    )
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and res.stdout == ""
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["a.png", "b.png"]


def test_demo_eval_quiet_and_eval_lines(dataset, tiny_weights, tmp_path):  # noqa: F811
    """--quiet on demo and eval prints nothing; piped eval writes one line per image."""
    res = invoke("demo", "-o", tmp_path / "demo", "--shrink", 8, "--device", "cpu", "-q",
                 SDDUSR_WEIGHTS=str(tiny_weights))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and res.stdout == ""
    assert (tmp_path / "demo" / "sr.png").is_file() and (
        tmp_path / "demo" / "report.html"
    ).is_file()
    res = invoke("eval", dataset, "-w", tiny_weights, "--device", "cpu", "--json", tmp_path / "m.json",
                 "--no-wrong-ref")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert ANSI not in res.stderr
    images = [ln.split("] ")[1].split(",")[0] for ln in res.stderr.splitlines() if "/2 " in ln]
    assert [s.split()[0] for s in images] == ["1/2", "2/2"], res.stderr
    res = invoke("eval", dataset, "-w", tiny_weights, "--device", "cpu", "--json", tmp_path / "q.json",
                 "--no-wrong-ref", "-q")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and res.stdout == ""
    assert json.loads((tmp_path / "q.json").read_text())["count"] == 2


@pytest.mark.parametrize("where", ["stage", "tiles"])
def test_ctrl_c_at_a_stage_or_between_tiles_exits_130_and_writes_nothing(
    pair, tiny_weights, tmp_path, monkeypatch, where
):
    """Ctrl-C arrives as KeyboardInterrupt at the next Python step: here at the 2x stage's start
    or after the third tile. The command exits 130 and leaves no output, whole or partial."""
    from sddusr_engine.console import StageProgress

    def interrupt_stage(self, name):
        if name == "decode":
            raise KeyboardInterrupt

    def interrupt_tiles(self, done, total):
        if done == 3:
            raise KeyboardInterrupt

    if where == "stage":
        monkeypatch.setattr(StageProgress, "stage", interrupt_stage)
    else:
        monkeypatch.setattr(StageProgress, "tiles", interrupt_tiles)
    wide, tele, _ = pair
    out = tmp_path / "o"
    res = invoke("sr", wide, tele, "-o", out / "x2.png", "-w", tiny_weights, "--device", "cpu",
                 "--tile", "64", "--html", out / "r.html")  # fmt: skip
    assert res.exit_code == 130, res.output
    assert "interrupted" in res.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_sr_writes_the_html_report_with_its_output_or_nothing(
    pair, tiny_weights, tmp_path, monkeypatch
):
    """`sr --html`: the page is written in the same all-or-none step as the image (a page that
    cannot be made leaves no image behind), and the JSON summary names it."""
    from sddusr_engine import report

    wide, tele, _ = pair
    out, page = tmp_path / "x.png", tmp_path / "r" / "report.html"
    args = ("sr", wide, tele, "-o", out, "--weights", tiny_weights, "--device", "cpu", "--json")
    res = invoke(*args, "--html", page)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["html"] == str(page) and page.is_file() and out.is_file()
    out.unlink()
    page.unlink()

    def broken(*a, **k):
        raise OSError("no space left on device")

    monkeypatch.setattr(report, "pair_html", broken)
    res = invoke(*args, "--html", page)
    assert res.exit_code == 1 and "no space left" in res.stderr
    assert not out.exists() and not page.exists()


def test_time_left_follows_the_running_stage(monkeypatch):
    """The piped time left counts from the running stage's start: slow steps before the tiles
    (a 12 MP pair's matching: minutes in a few steps) do not inflate the tiles' estimate."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from sddusr_engine import console as con

    clock = [0.0]
    monkeypatch.setattr(con, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    out = io.StringIO()
    show = con.StageProgress(Console(file=out, force_terminal=False, width=200))
    show.stage("trunk")
    for done in range(1, 11):  # ten trunk steps of a second
        clock[0] += 1
        show.tiles(done, 100)
    show.stage("matching")
    clock[0] += 300  # one slow step
    show.tiles(11, 100)
    show.stage("decode")
    for done in range(12, 101):  # tiles of a second each
        clock[0] += 1
        show.tiles(done, 100)
    lines = out.getvalue().splitlines()
    assert any(ln.endswith("tiles 20/100 (20 %), about 1:20 left") for ln in lines), lines
    assert lines[-1].endswith("tiles 100/100 (100 %)")

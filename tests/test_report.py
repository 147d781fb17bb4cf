"""The HTML report (`sr --html`, `batch --html`, the demo's report.html): self-contained, every
link reaching its file, the batch summary with its failed pairs, a size per pair that stays
bounded, and the page itself working in headless Chromium (pictures decoded, the split, zoom and
pan moving, nothing fetched from a network)."""

import base64
import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import cv2
import numpy as np
import pytest
from support import invoke

from sddusr_engine import report
from sddusr_engine.batch import PairJob, PairResult
from sddusr_engine.engine.info import RunInfo
from sddusr_engine.io import write_image
from sddusr_engine.registration import Footprint
from sddusr_engine.synthetic import make_synthetic_pair, procedural_image

ATTR = re.compile(r'\b(src|href)="([^"]*)"')


@pytest.fixture(scope="module")
def reports(tmp_path_factory, tiny_weights):
    """The three reports the commands write: a batch (one good pair, an unreadable wide image,
    a wide image without its telephoto), one `sr` pair, and the demo."""
    root = tmp_path_factory.mktemp("report")
    src = root / "in"
    (src / "wide").mkdir(parents=True)
    (src / "tele").mkdir()
    rng = np.random.default_rng(0)
    wide, tele, _ = make_synthetic_pair(procedural_image((160, 240), rng), rng=rng)
    write_image(src / "wide" / "good.png", wide)
    write_image(src / "tele" / "good.jpg", tele)
    (src / "wide" / "text.png").write_text("this is not an image")
    write_image(src / "tele" / "text.png", tele)
    write_image(src / "wide" / "lonely.png", wide)
    w = ("--weights", tiny_weights, "--device", "cpu")
    res = invoke("batch", src, "-o", root / "out", "--html", root / "out" / "report.html", *w)
    assert res.exit_code == 1, res.output  # two pairs fail, by design
    res = invoke(
        "sr", src / "wide" / "good.png", src / "tele" / "good.jpg", "-o", root / "sr" / "x2.png",
        "--html", root / "sr" / "report.html", "--json", *w,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["output"].endswith("x2.png")  # stdout stays the JSON alone
    again = invoke(
        "sr", src / "wide" / "good.png", src / "tele" / "good.jpg", "-o", root / "sr" / "b.png",
        "--html", root / "sr" / "report.html", *w,
    )  # fmt: skip
    assert again.exit_code == 2 and "report.html" in again.stderr, again.output  # as the image
    res = invoke("demo", "-o", root / "demo", "--shrink", 4, *w)
    assert res.exit_code == 0, res.output
    assert "report.html" in res.stdout
    return {
        "batch": root / "out" / "report.html",
        "sr": root / "sr" / "report.html",
        "demo": root / "demo" / "report.html",
    }


def _data_shape(uri: str) -> tuple[int, int]:
    data = base64.b64decode(uri.split(",", 1)[1])
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return img.shape[:2]


def test_reports_are_self_contained_and_their_links_reach_the_files(reports):
    for name, path in reports.items():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text, name
        assert "Content-Security-Policy" in text and "default-src 'none'" in text
        attrs = ATTR.findall(text)
        srcs = [v for k, v in attrs if k == "src"]
        assert srcs and all(v.startswith("data:image/") for v in srcs), name
        for v in srcs:  # every embedded picture decodes
            assert min(_data_shape(v)) > 0
        links = [v for k, v in attrs if k == "href" and not v.startswith("#")]
        assert links, name
        for v in links:  # relative, and the file is there
            assert not re.match(r"^[a-z][a-z0-9+.-]*:", v) and not v.startswith("/"), v
            assert (path.parent / urllib.parse.unquote(v)).is_file(), v
        for k, v in attrs:  # in-page links point at a section that exists
            if k == "href" and v.startswith("#"):
                assert f'id="{v[1:]}"' in text, v


def test_a_pair_section_shows_the_registration_maps_and_timings(reports):
    text = reports["sr"].read_text()
    assert text.count('<section class="pair"') == 1
    for label in ("zoom", "rotation", "confidence", "corner error", "stage timings", "decode"):
        assert label in text, label
    for overlay in ("footprint", "mask_lr", "mask_lrc", "confidence", "index", "tele"):
        assert f'data-ov="{overlay}"' in text, overlay
        assert f"ov-{overlay}" in text, overlay
    assert "<polygon points=" in text  # the footprint, drawn
    assert text.count('data-view="') >= 2 * 3 + 3  # three views: bicubic and SR each, buttons


def test_the_batch_summary_links_every_pair_and_gives_the_failures_reasons(reports):
    text = reports["batch"].read_text()
    assert "3 pairs: 1 written, 2 failed" in text
    rows = re.findall(r'<tr class="row-(\w+)">.*?<a href="#(pair-\d+)">([^<]+)</a>', text)
    assert [(s, n) for s, _, n in rows] == [
        ("written", "good"), ("failed", "lonely"), ("failed", "text"),
    ]  # fmt: skip
    for _, anchor, _ in rows:
        assert f'<section class="pair" id="{anchor}">' in text
    failed = text.split("<h2>Failed pairs (2)</h2>", 1)[1].split("</ul>", 1)[0]
    assert "lonely</a>: no telephoto image named lonely" in failed
    assert "text</a>: cannot read image" in failed
    good = text.split('id="pair-0"', 1)[1].split("</section>", 1)[0]
    assert "registration</th><td>features" in good  # the engine's info reached the batch page
    assert "good.png" in good and 'class="viewer"' in good


def _fake_info(i: int, rng) -> RunInfo:
    """The info `super_resolve` would give for an 80x60 wide image (call number `i`)."""
    corners = np.array([[20.0, 15.0], [60.0, 15.0], [60.0, 45.0], [20.0, 45.0]])
    fp = Footprint(np.eye(3), 0.9, 40, 50, corners, 2.0, 0.5, (60, 80), True)
    maps = {
        "mask_lr": rng.random((30, 40)) > 0.5,
        "mask_lrc": np.ones((15, 20), bool),
        "confidence": rng.random((30, 40)).astype(np.float32),
        "index": rng.integers(0, 300, (30, 40)),
        "key_grid_width": np.array(20),
    }
    timings = {"registration": 10.0 + i, "decode": 20.0 + rng.random()}
    return RunInfo(timings, 0, fp, (16, 46, 20, 60), 0.5, 1.0, maps=maps)


class _FakeEngine:
    """`super_resolve` without the network: SR is a bicubic x2, the info is made up."""

    tile = 0

    def __init__(self):
        self.calls = 0
        self.rng = np.random.default_rng(1)

    def super_resolve(self, wide, tele, *, return_info=False, keep_maps=False, **_):
        assert keep_maps, "the report's recording engine asks for the maps"
        self.calls += 1
        sr = cv2.resize(wide, (2 * wide.shape[1], 2 * wide.shape[0]), interpolation=cv2.INTER_CUBIC)
        return (sr, _fake_info(self.calls, self.rng)) if return_info else sr


def test_a_200_pair_batch_report_stays_small_and_matches_each_pair(tmp_path):
    """200 pairs through `BatchPages` (called as `run_batch` calls the engine), one failed and
    one skipped (its previews from the files): a bounded size per pair, and each section shows
    its own call's facts."""
    pages = report.BatchPages(_FakeEngine(), tmp_path / "report.html")
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    rng = np.random.default_rng(0)
    wide = procedural_image((60, 80), rng)
    results, jobs = [], []
    for i in range(200):
        name = f"p{i:03d}"
        out = tmp_path / "out" / f"{name}.png"
        jobs.append(PairJob(name, "raw", {"wide": tmp_path / "in" / f"{name}.png"}))
        if i == 7:
            results.append(PairResult(name, "failed", message="the telephoto is not in the wide"))
        elif i == 9:  # skipped: its output and input exist, nothing was computed
            write_image(tmp_path / "in" / f"{name}.png", wide)
            write_image(out, cv2.resize(wide, (160, 120)))
            results.append(PairResult(name, "skipped", str(out), "output exists"))
        else:
            _, info = pages.engine.super_resolve(wide, wide, return_info=True)
            results.append(PairResult(name, "written", str(out), timings=dict(info.timings)))
    results.reverse()  # matched by their timings, not by their order
    pages.write(results, jobs)
    text = (tmp_path / "report.html").read_text()
    per_pair = len(text.encode()) / 200
    assert per_pair < 40_000, per_pair  # small images here; the caps bound large ones
    assert text.count('<section class="pair"') == 200 and text.count('class="viewer"') == 199
    assert "the telephoto is not in the wide" in text.split("Failed pairs (1)", 1)[1][:400]
    skipped = text.split('<h2>p009 <span class="st-skipped">', 1)[1].split("</section>", 1)[0]
    assert 'class="viewer"' in skipped and "not recorded: this run did not" in skipped
    # p123 was the engine's call 122 (p007 and p009 made none): registration 10 + 122 ms
    sec = text.split('<h2>p123 <span class="st-written">', 1)[1].split("</section>", 1)[0]
    assert '<td>registration</td><td class="num">132</td>' in sec
    assert 'data-ov="mask_lr"' in sec and "<polygon points=" in sec


def test_previews_are_capped_and_crops_are_one_to_one():
    rng = np.random.default_rng(3)
    wide = procedural_image((300, 400), rng)
    sr = cv2.resize(wide, (800, 600), interpolation=cv2.INTER_CUBIC)
    m = report.pair_material(wide, sr, None, report.MANY)
    frame, centre, corner = m["views"]
    assert _data_shape(frame["after"]) == (384, 512) == _data_shape(frame["before"])
    for view in (centre, corner):
        x, y, w, h = (int(2 * v) for v in view["win"])  # in output pixels
        piece = sr[y : y + h, x : x + w]
        shown = _decoded(view["after"])
        assert shown.shape == piece.shape and _data_shape(view["before"]) == (h, w)
        assert np.abs(shown.astype(int) - piece).mean() < 6  # the same pixels (JPEG aside)
    assert max(_data_shape(m["thumb"])) <= report.MANY.thumb


def _decoded(uri):
    data = base64.b64decode(uri.split(",", 1)[1])
    return cv2.cvtColor(
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )


# ----------------------------------------------------------------------------- the browser


def _selftest(page: Path, profile: Path) -> dict:
    """Load `page?selftest` in headless Chromium (no name resolves, so nothing could be fetched
    even if the page asked) and return what the page's own check wrote into #selftest."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed (apt-get install chromium; .ci/run does it)"
    cmd = [
        chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--window-size=1200,900", "--dump-dom", page.resolve().as_uri() + "?selftest",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    found = re.search(r'<pre id="selftest"[^>]*>([^<]*)</pre>', out.stdout)
    assert found and found.group(1), out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(found.group(1))


def test_the_pages_work_in_chromium(reports, tmp_path):
    for name in ("batch", "demo"):
        text = reports[name].read_text()
        got = _selftest(reports[name], tmp_path / "profile")
        assert got["images"] == text.count("<img ") > 0, got
        assert got["broken"] == [], got  # every picture decoded (naturalWidth > 0)
        assert got["external"] == got["fetched"] == got["blocked"] == [], got
        assert got["pairs"] == (3 if name == "batch" else 1)
        v = got["viewer"]
        assert v["width"] > 100 and v["height"] > 50, v
        assert v["slider"] == ["inset(0px 0px 0px 50%)", "inset(0px 0px 0px 20%)"], v
        assert v["drag"][0] != v["drag"][1] and v["drag"][1].endswith(" 75%)"), v  # the line
        scale = float(re.search(r"scale\(([\d.]+)\)", v["zoom"][1]).group(1))
        assert "scale(1)" in v["zoom"][0] and scale > 1.5, v  # the wheel zooms
        assert v["pan"][0] != v["pan"][1], v  # a drag pans
        assert v["toggle"][1:] == [False, True], v  # a toggle shows its overlay


def test_the_browser_check_sees_a_network_request(reports, tmp_path):
    """The control: the same page with one picture from the web; the check must report it."""
    page = tmp_path / "with-a-web-picture.html"
    text = reports["sr"].read_text()
    page.write_text(text.replace("<main>", '<main><img src="https://example.com/x.png" alt="web">'))
    got = _selftest(page, tmp_path / "profile")
    assert got["external"] == ["https://example.com/x.png"], got
    assert got["blocked"] == ["https://example.com/x.png"], got  # the page's policy stopped it
    assert got["broken"] == ["web"], got

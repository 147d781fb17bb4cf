"""`sddusr batch`: good pairs written, bad ones listed, reruns skip, --overwrite redoes, and two
torchrun ranks (gloo, CPU) split the pairs so that each is done exactly once."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from support import invoke, published_folder

from sddusr_engine.batch import PairJob, discover_pairs, shard
from sddusr_engine.io import read_image, write_image
from sddusr_engine.synthetic import make_synthetic_pair, procedural_image


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    """Two good pairs, a truncated JPEG, a text file named .png, a pair missing its telephoto."""
    root = tmp_path_factory.mktemp("raw")
    (root / "wide").mkdir()
    (root / "tele").mkdir()
    for i in range(2):
        rng = np.random.default_rng(i)
        wide, tele, _ = make_synthetic_pair(procedural_image((160, 240), rng), rng=rng)
        write_image(root / "wide" / f"good{i}.png", wide)
        write_image(root / "tele" / f"good{i}.jpg", tele)
    write_image(root / "wide" / "truncated.jpg", wide)
    write_image(root / "tele" / "truncated.jpg", tele)
    data = (root / "tele" / "truncated.jpg").read_bytes()
    (root / "tele" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "wide" / "text.png").write_text("this is not an image")
    write_image(root / "tele" / "text.png", tele)
    write_image(root / "wide" / "lonely.png", wide)
    (root / "wide" / "notes.txt").write_text("ignored: not an image suffix")
    return root


def test_discovery_reports_missing_partners(raw_folder):
    layout, jobs = discover_pairs(raw_folder)
    assert layout == "wide/tele"
    by_name = {j.name: j for j in jobs}
    assert sorted(by_name) == ["good0", "good1", "lonely", "text", "truncated"]
    assert "telephoto" in by_name["lonely"].problem
    assert by_name["good0"].problem is None and by_name["truncated"].problem is None


def test_batch_writes_good_pairs_lists_bad_ones_and_resumes(raw_folder, tiny_weights, tmp_path):
    out = tmp_path / "out"
    args = ("batch", raw_folder, "-o", out, "--weights", tiny_weights, "--device", "cpu")
    res = invoke(*args, "--report", tmp_path / "r.json")
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    for i in range(2):
        assert read_image(out / f"good{i}.png").shape == (128, 192, 3)
    assert sorted(p.name for p in out.iterdir()) == ["good0.png", "good1.png"]  # no temp files
    for bad in ("lonely", "text", "truncated"):
        assert bad in res.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    status = {r["name"]: r["status"] for r in report["results"]}
    assert status == {"good0": "written", "good1": "written", "lonely": "failed",
                      "text": "failed", "truncated": "failed"}  # fmt: skip

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = invoke(*args, "--report", tmp_path / "r2.json")
    assert res.exit_code == 1, res.output  # the bad pairs still fail
    assert (tmp_path / "r2.json").exists(), res.output
    status = {
        r["name"]: r["status"] for r in json.loads((tmp_path / "r2.json").read_text())["results"]
    }
    assert status["good0"] == status["good1"] == "skipped"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    res = invoke(*args, "--overwrite", "--ensemble", 2, "--report", tmp_path / "r3.json")
    r3 = json.loads((tmp_path / "r3.json").read_text())
    status = {r["name"]: r["status"] for r in r3["results"]}
    assert status["good0"] == status["good1"] == "written"
    assert r3["ensemble"] == 2 and report["ensemble"] == 1
    assert all((out / n).stat().st_mtime_ns != t for n, t in mtimes.items())


def test_batch_usage_errors_exit_2(tmp_path, tiny_weights):
    res = invoke("batch", tmp_path / "missing", "-o", tmp_path / "o", "--weights", tiny_weights)
    assert res.exit_code == 1 and "Traceback" not in res.output  # a missing file, not a usage
    assert "does not exist" in res.stderr
    (tmp_path / "empty").mkdir()
    res = invoke("batch", tmp_path / "empty", "-o", tmp_path / "o", "--weights", tiny_weights)
    assert res.exit_code == 2 and "published layout" in res.stderr


def test_shard_covers_each_pair_once():
    jobs = [PairJob(f"{i:03d}", "raw", {}) for i in (5, 3, 9, 1, 7, 2, 8)]
    parts = [shard(jobs, r, 3) for r in range(3)]
    names = sorted(j.name for p in parts for j in p)
    assert names == sorted(j.name for j in jobs)


def test_torchrun_two_cpu_ranks_split_the_pairs(tmp_path, tiny_weights):
    root = published_folder(tmp_path / "data", 4)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "sddusr_engine.cli", "batch", str(root), "-o", str(out),
        "--weights", str(tiny_weights), "--device", "cpu", "--report", str(tmp_path / "rep.json"),
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    names = [f"{i:04d}" for i in range(4)]
    assert sorted(q.name for q in out.iterdir()) == [f"{n}.png" for n in names]
    combined = json.loads((tmp_path / "rep.json").read_text())
    assert combined["world"] == 2
    assert sorted(r["name"] for r in combined["results"]) == names  # each pair exactly once
    assert all(r["status"] == "written" for r in combined["results"])
    for rank in range(2):
        mine = json.loads((tmp_path / f"rep.rank{rank}.json").read_text())
        assert mine["world"] == 2 and mine["rank"] == rank
        assert [r["name"] for r in mine["results"]] == names[rank::2]
        assert all(r["rank"] == rank and r["status"] == "written" for r in mine["results"])


def test_triplet_warnings_reach_the_report(tmp_path):
    """A published-layout triplet whose LR_center is not a crop of its LR: with weights that
    carry the low-band projection, the pair is written and the report says the projection was
    skipped (the engine's info warnings travel for triplets as for raw pairs)."""
    import torch
    from support import TINY

    from sddusr_engine import build_model
    from sddusr_engine.weights import save_weights

    torch.manual_seed(0)
    model = build_model("sddusr", low_band_taps=3, low_band_sigma=1.0, **TINY)
    with torch.no_grad():
        model.low_band_upsampler.taps.fill_(1 / 9)
    weights = save_weights(model, tmp_path / "lb.safetensors")
    root = published_folder(tmp_path / "pub", 2)
    lrc = root / "test" / "LR_center" / "0001.png"
    write_image(lrc, 255 - read_image(lrc))  # no longer a crop of LR
    res = invoke("batch", root, "-o", tmp_path / "out", "--weights", weights, "--device", "cpu",
                 "--report", tmp_path / "r.json")  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert rows["0001"]["status"] == "written"
    assert "low-band projection was skipped" in (rows["0001"]["message"] or "")
    assert rows["0000"]["message"] is None  # an exact crop: found, projected, nothing to say
    assert "low_band" in rows["0000"]["timings"]


def test_interrupted_batch_writes_what_finished_and_its_report(tmp_path, tiny_weights, monkeypatch):
    """Ctrl-C after the first pair: that pair's image is written whole, the report lists it and
    the pairs not run, and the command exits 130 with no temporary file left behind."""
    from sddusr_engine.engine import Engine

    real_run, calls = Engine.run, []

    def run_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "run", run_then_interrupt)
    root = published_folder(tmp_path / "data", 3, size=(16, 24))
    out = tmp_path / "out"
    res = invoke("batch", root, "-o", out, "--weights", tiny_weights, "--device", "cpu",
                 "--report", tmp_path / "r.json")  # fmt: skip
    assert res.exit_code == 130, res.output
    assert "Traceback" not in res.output and "interrupted." in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["0000.png"]  # no temporary files
    assert read_image(out / "0000.png").shape == (32, 48, 3)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["interrupted"] is True
    assert [(r["name"], r["status"]) for r in report["results"]] == [("0000", "written")]
    assert report["not_run"] == ["0001", "0002"]
    assert "summary" in res.stdout  # the table of what finished is printed


def test_batch_checks_its_outputs_before_any_pair(tmp_path, tiny_weights, monkeypatch):
    """An output folder that cannot be made fails at once, one sentence, nothing computed."""
    from sddusr_engine.engine import Engine

    def never(self, *a, **k):
        raise AssertionError("the engine ran although the output cannot be written")

    monkeypatch.setattr(Engine, "run", never)
    root = published_folder(tmp_path / "data", 1, size=(16, 24))
    (tmp_path / "file").write_text("a file")
    res = invoke("batch", root, "-o", tmp_path / "file" / "out", "--weights", tiny_weights)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.stderr.strip().splitlines()[-1].startswith("error: cannot write")
    assert "is a file, not a folder" in res.stderr

"""`sddusr batch`: good pairs written, bad ones listed, reruns skip, --overwrite redoes, two
torchrun ranks (gloo, CPU) split the pairs so that each is done exactly once, and raw pairs are
registered in the reader thread while the network runs, as measured by the run's statistics."""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from support import invoke, published_folder

from sddusr_engine.batch import BatchStats, PairJob, discover_pairs, run_batch, shard
from sddusr_engine.engine import RunInfo
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


def test_batch_writes_good_pairs_lists_bad_ones_and_resumes(
    raw_folder, tiny_weights, tmp_path, monkeypatch
):
    """... and hands the heap's free pages back at each pair's stages, as `sddusr sr` does."""
    from sddusr_engine import process

    released = []
    monkeypatch.setattr(process, "release_freed_memory", lambda: released.append(1) or True)
    out = tmp_path / "out"
    args = ("batch", raw_folder, "-o", out, "--weights", tiny_weights, "--device", "cpu")
    res = invoke(*args, "--report", tmp_path / "r.json")
    assert res.exit_code == 1, res.output
    assert len(released) >= 2 * 4  # two pairs: trunk, reference, matching, decode at least
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
    assert report["pairs_computed"] == 2 and report["pairs_per_s"] > 0
    assert 0 <= report["compute_idle_share"] <= 1
    assert "pairs/s" in res.stdout and "compute idle" in res.stdout
    assert all(r["register_s"] > 0 for r in report["results"] if r["status"] == "written")

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


# ----------------------------------------------------------------------------- overlap


@pytest.fixture(scope="module")
def engine(tiny_weights):
    from sddusr_engine.engine import Engine

    return Engine.from_pretrained(tiny_weights, device="cpu", tile=0)


def _raw_jobs(root, pairs):
    """`pairs` ({name: (wide array, tele array)}) as IN/wide + IN/tele, discovered."""
    for sub in ("wide", "tele"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, (wide, tele) in pairs.items():
        write_image(root / "wide" / f"{name}.png", wide)
        write_image(root / "tele" / f"{name}.png", tele)
    return discover_pairs(root)[1]


class _Spy:
    """The engine, with the thread that made each registration and network call recorded."""

    def __init__(self, engine):
        self._engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def register_pair(self, *a, **k):
        self.calls.append(("register_pair", threading.current_thread().name))
        return self._engine.register_pair(*a, **k)

    def run_registered(self, *a, **k):
        self.calls.append(("run_registered", threading.current_thread().name))
        return self._engine.run_registered(*a, **k)

    def super_resolve(self, *a, **k):
        self.calls.append(("super_resolve", threading.current_thread().name))
        return self._engine.super_resolve(*a, **k)


def test_raw_pairs_register_in_the_reader_and_match_super_resolve(pair, engine, tmp_path):
    """Each raw pair is registered in the reader thread and only run on the caller's thread, and
    the image written is super_resolve's, pixel for pixel (threads change no arithmetic)."""
    wide, tele = read_image(pair[0]), read_image(pair[1])
    jobs = _raw_jobs(tmp_path / "in", {"a": (wide, tele), "b": (wide[:, ::-1], tele[:, ::-1])})
    spy, stats = _Spy(engine), BatchStats()
    stages, ticks = [], []
    results = run_batch(
        spy, jobs, tmp_path / "out", stats=stats,
        progress=lambda done, total: ticks.append((done, total)), on_stage=stages.append,
    )  # fmt: skip
    assert [(r.name, r.status) for r in results] == [("a", "written"), ("b", "written")]
    assert stages.count("trunk") == stages.count("decode") == 2  # each pair's network run
    assert ticks and ticks[-1][0] == ticks[-1][1]
    me = threading.current_thread().name
    calls = [("register_pair", "sddusr-reader")] * 2 + [("run_registered", me)] * 2
    assert sorted(spy.calls) == calls  # and super_resolve never
    for r in results:
        assert r.register_s > 0 and r.read_s > 0 and r.seconds > 0
        assert "registration" in r.timings
    expected = engine.super_resolve(wide, tele)
    assert np.array_equal(read_image(tmp_path / "out" / "a.png"), expected)
    assert stats.computed == 2 and stats.pairs_per_s > 0
    assert 0 <= stats.compute_idle_share <= 1


def test_a_telephoto_not_found_fails_as_before_or_is_written_with_the_warning(engine, tmp_path):
    """missing_reference="error": the pair fails with FootprintNotFoundError's own sentence;
    "skip": it is written reference-free, its message the engine's warning."""
    from sddusr_engine.errors import FootprintNotFoundError

    rng = np.random.default_rng(3)
    wide = procedural_image((96, 128), rng)
    noise = rng.integers(0, 256, wide.shape, dtype=np.uint8)
    jobs = _raw_jobs(tmp_path / "in", {"lost": (wide, noise)})
    with pytest.raises(FootprintNotFoundError) as e:
        engine.super_resolve(wide, noise)
    (failed,) = run_batch(engine, jobs, tmp_path / "out")
    assert (failed.status, failed.message) == ("failed", str(e.value))
    assert not (tmp_path / "out" / "lost.png").exists()

    with pytest.warns(UserWarning, match="without the reference"):
        expected, info = engine.super_resolve(
            wide, noise, missing_reference="skip", return_info=True
        )
    (written,) = run_batch(engine, jobs, tmp_path / "out", missing_reference="skip")
    assert written.status == "written"
    assert written.message == "; ".join(info.warnings)
    assert written.message.endswith("Continuing without the reference.")
    assert np.array_equal(read_image(tmp_path / "out" / "lost.png"), expected)


class _Timed:
    """An engine whose registration and network pass only sleep (seconds each), for timing the
    overlap itself."""

    tile = 0

    def __init__(self, register_s, compute_s):
        self.register_s, self.compute_s = register_s, compute_s

    def register_pair(self, wide, tele, **_):
        time.sleep(self.register_s)
        return wide

    def run_registered(self, wide, return_info=False, **_):
        time.sleep(self.compute_s)
        return np.zeros((2 * wide.shape[0], 2 * wide.shape[1], 3), np.uint8), RunInfo()


def test_registration_overlaps_compute_and_the_idle_share_finds_the_bottleneck(tmp_path):
    """Registration and network 0.25 s each over 4 pairs: about 1.25 s, not the 2 s of one after
    the other, and the compute loop waits only for the first pair. A slow registration under a
    fast network: the loop waits most of the time, which the idle share says."""
    small = np.full((8, 12, 3), 128, np.uint8)
    jobs = _raw_jobs(tmp_path / "in", {f"p{i}": (small, small) for i in range(4)})
    balanced = BatchStats()
    run_batch(_Timed(0.25, 0.25), jobs, tmp_path / "o1", stats=balanced)
    assert balanced.computed == 4 and balanced.wall_s < 1.7, balanced
    assert balanced.pairs_per_s == pytest.approx(4 / balanced.wall_s)
    assert balanced.compute_idle_share < 0.4, balanced  # about 0.25 of 1.25 s
    starved = BatchStats()
    run_batch(_Timed(0.25, 0.0), jobs, tmp_path / "o2", stats=starved)
    assert starved.compute_idle_share > 0.8, starved


def test_ctrl_c_during_a_registration_stops_the_reader_at_its_next_step(tmp_path):
    """Ctrl-C while the reader registers the next pair (5 s of steps): `BatchInterrupted` at once,
    and the reader abandons that registration at its next step instead of finishing it."""
    from sddusr_engine.batch import BatchInterrupted

    class Interrupted(_Timed):
        def register_pair(self, wide, tele, progress=None, **_):
            self.calls = getattr(self, "calls", 0) + 1
            for i in range(100 if self.calls > 1 else 0):
                time.sleep(0.05)
                progress(i + 1, 100)
            return wide

        def run_registered(self, *a, **k):
            time.sleep(0.1)  # the reader is inside the second registration by now
            raise KeyboardInterrupt

    small = np.full((8, 12, 3), 128, np.uint8)
    jobs = _raw_jobs(tmp_path / "in", {f"p{i}": (small, small) for i in range(3)})
    t0 = time.perf_counter()
    with pytest.raises(BatchInterrupted) as stopped:
        run_batch(Interrupted(0, 0), jobs, tmp_path / "out")
    assert stopped.value.results == [] and time.perf_counter() - t0 < 1.5
    readers = [t for t in threading.enumerate() if t.name == "sddusr-reader"]
    for t in readers:
        t.join(timeout=0.5)
    assert not any(t.is_alive() for t in readers)


def test_batch_benchmark_reports_the_rate_and_the_idle_shares(tmp_path):
    """bench/bench_batch.py (what the GPU check's batch stage runs): a folder made of copies of a
    pair, every copy written, pairs per second and the compute loop's idle share from the run's
    statistics; on the CPU no GPU share and the table says they are not GPU numbers."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_batch

    rng = np.random.default_rng(5)
    wide, tele, _ = make_synthetic_pair(procedural_image((160, 240), rng), rng=rng)
    write_image(tmp_path / "w.png", wide)
    write_image(tmp_path / "t.png", tele)
    folder, out = tmp_path / "folder", tmp_path / "batch.json"
    args = [str(folder), "--make", str(tmp_path / "w.png"), str(tmp_path / "t.png"),
            "--copies", "3", "--device", "cpu", "--json", str(out)]  # fmt: skip
    assert bench_batch.main(args) == 0
    result = json.loads(out.read_text())
    assert result["pairs"] == result["written"] == result["pairs_computed"] == 3
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["p1.png", "p2.png", "p3.png"]
    assert result["pairs_per_s"] > 0 and 0 <= result["compute_idle_share"] <= 1
    assert result["gpu_busy_share"] is None and result["not_gpu_numbers"] is True
    assert all(p["register_s"] > 0 and p["seconds"] > 0 for p in result["per_pair"])

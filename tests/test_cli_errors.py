"""Every error the `sddusr` commands can give: one sentence on stderr starting with `error:`, no
traceback, no internal object or library advice in it, the exit code docs/cli.md promises (1 a
failed command, 2 a usage error, 3 a bug, 130 interrupted), and nothing written when it fails.
Tiny images and the tiny random weights: no case here runs the network on more than a few pixels.
"""

import argparse
import json
import re

import numpy as np
import pytest
import torch
from support import invoke

from sddusr_engine import errors
from sddusr_engine.io import write_image


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_weights):
    """Inputs for every case: a small pair, a 1x1 image, a text file named .png, two bad .pth
    files, a file that stands where a folder should be, and the datasets of the wrong layout."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    write_image(d / "wide.png", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    write_image(d / "tele.png", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    write_image(d / "dot.png", np.zeros((1, 1, 3), np.uint8))
    (d / "text.png").write_text("this is not an image")
    (d / "text.pth").write_text("this is not a checkpoint")
    torch.save({"args": argparse.Namespace(lr=1e-4), "w": torch.zeros(2)}, d / "objects.pth")
    (d / "afile").write_text("a file, not a folder")
    (d / "exists.png").write_bytes((d / "wide.png").read_bytes())
    (d / "flat").mkdir()  # neither layout
    (d / "flat" / "x.png").write_bytes((d / "wide.png").read_bytes())
    for name, pairs in (("empty", ()), ("pairs", ("a",))):
        (d / name / "wide").mkdir(parents=True)
        (d / name / "tele").mkdir()
        for n in pairs:
            for side in ("wide", "tele"):
                (d / name / side / f"{n}.png").write_bytes((d / f"{side}.png").read_bytes())
    return {"d": d, "w": str(tiny_weights)}


def one_sentence(res, code):
    """The error contract: exit code, no traceback, the last stderr line the only `error:` one."""
    assert res.exit_code == code, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errs) == 1 and lines[-1] == errs[0], res.stderr
    msg = errs[0]
    assert msg.rstrip().endswith((".", "?")), msg
    for internal in ("<_io.", " object at 0x", "weights_only", "Errno", ".tmp"):
        assert internal not in msg, msg
    return msg


D = "{d}"
SR = ("sr", f"{D}/wide.png", f"{D}/tele.png", "-o", f"{D}/out/o.png", "-w", "{w}")
CPU = ("--device", "cpu")

# (case, arguments, exit code, words the sentence must hold)
CASES = [
    ("unknown device", (*SR, "--device", "tpu"), 2, ["unknown device 'tpu'", "cuda:N"]),
    ("meta device", (*SR, "--device", "meta"), 2, ["unknown device 'meta'"]),
    ("no such GPU", (*SR, "--device", "cuda:99"), 2, ["GPU"]),
    ("fp16 on the CPU", (*SR, *CPU, "-p", "fp16"), 2, ["fp16 runs on a GPU only"]),
    ("precision not a choice", (*SR, "-p", "fp8"), 2, ["'fp8' is not one of", "sddusr sr --help"]),
    ("tile too small", (*SR, *CPU, "--tile", "7"), 2, ["tile must be 0 (whole image) or at least 32"]),
    ("ensemble size", (*SR, *CPU, "--ensemble", "3"), 2, ["ensemble must be one of 1, 2, 4, 8"]),
    ("adapt negative", (*SR, *CPU, "--adapt", "-1"), 2, ["adapt must be 0 (off) to"]),
    ("output suffix", ("sr", f"{D}/wide.png", f"{D}/tele.png", "-o", f"{D}/o.bmp"), 2,
     ["must end in .png"]),
    ("output exists", ("sr", f"{D}/wide.png", f"{D}/tele.png", "-o", f"{D}/exists.png", "-w",
                       "{w}"), 2, ["exists.png exists", "--overwrite"]),
    ("missing argument", ("sr", f"{D}/wide.png"), 2, ["missing argument 'tele'"]),
    ("unknown command", ("srr",), 2, ["no such command 'srr'"]),
    ("missing image", ("sr", f"{D}/nope.png", f"{D}/tele.png", "-o", f"{D}/out/o.png"), 1,
     ["nope.png", "does not exist"]),
    ("text named .png", ("sr", f"{D}/text.png", f"{D}/tele.png", "-o", f"{D}/out/o.png"), 1,
     ["text.png", "not in an image format that can be decoded (png, jpg"]),
    ("1x1 wide image", ("sr", f"{D}/dot.png", f"{D}/tele.png", "-o", f"{D}/out/o.png", "-w",
                        "{w}", "--no-reference-ok"), 1, ["1x1 pixels", "at least 8x8"]),
    ("weights not found", (*SR[:-1], f"{D}/none.safetensors"), 1,
     ["weights file not found", "none.safetensors"]),
    ("text named .pth", (*SR[:-1], f"{D}/text.pth"), 1, ["text.pth is not a readable PyTorch"]),
    ("pickled objects in .pth", (*SR[:-1], f"{D}/objects.pth"), 1,
     ["holds Python objects besides tensors", "argparse.Namespace", "state_dict()"]),
    ("unknown weights suffix", (*SR[:-1], f"{D}/wide.png"), 1, ["unknown weights format '.png'"]),
    ("output under a file", ("sr", f"{D}/wide.png", f"{D}/tele.png", "-o", f"{D}/afile/o.png",
                             "-w", "{w}"), 1, ["afile/o.png", "is a file, not a folder"]),
    ("maps folder is a file", (*SR, "--save-maps", f"{D}/afile"), 1,
     ["cannot write", "afile': it is a file, not a folder"]),
    ("batch: no such folder", ("batch", f"{D}/nowhere", "-o", f"{D}/bo", "-w", "{w}"), 1,
     ["input folder", "does not exist"]),
    ("batch: neither layout", ("batch", f"{D}/flat", "-o", f"{D}/bo", "-w", "{w}"), 2,
     ["holds neither wide/ + tele/ folders nor the published layout"]),
    ("batch: empty layout", ("batch", f"{D}/empty", "-o", f"{D}/bo", "-w", "{w}"), 2,
     ["holds no image pairs"]),
    ("batch: output format", ("batch", f"{D}/empty", "-o", f"{D}/bo", "--ext", "bmp"), 2,
     ["--ext 'bmp' is not one of png"]),
    ("batch: output is a file", ("batch", f"{D}/pairs", "-o", f"{D}/afile", "-w", "{w}"), 1,
     ["afile': it is a file, not a folder"]),
    ("batch: report under a file", ("batch", f"{D}/pairs", "-o", f"{D}/bo", "-w", "{w}",
                                    "--report", f"{D}/afile/r.json"), 1,
     ["r.json", "is a file, not a folder"]),
    ("eval: neither layout", ("eval", f"{D}/flat", "-w", "{w}"), 2,
     ["is not in the published layout"]),
    ("eval: no such folder", ("eval", f"{D}/nowhere", "-w", "{w}"), 1,
     ["dataset folder", "does not exist"]),
    ("eval: json under a file", ("eval", f"{D}/flat", "--json", f"{D}/afile/r.json"), 1,
     ["r.json", "is a file, not a folder"]),
    ("profile: size", ("profile", "--size", "10x10", *CPU, "-w", "{w}"), 2,
     ["--size 10x10: both sides must be multiples of 4 and at least 32"]),
    ("convert: suffix", ("convert", f"{D}/text.pth", f"{D}/k.pth"), 2,
     ["must end in .safetensors"]),
    ("convert: not KeDuSR", ("convert", "{w}", f"{D}/k.safetensors"), 1,
     ["is not a KeDuSR checkpoint"]),
    ("convert: missing source", ("convert", f"{D}/none.pth", f"{D}/k.safetensors"), 1,
     ["weights file not found"]),
]  # fmt: skip


@pytest.mark.parametrize("case,args,code,words", CASES, ids=[c[0] for c in CASES])
def test_each_error_is_one_sentence_with_its_exit_code(files, case, args, code, words):
    d = files["d"]
    before = sorted(p.relative_to(d) for p in d.rglob("*"))
    res = invoke(*(a.format(d=d, w=files["w"]) for a in args), TRITON_INTERPRET="0")
    msg = one_sentence(res, code)
    for w in words:
        assert w in msg, (w, msg)
    assert sorted(p.relative_to(d) for p in d.rglob("*")) == before  # nothing written
    assert "sddusr (" not in res.stderr, "failed after loading the network, not before"


def test_triton_on_the_cpu_is_a_usage_error(files):
    d = files["d"]
    res = invoke("sr", d / "wide.png", d / "tele.png", "-o", d / "t.png", "-w", files["w"],
                 "--device", "cpu", "--backend", "triton", TRITON_INTERPRET="0")  # fmt: skip
    msg = one_sentence(res, 2)
    assert "--backend torch" in msg
    assert not (d / "t.png").exists()


def test_mismatched_weights_name_the_tensors_after_one_sentence(files, tmp_path):
    from safetensors.torch import load_file, save_file

    w = files["w"]
    tensors = load_file(w)
    tensors.pop(sorted(tensors)[0])
    from safetensors import safe_open

    with safe_open(w, framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    d = files["d"]
    res = invoke("sr", d / "wide.png", d / "tele.png", "-o", tmp_path / "o.png",
                 "-w", tmp_path / "cut.safetensors")  # fmt: skip
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error: ") and "does not match the sddusr network" in lines[0]
    assert any(ln.strip().startswith("missing (1):") for ln in lines[1:])


def test_cpu_out_of_memory_names_the_tile_that_fits(files, tmp_path, monkeypatch):
    from sddusr_engine.engine import Engine

    def no_memory(self, *a, **k):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 5862979584 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(Engine, "super_resolve", no_memory)
    d = files["d"]
    args = ("sr", d / "wide.png", d / "tele.png", "-o", tmp_path / "o.png", "-w", files["w"],
            "--device", "cpu")  # fmt: skip
    msg = one_sentence(invoke(*args), 1)
    assert "out of memory on the CPU (one step asked for 5.5 GiB)" in msg
    assert "--tile 128" in msg and "internal error" not in msg
    msg = one_sentence(invoke(*args, "--tile", 0), 1)
    assert "--tile 256" in msg
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    "cls,code",
    [
        (errors.SddusrError, 1),
        (errors.UsageError, 2),
        (errors.SettingsError, 2),
        (errors.EngineError, 1),
        (errors.OutOfMemoryError, 1),
        (errors.ImageReadError, 1),
        (errors.WeightsError, 1),
        (errors.FootprintNotFoundError, 1),
        (errors.DatasetError, 1),
        (errors.DatasetLayoutError, 2),
        (errors.EvalError, 1),
        (errors.EvalUsageError, 2),
        (errors.OutputError, 1),
        (errors.TrainingError, 1),
    ],
)
def test_every_error_class_exits_with_the_documented_code(cls, code, monkeypatch, files):
    """Whatever raises it, each class's sentence reaches stderr whole, with its exit code."""
    from sddusr_engine.engine import Engine

    def fail(*a, **k):
        raise cls("the thing went wrong.")

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda c, *a, **k: fail()))
    d = files["d"]
    res = invoke("sr", d / "wide.png", d / "tele.png", "-o", d / "cls.png", "-w", files["w"])
    msg = one_sentence(res, code)
    assert msg.startswith("error: the thing went wrong")
    if cls is errors.FootprintNotFoundError:
        assert "--no-reference-ok" in msg
    assert not (d / "cls.png").exists()


def test_a_bug_is_exit_3_with_the_advice_to_report_it(files, monkeypatch):
    from sddusr_engine.engine import Engine

    def bug(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda c, *a, **k: bug()))
    d = files["d"]
    res = invoke("sr", d / "wide.png", d / "tele.png", "-o", d / "bug.png", "-w", files["w"])
    msg = one_sentence(res, 3)
    assert "internal error (ZeroDivisionError: division by zero)" in msg and "--debug" in msg


def test_help_shows_brackets_no_bool_and_whole_summaries():
    res = invoke("eval", "--help")
    assert res.exit_code == 0
    assert "[y0,y1,x0,x1]" in res.stdout
    for cmd in ("sr", "batch", "eval", "demo", "profile"):
        res = invoke(cmd, "--help")
        assert "<bool>" not in res.stdout, cmd
    res = invoke("--help")
    row = next(ln for ln in res.stdout.splitlines() if re.search(r"\btrain\b", ln))
    assert "sddusr train --help)." in row, row


def test_report_of_a_failed_batch_is_json(files, tmp_path):
    """A batch whose pairs all fail still writes its report, and ends with one sentence, exit 1."""
    root = tmp_path / "allbad"
    (root / "wide").mkdir(parents=True)
    (root / "tele").mkdir()
    (root / "wide" / "a.png").write_text("not an image")
    write_image(root / "tele" / "a.png", np.zeros((24, 32, 3), np.uint8))
    res = invoke("batch", root, "-o", root / "out", "-w", files["w"], "--device", "cpu",
                 "--report", root / "r.json")  # fmt: skip
    assert res.exit_code == 1
    assert one_sentence(res, 1).startswith("error: 1 of 1 pairs failed")
    report = json.loads((root / "r.json").read_text())
    assert report["interrupted"] is False and report["results"][0]["status"] == "failed"
    assert "not in an image format" in report["results"][0]["message"]


def test_more_memory_than_the_machine_has_is_a_sentence_not_a_kill(files, tmp_path, monkeypatch):
    """On Linux without a GPU the commands run under a data limit of what is free, so a step that
    wants more than the machine has fails as an allocation (one sentence, exit 1), not by the
    kernel's kill. Without the limit this allocation would be granted (overcommit) untouched."""
    import resource

    from sddusr_engine.cli_errors import memory_ceiling
    from sddusr_engine.engine import Engine

    before = resource.getrlimit(resource.RLIMIT_DATA)
    if torch.cuda.is_available():  # a GPU process: its driver's mappings are left unlimited
        with memory_ceiling():
            assert resource.getrlimit(resource.RLIMIT_DATA) == before
        return
    free = sum(
        int(ln.split()[1]) * 1024
        for ln in open("/proc/meminfo")
        if ln.startswith(("MemAvailable:", "SwapFree:"))
    )

    def too_much(self, *a, **k):
        return torch.empty(free + 2**30, dtype=torch.uint8)

    monkeypatch.setattr(Engine, "super_resolve", too_much)
    d = files["d"]
    res = invoke("sr", d / "wide.png", d / "tele.png", "-o", tmp_path / "o.png", "-w", files["w"],
                 "--device", "cpu", "--tile", 64)  # fmt: skip
    msg = one_sentence(res, 1)
    assert "out of memory on the CPU" in msg and "--tile 32" in msg
    assert resource.getrlimit(resource.RLIMIT_DATA) == before  # put back after the command

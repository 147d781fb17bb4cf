"""Ctrl-C as a person presses it: SIGINT sent to a running `sddusr` process. It stops within a
couple of seconds whether the command is between Python steps or inside one long operation that
does not return (simulated by an operation that blocks in C for a minute), exits 130, says
"interrupted." and leaves no output and no temporary file; a batch reports what finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import published_folder

# The driver patches one network stage, then runs the command line as the `sddusr` script does.
DRIVER = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path

    # a shell starts background jobs with Ctrl-C ignored, and Python then leaves it ignored;
    # a person's terminal delivers it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from sddusr_engine.model.network import DualLensSR
    from sddusr_engine.engine import Engine

    how, marker = sys.argv[1], Path(sys.argv[2])
    real_context, real_run, calls = DualLensSR.reference_context, Engine.run, []

    def stuck(self, *args, **kwargs):
        print("STUCK", file=sys.stderr, flush=True)
        try:
            if how == "c":
                time.sleep(60)  # like one long torch op: blocked in C, the GIL released
            else:
                while True:  # a long loop of Python steps
                    pass
        finally:
            marker.write_text("unwound")
        return real_context(self, *args, **kwargs)

    def second_run_stuck(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            print("STUCK", file=sys.stderr, flush=True)
            time.sleep(60)
        return real_run(self, *args, **kwargs)

    if how == "batch":
        Engine.run = second_run_stuck
    else:
        DualLensSR.reference_context = stuck
    from sddusr_engine.cli import main
    sys.argv = ["sddusr", *sys.argv[3:]]
    main()
    """
)


def _interrupt(tmp_path: Path, how: str, *args) -> tuple[int, str, float]:
    """Start the driver, send SIGINT once the patched stage is reached; (exit code, stderr,
    seconds from the signal to the exit)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, str(driver), how, str(tmp_path / "marker"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # piped: plain progress lines, one per stage
        lines.append(line)
        if "STUCK" in line or time.monotonic() > deadline:
            break
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        _, rest = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process ignored Ctrl-C for 30 s")
    return proc.returncode, "".join(lines) + rest, time.monotonic() - t0


@pytest.mark.parametrize("how", ["c", "python"])
def test_ctrl_c_inside_a_long_operation_stops_within_seconds(pair, tiny_weights, tmp_path, how):
    wide, tele, _ = pair
    out = tmp_path / "out"
    out.mkdir()
    code, stderr, seconds = _interrupt(
        tmp_path, how, "sr", wide, tele, "-o", out / "x2.png", "-w", tiny_weights,
        "--device", "cpu", "--html", out / "r.html",
    )  # fmt: skip
    assert code == 130, stderr
    assert "interrupted." in stderr and "Traceback" not in stderr
    assert seconds < 6, seconds  # the grace of 2 s for the command to unwind, and the exit
    assert list(out.iterdir()) == []  # no output, no temporary file
    # Between Python steps the command itself unwinds (its finally blocks run); stuck in C for a
    # minute it cannot, and the process ends without waiting for it.
    assert (tmp_path / "marker").exists() == (how == "python")


def test_ctrl_c_in_a_batch_stuck_in_one_pair_reports_what_finished(tiny_weights, tmp_path):
    root = published_folder(tmp_path / "data", 3, size=(16, 24))
    out = tmp_path / "out"
    code, stderr, seconds = _interrupt(
        tmp_path, "batch", "batch", root, "-o", out, "--weights", tiny_weights,
        "--device", "cpu", "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 130, stderr
    assert "interrupted." in stderr and "Traceback" not in stderr
    assert seconds < 6, seconds
    assert sorted(p.name for p in out.iterdir()) == ["0000.png"]  # no temporary file
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["interrupted"] is True
    assert [(r["name"], r["status"]) for r in report["results"]] == [("0000", "written")]
    assert report["not_run"] == ["0001", "0002"]

"""Where a training step spends its time: `sddusr_engine.train` under torch.profiler.

Usage: python bench/profile_train.py [--rows N] [--trace FILE] -- TRAIN_ARGS...
TRAIN_ARGS are `python -m sddusr_engine.train`'s (give a small --steps; --no-resume is added).
Prints the ops by self time on the device the run uses (CUDA time on a GPU, CPU time otherwise),
then the wall time per step that the training log reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sddusr_engine import train as train_mod  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--trace", default=None, help="also write a Chrome trace here")
    ap.add_argument("train_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    targs = [x for x in a.train_args if x != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        if "--out" not in targs:
            targs += ["--out", tmp]
        targs += ["--no-resume", "--val-every", "0"]
        parser = train_mod.build_parser()
        parsed = parser.parse_args(targs)  # the run's own reading of its device and folder
        cuda = torch.device(parsed.device).type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            train_mod.main(targs, parser)
        log = Path(parsed.out) / "log.jsonl"
        steps = [json.loads(x) for x in log.read_text().splitlines()]
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows))
    if a.trace:
        prof.export_chrome_trace(a.trace)
    for r in steps:
        if "step_s" in r:
            print(f"step {r['step']}: {r['step_s']:.3f} s/step")


if __name__ == "__main__":
    main()

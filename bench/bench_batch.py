"""Benchmark a folder of pairs through the batch pipeline: pairs per second, how long the compute
loop waited for a prepared pair, and on a GPU how busy the GPU was while the batch ran.

    python bench/bench_batch.py DIR [--json PATH] [--device auto] [--ext png] [--tile N]
    python bench/bench_batch.py DIR --make WIDE TELE --copies 4 ...   (first fill DIR with copies)

DIR holds `wide/` and `tele/` (or the published layout), as `sddusr batch` reads it; the outputs
go to DIR/out, rewritten on every run. It runs what the command runs (`batch.run_batch` with the
shipped weights: reading and registration in one thread, the network on this one, writing in
another; the heap's free pages handed back at each stage as the command does) and reports:

- `pairs_per_s`: pairs computed per second of the whole run, first read to last write;
- `compute_idle_share`: the share of the compute loop spent waiting for a registered pair (the
  device had nothing to do: reading or registration is the bottleneck);
- `gpu_busy_share` (CUDA with NVML, which `torch.cuda.utilization` reads): the mean of the
  GPU's utilisation sampled every 100 ms over the run, as a share: the time a kernel was running.
  Its complement is the GPU's idle share, whatever the cause (waiting for pairs, host work
  inside the network's run such as the host maps' transfers, writing).

With `--make WIDE TELE` the folder is first filled with `--copies` copies of that pair (each is
registered and computed as its own pair). A CPU run shows the harness works; those are CPU
numbers and carry no GPU share.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
from pathlib import Path

import harness
import torch

from sddusr_engine.batch import BatchStats, discover_pairs, run_batch
from sddusr_engine.engine import Engine
from sddusr_engine.process import releasing, trimming

SAMPLE_EVERY_S = 0.1
PAIR_FIELDS = ("name", "status", "read_s", "register_s", "seconds", "write_s", "message")


def make_folder(folder: Path, wide: Path, tele: Path, copies: int) -> None:
    """`folder`/wide and `folder`/tele holding `copies` copies of the pair (named p1, p2, ...)."""
    for side, src in (("wide", wide), ("tele", tele)):
        (folder / side).mkdir(parents=True, exist_ok=True)
        for i in range(1, copies + 1):
            shutil.copyfile(src, folder / side / f"p{i}{src.suffix}")


class GpuSampler:
    """The GPU's utilisation (percent of the last sample period with a kernel running), sampled
    in a thread while the batch runs; no samples off CUDA or without NVML."""

    def __init__(self, device: torch.device):
        self.device, self.samples = device, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.unavailable: str | None = None

    def __enter__(self) -> GpuSampler:
        if self.device.type == "cuda":
            try:
                torch.cuda.utilization(self.device)
            except Exception as e:  # noqa: BLE001 -- NVML missing or refused: say so
                self.unavailable = f"{type(e).__name__}: {e}"
            else:
                self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.samples.append(torch.cuda.utilization(self.device))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def busy_share(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--make", nargs=2, type=Path, metavar=("WIDE", "TELE"), default=None)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--tile", type=int, default=None, help="LR tile (default: the engine's)")
    ap.add_argument("--ext", default="png", help="output format (png, jpg, tif, ...)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.make:
        make_folder(args.folder, *args.make, args.copies)
    _, jobs = discover_pairs(args.folder)
    engine = Engine.from_pretrained(device=args.device, dtype=args.precision, tile=args.tile)
    device = engine.device
    out = args.folder / "out"
    stats = BatchStats()
    with GpuSampler(device) as gpu:
        results = run_batch(
            engine, jobs, out, overwrite=True, ext=args.ext, stats=stats,
            progress=trimming(None), on_stage=releasing(lambda _stage: None),
        )  # fmt: skip
    written = [r for r in results if r.status == "written"]
    meta = {**harness.stamp(device), "card": harness.stamp(device)["device"]}
    busy = gpu.busy_share
    result = {
        **meta,
        "folder": str(args.folder),
        "pairs": len(jobs),
        "written": len(written),
        "ext": args.ext,
        **stats.to_dict(),
        "gpu_busy_share": busy,
        "gpu_idle_share": None if busy is None else 1 - busy,
        "gpu_samples": len(gpu.samples),
        "gpu_sampling": gpu.unavailable or ("NVML, every 0.1 s" if gpu.samples else "none"),
        "per_pair": [{k: getattr(r, k) for k in PAIR_FIELDS} for r in results],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    body = [[r["name"], r["status"], harness.fmt(r["read_s"], ".2f"),
             harness.fmt(r["register_s"], ".2f"), harness.fmt(r["seconds"], ".2f"),
             harness.fmt(r["write_s"], ".2f")] for r in result["per_pair"]]  # fmt: skip
    harness.print_table(
        harness.title(meta, f"batch of {len(jobs)} pairs, {args.folder}"),
        ["pair", "status", "read s", "register s", "network s", "write s"],
        body,
    )
    idle = result["compute_idle_share"]
    print(f"{result['pairs_per_s']:.3f} pairs/s; compute loop idle {harness.fmt(idle, '.1%')}; "
          f"GPU busy {harness.fmt(busy, '.1%')} ({result['gpu_sampling']})")  # fmt: skip
    return 0 if len(written) == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())

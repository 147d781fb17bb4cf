"""`python -m sddusr_engine.data {fetch,prepare,all}`: fetch the photos, write the training pairs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .camera import REF_ALIGNMENTS
from .photos import DEFAULT_CACHE, fetch_photos
from .prepare import prepare_pairs


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m sddusr_engine.data", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("fetch", "prepare", "all"):
        sp = sub.add_parser(name)
        sp.add_argument(
            "--cache",
            type=Path,
            default=DEFAULT_CACHE,
            help="photo cache (outside the repo); default ~/.cache/sddusr/photos",
        )
        if name != "fetch":
            sp.add_argument("--out", type=Path, required=True, help="dataset folder to write")
            sp.add_argument("--seed", type=int, default=0)
            sp.add_argument("--hr-max", type=int, default=1024)
            sp.add_argument("--train-crops", type=int, default=3)
            sp.add_argument(
                "--ref-alignment",
                choices=REF_ALIGNMENTS,
                default="registration",
                help="how Ref is put on LRC's grid (default: the engine's own registration)",
            )
    a = ap.parse_args(argv)
    if a.cmd in ("fetch", "all"):
        pm = fetch_photos(a.cache)
        counts = json.loads(pm.read_text())["counts"]
        print(f"photos: {pm} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    if a.cmd in ("prepare", "all"):
        pm = Path(a.cache).expanduser() / "photos.json"
        m = prepare_pairs(
            pm,
            a.out,
            seed=a.seed,
            hr_max=a.hr_max,
            train_crops=a.train_crops,
            ref_alignment=a.ref_alignment,
        )
        print(f"pairs: {m}")


main()

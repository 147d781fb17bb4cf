"""Registration of a 12 MP pair beside one full-resolution SIFT pass over its wide image.

    python bench/bench_registration.py [--repeat 3]

Makes a synthetic 12 MP pair (wide 4032×3024, telephoto the same size at zoom ×2.0, 1.5° roll,
off-centre, colour gains), writes it to a temporary folder, then times in fresh processes, one
after another in this run: one SIFT detect-and-compute over the full-resolution wide image (the
settings `register` uses) and `register` itself. Each child reports its wall time and its peak
resident memory (ru_maxrss) with the memory it held before the timed step (Python, OpenCV and
the two decoded images). Prints a table whose title names the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import numpy as np, cv2
sys.path.insert(0, sys.argv[3])
wide = np.load(sys.argv[2] + "/wide.npy"); tele = np.load(sys.argv[2] + "/tele.npy")
h_true = np.load(sys.argv[2] + "/h.npy")
def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
def rss_mb():
    return status_mb("VmRSS")
if sys.argv[1] == "sift":
    before = rss_mb()
    t = time.perf_counter()
    g = cv2.cvtColor(wide, cv2.COLOR_RGB2GRAY)
    kp, d = cv2.SIFT_create(nfeatures=6000, contrastThreshold=0.02).detectAndCompute(g, None)
    dt, extra = time.perf_counter() - t, {"keypoints": len(kp)}
else:
    from sddusr_engine.registration import register, _corners
    before = rss_mb()
    t = time.perf_counter()
    fp = register(wide, tele)
    dt = time.perf_counter() - t
    err = np.linalg.norm(fp.corners - _corners(h_true, tele.shape[:2]), axis=1).max()
    extra = {"corner_error_px": float(err), "confidence": fp.confidence, "method": fp.method}
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
peak = status_mb("VmHWM")
print(json.dumps({"s": dt, "peak_mb": peak, "before_mb": before, **extra}))
"""


def make_pair(folder: Path) -> None:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from sddusr_engine.synthetic import make_synthetic_pair, procedural_image

    # the HR scene at exactly the telephoto's density (zoom 2.0), so no resampling blurs it
    hr = procedural_image((6048, 8064), np.random.default_rng(12))
    wide, tele, h = make_synthetic_pair(
        hr, 2.0, 1.5, (150.0, -90.0), (1.12, 0.92, 0.95), 0.0, np.random.default_rng(1),
        wide_shape=(3024, 4032),
    )  # fmt: skip
    np.save(folder / "wide.npy", wide)
    np.save(folder / "tele.npy", tele)
    np.save(folder / "h.npy", h)


def run(kind: str, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(folder), str(ROOT)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating (median kept)")
    ap.add_argument(
        "--make-pair",
        metavar="DIR",
        default=None,
        help="only write the synthetic 12 MP pair as DIR/wide.png and DIR/tele.png (for "
        "bench_pipeline.py --pair) and stop",
    )
    args = ap.parse_args()
    if args.make_pair:
        folder = Path(args.make_pair)
        folder.mkdir(parents=True, exist_ok=True)
        make_pair(folder)
        import numpy as np
        from PIL import Image

        for name in ("wide", "tele"):
            Image.fromarray(np.load(folder / f"{name}.npy")).save(folder / f"{name}.png")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_pair(folder)
        rows: dict[str, list[dict]] = {"sift": [], "register": []}
        for _ in range(args.repeat):  # alternating, so that load from others hits both alike
            for kind in rows:
                rows[kind].append(run(kind, folder))
    cpu = platform.processor() or platform.machine()
    title = (
        f"Registration of a 12 MP pair (4032x3024 + 4032x3024), {os.cpu_count()}-core CPU "
        f"({cpu}), {datetime.date.today().isoformat()}, median of {args.repeat}"
    )
    print(title)
    print("| step | time (s) | peak RSS (MB) | RSS before (MB) | notes |")
    print("|---|---|---|---|---|")
    med = {}
    for kind, label in (("sift", "one SIFT pass, full-res wide"), ("register", "register()")):
        rs = sorted(rows[kind], key=lambda r: r["s"])
        m = rs[len(rs) // 2]
        med[kind] = m["s"]
        if kind == "sift":
            note = f"{m['keypoints']} keypoints"
        else:
            note = (
                f"{m['method']}, corner error {m['corner_error_px']:.2f} px, "
                f"confidence {m['confidence']:.2f}"
            )
        print(f"| {label} | {m['s']:.2f} | {m['peak_mb']:.0f} | {m['before_mb']:.0f} | {note} |")
    print(f"register / SIFT pass = {med['register'] / med['sift']:.2f}")


if __name__ == "__main__":
    main()

"""Photos for training: `fetch_photos(cache)` downloads the photo packages from Debian with
`apt-get download` into a cache folder outside the repository, unpacks them with `dpkg-deb -x`,
and writes `photos.json` listing every distinct photo with its package, the licence that the
package's `copyright` file (DEP-5) gives for it, its near-identical copies (collapsed by `dedup`) and its
fixed split (`split_for`)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .dedup import DEDUP_RULE, collapse_copies, image_size


def _each(folder: str, names: str) -> tuple[str, ...]:
    return tuple(f"{folder}/{n}" for n in names.split())


# Package -> glob(s) of the photo files it ships (relative to the unpacked root). Photographs only:
# each entry says why its files are photos and what of the package is left out. Contact sheets of
# every image of 40 candidate packages decided (bookworm, 2026-12-04). Rejected whole: ukui-wallpapers,
# gnome-backgrounds, sway-backgrounds, xfdesktop4-data, lxde-common, desktop-base, debian-edu-artwork-*,
# lomiri-wallpapers, slim, fvwm-crystal (renders, gradients, logos); kodi-data, gimp-help-en,
# kphotoalbum's doc/, hugin-data (screenshots, filter demonstrations); tuxpaint-stamps (cut-outs on
# transparency); kstars-data, marble-data (sky and map textures); visp-images-data (markers, warped
# and blurred copies, grey); gcompris-qt-data (images packed in Qt resources).
PHOTO_PACKAGES: dict[str, tuple[str, ...]] = {
    # Ubuntu Touch wallpapers: all photographs (two are close-ups of paint and a pattern, still
    # camera images).
    "lomiri-wallpapers-16.04": ("usr/share/backgrounds/*.jpg",),
    "lomiri-wallpapers-20.04": ("usr/share/backgrounds/*.jpg",),
    # nature/ is photographs; desktop/ and abstract/ are renders.
    "mate-backgrounds": ("usr/share/backgrounds/mate/nature/*.jpg",),
    # flower.png is a camera photo; its JPEG re-encodings and depth variants are left to `dedup`
    # (they collapse onto it); flower_cropped.jpg is a crop the hash cannot see, so it is left out;
    # hdr_room.png is a photo of a room; the wesaturate set is three 500 px photos (sRGB copies only:
    # the grey and alpha copies are the same photos). The wide-gamut files are colour charts.
    "libjxl-testdata": (
        "usr/share/libjxl-testdata/jxl/flower/flower.png",
        "usr/share/libjxl-testdata/jxl/flower/flower.png.im_q85_4*.jpg",
        "usr/share/libjxl-testdata/jxl/hdr_room.png",
        "usr/share/libjxl-testdata/external/wesaturate/500px/*_srgb8.png",
    ),
    # LXQt wallpapers: the ten photographs (flowers, insects, clouds, fog); the origami, triangle,
    # wave and logo wallpapers are renders.
    "lxqt-themes": _each(
        "usr/share/lxqt/wallpapers",
        "Butterfly-Kenneth-Wimer.jpg Valendas.png after-the-rain.jpg appleflower.png butterfly.png"
        " cloud.png drop.png flowers.png fog.jpg this-is-not-windows.jpg",
    ),
    # The Maldives photo; maldives.jpg is a screenshot of the login screen over it.
    "sddm-theme-maldives": ("usr/share/sddm/themes/maldives/background.jpg",),
    # The jigsaw collection: five photographs; backgrounds/ are tiling textures.
    "palapeli-data": ("usr/share/palapeli/collection/*.jpg",),
    # KPhotoAlbum's demo album: 25 snapshots from a camera (people, dogs, the Grand Canyon, sea).
    "kphotoalbum": ("usr/share/kphotoalbum/demo/*.jpg",),
    # Tux Paint's templates are photographs to draw on (bark, rocks, sea, trees); starters/ are
    # drawings.
    "tuxpaint-data": ("usr/share/tuxpaint/templates/*.jpg",),
    # Scribus templates' photos (pizza, moon, sunset, nature, eclipse).
    "scribus-template": _each(
        "usr/share/scribus/templates",
        "menu2/pizza.jpg cal2/moon.jpg br2/moon.jpg br2/sunset.jpg br2/nature.jpg"
        " br2/brightness.jpg br2/halfmoon.jpg",
    ),
    # scikit-image's photographs, five of them grey (camera, moon, brick, grass, gravel); the
    # right view of the motorcycle stereo pair is the same scene as the left (collapsed by
    # `dedup`); cell, retina, ihc and hubble_deep_field are microscopy and telescope images.
    "python3-skimage": _each(
        "usr/lib/python3/dist-packages/skimage/data",
        "astronaut.png chelsea.png coffee.png motorcycle_left.png motorcycle_right.png rocket.jpg"
        " camera.png moon.png brick.png grass.png gravel.png",
    ),
    # Matplotlib's sample photo (Grace Hopper's portrait).
    "python-matplotlib-data": ("usr/share/matplotlib/mpl-data/sample_data/grace_hopper.jpg",),
    # ViSP's photo of the 1927 Solvay conference, shipped at four sizes as JPEG and PNG: `dedup`
    # keeps the largest. The rest of the package is markers, warped or blurred copies, a painting.
    "visp-images-data": (
        "usr/share/visp-images-data/ViSP-images/Solvay/*.png",
        "usr/share/visp-images-data/ViSP-images/Solvay/*.jpg",
    ),
    # OpenCV's sample photographs (three grey: basketball1, box, box_in_scene). Left out: renders
    # (Blender_Suzanne), drawings and charts (pic*, ml, cards, chessboard, gradient, detect_blob,
    # opencv-logo), a painting (starry_night), synthetically blurred or edited copies (text_*,
    # licenseplate_motion, ela_modified), calibration boards (left0*, right0*), the map screenshot
    # (stanford), and the second view of each multi-view pair (aloeR, leuvenB, graf3, right,
    # rubberwhale2, basketball2): the same scene from a shifted camera, which the hash does not
    # join (aloeL/aloeR differ in 16 bits) and which would put one scene in both splits.
    "opencv-doc": _each(
        "usr/share/doc/opencv-doc/examples/data",
        "aero1.jpg aero3.jpg aloeL.jpg apple.jpg baboon.jpg basketball1.png board.jpg box.png"
        " box_in_scene.png building.jpg butterfly.jpg chicky_512.png ela_original.jpg fruits.jpg"
        " graf1.png home.jpg left.jpg leuvenA.jpg messi5.jpg orange.jpg rubberwhale1.png"
        " smarties.png squirrel_cls.jpg stuff.jpg sudoku.png",
    )
    + _each("usr/share/doc/opencv-doc/examples/text", "scenetext0[1-6].jpg")
    + (
        "usr/share/doc/opencv-doc/examples/alphamat/input_images/plant.jpg",
        "usr/share/doc/opencv-doc/examples/dnn_superres/butterfly.png",
        "usr/share/doc/opencv-doc/examples/hfs/data/000.jpg",
        "usr/share/doc/opencv-doc/examples/reg/home.png",
    ),
    # Go image libraries' test photos (flowers, branches, three plush gophers); branches.jpg is the
    # PNG re-encoded (collapsed by `dedup`).
    "golang-github-disintegration-imaging-dev": _each(
        "usr/share/gocode/src/github.com/disintegration/imaging/testdata",
        "flowers.png branches.png branches.jpg",
    ),
    "golang-golang-x-image-dev": (
        "usr/share/gocode/src/golang.org/x/image/testdata/blue-purple-pink-large.png",
    ),
}
# Packages whose copyright file gives no short licence name: the licence it states for the whole
# package, read by hand from /usr/share/doc/<pkg>/copyright, and the holders it names.
LICENCE_FALLBACK: dict[str, tuple[str, str]] = {
    "kphotoalbum": ("GPL-2+", "2003-2014 Jesper K. Pedersen and the KPhotoAlbum authors"),
    "scribus-template": ("public-domain", "2004 Riku Leino (placed in the public domain)"),
    # DEP-5, but its `Files: *` licence has no short name, only the text of matplotlib's licence
    "python-matplotlib-data": ("matplotlib (PSF-style)", "2002-2016 the matplotlib team"),
}
# Kept for independent evaluation: never fetched for training, and refused by `prepare_pairs`.
RESERVED_PACKAGES = frozenset({"plasma-workspace-wallpapers"})
# Photos smaller than this on their short side make too few LR pixels to be worth a pair: a
# whole-photo pair's LR is a quarter of the photo, so 256 px give a 64-px LR, one 64-px crop.
MIN_SIDE = 256
# The share of photos held out for validation (`split_for`).
VALIDATION_FRACTION = 0.2
DEFAULT_CACHE = Path("~/.cache/sddusr/photos").expanduser()


@dataclass
class CopyrightStanza:
    patterns: list[str]
    copyright: str
    license: str


def parse_dep5(text: str) -> list[CopyrightStanza]:
    """The `Files:` stanzas of a machine-readable (DEP-5) Debian copyright file, in order."""
    stanzas: list[CopyrightStanza] = []
    for block in re.split(r"\n\s*\n", text):
        fields_: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key is not None:
                fields_[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip()
                fields_[key] = value.strip()
        if "Files" in fields_:
            stanzas.append(
                CopyrightStanza(
                    patterns=fields_["Files"].split(),
                    copyright=fields_.get("Copyright", "").strip(),
                    license=fields_.get("License", "").split("\n")[0].strip(),
                )
            )
    return stanzas


def license_for(stanzas: Sequence[CopyrightStanza], relpath: str) -> CopyrightStanza | None:
    """The stanza governing the installed file `relpath` (DEP-5: the last matching pattern wins).

    The patterns name source-tree paths (`16.04/Bridge.jpg`, `nature/*.jpg`) that differ from the
    installed ones, so matching goes, most specific first: a pattern matching the path's tail with
    as many components as it has; else a wildcard-free pattern whose file name is the file's name;
    else `*`.
    """
    parts = relpath.split("/")
    tail_hit = name_hit = star_hit = None
    for st in stanzas:
        for pat in st.patterns:
            if pat == "*":
                star_hit = st
                continue
            n = pat.count("/") + 1
            if fnmatch.fnmatchcase("/".join(parts[-n:]), pat):
                tail_hit = st
            base = pat.rsplit("/", 1)[-1]
            if not any(ch in base for ch in "*?[") and base == parts[-1]:
                name_hit = st
    return tail_hit or name_hit or star_hit


def split_for(photo_id: str, fraction: float = VALIDATION_FRACTION) -> str:
    """`"test"` (validation) or `"train"`, from a hash of the photo's id alone: adding or removing
    other photos or packages never moves a photo between splits."""
    h = int.from_bytes(hashlib.sha256(f"split:{photo_id}".encode()).digest()[:8], "big")
    return "test" if h < fraction * 2**64 else "train"


def refuse_reserved(packages: Sequence[str]) -> None:
    """Raise if any of `packages` is kept for independent evaluation."""
    bad = sorted(set(packages) & RESERVED_PACKAGES)
    if bad:
        raise ValueError(
            f"{', '.join(bad)} is reserved for independent evaluation: never train, tune or "
            "evaluate on it"
        )


def _download(pkg: str, debs: Path) -> Path:
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
        found = sorted(debs.glob(f"{pkg}_*.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {pkg} produced no .deb in {debs}")
    return found[-1]


def _unpack(deb: Path, root: Path) -> None:
    if root.is_dir():
        return
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    tmp.rename(root)


def _licence(pkg: str, stanzas: Sequence[CopyrightStanza], rel: str) -> tuple[str, str]:
    st = license_for(stanzas, rel)
    if st is not None and st.license:
        return st.license, st.copyright
    if pkg in LICENCE_FALLBACK:
        return LICENCE_FALLBACK[pkg]
    raise ValueError(f"{pkg}: no licence for {rel} in its copyright file")


def fetch_photos(
    cache: Path | str = DEFAULT_CACHE,
    packages: Sequence[str] | None = None,
    globs: dict[str, tuple[str, ...]] | None = None,
) -> Path:
    """Download and unpack the photo packages into `cache`; write and return `cache/photos.json`.

    Uses `apt-get download` (run `apt-get update` first on a fresh machine) and `dpkg-deb -x`.
    `globs` (default `PHOTO_PACKAGES`) names each package's photo files. Each photo entry carries
    its package, version, path, size, copyright holders, licence (a photo without one is an
    error), perceptual hash and split; near-identical copies collapse onto the largest copy, which
    lists them under `copies`.
    """
    globs = PHOTO_PACKAGES if globs is None else globs
    packages = list(packages or globs)
    refuse_reserved(packages)
    cache = Path(cache).expanduser().resolve()
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    photos, small, pkg_info, ids = [], [], {}, set()
    for pkg in packages:
        deb = _download(pkg, debs)
        root = cache / "unpacked" / pkg
        _unpack(deb, root)
        version = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
        ).stdout.strip()
        cfile = root / "usr/share/doc" / pkg / "copyright"
        stanzas = parse_dep5(cfile.read_text(encoding="utf-8", errors="replace"))
        sha = hashlib.sha256(deb.read_bytes()).hexdigest()
        pkg_info[pkg] = {"version": version, "deb": deb.name, "sha256": sha}
        pkg_info[pkg]["copyright_file"] = str(cfile)
        files = sorted({f for pattern in globs.get(pkg, ("**/*.jpg",)) for f in root.glob(pattern)})
        for f in files:
            rel = f.relative_to(root).as_posix()
            # the file name alone where it is unique (stable ids for the first packages)
            pid = f"{pkg}/{f.name}" if f"{pkg}/{f.name}" not in ids else f"{pkg}/{rel}"
            ids.add(pid)
            licence, holders = _licence(pkg, stanzas, rel)
            w, h = image_size(f)
            entry = {"id": pid, "package": pkg, "version": version, "path": str(f)}
            entry.update(size=[h, w], license=licence, copyright=holders)
            (small if min(w, h) < MIN_SIDE else photos).append(entry)
    kept, dropped = collapse_copies(photos)
    for e in kept:
        e["split"] = split_for(e["id"])
    manifest = {
        "cache": str(cache),
        "packages": pkg_info,
        "split_rule": f"sha256('split:' + id) < {VALIDATION_FRACTION} * 2**64 -> test",
        "dedup": DEDUP_RULE,
        "counts": {
            "files": len(photos) + len(small),
            "too_small": len(small),
            "collapsed": len(dropped),
            "photos": len(kept),
            "test": sum(e["split"] == "test" for e in kept),
        },
        "photos": kept,
        "collapsed": dropped,
        "too_small": [e["id"] for e in small],
    }
    out = cache / "photos.json"
    out.write_text(json.dumps(manifest, indent=1))
    return out

"""Photos for training: `fetch_photos(cache)` downloads the photo packages from Debian with
`apt-get download` into a cache folder outside the repository, unpacks them with `dpkg-deb -x`,
and writes `photos.json` listing every photo with its package and the licence that the package's
`copyright` file (DEP-5) gives for it."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Package -> glob(s) of the photo files it ships (relative to the unpacked root).
PHOTO_PACKAGES: dict[str, tuple[str, ...]] = {
    "lomiri-wallpapers-16.04": ("usr/share/backgrounds/*.jpg",),
    "lomiri-wallpapers-20.04": ("usr/share/backgrounds/*.jpg",),
    "mate-backgrounds": ("usr/share/backgrounds/mate/nature/*.jpg",),
    "libjxl-testdata": ("usr/share/libjxl-testdata/jxl/flower/flower.png",),
}
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


def fetch_photos(cache: Path | str = DEFAULT_CACHE, packages: Sequence[str] | None = None) -> Path:
    """Download and unpack the photo packages into `cache`; write and return `cache/photos.json`.

    Uses `apt-get download` (run `apt-get update` first on a fresh machine) and `dpkg-deb -x`.
    Each photo entry carries its package, version, path, copyright holders and licence.
    """
    cache = Path(cache).expanduser().resolve()
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    packages = list(packages or PHOTO_PACKAGES)
    photos = []
    pkg_info = {}
    for pkg in packages:
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
            found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            raise RuntimeError(f"apt-get download {pkg} produced no .deb in {debs}")
        deb = found[-1]
        root = cache / "unpacked" / pkg
        if not root.is_dir():
            tmp = root.with_name(pkg + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
            tmp.rename(root)
        version = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
        ).stdout.strip()
        cfile = root / "usr/share/doc" / pkg / "copyright"
        stanzas = parse_dep5(cfile.read_text(encoding="utf-8", errors="replace"))
        pkg_info[pkg] = {"version": version, "deb": deb.name, "copyright_file": str(cfile)}
        for pattern in PHOTO_PACKAGES.get(pkg, ("**/*.jpg",)):
            for f in sorted(root.glob(pattern)):
                rel = f.relative_to(root).as_posix()
                st = license_for(stanzas, rel)
                photos.append(
                    {
                        "id": f"{pkg}/{f.name}",
                        "package": pkg,
                        "version": version,
                        "path": str(f),
                        "license": st.license if st else "UNKNOWN",
                        "copyright": st.copyright if st else "",
                    }
                )
    manifest = {"cache": str(cache), "packages": pkg_info, "photos": photos}
    out = cache / "photos.json"
    out.write_text(json.dumps(manifest, indent=1))
    return out

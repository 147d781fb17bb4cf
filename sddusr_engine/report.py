"""The HTML report of `sddusr sr --html`, `sddusr batch --html` and `sddusr demo`: one page.

The page is one self-contained file that works offline from disk: every picture is embedded as a
data: URI (downscaled previews, JPEG; the maps as PNG), the style and the script (`report.css`,
`report.js`, shipped beside this module) are inlined, and a Content-Security-Policy forbids any
other fetch. The full-size images are reached by links relative to the report's folder.

Per pair: a before/after viewer (bicubic x2 | SR, a split to drag, zoom and pan) over three views
(the whole frame, and the 1:1 centre and corner crops that `compare.choose_crops` picks for the
comparison picture), the telephoto's footprint and centre box drawn over it (SVG), toggles for
the SFM masks, the confidence and index maps and the registered telephoto; the registration's
zoom, rotation, confidence, method and corner error bound; the stage timings; any warning. A
batch report adds a summary table that links to each pair and lists the failed pairs with their
reason. The previews are capped (`Sizes`), so a report of hundreds of pairs stays a few tens of
kilobytes per pair.

`BatchPages` collects the material while `batch.run_batch` computes: it wraps the engine, keeps
each call's maps and makes the previews at once (the full arrays are not kept), and matches them
to the pairs' results afterwards by their stage timings (the same floats, in the same dict).
Pairs it did not compute (skipped, or done by another torchrun rank) get their previews from
the files.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# numpy, cv2 and the modules that use them are imported where they are used: cli.py imports this
# module at its top, and `sddusr --help` stays fast.
ASSETS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    """Preview sizes, long sides in px: `preview`, the whole-frame previews; `maps`, the map
    overlays (the browser stretches them, pixelated); `thumb`, the summary table's thumbnails;
    `quality`: the JPEG quality of the previews and crops."""

    preview: int = 1280
    maps: int = 640
    thumb: int = 96
    quality: int = 85


ONE = Sizes()  # one pair (sr, demo): a larger whole frame
# a batch: the whole frame small (at this size bicubic and SR look alike anyway; the 1:1 crops
# show the difference), so that hundreds of pairs stay one file a browser opens at once
MANY = Sizes(preview=512, maps=192, quality=75)

OVERLAYS = (  # name, label, the legend (the toggle's tooltip), shown at first
    ("footprint", "footprint", "the telephoto's outline (yellow) and the centre box (cyan)", True),
    ("mask_lr", "SFM mask LR", "magenta: where the sparse feature matching kept LR queries", False),
    ("mask_lrc", "SFM mask LRC", "cyan: the centre keys the matching kept", False),
    ("confidence", "confidence", "the match confidence: dark low, yellow high", False),
    ("index", "index", "the matched key's place in the centre: red across, green down", False),
    ("tele", "telephoto", "the registered telephoto over the centre crop (1:1)", False),
)


# ----------------------------------------------------------------------------- pictures


def _uri(img: np.ndarray, fmt: str, quality: int = 85) -> str:
    """An RGB(A) uint8 image as a data: URI (JPEG or PNG)."""
    import cv2
    import numpy as np

    from .compare import to_u8

    a = np.ascontiguousarray(to_u8(img))
    code = cv2.COLOR_RGBA2BGRA if a.ndim == 3 and a.shape[2] == 4 else cv2.COLOR_RGB2BGR
    bgr = a if a.ndim == 2 else cv2.cvtColor(a, code)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpeg" else []
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", bgr, params)
    if not ok:  # pragma: no cover - cv2 encodes any uint8 array
        raise ValueError(f"cannot encode a {a.shape} image as {fmt}")
    return f"data:image/{fmt};base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _fit(shape, cap: int) -> tuple[int, int]:
    """(h, w) of `shape` scaled so that its long side is at most `cap`."""
    h, w = shape[:2]
    s = min(1.0, cap / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def _resize(img: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    import cv2
    import numpy as np

    h, w = hw
    if img.shape[:2] == (h, w):
        return img
    down = h < img.shape[0]
    how = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if down else cv2.INTER_CUBIC)
    return cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=how)


def _mask_uri(mask: np.ndarray, rgb) -> str:
    """A two-colour PNG data: URI: `rgb` where `mask` is set, transparent elsewhere (a palette
    image: a few hundred bytes where an RGBA one takes tens of kilobytes)."""
    import io

    import numpy as np
    from PIL import Image

    on = np.ascontiguousarray(np.asarray(mask) > 127, np.uint8)
    im = Image.frombytes("P", (on.shape[1], on.shape[0]), on.tobytes())
    im.putpalette([0, 0, 0, *rgb])
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0, optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _overlays(info, lr_hw, sizes: Sizes) -> list[dict[str, Any]]:
    """The maps as overlays (masks PNG; confidence and index JPEG, shown translucent), each
    with the rect it covers in LR pixels (x, y, w, h)."""
    import cv2
    import numpy as np

    from .compare import map_images

    maps = getattr(info, "maps", None) or {}
    grid = next((np.shape(maps[k]) for k in ("mask_lr", "confidence", "index") if k in maps), None)
    if grid is None:
        return []
    imgs = map_images(info, grid)  # at the maps' own grid; the browser stretches them
    h, w = lr_hw
    whole = (0, 0, w, h)
    out = []
    for name, img in imgs.items():
        img = _resize(img, _fit(img.shape, sizes.maps), nearest=True)
        if name == "confidence":
            heat = cv2.cvtColor(cv2.applyColorMap(img, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
            uri = _uri(heat, "jpeg", sizes.quality)
        elif name == "index":
            uri = _uri(img, "jpeg", sizes.quality)
        else:
            uri = _mask_uri(img, (255, 0, 200) if name == "mask_lr" else (0, 230, 255))
        rect = whole
        if name == "mask_lrc" and info.box_lr is not None:
            y0, y1, x0, x1 = info.box_lr
            rect = (x0, y0, x1 - x0, y1 - y0)
        out.append({"name": name, "uri": uri, "rect": rect})
    return out


def pair_material(
    wide: np.ndarray, sr: np.ndarray, info=None, sizes: Sizes = ONE
) -> dict[str, Any]:
    """What a pair's section shows, from the arrays (kept small: previews and facts only)."""
    import numpy as np

    from .compare import bicubic_crop, choose_crops

    lr_hw = tuple(int(v) for v in wide.shape[:2])
    fp = getattr(info, "footprint", None)
    box = getattr(info, "box_lr", None)
    box = None if box is None else tuple(int(v) for v in box)
    corners = None if fp is None else np.asarray(fp.corners, float)
    frame = _fit(sr.shape, sizes.preview)
    views = [
        {
            "label": "whole frame",
            "win": (0, 0, lr_hw[1], lr_hw[0]),
            "before": _uri(_resize(wide, frame), "jpeg", sizes.quality),
            "after": _uri(_resize(sr, frame), "jpeg", sizes.quality),
        }
    ]
    crops = choose_crops(sr, box, corners)
    for label, (y0, y1, x0, x1) in (("centre 1:1", crops.centre), ("corner 1:1", crops.corner)):
        views.append(
            {
                "label": label,
                "win": (x0 / 2, y0 / 2, (x1 - x0) / 2, (y1 - y0) / 2),
                "before": _uri(bicubic_crop(wide, (y0, y1, x0, x1)), "jpeg", sizes.quality),
                "after": _uri(sr[y0:y1, x0:x1], "jpeg", sizes.quality),
            }
        )
    overlays = _overlays(info, lr_hw, sizes) if info is not None else []
    ref = (getattr(info, "maps", None) or {}).get("ref")
    if ref is not None and box is not None:
        y0, y1, x0, x1 = crops.centre
        piece = np.asarray(ref)[
            y0 - 2 * box[0] : y1 - 2 * box[0], x0 - 2 * box[2] : x1 - 2 * box[2]
        ]
        if piece.shape[:2] == (y1 - y0, x1 - x0):  # the centre crop lies inside the box
            rect = views[1]["win"]
            overlays.append(
                {"name": "tele", "uri": _uri(piece, "jpeg", sizes.quality), "rect": rect}
            )
    facts = {} if info is None else info.to_dict()
    return {
        "recorded": info is not None,
        "lr": lr_hw,
        "out": tuple(int(v) for v in sr.shape[:2]),
        "views": views,
        "overlays": overlays,
        "footprint": facts.get("footprint"),
        "box_lr": box,
        "timings": facts.get("timings") or {},
        "warnings": list(facts.get("warnings") or []),
        "stats": {
            "active LR": facts.get("mask_fraction_lr"),
            "active LRC": facts.get("mask_fraction_lrc"),
            "matching work saved": (facts.get("matching") or {}).get("work_saved"),
        },
        "ensemble": facts.get("ensemble", 1),
        "adapt": facts.get("adapt_steps", 0),
        "thumb": _uri(_resize(sr, _fit(sr.shape, sizes.thumb)), "jpeg", 70),
    }


# ----------------------------------------------------------------------------- the page


def _href(path, base: Path) -> str:
    """A link to `path` relative to the report's folder `base` (a file: URL across drives)."""
    p = Path(path).resolve()
    try:
        return urllib.parse.quote(Path(os.path.relpath(p, base)).as_posix())
    except ValueError:
        return p.as_uri()


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def _viewer(i: int, m: dict[str, Any]) -> str:
    h, w = m["lr"]
    views = [{"win": [round(v, 3) for v in view["win"]]} for view in m["views"]]
    imgs = {"before": [], "after": []}
    for k, view in enumerate(m["views"]):
        for side, what in (("before", "bicubic x2"), ("after", "SR x2")):
            hidden = "" if k == 0 else " hidden"
            alt = f"{what}, {view['label']}"
            imgs[side].append(
                f'<img data-view="{k}" src="{view[side]}" alt="{_e(alt)}" decoding="async"{hidden}>'
            )
    over = []
    for ov in m["overlays"]:
        x, y, rw, rh = ov["rect"]
        style = (
            f"left:{100 * x / w:.4f}%;top:{100 * y / h:.4f}%;"
            f"width:{100 * rw / w:.4f}%;height:{100 * rh / h:.4f}%"
        )
        over.append(
            f'<img class="ov ov-{ov["name"]}" src="{ov["uri"]}" alt="{ov["name"]}" '
            f'style="{style}" hidden>'
        )
    fp, box = m["footprint"], m["box_lr"]
    shapes = []
    if fp is not None:  # corners in LR pixel-centre coordinates; the SVG's units are pixel edges
        pts = " ".join(f"{x + 0.5:.2f},{y + 0.5:.2f}" for x, y in fp["corners"])
        shapes.append(f'<polygon points="{pts}" class="fp"/>')
    if box is not None:
        y0, y1, x0, x1 = box
        shapes.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" class="box"/>')
    if shapes:
        over.append(
            f'<svg class="ov ov-footprint" viewBox="0 0 {w} {h}" preserveAspectRatio="none">'
            + "".join(shapes)
            + "</svg>"
        )
    present = {ov["name"] for ov in m["overlays"]} | ({"footprint"} if shapes else set())
    toggles = "".join(
        f'<label title="{_e(legend)}"><input type="checkbox" data-ov="{name}"'
        f"{' checked' if on else ''}> {label}</label>"
        for name, label, legend, on in OVERLAYS
        if name in present
    )
    buttons = "".join(
        f'<button type="button" data-view="{k}">{_e(v["label"])}</button>'
        for k, v in enumerate(m["views"])
    )
    return (
        f'<div class="viewer" data-lr="[{w},{h}]" data-views=\'{json.dumps(views)}\'>'
        f'<div class="vp" tabindex="0" aria-label="before/after viewer">'
        f'<div class="layer before"><div class="canvas">{"".join(imgs["before"])}</div></div>'
        f'<div class="layer after"><div class="canvas">{"".join(imgs["after"])}</div></div>'
        f'<div class="layer over"><div class="canvas"><div class="frame">{"".join(over)}'
        f"</div></div></div>"
        f'<div class="divider"><span></span></div>'
        f'<span class="tag l">bicubic x2</span><span class="tag r">SR x2</span></div>'
        f'<div class="controls"><input class="split" type="range" min="0" max="100" step="0.1" '
        f'value="50" aria-label="split between bicubic and SR">'
        f'<span class="views">{buttons}</span>'
        f'<span><button type="button" data-zoom="out">&minus;</button> <span class="zl">100%</span>'
        f' <button type="button" data-zoom="in">+</button> '
        f'<button type="button" data-zoom="fit">fit</button></span>'
        f'<span class="toggles">{toggles}</span></div>'
        f'<p class="dim hint">Drag the white line (or the slider) to compare; wheel or +/- to '
        f"zoom, drag to pan, double-click to fit.</p></div>"
    )


def _facts(p: dict[str, Any]) -> str:
    m = p.get("material") or {}
    rows = []
    fp = m.get("footprint")
    if fp is not None:
        err = fp.get("corner_error_px")
        rows += [
            ("registration", _e(fp.get("method", "-"))),
            ("zoom", f"{fp['zoom']:.3f}x"),
            ("rotation", f"{fp['rotation_deg']:+.2f}&deg;"),
            ("confidence", f"{fp['confidence']:.2f}"),
            ("inliers", _e(fp.get("inliers", "-"))),
            ("corner error", "not verified" if err is None else f"&le; {err:.2f} wide px"),
        ]
        if fp.get("zoom_prior") is not None:
            rows.append(("EXIF zoom prior", _e(fp["zoom_prior"])))
        if fp.get("notes"):
            rows.append(("registration notes", _e(fp["notes"])))
    elif m and not m["recorded"]:
        rows.append(("registration", "not recorded: this run did not compute the pair"))
    elif m:
        rows.append(("registration", "none (a pre-aligned triplet, or no telephoto found)"))
    if m:
        lh, lw = m["lr"]
        oh, ow = m["out"]
        rows.append(("size", f"{lw}&times;{lh} &rarr; {ow}&times;{oh}"))
        for k, v in m["stats"].items():
            if v is not None:
                rows.append((k, f"{v:.0%}"))
        if m.get("ensemble", 1) > 1 or m.get("adapt"):
            rows.append(("passes", f"ensemble {m['ensemble']}, adaptation {m['adapt']} steps"))
    for label, key in (("output", "output"), *((k, k) for k in p.get("inputs", {}))):
        href = p["output_href"] if key == "output" else p["inputs"][key]
        if href:
            rows.append((label, f'<a href="{_e(href)}">{_e(urllib.parse.unquote(href))}</a>'))
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    timings = (m.get("timings") if m else None) or p.get("timings") or {}
    top = max(timings.values(), default=0.0) or 1.0
    trows = "".join(
        f'<tr><td>{_e(k)}</td><td class="num">{v:,.0f}</td><td><span class="bar" '
        f'style="width:{max(1, round(80 * v / top))}px"></span></td></tr>'
        for k, v in timings.items()
    )
    if trows:
        trows += (
            f'<tr><th>total</th><td class="num">{sum(timings.values()):,.0f}</td><td></td></tr>'
        )
        trows = f'<h3>stage timings (ms)</h3><table class="t">{trows}</table>'
    return f'<div class="side"><table class="facts">{table}</table>{trows}</div>'


def _section(i: int, p: dict[str, Any]) -> str:
    m = p.get("material")
    status = p["status"]
    warns = [*p.get("warnings", []), *((m or {}).get("warnings") or [])]
    msg = p.get("message")  # a batch joins a pair's notes and warnings with "; "
    pieces = [msg] if status == "failed" else (msg or "").split("; ")
    warns = [*(w for w in pieces if w and w not in warns), *warns]
    note = "".join(f"<li>{_e(w)}</li>" for w in dict.fromkeys(warns))
    cls = "reason" if status == "failed" else "warn"
    body = f'<ul class="{cls}">{note}</ul>' if note else ""
    if m is not None:
        body += f'<div class="pair-body">{_viewer(i, m)}{_facts(p)}</div>'
    else:
        body += _facts(p)
    return (
        f'<section class="pair" id="pair-{i}"><h2>{_e(p["name"])} '
        f'<span class="st-{status}">{status}</span></h2>{body}</section>'
    )


def _summary(pages: list[dict[str, Any]]) -> str:
    rows = []
    for i, p in enumerate(pages):
        m = p.get("material") or {}
        fp = m.get("footprint") or {}
        thumb = f'<img class="thumb" src="{m["thumb"]}" alt="">' if m.get("thumb") else ""
        secs = p.get("seconds")
        rows.append(
            f'<tr class="row-{p["status"]}"><td class="num">{i + 1}</td>'
            f'<td><a href="#pair-{i}">{_e(p["name"])}</a></td>'
            f'<td class="st-{p["status"]}">{p["status"]}</td><td>{thumb}</td>'
            f'<td class="num">{_num(secs, ".2f") if secs else "-"}</td>'
            f'<td class="num">{_num(fp.get("zoom"), ".2f")}</td>'
            f'<td class="num">{_num(fp.get("rotation_deg"), "+.1f")}</td>'
            f'<td class="num">{_num(fp.get("confidence"), ".2f")}</td>'
            f"<td>{_e(p.get('message') or '')}</td></tr>"
        )
    failed = [(i, p) for i, p in enumerate(pages) if p["status"] == "failed"]
    listing = "".join(
        f'<li><a href="#pair-{i}">{_e(p["name"])}</a>: {_e(p.get("message") or "failed")}</li>'
        for i, p in failed
    )
    fails = (
        f'<h2>Failed pairs ({len(failed)})</h2><ul class="reason">{listing}</ul>' if failed else ""
    )
    return (
        f'<section class="summary">{fails}<h2>Pairs</h2><table class="pairs"><thead><tr>'
        f"<th>#</th><th>pair</th><th>status</th><th>SR</th><th>time (s)</th><th>zoom</th>"
        f"<th>rotation (&deg;)</th><th>confidence</th><th>message</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)


def render(pages: list[dict[str, Any]], title: str, batch: bool = False) -> str:
    """The page for `pages` (see `pair_page`): one section per pair, after a summary for a
    batch."""
    counts = {s: sum(p["status"] == s for p in pages) for s in ("written", "skipped", "failed")}
    line = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    head = f"{len(pages)} pair{'s' * (len(pages) != 1)}: {line}" if batch else ""
    css = (ASSETS / "report.css").read_text()
    js = (ASSETS / "report.js").read_text()
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{css}</style>"
        # before any picture: the self-check counts what the policy blocked
        '<script>window.__blocked=[];document.addEventListener("securitypolicyviolation",'
        "function(e){window.__blocked.push(e.blockedURI)});</script></head><body>"
        f'<header><h1>{_e(title)}</h1><p class="dim">{_e(head)} {"&middot; " if head else ""}'
        f"written {stamp} by sddusr</p></header><main>"
        + (_summary(pages) if batch else "")
        + "".join(_section(i, p) for i, p in enumerate(pages))
        + f'</main><pre id="selftest" hidden></pre><script>{js}</script></body></html>'
    )


def pair_page(
    name: str,
    status: str,
    base: Path,
    material: dict[str, Any] | None = None,
    *,
    message: str | None = None,
    output=None,
    inputs: dict[str, Any] | None = None,
    seconds: float | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One pair's entry for `render`: links relative to the report's folder `base`."""
    return {
        "name": name,
        "status": status,
        "material": material,
        "message": message,
        "output_href": None if output is None else _href(output, base),
        "inputs": {k: _href(v, base) for k, v in (inputs or {}).items()},
        "seconds": seconds,
        "timings": timings or {},
        "warnings": [],
    }


def write_html(path, text: str) -> None:
    """Write the page atomically (temporary file, then rename)."""
    from .io import atomic_output

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(p) as tmp:
        tmp.write_text(text, encoding="utf-8")


def pair_html(path, output, wide, sr, info, inputs=()) -> str:
    """The page of one `super_resolve` call (`sddusr sr --html`, the demo), to be written at
    `path` (its links are relative to that folder). `inputs`: the wide and telephoto files."""
    base = Path(path).resolve().parent
    names = dict(zip(("wide", "tele"), inputs, strict=False))
    page = pair_page(
        Path(output).name, "written", base, pair_material(wide, sr, info, ONE),
        output=output, inputs=names,
    )  # fmt: skip
    return render([page], f"sddusr: {Path(output).name}")


def write_pair(path, output, wide, sr, info, inputs=()):
    """`pair_html` written atomically at `path`; nothing when `path` is None. Returns `path`."""
    if path is None:
        return None
    write_html(path, pair_html(path, output, wide, sr, info, inputs))
    return path


# ----------------------------------------------------------------------------- batches


def _key(timings) -> tuple | None:
    """A call's stage timings as a key (None when it has none to tell it apart)."""
    return tuple(sorted((k, float(v)) for k, v in (timings or {}).items())) or None


class _Recording:
    """The engine, with each call's maps kept and turned into page material at once."""

    def __init__(self, engine, pages: BatchPages):
        self._engine, self._pages = engine, pages

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def _keep(self, image, result):
        out, info = result
        self._pages.keep(image, out, info)
        info.maps = {}  # the previews are made; the maps and the telephoto need not stay
        return result

    def super_resolve(self, wide, tele, **kw):
        kw["keep_maps"] = True
        result = self._engine.super_resolve(wide, tele, **kw)
        return self._keep(wide, result) if kw.get("return_info") else result

    def run(self, lr, lrc=None, ref=None, **kw):
        kw["keep_maps"] = True
        result = self._engine.run(lr, lrc, ref, **kw)
        return self._keep(lr, result) if kw.get("return_info") else result

    def run_registered(self, pair, **kw):  # what a batch calls: its reader registers raw pairs
        kw["keep_maps"] = True
        result = self._engine.run_registered(pair, **kw)
        return self._keep(pair.lr, result) if kw.get("return_info") else result


class BatchPages:
    """The HTML report of a batch: pass `engine` (the recording one) to `run_batch`, then
    `write(results, jobs)`. With `path` None it records nothing and writes nothing."""

    def __init__(self, engine, path, sizes: Sizes = MANY):
        self.path = None if path is None else Path(path)
        self.sizes = sizes
        self.engine = engine if path is None else _Recording(engine, self)
        self._kept: dict[tuple, dict[str, Any]] = {}

    def keep(self, image, out, info) -> None:
        key = _key(getattr(info, "timings", None))
        if key is not None:
            self._kept[key] = pair_material(image, out, info, self.sizes)

    def _from_files(self, output, inputs) -> tuple[dict[str, Any] | None, str | None]:
        """Material from the written output and its LR input, for a pair not computed here."""
        from .io import read_image

        src = inputs.get("wide") or inputs.get("lr")
        try:
            return pair_material(read_image(src), read_image(output), None, self.sizes), None
        except Exception as e:  # noqa: BLE001 - the page says so and goes on
            return None, f"no preview: {e}"

    def write(self, results, jobs=()) -> None:
        """Write the page for `results` (batch.PairResult); `jobs` give the input files."""
        if self.path is None:
            return
        base = self.path.resolve().parent
        inputs = {j.name: dict(j.inputs) for j in jobs}
        pages = []
        for r in results:
            ins = inputs.get(r.name, {})
            m, why = None, None
            if r.status != "failed":
                m = self._kept.pop(_key(r.timings), None) if r.timings else None
                if m is None and r.output:
                    m, why = self._from_files(r.output, ins)
            page = pair_page(
                r.name, r.status, base, m, message=r.message, output=r.output, inputs=ins,
                seconds=r.seconds, timings=r.timings,
            )  # fmt: skip
            if why:
                page["warnings"].append(why)
            pages.append(page)
        write_html(self.path, render(pages, "sddusr batch report", batch=True))

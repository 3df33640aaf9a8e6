"""The training report: one self-contained HTML file (plots and grids inlined) and the same plots as one PNG.

`launch.py report RUN_URL [--out report.html]`, and :func:`write_run_report` (the driver's call at the end of
a run: ``<run_url>/report.html`` and ``<run_url>/report.png``). Read from the run directory alone (see
:mod:`pggan.status`), so it works on a finished run in a bucket as well as on one still training.

Panels, each against kimg with the schedule's stages shaded (fade-in orange, stable blue, labelled by
resolution): losses of G and D; the gradient penalty; training img/s; SWD x1e3 per Laplacian level at each
stage end with the real-vs-real floor (dashed) and the untrained generator's average (dotted). Then the
sample grid of every stage, from the same latents, side by side.

Drawn with Pillow (a dependency already) at twice the size and downsampled, which antialiases the lines;
the project does not depend on matplotlib for four line plots. That small line plot (Panel, render_panel) is the
report's drawing; sweep.py's chart borrows it, so it lives here rather than in a module of its own.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from .status import RunView, format_status, load_run, summarize
from .storage import Storage, join

PANEL_W, PANEL_H = 640, 360          # one plot, in output pixels
HEADER_H = 44                        # the PNG's title strip
PNG_SIZE = (2 * PANEL_W, HEADER_H + 2 * PANEL_H)  # 2 x 2 panels under the header
SS = 2                               # supersampling factor
MAX_GRID_PX = 2048                   # grids wider than this are downsampled in the HTML (a 1024^2 8x8 grid is 8192 px)

FADE_FILL = (253, 232, 208)
STABLE_FILL = (226, 236, 250)
TODO_FILL = (243, 243, 243)          # stages the run has not reached: lighter, one colour
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
           (227, 119, 194), (23, 190, 207), (188, 189, 34), (127, 127, 127)]
INK = (40, 40, 40)
GRID_INK = (220, 220, 220)


# ---- a small line plot on Pillow ----------------------------------------------------------------

@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: tuple[int, int, int]
    width: float = 1.5
    dash: bool = False
    dotted: bool = False
    markers: bool = False


@dataclass
class Band:
    x0: float
    x1: float
    fill: tuple[int, int, int]
    labels: list[str]  # longest first: the first that fits the band is drawn


@dataclass
class Panel:
    title: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    bands: list[Band] = field(default_factory=list)
    hlines: list[Series] = field(default_factory=list)  # y = const across the plot (x ignored, y[0] used)
    xmax: float | None = None
    log_y: bool = False
    empty_text: str = "no data yet"


def _font(px: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    digits = max(0, -math.floor(math.log10(step)) + 1)
    first = math.ceil(lo / step - 1e-9)
    out = []
    for k in range(first, math.floor(hi / step + 1e-9) + 1):
        out.append(round(k * step, digits) + 0.0)  # round: 3 * 0.1 is 0.30000000000000004; + 0.0: no -0.0
    return out


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.0e}"
    return f"{v:g}" if a >= 1 else f"{v:.3g}"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _robust_range(values: list[float]) -> tuple[float, float]:
    """Plot range of the values; past 20 points the 1st..99th percentile, so one spike does not flatten a curve."""
    vals = sorted(values)
    if len(vals) > 20:
        k = max(1, len(vals) // 100)
        vals = vals[k:-k] or vals
    lo, hi = vals[0], vals[-1]
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.08
    return lo - pad, hi + pad


@dataclass
class _Frame:
    """A panel's plot area in pixels (at the supersampled size) and the data ranges mapped onto it."""

    left: float
    right: float
    top: float
    bottom: float
    strip: float  # the band labels' strip above the data, so no curve hides them
    xmin: float
    xmax: float
    ylo: float
    yhi: float
    log_y: bool

    def X(self, x: float) -> float:
        return self.left + (x - self.xmin) / max(self.xmax - self.xmin, 1e-12) * (self.right - self.left)

    def Y(self, y: float) -> float:
        v = math.log10(y) if self.log_y else y
        v = min(max(v, self.ylo), self.yhi)  # clip to the plot area
        return self.bottom - (v - self.ylo) / max(self.yhi - self.ylo, 1e-12) * (self.bottom - self.top)


def _frame(p: Panel, pts: list[tuple[float, float]], hvals: list[float], W: int, H: int, ss: int) -> _Frame:
    """The plot area and ranges: x from 0 to the panel's xmax (else the data's and the bands'); y from the data,
    on a log scale where the panel asks for one and every value is positive."""
    left, right, top, bottom = 62 * ss, W - 14 * ss, 46 * ss, H - 38 * ss
    xmax = p.xmax if p.xmax else max([x for x, _ in pts] + [b.x1 for b in p.bands] + [1e-9])
    log_y = p.log_y and all(y > 0 for _, y in pts) and all(v > 0 for v in hvals)
    ys = [y for _, y in pts] + hvals
    if ys:
        if log_y:
            lo, hi = math.log10(min(ys)), math.log10(max(ys))
            pad = max((hi - lo) * 0.08, 0.05)
            ylo, yhi = lo - pad, hi + pad
        else:
            ylo, yhi = _robust_range(ys)
    else:
        ylo, yhi = 0.0, 1.0
    return _Frame(left, right, top, bottom, top - 16 * ss, 0.0, xmax, ylo, yhi, log_y)


def render_panel(p: Panel, w: int = PANEL_W, h: int = PANEL_H, ss: int = SS) -> Image.Image:
    """The panel at ``ss`` times (w, h): white background, stage bands, axes, ticks, series, legend."""
    W, H = w * ss, h * ss
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f_title, f_small = _font(14 * ss), _font(11 * ss)
    pts = [(x, y) for s in p.series for x, y in zip(s.x, s.y) if _finite(x) and _finite(y)]
    hvals = [s.y[0] for s in p.hlines if s.y and _finite(s.y[0])]
    fr = _frame(p, pts, hvals, W, H, ss)
    d.text((fr.left, 8 * ss), p.title, fill=INK, font=f_title)
    _draw_bands(d, p.bands, fr, f_small, ss)
    _draw_axes(img, d, p.ylabel, fr, f_small, ss)
    if not pts and not hvals:
        tw = d.textlength(p.empty_text, font=f_title)
        d.text(((fr.left + fr.right - tw) / 2, (fr.top + fr.bottom) / 2 - 8 * ss), p.empty_text,
               fill=(150, 150, 150), font=f_title)
        return img
    _draw_series(d, p, fr, ss)
    _draw_legend(d, [s for s in p.series + p.hlines if s.label], fr.right, f_small, ss)
    return img


def _draw_bands(d: ImageDraw.ImageDraw, bands: list[Band], fr: _Frame, font: ImageFont.ImageFont, ss: int) -> None:
    """The stage bands, each labelled in the strip above the data with the longest of its labels that fits."""
    for b in bands:
        x0, x1 = fr.X(max(b.x0, fr.xmin)), fr.X(min(b.x1, fr.xmax))
        if x1 <= x0:
            continue
        d.rectangle([x0, fr.strip, x1, fr.bottom], fill=b.fill)
        for label in b.labels:
            tw = d.textlength(label, font=font)
            if tw + 4 * ss < x1 - x0:
                d.text(((x0 + x1 - tw) / 2, fr.strip + 2 * ss), label, fill=(110, 110, 110), font=font)
                break


def _y_ticks(fr: _Frame) -> list[float]:
    """Tick values on the y axis: decades on a log scale (1-2-5 within a decade or two), else round steps."""
    if not fr.log_y:
        return nice_ticks(fr.ylo, fr.yhi, 5)
    yt: list[float] = []
    for mults in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7)):
        yt = [m * 10.0 ** k for k in range(math.floor(fr.ylo) - 1, math.ceil(fr.yhi) + 1) for m in mults
              if fr.ylo <= math.log10(m * 10.0 ** k) <= fr.yhi]
        if len(yt) >= 3:
            break
    return yt


def _draw_axes(img: Image.Image, d: ImageDraw.ImageDraw, ylabel: str, fr: _Frame, font: ImageFont.ImageFont,
               ss: int) -> None:
    """The y grid and ticks, the x ticks, the frame, and both axis labels (the y label rotated)."""
    left, right, top, bottom = fr.left, fr.right, fr.top, fr.bottom
    for v in _y_ticks(fr):
        y = fr.Y(v)
        d.line([left, y, right, y], fill=GRID_INK, width=ss)
        label = _fmt_tick(v)
        d.text((left - 6 * ss - d.textlength(label, font=font), y - 6 * ss), label, fill=INK, font=font)
    for v in nice_ticks(fr.xmin, fr.xmax, 8):
        x = fr.X(v)
        d.line([x, bottom, x, bottom + 4 * ss], fill=INK, width=ss)
        label = _fmt_tick(v)
        d.text((x - d.textlength(label, font=font) / 2, bottom + 6 * ss), label, fill=INK, font=font)
    d.line([left, fr.strip, right, fr.strip], fill=GRID_INK, width=ss)
    d.rectangle([left, top, right, bottom], outline=INK, width=ss)
    xl = "kimg"
    d.text(((left + right - d.textlength(xl, font=font)) / 2, img.height - 16 * ss), xl, fill=INK, font=font)
    text = ylabel + ("  (log)" if fr.log_y else "")
    ylab = Image.new("RGB", (int(d.textlength(text, font=font)) + 4, 14 * ss), "white")
    ImageDraw.Draw(ylab).text((2, 0), text, fill=INK, font=font)
    ylab = ylab.rotate(90, expand=True)
    img.paste(ylab, (4 * ss, int((top + bottom - ylab.height) / 2)))


def _draw_series(d: ImageDraw.ImageDraw, p: Panel, fr: _Frame, ss: int) -> None:
    """The horizontal reference lines, then the series (NaN/inf breaks a line), with markers where asked."""
    for s in p.hlines:
        if s.y and _finite(s.y[0]):
            _polyline(d, [(fr.left, fr.Y(s.y[0])), (fr.right, fr.Y(s.y[0]))], s, ss)
    for s in p.series:
        seg: list[tuple[float, float]] = []
        for x, y in zip(s.x, s.y):
            if _finite(x) and _finite(y):
                seg.append((fr.X(x), fr.Y(y)))
            else:
                _polyline(d, seg, s, ss)
                seg = []
        _polyline(d, seg, s, ss)
        if s.markers:
            r = 3 * ss
            for x, y in zip(s.x, s.y):
                if _finite(x) and _finite(y):
                    d.ellipse([fr.X(x) - r, fr.Y(y) - r, fr.X(x) + r, fr.Y(y) + r], fill=s.color)


def _draw_legend(d: ImageDraw.ImageDraw, items: list[Series], right: float, font: ImageFont.ImageFont,
                 ss: int) -> None:
    """The legend: one row, right-aligned in the title strip, a line sample before each label."""
    x = right
    for s in reversed(items):
        tw = d.textlength(s.label, font=font)
        x -= tw
        d.text((x, 10 * ss), s.label, fill=INK, font=font)
        x -= 22 * ss
        _polyline(d, [(x, 17 * ss), (x + 16 * ss, 17 * ss)], s, ss)
        x -= 10 * ss


def _polyline(d: ImageDraw.ImageDraw, pts: list[tuple[float, float]], s: Series, ss: int) -> None:
    if not pts:
        return
    width = max(1, round(s.width * ss))
    if len(pts) == 1:
        r = max(width, 2 * ss)
        d.ellipse([pts[0][0] - r, pts[0][1] - r, pts[0][0] + r, pts[0][1] + r], fill=s.color)
        return
    if not (s.dash or s.dotted):
        d.line(pts, fill=s.color, width=width, joint="curve")
        return
    on, off = (7 * ss, 5 * ss) if s.dash else (2 * ss, 4 * ss)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        t = 0.0
        while t < length:
            t1 = min(t + on, length)
            d.line([(x0 + (x1 - x0) * t / length, y0 + (y1 - y0) * t / length),
                    (x0 + (x1 - x0) * t1 / length, y0 + (y1 - y0) * t1 / length)], fill=s.color, width=width)
            t = t1 + off


# ---- the run's panels ---------------------------------------------------------------------------

def stage_bands(view: RunView, nimg: int) -> list[Band]:
    if view.config is None:
        return []
    from .schedule import stages

    out = []
    for st in stages(view.config):
        fill = TODO_FILL if st.start >= nimg else FADE_FILL if st.kind == "fade" else STABLE_FILL
        labels = [f"{st.resolution}x{st.resolution}", f"{st.resolution}"] if st.kind == "stable" else \
            [f"fade {st.resolution}", f"f{st.resolution}"]
        out.append(Band(st.start / 1000, st.end / 1000, fill, labels))
    return out


def build_panels(view: RunView, status: dict[str, Any]) -> list[Panel]:
    """Losses, gradient penalty, img/s and SWD against kimg, with the stage bands on each."""
    ticks = [r for r in view.records if r.get("event") == "tick"]
    xmax = status["total_kimg"] or None
    bands = stage_bands(view, status["nimg"])

    def col(key: str) -> list[float]:
        return [t.get(key, float("nan")) if _finite(t.get(key)) else float("nan") for t in ticks]

    kimg = [t["nimg"] / 1000 if _finite(t.get("nimg")) else float("nan") for t in ticks]
    losses = Panel("Losses", "loss", [Series("G", kimg, col("loss_G"), PALETTE[0]),
                                      Series("D", kimg, col("loss_D"), PALETTE[1])], bands, xmax=xmax)
    gp = Panel("Gradient penalty", "gp", [Series("gp", kimg, col("gp"), PALETTE[2])], bands, xmax=xmax)
    speed = Panel("Training speed", "img/s", [Series("img/s", kimg, col("img_per_s"), PALETTE[3])], bands, xmax=xmax)

    swd = status["swd"]
    series, hlines = [], []
    ends = [r for r in view.records if r.get("event") == "stage_end" and isinstance(r.get("swd"), dict)]
    for i, lv in enumerate(swd["levels"]):
        color = PALETTE[i % len(PALETTE)]
        pts = [(r["nimg"] / 1000, r["swd"]["swd_x1e3"].get(str(lv))) for r in ends if _finite(r.get("nimg"))]
        pts = [(x, y) for x, y in pts if _finite(y)]
        if pts:
            series.append(Series(f"{lv}", [x for x, _ in pts], [y for _, y in pts], color, markers=True))
        fl = [(r["nimg"] / 1000, (r.get("swd_floor") or {}).get("swd_x1e3", {}).get(str(lv))) for r in ends
              if _finite(r.get("nimg"))]
        fl = [(x, y) for x, y in fl if _finite(y)]
        if fl:
            series.append(Series("", [x for x, _ in fl], [y for _, y in fl], color, width=1.0, dash=True))
    avg = [(r["nimg"] / 1000, r["swd"].get("avg")) for r in ends if _finite(r.get("nimg"))]
    avg = [(x, y) for x, y in avg if _finite(y)]
    if avg:
        series.append(Series("avg", [x for x, _ in avg], [y for _, y in avg], INK, width=2.5, markers=True))
    if swd["floor"] and _finite(swd["floor"].get("avg")):
        fl = [(r["nimg"] / 1000, r["swd_floor"].get("avg")) for r in ends
              if isinstance(r.get("swd_floor"), dict) and _finite(r["swd_floor"].get("avg"))]
        series.append(Series("real vs real", [x for x, _ in fl], [y for _, y in fl], INK, width=1.2, dash=True))
    if swd["baseline"] and _finite(swd["baseline"].get("avg")):
        hlines.append(Series("untrained", [0.0], [swd["baseline"]["avg"]], (110, 110, 110), width=1.2, dotted=True))
    swd_panel = Panel("SWD x1e3 per level at stage ends", "SWD x1e3", series, bands, hlines, xmax=xmax, log_y=True,
                      empty_text="no SWD measured yet")
    return [losses, gp, speed, swd_panel]


def compose_png(panels: list[Image.Image], title: str, subtitle: str) -> Image.Image:
    """The 2 x 2 panels (downsampled to PANEL_W x PANEL_H) under a title strip: PNG_SIZE."""
    out = Image.new("RGB", PNG_SIZE, "white")
    d = ImageDraw.Draw(out)
    d.text((12, 6), title, fill=INK, font=_font(16))
    d.text((12, 26), subtitle, fill=(90, 90, 90), font=_font(11))
    # The band key, right-aligned.
    x = PNG_SIZE[0] - 12
    for label, fill in (("not reached", TODO_FILL), ("stable", STABLE_FILL), ("fade-in", FADE_FILL)):
        tw = d.textlength(label, font=_font(11))
        x -= tw
        d.text((x, 15), label, fill=INK, font=_font(11))
        x -= 18
        d.rectangle([x, 14, x + 14, 28], fill=fill, outline=(180, 180, 180))
        x -= 14
    for i, im in enumerate(panels[:4]):
        small = im.resize((PANEL_W, PANEL_H), Image.LANCZOS)
        out.paste(small, ((i % 2) * PANEL_W, HEADER_H + (i // 2) * PANEL_H))
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _grid_for_html(data: bytes) -> tuple[bytes, tuple[int, int] | None]:
    """A sample grid's PNG as it goes into the HTML: as written, or downsampled past MAX_GRID_PX."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            if max(size) <= MAX_GRID_PX:
                return data, size
            scale = MAX_GRID_PX / max(size)
            small = im.convert("RGB").resize((round(size[0] * scale), round(size[1] * scale)), Image.LANCZOS)
            return _png(small), size
    except Exception:  # noqa: BLE001 - a broken grid is shown as written (the browser says it is broken)
        return data, None


# ---- the report ---------------------------------------------------------------------------------

def build_report(storage: Storage, run_url: str) -> tuple[str, bytes]:
    """(HTML text, PNG bytes) of the run's report."""
    view = load_run(storage, run_url)
    status = summarize(view)
    panels = [render_panel(p) for p in build_panels(view, status)]
    title = f"pggan-ray report: {status['run_name']}"
    subtitle = (f"{status['state']} at {status['kimg']:.1f} / {status['total_kimg']:.1f} kimg  |  "
                f"{view.run_url}")
    png = _png(compose_png(panels, title, subtitle))
    grids = _grids(storage, view, status)
    return _html(title, subtitle, status, panels, grids), png


def _grids(storage: Storage, view: RunView, status: dict[str, Any]) -> list[dict[str, Any]]:
    """Every stage's sample grid in schedule order (files the schedule does not name come last)."""
    rows = {r["name"]: r for r in status["stages"]}
    names = [r["name"] for r in status["stages"] if f"{r['name']}.png" in view.samples]
    names += sorted(n[:-4] for n in view.samples if n[:-4] not in rows)
    out = []
    for name in names:
        data = storage.read_bytes(join(view.run_url, "samples", f"{name}.png"))
        shown, size = _grid_for_html(data)
        row = rows.get(name, {})
        out.append({"name": name, "png": shown, "size": size, "row": row})
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.sub{color:#666;margin-bottom:16px} pre{background:#f6f6f6;padding:12px;overflow-x:auto;font-size:12px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:8px}
.plots img{width:100%;height:auto;border:1px solid #eee}
.key span{display:inline-block;width:14px;height:12px;margin:0 4px 0 12px;vertical-align:middle;border:1px solid #bbb}
.grids{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.grids figure{margin:0;width:260px} .grids img{width:260px;height:auto;image-rendering:pixelated;border:1px solid #ddd}
figcaption{font-size:12px;color:#444;margin-top:4px}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 10px;text-align:right;border-bottom:1px solid #eee}
td:first-child,th:first-child{text-align:left}
"""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _html(title: str, subtitle: str, status: dict[str, Any], panels: list[Image.Image],
          grids: list[dict[str, Any]]) -> str:
    e = html.escape
    rgb = "rgb({},{},{})".format
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
             "</head><body>",
             f"<h1>{e(title)}</h1><div class='sub'>{e(subtitle)}</div>",
             "<h2>Status</h2>", f"<pre>{e(format_status(status))}</pre>",
             "<h2>Curves</h2>",
             f"<div class='key'>stages: <span style='background:{rgb(*FADE_FILL)}'></span>fade-in"
             f"<span style='background:{rgb(*STABLE_FILL)}'></span>stable"
             f"<span style='background:{rgb(*TODO_FILL)}'></span>not reached yet; bands are labelled by resolution. "
             "SWD: solid per level, dashed the real-vs-real floor, dotted the untrained generator.</div>",
             "<div class='plots'>"]
    for p in panels:
        parts.append(f"<img alt='plot' src='data:image/png;base64,{_b64(_png(p))}'>")
    parts.append("</div>")
    parts.append(_stages_html(status["stages"]))
    parts.append(_swd_html(status["swd"]))
    parts.append(f"<h2>Sample grids ({len(grids)} stages, the same latents)</h2><div class='grids'>")
    if not grids:
        parts.append("<p>no sample grids yet</p>")
    for g in grids:
        row = g["row"]
        cap = e(g["name"])
        if row:
            kind = "fade-in" if row["kind"] == "fade" else "stable"
            cap += f" &middot; {row['resolution']}x{row['resolution']} {kind} &middot; {row['end_kimg']:.1f} kimg"
            if _finite(row.get("swd_avg")):
                cap += f" &middot; SWD avg {row['swd_avg']:.2f}"
        parts.append(f"<figure id='grid-{e(g['name'])}'><img alt='{e(g['name'])}' "
                     f"src='data:image/png;base64,{_b64(g['png'])}'><figcaption>{cap}</figcaption></figure>")
    parts.append("</div></body></html>")
    return "\n".join(parts)


def _stages_html(rows: list[dict[str, Any]]) -> str:
    """The schedule: each stage's kimg range, minibatch, measured img/s and (where recorded) its seconds."""
    if not rows:
        return ""

    def sec(r: dict[str, Any], key: str) -> str:
        v = (r.get("seconds") or {}).get(key)
        return f"{v:.1f}" if _finite(v) else ""

    out = ["<h2>Stages</h2><table><tr><th>stage</th><th>kind</th><th>kimg</th><th>minibatch</th><th>status</th>"
           "<th>img/s</th><th>start-up s</th><th>train s</th><th>eval s</th><th>SWD avg</th></tr>"]
    for r in rows:
        ips = f"{r['img_per_s']:.1f}" if _finite(r.get("img_per_s")) else ""
        swd = f"{r['swd_avg']:.2f}" if _finite(r.get("swd_avg")) else ""
        out.append(f"<tr><td>{html.escape(r['name'])}</td><td>{'fade-in' if r['kind'] == 'fade' else 'stable'}</td>"
                   f"<td>{r['start_kimg']:g}..{r['end_kimg']:g}</td><td>{r['minibatch']}</td><td>{r['status']}</td>"
                   f"<td>{ips}</td><td>{sec(r, 'startup')}</td><td>{sec(r, 'train')}</td><td>{sec(r, 'eval')}</td>"
                   f"<td>{swd}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _swd_html(swd: dict[str, Any]) -> str:
    if not swd["rows"] and not swd["baseline"]:
        return ""
    levels = swd["levels"]
    e = html.escape

    def cells(vals: dict[str, Any], avg: Any) -> str:
        return "".join(f"<td>{vals[str(lv)]:.2f}</td>" if _finite(vals.get(str(lv))) else "<td></td>"
                       for lv in levels) + (f"<td><b>{avg:.2f}</b></td>" if _finite(avg) else "<td></td>")

    out = ["<h2>SWD x1e3 (lower is better)</h2><table><tr><th>stage</th><th>res</th><th>kimg</th>"
           + "".join(f"<th>{lv}</th>" for lv in levels) + "<th>avg</th></tr>"]
    for r in swd["rows"]:
        kimg = f"{r['kimg']:.1f}" if _finite(r.get("kimg")) else ""
        out.append(f"<tr><td>{e(str(r['stage']))}</td><td>{r['resolution']}</td><td>{kimg}</td>"
                   f"{cells(r['swd_x1e3'], r['avg'])}</tr>")
    for name, rec in (("real vs real", swd["floor"]), ("untrained G", swd["baseline"])):
        if rec:
            out.append(f"<tr><td>{name}</td><td>{rec['resolution']}</td><td></td>"
                       f"{cells(rec['swd_x1e3'], rec['avg'])}</tr>")
    out.append("</table>")
    return "".join(out)


def png_url_for(html_url: str) -> str:
    return (html_url[:-5] if html_url.endswith(".html") else html_url) + ".png"


def write_report(storage: Storage, run_url: str, out_url: str) -> tuple[str, str, int, int]:
    """Write the report's HTML to ``out_url`` and its PNG beside it. Returns (html url, png url, sizes)."""
    text, png = build_report(storage, run_url)
    data = text.encode()
    png_url = png_url_for(out_url)
    storage.write_bytes(out_url, data)
    storage.write_bytes(png_url, png)
    return out_url, png_url, len(data), len(png)


def write_run_report(storage: Storage, run_url: str) -> str:
    """Write ``<run_url>/report.html`` and ``<run_url>/report.png``; return the HTML's URL.

    For the driver at the end of every run (completed, stopped or failed). Raises on storage errors, so call it
    where a failure only warns (the run's outcome does not depend on its report)."""
    return write_report(storage, run_url, join(run_url, "report.html"))[0]


def cli_report(args: argparse.Namespace) -> int:
    """`launch.py report RUN_URL [--out report.html]`."""
    from .status import resolve_run

    storage, url = resolve_run(args)
    out = args.out
    html_url, png_url, n_html, n_png = write_report(storage, url, out)
    print(f"wrote {html_url} ({n_html / 1024:.0f} KiB) and {png_url} ({n_png / 1024:.0f} KiB)")
    return 0

"""Small PNG figures on Pillow + numpy (matplotlib is not a dependency of this project).

``line_plot`` (linear or log x axis, error bars, reference lines, legend), ``barh_plot`` (grouped
horizontal bars, one group per category — per-class IoU), ``image_grid`` (titled cells — attention
pictures) and ``colormap`` (a viridis-like map for feature maps). Readable rather than pretty: axes,
ticks, tick labels, axis labels, title, legend. Pillow's built-in font has no Greek letters: write
"alpha", not "α", in figure text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
GRID = (225, 225, 225)
AXIS = (40, 40, 40)
WHITE = (255, 255, 255)


def font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, fnt) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=fnt)
    return x1 - x0, y1 - y0


def _text(draw, xy, text, fnt, fill=AXIS, anchor="la"):
    draw.text(xy, text, font=fnt, fill=fill, anchor=anchor)


def _vertical_text(img: Image.Image, center: tuple[int, int], text: str, fnt, fill=AXIS) -> None:
    probe = ImageDraw.Draw(img)
    w, h = text_size(probe, text, fnt)
    tmp = Image.new("RGBA", (w + 4, h + 8), (255, 255, 255, 0))
    ImageDraw.Draw(tmp).text((2, 2), text, font=fnt, fill=fill)
    tmp = tmp.rotate(90, expand=True)
    img.paste(tmp, (center[0] - tmp.width // 2, center[1] - tmp.height // 2), tmp)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` ticks at 1-2-5 steps covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 10))
        v += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten in [lo, hi] (with 2 and 5 between them when the range spans few decades)."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1, 2, 5) if b - a <= 2 else (1,)
    out = [m * 10.0 ** e for e in range(a, b + 1) for m in mults]
    return [t for t in out if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]


def fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:g}"


def _dashed_line(draw, p0, p1, fill, width=2, dash=8, gap=5):
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    if length == 0:
        return
    dx, dy = (x1 - x0) / length, (y1 - y0) / length
    pos = 0.0
    while pos < length:
        end = min(pos + dash, length)
        draw.line([(x0 + dx * pos, y0 + dy * pos), (x0 + dx * end, y0 + dy * end)], fill=fill, width=width)
        pos = end + gap


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    yerr: Sequence[float] | None = None  # half-length of the error bar per point (None / nan = none)
    color: tuple[int, int, int] | None = None
    dashed: bool = False


@dataclass
class HLine:
    label: str
    y: float
    color: tuple[int, int, int] = (110, 110, 110)
    dashed: bool = True


@dataclass
class _Frame:
    left: int
    top: int
    right: int
    bottom: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    logx: bool = False
    extras: dict = field(default_factory=dict)

    def tx(self, x: float) -> float:
        lo, hi = self.x_range
        if self.logx:
            x, lo, hi = math.log10(x), math.log10(lo), math.log10(hi)
        return self.left + (x - lo) / (hi - lo) * (self.right - self.left)

    def ty(self, y: float) -> float:
        lo, hi = self.y_range
        return self.bottom - (y - lo) / (hi - lo) * (self.bottom - self.top)


def _legend(draw, entries: list[tuple[str, tuple, bool]], x: int, y: int, fnt) -> None:
    for label, color, dashed in entries:
        if dashed:
            _dashed_line(draw, (x, y + 7), (x + 26, y + 7), color, dash=6, gap=3)
        else:
            draw.line([(x, y + 7), (x + 26, y + 7)], fill=color, width=3)
        _text(draw, (x + 32, y), label, fnt)
        y += 20


def line_plot(path: str | Path, series: Sequence[Series], *, title: str = "", xlabel: str = "", ylabel: str = "",
              logx: bool = False, hlines: Sequence[HLine] = (), xticks: Sequence[float] | None = None,
              size: tuple[int, int] = (760, 460)) -> Path:
    """Lines with markers and error bars; ``logx`` puts x on a log10 axis (x must be > 0)."""
    W, H = size
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    f_title, f_lab, f_tick = font(16), font(13), font(12)
    entries = [(s.label, s.color or COLORS[i % len(COLORS)], s.dashed) for i, s in enumerate(series)]
    entries += [(h.label, h.color, h.dashed) for h in hlines]
    legend_w = max([text_size(draw, e[0], f_lab)[0] for e in entries] + [0]) + 50 if entries else 0
    xs = [float(v) for s in series for v in s.x]
    ys = [float(v) for s in series for v in s.y if v is not None and math.isfinite(v)]
    for s in series:
        for v, e in zip(s.y, s.yerr or [None] * len(s.y)):
            if e is not None and math.isfinite(e) and v is not None and math.isfinite(v):
                ys += [v - e, v + e]
    ys += [h.y for h in hlines if math.isfinite(h.y)]
    if logx:
        xs = [x for x in xs if x > 0]
    if not xs:
        xs = [1.0, 10.0] if logx else [0.0, 1.0]
    if not ys:
        ys = [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    if logx:
        pad = max((math.log10(x_hi) - math.log10(x_lo)) * 0.08, 0.15)
        x_range = (10 ** (math.log10(x_lo) - pad), 10 ** (math.log10(x_hi) + pad))
    else:
        pad = (x_hi - x_lo) * 0.06 or 0.5
        x_range = (x_lo - pad, x_hi + pad)
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.1 or max(abs(y_hi) * 0.05, 0.5)
    y_range = (y_lo - pad, y_hi + pad)
    fr = _Frame(left=72, top=44, right=W - 20 - legend_w, bottom=H - 58, x_range=x_range, y_range=y_range, logx=logx)
    # grid + ticks
    yt = [t for t in nice_ticks(*y_range) if y_range[0] <= t <= y_range[1]]
    if xticks is not None:
        xt = [float(t) for t in xticks]
    else:
        xt = log_ticks(*x_range) if logx else nice_ticks(*x_range)
    xt = [t for t in xt if x_range[0] <= t <= x_range[1]]
    for t in yt:
        y = fr.ty(t)
        draw.line([(fr.left, y), (fr.right, y)], fill=GRID)
        _text(draw, (fr.left - 6, y), fmt_tick(t), f_tick, anchor="rm")
    for t in xt:
        x = fr.tx(t)
        draw.line([(x, fr.top), (x, fr.bottom)], fill=GRID)
        draw.line([(x, fr.bottom), (x, fr.bottom + 5)], fill=AXIS)
        _text(draw, (x, fr.bottom + 8), fmt_tick(t), f_tick, anchor="ma")
    draw.rectangle([fr.left, fr.top, fr.right, fr.bottom], outline=AXIS)
    # reference lines
    for h in hlines:
        if not math.isfinite(h.y):
            continue
        y = fr.ty(h.y)
        if h.dashed:
            _dashed_line(draw, (fr.left, y), (fr.right, y), h.color)
        else:
            draw.line([(fr.left, y), (fr.right, y)], fill=h.color, width=2)
    # series
    for i, s in enumerate(series):
        color = s.color or COLORS[i % len(COLORS)]
        pts = [(fr.tx(float(x)), fr.ty(float(y)), (s.yerr[j] if s.yerr is not None else None))
               for j, (x, y) in enumerate(zip(s.x, s.y))
               if y is not None and math.isfinite(y) and (not logx or x > 0)]
        for (x0, y0, _), (x1, y1, _) in zip(pts, pts[1:]):
            if s.dashed:
                _dashed_line(draw, (x0, y0), (x1, y1), color)
            else:
                draw.line([(x0, y0), (x1, y1)], fill=color, width=2)
        for x, y, e in pts:
            if e is not None and math.isfinite(e) and e > 0:
                d = e / (y_range[1] - y_range[0]) * (fr.bottom - fr.top)
                draw.line([(x, y - d), (x, y + d)], fill=color, width=1)
                draw.line([(x - 4, y - d), (x + 4, y - d)], fill=color)
                draw.line([(x - 4, y + d), (x + 4, y + d)], fill=color)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color, outline=color)
    # labels
    if title:
        _text(draw, ((fr.left + fr.right) / 2, 14), title, f_title, anchor="ma")
    if xlabel:
        _text(draw, ((fr.left + fr.right) / 2, H - 24), xlabel, f_lab, anchor="ma")
    if ylabel:
        _vertical_text(img, (18, (fr.top + fr.bottom) // 2), ylabel, f_lab)
    if entries:
        _legend(draw, entries, fr.right + 14, fr.top + 4, f_lab)
    return _save(img, path)


def barh_plot(path: str | Path, categories: Sequence[str], groups: Sequence[tuple[str, Sequence[float]]], *,
              title: str = "", xlabel: str = "", x_max: float | None = None, width: int = 760,
              bar_h: int = 9) -> Path:
    """Grouped horizontal bars: one band per category, one bar per group (nan = no bar)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    f_title, f_lab, f_tick = font(16), font(13), font(12)
    label_w = max([text_size(probe, c, f_tick)[0] for c in categories] + [20]) + 14
    legend_w = max([text_size(probe, g[0], f_lab)[0] for g in groups] + [0]) + 50
    band = bar_h * len(groups) + 8
    top, bottom_pad = 44, 56
    H = top + band * max(len(categories), 1) + bottom_pad
    img = Image.new("RGB", (width, H), WHITE)
    draw = ImageDraw.Draw(img)
    vals = [v for _, vs in groups for v in vs if v is not None and math.isfinite(v)]
    hi = x_max if x_max is not None else (max(vals) if vals else 1.0)
    hi = hi or 1.0
    fr = _Frame(left=label_w, top=top, right=width - 20 - legend_w, bottom=H - bottom_pad, x_range=(0.0, hi * 1.05),
                y_range=(0.0, 1.0))
    for t in nice_ticks(0.0, hi * 1.05):
        if t > fr.x_range[1]:
            continue
        x = fr.tx(t)
        draw.line([(x, fr.top), (x, fr.bottom)], fill=GRID)
        _text(draw, (x, fr.bottom + 6), fmt_tick(t), f_tick, anchor="ma")
    for i, cat in enumerate(categories):
        y0 = fr.top + i * band + 4
        _text(draw, (fr.left - 6, y0 + band / 2 - 4), cat, f_tick, anchor="rm")
        for g, (_, vs) in enumerate(groups):
            v = vs[i] if i < len(vs) else None
            if v is None or not math.isfinite(v):
                continue
            yb = y0 + g * bar_h
            draw.rectangle([fr.left, yb, max(fr.tx(v), fr.left + 1), yb + bar_h - 2], fill=COLORS[g % len(COLORS)])
    draw.rectangle([fr.left, fr.top, fr.right, fr.bottom], outline=AXIS)
    if title:
        _text(draw, ((fr.left + fr.right) / 2, 14), title, f_title, anchor="ma")
    if xlabel:
        _text(draw, ((fr.left + fr.right) / 2, H - 24), xlabel, f_lab, anchor="ma")
    _legend(draw, [(g[0], COLORS[i % len(COLORS)], False) for i, g in enumerate(groups)], fr.right + 14, fr.top + 4,
            f_lab)
    return _save(img, path)


# viridis anchors (0, 0.25, 0.5, 0.75, 1)
_CMAP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colormap(x: np.ndarray) -> np.ndarray:
    """(H, W) array → (H, W, 3) uint8, min–max normalised, viridis-like."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.nanmin(x), np.nanmax(x)
    u = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    pos = np.clip(u, 0, 1) * (len(_CMAP) - 1)
    i = np.minimum(pos.astype(int), len(_CMAP) - 2)
    f = (pos - i)[..., None]
    return np.round(_CMAP[i] * (1 - f) + _CMAP[i + 1] * f).astype(np.uint8)


def image_grid(path: str | Path, rows: Sequence[Sequence[np.ndarray | None]], *, col_titles: Sequence[str] = (),
               row_titles: Sequence[str] = (), cell: int = 144, title: str = "") -> Path:
    """Cells are (H, W, 3) uint8 arrays (resized to ``cell`` × ``cell``) or None ("n/a")."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    f_title, f_lab = font(16), font(13)
    row_w = max([text_size(probe, t, f_lab)[0] for t in row_titles] + [0]) + (16 if row_titles else 8)
    ncols = max((len(r) for r in rows), default=0)
    pad, head = 6, (34 if title else 8) + (22 if col_titles else 0)
    W = max(row_w + ncols * (cell + pad) + pad, (text_size(probe, title, f_title)[0] + 24) if title else 0)
    H = head + len(rows) * (cell + pad) + pad
    img = Image.new("RGB", (W, H), WHITE)
    draw = ImageDraw.Draw(img)
    if title:
        _text(draw, (W / 2, 10), title, f_title, anchor="ma")
    for j, t in enumerate(col_titles):
        _text(draw, (row_w + j * (cell + pad) + cell / 2, head - 18), t, f_lab, anchor="ma")
    for i, row in enumerate(rows):
        y = head + i * (cell + pad)
        if i < len(row_titles):
            _text(draw, (row_w - 8, y + cell / 2), row_titles[i], f_lab, anchor="rm")
        for j, a in enumerate(row):
            x = row_w + j * (cell + pad)
            if a is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=GRID, fill=(245, 245, 245))
                _text(draw, (x + cell / 2, y + cell / 2), "n/a", f_lab, fill=(150, 150, 150), anchor="mm")
                continue
            tile = Image.fromarray(np.asarray(a, dtype=np.uint8)).convert("RGB").resize((cell, cell), Image.BILINEAR)
            img.paste(tile, (x, y))
    return _save(img, path)


def _save(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path

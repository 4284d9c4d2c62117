"""The lab's PNG figures, drawn with matplotlib (the ``lab`` extra; the core never imports this module).

``line_plot`` (linear or log x axis, error bars, reference lines, legend), ``barh_plot`` (grouped
horizontal bars, one group per category — per-class IoU), ``image_grid`` (titled cells — attention
pictures), ``colormap`` (viridis, for feature maps) and ``curve_plot`` (training curves: many runs
overlaid, no markers). Figures are written atomically (temp file, then rename) with the Agg backend, so
they draw without a display.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from attnfd_pipeline.errors import UserError

DPI = 100
SIZE = (760, 460)  # pixels of a line or curve figure (and the width of a bar figure)
# A colour is matplotlib's "CN" spec (the N-th colour of its own property cycle, wrapping around) or a
# 0–255 RGB triple of the caller's.
Color = str | tuple[int, int, int]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (the lab's figures need no display)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("the lab's figures need matplotlib: pip install -e '.[lab]'") from None

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def cycle_color(i: int) -> str:
    """The ``i``-th colour of matplotlib's property cycle: callers pick colours by index to match series
    across figures (0 cached, 1 online, …)."""
    return f"C{i}"


def series_rgb(color: Color | None, i: int) -> str | tuple[float, float, float]:
    """Matplotlib colour of series ``i``: its own ``color``, else the ``i``-th of matplotlib's cycle."""
    if color is None:
        return cycle_color(i)
    return color if isinstance(color, str) else tuple(v / 255 for v in color)


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    yerr: Sequence[float] | None = None  # half-length of the error bar per point (None / nan = none)
    color: Color | None = None


@dataclass
class HLine:
    label: str
    y: float
    color: Color = (110, 110, 110)
    dashed: bool = True


def _finite(v) -> bool:
    return v is not None and np.isfinite(float(v))


def line_plot(path: str | Path, series: Sequence[Series], *, title: str = "", xlabel: str = "", ylabel: str = "",
              logx: bool = False, hlines: Sequence[HLine] = (), xticks: Sequence[float] | None = None) -> Path:
    """Lines with markers and error bars; ``logx`` puts x on a log10 axis (x must be > 0)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI)
    for i, s in enumerate(series):
        pts = [(float(x), float(y), s.yerr[j] if s.yerr is not None else None)
               for j, (x, y) in enumerate(zip(s.x, s.y)) if _finite(y) and (not logx or float(x) > 0)]
        if not pts:
            continue
        xs, ys, es = zip(*pts)
        err = [float(e) if _finite(e) else 0.0 for e in es]
        ax.errorbar(xs, ys, yerr=err if any(err) else None, label=s.label, color=series_rgb(s.color, i), marker="o",
                    markersize=5, linestyle="-", linewidth=2, capsize=4)
    for h in hlines:
        if _finite(h.y):
            ax.axhline(h.y, label=h.label, color=series_rgb(h.color, 0), linestyle="--" if h.dashed else "-",
                       linewidth=1.5)
    if logx:
        ax.set_xscale("log")
    if xticks is not None:
        ax.set_xticks([float(t) for t in xticks], [f"{float(t):g}" for t in xticks])
    _finish(fig, ax, title, xlabel, ylabel, legend=bool(series) or bool(hlines))
    return save_figure(fig, path)


def curve_plot(path: str | Path, series: Sequence[Series], *, title: str = "", xlabel: str = "", ylabel: str = "",
               logy: bool = False) -> Path:
    """Training curves: one line per run (markers only where a run has few points), legend by run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI)
    for i, s in enumerate(series):
        pts = [(float(x), float(y)) for x, y in zip(s.x, s.y) if _finite(y) and (not logy or float(y) > 0)]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=s.label, color=series_rgb(s.color, i), linestyle="-", linewidth=1.6,
                    marker="o" if len(pts) <= 30 else None, markersize=4)
    if logy:
        ax.set_yscale("log")
    integer_ticks(ax)
    _finish(fig, ax, title, xlabel, ylabel, legend=bool(series))
    return save_figure(fig, path)


def integer_ticks(ax) -> None:
    """Whole-number x ticks (epochs and steps have no 2.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _finish(fig, ax, title: str, xlabel: str, ylabel: str, *, legend: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="0.88")
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    fig.tight_layout()


def barh_plot(path: str | Path, categories: Sequence[str], groups: Sequence[tuple[str, Sequence[float]]], *,
              title: str = "", xlabel: str = "", x_max: float | None = None) -> Path:
    """Grouped horizontal bars: one band per category, one bar per group (nan = no bar)."""
    plt = pyplot()
    band = 9 * len(groups) + 8  # 9 px a bar
    height = 100 + band * max(len(categories), 1)
    fig, ax = plt.subplots(figsize=(SIZE[0] / DPI, height / DPI), dpi=DPI)
    n = max(len(groups), 1)
    for g, (label, vs) in enumerate(groups):
        ys = [i + (g - (n - 1) / 2) / (n + 1) for i in range(len(categories))]
        vals = [float(vs[i]) if i < len(vs) and _finite(vs[i]) else np.nan for i in range(len(categories))]
        ax.barh(ys, vals, height=0.8 / (n + 1), label=label, color=series_rgb(None, g))
    ax.set_yticks(range(len(categories)), list(categories))
    ax.invert_yaxis()  # first category on top
    if x_max is not None:
        ax.set_xlim(0, x_max * 1.05)
    _finish(fig, ax, title, xlabel, "", legend=bool(groups))
    return save_figure(fig, path)


def colormap(x: np.ndarray) -> np.ndarray:
    """(H, W) array → (H, W, 3) uint8, min–max normalised, viridis."""
    from matplotlib import colormaps

    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.nanmin(x), np.nanmax(x)
    u = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return (colormaps["viridis"](np.clip(u, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def image_grid(path: str | Path, rows: Sequence[Sequence[np.ndarray | None]], *, col_titles: Sequence[str] = (),
               row_titles: Sequence[str] = (), cell: int = 144, title: str = "") -> Path:
    """Cells are (H, W, 3) uint8 arrays (shown at ``cell`` × ``cell`` pixels) or None ("n/a")."""
    plt = pyplot()
    nrows, ncols = max(len(rows), 1), max((len(r) for r in rows), default=1) or 1
    extra_w = 1.4 if row_titles else 0.2
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, dpi=DPI,
                             figsize=(ncols * (cell + 8) / DPI + extra_w, nrows * (cell + 8) / DPI + 0.8))
    for i in range(nrows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            a = rows[i][j] if i < len(rows) and j < len(rows[i]) else None
            if a is None:
                ax.set_facecolor((0.96, 0.96, 0.96))
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", color="0.6", transform=ax.transAxes)
            else:
                ax.imshow(np.asarray(a, dtype=np.uint8), interpolation="bilinear")
            if i == 0 and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=10)
            if j == 0 and i < len(row_titles):
                ax.set_ylabel(row_titles[i], rotation=0, ha="right", va="center", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and close it."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    tmp.replace(path)
    return path

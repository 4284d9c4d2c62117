"""Training curves of several runs overlaid (``attnfd curves``): one PNG per quantity, legend by run name.

A run is a folder with ``metrics.parquet`` (one row per epoch) and, for runs trained since per-step rows
exist, ``steps.parquet`` (one row every ``train.log_every`` steps). Against the step: every loss part and
figure of ``steps.parquet`` (``step_<quantity>.png``). Against the epoch: validation mIoU and pixel
accuracy and the epoch means of the loss parts (``epoch_<quantity>.png``) — what a run from before
per-step rows still has. ``overview.png`` puts the train loss, the CE and val mIoU against the epoch side
by side (the README's picture).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from attnfd_pipeline.config import Config
from attnfd_pipeline.experiments.plotting import DPI, Series, curve_plot, integer_ticks, pyplot, save_figure, series_rgb

STEP_SKIP = ("step", "epoch")
EPOCH_QUANTITIES = ("miou", "pixel_acc", "class_acc", "fwiou")  # evaluation, in %
LABELS = {"miou": "val mIoU (%)", "pixel_acc": "val pixel accuracy (%)", "class_acc": "val class accuracy (%)",
          "fwiou": "val FWIoU (%)", "loss": "loss (total)", "ce": "CE", "distill": "distillation loss (weighted sum)",
          "lr": "learning rate", "samples_per_s": "samples / s", "data_wait_s": "data wait per step (s)",
          "peak_mem_bytes": "peak memory (MiB)"}


@dataclass
class RunCurves:
    name: str
    path: Path
    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)


def find_runs(cfg: Config, pattern: str = "student/*") -> list[Path]:
    """Run folders under ``runs/<name>/`` whose path relative to it matches ``pattern`` and that have a
    ``metrics.parquet`` (``"student/*"``: every student run; ``"teacher/train"``: the teacher)."""
    root = cfg.run_root
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no runs for config {cfg.name!r}")
    found = sorted({p.parent for p in root.rglob("metrics.parquet")
                    if fnmatch.fnmatch(p.parent.relative_to(root).as_posix(), pattern)})
    if not found:
        raise FileNotFoundError(f"{root}: no run folder matching {pattern!r} has a metrics.parquet")
    return found


def load_run(path: Path, root: Path | None = None) -> RunCurves:
    name = path.relative_to(root).as_posix() if root is not None else path.name
    name = name.removeprefix("student/")
    steps = pq.read_table(path / "steps.parquet").to_pylist() if (path / "steps.parquet").is_file() else []
    return RunCurves(name, path, steps, pq.read_table(path / "metrics.parquet").to_pylist())


def _value(row: dict, key: str):
    v = row.get(key)
    if v is None or isinstance(v, (list, dict, str)):
        return None
    v = float(v)
    if key in EPOCH_QUANTITIES:
        return v * 100
    return v / 2**20 if key == "peak_mem_bytes" else v


def _numeric_keys(rows: list[dict], skip=()) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k not in skip))


def _series(runs: list[RunCurves], key: str, axis: str):
    out = []
    for r in runs:
        rows = r.steps if axis == "step" else r.epochs
        pts = [(row[axis], v) for row in rows if (v := _value(row, key)) is not None]
        if pts:
            out.append(Series(r.name, [x for x, _ in pts], [y for _, y in pts]))
    return out


def epoch_quantities(runs: list[RunCurves]) -> list[str]:
    keys = _numeric_keys([row for r in runs for row in r.epochs])
    return [k for k in keys if k in EPOCH_QUANTITIES or k.startswith("train_")]


def _label(key: str) -> str:
    base = key.removeprefix("train_")
    text = LABELS.get(base, base.replace("_", " "))
    return f"train {text}, epoch mean" if key.startswith("train_") else text


def draw_curves(cfg: Config, *, runs: str = "student/*", out: str | Path | None = None) -> list[Path]:
    """Draw every quantity of the runs matching ``runs`` into ``out`` (default ``reports/<name>/curves``);
    returns the PNGs written."""
    out = Path(out) if out is not None else Path("reports") / cfg.name / "curves"
    return draw_runs([load_run(p, cfg.run_root) for p in find_runs(cfg, runs)], out)


def draw_runs(loaded: list[RunCurves], out: Path, *, title: str = "") -> list[Path]:
    """One PNG per quantity of ``loaded`` into ``out`` (``overview.png`` first); returns the paths."""
    files = [overview(loaded, out / "overview.png", title=title)]
    stepped = [r for r in loaded if r.steps]
    for key in _numeric_keys([row for r in stepped for row in r.steps], STEP_SKIP):
        files.append(curve_plot(out / f"step_{key}.png", _series(stepped, key, "step"), title=_label(key),
                                xlabel="step", ylabel=_label(key), logy=key == "lr"))
    for key in epoch_quantities(loaded):
        files.append(curve_plot(out / f"epoch_{key}.png", _series(loaded, key, "epoch"), title=_label(key),
                                xlabel="epoch", ylabel=_label(key)))
    return files


def overview(runs: list[RunCurves], path: Path, *, title: str = "") -> Path:
    """Train loss, train CE and val mIoU against the epoch, one panel each, runs overlaid."""
    plt = pyplot()
    keys = [k for k in ("train_loss", "train_ce", "miou") if any(_series(runs, k, "epoch"))]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.2 * max(len(keys), 1), 3.4), dpi=DPI, squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, s in enumerate(_series(runs, key, "epoch")):
            ax.plot(s.x, s.y, marker="o", markersize=4, linewidth=1.6, label=s.label, color=series_rgb(None, i))
        ax.set_title(_label(key), fontsize=10)
        ax.set_xlabel("epoch")
        integer_ticks(ax)
        ax.grid(True, color="0.88")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1 if handles else 0, 1, 1))
    return save_figure(fig, path)

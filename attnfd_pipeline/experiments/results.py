"""Result tables from run directories: teacher + every student run of a config."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from attnfd_pipeline.cache.build import read_build_record
from attnfd_pipeline.config import Config
from attnfd_pipeline.experiments.table import Row, cell, markdown, number, paired_header
from attnfd_pipeline.records import RESULT_JSON, RunRecord, read_record
from attnfd_pipeline.runs import variant_tag


def setting_tag(r: RunRecord, cfg: Config) -> str:
    """The settings of a run that no column shows and that differ from the config's: K (the cached seeds; not
    for fresh crops), the loss norm and the points (distilled runs); "" at the config's values. Runs that differ
    here trained differently, so they are rows of their own."""
    parts = [f"K{r.K}"] if r.K is not None and not r.fresh and r.K != cfg.cache.K else []
    if r.distilled and r.norm and r.norm != cfg.student.norm:
        parts.append(f"norm {r.norm}")
    if r.distilled and r.points and tuple(r.points) != tuple(cfg.student.points):
        parts.append("points " + "+".join(r.points))
    return ", ".join(parts)


def collect_results(cfg: Config) -> list[dict]:
    rows = []
    teacher = cfg.teacher_dir / "result.json"
    if teacher.is_file():
        r = json.loads(teacher.read_text())
        rows.append({"role": "teacher", "model": cfg.teacher.model.name, "method": f"CE ({cfg.teacher.cbam_mode} CBAM)",
                     "alpha": None, "mode": "", "seed": cfg.teacher.train.seed, "miou": r["miou"],
                     "pixel_acc": r["pixel_acc"], "seconds": r["seconds"]})
    # The plain student (α = 0) first: it is the row every Δ refers to; then runs by name.
    records = [read_record(p.parent) for p in sorted((cfg.run_root / "student").glob(f"*/{RESULT_JSON}"))]
    for r in sorted(records, key=lambda r: r.distilled):
        # the plain student's crops: cached seeds ("") or a fresh draw every epoch ("fresh")
        mode = r.mode_tag if r.distilled else ("fresh" if r.fresh else "")
        rows.append({"role": "student", "model": r.model, "method": r.method, "alpha": r.alpha,
                     "weights": r.weights, "mode": mode, "variant": variant_tag(r.run),
                     "setting": setting_tag(r, cfg), "seed": r.seed,
                     "miou": r.final_miou, "pixel_acc": r.final_pixel_acc, "seconds": r.train_seconds})
    return rows


def collect_stages(cfg: Config) -> list[str]:
    """One line per finished stage: time, and the cache's size on disk."""
    lines = []
    teacher = cfg.teacher_dir / "result.json"
    if teacher.is_file():
        r = json.loads(teacher.read_text())
        lines.append(f"teacher: {r['epochs']} epochs in {r['seconds']:.0f} s")
    r = read_build_record(cfg)
    if r is not None:
        where = Path(r["path"])
        size = sum(f.stat().st_size for f in where.rglob("*") if f.is_file()) if where.is_dir() else 0
        lines.append(f"cache: {r['samples_written']} samples in {r['seconds']:.0f} s "
                     f"({r['samples_per_s']:.1f} samples/s), {size / 1e6:.1f} MB on disk at {r['path']}")
    return lines


def alpha_cell(alpha: float | None, weights: dict[str, float]) -> str:
    """The loss weight a run used: α, or α · w when a method's own weight is not 1 (the demo runs KD at
    α 30 × weight 1/30 = 1 — a bare "30" would misstate it)."""
    if alpha is None:
        return ""
    if not alpha or all(w == 1 for w in weights.values()):
        return f"{alpha:g}"
    if len(weights) == 1:
        (w,) = weights.values()
        return f"{alpha * w:g} (= {alpha:g} × {w:g})"
    return f"{alpha:g} × (" + ", ".join(f"{m} {w:g}" for m, w in weights.items()) + ")"


def format_table(rows: list[dict]) -> str:
    """Markdown table; runs that differ only by seed are merged into mean ± std (a run of another variant —
    recipe switch, method setting, storage: ``runs.variant_tag`` — is a row of its own, its tag in brackets),
    and each distilled row is compared with the plain student as the report does (``experiments.table``): the
    difference of the means and the paired Δ over the seeds both have. A run at another K, norm or point set
    than the config's is a row of its own too (``setting_tag``)."""
    if not rows:
        return ("no results yet (run `attnfd teacher -c CONFIG`, `attnfd cache build -c CONFIG`, "
                "`attnfd student -c CONFIG`)")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["role"], r["model"], r["method"], r.get("setting") or "", r.get("variant") or "",
                alpha_cell(r["alpha"], r.get("weights") or {}), r["mode"])].append(r)
    cells = []
    for (role, model, method, *tags, alpha, mode), g in groups.items():
        label = method + (f" [{', '.join(t for t in tags if t)}]" if any(tags) else "")
        row, compared = Row.of(label, g), role != "teacher" and method != "none"
        base = _plain_student(groups, model) if compared else None
        cells.append([role, model, label, alpha, mode, len(g), cell(row.miou), row.delta(base) if compared else "",
                      row.pair_cell(base) if compared else "", number(row.pixel_acc.mean if row.pixel_acc else None),
                      f"{np.mean([r['seconds'] for r in g]):.0f}"])
    return markdown(["role", "model", "method", "α", "mode", "seeds", "mIoU %", "Δ vs student (means)",
                     paired_header("student"), "pixel acc %", "train s"], cells)


def _plain_student(groups: dict[tuple, list[dict]], model: str) -> Row | None:
    """The plain student a row of ``model`` is compared with: that model's on the cached crops at the config's
    settings and the default recipe (no tag) when it has runs, else its first plain row; None without a plain
    run of ``model``."""
    plain = [k for k in groups if k[0] == "student" and k[1] == model and k[2] == "none"]
    key = min(plain, key=lambda k: (k[3] != "", k[4] != "", k[6] != ""), default=None)  # setting, variant, crops
    return Row.of("student", groups[key]) if key else None

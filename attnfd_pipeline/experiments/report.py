"""Paper-style reports from run results (``attnfd report``).

Reads every ``runs/<name>/student/*/result.json`` of a config (and of any extra run roots, e.g. the
runs of other teacher CBAM modes, which need their own teacher and so their own ``name``) plus the
teachers' ``result.json`` and bundle sidecars, and writes into ``out/``:

- ``report.md`` — the paper-style table (teacher, student, student + each method: mean ± std over
  seeds, n, gain over the student, mIoU and pixel accuracy), then the studies: α sweep, K (cached
  augmentation seeds) vs online, distillation points, normalisation, teacher CBAM mode, per-class IoU
  of the best method vs the student. A study without runs says "no runs".
- ``alpha_sweep.png``, ``k_study.png``, ``per_class_iou.png`` (when their study has runs);
- ``report.json`` — the rows behind every table.

A study varies one factor of AttnFD (cached) and holds the others at the config's values (the
*reference*: α, norm, points, K, teacher CBAM mode, student model). mIoU is each run's final-epoch
validation mIoU under the evaluation protocol its result.json names; ± is the sample standard deviation
over seeds (shown when n > 1). Every row compared with a reference row — the plain student for the
methods and the K study, AttnFD at the reference setting for the α, points, norm and teacher-CBAM-mode
ablations — also gets the paired difference over the seeds both rows have, with its 95 % t-interval and
n (``experiments.stats.paired``); a row sharing no seed with its reference says so.

A run's mode is ``cached``, ``online`` (teacher online on the replayed cached crops: equal to cached up to
float16) or ``online-fresh`` (``student.targets = "online-fresh"``: a fresh augmentation every epoch, result.json
``"augment": "fresh"``) — the "online (fresh augmentation)" reference of the K study. Results without
``augment`` (older runs) replayed the cached seeds.
"""

from __future__ import annotations

import json
import tomllib
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from attnfd_pipeline.config import Config, TargetSource
from attnfd_pipeline.experiments.stats import LEVEL, Difference, Stat, paired, seed_values
from attnfd_pipeline.losses import get_method, list_methods, method_label
from attnfd_pipeline.records import CENTER_CROP, read_record
from attnfd_pipeline.utils import atomic_write_json, atomic_write_text

# display names and the run settings a method's result depends on (the others are ignored when matching the
# reference), as each method declares them (``DistillMethod.label`` / ``uses``)
DISPLAY = {n: method_label(n) for n in list_methods()}
METHOD_ORDER = [*(n for n in list_methods() if n != "attnfd"), "attnfd"]  # paper table order: rivals, then AttnFD
USES = {n: set(get_method(n).uses) for n in list_methods()}
CBAM_MODES = ("inpath", "fitted", "parameter_free", "untrained")
NORM_ORDER = ("batch", "sample", "channel")
NO_RUNS = "no runs"
# the run tags of the three target sources (``TargetSource.tag``), as run names and result rows carry them
CACHED, ONLINE, FRESH = (t.tag for t in TargetSource)
MODES = (CACHED, ONLINE, FRESH)



# ---------------------------------------------------------------------------------------------
# reading runs


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _teacher_record(root: Path) -> dict | None:
    res = root / "teacher" / "result.json"
    if not res.is_file():
        return None
    r = json.loads(res.read_text())
    side = root / "teacher" / "teacher_bundle.json"
    info = json.loads(side.read_text()) if side.is_file() else {}
    cfg = _read_toml(root / "teacher" / "config.resolved.toml")
    metrics = info.get("metrics", {})
    return {
        "root": str(root), "model": info.get("model") or cfg.get("teacher", {}).get("model", {}).get("name"),
        "cbam_mode": info.get("cbam_mode") or cfg.get("teacher", {}).get("cbam_mode"),
        "miou": r.get("miou"), "pixel_acc": r.get("pixel_acc"), "per_class_iou": metrics.get("per_class_iou"),
        "class_names": metrics.get("class_names"), "seconds": r.get("seconds"),
    }


def _student_record(path: Path, root: Path, teacher: dict | None) -> dict:
    """The report's row of one run: its ``RunRecord`` (older results filled from the resolved config), with
    the teacher CBAM mode taken from the run root's teacher when the result does not name it."""
    rec = read_record(path.parent)
    mode = (rec.teacher or {}).get("cbam_mode") or (teacher or {}).get("cbam_mode") \
        or _read_toml(path.parent / "config.resolved.toml").get("teacher", {}).get("cbam_mode")
    return {
        "run": rec.run, "root": str(root), "model": rec.model, "method": rec.method, "alpha": rec.alpha,
        "norm": rec.norm, "points": rec.points, "mode": rec.mode_tag, "augment": rec.augment,
        "seed_order": rec.seed_order, "seed": rec.seed, "K": rec.K, "teacher_mode": mode if rec.distilled else None,
        "miou": rec.final_miou, "pixel_acc": rec.final_pixel_acc, "best_miou": rec.best_miou,
        "per_class_iou": list(rec.per_class_iou) if rec.per_class_iou is not None else None,
        "class_names": list(rec.class_names) or None, "seconds": rec.train_seconds, "epochs": rec.epochs,
        "dataset": rec.dataset, "eval_protocol": rec.eval_protocol,
    }


def collect_runs(cfg: Config, extra_roots: Iterable[str | Path] = ()) -> tuple[list[dict], list[dict]]:
    """(teachers, students) of ``cfg.run_root`` and of every extra run root (a run folder such as
    ``runs/demo_fitted``). Runs without a final mIoU (unfinished) are left out."""
    roots, seen = [], set()
    for root in [cfg.run_root, *map(Path, extra_roots)]:
        key = Path(root).resolve()
        if key not in seen:
            seen.add(key)
            roots.append(Path(root))
    teachers, students = [], []
    for root in roots:
        teacher = _teacher_record(root)
        if teacher is not None:
            teachers.append(teacher)
        for path in sorted((root / "student").glob("*/result.json")):
            rec = _student_record(path, root, teacher)
            if rec["miou"] is not None:
                students.append(rec)
    return teachers, students


# ---------------------------------------------------------------------------------------------
# statistics and formatting


def _fmt(stat: Stat | None) -> str:
    return stat.fmt() if stat is not None else "–"


def _delta(stat: Stat | None, base: Stat | None) -> str:
    if stat is None or base is None:
        return ""
    return f"{stat.mean - base.mean:+.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def method_label(method: str, mode: str = CACHED) -> str:
    if method == "none":
        return "Student"
    names = " + ".join(DISPLAY.get(m, m) for m in method.split("+"))
    suffix = {ONLINE: " (online)", FRESH: " (online, fresh augmentation)"}.get(mode, "")
    return f"S + {names}{suffix}"


def _points_label(points: Sequence[str]) -> str:
    return "+".join(points)


def _method_sort_key(method: str, mode: str):
    parts = method.split("+")
    first = METHOD_ORDER.index(parts[0]) if parts[0] in METHOD_ORDER else len(METHOD_ORDER)
    return (len(parts) > 1, first, method, MODES.index(mode) if mode in MODES else len(MODES))


# ---------------------------------------------------------------------------------------------
# selecting runs


@dataclass(frozen=True)
class Reference:
    model: str
    alpha: float
    norm: str
    points: tuple[str, ...]
    K: int
    teacher_mode: str

    @classmethod
    def of(cls, cfg: Config) -> "Reference":
        s = cfg.student
        return cls(s.model.name, float(s.alpha), s.norm, tuple(s.points), int(cfg.cache.K), cfg.teacher.cbam_mode)


def _uses(method: str) -> set[str]:
    out: set[str] = set()
    for m in method.split("+"):
        out |= USES.get(m, {"points", "norm"})
    return out


def _matches(r: dict, ref: Reference, *, vary: str = "", method_aware: bool = False) -> bool:
    """Run ``r`` is at the reference in every factor but ``vary`` (``method_aware``: only in the factors
    its method depends on; K only for cached runs)."""
    uses = _uses(r["method"]) if method_aware else {"points", "norm"}
    if r["model"] != ref.model:
        return False
    if vary != "norm" and "norm" in uses and r["norm"] != ref.norm:
        return False
    if vary != "points" and "points" in uses and tuple(r["points"]) != ref.points:
        return False
    if vary != "K" and r["mode"] == CACHED and r["K"] is not None and r["K"] != ref.K:
        return False
    if vary != "teacher_mode" and r["teacher_mode"] is not None and r["teacher_mode"] != ref.teacher_mode:
        return False
    return True


def _baseline(students: list[dict], ref: Reference) -> list[dict]:
    """Plain-student runs (α = 0) of the reference model on the cached crops, at the reference K when
    there are such runs."""
    base = [r for r in students if r["method"] == "none" and r["model"] == ref.model and r["mode"] != FRESH]
    at_k = [r for r in base if r["K"] == ref.K]
    return at_k or base


def _teacher_at_ref(teachers: list[dict], cfg: Config) -> dict | None:
    root = str(cfg.run_root)
    for t in teachers:
        if t["root"] == root:
            return t
    return None


# ---------------------------------------------------------------------------------------------
# paired differences

PAIRED_NOTE = (f"Paired Δ: the mean of the per-seed differences over the seeds both rows share (seed s of every "
               f"row has the same initialisation, data order and cached crops), with its {LEVEL} Student-t "
               f"interval and n; an interval that excludes 0 resolves the difference. Δ (means): the difference of "
               f"the unpaired means.")
# what each evaluation protocol name means, for the reports' header
PROTOCOLS = {CENTER_CROP: "short side resized to the crop size, then the centre crop",
             "reference": "short side of the whole image resized to the crop size, aspect kept",
             "whole": "original resolution, sliding window when larger than eval.window"}


def evaluation_line(dataset: str | None, protocols: Sequence[str], crop: Sequence[int] | None = None) -> str:
    """The sentence naming the dataset and the evaluation protocol(s) of a table's runs."""
    size = f" ({crop[0]}×{crop[1]})" if crop else ""
    named = "; ".join(f"`{p}`" + (f": {PROTOCOLS[p].replace('crop size', 'crop size' + size)}" if p in PROTOCOLS
                                  else "") for p in protocols) or "–"
    return (f"Dataset `{dataset or '–'}`; evaluation protocol {named}. mIoU / pixel accuracy: final-epoch validation "
            f"of each run, mean ± sample std over seeds (n runs per row).")


def _seeds(runs: Sequence[dict]) -> dict[int, float]:
    return seed_values((r.get("seed"), r["miou"]) for r in runs)


def _paired(runs: Sequence[dict], ref_runs: Sequence[dict]) -> Difference | None:
    return paired(_seeds(runs), _seeds(ref_runs)) if runs and ref_runs else None


def _pair_cell(runs: Sequence[dict], ref_runs: Sequence[dict] | None, *, is_ref: bool = False) -> str:
    """The paired-Δ cell: ``+0.20 [-0.28, +0.68] (n = 3)``, "reference", "no shared seeds", or "" (no reference)."""
    if is_ref:
        return "reference"
    if not ref_runs or not runs:
        return ""
    d = _paired(runs, ref_runs)
    return d.fmt() if d is not None else "no shared seeds"


def _pair_dict(runs: Sequence[dict], ref_runs: Sequence[dict] | None) -> dict | None:
    d = _paired(runs, ref_runs) if ref_runs else None
    return d.as_dict() if d is not None else None


def _row_data(runs: Sequence[dict]) -> dict:
    """report.json's figures of one row: the summary and the per-seed values (so differences can be re-paired)."""
    return {"miou": _stat_dict(Stat.of([r["miou"] for r in runs])), "seeds": {str(k): v for k, v in _seeds(runs).items()}}


def _stat_dict(s: Stat | None) -> dict | None:
    return None if s is None else s.as_dict()


# ---------------------------------------------------------------------------------------------
# the tables


def _main_rows(teachers: list[dict], students: list[dict], cfg: Config, base: list[dict]) -> list[dict]:
    """Teacher, student, then one row per (method, mode) at the reference (its own α when it has no run there)."""
    ref = Reference.of(cfg)
    rows: list[dict] = []
    teacher = _teacher_at_ref(teachers, cfg)
    if teacher is not None:
        rows.append({"label": f"Teacher ({teacher['model']}, {teacher['cbam_mode']} CBAM)", "method": "teacher",
                     "alpha": None, "mode": "", "runs": [teacher]})
    if base:
        rows.append({"label": f"Student ({ref.model})", "method": "none", "alpha": 0.0, "mode": "", "runs": base})
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in students:
        if r["method"] != "none" and _matches(r, ref, method_aware=True):
            groups[(r["method"], r["mode"])].append(r)
    for (method, mode) in sorted(groups, key=lambda k: _method_sort_key(*k)):
        by_alpha: dict[float, list[dict]] = defaultdict(list)
        for r in groups[(method, mode)]:
            by_alpha[r["alpha"]].append(r)
        if ref.alpha in by_alpha:
            alpha = ref.alpha
        else:  # the α with the most seeds (then the best mean)
            alpha = max(by_alpha, key=lambda a: (len(by_alpha[a]), Stat.of([r["miou"] for r in by_alpha[a]]).mean))
        rows.append({"label": method_label(method, mode), "method": method, "alpha": alpha, "mode": mode,
                     "runs": by_alpha[alpha]})
    return rows


def main_table(teachers: list[dict], students: list[dict], cfg: Config) -> tuple[str, list[dict]]:
    base = _baseline(students, Reference.of(cfg))
    base_m, base_a = Stat.of([r["miou"] for r in base]), Stat.of([r["pixel_acc"] for r in base])
    out_rows, table = [], []
    for row in _main_rows(teachers, students, cfg, base):
        m = Stat.of([r["miou"] for r in row["runs"]])
        a = Stat.of([r["pixel_acc"] for r in row["runs"]])
        is_method = row["method"] not in ("teacher", "none")
        table.append([row["label"], "" if row["alpha"] is None else f"{row['alpha']:g}", m.n if m else 0, _fmt(m),
                      _delta(m, base_m) if is_method else "", _pair_cell(row["runs"], base) if is_method else "",
                      _fmt(a), _delta(a, base_a) if is_method else ""])
        out_rows.append({"label": row["label"], "method": row["method"], "alpha": row["alpha"], "mode": row["mode"],
                         "n": m.n if m else 0, "pixel_acc": _stat_dict(a),
                         "runs": [r.get("run", "teacher") for r in row["runs"]]} | _row_data(row["runs"])
                        | {"paired_vs_student": _pair_dict(row["runs"], base) if is_method else None})
    if not table:
        return NO_RUNS, []
    md = _table(["Method", "α", "n", "mIoU (%)", "Δ mIoU (means)", f"paired Δ mIoU [{LEVEL} CI] (n)",
                 "pixel acc (%)", "Δ acc"], table)
    return md, out_rows


def resolved_line(rows: Sequence[dict]) -> str:
    """One sentence: which methods' paired Δ over the student is resolved (interval excludes 0), which not."""
    yes, no, single = [], [], []
    for r in rows:
        d = r.get("paired_vs_student")
        if d is not None:
            if d["lo"] is None:
                single.append(r["label"])
            else:
                (yes if d["lo"] > 0 or d["hi"] < 0 else no).append(r["label"])
    if not (yes or no or single):
        return ""
    parts = [f"resolved ({LEVEL} interval of the paired Δ vs the student excludes 0): " + (", ".join(yes) or "none")]
    parts += ["not resolved: " + ", ".join(no)] if no else []
    parts += ["one shared seed, no interval: " + ", ".join(single)] if single else []
    return "Differences " + "; ".join(parts) + "."


def _study(students: list[dict], ref: Reference, vary: str, key, order: Sequence | None = None, *,
           mode: str = CACHED) -> list[tuple[Any, list[dict]]]:
    """AttnFD runs at the reference except for ``vary``, grouped by ``key(run)``."""
    groups: dict[Any, list[dict]] = defaultdict(list)
    for r in students:
        if r["method"] != "attnfd" or r["mode"] != mode or not _matches(r, ref, vary=vary):
            continue
        if vary != "alpha" and r["alpha"] != ref.alpha:
            continue
        groups[key(r)].append(r)
    keys = sorted(groups, key=lambda k: (order.index(k) if order is not None and k in order else len(order or ()), k))
    return [(k, groups[k]) for k in keys]


def reference_attnfd(students: list[dict], ref: Reference) -> list[dict]:
    """AttnFD (cached) at the reference setting: the row every ablation is paired with."""
    return [r for r in students if r["method"] == "attnfd" and r["mode"] == CACHED and r["alpha"] == ref.alpha
            and _matches(r, ref)]


def alpha_study(students, ref, base_m, ref_runs: Sequence[dict] = ()) -> tuple[str, list[dict], dict]:
    by_mode = {mode: _study(students, ref, "alpha", lambda r: r["alpha"], mode=mode) for mode in MODES}
    if not any(by_mode.values()):
        return NO_RUNS, [], {}
    rows, data = [], []
    if base_m is not None:
        rows.append(["0 (student)", "", base_m.n, base_m.fmt(), "", ""])
    for mode, groups in by_mode.items():
        for alpha, runs in groups:
            m = Stat.of([r["miou"] for r in runs])
            is_ref = mode == CACHED and alpha == ref.alpha
            rows.append([f"{alpha:g}", mode, m.n, m.fmt(), _delta(m, base_m), _pair_cell(runs, ref_runs, is_ref=is_ref)])
            data.append({"alpha": alpha, "mode": mode} | _row_data(runs)
                        | {"paired_vs_reference": None if is_ref else _pair_dict(runs, ref_runs)})
    md = _table(["α", "mode", "n", "mIoU (%)", "Δ vs student (means)",
                 f"paired Δ vs AttnFD at α = {ref.alpha:g} [{LEVEL} CI] (n)"], rows)
    return md, data, by_mode


FRESH_LABEL = "online (fresh augmentation)"


def k_study(students, ref, base_by_k: dict[Any, list[dict]]) -> tuple[str, list[dict], dict]:
    """AttnFD at each cached K (and the student at that K), then the online references: ``online``
    (teacher online on the replayed crops) and ``online (fresh augmentation)`` — a new crop every epoch,
    what the K cached seeds approximate — beside the plain student on fresh crops (``base_by_k[FRESH]``),
    so each row's Δ compares distillation with the student of the same augmentation regime."""
    cached = _study(students, ref, "K", lambda r: r["K"])
    online = _study(students, ref, "K", lambda r: ONLINE, mode=ONLINE)
    fresh = _study(students, ref, "K", lambda r: FRESH, mode=FRESH)
    if not cached and not online and not fresh:
        return NO_RUNS, [], {}
    fresh_runs = [r for _, runs in fresh for r in runs]
    fresh_m = Stat.of([r["miou"] for r in fresh_runs])
    rows, data = [], []
    for k, runs in cached:
        m, b_runs = Stat.of([r["miou"] for r in runs]), base_by_k.get(k, [])
        b = Stat.of([r["miou"] for r in b_runs])
        rows.append([k, m.n, m.fmt(), _fmt(b), _delta(m, b), _pair_cell(runs, b_runs)]
                    + ([_delta(m, fresh_m), _pair_cell(runs, fresh_runs)] if fresh else []))
        data.append({"K": k, "student": _stat_dict(b)} | _row_data(runs) | {"paired_vs_student": _pair_dict(runs, b_runs)}
                    | ({"vs_fresh": m.mean - fresh_m.mean, "paired_vs_fresh": _pair_dict(runs, fresh_runs)}
                       if fresh else {}))
    for label, key, groups in (("online", ONLINE, online), (FRESH_LABEL, FRESH, fresh)):
        for _, runs in groups:
            m = Stat.of([r["miou"] for r in runs])
            b_runs = base_by_k.get(ref.K if key == ONLINE else key, [])  # online replays the reference K's crops
            b = Stat.of([r["miou"] for r in b_runs])
            rows.append([label, m.n, m.fmt(), _fmt(b), _delta(m, b), _pair_cell(runs, b_runs)] + (["", ""] if fresh else []))
            data.append({"K": key} | _row_data(runs) | ({"student": _stat_dict(b)} if b is not None else {})
                        | {"paired_vs_student": _pair_dict(runs, b_runs)})
    header = ["K (cached seeds)", "n", "AttnFD mIoU (%)", "student (α = 0) on the same crops", "Δ (means)",
              f"paired Δ vs that student [{LEVEL} CI] (n)"]
    md = _table(header + (["Δ vs online (fresh, means)", "paired Δ vs online (fresh)"] if fresh else []), rows)
    if fresh:
        md += ("\n\n`online`: the teacher computes the targets every step on the replayed cached crops (equal to "
               "cached at that K up to float16); `online (fresh augmentation)`: a new augmentation every epoch "
               "(`student.targets = \"online-fresh\"`), the reference the K cached seeds approximate.")
    return md, data, {CACHED: cached, ONLINE: online, FRESH: fresh}


def simple_study(students, ref, base_m, vary: str, key, order, header: str,
                 ref_runs: Sequence[dict] = ()) -> tuple[str, list[dict]]:
    groups = _study(students, ref, vary, key, order)
    if not groups:
        return NO_RUNS, []
    ref_key = {"points": tuple(ref.points), "norm": ref.norm}[vary]
    rows, data = [], []
    for k, runs in groups:
        m = Stat.of([r["miou"] for r in runs])
        label = _points_label(k) if vary == "points" else k
        rows.append([label, m.n, m.fmt(), _delta(m, base_m), _pair_cell(runs, ref_runs, is_ref=k == ref_key)])
        data.append({vary: label} | _row_data(runs)
                    | {"paired_vs_reference": None if k == ref_key else _pair_dict(runs, ref_runs)})
    return _table([header, "n", "AttnFD mIoU (%)", "Δ vs student (means)",
                   f"paired Δ vs the reference [{LEVEL} CI] (n)"], rows), data


def cbam_study(students, teachers, ref, base_m, ref_runs: Sequence[dict] = ()) -> tuple[str, list[dict]]:
    groups = _study(students, ref, "teacher_mode", lambda r: r["teacher_mode"], CBAM_MODES)
    if not groups:
        return NO_RUNS, []
    teacher_by_mode: dict[str, list[dict]] = defaultdict(list)
    for t in teachers:
        teacher_by_mode[t["cbam_mode"]].append(t)
    rows, data = [], []
    for mode, runs in groups:
        m = Stat.of([r["miou"] for r in runs])
        t = Stat.of([x["miou"] for x in teacher_by_mode.get(mode, [])])
        is_ref = mode == ref.teacher_mode
        rows.append([mode, _fmt(t), m.n, m.fmt(), _delta(m, base_m), _pair_cell(runs, ref_runs, is_ref=is_ref)])
        data.append({"teacher_cbam_mode": mode, "teacher_miou": _stat_dict(t)} | _row_data(runs)
                    | {"paired_vs_reference": None if is_ref else _pair_dict(runs, ref_runs)})
    return _table(["teacher CBAM mode", "teacher mIoU (%)", "n", "AttnFD mIoU (%)", "Δ vs student (means)",
                   f"paired Δ vs `{ref.teacher_mode}` [{LEVEL} CI] (n)"], rows), data


def _per_class(runs: list[dict]) -> tuple[np.ndarray | None, list[str] | None]:
    arrs = [np.array([np.nan if v is None else v for v in r["per_class_iou"]], dtype=np.float64)
            for r in runs if r.get("per_class_iou")]
    if not arrs or len({a.size for a in arrs}) != 1:
        return None, None
    names = next((r["class_names"] for r in runs if r.get("class_names")), None)
    with warnings.catch_warnings():  # a class absent from every run stays nan
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(np.stack(arrs), axis=0) * 100
    return mean, names


# ---------------------------------------------------------------------------------------------
# the report


def _crop_baselines(students: list[dict], ref: Reference) -> dict[Any, list[dict]]:
    """The plain student per crop regime: each cached K, and FRESH (a new crop every epoch: online-fresh's
    baseline)."""
    crops: dict[Any, list[dict]] = defaultdict(list)
    for r in students:
        if r["method"] == "none" and r["model"] == ref.model and (r["mode"] == FRESH or r["K"] is not None):
            crops[FRESH if r["mode"] == FRESH else r["K"]].append(r)
    return dict(crops)


def _header(cfg: Config, ref: Reference, teachers: list[dict], students: list[dict]) -> list[str]:
    # the order, dataset and protocol the runs followed (from their results), not the config's: a root may
    # hold older runs
    orders = ", ".join(f"`{o}`" for o in sorted({r["seed_order"] for r in students if r["seed_order"]})) or "–"
    datasets = sorted({r["dataset"] for r in students if r["dataset"]}) or [cfg.data.dataset]
    protocols = sorted({r["eval_protocol"] for r in students}) or [CENTER_CROP]
    return [f"# {cfg.name}: distillation results", "",
            f"{len(students)} student runs, {len(teachers)} teacher(s). Reference setting: student "
            f"`{ref.model}`, α = {ref.alpha:g}, norm `{ref.norm}`, points {_points_label(ref.points)}, K = {ref.K}, "
            f"teacher CBAM `{ref.teacher_mode}`, cached seed order {orders}.", "",
            evaluation_line(", ".join(datasets), protocols, cfg.augment.crop_size) + " " + PAIRED_NOTE, ""]


def build_report(cfg: Config, out_dir: str | Path, *, extra_roots: Iterable[str | Path] = ()) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and the figures into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teachers, students = collect_runs(cfg, extra_roots)
    ref = Reference.of(cfg)
    base = _baseline(students, ref)
    base_m = Stat.of([r["miou"] for r in base])
    ref_runs = reference_attnfd(students, ref)
    teacher = _teacher_at_ref(teachers, cfg)
    files: dict[str, Path] = {}
    data: dict[str, Any] = {"reference": ref.__dict__ | {"points": list(ref.points)}, "runs": len(students)}
    md = _header(cfg, ref, teachers, students)

    table, rows = main_table(teachers, students, cfg)
    data["main"] = rows
    md += ["## Methods", "", table, ""]
    line = resolved_line(rows)
    md += [line, ""] if line else []
    if "+" in "".join(r["method"] for r in rows if r["method"] not in ("teacher", "none")):
        md += ["(A method joined with `+` is a combination; each term is weighted by `student.<method>.weight` × its "
               "α: `student.<method>.alpha`, or `student.alpha` when unset.)", ""]

    table, data["alpha"], groups = alpha_study(students, ref, base_m, ref_runs)
    md += ["## α sweep (AttnFD)", "", table, ""] + _alpha_figure(out_dir, groups, base_m, teacher, files)
    table, data["K"], groups = k_study(students, ref, _crop_baselines(students, ref))
    md += ["## Cached augmentation seeds K vs online distillation", "", table, ""]
    md += _k_figure(out_dir, groups, _crop_baselines(students, ref), teacher, files)

    table, data["points"] = simple_study(students, ref, base_m, "points", lambda r: tuple(r["points"]),
                                         [("B",), ("E",), ("D",), ("B", "E"), ("B", "D"), ("E", "D"), ("B", "E", "D")],
                                         "points", ref_runs)
    md += ["## Distillation points (paper Table 5)", "", table, ""]
    table, data["norm"] = simple_study(students, ref, base_m, "norm", lambda r: r["norm"], NORM_ORDER, "norm", ref_runs)
    md += ["## Normalisation of L_Attn", "", table, ""]
    table, data["teacher_cbam_mode"] = cbam_study(students, teachers, ref, base_m, ref_runs)
    md += ["## Teacher CBAM mode", "", table, ""]
    md += _per_class_section(out_dir, data, students, base, files)
    md += _curves_section(students, ref, base, out_dir, files)

    files["report"] = atomic_write_text(out_dir / "report.md", "\n".join(md).rstrip() + "\n")
    files["json"] = atomic_write_json(out_dir / "report.json", data)
    return files


def _alpha_figure(out_dir: Path, groups: dict, base_m: Stat | None, teacher: dict | None,
                  files: dict[str, Path]) -> list[str]:
    """alpha_sweep.png (mean ± std per α and mode) into ``files``; the Markdown line that shows it."""
    from attnfd_pipeline.experiments import plotting

    if not groups:
        return []
    series = []
    for mode, color in ((CACHED, plotting.cycle_color(0)), (ONLINE, plotting.cycle_color(1)), (FRESH, plotting.cycle_color(2))):
        g = [(a, runs) for a, runs in groups[mode] if a > 0]
        if g:
            stats = [Stat.of([r["miou"] for r in runs]) for _, runs in g]
            series.append(plotting.Series(f"AttnFD ({mode})", [a for a, _ in g], [s.mean for s in stats],
                                          [s.std if s.std is not None else float("nan") for s in stats], color))
    if not series:
        return []
    files["alpha_sweep"] = plotting.line_plot(
        out_dir / "alpha_sweep.png", series, title="mIoU vs alpha (AttnFD)", xlabel="alpha (log scale)",
        ylabel="val mIoU (%)", logx=True, hlines=_reference_lines(base_m, teacher))
    return ["![mIoU vs α](alpha_sweep.png)", ""]


def _k_figure(out_dir: Path, groups: dict, crops: dict[Any, list[dict]], teacher: dict | None,
              files: dict[str, Path]) -> list[str]:
    """k_study.png (AttnFD and the student per K, the online references as lines) into ``files``."""
    from attnfd_pipeline.experiments import plotting

    if not groups or not groups[CACHED]:
        return []
    base_by_k = {k: Stat.of([r["miou"] for r in runs]) for k, runs in crops.items()}
    ks = [k for k, _ in groups[CACHED]]
    stats = [Stat.of([r["miou"] for r in runs]) for _, runs in groups[CACHED]]
    series = [plotting.Series("AttnFD (cached)", ks, [s.mean for s in stats],
                              [s.std if s.std is not None else float("nan") for s in stats])]
    bk = [(k, base_by_k[k]) for k in ks if base_by_k.get(k) is not None]
    if bk:
        series.append(plotting.Series("student (alpha = 0)", [k for k, _ in bk], [s.mean for _, s in bk],
                                      [s.std if s.std is not None else float("nan") for _, s in bk],
                                      plotting.cycle_color(7)))
    hlines = []
    for _, runs in groups[ONLINE]:
        hlines.append(plotting.HLine("AttnFD (online)", Stat.of([r["miou"] for r in runs]).mean, plotting.cycle_color(1)))
    for _, runs in groups[FRESH]:
        hlines.append(plotting.HLine("AttnFD (online, fresh aug.)", Stat.of([r["miou"] for r in runs]).mean,
                                     plotting.cycle_color(2)))
    if base_by_k.get(FRESH) is not None:
        hlines.append(plotting.HLine("student (fresh aug.)", base_by_k[FRESH].mean, plotting.cycle_color(7)))
    if teacher is not None and teacher["miou"] is not None:
        hlines.append(plotting.HLine("teacher", teacher["miou"] * 100, plotting.cycle_color(3), dashed=False))
    files["k_study"] = plotting.line_plot(out_dir / "k_study.png", series, title="mIoU vs cached seeds K",
                                          xlabel="K (log scale)", ylabel="val mIoU (%)", logx=True,
                                          hlines=hlines, xticks=ks)
    return ["![mIoU vs K](k_study.png)", ""]


def _per_class_section(out_dir: Path, data: dict, students: list[dict], base: list[dict],
                       files: dict[str, Path]) -> list[str]:
    """Per-class IoU of the best method vs the student (table, figure); sets ``data["per_class"]``."""
    from attnfd_pipeline.experiments import plotting

    md = ["## Per-class IoU: best method vs student (paper Fig. 7)", ""]
    methods = [r for r in data["main"] if r["method"] not in ("teacher", "none") and r["miou"]]
    # a single run is one draw of a training whose seed std is about a point: when some method has seeds to
    # average, the best is chosen among those (else a lucky run would stand for its method)
    repeated = [r for r in methods if r["n"] >= 2]
    best = max(repeated or methods, key=lambda r: r["miou"]["mean"]) if methods else None
    by_run = {r["run"]: r for r in students}
    student_pc, names = _per_class(base)
    best_pc, best_names = _per_class([by_run[n] for n in best["runs"] if n in by_run]) if best else (None, None)
    if best is None or student_pc is None or best_pc is None or student_pc.size != best_pc.size:
        data["per_class"] = None
        return md + [NO_RUNS + " (needs student runs and at least one method with per-class IoU)", ""]
    names = names or best_names or [f"class {i}" for i in range(student_pc.size)]
    rows = [[n, _num(a), _num(b), f"{b - a:+.2f}" if np.isfinite(a) and np.isfinite(b) else "–"]
            for n, a, b in zip(names, student_pc, best_pc)]
    among = " among the methods with 2 or more seeds" if repeated else ""
    md += [f"Best method{among}: **{best['label']}** (α = {best['alpha']:g}, n = {best['n']}); "
           f"student n = {len(base)}.", "",
           _table(["class", "student IoU (%)", f"{best['label']} IoU (%)", "Δ"], rows), ""]
    files["per_class_iou"] = plotting.barh_plot(
        out_dir / "per_class_iou.png", list(names),
        [("student", [float(v) for v in student_pc]), (best["label"], [float(v) for v in best_pc])],
        title="Per-class IoU", xlabel="IoU (%)", x_max=100.0)
    data["per_class"] = {"classes": list(names), "student": [_nan_none(v) for v in student_pc],
                         "best": best["label"], "best_values": [_nan_none(v) for v in best_pc]}
    return md + ["![per-class IoU](per_class_iou.png)", ""]


CURVE_SEEDS = 3  # runs per side in the report's curves: more lines than that hide each other


def _curves_section(students: list[dict], ref: Reference, base: list[dict], out_dir: Path,
                    files: dict[str, Path]) -> list[str]:
    """Training curves of the plain student and AttnFD at the reference setting (the first seeds of each),
    drawn into ``out_dir/curves``; ``attnfd curves`` draws any other selection."""
    from attnfd_pipeline.experiments.curves import draw_runs, load_run

    attnfd = [r for r in students if r["method"] == "attnfd" and r["mode"] == CACHED and r["alpha"] == ref.alpha
              and _matches(r, ref)]
    picked = [r for group in (base, attnfd) for r in sorted(group, key=lambda r: r["seed"] or 0)[:CURVE_SEEDS]]
    paths = [Path(r["root"]) / "student" / r["run"] for r in picked]
    paths = [p for p in paths if (p / "metrics.parquet").is_file()]
    if not paths:
        return []
    drawn = draw_runs([load_run(p) for p in paths], out_dir / "curves")
    files.update({f"curves_{p.stem}": p for p in drawn})
    links = ", ".join(f"[{p.stem}](curves/{p.name})" for p in drawn[1:])
    return ["## Training curves", "",
            f"Plain student vs AttnFD at the reference setting ({len(paths)} runs; per-step curves for runs "
            f"with `steps.parquet`). `attnfd curves --runs GLOB` draws any other runs.", "",
            "![training curves](curves/overview.png)", "", f"Every quantity: {links}.", ""]


def _reference_lines(base_m: Stat | None, teacher: dict | None) -> list:
    from attnfd_pipeline.experiments import plotting

    lines = []
    if base_m is not None:
        lines.append(plotting.HLine("student (alpha = 0)", base_m.mean))
    if teacher is not None and teacher["miou"] is not None:
        lines.append(plotting.HLine("teacher", teacher["miou"] * 100, plotting.cycle_color(3), dashed=False))
    return lines


def _num(v: float) -> str:
    return f"{v:.2f}" if np.isfinite(v) else "–"


def _nan_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None

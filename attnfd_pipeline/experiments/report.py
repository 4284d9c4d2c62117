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
over seeds (shown when n > 1). Every compared row also gets its paired difference with its reference row
(``experiments.stats.paired``; docs/statistics.md says which row is paired with which, and how).

A run's mode is ``cached``, ``online`` (teacher online on the replayed cached crops: equal to cached up to
float16) or ``online-fresh`` (``student.targets = "online-fresh"``: a fresh augmentation every epoch, result.json
``"augment": "fresh"``) — the "online (fresh augmentation)" reference of the K study. Results without
``augment`` (older runs) replayed the cached seeds.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from attnfd_pipeline.config import Config, ConfigError, TargetSource
from attnfd_pipeline.experiments import plotting
from attnfd_pipeline.experiments.stats import LEVEL, Difference, Stat
from attnfd_pipeline.experiments.table import (Row, cell, markdown, number, paired_header, resolved_sentence, signed,
                                               stat_dict)
from attnfd_pipeline.losses import get_method, list_methods, method_label
from attnfd_pipeline.records import CENTER_CROP, read_record
from attnfd_pipeline.runs import run_variant, variant_tag
from attnfd_pipeline.utils import atomic_write_json, atomic_write_text

# the run settings a method's result depends on (the others are ignored when matching the reference), as each
# method declares them (``DistillMethod.uses``)
METHOD_ORDER = [*(n for n in list_methods() if n != "attnfd"), "attnfd"]  # paper table order: rivals, then AttnFD
USES = {n: set(get_method(n).uses) for n in list_methods()}
CBAM_MODES = ("inpath", "fitted", "parameter_free", "untrained")
NORM_ORDER = ("batch", "sample", "channel")
NO_RUNS = "no runs"
# the run tags of the three target sources (``TargetSource.tag``), as run names and result rows carry them
CACHED, ONLINE, FRESH = (t.tag for t in TargetSource)
MODES = (CACHED, ONLINE, FRESH)


def _group(runs: Iterable[dict], key: Callable[[dict], Any]) -> dict[Any, list[dict]]:
    """The runs by ``key(run)``, in the order of their first run."""
    groups: dict[Any, list[dict]] = defaultdict(list)
    for r in runs:
        groups[key(r)].append(r)
    return groups


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
        "dataset": rec.dataset, "eval_protocol": rec.eval_protocol, "variant": variant_tag(rec.run),
    }


def collect_runs(cfg: Config, extra_roots: Iterable[str | Path] = ()) -> tuple[list[dict], list[dict]]:
    """(teachers, students) of ``cfg.run_root`` and of every extra run root (a run folder such as
    ``runs/demo_fitted``). Runs without a final mIoU (unfinished) are left out."""
    roots: dict[Path, Path] = {}  # by resolved path: the first spelling of a root is the one kept
    for root in [cfg.run_root, *map(Path, extra_roots)]:
        roots.setdefault(Path(root).resolve(), Path(root))
    teachers, students = [], []
    for root in roots.values():
        teacher = _teacher_record(root)
        if teacher is not None:
            teachers.append(teacher)
        for path in sorted((root / "student").glob("*/result.json")):
            rec = _student_record(path, root, teacher)
            if rec["miou"] is not None:
                students.append(rec)
    return teachers, students


# ---------------------------------------------------------------------------------------------
# labels


def row_label(method: str, mode: str = CACHED) -> str:
    """``S + AttnFD + KD (online)``: a (possibly combined) method's row, by each method's display name."""
    if method == "none":
        return "Student"
    names = " + ".join(method_label(m) for m in method.split("+"))
    suffix = {ONLINE: " (online)", FRESH: " (online, fresh augmentation)"}.get(mode, "")
    return f"S + {names}{suffix}"


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
    cfg: Config | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, cfg: Config) -> "Reference":
        s = cfg.student
        return cls(s.model.name, float(s.alpha), s.norm, tuple(s.points), int(cfg.cache.K), cfg.teacher.cbam_mode,
                   cfg)

    def as_dict(self) -> dict:
        return {k: list(v) if k == "points" else v for k, v in self.__dict__.items() if k != "cfg"}

    def variant(self, method: str, alpha: float, mode: str) -> str | None:
        """The variant (``runs.run_variant``: method settings, storage, recipe switches) a run of ``method`` at
        ``alpha`` and ``mode`` has under the reference config; None when the config cannot name one."""
        if self.cfg is None or mode not in MODES:
            return None
        s = self.cfg.student
        try:
            student = dataclasses.replace(s, method=s.method if method == "none" else method, alpha=float(alpha),
                                          targets=next(t for t in TargetSource if t.tag == mode))
        except (ConfigError, ValueError):
            return None
        return run_variant(dataclasses.replace(self.cfg, student=student))


def _one_variant(runs: list[dict], own: str | None) -> list[dict]:
    """The runs of one variant: the reference config's own when it has runs, else the variant with the most
    runs. Runs that trained differently (another recipe switch, method setting or storage) are never pooled
    into one row."""
    by = _group(runs, lambda r: r["variant"])
    return by[own] if own in by else max(by.values(), key=len, default=[])


def _uses(method: str) -> set[str]:
    return set().union(*(USES.get(m, {"points", "norm"}) for m in method.split("+")))


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
    return _one_variant(at_k or base, ref.variant("none", 0.0, CACHED))


def _teacher_at_ref(teachers: list[dict], cfg: Config) -> dict | None:
    return next((t for t in teachers if t["root"] == str(cfg.run_root)), None)


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
    groups = _group((r for r in students if r["method"] != "none" and _matches(r, ref, method_aware=True)),
                    lambda r: (r["method"], r["mode"]))
    for (method, mode) in sorted(groups, key=lambda k: _method_sort_key(*k)):
        by_alpha = _group(groups[(method, mode)], lambda r: r["alpha"])
        if ref.alpha in by_alpha:
            alpha = ref.alpha
        else:  # the α with the most seeds (then the best mean)
            alpha = max(by_alpha, key=lambda a: (len(by_alpha[a]), Row.of("", by_alpha[a]).miou.mean))
        rows.append({"label": row_label(method, mode), "method": method, "alpha": alpha, "mode": mode,
                     "runs": _one_variant(by_alpha[alpha], ref.variant(method, alpha, mode))})
    return rows


def main_table(teachers: list[dict], students: list[dict], cfg: Config) -> tuple[str, list[dict]]:
    base = Row.of("student", _baseline(students, Reference.of(cfg)))
    out_rows, cells = [], []
    for spec in _main_rows(teachers, students, cfg, base.runs):
        row, is_method = Row.of(spec["label"], spec["runs"]), spec["method"] not in ("teacher", "none")
        cells.append([row.label, "" if spec["alpha"] is None else f"{spec['alpha']:g}", row.n, cell(row.miou),
                      row.delta(base) if is_method else "", row.pair_cell(base) if is_method else "",
                      cell(row.pixel_acc), row.delta(base, "pixel_acc") if is_method else ""])
        out_rows.append({k: spec[k] for k in ("label", "method", "alpha", "mode")}
                        | {"n": row.n, "pixel_acc": stat_dict(row.pixel_acc),
                           "runs": [r.get("run", "teacher") for r in row.runs]} | row.data()
                        | {"paired_vs_student": row.pair_dict(base) if is_method else None})
    if not cells:
        return NO_RUNS, []
    md = markdown(["Method", "α", "n", "mIoU (%)", "Δ mIoU (means)", f"paired Δ mIoU [{LEVEL} CI] (n)",
                   "pixel acc (%)", "Δ acc"], cells)
    return md, out_rows


def resolved_line(rows: Sequence[dict]) -> str:
    """One sentence: which methods' paired Δ over the student is resolved (interval excludes 0), which not."""
    return resolved_sentence([(r["label"], _difference(r.get("paired_vs_student"))) for r in rows])


def _difference(d: dict | None) -> Difference | None:
    return None if d is None else Difference(**{k: tuple(v) if k == "seeds" else v for k, v in d.items()})


def _study(students: list[dict], ref: Reference, vary: str, key, order: Sequence | None = None, *,
           mode: str = CACHED) -> list[tuple[Any, list[dict]]]:
    """AttnFD runs at the reference except for ``vary``, grouped by ``key(run)``."""
    groups = _group((r for r in students if r["method"] == "attnfd" and r["mode"] == mode
                     and _matches(r, ref, vary=vary) and (vary == "alpha" or r["alpha"] == ref.alpha)), key)
    keys = sorted(groups, key=lambda k: (order.index(k) if order is not None and k in order else len(order or ()), k))
    return [(k, _one_variant(groups[k], ref.variant("attnfd", groups[k][0]["alpha"], mode))) for k in keys]


def reference_attnfd(students: list[dict], ref: Reference) -> list[dict]:
    """AttnFD (cached) at the reference setting: the row every ablation is paired with."""
    return _one_variant([r for r in students if r["method"] == "attnfd" and r["mode"] == CACHED
                         and r["alpha"] == ref.alpha and _matches(r, ref)], ref.variant("attnfd", ref.alpha, CACHED))


@dataclass(frozen=True)
class Ablation:
    """One study that varies a single factor of AttnFD (cached unless ``modes`` says otherwise) and pairs
    each row with AttnFD at the reference setting: its section, its first column and how runs group."""

    vary: str  # the factor: a key of the report's run rows, and of report.json
    title: str
    column: str
    key: Callable[[dict], Any]  # a run's group
    at_reference: Callable[[Reference], Any]  # the reference's group
    against: Callable[[Reference], str] = lambda ref: "the reference"
    order: Sequence | None = None
    show: Callable[[Any], str] = str  # a group's first cell (and its report.json value unless ``raw_json``)
    raw_json: bool = False
    modes: tuple[str, ...] = (CACHED,)  # more than one: a mode column
    student_row: bool = False  # a first row with the plain student
    teacher_column: bool = False  # the teachers' mIoU of the group (the teacher CBAM mode study)
    value_header: str = "AttnFD mIoU (%)"
    json_key: str = ""  # report.json's key of the section and of each row's group (default ``vary``)


ABLATIONS = (
    Ablation("alpha", "α sweep (AttnFD)", "α", lambda r: r["alpha"], lambda ref: ref.alpha,
             lambda ref: f"AttnFD at α = {ref.alpha:g}", show=lambda a: f"{a:g}", raw_json=True, modes=MODES,
             student_row=True, value_header="mIoU (%)"),
    Ablation("points", "Distillation points (paper Table 5)", "points", lambda r: tuple(r["points"]),
             lambda ref: tuple(ref.points), order=[("B",), ("E",), ("D",), ("B", "E"), ("B", "D"), ("E", "D"),
                                                  ("B", "E", "D")], show="+".join),
    Ablation("norm", "Normalisation of L_Attn", "norm", lambda r: r["norm"], lambda ref: ref.norm, order=NORM_ORDER),
    Ablation("teacher_mode", "Teacher CBAM mode", "teacher CBAM mode", lambda r: r["teacher_mode"],
             lambda ref: ref.teacher_mode, lambda ref: f"`{ref.teacher_mode}`", order=CBAM_MODES,
             teacher_column=True, json_key="teacher_cbam_mode"),
)


def ablation_table(study: Ablation, students, teachers, ref: Reference, base: Row,
                   ref_runs: Sequence[dict] = ()) -> tuple[str, list[dict], dict]:
    """A study's Markdown table, its report.json rows and its groups per mode (for the figures)."""
    by_mode = {mode: _study(students, ref, study.vary, study.key, study.order, mode=mode) for mode in study.modes}
    if not any(by_mode.values()):
        return NO_RUNS, [], {}
    reference, json_key = Row.of("reference", ref_runs), study.json_key or study.vary
    teacher_by_mode = _group(teachers, lambda t: t["cbam_mode"])
    multi = len(study.modes) > 1
    rows, data = [], []
    if study.student_row and base.miou is not None:
        rows.append(["0 (student)", *([""] if multi else []), base.n, base.miou.fmt(), "", ""])
    for mode, groups in by_mode.items():
        for k, runs in groups:
            row, is_ref = Row.of(study.show(k), runs), mode == CACHED and k == study.at_reference(ref)
            teacher = Row.of("teacher", teacher_by_mode.get(k, [])).miou if study.teacher_column else None
            rows.append([row.label, *([mode] if multi else []), *([cell(teacher)] if study.teacher_column else []),
                         row.n, cell(row.miou), row.delta(base), row.pair_cell(reference, is_ref=is_ref)])
            data.append({json_key: k if study.raw_json else row.label} | ({"mode": mode} if multi else {})
                        | ({"teacher_miou": stat_dict(teacher)} if study.teacher_column else {}) | row.data()
                        | {"paired_vs_reference": None if is_ref else row.pair_dict(reference)})
    header = [study.column, *(["mode"] if multi else []), *(["teacher mIoU (%)"] if study.teacher_column else []),
              "n", study.value_header, "Δ vs student (means)", paired_header(study.against(ref))]
    return markdown(header, rows), data, by_mode


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
    fresh_row = Row.of(FRESH_LABEL, [r for _, runs in fresh for r in runs])
    rows, data = [], []
    for k, runs in cached:
        row, b = Row.of(str(k), runs), Row.of("student", base_by_k.get(k, []))
        rows.append([k, row.n, cell(row.miou), cell(b.miou), row.delta(b), row.pair_cell(b)]
                    + ([row.delta(fresh_row), row.pair_cell(fresh_row)] if fresh else []))
        data.append({"K": k, "student": stat_dict(b.miou)} | row.data() | {"paired_vs_student": row.pair_dict(b)}
                    | ({"vs_fresh": row.miou.mean - fresh_row.miou.mean, "paired_vs_fresh": row.pair_dict(fresh_row)}
                       if fresh else {}))
    for label, key, groups in (("online", ONLINE, online), (FRESH_LABEL, FRESH, fresh)):
        for _, runs in groups:
            row = Row.of(label, runs)
            b = Row.of("student", base_by_k.get(ref.K if key == ONLINE else key, []))  # online replays ref K's crops
            rows.append([label, row.n, cell(row.miou), cell(b.miou), row.delta(b), row.pair_cell(b)]
                        + (["", ""] if fresh else []))
            data.append({"K": key} | row.data() | ({"student": stat_dict(b.miou)} if b.miou is not None else {})
                        | {"paired_vs_student": row.pair_dict(b)})
    header = ["K (cached seeds)", "n", "AttnFD mIoU (%)", "student (α = 0) on the same crops", "Δ (means)",
              paired_header("that student")]
    md = markdown(header + (["Δ vs online (fresh, means)", "paired Δ vs online (fresh)"] if fresh else []), rows)
    if fresh:
        md += ("\n\n`online`: the teacher computes the targets every step on the replayed cached crops (equal to "
               "cached at that K up to float16); `online (fresh augmentation)`: a new augmentation every epoch "
               "(`student.targets = \"online-fresh\"`), the reference the K cached seeds approximate.")
    return md, data, {CACHED: cached, ONLINE: online, FRESH: fresh}


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
    crops = _group((r for r in students if r["method"] == "none" and r["model"] == ref.model
                    and (r["mode"] == FRESH or r["K"] is not None)), lambda r: FRESH if r["mode"] == FRESH else r["K"])
    return {k: _one_variant(g, ref.variant("none", 0.0, FRESH if k == FRESH else CACHED)) for k, g in crops.items()}


def _header(cfg: Config, ref: Reference, teachers: list[dict], students: list[dict]) -> list[str]:
    # the order, dataset and protocol the runs followed (from their results), not the config's: a root may
    # hold older runs
    orders = ", ".join(f"`{o}`" for o in sorted({r["seed_order"] for r in students if r["seed_order"]})) or "–"
    datasets = sorted({r["dataset"] for r in students if r["dataset"]}) or [cfg.data.dataset]
    protocols = sorted({r["eval_protocol"] for r in students}) or [CENTER_CROP]
    return [f"# {cfg.name}: distillation results", "",
            f"{len(students)} student runs, {len(teachers)} teacher(s). Reference setting: student "
            f"`{ref.model}`, α = {ref.alpha:g}, norm `{ref.norm}`, points {'+'.join(ref.points)}, K = {ref.K}, "
            f"teacher CBAM `{ref.teacher_mode}`, cached seed order {orders}.", "",
            evaluation_line(", ".join(datasets), protocols, cfg.augment.crop_size) + " " + PAIRED_NOTE, ""]


def build_report(cfg: Config, out_dir: str | Path, *, extra_roots: Iterable[str | Path] = ()) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and the figures into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teachers, students = collect_runs(cfg, extra_roots)
    ref = Reference.of(cfg)
    base = Row.of("student", _baseline(students, ref))
    ref_runs = reference_attnfd(students, ref)
    teacher = _teacher_at_ref(teachers, cfg)
    files: dict[str, Path] = {}
    data: dict[str, Any] = {"reference": ref.as_dict(), "runs": len(students)}
    md = _header(cfg, ref, teachers, students)

    table, rows = main_table(teachers, students, cfg)
    data["main"] = rows
    md += ["## Methods", "", table, ""]
    line = resolved_line(rows)
    md += [line, ""] if line else []
    if "+" in "".join(r["method"] for r in rows if r["method"] not in ("teacher", "none")):
        md += ["(A method joined with `+` is a combination; each term is weighted by `student.<method>.weight` × its "
               "α: `student.<method>.alpha`, or `student.alpha` when unset.)", ""]

    for study in ABLATIONS:
        table, data[study.json_key or study.vary], groups = ablation_table(study, students, teachers, ref, base,
                                                                           ref_runs)
        md += [f"## {study.title}", "", table, ""]
        if study.vary == "alpha":  # the K study, with its own baseline per crop regime, follows the α sweep
            md += _alpha_figure(out_dir, groups, base.miou, teacher, files)
            crops = _crop_baselines(students, ref)
            table, data["K"], groups = k_study(students, ref, crops)
            md += ["## Cached augmentation seeds K vs online distillation", "", table, ""]
            md += _k_figure(out_dir, groups, crops, teacher, files)
    md += _per_class_section(out_dir, data, students, base.runs, files)
    md += _curves_section(students, ref, base.runs, out_dir, files)

    files["report"] = atomic_write_text(out_dir / "report.md", "\n".join(md).rstrip() + "\n")
    files["json"] = atomic_write_json(out_dir / "report.json", data)
    return files


def _series(label: str, groups: Sequence[tuple[Any, list[dict]]], color=None):
    """A figure's line: the mean ± std mIoU of each (x, runs) group."""
    stats = [Row.of(label, runs).miou for _, runs in groups]
    return plotting.Series(label, [x for x, _ in groups], [s.mean for s in stats],
                           [s.std if s.std is not None else float("nan") for s in stats], color)


def _alpha_figure(out_dir: Path, groups: dict, base_m: Stat | None, teacher: dict | None,
                  files: dict[str, Path]) -> list[str]:
    """alpha_sweep.png (mean ± std per α and mode) into ``files``; the Markdown line that shows it."""
    series = [_series(f"AttnFD ({mode})", g, plotting.cycle_color(i)) for i, mode in enumerate(MODES)
              if (g := [(a, runs) for a, runs in groups.get(mode, ()) if a > 0])]
    if not series:
        return []
    hlines = [plotting.HLine("student (alpha = 0)", base_m.mean)] if base_m is not None else []
    files["alpha_sweep"] = plotting.line_plot(
        out_dir / "alpha_sweep.png", series, title="mIoU vs alpha (AttnFD)", xlabel="alpha (log scale)",
        ylabel="val mIoU (%)", logx=True, hlines=hlines + _teacher_line(teacher))
    return ["![mIoU vs α](alpha_sweep.png)", ""]


def _k_figure(out_dir: Path, groups: dict, crops: dict[Any, list[dict]], teacher: dict | None,
              files: dict[str, Path]) -> list[str]:
    """k_study.png (AttnFD and the student per K, the online references as lines) into ``files``."""
    if not groups or not groups[CACHED]:
        return []
    ks = [k for k, _ in groups[CACHED]]
    series = [_series("AttnFD (cached)", groups[CACHED])]
    if students := [(k, crops[k]) for k in ks if crops.get(k)]:
        series.append(_series("student (alpha = 0)", students, plotting.cycle_color(7)))
    hlines = [plotting.HLine(label, Row.of(label, runs).miou.mean, plotting.cycle_color(c))
              for mode, label, c in ((ONLINE, "AttnFD (online)", 1), (FRESH, "AttnFD (online, fresh aug.)", 2))
              for _, runs in groups[mode]]
    if crops.get(FRESH):
        hlines.append(plotting.HLine("student (fresh aug.)", Row.of("", crops[FRESH]).miou.mean,
                                     plotting.cycle_color(7)))
    files["k_study"] = plotting.line_plot(out_dir / "k_study.png", series, title="mIoU vs cached seeds K",
                                          xlabel="K (log scale)", ylabel="val mIoU (%)", logx=True,
                                          hlines=hlines + _teacher_line(teacher), xticks=ks)
    return ["![mIoU vs K](k_study.png)", ""]


def _teacher_line(teacher: dict | None) -> list:
    if teacher is None or teacher["miou"] is None:
        return []
    return [plotting.HLine("teacher", teacher["miou"] * 100, plotting.cycle_color(3), dashed=False)]


def _per_class_section(out_dir: Path, data: dict, students: list[dict], base: list[dict],
                       files: dict[str, Path]) -> list[str]:
    """Per-class IoU of the best method vs the student (table, figure); sets ``data["per_class"]``."""
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
    rows = [[n, number(a), number(b), signed(b - a)]
            for n, a, b in zip(names, student_pc, best_pc)]
    among = " among the methods with 2 or more seeds" if repeated else ""
    md += [f"Best method{among}: **{best['label']}** (α = {best['alpha']:g}, n = {best['n']}); "
           f"student n = {len(base)}.", "",
           markdown(["class", "student IoU (%)", f"{best['label']} IoU (%)", "Δ"], rows), ""]
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

    picked = [r for group in (base, reference_attnfd(students, ref))
              for r in sorted(group, key=lambda r: r["seed"] or 0)[:CURVE_SEEDS]]
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


def _nan_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None

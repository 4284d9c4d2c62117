"""`attnfd bench-accuracy` / `make bench-accuracy`: what distillation buys on one config (the embedded
demo by default) — the teacher, the plain student, the student with each method, and AttnFD cached
against AttnFD online — with the bench's goals (``goals``) checked on the measured numbers.

The bench is a plan of ordinary Stage 2 runs (``plan_runs``: ``experiments.plan.PlannedRun`` rows labelled
by method) on the config's own run folder, so the demo teacher and finished runs are reused:

1. the teacher (``runs/<name>/teacher``): trained with ``run_teacher`` only when its bundle is missing;
2. one cache holding every target the methods read (``cache.extra``: ``logits``, ``raw`` as the methods'
   ``required_targets`` ask, at the config's K), built (or resumed) only when a cached run still needs it;
3. the student runs, one seed of every method first, then the remaining seeds: every row a goal compares —
   the student (α = 0), AttnFD (cached) and AttnFD online (fresh augmentation, ``student.targets``
   ``online-fresh``) — with ``seeds`` seeds (a goal on one seed would compare a mean with a single draw),
   every other registered method (``RIVALS``: KD, LAD, AICSD, Af-DCD, CIRKD, DIST) with ``extra_seeds``;
   methods use the config's α and their own config section (``student.<method>``). Finished runs are reused
   and interrupted ones resumed as ``experiments.plan`` does it (``finished_runs``, ``train_runs``).

After the teacher and after every run, ``accuracy.json`` (a list of runs: ``method``, ``seed``, ``miou``,
``pixel_acc`` as fractions, plus ``run``, ``train_seconds`` …) and ``accuracy.md`` (``format_markdown``:
per-method table with the paired difference over the student on shared seeds, the goals decided by the
statistic each names — docs/statistics.md —, the command, the times) are rewritten atomically, so a
killed bench shows what it finished and the next call goes on from there.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from attnfd_pipeline.cache import CacheError, build_cache, find_cache
from attnfd_pipeline.cache.plan import variant_name
from attnfd_pipeline.config import Config, TargetSource
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.losses import list_methods, method_label
from attnfd_pipeline.records import CENTER_CROP, RunRecord
from attnfd_pipeline.engine.logging import get_logger
from attnfd_pipeline.runs import evaluate_bundle, run_teacher
from attnfd_pipeline.experiments.plan import (PlannedRun, cache_extra, plan_job, run_config, schedule, seed_range,
                                              train_runs, with_cache_extra)
from attnfd_pipeline.experiments.report import PAIRED_NOTE, evaluation_line
from attnfd_pipeline.experiments.stats import LEVEL, Difference, equivalent, paired
from attnfd_pipeline.experiments.table import Row, cell, markdown, number, paired_header, resolved_sentence
from attnfd_pipeline.teacher import bundle_path, load_teacher, load_teacher_info
from attnfd_pipeline.utils import atomic_write_json, atomic_write_text, resolve_device
from attnfd_pipeline.errors import UserError

# the compact cache storages the bench can compare with the float16 cache (AttnFD cached, same seeds): the
# accuracy test a compact encoding must pass before it can become the default (docs/storage.md)
COMPACT = {"int8": (("encoding", "int8"),),
           "int8+poolD2": (("encoding", "int8"), ("pool", (("D", 2),)))}
COMPACT_METHODS = {name: "attnfd_" + name.replace("+", "_") for name in COMPACT}  # accuracy.json's method
# accuracy.json's method labels, in table order (rivals, AttnFD cached and online, AttnFD on compact caches)
RIVALS = tuple(m for m in list_methods() if m != "attnfd")  # every registered method: a new one joins the bench
METHODS = ("teacher", "student", *RIVALS, "attnfd", "attnfd_online", *COMPACT_METHODS.values())
LABELS = {"teacher": "Teacher", "student": "Student (α = 0)", **{m: f"S + {method_label(m)}" for m in RIVALS},
          "attnfd": "S + AttnFD (cached)", "attnfd_online": "S + AttnFD (online, fresh augmentation)",
          "attnfd_int8": "S + AttnFD (cached, int8)", "attnfd_int8_poolD2": "S + AttnFD (cached, int8 + D pooled ×2)"}
# the goals, in mIoU points
TEACHER_GAP = 5.0  # teacher − student ≥ 5
ATTNFD_GAIN = 2.0  # AttnFD (cached) − student ≥ 2: paired mean over shared seeds, interval above 0
ONLINE_GAP = 1.0  # |AttnFD cached − AttnFD online| ≤ 1: 95 % paired interval inside [−1, 1]
RESULTS_JSON, RESULTS_MD, CACHE_JSON = "accuracy.json", "accuracy.md", "accuracy_cache.json"
DEFAULT_COMMAND = "make bench-accuracy"


# ---------------------------------------------------------------------------------------------
# the plan


def plan_runs(cfg: Config, seeds: int = 3, extra_seeds: int = 1, compact: Sequence[str] = ()) -> list[PlannedRun]:
    """The student runs of the bench (the teacher is not a student run), labelled by accuracy.json's
    ``method``: the student, AttnFD (cached) and AttnFD online — the rows the goals compare — with ``seeds``
    seeds, every other method with ``extra_seeds``; seeds count up from ``student.train.seed``. ``compact``
    (keys of ``COMPACT``): AttnFD (cached) again on each of these cache storages, ``seeds`` seeds, paired
    with the float16 cache's runs."""
    unknown = [c for c in compact if c not in COMPACT]
    if unknown:
        raise UserError(f"--compact {unknown[0]!r}: not a compact storage (choose from {', '.join(COMPACT)})")
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: the student and AttnFD (cached, online) need at least 1 seed "
                         f"(the goals 3)")
    if extra_seeds < 1:
        raise UserError(f"--extra-seeds {extra_seeds}: every method needs at least 1 seed")
    main, extra = seed_range(cfg, seeds), seed_range(cfg, extra_seeds)
    cached, fresh = {"targets": TargetSource.CACHED}, {"targets": TargetSource.ONLINE_FRESH}
    return [
        PlannedRun("student", {**cached, "alpha": 0.0}, main),
        *(PlannedRun(m, {**cached, "method": m}, extra) for m in RIVALS),
        PlannedRun("attnfd", {**cached, "method": "attnfd"}, main),
        PlannedRun("attnfd_online", {**fresh, "method": "attnfd"}, main),
        *(PlannedRun(COMPACT_METHODS[c], {**cached, "method": "attnfd"}, main, storage=COMPACT[c]) for c in compact),
    ]


def bench_config(cfg: Config, plan: Sequence[PlannedRun]) -> Config:
    """The config every run of the bench uses: the caller's, with the extra targets (``cache.extra``) its
    one cache needs for every cached method of the plan."""
    return with_cache_extra(cfg, cache_extra([run_config(cfg, p, p.seeds[0]) for p in plan]))


# ---------------------------------------------------------------------------------------------
# teacher and cache


def ensure_teacher(cfg: Config, *, progress: bool = True) -> Path:
    """The config's teacher bundle; trained (resuming an interrupted training) only when it is missing."""
    path = bundle_path(cfg)
    if not path.is_file():
        run_teacher(cfg, resume=True, progress=progress)
    return path


def teacher_entry(cfg: Config, bundle: Path) -> dict:
    """accuracy.json's teacher row: val mIoU and pixel accuracy from the bundle's metrics (evaluated when
    the bundle has none), its training time from the teacher's result.json when there is one."""
    info = load_teacher_info(bundle)
    metrics = info.get("metrics") or {}
    if metrics.get("miou") is None or metrics.get("pixel_acc") is None:
        metrics = evaluate_bundle(cfg, bundle)
    res = cfg.teacher_dir / "result.json"
    seconds = json.loads(res.read_text()).get("seconds") if res.is_file() else None
    return {"method": "teacher", "seed": cfg.teacher.train.seed, "miou": float(metrics["miou"]),
            "pixel_acc": float(metrics["pixel_acc"]), "run": str(bundle), "model": info.get("model"),
            "cbam_mode": info.get("cbam_mode"), "train_seconds": seconds}


def complete_cache(cfg: Config, bundle: Path, *, progress: bool = True) -> tuple[Path, float | None]:
    """The complete cache of ``cfg`` (its K and extra targets) and the seconds spent building it now: reused
    when complete (``None`` seconds), else built or resumed."""
    source = ImageSource.from_config(cfg, cfg.data.train_split)
    try:
        return find_cache(cfg, load_teacher_info(bundle), source, require_complete=True), None
    except CacheError:
        teacher = load_teacher(bundle, resolve_device(cfg.teacher.train.device))
        r = build_cache(cfg, teacher, source, progress=progress)
        return r.path, r.seconds


def storage_label(cfg: Config) -> str | None:
    """``int8``, ``int8+poolD2`` … for a cache that is not float16 at full resolution; None for the float16 one."""
    c = cfg.cache
    return None if c.encoding == "float16" and not c.pool else variant_name(c.encoding, c.pool)


def ensure_cache(cfg: Config, bundle: Path, out_dir: Path, *, progress: bool = True) -> dict:
    """The complete cache of ``cfg`` (with its extra targets), built or resumed when it is not; its record
    (path, build seconds summed over the parts that built it) is kept in ``accuracy_cache.json`` — the
    float16 cache at the top level, a compact one under ``variants.<storage>``."""
    top = _cache_record(out_dir)
    label = storage_label(cfg)
    record = top.get("variants", {}).get(label, {}) if label else top
    path, seconds = complete_cache(cfg, bundle, progress=progress)
    if seconds is None:
        if record.get("path") != str(path):
            record = {"path": str(path), "seconds": None}  # built outside the bench (`attnfd cache build`)
    else:
        before = record.get("seconds") if record.get("path") == str(path) else 0.0
        record = {"path": str(path), "seconds": (before or 0.0) + seconds}
    record |= {"K": cfg.cache.K, "extra": list(cfg.cache.extra)}
    if label:
        top = top | {"variants": top.get("variants", {}) | {label: record}}
    else:
        top = record | ({"variants": top["variants"]} if "variants" in top else {})
    atomic_write_json(out_dir / CACHE_JSON, top)
    return top


# ---------------------------------------------------------------------------------------------
# runs


def run_entry(method: str, r: RunRecord) -> dict:
    """accuracy.json's row of one student run (from its result.json record)."""
    return {"method": method, "seed": r.seed, "miou": r.final_miou, "pixel_acc": r.final_pixel_acc,
            "best_miou": r.best_miou, "run": r.run, "alpha": r.alpha, "student_method": r.method, "mode": r.mode,
            "augment": r.augment, "epochs": r.epochs, "train_seconds": r.train_seconds, "dataset": r.dataset,
            "eval_protocol": r.eval_protocol}


def run_accuracy_bench(cfg: Config, out_dir: str | Path, *, seeds: int = 3, extra_seeds: int = 1,
                       compact: Sequence[str] = (), progress: bool = True, command: str | None = None,
                       echo: Callable[[str], None] | None = None) -> list[dict]:
    """Run what is missing of the bench (teacher, caches, student runs), rewriting ``accuracy.json`` and
    ``accuracy.md`` in ``out_dir`` after every step; returns the rows of accuracy.json. ``compact``: the
    compact cache storages (``COMPACT``) AttnFD also trains on. ``progress``: the stages' progress lines
    and one line per run (``echo``, default print)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    say = echo or get_logger().info
    plan = plan_runs(cfg, seeds, extra_seeds, compact)
    cfg = bench_config(cfg, plan)
    runs = schedule(cfg, plan)
    meta: dict[str, Any] = {"command": command or DEFAULT_COMMAND, "config": cfg.name, "K": cfg.cache.K,
                            "dataset": cfg.data.dataset, "crop": list(cfg.augment.crop_size),
                            "planned": {p.label: len(p.seeds) for p in plan} | {"teacher": 1}}
    with plan_job("bench-accuracy", cfg, runs) as (j, finished):
        if not bundle_path(cfg).is_file():
            j.next("teacher")
            if progress:
                say(f"[bench-accuracy] no teacher bundle at {bundle_path(cfg)}: training the teacher")
        bundle = ensure_teacher(cfg, progress=progress)
        results, meta["cache"] = [teacher_entry(cfg, bundle)], _cache_record(out_dir)

        def cache(c: Config) -> None:
            meta["cache"] = ensure_cache(c, bundle, out_dir, progress=progress)

        def publish(method: str | None = None, rec: RunRecord | None = None, trained: bool = False) -> None:
            if rec is not None:
                results.append(run_entry(method, rec))
            meta["wall_seconds"] = time.perf_counter() - t0
            write_outputs(out_dir, results, meta)

        publish()
        train_runs(runs, finished, j, tag="bench-accuracy", cache=cache, after=publish, progress=progress, say=say)
    return sorted_results(results)


def _cache_record(out_dir: Path) -> dict:
    """``accuracy_cache.json`` as the bench last wrote it ({} before its first cache)."""
    path = out_dir / CACHE_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def sorted_results(results: Sequence[dict]) -> list[dict]:
    """Table order (``METHODS``), then seed."""
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(results, key=lambda r: (order.get(r["method"], len(order)), r["seed"]))


def write_outputs(out_dir: Path, results: Sequence[dict], meta: dict | None = None) -> tuple[Path, Path]:
    """``accuracy.json`` and ``accuracy.md``, each written atomically."""
    rows = sorted_results(results)
    return (atomic_write_json(out_dir / RESULTS_JSON, rows),
            atomic_write_text(out_dir / RESULTS_MD, format_markdown(rows, meta)))


# ---------------------------------------------------------------------------------------------
# statistics, goals and the markdown


def method_row(results: Sequence[dict], method: str) -> Row:
    """One method's runs as a table row (``experiments.table``: mIoU and pixel accuracy in percent, per seed)."""
    return Row.of(LABELS.get(method, method), [r for r in results if r["method"] == method])


def paired_vs(results: Sequence[dict], method: str, reference: str = "student") -> Difference | None:
    """``method − reference`` mIoU (points), paired over the seeds both rows have."""
    return method_row(results, method).paired(method_row(results, reference))


@dataclasses.dataclass(frozen=True)
class Goal:
    text: str  # what is required, with the statistic that decides it
    value: float | None  # the deciding figure (mIoU points); None = not measured yet
    met: bool | None  # None = not measured yet (or not decidable on the runs there are)
    detail: str = ""
    missed_as: str = "missed"  # how a goal that is not met reads (an equivalence that is "not shown")

    @property
    def status(self) -> str:
        return "not measured yet" if self.met is None else ("met" if self.met else self.missed_as)


def _teacher_goal(results: Sequence[dict]) -> Goal:
    text = f"teacher − student ≥ {TEACHER_GAP:g} mIoU (the teacher's run minus the student's mean)"
    teacher, student = (method_row(results, m).miou for m in ("teacher", "student"))
    if teacher is None or student is None:
        return Goal(text, None, None, "needs the teacher and the student runs")
    gap = teacher.mean - student.mean
    return Goal(text, gap, gap >= TEACHER_GAP, f"teacher {teacher.mean:.2f}, student {student.fmt()} (n = {student.n})")


def _gain_goal(results: Sequence[dict]) -> Goal:
    text = (f"AttnFD (cached) − student ≥ {ATTNFD_GAIN:g} mIoU, decided by the paired mean over shared seeds, "
            f"with its {LEVEL} interval above 0")
    d = paired_vs(results, "attnfd")
    if d is None:
        return Goal(text, None, None, "needs student and AttnFD (cached) runs of a shared seed")
    if not d.has_interval:
        return Goal(text, d.mean, None, f"paired Δ {d.fmt()}: an interval needs ≥ 2 shared seeds")
    strict = "also" if d.lo >= ATTNFD_GAIN else "not"
    return Goal(text, d.mean, d.mean >= ATTNFD_GAIN and d.lo > 0,
                f"paired Δ {d.fmt()}, SE {d.se:.2f}; the interval's lower end {d.lo:.2f} is {strict} ≥ "
                f"{ATTNFD_GAIN:g}, so a gain ≥ {ATTNFD_GAIN:g} is {strict} established at {LEVEL}")


def _online_goal(results: Sequence[dict]) -> Goal:
    text = (f"|AttnFD cached − AttnFD online| ≤ {ONLINE_GAP:g} mIoU, as equivalence: the {LEVEL} interval "
            f"of the paired difference inside [−{ONLINE_GAP:g}, {ONLINE_GAP:g}]")
    d = paired_vs(results, "attnfd", "attnfd_online")
    if d is None:
        return Goal(text, None, None, "needs AttnFD cached and online runs of a shared seed")
    if not d.has_interval:
        return Goal(text, d.mean, None, f"paired Δ {d.fmt()}: an interval needs ≥ 2 shared seeds")
    ok = equivalent(d, ONLINE_GAP)
    why = "inside" if ok else "reaches outside"
    return Goal(text, d.mean, ok, f"cached − online paired Δ {d.fmt()}, SE {d.se:.2f}: the interval {why} "
                                  f"[−{ONLINE_GAP:g}, {ONLINE_GAP:g}]", missed_as="equivalence not shown")


def goals(results: Sequence[dict]) -> list[Goal]:
    """The three goals of the bench on ``results`` (mIoU points), each decided by the statistic its text names
    (docs/statistics.md "The goals of the accuracy bench")."""
    return [_teacher_goal(results), _gain_goal(results), _online_goal(results)]


def _secs(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


def _method_table(rows: Sequence[dict], planned: dict) -> list[str]:
    base, cells = method_row(rows, "student"), []
    for m in METHODS:
        row = method_row(rows, m)
        if not row.runs and m not in planned:
            continue
        n = f"{len(row.runs)}" + (f" of {planned[m]}" if m in planned and len(row.runs) < planned[m] else "")
        compared = m not in ("teacher", "student") and base.runs
        cells.append([row.label, n, ", ".join(str(r["seed"]) for r in row.runs), cell(row.miou),
                      row.delta(base) if compared else "", row.pair_cell(base) if compared else "",
                      cell(row.pixel_acc)])
    return [markdown(["method", "n", "seeds", "mIoU (%)", "Δ mIoU vs student (means)", paired_header("student"),
                      "pixel acc (%)"], cells)]


def format_markdown(results: Sequence[dict], meta: dict | None = None) -> str:
    """accuracy.md: the per-method table (n, mean ± std mIoU, unpaired and paired Δ over the student, pixel
    accuracy), which differences are resolved, the goals with their deciding statistic, the command that
    reproduces it, and the times."""
    meta = meta or {}
    rows = sorted_results(results)
    md = [f"# Accuracy bench ({meta.get('config', 'config')}: teacher, student, distillation methods)", "",
          f"Reproduce: `{meta.get('command', DEFAULT_COMMAND)}` — resumable: finished runs are skipped, so it can "
          f"run in parts.", "",
          evaluation_line(meta.get("dataset") or _recorded(rows, "dataset"), _protocols(rows),
                          meta.get("crop")) + " " + PAIRED_NOTE + " Online AttnFD computes the teacher's targets "
          "every step on a fresh augmentation every epoch; every other method reads the cache"
          + (f" (K = {meta['K']})" if meta.get("K") else "") + ".", ""]
    md += _method_table(rows, meta.get("planned", {}))
    md += ["", resolved_sentence([(LABELS[m], paired_vs(rows, m)) for m in METHODS[2:]]), ""]
    md += _compact_section(rows)
    md += ["## Goals", ""]
    for g in goals(rows):
        value = "" if g.value is None else f"**{number(g.value)}**"
        md.append(f"- {g.text}: {value}{' — ' if value else ''}{g.status}" + (f" ({g.detail})" if g.detail else ""))
    md += ["", "## Time", ""]
    md += _time_lines(rows, meta)
    return "\n".join(md).rstrip() + "\n"


def compact_comparison(rows: Sequence[dict], method: str) -> dict | None:
    """AttnFD on a compact cache − AttnFD on the float16 cache, paired over shared seeds: the paired
    difference, the mean |Δ| and whether equivalence within ±``ONLINE_GAP`` is shown; None without a shared seed."""
    row, ref = method_row(rows, method).seeds, method_row(rows, "attnfd").seeds
    d = paired(row, ref)
    if d is None:
        return None
    abs_mean = sum(abs(row[k] - ref[k]) for k in d.seeds) / len(d.seeds)  # a Difference has ≥ 1 shared seed
    return {"difference": d, "mean_abs": abs_mean, "equivalent": equivalent(d, ONLINE_GAP)}


def _compact_section(rows: Sequence[dict]) -> list[str]:
    present = [m for m in COMPACT_METHODS.values() if any(r["method"] == m for r in rows)]
    if not present:
        return []
    cells = []
    for m in present:
        c, row = compact_comparison(rows, m), method_row(rows, m)
        d = c["difference"] if c else None
        eq = "–" if c is None or c["equivalent"] is None else ("shown" if c["equivalent"] else "not shown")
        cells.append([row.label, row.n, cell(row.miou), d.fmt() if d else "no shared seeds",
                      number(d.se if d else None), number(c["mean_abs"] if c else None), eq])
    return ["## Compact cache storages vs the float16 cache", "",
            "AttnFD (cached) on the same seeds, its targets read from a cache stored in a compact encoding "
            "(sizes, gradient fidelity and what pooling does to the loss: docs/storage.md). Paired Δ = compact − "
            f"float16 over the shared seeds; equivalence: the {LEVEL} interval inside [−{ONLINE_GAP:g}, "
            f"{ONLINE_GAP:g}].", "",
            markdown(["storage", "n", "mIoU (%)", paired_header("float16"), "SE", "mean abs Δ",
                      f"equivalence ±{ONLINE_GAP:g}"], cells), ""]


def _recorded(rows: Sequence[dict], key: str) -> str | None:
    return next((r[key] for r in rows if r.get(key)), None)


def _protocols(rows: Sequence[dict]) -> list[str]:
    """The evaluation protocols of the student runs (a row without one predates the field: centre crop)."""
    return sorted({r.get("eval_protocol") or CENTER_CROP for r in rows if r["method"] != "teacher"})


def _time_lines(rows: Sequence[dict], meta: dict) -> list[str]:
    cache = meta.get("cache") or {}
    parts = ([r.get("train_seconds") for r in rows] + [cache.get("seconds")]
             + [c.get("seconds") for c in cache.get("variants", {}).values()])
    known = [p for p in parts if p is not None]
    total = sum(known)
    lines = [f"Total {total:.0f} s ({total / 60:.1f} min) of recorded stage time: teacher, cache build and "
             f"{sum(r['method'] != 'teacher' for r in rows)} student runs"
             + (f" ({len(parts) - len(known)} without a recorded time)" if len(known) < len(parts) else "")
             + (f"; the last call of the bench took {meta['wall_seconds']:.0f} s of wall time" if
                meta.get("wall_seconds") is not None else "") + ".", "",
             "| step | seed | run | seconds |", "| --- | --- | --- | --- |"]
    lines += [f"| teacher (train, CBAM, evaluation) | {r['seed']} | `{r['run']}` | {_secs(r['train_seconds'])} |"
              for r in rows if r["method"] == "teacher"]
    for label, c in ([("float16", cache)] if cache.get("path") else []) + list(cache.get("variants", {}).items()):
        extra = ", ".join(c.get("extra") or []) or "none"
        lines.append(f"| cache build ({label}, K = {c.get('K')}, extra: {extra}) |  | `{c.get('path')}` | "
                     f"{_secs(c.get('seconds'))} |")
    lines += [f"| {LABELS.get(r['method'], r['method'])} | {r['seed']} | `{r['run']}` | "
              f"{_secs(r.get('train_seconds'))} |" for r in rows if r["method"] != "teacher"]
    return lines

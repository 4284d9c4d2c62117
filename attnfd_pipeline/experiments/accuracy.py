"""`attnfd bench-accuracy` / `make bench-accuracy`: what distillation buys on one config (the embedded
demo by default) — the teacher, the plain student, the student with each method, and AttnFD cached
against AttnFD online — with the goals of the issue checked on the measured numbers.

The bench is a plan of ordinary Stage 2 runs (``plan_runs``: method label, ``StudentConfig`` overrides,
seeds) on the config's own run folder, so the demo teacher and finished runs are reused:

1. the teacher (``runs/<name>/teacher``): trained with ``run_teacher`` only when its bundle is missing;
2. one cache holding every target the methods read (``cache.extra`` = ``logits`` for KD / AICSD, ``raw``
   for LAD / Af-DCD, at the config's K), built (or resumed) only when a cached run still needs it;
3. the student runs, one seed of every method first, then the remaining seeds: every row a goal compares —
   the student (α = 0), AttnFD (cached) and AttnFD online (fresh augmentation, ``student.online_fresh``) —
   with ``seeds`` seeds (a goal on one seed would compare a mean with a single draw), KD, LAD, AICSD and
   Af-DCD with ``extra_seeds``; methods use the config's α and their own config
   section (``student.<method>``). A finished run is reused (``sweep.is_done``) unless it was trained
   under another config (``student.finished_result`` refuses it), an interrupted one resumes from its
   ``last.pt``.

After the teacher and after every run, ``accuracy.json`` (a list of runs: ``method``, ``seed``, ``miou``,
``pixel_acc`` as fractions, plus ``run``, ``train_seconds`` …) and ``accuracy.md`` (``format_markdown``:
per-method table, the goals met or missed, the command, the times) are rewritten atomically, so a killed
bench shows what it finished and the next call goes on from there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from attnfd_pipeline.cache import CacheError, build_cache, find_cache
from attnfd_pipeline.config import Config, ConfigError
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.losses import required_targets
from attnfd_pipeline.experiments.report import Stat
from attnfd_pipeline.engine.logging import get_logger
from attnfd_pipeline.progress import job
from attnfd_pipeline.runs import check_student_inputs, evaluate_bundle, run_teacher
from attnfd_pipeline.student import finished_result, run_student
from attnfd_pipeline.experiments.sweep import is_done
from attnfd_pipeline.teacher import bundle_path, load_teacher, load_teacher_info
from attnfd_pipeline.utils import atomic_write_json, atomic_write_text, resolve_device

# accuracy.json's method labels, in table order (rivals, then AttnFD cached and online)
METHODS = ("teacher", "student", "kd", "lad", "aicsd", "afdcd", "attnfd", "attnfd_online")
LABELS = {"teacher": "Teacher", "student": "Student (α = 0)", "kd": "S + KD", "lad": "S + LAD", "aicsd": "S + AICSD",
          "afdcd": "S + Af-DCD", "attnfd": "S + AttnFD (cached)",
          "attnfd_online": "S + AttnFD (online, fresh augmentation)"}
RIVALS = ("kd", "lad", "aicsd", "afdcd")
# the goals, in mIoU points
TEACHER_GAP = 5.0  # teacher − student ≥ 5
ATTNFD_GAIN = 2.0  # AttnFD (cached) − student ≥ 2, and more than twice the std over seeds
ONLINE_GAP = 1.0  # |AttnFD cached − AttnFD online| ≤ 1
RESULTS_JSON, RESULTS_MD, CACHE_JSON = "accuracy.json", "accuracy.md", "accuracy_cache.json"
DEFAULT_COMMAND = "make bench-accuracy"


class Planned(NamedTuple):
    """One row of the bench: its label in accuracy.json, the ``StudentConfig`` fields it changes, its seeds."""

    method: str
    overrides: dict[str, Any]
    seeds: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# the plan


def plan_runs(cfg: Config, seeds: int = 3, extra_seeds: int = 1) -> list[Planned]:
    """The student runs of the bench (the teacher is not a student run): the student, AttnFD (cached) and
    AttnFD online — the rows the goals compare — with ``seeds`` seeds, every other method with
    ``extra_seeds``; seeds count up from ``student.train.seed``."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: the student and AttnFD (cached, online) need at least 1 seed "
                         f"(the goals 3)")
    if extra_seeds < 1:
        raise ValueError(f"--extra-seeds {extra_seeds}: every method needs at least 1 seed")
    first = cfg.student.train.seed
    main, extra = tuple(range(first, first + seeds)), tuple(range(first, first + extra_seeds))
    cached = {"mode": "cached", "online_fresh": False}
    return [
        Planned("student", {**cached, "alpha": 0.0}, main),
        *(Planned(m, {**cached, "method": m}, extra) for m in RIVALS),
        Planned("attnfd", {**cached, "method": "attnfd"}, main),
        Planned("attnfd_online", {"method": "attnfd", "mode": "online", "online_fresh": True}, main),
    ]


def run_config(cfg: Config, planned: Planned, seed: int) -> Config:
    """``cfg`` with ``planned``'s student overrides and run seed (validated like a config file)."""
    try:
        train = dataclasses.replace(cfg.student.train, seed=int(seed))
        student = dataclasses.replace(cfg.student, train=train, **planned.overrides)
    except ConfigError as e:
        raise ConfigError(f"bench-accuracy run {planned.method!r}: {e}") from None
    return dataclasses.replace(cfg, student=student)


def needed_extra(cfg: Config, plan: Sequence[Planned]) -> tuple[str, ...]:
    """``cache.extra`` covering every cached target the planned methods read (``logits``, ``raw``),
    plus whatever the config already asks for."""
    names: set[str] = set()
    for p in plan:
        s = run_config(cfg, p, p.seeds[0]).student
        if s.alpha > 0 and s.mode == "cached":
            names.update(required_targets(s.method, s.points))
    extra = set(cfg.cache.extra)
    extra |= {"logits"} if "logits" in names else set()
    extra |= {"raw"} if any(n.startswith("raw_") for n in names) else set()
    return tuple(e for e in ("logits", "raw") if e in extra)


def bench_config(cfg: Config, plan: Sequence[Planned]) -> Config:
    """The config every run of the bench uses: the caller's, with the cache's extra targets."""
    return dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, extra=needed_extra(cfg, plan)))


def schedule(cfg: Config, plan: Sequence[Planned]) -> list[tuple[str, Config]]:
    """(method, run config) in running order: every method's first seed, then the second seeds …, so a
    bench run in parts covers every row early."""
    out = []
    for i in range(max(len(p.seeds) for p in plan)):
        out += [(p.method, run_config(cfg, p, p.seeds[i])) for p in plan if i < len(p.seeds)]
    return out


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


def ensure_cache(cfg: Config, bundle: Path, out_dir: Path, *, progress: bool = True) -> dict:
    """The complete cache of ``cfg`` (with its extra targets), built or resumed when it is not; its record
    (path, build seconds summed over the parts that built it) is kept in ``accuracy_cache.json``."""
    record_path = out_dir / CACHE_JSON
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    path, seconds = complete_cache(cfg, bundle, progress=progress)
    if seconds is None:
        if record.get("path") != str(path):
            record = {"path": str(path), "seconds": None}  # built outside the bench (`attnfd cache build`)
    else:
        before = record.get("seconds") if record.get("path") == str(path) else 0.0
        record = {"path": str(path), "seconds": (before or 0.0) + seconds}
    record |= {"K": cfg.cache.K, "extra": list(cfg.cache.extra)}
    atomic_write_json(record_path, record)
    return record


# ---------------------------------------------------------------------------------------------
# runs


def run_entry(method: str, result: dict) -> dict:
    """accuracy.json's row of one student run (from its result dict)."""
    return {"method": method, "seed": result["seed"], "miou": result["final_miou"],
            "pixel_acc": result["final_pixel_acc"], "best_miou": result.get("best_miou"), "run": result["run"],
            "alpha": result["alpha"], "student_method": result["method"], "mode": result["mode"],
            "augment": result.get("augment", "replay"), "epochs": result.get("epochs"),
            "train_seconds": result.get("train_seconds")}


def run_accuracy_bench(cfg: Config, out_dir: str | Path, *, seeds: int = 3, extra_seeds: int = 1,
                       progress: bool = True, command: str | None = None,
                       echo: Callable[[str], None] | None = None) -> list[dict]:
    """Run what is missing of the bench (teacher, cache, student runs), rewriting ``accuracy.json`` and
    ``accuracy.md`` in ``out_dir`` after every step; returns the rows of accuracy.json. ``progress``:
    the stages' progress lines and one line per run (``echo``, default print)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    say = echo or get_logger().info
    plan = plan_runs(cfg, seeds, extra_seeds)
    cfg = bench_config(cfg, plan)
    runs = schedule(cfg, plan)
    meta: dict[str, Any] = {"command": command or DEFAULT_COMMAND, "config": cfg.name, "K": cfg.cache.K,
                            "planned": {p.method: len(p.seeds) for p in plan} | {"teacher": 1}}
    needs_cache = any(c.student.alpha > 0 and c.student.mode == "cached" and not is_done(c) for _, c in runs)
    with job("bench-accuracy", int(not bundle_path(cfg).is_file()) + int(needs_cache) + len(runs)) as j:
        return _run_bench(cfg, out_dir, runs, meta, j, t0=t0, progress=progress, say=say)


def _run_bench(cfg: Config, out_dir: Path, runs, meta: dict, j, *, t0: float, progress: bool, say) -> list[dict]:
    if not bundle_path(cfg).is_file():
        j.next("teacher")
        if progress:
            say(f"[bench-accuracy] no teacher bundle at {bundle_path(cfg)}: training the teacher")
    bundle = ensure_teacher(cfg, progress=progress)
    results = [teacher_entry(cfg, bundle)]
    record = _cache_record(out_dir)

    def publish() -> None:
        meta.update(wall_seconds=time.perf_counter() - t0, cache=record)
        write_outputs(out_dir, results, meta)

    publish()
    # finished runs are checked before anything trains: one from another config stops the bench now
    finished = {i: finished_result(c) for i, (_, c) in enumerate(runs, 1) if is_done(c)}
    pending = [(m, c) for i, (m, c) in enumerate(runs, 1) if i not in finished]
    if pending:
        check_student_inputs(cfg)  # dataset files, backbone weights: before any run writes
    if any(c.student.alpha > 0 and c.student.mode == "cached" for _, c in pending):
        j.next("cache")
        if progress:
            say(f"[bench-accuracy] cache with extra targets {list(cfg.cache.extra)} (K = {cfg.cache.K}): "
                f"reused when complete, else built")
        record = ensure_cache(cfg, bundle, out_dir, progress=progress)
    for i, (method, run_cfg) in enumerate(runs, 1):
        if i in finished:
            j.skip(f"{method} seed {run_cfg.student.train.seed}")
            result, state = finished[i], "done before"
        else:
            j.next(f"{method} seed {run_cfg.student.train.seed}")
            if progress:
                say(f"[bench-accuracy] {i}/{len(runs)} {method} seed {run_cfg.student.train.seed}: training")
            result = run_student(run_cfg, resume=True, progress=progress)
            state = f"trained in {result['train_seconds']:.0f} s"
        results.append(run_entry(method, result))
        if progress:
            say(f"[bench-accuracy] {i}/{len(runs)} {method} seed {result['seed']}: mIoU "
                f"{result['final_miou'] * 100:.2f} ({state})")
        publish()
    return sorted_results(results)


def _cache_record(out_dir: Path) -> dict | None:
    path = out_dir / CACHE_JSON
    return json.loads(path.read_text()) if path.is_file() else None


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


def method_stats(results: Sequence[dict]) -> dict[str, dict[str, Stat | None]]:
    """Per method: mIoU and pixel accuracy as ``report.Stat`` (percent, sample std over seeds)."""
    out = {}
    for m in METHODS:
        rows = [r for r in results if r["method"] == m]
        if rows:
            out[m] = {"miou": Stat.of([r["miou"] for r in rows]), "pixel_acc": Stat.of([r["pixel_acc"] for r in rows])}
    return out


@dataclasses.dataclass(frozen=True)
class Goal:
    text: str  # what is required
    value: float | None  # the measured figure (mIoU points); None = not measured yet
    met: bool | None  # None = not measured yet
    detail: str = ""

    @property
    def status(self) -> str:
        return "not measured yet" if self.met is None else ("met" if self.met else "missed")


def goals(results: Sequence[dict]) -> list[Goal]:
    """The three goals of the issue on ``results`` (mIoU points)."""
    st = {m: s["miou"] for m, s in method_stats(results).items()}
    teacher, student, cached, online = (st.get(m) for m in ("teacher", "student", "attnfd", "attnfd_online"))
    out = []
    text = f"teacher − student ≥ {TEACHER_GAP:g} mIoU"
    if teacher is None or student is None:
        out.append(Goal(text, None, None, "needs the teacher and the student runs"))
    else:
        gap = teacher.mean - student.mean
        out.append(Goal(text, gap, gap >= TEACHER_GAP, f"teacher {teacher.mean:.2f}, student {student.mean:.2f} "
                                                          f"(n = {student.n})"))
    text = (f"AttnFD (cached) − student ≥ {ATTNFD_GAIN:g} mIoU (means over seeds), and more than twice the std "
            f"over seeds")
    if cached is None or student is None:
        out.append(Goal(text, None, None, "needs the student and AttnFD (cached) runs"))
    else:
        gain = cached.mean - student.mean
        if cached.std is None or student.std is None:
            out.append(Goal(text, gain, None, f"n = {cached.n} / {student.n}: the std needs ≥ 2 seeds per row"))
        else:
            spread = 2 * max(cached.std, student.std)
            out.append(Goal(text, gain, gain >= ATTNFD_GAIN and gain > spread,
                            f"AttnFD {cached.fmt()} (n = {cached.n}), student {student.fmt()} (n = {student.n}); "
                            f"twice the larger std = {spread:.2f}"))
    text = f"|AttnFD cached − AttnFD online| ≤ {ONLINE_GAP:g} mIoU"
    if cached is None or online is None:
        out.append(Goal(text, None, None, "needs the AttnFD cached and online runs"))
    else:
        gap = abs(cached.mean - online.mean)
        out.append(Goal(text, gap, gap <= ONLINE_GAP, f"cached {cached.mean:.2f} (n = {cached.n}), online with "
                                                      f"fresh augmentation {online.mean:.2f} (n = {online.n})"))
    return out


def _num(v: float | None, signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _secs(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


def format_markdown(results: Sequence[dict], meta: dict | None = None) -> str:
    """accuracy.md: the per-method table (n, mean ± std mIoU, pixel accuracy, gain over the student), the
    goals with their measured values, the command that reproduces it, and the times."""
    meta = meta or {}
    rows = sorted_results(results)
    stats = method_stats(rows)
    planned = meta.get("planned", {})
    base = (stats.get("student") or {}).get("miou")
    md = [f"# Accuracy bench ({meta.get('config', 'config')}: teacher, student, distillation methods)", "",
          f"Reproduce: `{meta.get('command', DEFAULT_COMMAND)}` — resumable: finished runs are skipped, so it can "
          f"run in parts. mIoU and pixel accuracy: final-epoch validation of each run, mean ± sample std over seeds "
          f"(n runs per row); Δ: mIoU points over the student's mean. Online AttnFD computes the teacher's targets "
          f"every step on a fresh augmentation every epoch; every other method reads the cache"
          + (f" (K = {meta['K']})" if meta.get("K") else "") + ".", ""]
    table = ["| method | n | seeds | mIoU (%) | Δ mIoU vs student | pixel acc (%) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for m in METHODS:
        runs = [r for r in rows if r["method"] == m]
        if not runs and m not in planned:
            continue
        n = f"{len(runs)}" + (f" of {planned[m]}" if m in planned and len(runs) < planned[m] else "")
        s = stats.get(m, {})
        miou, acc = s.get("miou"), s.get("pixel_acc")
        delta = _num(miou.mean - base.mean, signed=True) if (miou and base and m not in ("teacher", "student")) else ""
        table.append(f"| {LABELS[m]} | {n} | {', '.join(str(r['seed']) for r in runs)} | "
                     f"{miou.fmt() if miou else '–'} | {delta} | {acc.fmt() if acc else '–'} |")
    md += table + ["", "## Goals", ""]
    for g in goals(rows):
        value = "" if g.value is None else f"**{_num(g.value)}**"
        md.append(f"- {g.text}: {value}{' — ' if value else ''}{g.status}" + (f" ({g.detail})" if g.detail else ""))
    md += ["", "## Time", ""]
    md += _time_lines(rows, meta)
    return "\n".join(md).rstrip() + "\n"


def _time_lines(rows: Sequence[dict], meta: dict) -> list[str]:
    cache = meta.get("cache") or {}
    parts = [r.get("train_seconds") for r in rows] + [cache.get("seconds")]
    known = [p for p in parts if p is not None]
    total = sum(known)
    lines = [f"Total {total:.0f} s ({total / 60:.1f} min) of recorded stage time: teacher, cache build and "
             f"{sum(r['method'] != 'teacher' for r in rows)} student runs"
             + (f" ({len(parts) - len(known)} without a recorded time)" if len(known) < len(parts) else "")
             + (f"; the last call of the bench took {meta['wall_seconds']:.0f} s of wall time" if
                meta.get("wall_seconds") is not None else "") + ".", "",
             "| step | seed | run | seconds |", "| --- | --- | --- | --- |"]
    for r in rows:
        if r["method"] == "teacher":
            lines.append(f"| teacher (train, CBAM, evaluation) | {r['seed']} | `{r['run']}` | "
                         f"{_secs(r['train_seconds'])} |")
            if cache:
                extra = ", ".join(cache.get("extra") or []) or "none"
                lines.append(f"| cache build (K = {cache.get('K')}, extra: {extra}) |  | `{cache.get('path')}` | "
                             f"{_secs(cache.get('seconds'))} |")
        else:
            lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['seed']} | `{r['run']}` | "
                         f"{_secs(r.get('train_seconds'))} |")
    return lines

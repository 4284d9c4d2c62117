"""`attnfd studies` / `make studies`: train every run the report's studies need, then write the report.

``attnfd report`` turns finished runs into tables and figures; this module decides which runs those are
and trains the missing ones, so the studies of the paper (and the K study no peer measures) come from one
command on one config:

- ``reference``: the plain student (α = 0) and AttnFD at the config's setting, ``seeds`` seeds each;
- ``K``: AttnFD from caches of K ∈ ``ks`` cached augmentation seeds, the student at each K (``extra_seeds``),
  and AttnFD online with a fresh augmentation every epoch (``student.targets = "online-fresh"``) — the
  reference the K cached seeds approximate — with the plain student on fresh crops, so online's gain is
  measured against the student of its own augmentation regime;
- ``methods``: every registered rival (KD, LAD, AICSD, Af-DCD, CIRKD, DIST) and AttnFD + KD on the same cache;
- ``alpha``: AttnFD at each α of ``alphas``;
- ``points``: B, E, D and B+E+D (paper Table 5); ``norm``: batch, sample and channel normalisation;
- ``teacher_mode``: AttnFD distilled from teachers whose CBAMs are ``fitted``, ``parameter_free`` or
  ``untrained`` (docs/method.md "Teacher CBAM modes"); each has its own run root ``runs/<name>_<mode>``.

Every row compared with a reference row has ``seeds`` seeds, its reference's, so the report gives each
difference as a paired mean with a 95 % interval (docs/statistics.md: the references, "Studies: seeds and cost").

Every factor a study does not vary stays at the config's value. Runs come in rounds, like the accuracy
bench: the first seed of every planned run, then the second seeds …, so a study run in parts covers every
row early. A finished run is reused (the same run folder as ``attnfd student`` and ``attnfd bench-accuracy``
would write; one trained under another recipe or teacher is refused, naming the folder), an interrupted
one resumes from its ``last.pt``. Each (teacher, K) pair gets one cache holding every target its runs read.

The three non-``inpath`` teachers train the same network the same way (CE without CBAM in the forward
path; the mode only decides what happens to the CBAMs afterwards), so that training runs once: a teacher
root of another such mode starts from the finished ``train/`` folder of the first (its resume check still
compares the recipe), then fits or attaches its own CBAMs.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable, Sequence

from attnfd_pipeline.experiments.accuracy import complete_cache, ensure_teacher
from attnfd_pipeline.config import Config, TargetSource
from attnfd_pipeline.experiments.report import CBAM_MODES, NORM_ORDER, build_report
from attnfd_pipeline.losses import list_methods
from attnfd_pipeline.engine.logging import get_logger
from attnfd_pipeline.progress import current_job
from attnfd_pipeline.experiments.plan import PlannedRun, plan_job, schedule, seed_range, teacher_config, train_runs
from attnfd_pipeline.teacher import bundle_path
from attnfd_pipeline.errors import UserError

STUDIES = ("reference", "K", "methods", "alpha", "points", "norm", "teacher_mode")
DEFAULT_KS = (1, 2, 4, 8)
DEFAULT_ALPHAS = (3.0, 10.0, 100.0, 300.0)
POINT_SETS = (("B",), ("E",), ("D",), ("B", "E", "D"))
RIVALS = (*(m for m in list_methods() if m != "attnfd"), "attnfd+kd")  # every registered rival, and one combination


# ---------------------------------------------------------------------------------------------
# the plan


def plan_studies(cfg: Config, *, studies: Sequence[str] = STUDIES, seeds: int = 3, extra_seeds: int = 1,
                 ks: Sequence[int] = DEFAULT_KS, alphas: Sequence[float] = DEFAULT_ALPHAS) -> list[PlannedRun]:
    """The runs of ``studies`` in plan order; a setting equal to the reference is not planned twice (the
    reference rows serve it). The rows of ``seeds`` and ``extra_seeds``: docs/statistics.md "Studies: seeds
    and cost"."""
    unknown = [s for s in studies if s not in STUDIES]
    if unknown:
        raise UserError(f"--study {unknown[0]!r}: not a study (choose from {', '.join(STUDIES)})")
    if seeds < 1 or extra_seeds < 1:
        raise UserError(f"--seeds {seeds} / --extra-seeds {extra_seeds}: every row needs at least 1 seed")
    bad_k = [k for k in ks if int(k) < 1]
    if bad_k:
        raise UserError(f"--k {bad_k[0]}: K must be ≥ 1")
    s, ref_k = cfg.student, cfg.cache.K
    main, extra = seed_range(cfg, seeds), seed_range(cfg, extra_seeds)
    cached = {"targets": TargetSource.CACHED, "method": "attnfd"}
    out: list[PlannedRun] = []
    if "reference" in studies:
        out += [PlannedRun("student", {**cached, "alpha": 0.0}, main, "reference"),
                PlannedRun("attnfd", cached, main, "reference")]
    if "K" in studies:
        fresh = {"targets": TargetSource.ONLINE_FRESH, "method": "attnfd"}
        out += [PlannedRun("attnfd online (fresh augmentation)", fresh, main, "K"),
                PlannedRun("student (fresh augmentation)", {**fresh, "alpha": 0.0}, main, "K")]
        for k in dict.fromkeys(int(k) for k in ks):
            if k != ref_k:
                out += [PlannedRun(f"attnfd K={k}", cached, main, "K", K=k),
                        PlannedRun(f"student K={k}", {**cached, "alpha": 0.0}, extra, "K", K=k)]
    if "methods" in studies:
        out += [PlannedRun(m, {**cached, "method": m}, main, "methods") for m in RIVALS]
    if "alpha" in studies:
        out += [PlannedRun(f"attnfd α={a:g}", {**cached, "alpha": float(a)}, main, "alpha")
                for a in dict.fromkeys(float(a) for a in alphas) if a > 0 and a != s.alpha]
    if "points" in studies:
        out += [PlannedRun(f"attnfd at {'+'.join(p)}", {**cached, "points": p}, main, "points")
                for p in POINT_SETS if p != tuple(s.points)]
    if "norm" in studies:
        out += [PlannedRun(f"attnfd norm {n}", {**cached, "norm": n}, main, "norm") for n in NORM_ORDER if n != s.norm]
    if "teacher_mode" in studies:
        out += [PlannedRun(f"attnfd, {m} teacher CBAM", cached, main, "teacher_mode", teacher_mode=m)
                for m in CBAM_MODES if m != cfg.teacher.cbam_mode]
    return out


def extra_roots(cfg: Config, plan: Sequence[PlannedRun]) -> list[Path]:
    """The run roots of the plan's other teachers (for ``report.build_report``)."""
    modes = dict.fromkeys(p.teacher_mode for p in plan if p.teacher_mode not in (None, cfg.teacher.cbam_mode))
    return [teacher_config(cfg, m).run_root for m in modes]


# ---------------------------------------------------------------------------------------------
# teachers and caches


def share_plain_training(cfg: Config, siblings: Sequence[Config]) -> Path | None:
    """Before a non-``inpath`` teacher trains: copy the finished ``train/`` folder of a sibling teacher that
    trains the same network the same way (another non-``inpath`` mode, finished bundle) into this root, so
    ``run_teacher(resume=True)`` starts from it instead of repeating the training. Returns the folder it
    copied from (None: nothing to share, or this root has a training of its own)."""
    if cfg.teacher.cbam_mode == "inpath" or (cfg.teacher_dir / "train").exists():
        return None
    for other in siblings:
        if other.teacher.cbam_mode == "inpath" or other.run_root == cfg.run_root:
            continue
        same = dataclasses.replace(other.teacher, cbam_mode=cfg.teacher.cbam_mode) == cfg.teacher
        src = other.teacher_dir / "train"
        if same and other.data == cfg.data and other.augment == cfg.augment and bundle_path(other).is_file() \
                and (src / "last.pt").is_file():
            tmp = cfg.teacher_dir / "train.copying"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            tmp.rename(cfg.teacher_dir / "train")  # whole or not at all
            return src
    return None


def ensure_teachers(cfg: Config, runs: Sequence[tuple[PlannedRun, Config]], *, progress: bool = True,
                    say: Callable[[str], None] = print) -> dict[str, Path]:
    """Every teacher bundle the runs need (run root name → bundle), the config's own first."""
    roots: dict[str, Config] = {cfg.name: cfg}
    for _, c in runs:
        roots.setdefault(c.name, c)
    bundles, done = {}, []
    j = current_job()
    for name, c in roots.items():
        if not bundle_path(c).is_file():
            if j is not None:
                j.next(f"teacher {name}")
            src = share_plain_training(c, done)
            if progress:
                say(f"[studies] teacher {name} ({c.teacher.cbam_mode} CBAM): "
                    + (f"training shared from {src}" if src else "training"))
        bundles[name] = ensure_teacher(c, progress=progress)
        done.append(c)
    return bundles


# ---------------------------------------------------------------------------------------------
# running


def run_studies(cfg: Config, out_dir: str | Path, *, studies: Sequence[str] = STUDIES, seeds: int = 3,
                extra_seeds: int = 1, ks: Sequence[int] = DEFAULT_KS, alphas: Sequence[float] = DEFAULT_ALPHAS,
                progress: bool = True, echo: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Train what is missing of the studies' runs, rewriting the report in ``out_dir`` after every run (a
    killed call leaves a report of what finished); returns the report's files."""
    say = echo or get_logger().info
    plan = plan_studies(cfg, studies=studies, seeds=seeds, extra_seeds=extra_seeds, ks=ks, alphas=alphas)
    runs = schedule(cfg, plan)
    roots = extra_roots(cfg, plan)
    with plan_job("studies", cfg, runs) as (j, finished):
        bundles = ensure_teachers(cfg, runs, progress=progress, say=say)
        files = build_report(cfg, out_dir, extra_roots=roots)

        def report(label, rec, trained: bool) -> None:
            nonlocal files
            if trained:  # a reused run changes nothing the report shows
                files = build_report(cfg, out_dir, extra_roots=roots)

        train_runs(runs, finished, j, tag="studies", after=report, progress=progress, say=say,
                   cache=lambda c: complete_cache(c, bundles[c.name], progress=progress))
    return files

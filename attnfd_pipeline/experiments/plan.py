"""The runs a comparison needs, shared by the accuracy bench and the studies.

A plan is a list of ``PlannedRun`` rows (a label, the ``StudentConfig`` fields the row changes, its seeds,
and the cache K / teacher CBAM mode it needs when not the config's). ``schedule`` turns it into run
configs in rounds — every row's first seed, then the second seeds … — so a plan run in parts covers every
row early and every comparison gets its first pair soon; each cache (teacher root, K, storage) is given the extra
targets (``cache.extra``) every cached run on it reads, so one cache serves them all.

Seeds count up from ``student.train.seed`` in every row, so rows share seeds and can be compared pairwise
(``experiments.stats.paired``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from attnfd_pipeline.cache.schema import extra_for
from attnfd_pipeline.config import Config, ConfigError, TargetSource
from attnfd_pipeline.losses import required_targets
from attnfd_pipeline.progress import Job, job
from attnfd_pipeline.records import RunRecord
from attnfd_pipeline.runs import check_student_inputs, finished_result, run_student
from attnfd_pipeline.teacher import bundle_path
from attnfd_pipeline.experiments.sweep import is_done


class PlannedRun(NamedTuple):
    """One row of a plan."""

    label: str  # the row's name in the outputs (accuracy.json's ``method``, a study row's label)
    overrides: dict[str, Any]  # the ``StudentConfig`` fields it changes
    seeds: tuple[int, ...]
    study: str = ""  # the study it serves ("" in the accuracy bench)
    K: int | None = None  # cached augmentation seeds (None: the config's)
    teacher_mode: str | None = None  # teacher CBAM mode (None: the config's)
    # ``CacheConfig`` fields of the row's cache (e.g. (("encoding", "int8"),)): a cache of its own
    storage: tuple[tuple[str, Any], ...] = ()


def seed_range(cfg: Config, n: int) -> tuple[int, ...]:
    """``n`` seeds counting up from ``student.train.seed``: every row's seed i is the same seed."""
    first = cfg.student.train.seed
    return tuple(range(first, first + n))


def teacher_config(cfg: Config, mode: str | None) -> Config:
    """The config of the teacher with CBAM mode ``mode``: the config itself for its own mode, else the same
    recipe under the run root ``<name>_<mode>`` (a teacher bundle per root)."""
    if mode is None or mode == cfg.teacher.cbam_mode:
        return cfg
    return dataclasses.replace(cfg, name=f"{cfg.name}_{mode}", teacher=dataclasses.replace(cfg.teacher, cbam_mode=mode))


def run_config(cfg: Config, row: PlannedRun, seed: int) -> Config:
    """``cfg`` with the row's teacher root, cache K, student overrides and run seed (validated like a
    config file: a bad override is a ``ConfigError`` naming the row)."""
    c = teacher_config(cfg, row.teacher_mode)
    try:
        if row.K is not None:
            c = dataclasses.replace(c, cache=dataclasses.replace(c.cache, K=int(row.K)))
        if row.storage:  # a cache of its own holds only what its rows read (``cache_extra``)
            c = dataclasses.replace(c, cache=dataclasses.replace(c.cache, extra=(), **dict(row.storage)))
        train = dataclasses.replace(c.student.train, seed=int(seed))
        student = dataclasses.replace(c.student, train=train, **row.overrides)
    except ConfigError as e:
        raise ConfigError(f"planned run {row.label!r}: {e}") from None
    return dataclasses.replace(c, student=student)


def reads_cache(cfg: Config) -> bool:
    """Whether the run of ``cfg`` reads the cache (distilled, cached mode)."""
    return cfg.student.alpha > 0 and cfg.student.targets is TargetSource.CACHED


def cache_key(c: Config) -> tuple:
    """What tells the caches of a plan apart: the run root (teacher), K and the storage (encoding, pooling)."""
    return c.name, c.cache.K, c.cache.encoding, c.cache.pool


def _cache_of(c: Config) -> tuple:
    """The cache a scheduled run reads: its ``cache_key`` and the extra targets it holds."""
    return *cache_key(c), c.cache.extra


def cache_extra(configs: Sequence[Config]) -> dict[tuple, tuple[str, ...]]:
    """Per cache (``cache_key``): the ``cache.extra`` holding every target the cached runs among ``configs``
    read, joined with what each config already asks for."""
    targets: dict[tuple, set[str]] = defaultdict(set)
    asked: dict[tuple, set[str]] = defaultdict(set)
    for c in configs:
        key = cache_key(c)
        asked[key].update(c.cache.extra)
        if reads_cache(c):
            targets[key].update(required_targets(c.student.method, c.student.points, c.student.method_params))
    return {key: extra_for(targets[key], sorted(asked[key])) for key in asked}


def with_cache_extra(c: Config, extra: dict[tuple, tuple[str, ...]]) -> Config:
    """``c`` with its cache's extra targets."""
    return dataclasses.replace(c, cache=dataclasses.replace(c.cache, extra=extra.get(cache_key(c), c.cache.extra)))


def schedule(cfg: Config, plan: Sequence[PlannedRun]) -> list[tuple[PlannedRun, Config]]:
    """(row, run config) in running order: every row's first seed, then the second seeds …; each config
    carries the extra targets of its cache (``cache_key``)."""
    order: list[tuple[PlannedRun, Config]] = []
    for i in range(max((len(p.seeds) for p in plan), default=0)):
        order += [(p, run_config(cfg, p, p.seeds[i])) for p in plan if i < len(p.seeds)]
    extra = cache_extra([c for _, c in order])
    return [(p, with_cache_extra(c, extra)) for p, c in order]


def finished_runs(cfg: Config, runs: Sequence[tuple[PlannedRun, Config]]) -> dict[int, RunRecord]:
    """The runs already finished (1-based index → record), checked before anything trains: one trained under
    another config stops the plan now (``runs.finished_result`` refuses it). With runs still to train, the
    dataset files and backbone weights are checked too, before any run writes."""
    done = {i: RunRecord.from_dict(finished_result(c)) for i, (_, c) in enumerate(runs, 1) if is_done(c)}
    if len(done) < len(runs):
        check_student_inputs(cfg)
    return done


@contextlib.contextmanager
def plan_job(tag: str, cfg: Config, runs: Sequence[tuple[PlannedRun, Config]]) -> Iterator[tuple[Job, dict]]:
    """The ``progress.job`` of the scheduled runs and their ``finished_runs``: its steps are every teacher
    bundle still to train, every cache the runs still to train read, and every run."""
    finished = finished_runs(cfg, runs)
    teachers = {c.name for c in [cfg, *(c for _, c in runs)] if not bundle_path(c).is_file()}
    caches = {_cache_of(c) for i, (_, c) in enumerate(runs, 1) if i not in finished and reads_cache(c)}
    with job(tag, len(teachers) + len(caches) + len(runs)) as j:
        yield j, finished


def train_runs(runs: Sequence[tuple[PlannedRun, Config]], finished: dict[int, RunRecord], j: Job, *, tag: str,
               cache: Callable[[Config], Any], after: Callable[[str, RunRecord, bool], None], progress: bool,
               say: Callable[[str], None]) -> None:
    """Train the scheduled runs in order (``resume=True``: an interrupted one goes on from its ``last.pt``),
    reusing the finished ones: ``cache(cfg)`` completes a cache before the first run that reads it,
    ``after(label, record, trained)`` follows every run, trained or reused (the caller rewrites its
    outputs). A row serving a study is named after it in the progress lines."""
    caches: set[tuple] = set()
    for i, (p, c) in enumerate(runs, 1):
        what = f"{p.study + ': ' if p.study else ''}{p.label}, seed {c.student.train.seed}"
        if i in finished:
            j.skip(what)
            rec, state, trained = finished[i], "done before", False
        else:
            key = _cache_of(c)
            if reads_cache(c) and key not in caches:
                j.next(f"cache {c.name} K={c.cache.K}")
                if progress:
                    say(f"[{tag}] cache of {c.name} at K = {c.cache.K} (extra {list(c.cache.extra)}): reused when "
                        f"complete, else built")
                cache(c)
                caches.add(key)
            j.next(what)
            if progress:
                say(f"[{tag}] {i}/{len(runs)} {what}: training")
            rec = RunRecord.from_dict(run_student(c, resume=True, progress=progress))
            state, trained = f"trained in {rec.train_seconds:.0f} s", True
        if progress:
            say(f"[{tag}] {i}/{len(runs)} {what}: mIoU {rec.final_miou * 100:.2f} ({state})")
        after(p.label, rec, trained)

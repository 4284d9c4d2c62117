"""Cache builds on many writers: one per torchrun rank, or one per task on a ``dask.distributed`` cluster.

Every writer is ``build_cache(cfg, teacher, source, rank=r, world=W)``: it owns whole shards
``r, r + W, …`` (two writers in one shard lose data — docs/method.md "Concurrent writes"), resumes what it
owns, and feeds the teacher exactly the batches an uninterrupted single-process build would, so the
result is bitwise identical to one: every chunk file, ``cache.json``, and every manifest row except
its ``rank`` column (which writer committed the shard — provenance, by design).

The metadata (Zarr group, arrays, ``cache.json``) is created once before any writer starts
(``prepare_store``, under the single-writer lock, after checking no build with another layout is live):
by rank 0 before a broadcast that doubles as the barrier under torchrun, by a first task on dask.
The writers do not talk to each other; each one's manifest parts are its commit records.

Bitwise identity assumes the same numerics in every writer: on CPU the same torch thread count per
process as the reference build (torch's parallel reductions sum in a thread-count-dependent order;
torchrun sets ``OMP_NUM_THREADS=1``), on GPUs the same GPU model and software.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from attnfd_pipeline.cache.build import (BuildResult, build_cache, cache_info, check_no_other_layout, lock_path,
                                         remove_debris, write_build_record)
from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.fingerprint import cache_dir_for
from attnfd_pipeline.cache.lock import BuildLock
from attnfd_pipeline.cache.errors import CacheError
from attnfd_pipeline.cache.plan import plan_build
from attnfd_pipeline.cache.schema import cache_target_names
from attnfd_pipeline.cache.storage import Location
from attnfd_pipeline.cache.writer import create_store
from attnfd_pipeline.errors import UserError

@dataclass
class Prepared:
    path: Location
    fingerprint: str
    num_shards: int
    plan_lines: list[str] = field(default_factory=list)


@dataclass
class MultiBuildResult:
    """The writers' ``BuildResult``s (rank order) and the wall time from metadata to the last commit."""

    path: Location
    fingerprint: str
    world: int
    writers: list[BuildResult]
    seconds: float
    plan_lines: list[str] = field(default_factory=list)

    @property
    def shards_total(self) -> int:
        return self.writers[0].shards_total if self.writers else 0

    @property
    def shards_written(self) -> int:
        return sum(r.shards_written for r in self.writers)

    @property
    def shards_skipped(self) -> int:  # committed before this build started
        return self.shards_total - self.shards_written

    @property
    def samples_written(self) -> int:
        return sum(r.samples_written for r in self.writers)

    @property
    def bytes_written(self) -> int:
        return sum(r.bytes_written for r in self.writers)

    @property
    def samples_per_s(self) -> float:
        return self.samples_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def teacher_samples_per_s(self) -> float:
        """Per writer, averaged: samples a writer's teacher computes per second of its own time."""
        t = sum(r.teacher_seconds for r in self.writers)
        return self.samples_written / t if t > 0 else 0.0


def prepare_store(cfg, teacher: Any, source: Any, *, plan: bool = False, lock_wait: float = 0.0) -> Prepared:
    """Create the cache's metadata once, before the writers start. ``plan``: check the inputs and estimate
    the size first (``plan.plan_build``), refusing what a build could not use or what does not fit.
    Takes the single-writer lock for the moment it runs: refuses while any build of this cache is live."""
    lines: list[str] = []
    if plan:
        p = plan_build(cfg, teacher, source)
        lines = p.lines()
        p.check()
    if len(source) == 0:
        raise CacheError("the sample source is empty: nothing to cache")
    names = cache_target_names(cfg.cache)
    info = cache_info(cfg, teacher, source, teacher.target_specs(tuple(cfg.augment.crop_size), names))
    cache_dir = cache_dir_for(cfg, info.fingerprint)
    storage.makedirs(cache_dir)
    own = lock_path(cache_dir, 0, 1)
    with BuildLock(own, wait=lock_wait):
        check_no_other_layout(cache_dir, own, 1)
        remove_debris(cache_dir, 0, 1)  # no writer is live: every temp file here is debris
        create_store(cache_dir, info)
    return Prepared(cache_dir, info.fingerprint, info.num_shards, lines)


# -----------------------------------------------------------------------------------------------
# torchrun: one writer per rank


def build_cache_torchrun(cfg, teacher: Any, source: Any, *, progress: bool = True, lock_wait: float = 0.0,
                         plan: bool = False, device=None, record: bool = False) -> MultiBuildResult:
    """This rank's share of a build with one writer per rank of the process group (``engine.distributed.
    setup`` first; any backend — only objects are exchanged). Every rank returns the same result; an
    error on any rank is raised on every rank (naming that rank). ``record``: rank 0 writes the run's
    ``cache_build.json`` (``build.write_build_record``)."""
    from attnfd_pipeline.engine import distributed

    rank, world = distributed.rank(), distributed.world_size()
    t0 = time.perf_counter()
    prepared: Prepared | str | None = None
    own_error: BaseException | None = None
    if rank == 0:
        try:
            prepared = prepare_store(cfg, teacher, source, plan=plan, lock_wait=lock_wait)
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, or they wait forever
            own_error, prepared = e, f"{type(e).__name__}: {e}"
    prepared = distributed.broadcast_object(prepared)  # also the barrier: metadata exists from here on
    if own_error is not None:
        raise own_error
    if isinstance(prepared, str):
        raise CacheError(f"rank 0 could not prepare the cache: {prepared}")
    try:
        mine: BuildResult | str = build_cache(cfg, teacher, source, rank=rank, world=world, progress=progress,
                                              lock_wait=lock_wait, device=device)
    except Exception as e:  # noqa: BLE001
        own_error, mine = e, f"{type(e).__name__}: {e}"
    everyone = distributed.gather_objects(mine)
    if own_error is not None:
        raise own_error
    failed = [(r, x) for r, x in enumerate(everyone) if isinstance(x, str)]
    if failed:
        raise CacheError("; ".join(f"writer rank {r} of {world} failed: {x}" for r, x in failed)
                         + " (committed shards are kept: rerun to resume)")
    result = MultiBuildResult(prepared.path, prepared.fingerprint, world, everyone, time.perf_counter() - t0,
                              prepared.plan_lines)
    if record and rank == 0:
        write_build_record(cfg, result, world)
    return result


# -----------------------------------------------------------------------------------------------
# dask.distributed: one writer per task, the teacher loaded in the worker


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def _prepare_task(cfg, load_teacher: Callable[[], Any], make_source: Callable[[], Any], plan: bool,
                  lock_wait: float, threads: int | None) -> Prepared:
    _threads(threads)
    return prepare_store(cfg, load_teacher(), make_source(), plan=plan, lock_wait=lock_wait)


def _writer_task(cfg, load_teacher: Callable[[], Any], make_source: Callable[[], Any], rank: int, world: int,
                 lock_wait: float, threads: int | None) -> BuildResult:
    _threads(threads)
    return build_cache(cfg, load_teacher(), make_source(), rank=rank, world=world, progress=False,
                       lock_wait=lock_wait)


def build_cache_dask(cfg, load_teacher: Callable[[], Any], make_source: Callable[[], Any], *,
                     scheduler: str | None = None, workers: int = 2, world: int | None = None,
                     gpus_per_writer: int = 0, lock_wait: float = 0.0, plan: bool = False,
                     processes: bool = True, threads_per_writer: int | None = None,
                     record: bool = False) -> MultiBuildResult:
    """Build with ``world`` writers, each a task ``build_cache(rank=r, world=world)`` that loads the
    teacher (``load_teacher()``) and the source (``make_source()``) in its worker — both picklable
    callables, e.g. ``functools.partial``. ``scheduler``: address of an existing cluster (``world``
    defaults to its number of workers; ``gpus_per_writer`` claims the ``GPU`` worker resource); else a
    LocalCluster of ``workers`` single-threaded processes (``world`` defaults to ``workers``), each
    with torch using ``threads_per_writer`` threads (default: this process's torch threads / workers).
    A first task creates the metadata (``plan``: after checking the inputs and the size, ``prepare_store``);
    ``record``: this process then writes the run's ``cache_build.json`` (``build.write_build_record``).

    On CPU the teacher's float32 outputs depend on torch's thread count (parallel reductions sum in
    another order), so "bitwise equal to a single-process build" holds against a build that ran with
    the same number of threads per process (``OMP_NUM_THREADS``); on GPUs, against the same GPU model
    and software with deterministic kernels."""
    import dask
    from dask.distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with dask.config.set({"distributed.worker.daemon": True}):  # writers start threads, never processes
        cluster = None
        if scheduler:
            client, threads = Client(scheduler), threads_per_writer
            world = world or len(client.scheduler_info()["workers"])
        else:
            if workers < 1:
                raise UserError(f"workers = {workers}: need at least one")
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                                   dashboard_address=None)
            client = Client(cluster)
            threads = threads_per_writer or (max(1, torch.get_num_threads() // workers) if processes else None)
            world = world or workers
        try:
            if world < 1:
                raise UserError("no dask workers to write the cache")
            resources = {"GPU": gpus_per_writer} if gpus_per_writer else None
            prepared = client.submit(_prepare_task, cfg, load_teacher, make_source, plan, lock_wait, threads,
                                     resources=resources, pure=False).result()
            futures = [client.submit(_writer_task, cfg, load_teacher, make_source, r, world, lock_wait, threads,
                                     resources=resources, pure=False,
                                     key=f"attnfd-cache-{prepared.fingerprint[:8]}-rank{r}of{world}")
                       for r in range(world)]
            results = client.gather(futures)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    result = MultiBuildResult(prepared.path, prepared.fingerprint, world, list(results), time.perf_counter() - t0,
                              prepared.plan_lines)
    if record:
        write_build_record(cfg, result, world)
    return result

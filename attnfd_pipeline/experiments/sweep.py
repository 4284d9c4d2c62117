"""α × seed sweeps on one cache, scheduled on a ``dask.distributed`` cluster.

Each run gets its own directory (``runs/<name>/student/<run>/``) with its resolved config; a run whose
``result.json`` exists is skipped, so a rerun of the same sweep only does what is missing. By default
a ``LocalCluster`` of ``workers`` single-threaded processes is started; ``scheduler`` connects to an
existing cluster instead (one GPU per run: start workers with ``--resources GPU=1`` and pass
``gpus_per_run=1``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from attnfd_pipeline.config import Config
from attnfd_pipeline.records import RESULT_JSON, RunRecord
from attnfd_pipeline.errors import UserError


def parse_list(text: str, kind=float) -> list:
    """``"0.1,1,2"`` → [0.1, 1.0, 2.0] (clear error naming the bad item)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"empty list {text!r}")
    out = []
    for t in items:
        try:
            out.append(kind(t))
        except ValueError:
            raise UserError(f"{t!r} in {text!r} is not a {kind.__name__}") from None
    return out


def sweep_configs(cfg: Config, alphas: Sequence[float], seeds: Sequence[int]) -> list[Config]:
    """One config per (α, seed), everything else shared (so all runs read the same cache)."""
    out = []
    for alpha in alphas:
        if alpha < 0:
            raise UserError(f"alpha {alpha} must be >= 0")
        for seed in seeds:
            train = dataclasses.replace(cfg.student.train, seed=int(seed))
            student = dataclasses.replace(cfg.student, alpha=float(alpha), train=train)
            out.append(dataclasses.replace(cfg, student=student))
    return out


def is_done(cfg: Config) -> bool:
    from attnfd_pipeline.runs import student_dir

    return (student_dir(cfg) / RESULT_JSON).is_file()


def _run_one(cfg: Config) -> dict:
    import torch

    from attnfd_pipeline.runs import run_student

    torch.set_num_threads(1)  # one run per single-threaded worker: runs don't fight over cores
    return run_student(cfg, resume=True, progress=False)


def run_sweep(cfg: Config, alphas: Sequence[float], seeds: Sequence[int], *, scheduler: str | None = None,
              workers: int = 1, gpus_per_run: int = 0, processes: bool = True) -> list[dict]:
    """Run every missing (α, seed) run on a dask cluster; returns the results of the runs it ran.
    ``processes=False`` runs the LocalCluster's workers as threads of this process (no worker start-up:
    a small sweep on one machine)."""
    import dask
    from dask.distributed import Client, as_completed

    from attnfd_pipeline.runs import finished_result

    configs = sweep_configs(cfg, alphas, seeds)
    for c in configs:  # before anything runs: a finished run from another config must not stand in
        if is_done(c):
            finished_result(c)
    todo = [c for c in configs if not is_done(c)]
    if not todo:
        return []
    # Runs start DataLoader worker processes: dask workers must not be daemonic.
    with dask.config.set({"distributed.worker.daemon": False}):
        # without a scheduler the client starts a LocalCluster of its own, and closes it with itself
        client = Client(scheduler) if scheduler else Client(n_workers=workers, threads_per_worker=1,
                                                            processes=processes, dashboard_address=None)
        with client:
            resources = {"GPU": gpus_per_run} if gpus_per_run else None
            futures = [client.submit(_run_one, c, key=f"attnfd-{c.name}-a{c.student.alpha:g}-s{c.student.train.seed}",
                                     resources=resources, pure=False) for c in todo]
            return _collect(as_completed(futures), len(todo), skipped=len(configs) - len(todo))


def _collect(completed, n: int, *, skipped: int) -> list[dict]:
    """Results as runs finish; the whole sweep's progress (runs done, rate, ETA) after each."""
    from attnfd_pipeline.engine.logging import get_logger
    from attnfd_pipeline.progress import Progress

    log = get_logger()
    log.info(f"[sweep] {n} runs to train ({skipped} already done); each run's lines are in its log.txt")
    results = []
    with Progress(n, "sweep", "runs", log_every=0) as bar:
        for fut in completed:
            r = fut.result()
            rec = RunRecord.from_dict(r)
            log.info(f"[sweep] {rec.run}: best mIoU {rec.best_miou * 100:.2f}")
            results.append(r)
            bar.update(1, last=rec.run)
    return results

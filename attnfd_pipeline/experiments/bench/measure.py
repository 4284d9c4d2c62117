"""The timed parts of the bench: training steps with a clock between their phases, the DataLoader's
throughput, torch.profiler tables, and the cache build against bare teacher inference, each block
interleaved between the variants (why: docs/bench.md "How it measures")."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from attnfd_pipeline.experiments.bench.common import STEP_PHASES, VARIANTS, log, median, sync
from attnfd_pipeline.experiments.bench.workload import Setup, block_keys


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its finished children (getrusage)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _workers_iterator(setup: Setup):
    # DataLoader offers no public handle on its persistent workers; its iterator holds them
    return setup.loader._iterator if setup.loader.num_workers > 0 else None


def worker_pids(setup: Setup) -> list[int]:
    it = _workers_iterator(setup)
    return [] if it is None else [w.pid for w in it._workers if w.pid is not None]


def shutdown(setup: Setup) -> None:
    """Stop the persistent loader workers of a setup (DataLoader keeps them until collected)."""
    if (it := _workers_iterator(setup)) is not None:
        it._shutdown_workers()
        setup.loader._iterator = None


def one_step(setup: Setup, it) -> dict[str, float]:
    """``engine.train.train_one_epoch``'s step, with clocks between its phases."""
    from attnfd_pipeline.engine.train import autocast_for, to_device

    device, scaler = setup.device, setup.scaler
    clock = []

    def tick():  # the end of a phase: the device has finished it too
        sync(device)
        clock.append(time.perf_counter())

    tick()
    c0 = time.process_time()
    batch = to_device(next(it), device)
    tick()
    with autocast_for(device, setup.amp):
        loss, logs = setup.task.train_step(batch, 0)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"bench {setup.name}: loss is {loss.item()} (not finite)")
    tick()
    setup.optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    tick()
    if scaler is not None:
        scaler.step(setup.optimizer)
        scaler.update()
    else:
        setup.optimizer.step()
    setup.scheduler.step()
    _ = {"loss": float(loss.detach()), **logs}
    tick()
    cpu = time.process_time() - c0
    phases = {p: b - a for p, a, b in zip(STEP_PHASES, clock, clock[1:])}
    return {**phases, "total": clock[-1] - clock[0], "cpu_main": cpu}


def train_block(setup: Setup, keys: Sequence[tuple[int, int]], warmup: int, profiler_factory: Callable | None = None
                ) -> tuple[list[dict[str, float]], Any]:
    """Run one block of training steps over ``keys`` (a fresh pass of the persistent loader); returns
    per-step times (data wait, forward+loss, backward, optimizer, total, CPU seconds) after ``warmup``
    steps, and the profiler of the last step when ``profiler_factory`` is given."""
    setup.sampler.keys = list(keys)
    setup.task.modules.train()
    n = len(setup.loader)
    records, prof = [], None
    it = iter(setup.loader)
    pids = worker_pids(setup)
    wcpu0 = sum(proc_cpu_s(p) for p in pids)
    for j in range(n):
        prof = profiler_factory() if profiler_factory is not None and j == n - 1 else None
        with prof if prof is not None else contextlib.nullcontext():
            rec = one_step(setup, it)
        if j >= warmup:
            records.append(rec)
    for _ in it:  # the sampler holds exactly n batches; this only closes the pass
        pass
    # loader workers' CPU seconds per batch over the whole block (every batch of it was loaded in it)
    wcpu = (sum(proc_cpu_s(p) for p in pids) - wcpu0) / max(n, 1) if pids else 0.0
    for r in records:
        r["cpu_workers"] = wcpu
    return records, prof


def reader_block(setup: Setup, keys: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Samples/s the setup's DataLoader delivers with nothing consuming: the first batch (pipeline
    fill after the reset) is not timed."""
    setup.sampler.keys = list(keys)
    it = iter(setup.loader)
    bs = len(next(it)["index"])
    t0 = time.perf_counter()
    n = sum(len(batch["index"]) for batch in it)
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": dt, "samples_per_s": n / dt if dt > 0 else float("nan"), "batch_size": bs}


def time_steps(cfg, setups: dict[str, Setup], w, n_images: int) -> tuple[dict[str, list[list[dict]]], list[dict]]:
    """Interleaved blocks: every variant trains the same keys in each repeat (order reversed on odd
    repeats), then the cached DataLoader is timed alone. Returns the step records per variant and
    repeat, and the reader rows."""
    bs = w.batch_size
    steps: dict[str, list[list[dict]]] = {v: [] for v in VARIANTS}
    reader_rows = []
    for v in VARIANTS:  # start the workers and run every code path once before anything is timed
        train_block(setups[v], block_keys(cfg, n_images, bs, first_epoch=999_999), warmup=1)
    log("setups primed")
    for r in range(w.repeats):
        keys = block_keys(cfg, n_images, (w.warmup_steps + w.timed_steps) * bs, first_epoch=1000 * r)
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            steps[v].append(train_block(setups[v], keys, w.warmup_steps)[0])
        rkeys = block_keys(cfg, n_images, (w.reader_batches + 1) * bs, first_epoch=1000 * r + 500)
        rd = {**reader_block(setups["cached"], rkeys), "repeat": r}
        reader_rows.append(rd)
        log(f"steps repeat {r + 1}/{w.repeats}: " + ", ".join(
            f"{v} {median([x['total'] for x in steps[v][-1]]):.3f} s" for v in VARIANTS)
            + f"; reader {rd['samples_per_s']:.1f} samples/s")
    return steps, reader_rows


def reader_breakdown(cached: Setup, plain: Setup, source, n: int) -> dict:
    """Per-sample ms in one process: the plain crop (load + augment), the cached replay (load + augment +
    hash check) and the target read (decode + checksum), so a slow reader can be attributed."""
    from attnfd_pipeline import augment
    from attnfd_pipeline.data.stage2 import replay_cached

    reader = cached.dataset.reader
    times: dict[str, list[float]] = {"plain_crop_ms": [], "cached_replay_ms": [], "target_read_ms": []}
    for i in range(n):
        k = cached.dataset.seed_fn(0, i)
        clock = [time.perf_counter()]
        plain.dataset.crop(0, i)
        clock.append(time.perf_counter())
        augment.normalize(replay_cached(reader, source, i, k, check=True)[0])
        clock.append(time.perf_counter())
        reader.read(i, k, cached.dataset.names)
        clock.append(time.perf_counter())
        for ts, a, b in zip(times.values(), clock, clock[1:]):
            ts.append(b - a)
    return {"samples": n, **{key: median(ts) * 1e3 for key, ts in times.items()}}


def top_ops(prof, n: int, device: torch.device) -> tuple[list[dict], list[dict]]:
    """The ``n`` ops of the profiled step with the most self time (device time on CUDA), and the ``n`` that
    allocated the most memory (self, net of what they freed)."""
    where = "device" if device.type == "cuda" else "cpu"
    events = prof.key_averages()
    by_time = sorted(events, key=lambda e: getattr(e, f"self_{where}_time_total"), reverse=True)[:n]
    mem = f"self_{where}_memory_usage"
    by_mem = sorted((e for e in events if getattr(e, mem) > 0), key=lambda e: getattr(e, mem), reverse=True)[:n]
    times = [{"op": e.key, "calls": int(e.count), "self_cpu_ms": e.self_cpu_time_total / 1e3,
              "cpu_total_ms": e.cpu_time_total / 1e3}
             | ({"self_device_ms": e.self_device_time_total / 1e3} if where == "device" else {}) for e in by_time]
    return times, [{"op": e.key, "calls": int(e.count), "self_mib": getattr(e, mem) / 2**20} for e in by_mem]


def profile_variants(cfg, setups: dict[str, Setup], w, n_images: int, device: torch.device
                     ) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """torch.profiler on one step of each variant: top ops by time and by memory."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    times, mems = {}, {}
    for v in VARIANTS:
        keys = block_keys(cfg, n_images, 2 * w.batch_size, first_epoch=99_000)[:w.batch_size]
        _, prof = train_block(setups[v], keys, warmup=1,
                              profiler_factory=lambda: profile(activities=acts, profile_memory=True))
        times[v], mems[v] = top_ops(prof, w.profile_rows, device)
    log("profiled one step of each variant")
    return times, mems


# ---------------------------------------------------------------------------------------------
# cache build vs bare teacher inference


def prepare_crops(cfg, source) -> list[list[torch.Tensor]]:
    """Per shard, the normalised crops ``build_cache`` prepares."""
    from attnfd_pipeline.cache.build import shard_samples
    from attnfd_pipeline.cache.schema import ShardRange, num_shards, shard_range

    return [shard_samples(cfg, source, ShardRange(s, *shard_range(s, cfg.cache.shard_size, len(source))),
                          source.ids)[1] for s in range(num_shards(len(source), cfg.cache.shard_size))]


def bare_inference(teacher, shards, names: Sequence[str], batch_size: int, device: torch.device,
                   keep: bool) -> tuple[dict, dict[str, np.ndarray] | None]:
    """The teacher alone on the build's batches (same batching: per shard, ``batch_size`` crops)."""
    from attnfd_pipeline.cache.build import run_teacher

    outs: list[dict[str, np.ndarray]] = []
    n = 0
    sync(device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for crops in shards:
        got, _ = run_teacher(teacher, crops, names, batch_size, device)
        n += len(crops)
        if keep:
            outs.append(got)
    sync(device)
    dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    res = {"samples": n, "seconds": dt, "cpu_seconds": cpu, "samples_per_s": n / dt if dt > 0 else float("nan")}
    return res, ({k: np.concatenate([got[k] for got in outs]) for k in names} if keep else None)


def timed_build(cfg, teacher, source, work: Path, r: int) -> tuple[dict, Path]:
    """``build_cache`` once; repeats after the first build into their own root, removed after."""
    from attnfd_pipeline.cache import build_cache

    root = work / "cache" if r == 0 else work / f"cache-r{r}"
    cfg_r = cfg if r == 0 else dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, root=str(root)))
    c0 = cpu_seconds()
    res = build_cache(cfg_r, teacher, source, progress=False)
    row = {"build_samples_per_s": res.samples_per_s, "build_seconds": res.seconds,
           "build_cpu_seconds": cpu_seconds() - c0, "build_samples": res.samples_written,
           "teacher_seconds": res.teacher_seconds, "teacher_samples_per_s_in_build": res.teacher_samples_per_s,
           "load_seconds": res.load_seconds, "writer_seconds": res.writer_seconds, "bytes_written": res.bytes_written}
    if r > 0:
        shutil.rmtree(root, ignore_errors=True)
    return row, res.path


def time_cache_build(cfg, teacher, source, work: Path, repeats: int, device: torch.device
                     ) -> tuple[list[dict], Path, dict[str, np.ndarray]]:
    """``build_cache`` and the bare teacher on the same batches, interleaved (order reversed on odd
    repeats). Returns the rows, the first build's cache and the teacher's float32 outputs."""
    from attnfd_pipeline.cache.schema import cache_target_names

    names = cache_target_names(cfg.cache)
    shards = prepare_crops(cfg, source)
    rows, cache_dir, outs32 = [], None, None
    for r in range(repeats):
        order = ("build", "bare") if r % 2 == 0 else ("bare", "build")
        row: dict[str, Any] = {"repeat": r, "order": list(order)}
        for what in order:
            if what == "build":
                got_row, path = timed_build(cfg, teacher, source, work, r)
                row.update(got_row)
                cache_dir = cache_dir or path
            else:
                res_b, got = bare_inference(teacher, shards, names, cfg.cache.batch_size, device,
                                            keep=outs32 is None)
                outs32 = outs32 or got
                row.update({f"bare_{k}": v for k, v in res_b.items()})
        row["ratio"] = row["build_samples_per_s"] / row["bare_samples_per_s"]
        row["cpu_ratio"] = row["bare_cpu_seconds"] / row["build_cpu_seconds"] if row["build_cpu_seconds"] else None
        rows.append(row)
        log(f"cache build repeat {r + 1}/{repeats}: build {row['build_samples_per_s']:.2f} samples/s, "
            f"bare teacher {row['bare_samples_per_s']:.2f} samples/s (ratio {row['ratio']:.3f})")
    return rows, cache_dir, outs32

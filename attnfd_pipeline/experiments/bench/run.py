"""The bench run: check the machine is quiet, measure every block, derive the figures, write
``results.json`` and ``results.md``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from attnfd_pipeline.experiments.bench.common import (QUIET_LOAD, STEP_PHASES, TOP_KEYS, VARIANTS, log, median,
                                                      step_totals)
from attnfd_pipeline.experiments.bench.figures import figures, sweep
from attnfd_pipeline.experiments.bench.markdown import format_markdown
from attnfd_pipeline.experiments.bench.measure import (profile_variants, reader_breakdown, shutdown,
                                                       time_cache_build, time_steps)
from attnfd_pipeline.experiments.bench.memory import measure_memory
from attnfd_pipeline.experiments.bench.storage import on_disk, storage_analysis, storage_options
from attnfd_pipeline.experiments.bench.workload import (DEFAULT, QUICK, Workload, build_setup, make_dataset,
                                                        make_teacher_bundle, param_counts, workload_config)
from attnfd_pipeline.errors import UserError


class BusyMachineError(RuntimeError):
    """The machine is too busy at the start for wall-clock figures to mean what they say."""


def check_load(quick: bool, allow_busy: bool, wait_quiet: float = 0.0) -> list[float]:
    """Print the load average; refuse a full run at or above ``QUIET_LOAD`` unless ``allow_busy``. With
    ``wait_quiet`` > 0, first wait up to that many seconds for the load to fall below ``QUIET_LOAD`` (the 1-minute
    average takes a few minutes to decay after a job such as `make teacher`)."""
    load = list(os.getloadavg())
    deadline = time.monotonic() + wait_quiet
    if load[0] >= QUIET_LOAD and wait_quiet > 0 and not quick:
        log(f"load average {load[0]:.2f} ≥ {QUIET_LOAD:g}: waiting up to {wait_quiet:.0f} s for a quiet machine")
    while load[0] >= QUIET_LOAD and time.monotonic() < deadline and not quick:
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
        load = list(os.getloadavg())
    busy = load[0] >= QUIET_LOAD
    log(f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        + (f" (≥ {QUIET_LOAD:g}: other load will move the wall-clock figures)" if busy else " (quiet)"))
    if busy and not (quick or allow_busy):
        raise BusyMachineError(
            f"load average {load[0]:.2f} ≥ {QUIET_LOAD:g} at start: the bench would measure the other load as much "
            f"as the pipeline. Run it on a quiet machine, or pass --allow-busy to measure anyway (the CPU-second "
            f"ratios in results.md are then the steadier figures).")
    return load


def run_bench(out_dir: str | Path = "bench", *, quick: bool = False, repeats: int | None = None,
              recipe: str | Path | None = "configs/demo.toml", overrides: Sequence[str] = (),
              work_dir: str | Path | None = None, threads: int | None = None, allow_busy: bool = False,
              wait_quiet: float = 0.0) -> dict:
    """Measure everything, write ``results.json`` and ``results.md`` into ``out_dir``, return the dict.

    The sizes are ``QUICK`` or ``DEFAULT``, ``repeats`` and ``threads`` overriding theirs; ``recipe`` +
    ``overrides`` give the augmentation, codec, loss norm, optimiser and the sweep's epochs and K; the dataset,
    teacher bundle and caches live in a temp dir under ``work_dir``. A full run refuses to start on a busy
    machine (``BusyMachineError``) unless ``allow_busy``; ``wait_quiet``: seconds to wait for a quiet machine
    first. With the recipe's trained teacher present, the storage fidelity bench runs last
    (``recommended_storage``)."""
    from attnfd_pipeline.config import load_config
    from attnfd_pipeline.utils import atomic_write_json, atomic_write_text

    if repeats is not None and repeats < 1:
        raise UserError("repeats must be >= 1")
    if threads is not None and threads < 0:
        raise UserError("threads must be >= 0 (0 = auto)")
    given = {k: v for k, v in (("repeats", repeats), ("threads", threads)) if v is not None}
    w = dataclasses.replace(QUICK if quick else DEFAULT, **given)
    load = check_load(quick, allow_busy, wait_quiet=wait_quiet)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe_cfg = load_config(recipe, list(overrides))
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="attnfd-bench-", dir=work_dir)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(w.threads or auto_threads(w.workers))
    try:
        results = measure(w, Path(tmp.name), recipe, recipe_cfg, overrides, quick, load)
    finally:
        torch.set_num_threads(saved_threads)
        tmp.cleanup()
    # after the timed blocks, so its own load cannot move them
    results["storage"]["recommended"] = recommended_storage(recipe_cfg, out_dir, quick)
    results["samples"]["wall_s"] = time.perf_counter() - t_start
    missing = set(TOP_KEYS) ^ set(results)
    assert not missing, f"results keys differ from TOP_KEYS: {missing}"
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", format_markdown(results))
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'} "
        f"({results['samples']['wall_s']:.0f} s)")
    return results


def recommended_storage(recipe_cfg, out_dir: Path, quick: bool, *, crops=(64, 257), images: int = 8) -> dict:
    """``storage.recommended``: the storage fidelity bench (``experiments.fidelity``) on the recipe's *trained*
    teacher — a trained teacher's maps are sparser and compress differently from the random-weight bench
    teacher's — also written to ``<out_dir>/storage.{json,md}``. Without a trained teacher bundle (or with
    ``quick``) the encoding is None and ``why`` says what is missing."""
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.experiments.fidelity import write_storage_bench
    from attnfd_pipeline.teacher import bundle_path, load_teacher

    bundle = bundle_path(recipe_cfg)
    if quick:
        return {"encoding": None, "why": "--quick: the fidelity bench needs the recipe's trained teacher"}
    if not bundle.is_file():
        return {"encoding": None, "why": f"no trained teacher at {bundle}: run `make teacher` (or `attnfd teacher "
                                         f"import`), then the bench again"}
    log(f"storage fidelity on the trained teacher {bundle}")
    source = ImageSource.from_config(recipe_cfg, recipe_cfg.data.train_split)
    fig = write_storage_bench(recipe_cfg, load_teacher(bundle, "cpu"), source, out_dir, crops=crops, images=images)
    log(f"storage: recommended {fig['recommended']['encoding']} (wrote {out_dir / 'storage.json'})")
    return fig["recommended"] | {"min_cosine": fig["min_cosine"], "teacher": str(bundle), "details": "storage.json"}


def auto_threads(workers: int) -> int:
    """Intra-op threads that leave one core per loader worker (docs/bench.md "How it measures": on 2 shared
    cores, 2 threads took 4–10 s and 1 thread 2.3–3 s per teacher batch)."""
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - max(0, workers)))


def device_info(device: torch.device, load: list[float]) -> dict:
    info = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}
    with contextlib.suppress(OSError):
        info |= next(({"cpu": line.split(":", 1)[1].strip()} for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), {})
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    info["load_average_start"] = load
    return info


def measure(w: Workload, work: Path, recipe, recipe_cfg, overrides, quick: bool, load: list[float]) -> dict:
    """Every block of the bench, in order: cache build vs bare teacher and storage, interleaved steps and
    reader, profiles, peak memory (a process per variant); then the figures."""
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.teacher import load_teacher
    from attnfd_pipeline.utils import resolve_device

    cfg = workload_config(w, work, make_dataset(w, work / "data"), recipe, overrides)
    device = resolve_device(cfg.student.train.device)
    source = ImageSource.from_config(cfg, cfg.data.train_split)
    log(f"workload: teacher {w.teacher}, student {w.student}, {w.num_classes} classes, crop {w.crop}, "
        f"batch {w.batch_size}, points {'+'.join(w.points)}, {w.workers} workers, {len(source)} images × K={w.K}, "
        f"{w.repeats} repeats on {device}")
    bundle = make_teacher_bundle(cfg, w, source)

    build_rows, cache_dir, outs32 = time_cache_build(cfg, load_teacher(bundle, device), source, work, w.repeats, device)
    storage = storage_analysis(outs32, storage_options(cfg.cache.codec, cfg.cache.level, w.mantissa_options))
    storage["on_disk"] = on_disk(cache_dir, len(source) * w.K)
    storage["weights"] = "random (BatchNorm calibrated): compression depends on the value distribution"
    del outs32
    log(f"storage: {storage['best_option']} ×{storage['value'] or float('nan'):.2f} vs float32")

    setups = {v: build_setup(cfg, v, num_classes=w.num_classes, bundle=bundle, cache_dir=cache_dir, device=device)
              for v in VARIANTS}
    steps, reader_rows = time_steps(cfg, setups, w, len(source))
    breakdown = reader_breakdown(setups["cached"], setups["plain"], source, n=min(len(source), 2 * w.batch_size))
    profiles, profiles_mem = profile_variants(cfg, setups, w, len(source), device) if w.profile else ({}, {})
    params = param_counts(setups)
    for s in setups.values():
        shutdown(s)
    del setups

    memory = measure_memory(cfg, w, VARIANTS, bundle=bundle, cache_dir=cache_dir, device=device,
                            n_images=len(source), work=work)

    results, med = figures(steps, reader_rows, build_rows, memory, w, device)
    results.update({
        "storage": storage,
        "sweep_economics": sweep(med, median([r["build_samples_per_s"] for r in build_rows]), w.batch_size,
                                 recipe_cfg.student.train.epochs, recipe_cfg.cache.K),
        "device": device_info(device, load),
        "torch_version": torch.__version__,
        "config": {"workload": w.to_dict(), "quick": quick, "recipe": str(recipe) if recipe else None,
                   "overrides": list(overrides), "resolved": cfg.to_dict()},
    })
    results["samples"] = samples_block(w, len(source), steps, reader_rows, build_rows, memory, {
        "reader_breakdown_ms": breakdown, "params": params, "profile": profiles, "profile_memory": profiles_mem})
    return results


def samples_block(w: Workload, n_images: int, steps, reader_rows, build_rows, memory, extra: dict) -> dict:
    """``results.json["samples"]``: the raw measurements behind every figure."""
    phases = (*STEP_PHASES, "cpu_main", "cpu_workers")
    return {
        "cache_build": build_rows,
        "counts": {"train_images": n_images, "K": w.K, "cache_samples": n_images * w.K,
                   "batch_size": w.batch_size, "repeats": w.repeats, "warmup_steps_per_block": w.warmup_steps,
                   "timed_steps_per_block": w.timed_steps, "timed_steps_per_variant": w.repeats * w.timed_steps,
                   "reader_batches_per_block": w.reader_batches, "memory_steps": max(1, w.memory_steps),
                   "storage_samples": n_images * w.K},
        "step_s": step_totals(steps),
        "step_phases_s": {v: [[{p: x[p] for p in phases} for x in recs] for recs in steps[v]] for v in VARIANTS},
        "reader": reader_rows,
        "memory": memory,
        **extra,
        "load_average_end": list(os.getloadavg()),
    }

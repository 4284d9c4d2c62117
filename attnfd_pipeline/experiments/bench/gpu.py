"""`attnfd bench-gpu` (``scripts/gpu_check.sh``): the figures a CPU cannot give, at the paper's shapes, with the
bench's own timed blocks; writes ``gpu.json`` and ``gpu.md`` (docs/bench.md "GPU check")."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch

from attnfd_pipeline.experiments.bench.common import (VARIANTS, fmt, log, median, metric, ratios, repeat_medians,
                                                      step_totals, table)
from attnfd_pipeline.experiments.bench.measure import reader_block, shutdown, time_cache_build, time_steps
from attnfd_pipeline.experiments.bench.memory import measure_memory
from attnfd_pipeline.experiments.bench.run import auto_threads, device_info
from attnfd_pipeline.experiments.bench.workload import (Workload, block_keys, build_setup, make_dataset,
                                                        make_teacher_bundle, workload_config)

# VOC-sized generated images: sides 375..500 px (× the 513 crop)
GPU = Workload(teacher="deeplabv3plus_resnet101", student="deeplabv3plus_resnet18", crop=513, batch_size=6,
               workers=4, n_train=24, K=1, shard_size=6, image_scale=(375 / 513, 500 / 513), repeats=2,
               warmup_steps=1, timed_steps=4, reader_batches=6, memory_steps=2, memory_mode="each", threads=0,
               calib_batches=1, profile=False)
QUICK = dataclasses.replace(GPU, teacher="deeplabv3plus_resnet18", crop=48, batch_size=2, workers=0, n_train=4,
                            shard_size=2, image_scale=(1.0, 1.25), repeats=1, timed_steps=1, reader_batches=1,
                            memory_steps=1, memory_mode="inline", threads=1)
FEED_WORKERS = (4, 8)
GOALS = {"step_ratio_cached_over_online": ("<=", 0.6), "peak_mem_ratio_cached_over_online": ("<", 1.0)}
# the figures of gpu.md's table, in order
FIGURES = ("step_ratio_cached_over_online", "step_ratio_cached_over_inmemory", "peak_mem_ratio_cached_over_online",
           "cache_build_over_teacher_inference")
MEMORY_VARIANTS = ("inmemory", "cached", "online")


def feed_rates(cfg, w: Workload, bundle, cache_dir, device, n_images: int, workers: tuple[int, ...]) -> dict:
    """Samples/s the cached variant's DataLoader delivers with nothing consuming, per worker count."""
    out = {}
    for n in workers:
        c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=n))
        setup = build_setup(c, "cached", num_classes=w.num_classes, bundle=bundle, cache_dir=cache_dir, device=device)
        rows = []
        for r in range(max(1, w.repeats)):
            keys = block_keys(cfg, n_images, (w.reader_batches + 1) * w.batch_size, first_epoch=7000 + 100 * r)
            rows.append(reader_block(setup, keys)["samples_per_s"])
        shutdown(setup)
        out[str(n)] = median(rows)
        log(f"feed with {n} workers: {out[str(n)]:.1f} samples/s")
    return out


def gpu_figures(steps: dict, build_rows: list[dict], memory: dict, feeds: dict, batch: int) -> dict:
    """gpu.json's figures from the raw blocks: per-repeat ratios (median), absolute medians, memory."""
    per = repeat_medians(steps)
    mem = {v: memory[v].get("cuda_max_allocated_bytes") or memory[v]["rss_peak_bytes"] for v in memory}
    source = "cuda_max_allocated_bytes" if any("cuda_max_allocated_bytes" in m for m in memory.values()) else "rss"
    cached_sps = batch / median(per["cached"])
    values = (median(ratios(per["cached"], per["online"])), median(ratios(per["cached"], per["inmemory"])),
              mem["cached"] / mem["online"], median([r["ratio"] for r in build_rows]))
    return {
        **{key: metric(key, v, GOALS) for key, v in zip(FIGURES, values)},
        "step_s": {v: median(per[v]) for v in per},
        "peak_memory_bytes": mem, "peak_memory_source": source,
        "build_samples_per_s": median([r["build_samples_per_s"] for r in build_rows]),
        "bare_teacher_samples_per_s": median([r["bare_samples_per_s"] for r in build_rows]),
        "cached_consumes_samples_per_s": cached_sps,
        "feed_samples_per_s": feeds,
        "feed_over_consumption": {k: v / cached_sps for k, v in feeds.items()},
    }


def run_gpu_check(out: str | Path = "bench", *, quick: bool = False, recipe: str | Path | None = "configs/voc.toml",
                  work_dir: str | Path | None = None, device: str = "cuda") -> dict:
    """Measure, write ``gpu.json`` / ``gpu.md`` under ``out``, return the record."""
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.teacher import load_teacher
    from attnfd_pipeline.utils import atomic_write_json

    w = QUICK if quick else GPU
    dev = torch.device("cpu" if quick else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench-gpu: no CUDA device here (use --quick for the CPU harness check)")
    t0 = time.perf_counter()
    torch.set_num_threads(w.threads or auto_threads(w.workers))
    load = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="attnfd-gpu-", dir=work_dir) as tmp:
        work = Path(tmp)
        cfg = workload_config(w, work, make_dataset(w, work / "data"), recipe,
                              [f'student.train.device="{dev.type}"', "student.train.amp=true"])
        source = ImageSource.from_config(cfg, cfg.data.train_split)
        log(f"bench-gpu: {w.teacher} → {w.student}, {w.crop} px, batch {w.batch_size}, {len(source)} images on {dev}")
        bundle = make_teacher_bundle(cfg, w, source)
        build_rows, cache_dir, _ = time_cache_build(cfg, load_teacher(bundle, dev), source, work, w.repeats, dev)
        setups = {v: build_setup(cfg, v, num_classes=w.num_classes, bundle=bundle, cache_dir=cache_dir, device=dev)
                  for v in VARIANTS}
        steps, _ = time_steps(cfg, setups, w, len(source))
        for s in setups.values():
            shutdown(s)
        del setups
        feeds = feed_rates(cfg, w, bundle, cache_dir, dev, len(source), workers=(0,) if quick else FEED_WORKERS)
        memory = measure_memory(cfg, w, MEMORY_VARIANTS, bundle=bundle, cache_dir=cache_dir, device=dev,
                                n_images=len(source), work=work)
    res = gpu_figures(steps, build_rows, memory, feeds, w.batch_size)
    res.update(device=device_info(dev, load), workload=w.to_dict(), quick=quick, wall_s=time.perf_counter() - t0,
               samples={"steps_s": step_totals(steps),
                        "cache_build": build_rows, "memory": memory})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "gpu.json", res)
    (out / "gpu.md").write_text(gpu_markdown(res))
    log(f"wrote {out / 'gpu.json'} ({res['wall_s']:.0f} s)")
    return res


def gpu_markdown(res: dict) -> str:
    d, w = res["device"], res["workload"]
    name = d.get("name", d.get("cpu", d["type"]))
    lines = [f"# bench-gpu: {w['teacher']} → {w['student']}, {w['crop']} px, batch {w['batch_size']}, AMP", "",
             f"Device: {name}." + (" **--quick: CPU, tiny sizes, the figures mean nothing.**" if res["quick"] else ""),
             ""]
    lines += table(["figure", "value", "goal"], [
        [f"`{k}`", res[k]["value"] if res[k]["value"] is None else round(res[k]["value"], 3),
         f"{res[k]['goal']}: {'met' if res[k]['met'] else '**missed**'}" if res[k].get("met") is not None else "–"]
        for k in FIGURES])
    mib = {v: b / 2**20 for v, b in res["peak_memory_bytes"].items() if b is not None}
    lines += [""] + table(["variant", "step (s, median)", "peak memory (MiB)"],
                          [[v, f"{s:.4f}", fmt(mib.get(v), ",.0f", "–")] for v, s in res["step_s"].items()])
    lines += ["", f"Cache build {res['build_samples_per_s']:.1f} samples/s vs bare teacher "
                  f"{res['bare_teacher_samples_per_s']:.1f}; the cached step consumes "
                  f"{res['cached_consumes_samples_per_s']:.1f} samples/s; the DataLoader alone delivers "
              + ", ".join(f"{v:.1f} with {k} workers" for k, v in res["feed_samples_per_s"].items()) + ".", ""]
    return "\n".join(lines)

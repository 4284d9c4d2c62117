"""The figures of ``results.json`` from the raw measurements: medians of per-repeat ratios, CPU-second
ratios beside the wall-clock ones (why: docs/bench.md "How it measures")."""

from __future__ import annotations

import math
from typing import Any

import torch

from attnfd_pipeline.experiments.bench.common import (STEP_PHASES, SWEEP_N, VARIANTS, median, metric, num, ratios,
                                                      repeat_medians)


def _efficiency(rep: dict) -> list[float]:
    """(online − cached) / (online − plain) per repeat: the part of online's extra cost the cache removes."""
    return [(o - c) / (o - p) if o != p else float("nan")
            for p, c, o in zip(rep["plain"], rep["cached"], rep["online"])]


def _step_figures(per_rep: dict, cpu_rep: dict, med: dict, cpu_med: dict, breakdown: dict) -> dict:
    step_abs = {f"{v}_s_per_step": num(med[v]) for v in VARIANTS}

    def step_ratio(a: str, b: str, **extra) -> dict:
        r = ratios(per_rep[a], per_rep[b])
        return metric(f"step_ratio_{a}_over_{b}", median(r), per_repeat=r, **step_abs,
                      cpu_ratio=num(median(ratios(cpu_rep[a], cpu_rep[b]))), **extra)

    eff, eff_cpu = _efficiency(per_rep), _efficiency(cpu_rep)
    return {
        "step_ratio_cached_over_plain": step_ratio(
            "cached", "plain", cpu_s_per_step={v: num(cpu_med[v]) for v in VARIANTS},
            breakdown_s={v: {p: num(x) for p, x in breakdown[v].items()} for v in VARIANTS}),
        "step_ratio_online_over_cached": step_ratio("online", "cached"),
        "saving_efficiency": metric("saving_efficiency", median(eff), per_repeat=eff,
                                    formula="(online - cached) / (online - plain)",
                                    cpu_value=num(median(eff_cpu)), cpu_per_repeat=eff_cpu),
        "step_ratio_cached_over_inmemory": step_ratio(
            "cached", "inmemory", meaning="the cached step over the same step with its targets already in memory: "
                                          "the cost of reading targets, 1.0 at best"),
        "head_share_of_cached_over_plain": _head_share(per_rep, cpu_rep),
    }


def _head_share(per_rep: dict, cpu_rep: dict) -> dict:
    """cached − plain = (inmemory − plain: the distillation head, which online distillation pays too)
    + (cached − inmemory: reading targets); the value is the head's fraction of it."""
    def split(rep):
        head = [i - p for i, p in zip(rep["inmemory"], rep["plain"])]
        read = [c - i for c, i in zip(rep["cached"], rep["inmemory"])]
        return head, read, ratios(head, [h + r for h, r in zip(head, read)])

    head, read, share = split(per_rep)
    cpu_head, cpu_read, cpu_share = split(cpu_rep)
    return metric("head_share_of_cached_over_plain", median(share), per_repeat=share,
                  formula="(inmemory - plain) / (cached - plain)",
                  head_s_per_step=num(median(head)), read_s_per_step=num(median(read)),
                  head_over_plain=num(median(ratios(head, per_rep["plain"]))),
                  cpu_value=num(median(cpu_share)), cpu_head_s_per_step=num(median(cpu_head)),
                  cpu_read_s_per_step=num(median(cpu_read)))


def _memory_figures(memory: dict, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    kind = "cuda_max_memory_allocated" if cuda else "peak RSS of the training process (main)"
    by = {v: memory[v]["cuda_max_allocated_bytes" if cuda else "rss_peak_bytes"] for v in VARIANTS}
    with_workers = {v: m["rss_peak_bytes"] + (m.get("workers_rss_peak_sum_bytes") or 0) for v, m in memory.items()}
    return {f"peak_mem_ratio_{a}_over_{b}": metric(f"peak_mem_ratio_{a}_over_{b}", by[a] / by[b], measure=kind,
                                                   bytes=by, with_workers_ratio=num(with_workers[a] / with_workers[b]))
            for a, b in (("cached", "plain"), ("online", "plain"), ("cached", "inmemory"))}


def _build_figure(build_rows: list[dict]) -> dict:
    col = {k: [r[k] for r in build_rows] for k in build_rows[0]}
    return metric(
        "cache_build_over_teacher_inference", median(col["ratio"]), per_repeat=col["ratio"],
        build_samples_per_s=num(median(col["build_samples_per_s"])),
        teacher_samples_per_s=num(median(col["bare_samples_per_s"])),
        # same-run diagnostics: the build's own teacher time vs its wall time, and vs the bare teacher
        teacher_share_in_build=num(median(ratios(col["teacher_seconds"], col["build_seconds"]))),
        teacher_in_build_over_bare=num(median(ratios(col["teacher_samples_per_s_in_build"],
                                                     col["bare_samples_per_s"]))),
        cpu_ratio=num(median(col["cpu_ratio"])))


def figures(steps: dict, reader_rows: list[dict], build_rows: list[dict], memory: dict, w, device: torch.device
            ) -> tuple[dict[str, Any], dict[str, float]]:
    """The figures of ``results.json`` (all but storage, sweep and the run's description), and the
    median step time of each variant."""
    per_rep = repeat_medians(steps)
    med = {v: median(per_rep[v]) for v in VARIANTS}
    phases = (*STEP_PHASES, "total", "cpu_main", "cpu_workers")
    breakdown = {v: {p: median([x[p] for recs in steps[v] for x in recs]) for p in phases} for v in VARIANTS}
    cpu_rep = {v: [median([x["cpu_main"] + x["cpu_workers"] for x in recs]) for recs in steps[v]] for v in VARIANTS}
    cpu_med = {v: median(cpu_rep[v]) for v in VARIANTS}
    consumer = [w.batch_size / c for c in per_rep["cached"]]
    rd_ratio = [rd["samples_per_s"] / cons for rd, cons in zip(reader_rows, consumer)]
    out = _step_figures(per_rep, cpu_rep, med, cpu_med, breakdown)
    out.update(_memory_figures(memory, device))
    out["cache_build_over_teacher_inference"] = _build_figure(build_rows)
    out["reader_over_consumer"] = metric(
        "reader_over_consumer", median(rd_ratio), per_repeat=rd_ratio,
        reader_samples_per_s=num(median([r["samples_per_s"] for r in reader_rows])),
        consumer_samples_per_s=num(median(consumer)), workers=w.workers)
    return out, med


def sweep(med: dict[str, float], build_rate: float, bs: int, epochs: int, K: int) -> dict:
    """Projected cost of an α sweep of N runs: cache (K seeds per image, once) + N cached runs vs N
    online runs, per training image, from the measured step times and build rate."""
    per = {v: med[v] / bs for v in VARIANTS}  # seconds per sample-step
    build = 1.0 / build_rate if build_rate and build_rate > 0 else float("nan")
    rows = {}
    for n in SWEEP_N:
        cached = K * build + n * epochs * per["cached"]
        online = n * epochs * per["online"]
        plain = n * epochs * per["plain"]
        rows[str(n)] = {"cached_s_per_image": num(cached), "online_s_per_image": num(online),
                        "plain_s_per_image": num(plain), "online_over_cached": num(online / cached),
                        "saved_fraction": num(1 - cached / online)}
    gain = epochs * (per["online"] - per["cached"])
    break_even = math.ceil(K * build / gain) if gain > 0 and math.isfinite(build) else None
    return {"assumptions": {"epochs_per_run": epochs, "K": K, "basis": "seconds per training image",
                            "cache_build_s_per_sample": num(build),
                            "step_s_per_sample": {v: num(x) for v, x in per.items()}},
            "N": rows, "break_even_N": break_even}

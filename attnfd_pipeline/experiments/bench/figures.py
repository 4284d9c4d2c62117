"""The figures of ``results.json``, derived from the raw measurements: every ratio is taken per
repeat between blocks measured side by side, then the median over repeats; CPU-second ratios sit
beside the wall-clock ones because they barely move with other load on the machine."""

from __future__ import annotations

import math
from typing import Any

import torch

from attnfd_pipeline.experiments.bench.common import SWEEP_N, VARIANTS, median, metric, num, ratios


def _step_figures(per_rep: dict, cpu_rep: dict, med: dict, cpu_med: dict, breakdown: dict) -> dict:
    step_abs = {f"{v}_s_per_step": num(med[v]) for v in VARIANTS}
    eff = [(o - c) / (o - p) if o != p else float("nan")
           for p, c, o in zip(per_rep["plain"], per_rep["cached"], per_rep["online"])]
    eff_cpu = [(o - c) / (o - p) if o != p else float("nan")
               for p, c, o in zip(cpu_rep["plain"], cpu_rep["cached"], cpu_rep["online"])]
    r_ci = ratios(per_rep["cached"], per_rep["inmemory"])
    return {
        "step_ratio_cached_over_plain": metric(
            "step_ratio_cached_over_plain", median(ratios(per_rep["cached"], per_rep["plain"])),
            per_repeat=ratios(per_rep["cached"], per_rep["plain"]), **step_abs,
            cpu_s_per_step={v: num(cpu_med[v]) for v in VARIANTS},
            cpu_ratio=num(median(ratios(cpu_rep["cached"], cpu_rep["plain"]))),
            breakdown_s={v: {p: num(x) for p, x in breakdown[v].items()} for v in VARIANTS}),
        "step_ratio_online_over_cached": metric(
            "step_ratio_online_over_cached", median(ratios(per_rep["online"], per_rep["cached"])),
            per_repeat=ratios(per_rep["online"], per_rep["cached"]), **step_abs,
            cpu_ratio=num(median(ratios(cpu_rep["online"], cpu_rep["cached"])))),
        "saving_efficiency": metric("saving_efficiency", median(eff), per_repeat=eff,
                                    formula="(online - cached) / (online - plain)",
                                    cpu_value=num(median(eff_cpu)), cpu_per_repeat=eff_cpu),
        "step_ratio_cached_over_inmemory": metric(
            "step_ratio_cached_over_inmemory", median(r_ci), per_repeat=r_ci, **step_abs,
            cpu_ratio=num(median(ratios(cpu_rep["cached"], cpu_rep["inmemory"]))),
            meaning="the cached step over the same step with its targets already in memory: the cost of "
                    "reading targets, 1.0 at best"),
        "head_share_of_cached_over_plain": _head_share(per_rep, cpu_rep),
    }


def _head_share(per_rep: dict, cpu_rep: dict) -> dict:
    """cached − plain = (inmemory − plain: the distillation head, which online distillation pays too)
    + (cached − inmemory: reading targets); the value is the head's fraction of it."""
    def split(rep):
        head = [i - p for i, p in zip(rep["inmemory"], rep["plain"])]
        read = [c - i for c, i in zip(rep["cached"], rep["inmemory"])]
        share = [h / (h + r) if (h + r) else float("nan") for h, r in zip(head, read)]
        return head, read, share

    head, read, share = split(per_rep)
    cpu_head, cpu_read, cpu_share = split(cpu_rep)
    return metric("head_share_of_cached_over_plain", median(share), per_repeat=share,
                  formula="(inmemory - plain) / (cached - plain)",
                  head_s_per_step=num(median(head)), read_s_per_step=num(median(read)),
                  head_over_plain=num(median([h / p if p else float("nan") for h, p in zip(head, per_rep["plain"])])),
                  cpu_value=num(median(cpu_share)), cpu_head_s_per_step=num(median(cpu_head)),
                  cpu_read_s_per_step=num(median(cpu_read)))


def _memory_figures(memory: dict, device: torch.device) -> dict:
    def mem_of(v):
        m = memory[v]
        return m["cuda_max_allocated_bytes"] if device.type == "cuda" else m["rss_peak_bytes"]

    def with_workers(v):
        m = memory[v]
        return m["rss_peak_bytes"] + (m.get("workers_rss_peak_sum_bytes") or 0)

    kind = "cuda_max_memory_allocated" if device.type == "cuda" else "peak RSS of the training process (main)"
    by = {v: mem_of(v) for v in VARIANTS}
    out = {}
    for key, (num_v, den_v) in {"peak_mem_ratio_cached_over_plain": ("cached", "plain"),
                                "peak_mem_ratio_online_over_plain": ("online", "plain"),
                                "peak_mem_ratio_cached_over_inmemory": ("cached", "inmemory")}.items():
        out[key] = metric(key, by[num_v] / by[den_v], measure=kind, bytes=by,
                          with_workers_ratio=num(with_workers(num_v) / with_workers(den_v)))
    return out


def _build_figure(build_rows: list[dict]) -> dict:
    build_ratio = [row["ratio"] for row in build_rows]
    return metric(
        "cache_build_over_teacher_inference", median(build_ratio), per_repeat=build_ratio,
        build_samples_per_s=num(median([r["build_samples_per_s"] for r in build_rows])),
        teacher_samples_per_s=num(median([r["bare_samples_per_s"] for r in build_rows])),
        # same-run diagnostics: the build's own teacher time vs its wall time, and vs the bare teacher
        teacher_share_in_build=num(median([r["teacher_seconds"] / r["build_seconds"] for r in build_rows])),
        teacher_in_build_over_bare=num(median([r["teacher_samples_per_s_in_build"] / r["bare_samples_per_s"]
                                               for r in build_rows])),
        cpu_ratio=num(median([r["cpu_ratio"] for r in build_rows])))


def figures(steps: dict, reader_rows: list[dict], build_rows: list[dict], memory: dict, w, device: torch.device
            ) -> tuple[dict[str, Any], dict[str, float]]:
    """The figures of ``results.json`` (all but storage, sweep and the run's description), and the
    median step time of each variant."""
    per_rep = {v: [median([x["total"] for x in recs]) for recs in steps[v]] for v in VARIANTS}
    med = {v: median(per_rep[v]) for v in VARIANTS}
    phases = ("wait", "forward", "backward", "optimizer", "total", "cpu_main", "cpu_workers")
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

"""What the bench reports and how a figure is judged: the variants, the keys of ``results.json``, the
goals, and the few helpers every bench module shares (logging, medians, JSON-safe numbers, report
tables)."""

from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Any, Sequence

import torch

# where each variant's targets come from: docs/bench.md "Workload"
VARIANTS = ("plain", "inmemory", "cached", "online")
SWEEP_N = (1, 4, 12)
# the clocked phases of a training step, in order (``measure.one_step``)
STEP_PHASES = ("wait", "forward", "backward", "optimizer")

# results.json: exactly these keys at top level; the first TABLE_KEYS are the single-number figures of
# the headline table
METRIC_KEYS = (
    "step_ratio_cached_over_plain",
    "step_ratio_online_over_cached",
    "saving_efficiency",
    "peak_mem_ratio_cached_over_plain",
    "peak_mem_ratio_online_over_plain",
    "cache_build_over_teacher_inference",
    "reader_over_consumer",
    "step_ratio_cached_over_inmemory",
    "peak_mem_ratio_cached_over_inmemory",
    "head_share_of_cached_over_plain",
    "storage",
    "sweep_economics",
)
TABLE_KEYS = METRIC_KEYS[:10]
TOP_KEYS = METRIC_KEYS + ("device", "torch_version", "config", "samples")

STORAGE_MAX_REL_ERROR = 1e-3

# goal per metric: (comparison, threshold)
GOALS: dict[str, tuple[str, float]] = {
    "step_ratio_cached_over_plain": ("<=", 1.10),
    "saving_efficiency": (">=", 0.9),
    "peak_mem_ratio_cached_over_plain": ("<=", 1.15),
    "cache_build_over_teacher_inference": (">=", 0.9),
    "reader_over_consumer": (">=", 3.0),
    "step_ratio_cached_over_inmemory": ("<=", 1.05),
    "peak_mem_ratio_cached_over_inmemory": ("<=", 1.05),
    "storage": (">=", 3.0),  # compression vs float32 overall, at rel_error <= STORAGE_MAX_REL_ERROR
}

# a bench started above this 1-minute load average measures the other load as much as itself
QUIET_LOAD = 0.5


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: Sequence[float]) -> float:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return float(statistics.median(xs)) if xs else float("nan")


def step_totals(steps: dict[str, list[list[dict]]]) -> dict[str, list[list[float]]]:
    """Each variant's step times (the records' ``total``), per repeat."""
    return {v: [[x["total"] for x in block] for block in blocks] for v, blocks in steps.items()}


def repeat_medians(steps: dict[str, list[list[dict]]]) -> dict[str, list[float]]:
    """Each variant's median step time of every repeat."""
    return {v: [median(block) for block in blocks] for v, blocks in step_totals(steps).items()}


def ratios(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """Element-wise x / y (NaN where y is 0)."""
    return [x / y if y else float("nan") for x, y in zip(xs, ys)]


def num(x):
    """JSON-safe float (NaN/inf → None)."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


def fmt(x, spec=".3f", none="n/a") -> str:
    """A figure for a report (``none`` where it is missing or not finite)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """A Markdown table; cells are written as given."""
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def goal_met(key: str, value: float, goals: dict = GOALS) -> bool | None:
    if key not in goals or value is None or not math.isfinite(value):
        return None
    op, thr = goals[key]
    return bool({"<=": value <= thr, ">=": value >= thr, "<": value < thr}[op])


def metric(key: str, value: float, goals: dict = GOALS, **extra) -> dict:
    """A figure of ``results.json``: ``{"value": …}`` plus its goal (of ``goals``) and whether it is met, plus
    ``extra``."""
    out: dict[str, Any] = {"value": num(value)}
    if key in goals:
        op, thr = goals[key]
        out["goal"] = f"{op} {thr:g}"
        out["met"] = goal_met(key, value, goals)
    out.update(extra)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

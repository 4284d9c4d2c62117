"""The lab's one run table: a row is the runs of one setting that differ only by seed, compared with a
reference row by the difference of the means and by the paired difference over the seeds both share
(``stats.paired``). ``attnfd results``, ``attnfd report`` and ``attnfd bench-accuracy`` build their tables
from these rows and print their numbers with the same formatters, so the three cannot disagree.

A run is a mapping with ``seed`` and the fractions ``miou`` and ``pixel_acc`` (result rows, report rows and
accuracy.json rows all are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Sequence

from attnfd_pipeline.experiments.stats import LEVEL, Difference, Stat, paired, seed_values

NO_VALUE = "–"  # a statistic without runs


@dataclass(frozen=True)
class Row:
    """One table row: its label and its runs (seeds of one setting)."""

    label: str
    runs: tuple[Mapping[str, Any], ...]

    @classmethod
    def of(cls, label: str, runs: Sequence[Mapping[str, Any]]) -> "Row":
        return cls(label, tuple(runs))

    @cached_property
    def miou(self) -> Stat | None:
        return Stat.of([r["miou"] for r in self.runs])

    @cached_property
    def pixel_acc(self) -> Stat | None:
        return Stat.of([r["pixel_acc"] for r in self.runs])

    @property
    def n(self) -> int:
        return self.miou.n if self.miou else 0

    @cached_property
    def seeds(self) -> dict[int, float]:
        """{seed: mIoU in percent}."""
        return seed_values((r.get("seed"), r["miou"]) for r in self.runs)

    def paired(self, ref: "Row | None") -> Difference | None:
        """This row − ``ref`` (mIoU points), paired over the shared seeds; None without one."""
        return paired(self.seeds, ref.seeds) if ref is not None and self.runs and ref.runs else None

    def delta(self, ref: "Row | None", key: str = "miou") -> str:
        """The difference of the unpaired means (``key``: ``miou`` or ``pixel_acc``), or "" without one."""
        mine, theirs = getattr(self, key), getattr(ref, key) if ref is not None else None
        return signed(mine.mean - theirs.mean) if mine is not None and theirs is not None else ""

    def pair_cell(self, ref: "Row | None", *, is_ref: bool = False) -> str:
        """``+0.20 [-0.28, +0.68] (n = 3)``, "reference", "no shared seeds", or "" (no reference row)."""
        if is_ref:
            return "reference"
        if ref is None or not ref.runs or not self.runs:
            return ""
        d = self.paired(ref)
        return d.fmt() if d is not None else "no shared seeds"

    def pair_dict(self, ref: "Row | None") -> dict | None:
        d = self.paired(ref)
        return d.as_dict() if d is not None else None

    def data(self) -> dict:
        """The JSON figures of the row: its summary and its per-seed values (so differences can be re-paired)."""
        return {"miou": stat_dict(self.miou), "seeds": {str(k): v for k, v in self.seeds.items()}}


def cell(stat: Stat | None) -> str:
    return stat.fmt() if stat is not None else NO_VALUE


def stat_dict(stat: Stat | None) -> dict | None:
    return None if stat is None else stat.as_dict()


def number(v: float | None) -> str:
    return f"{v:.2f}" if v is not None and math.isfinite(v) else NO_VALUE


def signed(v: float | None) -> str:
    return f"{v:+.2f}" if v is not None and math.isfinite(v) else NO_VALUE


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def paired_header(against: str) -> str:
    return f"paired Δ vs {against} [{LEVEL} CI] (n)"


def resolved_sentence(diffs: Sequence[tuple[str, Difference | None]], against: str = "the student") -> str:
    """Which rows' paired Δ vs ``against`` is resolved (its interval excludes 0), which not, which have one
    shared seed; "" when no row was paired."""
    yes, no, single = [], [], []
    for label, d in diffs:
        if d is not None:
            (single if not d.has_interval else yes if d.resolved else no).append(label)
    if not (yes or no or single):
        return ""
    parts = [f"resolved ({LEVEL} interval of the paired Δ vs {against} excludes 0): " + (", ".join(yes) or "none")]
    parts += ["not resolved: " + ", ".join(no)] if no else []
    parts += ["one shared seed, no interval: " + ", ".join(single)] if single else []
    return "Differences " + "; ".join(parts) + "."

"""The statistics of the lab's comparisons: the paired difference of two rows over the seeds both have, with
its Student-t interval (``paired``, ``Difference``; quantiles from ``scipy.stats.t``), beside the unpaired
mean ± sample std of each row (``Stat``). docs/statistics.md says why paired and defines every quantity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy.stats import t as student_t

from attnfd_pipeline.errors import UserError

CONFIDENCE = 0.95  # two-sided level of every interval the lab prints
LEVEL = f"{CONFIDENCE * 100:g} %"  # how tables name it


# ---------------------------------------------------------------------------------------------
# Student's t distribution


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``t_quantile(0.975, 2)`` = 4.303)."""
    if not 0.0 < p < 1.0:
        raise UserError(f"probability {p}: must be in (0, 1)")
    if df <= 0:
        raise UserError(f"degrees of freedom {df}: must be > 0")
    return float(student_t.ppf(p, df))


# ---------------------------------------------------------------------------------------------
# unpaired summary


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof = 1, when n > 1) of one row's runs, in percent."""

    n: int
    mean: float
    std: float | None

    @classmethod
    def of(cls, values: Sequence[float | None]) -> "Stat | None":
        """From fractions (mIoU 0.61 → 61.0); None and non-finite values are left out; None when empty."""
        v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64) * 100
        if v.size == 0:
            return None
        return cls(int(v.size), float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else None)

    def fmt(self) -> str:
        return f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")

    def as_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "std": self.std}


# ---------------------------------------------------------------------------------------------
# differences with intervals


@dataclass(frozen=True)
class Difference:
    """A difference of two rows (row − reference) with its standard error and two-sided t-interval.
    ``n``: the shared seeds; ``se``, ``lo``, ``hi`` and ``df`` are None when there is no spread to estimate
    (a single shared seed). ``paired`` stays in report.json's records (every difference the lab prints is)."""

    mean: float
    n: int
    se: float | None
    lo: float | None
    hi: float | None
    df: float | None
    seeds: tuple[int, ...] = ()
    paired: bool = True
    confidence: float = CONFIDENCE

    @property
    def has_interval(self) -> bool:
        return self.lo is not None and self.hi is not None

    @property
    def resolved(self) -> bool | None:
        """Whether the interval excludes 0 (the sign of the difference is established); None without one."""
        return None if not self.has_interval else bool(self.lo > 0 or self.hi < 0)

    def fmt(self) -> str:
        """``+0.20 [-0.28, +0.68] (n = 3)``; a single seed: ``+0.20 (n = 1)``."""
        body = f"{self.mean:+.2f}"
        if self.has_interval:
            body += f" [{self.lo:+.2f}, {self.hi:+.2f}]"
        return body + f" (n = {self.n})"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "n": self.n, "se": self.se, "lo": self.lo, "hi": self.hi, "df": self.df,
                "seeds": list(self.seeds), "paired": self.paired, "confidence": self.confidence}


def paired(row: Mapping[int, float], reference: Mapping[int, float], *,
           confidence: float = CONFIDENCE) -> Difference | None:
    """``row − reference`` over the seeds both have (values keyed by seed): mean of the per-seed
    differences, its standard error sd/√n and the t-interval with n − 1 degrees of freedom. None when no
    seed is shared; no interval from a single shared seed."""
    seeds = tuple(sorted(set(row) & set(reference)))
    if not seeds:
        return None
    d = np.array([row[s] - reference[s] for s in seeds], dtype=np.float64)
    mean, n = float(d.mean()), d.size
    if n < 2:
        return Difference(mean, n, None, None, None, None, seeds, True, confidence)
    se = float(d.std(ddof=1)) / math.sqrt(n)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * se
    return Difference(mean, n, se, mean - half, mean + half, float(n - 1), seeds, True, confidence)


def equivalent(d: Difference | None, margin: float) -> bool | None:
    """Equivalence within ``margin``: the whole interval inside [−margin, margin]; None without an interval."""
    return None if d is None or not d.has_interval else bool(-margin <= d.lo and d.hi <= margin)


def seed_values(pairs: Iterable[tuple[int | None, float | None]], scale: float = 100.0) -> dict[int, float]:
    """{seed: value × scale} from (seed, value) pairs; runs without a seed or a value are left out, and
    two runs of one seed (a row mixing settings) count as their mean."""
    acc: dict[int, list[float]] = {}
    for seed, value in pairs:
        if seed is not None and value is not None and math.isfinite(value):
            acc.setdefault(int(seed), []).append(float(value) * scale)
    return {s: float(np.mean(v)) for s, v in sorted(acc.items())}

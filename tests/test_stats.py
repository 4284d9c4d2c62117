"""The lab's statistics on hand-made numbers: t quantiles against printed tables, paired differences and
the equivalence rule."""

from __future__ import annotations

import math
import statistics

import pytest

from attnfd_pipeline.experiments import stats


# two-sided 95 % (p = 0.975) and 90 % (p = 0.95) critical values as printed in every t table (3 decimals)
T_TABLE = {1: (12.706, 6.314), 2: (4.303, 2.920), 3: (3.182, 2.353), 4: (2.776, 2.132), 7: (2.365, 1.895),
           10: (2.228, 1.812), 29: (2.045, 1.699), 120: (1.980, 1.658)}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantiles_match_the_printed_table(df):
    q975, q95 = T_TABLE[df]
    assert stats.t_quantile(0.975, df) == pytest.approx(q975, abs=5e-4)  # the table rounds to 3 decimals
    assert stats.t_quantile(0.95, df) == pytest.approx(q95, abs=5e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-stats.t_quantile(0.975, df), abs=1e-12)


def test_t_quantile_closed_forms():
    assert stats.t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-10)  # df = 1: Cauchy
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)  # → the normal quantile
    for p in (0.6, 0.9, 0.975, 0.999):  # df = 2 inverts in closed form: t = u √(2 / (1 − u²)), u = 2p − 1
        u = 2 * p - 1
        assert stats.t_quantile(p, 2) == pytest.approx(u * math.sqrt(2 / (1 - u * u)), rel=1e-12)
    with pytest.raises(ValueError, match="probability 1"):
        stats.t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom -1"):
        stats.t_quantile(0.9, -1)


def test_paired_difference_of_the_issue_example():
    # LAD vs AttnFD over seeds 0–2: every seed favours AttnFD by +0.03, +0.16, +0.41
    lad = {0: 12.00, 1: 13.50, 2: 12.96}
    attnfd = {s: lad[s] + d for s, d in zip((0, 1, 2), (0.03, 0.16, 0.41))}
    d = stats.paired(attnfd, lad)
    assert (d.n, d.seeds, d.paired, d.df) == (3, (0, 1, 2), True, 2.0)
    assert d.mean == pytest.approx(0.20, abs=1e-12)
    sd = statistics.stdev([0.03, 0.16, 0.41])
    assert d.se == pytest.approx(sd / math.sqrt(3), rel=1e-12) and round(d.se, 2) == 0.11
    assert (d.lo, d.hi) == pytest.approx((0.20 - 4.3027 * d.se, 0.20 + 4.3027 * d.se), abs=1e-4)
    assert d.fmt() == "+0.20 [-0.28, +0.68] (n = 3)" and d.resolved is False


def test_paired_uses_only_the_shared_seeds():
    assert stats.paired({0: 1.0}, {1: 2.0}) is None  # nothing to pair
    one = stats.paired({0: 3.0, 5: 9.0}, {0: 1.0, 1: 7.0})
    assert (one.n, one.mean, one.has_interval, one.resolved) == (1, 2.0, False, None)
    assert one.fmt() == "+2.00 (n = 1)"
    d = stats.paired({0: 3.0, 1: 5.0, 2: 4.0, 3: 9.0}, {0: 1.0, 1: 2.0, 2: 2.0, 7: 0.0})
    assert d.seeds == (0, 1, 2) and d.mean == pytest.approx(7 / 3)
    assert d.lo == pytest.approx(7 / 3 - 4.3027 * statistics.stdev([2, 3, 2]) / math.sqrt(3), abs=1e-4)
    assert d.resolved is True
    same = stats.paired({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})  # a constant difference: a zero-width interval
    assert (same.se, same.lo, same.hi) == (0.0, 1.0, 1.0)


def test_decision_rules():
    d = stats.Difference(mean=2.5, n=8, se=0.5, lo=2.1, hi=2.9, df=7.0)
    assert stats.equivalent(d, 3.0) is True and stats.equivalent(d, 2.5) is False
    near = stats.Difference(mean=0.1, n=8, se=0.3, lo=-0.6, hi=0.8, df=7.0)
    assert stats.equivalent(near, 1.0) is True and stats.equivalent(near, 0.7) is False
    single = stats.Difference(mean=0.1, n=1, se=None, lo=None, hi=None, df=None)
    assert stats.equivalent(single, 1.0) is None and stats.equivalent(None, 1.0) is None


def test_stat_and_seed_values():
    s = stats.Stat.of([0.50, 0.52, None, float("nan"), 0.54])
    assert (s.n, s.mean, s.std) == (3, pytest.approx(52.0), pytest.approx(2.0))
    assert s.fmt() == "52.00 ± 2.00" and stats.Stat.of([0.3]).fmt() == "30.00" and stats.Stat.of([None]) is None
    assert stats.seed_values([(0, 0.5), (1, 0.6), (1, 0.7), (None, 0.9), (2, None)]) == {0: 50.0, 1: pytest.approx(65.0)}

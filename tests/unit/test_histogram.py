"""The benchmark histogram: bounded relative error, never under-reports a percentile, merges exactly."""

from __future__ import annotations

import random

from benchmarks.histogram import Histogram


def test_percentiles_within_one_percent_and_never_below_the_true_value() -> None:
    rnd = random.Random(7)
    values = sorted(int(rnd.lognormvariate(7, 1.5)) for _ in range(50_000))
    h = Histogram()
    for v in values:
        h.record(v)
    for p in (50, 90, 99, 99.9):
        true = values[round(p / 100 * len(values)) - 1]
        got = h.percentile(p)
        assert true <= got <= true * 1.01 + 1, (p, true, got)
    assert h.percentile(100) == h.max == values[-1]


def test_merge_equals_recording_everything_in_one() -> None:
    a, b, both = Histogram(), Histogram(), Histogram()
    for i in range(1, 5000):
        (a if i % 3 else b).record(i * 37)
        both.record(i * 37)
    a.merge(b)
    assert a.counts == both.counts and a.count == both.count and a.max == both.max
    assert Histogram.from_json(a.to_json()).percentile(99) == both.percentile(99)

"""The hot-path metric updates give exactly what prometheus-client's own methods give."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.observe.metrics import REGISTRY, REQUEST_DURATION, REQUESTS, FastCounter, FastHistogram, incrementer

BUCKETS = (0.001, 0.01, 0.1, 1.0)
VALUES = [0.0, 0.0005, 0.001, 0.0010001, 0.01, 0.05, 0.1, 1.0, 1.5, 1e9]  # every bound hit exactly, and past +Inf


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name.removeprefix(name), tuple(sorted((k, v) for k, v in s.labels.items() if k != "route"))): s.value
            for metric in registry.collect() if metric.name == name for s in metric.samples
            if not s.name.endswith("_created")}


@pytest.mark.parametrize("deferred", [True, False])
def test_fast_histogram_fills_the_same_buckets_and_sum_as_observe(deferred: bool) -> None:
    reference, fast = CollectorRegistry(), CollectorRegistry()
    a = Histogram("h_seconds", "h", ["route"], buckets=BUCKETS, registry=reference).labels("r")
    b = FastHistogram(Histogram("h_seconds", "h", ["route"], buckets=BUCKETS, registry=fast).labels("r"), deferred)
    for v in VALUES:
        a.observe(v)
        b.observe(v)
    expected = _samples(reference, "h_seconds")
    if deferred:  # kept until flushed (REGISTRY flushes on every read: below)
        assert _samples(fast, "h_seconds")[("_count", ())] == 0.0
        b.flush()
    assert _samples(fast, "h_seconds") == expected
    b.flush()  # a second flush adds nothing
    assert _samples(fast, "h_seconds") == expected
    assert expected[("_bucket", (("le", "0.001"),))] == 3.0  # 0, 0.0005 and 0.001 itself (le is inclusive)
    assert expected[("_bucket", (("le", "+Inf"),))] == len(VALUES)


def test_incrementer_counts_like_inc() -> None:
    registry = CollectorRegistry()
    child = Counter("c_total", "c", ["route"], registry=registry).labels("r")
    inc = incrementer(child)
    child.inc()
    inc(1.0)
    inc(1.0)
    assert registry.get_sample_value("c_total", {"route": "r"}) == 3.0


def test_every_read_of_the_registry_sees_the_observations_kept_in_a_single_process() -> None:
    fast = FastHistogram.of(REQUEST_DURATION.labels("t-deferred"))
    assert FastHistogram.of(REQUEST_DURATION.labels("t-deferred")) is fast  # one per child, whatever reloads make
    for v in (0.0004, 0.003, 7.0):
        fast.observe(v)
    assert REGISTRY.get_sample_value("failgate_request_duration_seconds_count", {"route": "t-deferred"}) == 3.0
    fast.observe(0.02)
    text = generate_latest(REGISTRY).decode()  # what /metrics serves
    assert 'failgate_request_duration_seconds_count{route="t-deferred"} 4.0' in text
    assert 'failgate_request_duration_seconds_bucket{le="0.025",route="t-deferred"} 3.0' in text
    assert REGISTRY.get_sample_value("failgate_request_duration_seconds_sum", {"route": "t-deferred"}) == \
        pytest.approx(7.0234)


@pytest.mark.parametrize("deferred", [True, False])
def test_fast_counter_counts_like_inc(deferred: bool) -> None:
    registry = CollectorRegistry()
    child = Counter("c_total", "c", ["route"], registry=registry).labels("r")
    fast = FastCounter(child, deferred)
    child.inc()
    for _ in range(4):
        fast.inc()
    assert registry.get_sample_value("c_total", {"route": "r"}) == (1.0 if deferred else 5.0)
    fast.flush()
    fast.flush()  # a second flush adds nothing
    assert registry.get_sample_value("c_total", {"route": "r"}) == 5.0


def test_every_read_of_the_registry_sees_the_counts_kept_in_a_single_process() -> None:
    fast = FastCounter.of(REQUESTS.labels("t-deferred", "200"))
    assert FastCounter.of(REQUESTS.labels("t-deferred", "200")) is fast
    fast.inc()
    fast.inc()
    assert REGISTRY.get_sample_value("failgate_requests_total", {"route": "t-deferred", "status": "200"}) == 2.0
    fast.inc()
    assert 'failgate_requests_total{route="t-deferred",status="200"} 3.0' in generate_latest(REGISTRY).decode()

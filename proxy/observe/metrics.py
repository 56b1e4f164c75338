"""Prometheus metrics (the README's Metrics section lists them). Labels come only from config names and fixed
enums, never from client input.

In multi-worker mode each worker writes to prometheus-client's multiprocess directory (PROMETHEUS_MULTIPROC_DIR
must be set before this module is imported) and the parent aggregates them for `/metrics`. The per-request counts
and observations (FastCounter, FastHistogram) are kept as plain numbers first: a single process adds them in
whenever its registry is read; a worker adds them to its files every second and when it stops (`flush`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as _mp
from prometheus_client.registry import Collector

from ..store.errors import Reason

if TYPE_CHECKING:
    from ..decision import Verdict

REGISTRY = CollectorRegistry(auto_describe=True)


class _FlushFirst(Collector):
    """REGISTRY's first collector: every read of it (a scrape, a read of one sample) first adds the observations
    FastHistogram keeps in a single process into prometheus-client's values (see FastHistogram)."""

    def collect(self) -> list[Any]:
        flush()
        return []

    def describe(self) -> list[Any]:
        return []


REGISTRY.register(_FlushFirst())

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter(
    "failgate_requests_total", "Requests answered, by route and status ('' = no route)",
    ["route", "status"], registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "failgate_request_duration_seconds", "Time from request headers to response headers sent",
    ["route"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
UPSTREAM_DURATION = Histogram(
    "failgate_upstream_duration_seconds", "Time from sending a request upstream to its response headers",
    ["upstream"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)

DECISIONS = Counter(
    "failgate_decisions_total", "Check verdicts; basis says whether the store answered (checked) or which fail mode "
    "decided", ["route", "check", "decision", "basis"], registry=REGISTRY,
)
STORE_OPERATIONS = Counter(
    "failgate_store_operations_total", "Store round trips by result", ["result"], registry=REGISTRY,
)
STORE_DURATION = Histogram(
    "failgate_store_duration_seconds", "Time one request waited for the store, all its checks together",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=REGISTRY,
)

EVENT_LOOP_LAG = Histogram(
    "failgate_event_loop_lag_seconds", "How late a timer ran in this process's event loop (sampled every 20 ms): "
    "time Failgate itself was too busy to serve anything",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=REGISTRY,
)

AUTHZ_REQUESTS = Counter(
    "failgate_authorizer_requests_total", "Calls to an external authorizer by result: allow, deny, timeout, "
    "unavailable, error (5xx), breaker_open (not called)", ["route", "result"], registry=REGISTRY,
)
AUTHZ_DURATION = Histogram(
    "failgate_authorizer_duration_seconds", "Time an external authorizer took to answer", ["route"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)

REVOCATIONS = Counter(
    "failgate_revocations_total", "API-key revocations applied in a process, by where they came from: log (replayed "
    "from the store), publish (the store's channel), admin (POST /keys/revoke), state (the state directory)",
    ["source"], registry=REGISTRY,
)

UPSTREAM_TARGET_UP = Gauge(
    "failgate_upstream_target_up", "Each process's view of each upstream target: 1 in rotation, 0 ejected after "
    "consecutive gateway failures", ["upstream", "target"], registry=REGISTRY, multiprocess_mode="liveall",
)
WEBSOCKET_CONNECTIONS = Gauge(
    "failgate_websocket_connections", "WebSocket tunnels open", ["route"], registry=REGISTRY,
    multiprocess_mode="livesum",
)
WEBSOCKET_MESSAGES = Counter(
    "failgate_websocket_messages_total", "WebSocket messages relayed (text, binary, ping and pong), by direction: "
    "to_upstream or to_client", ["route", "direction"], registry=REGISTRY,
)
UPSTREAM_RETRIES = Counter(
    "failgate_upstream_retries_total", "Idempotent requests sent again to another target after the first could not "
    "be connected to or closed the connection before any response byte", ["upstream"], registry=REGISTRY,
)

BREAKER_STATE = Gauge(
    "failgate_breaker_state", "Each process's breaker of each dependency (`store`; later one per Cluster node, "
    "authorizer…): 0 closed, 1 half-open, 2 open", ["dependency"],
    registry=REGISTRY, multiprocess_mode="liveall",
)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


_OWNED: list[Collector] = []


def register_owned(collector: Collector) -> None:
    """A collector of the process that owns the admin listener (config metrics): exported as is, never
    aggregated across workers."""
    REGISTRY.register(collector)
    _OWNED.append(collector)


def exposition() -> bytes:
    """The text exposition: this process's registry, or every worker's when running multiprocess."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    _mp.MultiProcessCollector(registry, path=path)
    for collector in _OWNED:
        registry.register(collector)
    return generate_latest(registry)


def mark_dead(pid: int) -> None:
    path = multiprocess_dir()
    if path is not None:
        _mp.mark_process_dead(pid, path)


# --- the hot path --------------------------------------------------------------------------------------------
# Counter.inc and Histogram.observe check, on every call, things that cannot fail for the children made below
# (observable, positive amounts) and a histogram walks its buckets one by one in Python: together ~1 µs and ~2 µs.
# Every request updates several, so the hot path goes to the child's value objects directly — prometheus-client's
# `_value`, `_sum`, `_buckets` and `_upper_bounds`, the same objects its own methods update and its exposition
# (single- or multiprocess) reads. tests/unit/test_metrics.py holds them to the public methods' results.

def incrementer(child: Counter) -> Callable[[float], None]:
    """`child.inc` without its checks."""
    return child._value.inc  # type: ignore[no-any-return]


STORE_ERRORS = Counter(
    "failgate_store_errors_total", "Error replies from the store, by kind: oom (out of memory), readonly (a replica), "
    "loading (restarting), noscript (script cache lost; re-sent), other", ["kind"], registry=REGISTRY,
)
_STORE_ERROR_KINDS = ("oom", "readonly", "loading", "noscript", "other")
_store_error_incs = {kind: incrementer(STORE_ERRORS.labels(kind)) for kind in _STORE_ERROR_KINDS}


def store_error(reply: str) -> None:
    """Count one error reply by its kind (the first word Redis puts in it)."""
    kind = reply.split(" ", 1)[0].lower()
    _store_error_incs[kind if kind in _store_error_incs else "other"](1.0)


DATA_LOST = Counter(
    "failgate_store_data_lost_total", "Auth lookups that found the store's epoch marker missing: the store lost its "
    "data (restarted without persistence, flushed, evicted); each is a store error for its request",
    registry=REGISTRY,
)
_data_lost_inc = incrementer(DATA_LOST)
_data_lost_logged = [0.0]


def data_lost() -> None:
    """Count one lookup that found the epoch marker missing; log it at most once every 10 seconds."""
    _data_lost_inc(1.0)
    now = time.monotonic()
    if now - _data_lost_logged[0] >= 10.0:
        _data_lost_logged[0] = now
        logging.getLogger("failgate.store").error(
            "the store's epoch marker is missing: Redis lost its data (restart without persistence, flush or "
            "eviction). Auth checks fail by their fail mode until keys are restored (failgate keys add writes "
            "the marker)")


class FastHistogram:
    """`observe` of one histogram child. The observations are kept here as plain numbers and added into the
    child's values by `flush`: in a single process whenever the registry is read (REGISTRY's first collector: on
    every scrape and every read of a sample); in a worker, whose values are the multiprocess files its parent
    reads, every second and when it stops (serving.py) — a write to those files costs ~0.7 µs, and a request makes
    several. So a request pays two additions instead of two calls into prometheus-client. `of(child)` gives every
    child one, whatever reloads make new route metrics."""

    __slots__ = ("_bounds", "_buckets", "_counts", "_deferred", "_sum", "_total")

    def __init__(self, child: Histogram, deferred: bool = True) -> None:
        self._bounds: list[float] = list(child._upper_bounds)  # ends with +Inf: every value has a bucket
        self._buckets = [b.inc for b in child._buckets]
        self._sum = child._sum.inc
        self._counts = [0] * len(self._bounds)
        self._total = 0.0
        self._deferred = deferred

    @staticmethod
    def of(child: Histogram) -> FastHistogram:
        fast = _FAST.get(child)
        if fast is None:
            fast = _FAST[child] = FastHistogram(child)
        return fast

    def observe(self, value: float) -> None:
        # The first bucket whose bound is not below the value (what bisect_left finds; NaN: the first), by a scan
        # from the smallest: the bounds are few and most values fall in the first ones, where a scan in compiled
        # code costs a fraction of a call to bisect.
        bounds = self._bounds
        i = 0
        last = len(bounds) - 1
        while i < last and value > bounds[i]:
            i += 1
        if self._deferred:
            self._total += value
            self._counts[i] += 1
            return
        self._sum(value)
        self._buckets[i](1.0)

    def flush(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        for i, n in enumerate(counts):
            if n:
                self._buckets[i](float(n))
                counts[i] = 0
        total, self._total = self._total, 0.0
        self._sum(total)


_FAST: dict[Histogram, FastHistogram] = {}  # every one the hot path uses (`of`)


class FastCounter:
    """`inc(1)` of one counter child, kept like FastHistogram's observations: a plain count, added into the child
    by `flush`."""

    __slots__ = ("_deferred", "_inc", "_n")

    def __init__(self, child: Counter, deferred: bool = True) -> None:
        self._inc = incrementer(child)
        self._n = 0
        self._deferred = deferred

    @staticmethod
    def of(child: Counter) -> FastCounter:
        fast = _COUNTERS.get(child)
        if fast is None:
            fast = _COUNTERS[child] = FastCounter(child)
        return fast

    def inc(self) -> None:
        if self._deferred:
            self._n += 1
        else:
            self._inc(1.0)

    def flush(self) -> None:
        if self._n:
            n, self._n = self._n, 0
            self._inc(float(n))


_COUNTERS: dict[Counter, FastCounter] = {}


def flush() -> None:
    """Add every deferred observation and count into prometheus-client's values (with workers: this worker's
    files)."""
    for fast in _FAST.values():
        fast.flush()
    for counter in _COUNTERS.values():
        counter.flush()


class RouteMetrics:
    """A route's labelled children, resolved once at config load so the hot path does no label lookups."""

    __slots__ = ("_by_status", "_decisions", "_name", "duration")

    def __init__(self, route: str) -> None:
        self._name = route
        self._by_status: dict[int, FastCounter] = {}
        self._decisions: dict[object, FastCounter] = {}  # by check name, or (check, allow, basis, shadow_deny)
        self.duration = FastHistogram.of(REQUEST_DURATION.labels(route))

    def decided(self, verdict: Verdict) -> None:
        # A check that passed (most often) is found by its name alone, any other decision by all it is counted by.
        passed = verdict.allow and verdict.basis == "checked" and not verdict.shadow_deny
        key: object = verdict.check if passed else (verdict.check, verdict.allow, verdict.basis, verdict.shadow_deny)
        counter = self._decisions.get(key)
        if counter is None:
            counter = self._decisions[key] = FastCounter.of(DECISIONS.labels(
                self._name, verdict.check, verdict.decision, verdict.basis))
        counter.inc()

    def count(self, status: int) -> None:
        counter = self._by_status.get(status)
        if counter is None:
            counter = self._by_status[status] = FastCounter.of(REQUESTS.labels(self._name, str(status)))
        counter.inc()


class StoreMetrics:
    """Store round-trip results, children resolved once."""

    __slots__ = ("_by_result", "_duration")

    def __init__(self) -> None:
        self._by_result = {r: FastCounter.of(STORE_OPERATIONS.labels(r)) for r in ("ok", *get_args(Reason))}
        self._duration = FastHistogram.of(STORE_DURATION)

    def observe(self, result: str, seconds: float) -> None:
        self._by_result[result].inc()
        self._duration.observe(seconds)

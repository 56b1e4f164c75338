"""The circuit breaker, one per process, in front of the store.

closed     every call goes to the store; `failures` consecutive transport failures open it.
open       no call touches or waits for the store: StoreUnavailable("breaker_open") at once, for `open_for`.
half-open  then exactly one call (the probe) goes through; its success closes the breaker, its failure opens it
           again for another `open_for`. Calls arriving while the probe is out are refused like `open`.

Only transport failures count: timeouts, refused or reset connections, server-wide error replies (LOADING,
READONLY, OOM…). An error about one record (a malformed value) does not, so no client input can open it. And it
counts failed *round trips*, not requests: the calls that failed together (one `Trip`: everything that expired in
one pass of the event loop, everything waiting on one lost connection) are one failure, so a stall of Failgate's
own loop that delays many requests at once is at most one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any, Final

from ..observe.metrics import StoreMetrics
from .errors import StoreUnavailable
from .ops import Op

log = logging.getLogger("failgate.breaker")

CLOSED: Final = 0
HALF_OPEN: Final = 1
OPEN: Final = 2
NAMES = {CLOSED: "closed", HALF_OPEN: "half-open", OPEN: "open"}


class Breaker:
    def __init__(self, failures: int, open_for: float, *, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[int], None] | None = None) -> None:
        self.threshold = failures
        self.open_for = open_for
        self.clock = clock
        self.on_change = on_change
        self.state = CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self._probe_out = False

    def allow(self) -> bool:
        """May a call go to the store now? (Starts the half-open probe when it is time.)"""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN and self.clock() - self.opened_at >= self.open_for:
            self._set(HALF_OPEN)
        if self.state == HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return True
        return False

    def success(self) -> None:
        self.consecutive = 0
        if self.state != CLOSED:
            self._probe_out = False
            self._set(CLOSED)

    def failure(self) -> None:
        self.consecutive += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.consecutive >= self.threshold):
            self._probe_out = False
            self.opened_at = self.clock()
            self._set(OPEN)

    def failed_call(self, failure: StoreUnavailable) -> None:
        """A call that failed: a transport failure counts once per failed round trip (every call that failed with
        the same trip is one failure); an error about one record is the store answering, so a success."""
        if not failure.transport:
            self.success()
            return
        trip = failure.trip
        if trip is None:
            self.failure()
        elif not trip.counted:
            trip.counted = True
            self.failure()

    def abandon(self) -> None:
        """The call that was the half-open probe will never report back (its request went away): let the next
        call be the probe, rather than keeping the breaker shut."""
        if self.state == HALF_OPEN:
            self._probe_out = False

    def _set(self, state: int) -> None:
        if state != self.state:
            log.warning("store breaker %s -> %s (%d consecutive failures)", NAMES[self.state], NAMES[state],
                        self.consecutive)
            self.state = state
            if self.on_change is not None:
                self.on_change(state)


class BreakerStore:
    """The one way to call the store: every round trip passes the breaker and is counted in the store metrics.
    `inner` is the chaos switch over the client (chaos.py); while no fault is set it hands the client's own
    future back, so a checked request still suspends once."""

    def __init__(self, inner: Any, breaker: Breaker, metrics: StoreMetrics | None = None) -> None:
        self.inner = inner
        self.breaker = breaker
        self.metrics = metrics if metrics is not None else StoreMetrics()
        # A Cluster store counts its own calls, one per node a round trip reaches (with each node's result); here
        # only what never reached it (an open breaker, a rehearsed fault) is counted.
        self._node_counted = bool(getattr(getattr(inner, "inner", inner), "counts_node_calls", False))

    async def round_trip(self, ops: Sequence[Op]) -> tuple[list[Any] | None, StoreUnavailable | None]:
        """(the results, None) or (None, why the store could not answer). Never raises StoreUnavailable."""
        breaker = self.breaker
        started = perf_counter()
        if not breaker.allow():
            self.metrics.observe("breaker_open", perf_counter() - started)
            return None, StoreUnavailable("breaker_open", "the store breaker is open")
        try:
            results = await self.inner.execute(ops)
        except StoreUnavailable as exc:
            breaker.failed_call(exc)
            self.metrics.observe(exc.reason, perf_counter() - started)
            return None, exc
        except BaseException:
            breaker.abandon()  # the caller went away: a probe must not stay out forever
            raise
        for r in results:
            if type(r) is StoreUnavailable and r.transport:  # a server-wide error reply (LOADING, OOM, …)
                breaker.failure()
                break
        else:
            if breaker.consecutive or breaker.state != CLOSED:
                breaker.success()
        if not self._node_counted:
            self.metrics.observe("ok", perf_counter() - started)
        return results, None

    async def execute(self, ops: Sequence[Op]) -> list[Any]:
        """`round_trip` for callers that want the results or an exception."""
        results, failure = await self.round_trip(ops)
        if failure is not None:
            raise failure
        assert results is not None
        return results

    async def close(self) -> None:
        await self.inner.close()


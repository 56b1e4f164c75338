"""The circuit breaker (SPEC §4), one per process, in front of the store.

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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .errors import StoreUnavailable
from .ops import Op

log = logging.getLogger("failgate.breaker")

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
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

    def _set(self, state: int) -> None:
        if state != self.state:
            log.warning("store breaker %s -> %s (%d consecutive failures)", NAMES[self.state], NAMES[state],
                        self.consecutive)
            self.state = state
            if self.on_change is not None:
                self.on_change(state)


class BreakerStore:
    """A Store whose calls pass through the breaker. `inner` may be a chaos switch over `raw`: while no fault is
    set, calls go to `raw` directly (one coroutine less on every request)."""

    def __init__(self, inner: Any, breaker: Breaker, raw: Any = None) -> None:
        self.inner = inner
        self.raw = raw if raw is not None else inner
        self.breaker = breaker

    # The pipeline calls begin / settle / abandon itself: one coroutine level less on every checked request
    # (execute, below, is the same thing as one coroutine, for every other caller).
    def begin(self, ops: Sequence[Op]) -> Awaitable[list[Any]]:
        """Raises StoreUnavailable("breaker_open") at once when the breaker refuses; otherwise the store call to
        await, whose outcome the caller must report with `settle` (an answer or a StoreUnavailable) or `abandon`
        (cancelled: the client went away)."""
        if not self.breaker.allow():
            raise StoreUnavailable("breaker_open", "the store breaker is open")
        target = self.raw if getattr(self.inner, "fault", None) is None else self.inner
        return target.execute(ops)  # type: ignore[no-any-return]

    def settle(self, results: list[Any] | None, failure: StoreUnavailable | None) -> None:
        breaker = self.breaker
        if failure is not None:
            if not failure.transport:
                breaker.success()
                return
            trip = failure.trip
            if trip is None:
                breaker.failure()
            elif not trip.counted:
                trip.counted = True
                breaker.failure()
            return
        assert results is not None
        for r in results:
            if type(r) is StoreUnavailable and r.transport:
                breaker.failure()
                return
        if breaker.consecutive or breaker.state != CLOSED:
            breaker.success()

    def abandon(self) -> None:
        """The probe, if this call was it, must not stay out forever."""
        if self.breaker.state == HALF_OPEN:
            self.breaker._probe_out = False

    async def execute(self, ops: Sequence[Op]) -> list[Any]:
        call = self.begin(ops)
        try:
            results = await call
        except StoreUnavailable as exc:
            self.settle(None, exc)
            raise
        except BaseException:
            self.abandon()
            raise
        self.settle(results, None)
        return results

    async def close(self) -> None:
        await self.inner.close()

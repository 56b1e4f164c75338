"""Deadlines that blame a dependency only for its own slowness, never for Failgate's.

Every timer shares one event loop with everything Failgate does. When the loop is busy — a burst of expensive
requests, a CPU-starved node — a timer fires late, and it fires *before* the loop polls its sockets (uvloop runs
due timers first). A naive deadline then fails a call whose answer is already sitting in the socket, or whose
bytes were never even written, and the breaker opens a fail mode against a healthy dependency.

A `Deadline` fails its call only when both hold:
- `budget` seconds of real time (time.monotonic) have passed since it was armed — the loop's own clock is cached
  per iteration and can lag behind; arm it when the call's bytes are written, never when the call is queued;
- the loop has polled for I/O at least once since then, so whatever the dependency had already answered was read.
The cost is one clock read when armed and, only for a call that does time out, one extra poll (about 1 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

# Re-arming a timer for this long guarantees one I/O poll before it fires: uvloop's timers have 1 ms resolution,
# and a timer due later than "now" is never run in the pass that armed it.
_AFTER_A_POLL = 0.001


class Deadline:
    """Calls `expire()` once, `budget` seconds after it was made, as described above. `pending()` (when given) is
    asked first whenever the timer fires: once it says False the deadline ends without expiring."""

    __slots__ = ("_budget", "_expire", "_handle", "_loop", "_pending", "_polled", "_started")

    def __init__(self, loop: asyncio.AbstractEventLoop, budget: float, expire: Callable[[], None],
                 pending: Callable[[], bool] | None = None) -> None:
        self._loop = loop
        self._budget = budget
        self._expire = expire
        self._pending = pending
        self._polled = False
        self._started = time.monotonic()
        self._handle: asyncio.TimerHandle | None = loop.call_later(budget, self._due)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _due(self) -> None:
        if self._pending is not None and not self._pending():
            self._handle = None
            return
        left = self._budget - (time.monotonic() - self._started)
        if left > 0:  # the loop's cached clock ran behind: not due yet in real time
            self._handle = self._loop.call_later(left, self._due)
            return
        if not self._polled:  # due; but first let the loop read what already arrived
            self._polled = True
            self._handle = self._loop.call_later(_AFTER_A_POLL, self._due)
            return
        self._handle = None
        self._expire()


@contextlib.asynccontextmanager
async def within(budget: float) -> AsyncIterator[None]:
    """`asyncio.timeout(budget)` with a `Deadline`'s rules: raises TimeoutError in the body once the budget has
    passed in real time and after an I/O poll. For calls off the hot path (connecting, fetching)."""
    async with asyncio.timeout(None) as cm:
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop, budget, lambda: cm.reschedule(loop.time()))
        try:
            yield
        finally:
            deadline.cancel()

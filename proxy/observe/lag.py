"""Event-loop lag: how late a timer fires, sampled every 20 ms, into `failgate_event_loop_lag_seconds`.

A saturated process answers late for reasons of its own — CPU contention, a burst of expensive requests — and
that must be visible as itself, never mistaken for a slow dependency (deadline.py makes sure the store is not
blamed; this makes the stall itself visible). The sample is the delay between when a timer was due and when it
ran; uvloop's timers have 1 ms resolution, so lags below ~1 ms read as noise.
"""

from __future__ import annotations

import asyncio
import time

from .metrics import EVENT_LOOP_LAG, FastHistogram

INTERVAL = 0.02


class LagSampler:
    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._histogram = FastHistogram.of(EVENT_LOOP_LAG)
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        self._schedule(time.monotonic())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, now: float) -> None:
        self._due = now + self.interval
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._sample)

    def _sample(self) -> None:
        now = time.monotonic()
        self._histogram.observe(max(0.0, now - self._due))
        self._schedule(now)

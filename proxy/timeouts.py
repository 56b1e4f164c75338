"""Timeouts on the request path that cost a set insertion, not an event-loop timer.

Every request's upstream leg needs a timeout, and a streamed body one per chunk. `asyncio.timeout` arms an
event-loop timer for each (uvloop: a libuv timer, ~2 µs to arm and cancel, ~4 µs with a thousand pending) behind a
context manager of ~2 µs more: around one await, 3.3 µs against this module's 1.3 µs (benchmarks/pipeline_cost.py).
Here the deadlines of a process share 10 ms slots and one timer that ticks only while any deadline is pending; when
a slot is due, each of its deadlines cancels its task, and the `with` block turns that cancellation into
TimeoutError — `asyncio.timeout`'s contract, at a resolution of one slot: a timeout fires up to 10 ms late, never
early. Used with `with` (not `async with`) inside the coroutine it bounds:

    with expiry(seconds) as budget:
        ...  # awaits; budget.reschedule(seconds) starts a new budget from now
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Final

SLOT: Final = 0.01  # seconds


class Budget:
    """One deadline: cancels its task when its slot is due (see `expiry`)."""

    __slots__ = ("_cancelling", "_clock", "_slot", "_task", "expired")

    def __init__(self, clock: Clock, task: asyncio.Task[object], seconds: float) -> None:
        self._clock = clock
        self._task = task
        self._cancelling = task.cancelling()  # cancellations already requested by others
        self.expired = False
        self._slot = clock.add(self, seconds)

    def reschedule(self, seconds: float) -> None:
        """A new budget of `seconds` from now (unless this one has already expired)."""
        if not self.expired:
            self._clock.remove(self, self._slot)
            self._slot = self._clock.add(self, seconds)

    def expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def __enter__(self) -> Budget:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.expired:
            self._clock.remove(self, self._slot)
        elif self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from exc  # our cancellation, and nobody else's: the budget ran out


class Clock:
    """The pending deadlines of one event loop, in slots of SLOT seconds, and the one timer that serves them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._slots: dict[int, set[Budget]] = {}
        self._done = int(loop.time() / SLOT)  # every slot up to this one has been served
        self._pending = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, budget: Budget, seconds: float) -> int:
        now = self.loop.time()
        if self._timer is None:  # nothing pending: every slot until now is served
            self._done = int(now / SLOT)
        slot = int((now + seconds) / SLOT) + 1  # the first slot that starts after the deadline
        if slot <= self._done:
            slot = self._done + 1
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = set()
        members.add(budget)
        self._pending += 1
        if self._timer is None:
            self._timer = self.loop.call_at((self._done + 1) * SLOT, self._tick)
        return slot

    def remove(self, budget: Budget, slot: int) -> None:
        members = self._slots.get(slot)
        if members is not None and budget in members:
            members.discard(budget)
            self._pending -= 1

    def _tick(self) -> None:
        self._timer = None
        now = int(self.loop.time() / SLOT)
        due: list[Budget] = []
        slots = self._slots
        for slot in range(self._done + 1, now + 1):
            members = slots.pop(slot, None)
            if members:
                due.extend(members)
        self._done = max(self._done, now)
        self._pending -= len(due)
        for budget in due:
            budget.expire()
        if self._pending > 0:
            self._timer = self.loop.call_at((self._done + 1) * SLOT, self._tick)
        else:
            slots.clear()  # (only empty sets are left)


_clock: Clock | None = None


def expiry(seconds: float) -> Budget:
    """A deadline `seconds` from now for the current task; use as `with expiry(seconds):`."""
    global _clock
    # The current task of the clock's loop: None when that loop is not the one running (tests run one loop after
    # another). Asked of the clock's loop first because `asyncio.get_running_loop()` makes a getpid() system call
    # (CPython checks for a fork on every call), and this is on every request.
    task = asyncio.current_task(_clock.loop) if _clock is not None else None
    if task is None or _clock is None:
        loop = asyncio.get_running_loop()
        _clock = Clock(loop)
        task = asyncio.current_task(loop)
        assert task is not None
    return Budget(_clock, task, seconds)

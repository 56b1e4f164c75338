"""Deadlines that blame the dependency only for its own time (deadline.py), on the real uvloop event loop: a
socketpair stands in for the dependency's connection and a blocking sleep for Failgate being busy."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from proxy.deadline import Deadline, within
from proxy.store.breaker import OPEN, Breaker, BreakerStore
from proxy.store.errors import StoreUnavailable, Trip


async def test_an_answer_that_arrived_during_a_stall_is_read_before_the_deadline_fails_it() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    events: list[str] = []
    done = asyncio.Event()

    def readable() -> None:
        ours.recv(10)
        events.append("answer read")
        loop.remove_reader(ours.fileno())

    def expire() -> None:
        events.append("expired")
        done.set()

    def busy() -> None:
        theirs.send(b"reply")  # the dependency answers at once...
        time.sleep(0.08)  # ...while Failgate is busy well past the deadline

    loop.add_reader(ours.fileno(), readable)
    deadline = Deadline(loop, 0.02, expire)
    # A poll would read the answer first if `busy` ran as an ordinary callback; a stall inside an I/O callback is
    # followed by the timers, which is the case to get right.
    trigger, pull = socket.socketpair()
    loop.add_reader(pull.fileno(), lambda: (loop.remove_reader(pull.fileno()), busy()))
    trigger.send(b"go")
    await done.wait()
    deadline.cancel()
    assert events == ["answer read", "expired"]
    for s in (ours, theirs, trigger, pull):
        s.close()


async def test_armed_late_in_a_busy_loop_turn_it_still_gives_the_whole_budget_in_real_time() -> None:
    loop = asyncio.get_running_loop()
    fired = asyncio.Event()
    armed_at = 0.0

    def busy_then_arm() -> None:
        nonlocal armed_at
        time.sleep(0.06)  # the loop's cached clock is now 60 ms behind
        armed_at = time.monotonic()
        Deadline(loop, 0.05, fired.set)

    loop.call_soon(busy_then_arm)
    await fired.wait()
    assert time.monotonic() - armed_at >= 0.05


async def test_a_call_that_is_no_longer_pending_never_expires() -> None:
    loop = asyncio.get_running_loop()
    expired: list[bool] = []
    Deadline(loop, 0.01, lambda: expired.append(True), pending=lambda: False)
    probe = asyncio.Event()
    Deadline(loop, 0.03, probe.set)  # a later deadline that does fire: by then the first one had its chance
    await probe.wait()
    assert expired == []


async def test_within_raises_timeout_only_past_the_budget() -> None:
    async with within(0.5):
        await asyncio.sleep(0)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with within(0.02):
            await asyncio.Event().wait()
    assert time.monotonic() - started >= 0.02


class Failing:
    """A store whose every call fails with one shared failure: what 40 calls expiring in one pass look like."""

    def __init__(self, failure: StoreUnavailable) -> None:
        self.failure = failure

    def execute(self, ops: object) -> asyncio.Future[list[object]]:
        future = asyncio.get_running_loop().create_future()
        future.set_exception(self.failure)
        return future


async def test_failures_of_one_round_trip_count_once_for_the_breaker() -> None:
    breaker = Breaker(3, 10.0)
    shared = BreakerStore(Failing(StoreUnavailable("timeout", "40 calls expired in one pass", trip=Trip())), breaker)
    for _ in range(40):
        assert (await shared.round_trip([]))[1] is shared.inner.failure
    assert breaker.state != OPEN and breaker.consecutive == 1
    for _ in range(2):  # two more failed round trips (each its own trip) open it
        await BreakerStore(Failing(StoreUnavailable("unavailable", "lost", trip=Trip())), breaker).round_trip([])
    assert breaker.state == OPEN

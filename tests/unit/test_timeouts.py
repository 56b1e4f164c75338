"""Slotted timeouts (timeouts.py) on the real uvloop event loop: asyncio.timeout's contract — TimeoutError in the
block once the budget ran out, never early; anyone else's cancellation stays a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from proxy import timeouts
from proxy.timeouts import expiry
from tests.helpers import until


async def test_a_budget_that_runs_out_raises_timeout_error_and_never_early() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError), expiry(0.05):
        await asyncio.Event().wait()
    assert loop.time() - started >= 0.05
    await asyncio.sleep(0)  # the task is not left cancelled: it goes on awaiting
    assert timeouts._clock is not None and timeouts._clock._pending == 0


async def test_a_block_done_in_time_leaves_nothing_behind() -> None:
    with expiry(5.0) as budget:
        await asyncio.sleep(0)
    assert not budget.expired
    assert timeouts._clock is not None and timeouts._clock._pending == 0
    clock = timeouts._clock
    # the clock's timer fires once more, finds nothing pending and stops; this task is not cancelled meanwhile
    await until("the clock stops ticking", lambda: clock._timer is None)


async def test_another_cancellation_stays_a_cancellation() -> None:
    entered = asyncio.Event()

    async def body() -> None:
        with expiry(5.0):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_reschedule_starts_a_new_budget_from_now() -> None:
    loop = asyncio.get_running_loop()
    with expiry(0.03) as budget:
        await asyncio.sleep(0.02)
        budget.reschedule(0.2)
        await asyncio.sleep(0.05)  # past the first budget: still running
        rescheduled_at = loop.time()
        with pytest.raises(TimeoutError), expiry(0.03):  # (nested, the inner one runs out)
            await asyncio.Event().wait()
        assert loop.time() - rescheduled_at >= 0.03
    assert not budget.expired


async def test_only_the_budgets_that_ran_out_cancel_their_tasks() -> None:
    async def wait(seconds: float, for_: float) -> str:
        try:
            with expiry(seconds):
                await asyncio.sleep(for_)
            return "done"
        except TimeoutError:
            return "timed out"

    results = await asyncio.gather(*[wait(0.02, 1.0) for _ in range(50)], *[wait(1.0, 0.05) for _ in range(50)])
    assert results == ["timed out"] * 50 + ["done"] * 50
    assert timeouts._clock is not None and timeouts._clock._pending == 0

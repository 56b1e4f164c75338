"""The game-day switch (`admin.chaos: true`): make this process's store behave as if it failed.

hang    every call waits store.timeout and fails with `timeout` (what a SIGSTOPped Redis does)
refuse  every call fails at once with `unavailable` (a dead Redis)
slow    every call is delayed by `delay`, and fails with `timeout` when that is past store.timeout

It sits under the breaker, so a rehearsal exercises the breaker too. It ends by itself after `for`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import StoreUnavailable
from .ops import Op

MAX_FOR = 600.0


@dataclass(frozen=True)
class Fault:
    kind: str  # hang | refuse | slow
    delay: float
    until: float  # monotonic


def parse_fault(cmd: dict[str, Any]) -> tuple[str, float, float]:
    """(kind, delay, duration) from a `/chaos/store` body; ValueError with the reason when it is not valid."""
    from ..config.schema import parse_duration

    kind = str(cmd.get("fault"))
    delay = parse_duration(cmd["delay"]) if cmd.get("delay") else 0.0
    duration = parse_duration(cmd.get("for") or "30s")
    if kind not in ("hang", "refuse", "slow"):
        raise ValueError(f"fault must be hang, refuse or slow, got {kind!r}")
    if not 0 < duration <= MAX_FOR:
        raise ValueError("for must be above 0 and at most 10m")
    if kind == "slow" and delay <= 0:
        raise ValueError("slow needs a delay above 0, such as 80ms")
    return kind, delay, duration


class ChaosStore:
    def __init__(self, inner: Any, timeout: float) -> None:
        self.inner = inner
        self.timeout = timeout
        self.fault: Fault | None = None

    def set(self, kind: str, delay: float, duration: float) -> None:
        """Arguments as parse_fault returns them."""
        self.fault = Fault(kind, delay, time.monotonic() + duration)

    def clear(self) -> None:
        self.fault = None

    def active(self) -> Fault | None:
        fault = self.fault
        if fault is not None and time.monotonic() >= fault.until:
            self.fault = fault = None
        return fault

    def execute(self, ops: Sequence[Op]) -> Awaitable[list[Any]]:
        """While no fault is set: the client's own awaitable, untouched (no coroutine of our own per call)."""
        fault = self.active()
        if fault is None:
            return self.inner.execute(ops)  # type: ignore[no-any-return]
        return self._faulty(fault, ops)

    async def _faulty(self, fault: Fault, ops: Sequence[Op]) -> list[Any]:
        if fault.kind == "refuse":
            raise StoreUnavailable("unavailable", "chaos: refuse")
        if fault.kind == "hang" or fault.delay >= self.timeout:
            await asyncio.sleep(self.timeout)
            raise StoreUnavailable("timeout", f"chaos: {fault.kind}")
        await asyncio.sleep(fault.delay)
        try:
            async with asyncio.timeout(self.timeout - fault.delay):  # the budget still counts from the queueing
                return await self.inner.execute(ops)  # type: ignore[no-any-return]
        except TimeoutError:
            raise StoreUnavailable("timeout", "chaos: slow") from None

    async def close(self) -> None:
        await self.inner.close()

"""`memory://`: the embedded store, for one process (trying Failgate out, the demo, unit tests).

Same operations and the same algorithm arithmetic as Redis, with an injectable clock. Entries expire like Redis
keys and the table is bounded (oldest entries evicted first) so a flood of distinct clients cannot grow it
without limit.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from ..checks.algorithms import Spec, together
from .ops import GetOp, Op, RateOp, RateResult


class MemoryStore:
    def __init__(self, *, max_entries: int = 1_000_000, clock: Callable[[], float] = time.time) -> None:
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()  # key -> (expires_at µs, value)
        self._max = max_entries
        self._clock = clock

    def now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    async def execute(self, ops: Sequence[Op]) -> list[Any]:
        return [self._one(op) for op in ops]

    def _one(self, op: Op) -> Any:
        real_now = self.now_us()
        if isinstance(op, GetOp):
            if op.more:
                return [self._get(key, real_now) for key in (op.key, *op.more)]
            return self._get(op.key, real_now)
        if isinstance(op, RateOp):
            return self._limits((op,), real_now)[0]
        return self._limits(op.limits, real_now)

    def _limits(self, ops: tuple[RateOp, ...], real_now: int) -> list[RateResult]:
        now = ops[0].now if ops[0].now is not None else real_now
        specs = [Spec(op.algorithm, op.limit, op.window, op.burst, op.shadow) for op in ops]
        decided = together(specs, [self._get(op.key, real_now) for op in ops], now)
        results = []
        for op, (out, committed) in zip(ops, decided, strict=True):
            if committed:
                self._set(op.key, out.state, real_now + out.ttl)
            results.append(RateResult(out.allowed, out.remaining, out.reset_after / 1e6, out.retry_after / 1e6,
                                      out.state, committed))
        return results

    # --- a tiny expiring dict -------------------------------------------------------------------------------
    def _get(self, key: str, now: int) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._data[key]
            return None
        return entry[1]

    def _set(self, key: str, value: Any, expires_at: float) -> None:
        self._data[key] = (expires_at, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def set_value(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Write a raw value (the demo's seeded API key, tests)."""
        self._set(key, value, float("inf") if ttl is None else self.now_us() + ttl * 1e6)

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def close(self) -> None:
        self._data.clear()

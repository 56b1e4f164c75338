"""In-process rate limiting for `on_store_error: stale` (SPEC §3).

While the store answers, the last state it reported for each key is remembered (bounded, least recently used
first out). While it cannot, each key is enforced here with the same algorithm, continuing from that state,
with the limit — and the remembered counts — scaled by `local_share`, so one instance as a whole admits about
`limit` per window. When the store is back its answers take over again and the local state is forgotten.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from .algorithms import Outcome, run


class LocalLimiter:
    def __init__(self, max_keys: int = 100_000) -> None:
        self._last: OrderedDict[str, tuple[tuple[int, ...], float]] = OrderedDict()  # key -> (store state, at)
        self._local: dict[str, tuple[int, ...]] = {}  # key -> local state while degraded
        self._max = max_keys

    def remember(self, key: str, state: tuple[int, ...], at: float) -> None:
        last = self._last
        last[key] = (state, at)
        last.move_to_end(key)
        if len(last) > self._max:
            last.popitem(last=False)
        if self._local:
            self._local.clear()  # the store is answering again

    def decide(self, key: str, algorithm: str, limit: int, window: int, burst: int, share: float,
               now_us: int) -> tuple[Outcome, float | None]:
        """The local outcome and the age (seconds) of the store state it continued from, if any."""
        local_limit = max(1, math.floor(limit * share))
        local_burst = max(1, math.floor(burst * share))
        state = self._local.get(key)
        age = None
        if state is None:
            remembered = self._last.get(key)
            if remembered is not None:
                store_state, at = remembered
                age = max(0.0, now_us / 1e6 - at)
                state = _scaled(algorithm, store_state, share)
        out = run(algorithm, state, now_us, local_limit, window, local_burst)
        self._local[key] = out.state
        if len(self._local) > self._max:
            self._local.pop(next(iter(self._local)))
        return out, age


def _scaled(algorithm: str, state: tuple[int, ...], share: float) -> tuple[int, ...]:
    if algorithm == "gcra":
        return state  # the theoretical arrival time carries over as is
    # (window index, counts...): this process's share of what the whole fleet has used
    return (state[0], *(math.ceil(c * share) for c in state[1:]))

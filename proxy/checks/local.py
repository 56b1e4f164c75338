"""In-process rate limiting for `on_store_error: stale`.

While the store answers, the last state it reported for each key is remembered (bounded, least recently used
first out). While it cannot, each key is enforced here with the same algorithm, continuing from that state,
with the limit — and the remembered counts — scaled by `local_share`, so one instance as a whole admits about
`limit` per window. Everything is per key: an answer from the store for one key replaces that key's local state
and nothing else's — a store that answers some calls and fails others (out of memory: a deny writes nothing, a
count does) must not reset the local count of the keys it fails.

One ordered table, one entry per key, so eviction is O(1) (`popitem`) and the table never grows past `max_keys`.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from ..store.ops import RateOp, RateResult
from .algorithms import Spec, together


class LocalLimiter:
    def __init__(self, max_keys: int = 100_000) -> None:
        # key -> [store state or None, when the store reported it, local state or None]
        self._keys: OrderedDict[str, list[object]] = OrderedDict()
        self._max = max_keys

    def __len__(self) -> int:
        return len(self._keys)

    def remember(self, key: str, state: tuple[int, ...], at: float) -> None:
        """The store answered for `key`: its state replaces whatever was enforced here for that key."""
        keys = self._keys
        keys[key] = [state, at, None]
        keys.move_to_end(key)
        if len(keys) > self._max:
            keys.popitem(last=False)

    def decide(self, key: str, algorithm: str, limit: int, window: int, burst: int, share: float,
               now_us: int) -> tuple[RateResult, float | None]:
        """One limit: the local answer — the same type as the store's — and the age (seconds) of the store state
        this key's local count continues from, if the store ever reported one."""
        return self.decide_together([(RateOp(algorithm, key, limit, window, burst), share)], now_us)[0]

    def decide_together(self, limits: list[tuple[RateOp, float]], now_us: int) -> list[tuple[RateResult, float | None]]:
        """Several limits on one subject (each op with its `local_share`), decided together as the store decides
        them: nothing is counted unless every limit that is not a shadow admits the request."""
        keys = self._keys
        specs: list[Spec] = []
        states: list[tuple[int, ...] | None] = []
        entries, ages = [], []
        for op, share in limits:
            entry = keys.get(op.key)
            if entry is None:
                entry = keys[op.key] = [None, 0.0, None]
                if len(keys) > self._max:
                    keys.popitem(last=False)
            else:
                keys.move_to_end(op.key)
            store_state, at, state = entry
            age = None
            if store_state is not None:
                age = max(0.0, now_us / 1e6 - at)  # type: ignore[operator]
                if state is None:
                    state = _scaled(op.algorithm, store_state, share)  # type: ignore[arg-type]
            specs.append(Spec(op.algorithm, max(1, math.floor(op.limit * share)), op.window,
                              max(1, math.floor(op.burst * share)), op.shadow))
            states.append(state)  # type: ignore[arg-type]
            entries.append(entry)
            ages.append(age)
        answers = []
        for entry, age, (out, committed) in zip(entries, ages, together(specs, states, now_us), strict=True):
            if committed:
                entry[2] = out.state
            answers.append((RateResult(out.allowed, out.remaining, out.reset_after / 1e6, out.retry_after / 1e6,
                                       out.state, committed), age))
        return answers


def _scaled(algorithm: str, state: tuple[int, ...], share: float) -> tuple[int, ...]:
    if algorithm == "gcra":
        return state  # the theoretical arrival time carries over as is
    # (window index, counts...): this process's share of what the whole fleet has used
    return (state[0], *(math.ceil(c * share) for c in state[1:]))

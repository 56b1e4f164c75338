"""The three rate-limit algorithms as pure functions on a small state tuple. No I/O, no clock of their own.

The memory store runs them directly; the Lua script `proxy/store/scripts/limits.lua` is line-for-line the same
arithmetic, so both stores give the same answers (the same test cases run against both). `together` decides
several limits on one subject at once, as that script does: nothing is consumed unless every limit that is not a
shadow admits the request. Times are integer
microseconds; a window is `window` microseconds long.

- fixed_window   state (window_index, count): at most `limit` admitted per aligned window.
- sliding_window state (window_index, count, previous_count): the previous window's count is weighted by the
                 share of it still inside the sliding window (Cloudflare's approximation); denials are not counted.
- gcra           state (tat,): generic cell rate algorithm, one request every window/limit with `burst` in hand.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Outcome(NamedTuple):
    allowed: bool
    remaining: int
    reset_after: int  # µs until the quota is whole again (RateLimit `t`)
    retry_after: int  # µs until a request would be admitted; 0 when allowed
    state: tuple[int, ...]  # what to store (unchanged on a denial)
    ttl: int  # µs the stored state must live


def fixed_window(state: tuple[int, ...] | None, now: int, limit: int, window: int) -> Outcome:
    idx = now // window
    count = state[1] if state and state[0] == idx else 0
    reset = window - (now - idx * window)
    if count >= limit:
        return Outcome(False, 0, reset, reset, (idx, count), reset)
    count += 1
    return Outcome(True, limit - count, reset, 0, (idx, count), reset)


def sliding_window(state: tuple[int, ...] | None, now: int, limit: int, window: int) -> Outcome:
    idx = now // window
    elapsed = now - idx * window
    if state and state[0] == idx:
        cur, prev = state[1], state[2]
    elif state and state[0] == idx - 1:
        cur, prev = 0, state[1]
    else:
        cur, prev = 0, 0
    estimate = (prev * (window - elapsed)) / window + cur
    reset = window - elapsed
    if estimate + 1 > limit:
        if cur + 1 <= limit:
            # the previous window's weight must fall far enough
            retry = math.ceil(window - ((limit - 1 - cur) * window) / prev) - elapsed
        else:
            # this window alone is full: wait for the next, where this count becomes the weighted one
            retry = reset + max(0, math.ceil(window - ((limit - 1) * window) / cur))
        return Outcome(False, 0, reset, max(retry, 1), (idx, cur, prev), reset + window)
    cur += 1
    remaining = math.floor(limit - (estimate + 1))
    return Outcome(True, remaining, reset, 0, (idx, cur, prev), reset + window)


def gcra(state: tuple[int, ...] | None, now: int, limit: int, window: int, burst: int) -> Outcome:
    interval = window // limit  # µs between requests at the sustained rate
    tat = max(state[0], now) if state else now
    new_tat = tat + interval
    allow_at = new_tat - burst * interval
    if now < allow_at:
        return Outcome(False, 0, tat - now, allow_at - now, (tat,), max(tat - now, 1))
    remaining = (now - allow_at) // interval
    return Outcome(True, remaining, new_tat - now, 0, (new_tat,), new_tat - now)


def run(algorithm: str, state: tuple[int, ...] | None, now: int, limit: int, window: int, burst: int) -> Outcome:
    if algorithm == "fixed_window":
        return fixed_window(state, now, limit, window)
    if algorithm == "sliding_window":
        return sliding_window(state, now, limit, window)
    return gcra(state, now, limit, window, burst)


# The single letters the Lua script knows the algorithms by.
CODES = {"fixed_window": "f", "sliding_window": "s", "gcra": "g"}
STATE_SIZE = {"fixed_window": 2, "sliding_window": 3, "gcra": 1}


class Spec(NamedTuple):
    """One limit as the store evaluates it."""

    algorithm: str
    limit: int
    window: int  # µs
    burst: int
    shadow: bool = False


def together(specs: list[Spec], states: list[tuple[int, ...] | None],
             now: int) -> list[tuple[Outcome, bool]]:
    """Decide every limit, then commit (the bool) each allowed one only when every non-shadow limit allowed; an
    allowed outcome that is not committed reports what it would have left (remaining + 1) and the state as it was."""
    outs = [run(s.algorithm, state, now, s.limit, s.window, s.burst) for s, state in zip(specs, states, strict=True)]
    admitted = all(out.allowed for s, out in zip(specs, outs, strict=True) if not s.shadow)
    result = []
    for s, state, out in zip(specs, states, outs, strict=True):
        if not out.allowed:
            result.append((out, False))
        elif admitted:
            result.append((out, True))
        else:
            result.append((out._replace(remaining=out.remaining + 1, state=_before(s, state, now)), False))
    return result


def _before(s: Spec, state: tuple[int, ...] | None, now: int) -> tuple[int, ...]:
    """A state as the algorithm reads it at `now` (what the script reports when it writes nothing)."""
    if s.algorithm == "gcra":
        return (max(state[0], now) if state else now,)
    idx = now // s.window
    if s.algorithm == "fixed_window":
        return (idx, state[1] if state and state[0] == idx else 0)
    if state and state[0] == idx:
        return (idx, state[1], state[2])
    return (idx, 0, state[1] if state and state[0] == idx - 1 else 0)

"""What a check asks the store for: small values that any store can execute (the "what", not the "where")."""

from __future__ import annotations

from typing import NamedTuple


class RateOp(NamedTuple):
    """Count one request against a rate limit and say whether it is admitted. (A NamedTuple: made for every
    rate-limited request, and a tuple is the cheapest immutable value to make.)"""

    algorithm: str  # fixed_window | sliding_window | gcra
    key: str  # full store key
    limit: int
    window: int  # µs
    burst: int
    now: int | None = None  # µs; None = the store's own clock (tests pin it)
    shadow: bool = False  # counted and reported, never denies (and never stops the others of a LimitsOp counting)


class LimitsOp(NamedTuple):
    """Several limits on one subject, decided together: a request one of them denies consumes nothing from the
    others. The store answers with one RateResult per limit, in order."""

    limits: tuple[RateOp, ...]
    shape: tuple[object, ...] = ()  # everything but the keys, for a store that packs the call once per shape


class GetOp:
    """Read one value, answered with it (or None); or several in one command, answered with the list of them in
    order — an API-key record and the epoch marker. On a Cluster the keys of one GetOp share a slot (the bucketed
    layout, keyspace.py), and `key`, the first, is where it goes. (A plain class: a frozen dataclass's generated
    __init__ is interpreted Python even in a compiled build, and an API-key check makes one per request.)"""

    __slots__ = ("key", "more")

    def __init__(self, key: str, *more: str) -> None:
        self.key = key
        self.more = more  # the other keys: () for one value

    def __repr__(self) -> str:
        return f"GetOp({', '.join(repr(k) for k in (self.key, *self.more))})"


Op = RateOp | LimitsOp | GetOp


class RateResult(NamedTuple):
    allowed: bool
    remaining: int
    reset_after: float  # seconds
    retry_after: float  # seconds; 0 when allowed
    state: tuple[int, ...]  # the stored state after this call (for the stale mode)
    committed: bool = True  # this call was counted (False: denied, or admitted here but denied by another limit)

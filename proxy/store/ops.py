"""What a check asks the store for: small values that any store can execute (the "what", not the "where")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

# RateOp and RateResult are made for every rate-limited request: dataclasses for their repr and ==, with their own
# __init__ (the one `dataclass` generates is Python source, interpreted even in a compiled build, and a NamedTuple
# is made through tuple.__new__ and read through descriptors, where a compiled class is one call and direct reads).
# Treat them as immutable.


@dataclass(slots=True, init=False)
class RateOp:
    """Count one request against a rate limit and say whether it is admitted."""

    algorithm: str  # fixed_window | sliding_window | gcra
    key: str  # full store key
    limit: int
    window: int  # µs
    burst: int
    now: int | None  # µs; None = the store's own clock (tests pin it)
    shadow: bool  # counted and reported, never denies (and never stops the others of a LimitsOp counting)
    # The Redis command for this operation, packed by the first store that sent it: a client's operation is kept
    # and reused (ratelimit.py), and its bytes never change. Not part of the value.
    wire: bytes | None = field(default=None, repr=False, compare=False)

    def __init__(self, algorithm: str, key: str, limit: int, window: int, burst: int, now: int | None = None,
                 shadow: bool = False) -> None:
        self.algorithm = algorithm
        self.key = key
        self.limit = limit
        self.window = window
        self.burst = burst
        self.now = now
        self.shadow = shadow
        self.wire = None


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

    __slots__ = ("key", "more", "wire")

    def __init__(self, key: str, *more: str) -> None:
        self.key = key
        self.more = more  # the other keys: () for one value
        self.wire: bytes | None = None  # as RateOp's: an API key's read is kept per credential (auth.py)

    def __repr__(self) -> str:
        return f"GetOp({', '.join(repr(k) for k in (self.key, *self.more))})"


Op = RateOp | LimitsOp | GetOp


@dataclass(slots=True, init=False)
class RateResult:
    allowed: bool
    remaining: int
    reset_after: float  # seconds
    retry_after: float  # seconds; 0 when allowed
    state: tuple[int, ...]  # the stored state after this call (for the stale mode)
    committed: bool  # this call was counted (False: denied, or admitted here but denied by another limit)

    def __init__(self, allowed: bool, remaining: int, reset_after: float, retry_after: float,
                 state: tuple[int, ...], committed: bool = True) -> None:
        self.allowed = allowed
        self.remaining = remaining
        self.reset_after = reset_after
        self.retry_after = retry_after
        self.state = state
        self.committed = committed

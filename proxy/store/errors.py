"""The one exception the store boundary raises. Every redis/socket/protocol failure is translated into it once,
here, so nothing above the store ever sees a redis-py, hiredis or socket exception."""

from __future__ import annotations

from typing import Literal

Reason = Literal["timeout", "unavailable", "error", "breaker_open"]


class Trip:
    """One failed round trip of the store client. Every call that failed with the same trip — all the calls that
    expired in one pass of the event loop, every call waiting on a connection that was lost — counts as one
    failure for the breaker: a stall of any length, or one lost connection, is at most one failure."""

    __slots__ = ("counted",)

    def __init__(self) -> None:
        self.counted = False


class StoreUnavailable(Exception):
    """The store could not answer. `transport` is False for an error reply about one record (a malformed value):
    the store itself is fine, so the breaker must not count it."""

    def __init__(self, reason: Reason, detail: str = "", *, transport: bool = True, trip: Trip | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: Reason = reason
        self.detail = detail
        self.transport = transport
        self.trip = trip

"""What a check decides when the store cannot answer (SPEC §3). Pure: no I/O, no clock, no store.

Read it as a table. Rows are (check, on_store_error); each returns the Verdict and its basis. Nothing else in
Failgate decides what a store failure means.

| check      | mode   | verdict                                                                          |
|------------|--------|----------------------------------------------------------------------------------|
| rate_limit | open   | allow, basis open; no RateLimit fields (we don't know them)                      |
| rate_limit | closed | deny with status_on_error and Retry-After: breaker.open_for, basis closed        |
| rate_limit | stale  | the local limiter's outcome (continued from the last state the store reported),  |
|            |        | basis stale, with RateLimit fields from the local state                          |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from .checks.algorithms import Outcome
from .decision import Basis, Reason, Verdict

if TYPE_CHECKING:
    from .checks.auth import Identity
    from .checks.memo import Record


def rate_limit_open(reason: Reason) -> Verdict:
    return Verdict("rate_limit", True, basis="open", reason=reason)


def closed(check: str, reason: Reason, *, status: int, retry_after: float, basis: Basis = "closed",
           fallback: str | None = None) -> Verdict:
    return Verdict(check, False, basis=basis, reason=reason, status=status, code="store_unavailable",
                   fallback=fallback,
                   detail=f"the {check.replace('_', ' ')} check cannot be made right now; retry later",
                   headers=[("Retry-After", str(max(1, math.ceil(retry_after))))])


def rate_limit_stale(reason: Reason, outcome: Outcome, *, route: str, policy: tuple[str, str], limit: int,
                     age: float | None) -> Verdict:
    headers = [policy, ("RateLimit", f'"{route}";r={outcome.remaining};t={math.ceil(outcome.reset_after / 1e6)}')]
    if outcome.allowed:
        return Verdict("rate_limit", True, basis="stale", reason=reason, headers=headers, age=age)
    retry = max(1, math.ceil(outcome.retry_after / 1e6))
    headers.append(("Retry-After", str(retry)))
    return Verdict("rate_limit", False, basis="stale", reason=reason, status=429, code="rate_limited",
                   detail=f"rate limit exceeded (enforced locally while the store cannot answer); retry in {retry}s",
                   headers=headers, age=age)


# --- auth -----------------------------------------------------------------------------------------------------
#
# | check | mode   | verdict                                                                                   |
# |-------|--------|-------------------------------------------------------------------------------------------|
# | auth  | open   | allow, basis open; the principal is unknown (a `principal` rate limit uses the client IP) |
# | auth  | closed | deny with status_on_error and Retry-After, basis closed                                   |
# | auth  | stale  | the record remembered for this credential, if fetched within stale_for: the route's own   |
# |       |        | scope and expiry rules applied to it (a remembered revocation stays 401), basis stale,    |
# |       |        | tagged with its age; nothing remembered (or too old): stale_fallback, tagged fallback=…   |
# |       |        | and still counted as basis stale (the decision label says allow or deny)                  |


def auth_open(reason: Reason) -> Verdict:
    return Verdict("auth", True, basis="open", reason=reason)


def auth_stale(reason: Reason, remembered: tuple[Record | str, float] | None, *, now: float, stale_for: float,
               fallback: str, status: int, retry_after: float,
               judge: Callable[..., tuple[Verdict, Identity | None]]) -> tuple[Verdict, Identity | None]:
    if remembered is not None and now - remembered[1] <= stale_for:
        record, at = remembered
        return judge(record, now, basis="stale", reason=reason, age=now - at)
    if fallback == "open":
        return Verdict("auth", True, basis="stale", reason=reason, fallback="open"), None
    return closed("auth", reason, status=status, retry_after=retry_after, basis="stale", fallback="closed"), None

"""What a check decides when its dependency cannot answer — the table, as data. Pure: no I/O, no clock.

`TABLE` maps (check kind, `on_store_error`) to a `Rule` (`auth` is the api_key kind; `jwt` fails when its key
set cannot be refreshed), and `degraded()` applies it: nothing else in Failgate
decides what a failure means. `allow` and `deny` are the same for every kind; `remembered` hands over to the
check kind's own stale memory (the local limiter, the remembered API-key records). The README prints this table;
tests/unit/test_failmode.py keeps the two the same and runs every row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .decision import Basis, Reason, Verdict
from .store.errors import StoreUnavailable


@dataclass(frozen=True)
class Rule:
    outcome: Literal["allow", "deny", "remembered"]
    text: str  # what the README says


TABLE: dict[tuple[str, str], Rule] = {
    ("rate_limit", "open"): Rule("allow", "allow; no `RateLimit` fields (there is nothing to report)"),
    ("rate_limit", "closed"): Rule("deny", "deny with `status_on_error` and `Retry-After: <breaker.open_for>`"),
    ("rate_limit", "stale"): Rule("remembered", "enforce in this process, per key, continuing from the last state "
                                  "the store reported (scaled by `local_share`); `RateLimit` fields from it"),
    ("auth", "open"): Rule("allow", "allow; the principal is unknown (a `principal` limit counts by client "
                           "address)"),
    ("auth", "closed"): Rule("deny", "deny with `status_on_error` and `Retry-After: <breaker.open_for>`"),
    ("auth", "stale"): Rule("remembered", "the record remembered for the credential if younger than `stale_for`, "
                            "the route's scopes, expiry and revocations applied to it; nothing remembered: "
                            "`stale_fallback` (`open` or `closed`), tagged `fallback=`"),
    ("jwt", "open"): Rule("remembered", "verify with whatever key set is held, tagged `mode=open`; no set at all: "
                          "allow, the principal unknown"),
    ("jwt", "closed"): Rule("deny", "deny with `status_on_error` and `Retry-After: <breaker.open_for>` once the key "
                            "set is not fresh"),
    ("jwt", "stale"): Rule("remembered", "verify with the last good key set for up to `stale_for` after its last "
                           "successful fetch, tagged with its age; past that, or no set: `stale_fallback`"),
    ("http", "open"): Rule("allow", "allow; the principal unknown, no authorizer headers upstream"),
    ("http", "closed"): Rule("deny", "deny with `status_on_error` and `Retry-After: <its breaker.open_for>`"),
    ("http", "stale"): Rule("remembered", "the verdict the authorizer gave for the same request (route, method, "
                            "host, path, forwarded headers or `cache_key`) if younger than `stale_for`, its "
                            "headers with it; none: `stale_fallback`"),
}


def degraded(kind: str, mode: str, failure: StoreUnavailable, *, status: int, retry_after: float,
             remembered: Callable[[Reason], Verdict], check: str | None = None) -> Verdict:
    """The verdict of a `kind` check (named `check`: `rate_limit.burst`) whose dependency failed with `failure`,
    by its `on_store_error` `mode`."""
    rule = TABLE[(kind, mode)]
    if rule.outcome == "allow":
        return unchecked_allow(check or kind, failure.reason, basis="open")
    if rule.outcome == "deny":
        return unchecked_deny(check or kind, failure.reason, status=status, retry_after=retry_after)
    return remembered(failure.reason)


def unchecked_allow(check: str, reason: Reason, *, basis: Basis, fallback: str | None = None) -> Verdict:
    return Verdict(check, True, basis=basis, reason=reason, fallback=fallback)


def unchecked_deny(check: str, reason: Reason, *, status: int, retry_after: float, basis: Basis = "closed",
                   fallback: str | None = None) -> Verdict:
    return Verdict(check, False, basis=basis, reason=reason, status=status, code="store_unavailable",
                   fallback=fallback,
                   detail=f"the {check.replace('_', ' ')} check cannot be made right now; retry later",
                   headers=[("Retry-After", str(max(1, math.ceil(retry_after))))])


def readme_table() -> str:
    """The table as the README prints it."""
    rows = ["| check | `on_store_error` | when the dependency cannot answer |", "|---|---|---|"]
    rows += [f"| {kind} | `{mode}` | {rule.text} |" for (kind, mode), rule in TABLE.items()]
    return "\n".join(rows)

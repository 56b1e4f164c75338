"""What a check decides when its dependency cannot answer — the table, as data. Pure: no I/O, no clock.

`TABLE` maps (check kind, `on_store_error`) to a `Rule` (`auth` is the api_key kind; `jwt` fails when its key
set cannot be refreshed), and `FailMode` — one per check, made when the config is compiled — applies it: nothing
else in Failgate decides what a failure means. `allow` and `deny` are the same for every kind; `remembered` hands
over to the check kind's own stale memory (the local limiter, the remembered API-key records). The README prints
this table; tests/unit/test_failmode.py keeps the two the same and runs every row.
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
                            "headers with it; none: `stale_fallback` (`closed`: `Retry-After: <its "
                            "breaker.open_for>`)"),
}


class FailMode:
    """One check's row of the table, looked up once when the config is compiled. The verdicts that need no memory
    — allow, deny, and `stale_fallback`'s — are made once per reason and handed to every request they decide (a
    Verdict is never changed once made): an outage costs a lookup per request, not new verdicts."""

    def __init__(self, kind: str, mode: str, check: str, *, status: int, retry_after: float,
                 stale_fallback: str | None = None) -> None:
        self.check = check
        self.status = status
        self.retry_after = retry_after
        self.stale_fallback = stale_fallback
        self.outcome = TABLE[(kind, mode)].outcome
        self.remembers = self.outcome == "remembered"  # the check's own memory decides
        self._made: dict[str, Verdict] = {}  # reason -> the table's verdict
        self._fallbacks: dict[str, Verdict] = {}  # reason -> stale_fallback's verdict

    def decide(self, failure: StoreUnavailable, remembered: Callable[[Reason], Verdict] | None = None) -> Verdict:
        """The verdict of this check (named `check`: `rate_limit.burst`) whose dependency failed with `failure`;
        `remembered` is needed when the row hands over to the check's memory."""
        reason = failure.reason
        if self.remembers:
            assert remembered is not None
            return remembered(reason)
        made = self._made.get(reason)
        if made is None:
            if self.outcome == "allow":
                made = unchecked_allow(self.check, reason, basis="open")
            else:
                made = unchecked_deny(self.check, reason, status=self.status, retry_after=self.retry_after)
            self._made[reason] = made
        return made

    def fallback(self, reason: Reason) -> Verdict:
        """`stale` with nothing (young enough) remembered: `stale_fallback`, tagged `fallback=`."""
        made = self._fallbacks.get(reason)
        if made is None:
            if self.stale_fallback == "open":
                made = unchecked_allow(self.check, reason, basis="stale", fallback="open")
            else:
                made = unchecked_deny(self.check, reason, status=self.status, retry_after=self.retry_after,
                                      basis="stale", fallback="closed")
            self._fallbacks[reason] = made
        return made


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

"""The values that flow from the checks to the response: each check's Verdict, and a request's Decision.

A Verdict (and its Identity and Quota) is never changed once made: a check may hand the same one to many requests
(an API key's unchanged record, auth.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .store.errors import Reason

if TYPE_CHECKING:
    from .observe.metrics import RouteMetrics

Basis = Literal["checked", "open", "closed", "stale"]

__all__ = ["Basis", "Decision", "Identity", "Quota", "Reason", "Verdict"]


@dataclass(slots=True, init=False)
class Identity:
    """Who a credential belongs to, as the auth check established it. (Made per request: its own __init__, as
    below.)"""

    principal: str
    scopes: tuple[str, ...]
    plan: str | None

    def __init__(self, principal: str, scopes: tuple[str, ...], plan: str | None = None) -> None:
        self.principal = principal
        self.scopes = scopes
        self.plan = plan


# The per-request classes below are dataclasses for their repr and ==, but write their own __init__: the one
# `dataclass` generates is Python source made at import time, which a compiled build would still interpret on
# every request (about 1 µs for a Verdict). (A NamedTuple is no cheaper there: made through tuple.__new__, its
# fields read by name through descriptors, where a compiled class is one call and reads its fields directly.)

@dataclass(slots=True, init=False)
class Quota:
    """A rate limit's answer as the IETF RateLimit fields report it (draft-ietf-httpapi-ratelimit-headers)."""

    item: str  # its RateLimit-Policy item, `"<policy>";q=<q>;w=<w>` (made once per limit and quota)
    policy: str  # the policy's name
    q: int  # the quota that applied
    r: int  # what is left of it (never above q)
    reset_after: float  # seconds until the quota is whole again
    retry_after: float  # seconds until a request would be admitted; 0 when admitted

    def __init__(self, item: str, policy: str, q: int, r: int, reset_after: float, retry_after: float) -> None:
        self.item = item
        self.policy = policy
        self.q = q
        self.r = r
        self.reset_after = reset_after
        self.retry_after = retry_after


@dataclass(slots=True, init=False)
class Verdict:
    check: str  # "auth" | "rate_limit"
    allow: bool
    basis: Basis  # "checked" unless a fail mode decided
    status: int  # the response status when denied
    code: str  # the error code of a denial ("rate_limited", "unauthorized", …)
    detail: str
    headers: Sequence[tuple[str, str]]  # sent on the response, allowed or not
    reason: Reason | None  # why the dependency could not answer (degraded verdicts only)
    age: float | None  # seconds, stale only
    fallback: str | None  # stale had nothing and stale_fallback applied
    identity: Identity | None  # an allowing auth verdict: who
    quota: Quota | None  # a rate limit's fields (checked, or enforced locally)
    shadow_deny: bool  # a shadow limit that would have denied: reported, never enforced
    upstream: Sequence[tuple[str, str]]  # headers for the upstream request (an authorizer's)
    body: tuple[bytes, str] | None  # a deny's own body and content type (an authorizer's), instead of ours

    def __init__(self, check: str, allow: bool, basis: Basis = "checked", status: int = 200, code: str = "",
                 detail: str = "", headers: Sequence[tuple[str, str]] = (), reason: Reason | None = None,
                 age: float | None = None, fallback: str | None = None, identity: Identity | None = None,
                 quota: Quota | None = None, shadow_deny: bool = False, upstream: Sequence[tuple[str, str]] = (),
                 body: tuple[bytes, str] | None = None) -> None:
        self.check = check
        self.allow = allow
        self.basis = basis
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.reason = reason
        self.age = age
        self.fallback = fallback
        self.identity = identity
        self.quota = quota
        self.shadow_deny = shadow_deny
        self.upstream = upstream
        self.body = body

    @property
    def degraded(self) -> bool:
        return self.basis != "checked"

    @property
    def decision(self) -> str:
        """As metrics and the decision log say it: allow, deny, or shadow_deny."""
        return "shadow_deny" if self.shadow_deny else "allow" if self.allow else "deny"

    def tag(self) -> str:
        """This verdict as one RFC 8941 list item of the degraded header."""
        item = f"{self.check};mode={self.basis};reason={self.reason}"
        if self.age is not None:
            item += f";age={int(self.age)}"
        if self.fallback is not None:
            item += f";fallback={self.fallback}"
        return item


@dataclass(slots=True, init=False)
class Decision:
    """The verdicts of one request's checks, in check order; the first deny is the response."""

    verdicts: list[Verdict]
    deny: Verdict | None
    identity: Identity | None

    def __init__(self, verdicts: list[Verdict] | None = None, deny: Verdict | None = None,
                 identity: Identity | None = None) -> None:
        self.verdicts = [] if verdicts is None else verdicts
        self.deny = deny
        self.identity = identity

    def add(self, metrics: RouteMetrics, verdict: Verdict) -> None:
        metrics.decided(verdict)
        self.verdicts.append(verdict)
        if verdict.identity is not None:
            self.identity = verdict.identity
        if not verdict.allow and self.deny is None:
            self.deny = verdict

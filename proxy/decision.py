"""The values that flow from the checks to the response: each check's Verdict, and a request's Decision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

from .store.errors import Reason

if TYPE_CHECKING:
    from .observe.metrics import RouteMetrics

Basis = Literal["checked", "open", "closed", "stale"]

__all__ = ["Basis", "Decision", "Identity", "Quota", "Reason", "Verdict"]


class Identity(NamedTuple):  # (made per request: a NamedTuple costs half what a frozen dataclass does)
    """Who a credential belongs to, as the auth check established it."""

    principal: str
    scopes: tuple[str, ...]
    plan: str | None = None


class Quota(NamedTuple):
    """A rate limit's answer as the IETF RateLimit fields report it (draft-ietf-httpapi-ratelimit-headers)."""

    item: str  # its RateLimit-Policy item, `"<policy>";q=<q>;w=<w>` (made once per limit and quota)
    policy: str  # the policy's name
    q: int  # the quota that applied
    r: int  # what is left of it (never above q)
    reset_after: float  # seconds until the quota is whole again
    retry_after: float  # seconds until a request would be admitted; 0 when admitted


@dataclass(slots=True)
class Verdict:
    check: str  # "auth" | "rate_limit"
    allow: bool
    basis: Basis = "checked"
    status: int = 200  # the response status when denied
    code: str = ""  # the error code of a denial ("rate_limited", "unauthorized", …)
    detail: str = ""
    headers: Sequence[tuple[str, str]] = ()  # sent on the response, allowed or not
    reason: Reason | None = None  # why the dependency could not answer (degraded verdicts only)
    age: float | None = None  # seconds, stale only
    fallback: str | None = None  # stale had nothing and stale_fallback applied
    identity: Identity | None = None  # an allowing auth verdict: who
    quota: Quota | None = None  # a rate limit's fields (checked, or enforced locally)
    shadow_deny: bool = False  # a shadow limit that would have denied: reported, never enforced
    upstream: Sequence[tuple[str, str]] = ()  # headers for the upstream request (an authorizer's)
    body: tuple[bytes, str] | None = None  # a deny's own body and content type (an authorizer's), instead of ours

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


@dataclass(slots=True)
class Decision:
    """The verdicts of one request's checks, in check order; the first deny is the response."""

    verdicts: list[Verdict] = field(default_factory=list)
    deny: Verdict | None = None
    identity: Identity | None = None

    def add(self, metrics: RouteMetrics, verdict: Verdict) -> None:
        metrics.decided(verdict)
        self.verdicts.append(verdict)
        if verdict.identity is not None:
            self.identity = verdict.identity
        if not verdict.allow and self.deny is None:
            self.deny = verdict

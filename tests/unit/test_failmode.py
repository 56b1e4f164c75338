"""The fail-mode table: every row."""

from __future__ import annotations

from proxy.checks.algorithms import Outcome
from proxy.failmode import closed, rate_limit_open, rate_limit_stale

POLICY = ("RateLimit-Policy", '"r";q=10;w=60')


def test_open_allows_and_tags() -> None:
    v = rate_limit_open("timeout")
    assert (v.allow, v.basis, v.reason, v.headers) == (True, "open", "timeout", [])
    assert v.tag() == "rate_limit;mode=open;reason=timeout"


def test_closed_denies_with_status_and_retry_after() -> None:
    v = closed("rate_limit", "breaker_open", status=503, retry_after=2.0)
    assert (v.allow, v.basis, v.status, v.code) == (False, "closed", 503, "store_unavailable")
    assert v.headers == [("Retry-After", "2")]
    assert closed("auth", "timeout", status=429, retry_after=0.25).headers == [("Retry-After", "1")]
    assert v.tag() == "rate_limit;mode=closed;reason=breaker_open"


def test_stale_uses_the_local_outcome() -> None:
    ok = Outcome(True, 4, 30_000_000, 0, (1, 6), 30_000_000)
    v = rate_limit_stale("unavailable", ok, route="r", policy=POLICY, limit=10, age=42.7)
    assert (v.allow, v.basis, v.age) == (True, "stale", 42.7)
    assert v.headers == [POLICY, ("RateLimit", '"r";r=4;t=30')]
    assert v.tag() == "rate_limit;mode=stale;reason=unavailable;age=42"
    no = Outcome(False, 0, 30_000_000, 1_500_000, (1, 10), 30_000_000)
    v = rate_limit_stale("timeout", no, route="r", policy=POLICY, limit=10, age=None)
    assert (v.allow, v.status, v.code) == (False, 429, "rate_limited")
    assert ("Retry-After", "2") in v.headers
    assert v.tag() == "rate_limit;mode=stale;reason=timeout"

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


# --- auth rows ---------------------------------------------------------------------------------------------------

def _judge():  # type: ignore[no-untyped-def]
    from proxy.checks.auth import AuthCheck
    from proxy.config.schema import Auth

    check = AuthCheck("pay", Auth(type="api_key", scopes=["pay"], on_store_error="stale", stale_fallback="closed"),
                      key_prefix="fg:")
    return check.judge


def test_auth_open_allows_with_no_principal() -> None:
    from proxy.failmode import auth_open

    v = auth_open("timeout")
    assert (v.allow, v.basis, v.tag()) == (True, "open", "auth;mode=open;reason=timeout")


def test_auth_stale_uses_a_remembered_record_within_stale_for() -> None:
    from proxy.checks.memo import Record
    from proxy.failmode import auth_stale

    rec = Record(principal="ann", scopes=["pay", "x"])
    v, ident = auth_stale("unavailable", (rec, 100.0), now=130.0, stale_for=60, fallback="closed", status=503,
                          retry_after=2, judge=_judge())
    assert (v.allow, v.basis, v.age, ident.principal if ident else None) == (True, "stale", 30.0, "ann")
    assert v.tag() == "auth;mode=stale;reason=unavailable;age=30"


def test_auth_stale_applies_the_route_rules_to_the_remembered_record() -> None:
    from proxy.checks.memo import REVOKED, Record
    from proxy.failmode import auth_stale

    judge = _judge()
    revoked, _ = auth_stale("timeout", (REVOKED, 100.0), now=101.0, stale_for=60, fallback="open", status=503,
                            retry_after=2, judge=judge)
    assert (revoked.allow, revoked.status, revoked.basis) == (False, 401, "stale")
    weak, _ = auth_stale("timeout", (Record(principal="b", scopes=["x"]), 100.0), now=101.0, stale_for=60,
                         fallback="open", status=503, retry_after=2, judge=judge)
    assert (weak.allow, weak.status) == (False, 403)
    expired, _ = auth_stale("timeout", (Record(principal="c", scopes=["pay"], expires_at=100.5), 100.0), now=101.0,
                            stale_for=60, fallback="open", status=503, retry_after=2, judge=judge)
    assert (expired.allow, expired.status) == (False, 401)


def test_auth_stale_falls_back_when_nothing_is_remembered_or_it_is_too_old() -> None:
    from proxy.checks.memo import Record
    from proxy.failmode import auth_stale

    old = (Record(principal="d", scopes=["pay"]), 100.0)
    for remembered in (None, old):
        closed_v, ident = auth_stale("timeout", remembered, now=200.0, stale_for=60, fallback="closed", status=503,
                                     retry_after=2.0, judge=_judge())
        assert (closed_v.allow, closed_v.status, closed_v.code, ident) == (False, 503, "store_unavailable", None)
        assert closed_v.tag() == "auth;mode=stale;reason=timeout;fallback=closed"
        assert ("Retry-After", "2") in closed_v.headers
        open_v, ident = auth_stale("timeout", remembered, now=200.0, stale_for=60, fallback="open", status=503,
                                   retry_after=2.0, judge=_judge())
        assert (open_v.allow, open_v.basis, ident) == (True, "stale", None)
        assert open_v.tag() == "auth;mode=stale;reason=timeout;fallback=open"

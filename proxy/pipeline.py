"""The checks of one request, in their fixed order: auth first, then rate_limit; the first deny wins.

One store round trip carries both checks (the auth record, the epoch marker and the rate-limit script) unless
the rate limit is keyed by `principal`, which needs auth's answer first: that combination costs a second round
trip. A request denied by auth still counts against a `client_ip` / `header:` / `route` limit that went out in
the same round trip (it slows down credential guessing). When the store cannot answer, failmode.py decides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .checks.auth import AuthCheck, Identity, digest_of
from .checks.ratelimit import RateLimitCheck
from .decision import Verdict
from .failmode import auth_open, auth_stale, closed, rate_limit_open, rate_limit_stale
from .store import StoreUnavailable

if TYPE_CHECKING:
    from .app import Route, Runtime


@dataclass(slots=True)
class Decision:
    verdicts: list[Verdict] = field(default_factory=list)
    deny: Verdict | None = None
    identity: Identity | None = None


async def run_checks(rt: Runtime, route: Route, headers: Any, client: str) -> Decision:
    now = time.time()
    auth, rl = route.auth, route.rate_limit
    decision = Decision()
    ops: list[Any] = []
    auth_verdict: Verdict | None = None
    digest = None
    if auth is not None:
        credential = auth.credential(headers)
        if credential is None:
            auth_verdict = auth.unauthorized("missing credentials" if auth.scheme is None
                                             else f"missing credentials ({auth.cfg.scheme} <key> in {auth.header})")
        else:
            digest = digest_of(credential)
            cached = rt.keys.get(digest) if auth.cfg.cache_for > 0 else None
            if cached is not None and now - cached[1] < auth.cfg.cache_for:
                auth_verdict, decision.identity = auth.judge(cached[0], now)
                digest = None
            else:
                ops.extend(auth.ops(digest))
    rl_key = None
    if rl is not None and rl.key_kind != "principal":
        rl_key = rl.key(client, headers, None)
        ops.append(rl.op(rl_key))

    results: list[Any] | None = None
    failure: StoreUnavailable | None = None
    if ops:  # the round trip, inline (breaker included): no await level of its own on the hot path
        started = time.perf_counter()
        store = rt.store
        try:
            call = store.begin(ops)  # BreakerStore.execute, unrolled; a refusal by the breaker is not an outcome
        except StoreUnavailable as exc:
            failure = exc
        else:
            try:
                results = await call
            except StoreUnavailable as exc:
                failure = exc
                store.settle(None, exc)
            except BaseException:
                store.abandon()
                raise
            else:
                store.settle(results, None)
        rt.store_metrics.observe(failure.reason if failure is not None else "ok", time.perf_counter() - started)

    if auth is not None:
        if digest is not None:
            auth_verdict, decision.identity = _auth_answer(rt, auth, digest, results, failure, now)
        assert auth_verdict is not None
        _add(decision, route, auth_verdict)
    if rl is not None:
        if rl_key is not None:
            result = failure if failure is not None else results[-1]  # type: ignore[index]
        elif decision.deny is None:
            principal = decision.identity.principal if decision.identity is not None else None
            rl_key = rl.key(client, headers, principal)
            # A round trip of its own, with its own deadline (store.timeout bounds each round trip on the store's side).
            second, failure = await _round_trip(rt, [rl.op(rl_key)])
            result = failure if failure is not None else second[0]  # type: ignore[index]
        else:
            return decision  # denied by auth: a principal limit has nothing to count
        _add(decision, route, _rate_limit_answer(rt, route, rl, rl_key, result))
    return decision


def _add(decision: Decision, route: Route, verdict: Verdict) -> None:
    route.metrics.decided(verdict)
    decision.verdicts.append(verdict)
    if not verdict.allow and decision.deny is None:
        decision.deny = verdict


async def _round_trip(rt: Runtime, ops: list[Any]) -> tuple[list[Any] | None, StoreUnavailable | None]:
    started = time.perf_counter()
    try:
        results = await rt.store.execute(ops)
    except StoreUnavailable as exc:
        rt.store_metrics.observe(exc.reason, time.perf_counter() - started)
        return None, exc
    rt.store_metrics.observe("ok", time.perf_counter() - started)
    return results, None


def _auth_answer(rt: Runtime, auth: AuthCheck, digest: str, results: list[Any] | None,
                 failure: StoreUnavailable | None, now: float) -> tuple[Verdict, Identity | None]:
    if failure is None:
        assert results is not None
        try:
            return auth.from_store(digest, results[0], results[1], rt.keys, now)
        except StoreUnavailable as exc:
            failure = exc
    cfg = auth.cfg
    mode = cfg.on_store_error
    if mode == "open":
        return auth_open(failure.reason), None
    if mode == "closed":
        return closed("auth", failure.reason, status=cfg.status_on_error, retry_after=rt.retry_after), None
    assert cfg.stale_fallback is not None
    return auth_stale(failure.reason, rt.keys.get(digest), now=now, stale_for=cfg.stale_for,
                      fallback=cfg.stale_fallback, status=cfg.status_on_error, retry_after=rt.retry_after,
                      judge=auth.judge)


def _rate_limit_answer(rt: Runtime, route: Route, check: RateLimitCheck, key: str, result: Any) -> Verdict:
    mode = check.cfg.on_store_error
    if not isinstance(result, StoreUnavailable):
        if mode == "stale":
            rt.local.remember(key, result.state, time.time())
        return check.verdict(result)
    if mode == "open":
        return rate_limit_open(result.reason)
    if mode == "closed":
        return closed("rate_limit", result.reason, status=check.cfg.status_on_error, retry_after=rt.retry_after)
    outcome, age = rt.local.decide(key, check.algorithm, check.limit, check.window, check.burst, check.local_share,
                                   int(time.time() * 1_000_000))
    return rate_limit_stale(result.reason, outcome, route=route.name, policy=check.policy, limit=check.limit,
                            age=age)

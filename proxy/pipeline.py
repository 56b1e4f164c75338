"""The checks of one request: plan → one round trip → decide.

Auth first, then the rate limits; the first deny wins. The plan step (each check kind's `plan`, pure) turns the
route, the request's headers and what is remembered into the operations for the store; one await sends them all
(through the breaker: `BreakerStore.round_trip`); the decide step (each check kind's `decide`, pure) turns the
answers — or the failure, through the fail-mode table (failmode.py) — into verdicts, in check order.

Limits that need auth's answer first — keyed by `principal`, or with `plans` — go in a second round trip of their
own (skipped when auth denied), unless auth was answered without the store (`cache_for`). Every other limit rides
in the first one, so a request denied by auth still counts against a `client_ip`, `header:` or `route` limit (it
slows down credential guessing).
"""

from __future__ import annotations

from time import time
from typing import TYPE_CHECKING, Any

from .decision import Decision

if TYPE_CHECKING:
    from .checks.ratelimit import LimitGroup, Planned
    from .compiled import Route, Runtime


async def run_checks(rt: Runtime, route: Route, headers: Any, client: str,
                     request: tuple[str, str, str | None, str] = ("GET", "/", None, "")) -> Decision:
    """`request`: (method, normalized path and query, host, request id) — what an authorizer is told."""
    now = time()
    auth = route.auth
    decision = Decision()

    # --- plan ---
    ops: list[Any] = []
    auth_verdict = lookup = authz = None
    if auth is not None and auth.remote:  # an authorizer of its own: its call starts now, the store's in parallel
        method, uri, host, rid = request
        auth_verdict, authz = auth.begin(headers, method, uri, host, client, rid, now)  # type: ignore[union-attr]
    elif auth is not None:
        auth_verdict, lookup = auth.plan(headers, rt.keys, now)  # type: ignore[union-attr]
        if lookup is not None:  # (only api_key plans a store call)
            ops.append(lookup.op)
    known = auth is None or auth_verdict is not None  # auth's answer (or that there is none) is already known
    identity = auth_verdict.identity if auth_verdict is not None else None
    first: list[tuple[LimitGroup, Planned | None, int]] = []
    later: list[LimitGroup] = []
    for group in route.limits:
        if group.needs_auth and not known:
            later.append(group)
            continue
        planned = _plan(group, headers, client, identity)
        first.append((group, planned, len(ops)))
        if planned is not None:
            ops.append(planned.op)

    # --- one round trip ---
    results: list[Any] | None = None
    failure = None
    if ops:
        results, failure = await rt.store.round_trip(ops)

    # --- decide ---
    if authz is not None:
        auth_verdict = await authz
    if auth is not None:
        if auth_verdict is None:
            assert lookup is not None
            auth_verdict = auth.decide(lookup, failure or results, rt.keys, now)  # type: ignore[arg-type,union-attr]
        decision.add(route.metrics, auth_verdict)
    for group, planned, at in first:
        if planned is not None:
            for verdict in group.decide(planned, failure or results[at], rt.local, now):  # type: ignore[index]
                decision.add(route.metrics, verdict)
    if not later or decision.deny is not None:
        return decision  # (denied by auth: a principal limit has nothing to count)

    # --- the limits that needed auth's answer: a second round trip ---
    second = [(group, _plan(group, headers, client, decision.identity)) for group in later]
    ops = [planned.op for _, planned in second if planned is not None]
    if ops:
        results, failure = await rt.store.round_trip(ops)
    at = 0
    for group, planned in second:
        if planned is not None:
            for verdict in group.decide(planned, failure or results[at], rt.local, now):  # type: ignore[index]
                decision.add(route.metrics, verdict)
            at += 1
    return decision


def _plan(group: LimitGroup, headers: Any, client: str, identity: Any) -> Planned | None:
    if identity is None:
        return group.plan_request(client, headers, None, None)
    return group.plan_request(client, headers, identity.principal, identity.plan)

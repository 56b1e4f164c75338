"""The checks of one request: plan → one round trip → decide.

Auth first, then rate_limit; the first deny wins. The plan step (each check kind's `plan`, pure) turns the route,
the request's headers and what is remembered into the operations for the store; one await sends them all
(through the breaker: `BreakerStore.round_trip`); the decide step (each check kind's `decide`, pure) turns the
answers — or the failure, through the fail-mode table (failmode.py) — into verdicts, in check order.

A rate limit keyed by `principal` needs auth's answer first: it goes in a second round trip of its own (skipped
when auth denied). Every other limit rides in the first one, so a request denied by auth still counts against a
`client_ip`, `header:` or `route` limit (it slows down credential guessing).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .decision import Decision

if TYPE_CHECKING:
    from .compiled import Route, Runtime


async def run_checks(rt: Runtime, route: Route, headers: Any, client: str) -> Decision:
    now = time.time()
    auth, limit = route.auth, route.rate_limit
    decision = Decision()

    # --- plan ---
    ops: list[Any] = []
    auth_verdict = digest = None
    if auth is not None:
        auth_verdict, digest = auth.plan(headers, rt.keys, now)
        if digest is not None:
            ops += auth.ops(digest)
    key = None
    if limit is not None and limit.key_kind != "principal":
        key = limit.key(client, headers, None)
        ops.append(limit.op(key))

    # --- one round trip ---
    results: list[Any] | None = None
    failure = None
    if ops:
        results, failure = await rt.store.round_trip(ops)

    # --- decide ---
    if auth is not None:
        if auth_verdict is None:
            assert digest is not None
            auth_verdict = auth.decide(digest, failure or results, rt.keys, now)  # type: ignore[arg-type]
        decision.add(route.metrics, auth_verdict)
    if limit is None:
        return decision
    if key is not None:
        answer = failure or results[-1]  # type: ignore[index]
    elif decision.deny is None:  # a principal limit: a second round trip, with auth's answer
        principal = decision.identity.principal if decision.identity is not None else None
        key = limit.key(client, headers, principal)
        second, failure = await rt.store.round_trip([limit.op(key)])
        answer = failure or second[0]  # type: ignore[index]
    else:
        return decision  # denied by auth: a principal limit has nothing to count
    decision.add(route.metrics, limit.decide(key, answer, rt.local, now))
    return decision

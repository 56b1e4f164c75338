"""The fail-mode table, every row, through the real check pipeline without a socket: check kind x on_store_error x
outcome (answered, each failure reason, breaker open) x remembered state. The store is a stand-in that answers or
fails on demand; the breaker, the checks, the memories and the verdicts are the real ones."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.checks.memo import Record
from proxy.compiled import Runtime
from proxy.config import load_text
from proxy.failmode import TABLE, readme_table
from proxy.keyspace import digest_of
from proxy.pipeline import run_checks
from proxy.store.breaker import OPEN, Breaker, BreakerStore
from proxy.store.errors import StoreUnavailable
from proxy.store.ops import RateResult

ROOT = Path(__file__).resolve().parent.parent.parent
FAILURES = ("timeout", "unavailable", "error", "breaker_open")


class Store:
    """Answers each call with `answer(ops)`, or fails with `failure`."""

    def __init__(self) -> None:
        self.failure: StoreUnavailable | None = None
        self.records: dict[str, bytes] = {}
        self.calls = 0

    def execute(self, ops: list[Any]) -> asyncio.Future[list[Any]]:
        self.calls += 1
        future = asyncio.get_running_loop().create_future()
        if self.failure is not None:
            future.set_exception(self.failure)
            return future
        out: list[Any] = []
        for op in ops:
            if type(op).__name__ == "GetOp":  # a record and the epoch marker, read together
                out.append([self.records.get(op.key), *[b"1" for _ in op.more]])
            else:
                window = int(time.time() * 1_000_000) // 60_000_000  # fixed_window state: (window, count)
                out.append(RateResult(True, 9, 60.0, 0.0, (window, 1)))
        future.set_result(out)
        return future

    async def close(self) -> None:
        pass


def runtime(kind: str, mode: str, fallback: str = "closed") -> tuple[Runtime, Store, Breaker]:
    if kind == "auth":
        extra = f"stale_for: 1m, stale_fallback: {fallback}, " if mode == "stale" else ""
        check = f"auth: {{type: api_key, {extra}scopes: [pay], on_store_error: {mode}}}"
    else:
        check = f"rate_limit: {{limit: 10, per: 1m, algorithm: fixed_window, key: route, on_store_error: {mode}}}"
    loaded = load_text(f"""version: 1
upstreams: {{api: {{url: "http://127.0.0.1:9"}}}}
routes:
  - {{name: r, match: {{path: /}}, upstream: api, {check}}}
""", "t.yaml")
    store, breaker = Store(), Breaker(1000, 5.0)
    return Runtime(loaded, BreakerStore(store, breaker)), store, breaker


async def decide(rt: Runtime, key: str = "k") -> Any:
    route = rt.router.match("GET", None, "/")
    return await run_checks(rt, route, CIMultiDict({"Authorization": key}), "10.0.0.1")  # type: ignore[arg-type]


def failing(store: Store, breaker: Breaker, reason: str) -> None:
    if reason == "breaker_open":
        breaker.failure()
        breaker.threshold = 1
        breaker.failure()
        assert breaker.state == OPEN
    else:
        store.failure = StoreUnavailable(reason)  # type: ignore[arg-type]


@pytest.mark.parametrize("reason", FAILURES)
@pytest.mark.parametrize("kind", ["auth", "rate_limit"])
async def test_open_allows_untagged_by_anything_but_its_reason(kind: str, reason: str) -> None:
    rt, store, breaker = runtime(kind, "open")
    failing(store, breaker, reason)
    d = await decide(rt)
    (v,) = d.verdicts
    assert (v.allow, v.basis, v.reason, list(v.headers), d.identity) == (True, "open", reason, [], None)
    assert v.tag() == f"{kind};mode=open;reason={reason}"
    assert store.calls == (0 if reason == "breaker_open" else 1)  # an open breaker does not ask


@pytest.mark.parametrize("reason", FAILURES)
@pytest.mark.parametrize("kind", ["auth", "rate_limit"])
async def test_closed_denies_with_status_and_retry_after(kind: str, reason: str) -> None:
    rt, store, breaker = runtime(kind, "closed")
    failing(store, breaker, reason)
    d = await decide(rt)
    (v,) = d.verdicts
    assert (v.allow, v.basis, v.reason, v.status, v.code) == (False, "closed", reason, 503, "store_unavailable")
    assert v.headers == [("Retry-After", "2")] and d.deny is v
    assert v.tag() == f"{kind};mode=closed;reason={reason}"


@pytest.mark.parametrize("reason", FAILURES)
async def test_rate_limit_stale_enforces_locally_from_the_last_state(reason: str) -> None:
    rt, store, breaker = runtime("rate_limit", "stale")
    (v,) = (await decide(rt)).verdicts  # answered: remembered as the last state (1 of 10 used)
    assert (v.basis, v.quota.policy, v.quota.q, v.quota.r) == ("checked", "r", 10, 9)  # type: ignore[union-attr]
    failing(store, breaker, reason)
    allowed = []
    for _ in range(12):
        (v,) = (await decide(rt)).verdicts
        assert (v.basis, v.reason) == ("stale", reason) and v.age is not None
        allowed.append(v.allow)
    assert allowed == [True] * 9 + [False] * 3  # continued from the store's count, not from zero
    assert (v.status, v.code) == (429, "rate_limited")
    assert 0 < v.quota.retry_after <= 60 and v.quota.r == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("reason", FAILURES)
async def test_rate_limit_stale_with_nothing_remembered_starts_from_an_empty_bucket(reason: str) -> None:
    rt, store, breaker = runtime("rate_limit", "stale")
    failing(store, breaker, reason)
    verdicts = [(await decide(rt)).verdicts[0] for _ in range(11)]
    assert [v.allow for v in verdicts] == [True] * 10 + [False]
    assert all(v.basis == "stale" and v.age is None for v in verdicts)


def remember(store: Store, key: str, record: Record) -> None:
    import msgspec

    store.records[f"failgate:apikey:{digest_of(key)}"] = msgspec.json.encode(record)


@pytest.mark.parametrize("reason", FAILURES)
@pytest.mark.parametrize(("record", "expected"), [
    (Record(principal="ann", scopes=["pay"]), (True, 200)),
    (Record(principal="bob", scopes=["other"]), (False, 403)),
    (Record(principal="cat", scopes=["pay"], expires_at=1.0), (False, 401)),
])
async def test_auth_stale_applies_the_route_rules_to_the_remembered_record(reason: str, record: Record,
                                                                          expected: tuple[bool, int]) -> None:
    rt, store, breaker = runtime("auth", "stale")
    remember(store, "k", record)
    first = (await decide(rt)).verdicts[0]
    assert first.basis == "checked"
    failing(store, breaker, reason)
    d = await decide(rt)
    (v,) = d.verdicts
    assert (v.allow, v.status if not v.allow else 200, v.basis, v.reason) == (*expected, "stale", reason)
    assert v.age is not None and v.tag().startswith(f"auth;mode=stale;reason={reason};age=")
    assert (d.identity is not None) == v.allow


@pytest.mark.parametrize("reason", FAILURES)
async def test_auth_stale_keeps_a_revoked_key_refused(reason: str) -> None:
    rt, store, breaker = runtime("auth", "stale")
    remember(store, "k", Record(principal="ann", scopes=["pay"]))
    assert (await decide(rt)).verdicts[0].allow
    store.records.clear()  # revoked: the store now has no record for it
    assert (await decide(rt)).verdicts[0].status == 401
    failing(store, breaker, reason)
    (v,) = (await decide(rt)).verdicts
    assert (v.allow, v.status, v.basis) == (False, 401, "stale")


@pytest.mark.parametrize("reason", FAILURES)
@pytest.mark.parametrize("fallback", ["open", "closed"])
async def test_auth_stale_with_nothing_remembered_applies_the_fallback(reason: str, fallback: str) -> None:
    rt, store, breaker = runtime("auth", "stale", fallback)
    failing(store, breaker, reason)
    (v,) = (await decide(rt, "never-seen")).verdicts
    assert (v.allow, v.basis, v.fallback) == (fallback == "open", "stale", fallback)
    assert v.tag() == f"auth;mode=stale;reason={reason};fallback={fallback}"
    if fallback == "closed":
        assert (v.status, list(v.headers)) == (503, [("Retry-After", "2")])


def test_every_row_of_the_table_is_tested_and_printed_in_the_readme() -> None:
    kinds = ("auth", "http", "jwt", "rate_limit")
    assert set(TABLE) == {(kind, mode) for kind in kinds for mode in ("open", "closed", "stale")}
    readme = (ROOT / "README.md").read_text()
    assert readme_table() in readme, "README.md must print proxy/failmode.py's table (readme_table())"
    assert re.search(r"\| auth \| `stale` \|", readme)


@pytest.mark.parametrize("mode", ["open", "closed"])
@pytest.mark.parametrize("kind", ["auth", "rate_limit"])
async def test_a_verdict_without_memory_is_made_once_per_reason_and_each_reason_keeps_its_own(kind: str,
                                                                                            mode: str) -> None:
    rt, store, _ = runtime(kind, mode)
    store.failure = StoreUnavailable("timeout")
    first, again = (await decide(rt)).verdicts[0], (await decide(rt)).verdicts[0]
    assert first is again  # handed out again, not made again (a verdict is never changed once made)
    store.failure = StoreUnavailable("unavailable")
    other = (await decide(rt)).verdicts[0]
    assert other is not first and (first.reason, other.reason) == ("timeout", "unavailable")
    assert other.tag() == f"{kind};mode={mode};reason=unavailable"


async def test_a_stale_fallback_is_made_once_per_reason_and_a_remembered_record_still_decides() -> None:
    rt, store, _ = runtime("auth", "stale", "closed")
    remember(store, "known", Record(principal="ann", scopes=["pay"]))
    assert (await decide(rt, "known")).verdicts[0].basis == "checked"
    store.failure = StoreUnavailable("timeout")
    a, b = (await decide(rt, "stranger")).verdicts[0], (await decide(rt, "other")).verdicts[0]
    assert a is b and (a.allow, a.fallback, a.reason) == (False, "closed", "timeout")
    known = (await decide(rt, "known")).verdicts[0]
    assert (known.allow, known.basis, known.fallback) == (True, "stale", None)
    store.failure = StoreUnavailable("error")
    assert (await decide(rt, "stranger")).verdicts[0].tag() == "auth;mode=stale;reason=error;fallback=closed"

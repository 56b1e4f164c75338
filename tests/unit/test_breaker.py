"""The breaker's states with an injected clock; the decision log's burst summary."""

from __future__ import annotations

import io
import json
import time

from proxy.observe.decisionlog import DecisionLog, LogWriter
from proxy.store.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_opens_after_consecutive_failures_then_one_probe_then_closes() -> None:
    clock = Clock()
    changes: list[int] = []
    b = Breaker(3, 2.0, clock=clock, on_change=changes.append)
    for _ in range(2):
        assert b.allow()
        b.failure()
    b.allow()
    b.success()  # a success resets the count
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == OPEN and not b.allow()
    clock.t += 1.99
    assert not b.allow()
    clock.t += 0.01
    assert b.allow() and b.state == HALF_OPEN  # the probe
    assert not b.allow()  # only one
    b.success()
    assert b.state == CLOSED and b.allow()
    assert changes == [OPEN, HALF_OPEN, CLOSED]


def test_a_failed_probe_opens_it_again_for_another_period() -> None:
    clock = Clock()
    b = Breaker(1, 5.0, clock=clock)
    b.allow()
    b.failure()
    clock.t += 5
    assert b.allow()
    b.failure()
    assert b.state == OPEN and not b.allow()
    clock.t += 4.9
    assert not b.allow()
    clock.t += 0.1
    assert b.allow()


def _next_second() -> int:
    """Wait for the beginning of the next second (the log's budgets count per second) and return it."""
    second = int(time.time()) + 1
    while int(time.time()) < second:
        time.sleep(0.005)
    return second


def test_decision_log_summarizes_bursts_per_route_per_second() -> None:
    out = io.StringIO()
    writer = LogWriter(out)
    log = DecisionLog(writer, "abc", per_route_per_second=5)
    _next_second()
    for i in range(20):
        log.record(request_id=f"r{i}", route="a", check="auth", decision="deny", basis="checked", reason=None,
                   status=401, client="10.0.0.1", principal=None)
    log.record(request_id="b", route="b", check="rate_limit", decision="allow", basis="open", reason="timeout",
               status=200, client="10.0.0.2", principal="p")
    log.flush()  # the second is not over: nothing summarized yet
    time.sleep(1.05)
    log.flush()
    writer.close()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    a = [x for x in lines if x["route"] == "a"]
    assert len([x for x in a if "request_id" in x]) == 5
    assert [(x["suppressed"], x["kind"], x["check"], x["basis"]) for x in a if "suppressed" in x] == [
        (15, "deny", "auth", "checked")]
    b = next(x for x in lines if x["route"] == "b")
    assert {k: b[k] for k in ("check", "decision", "basis", "reason", "status", "client", "principal",
                              "config_sha256")} == {
        "check": "rate_limit", "decision": "allow", "basis": "open", "reason": "timeout", "status": 200,
        "client": "10.0.0.2", "principal": "p", "config_sha256": "abc"}


def test_denies_cannot_hide_degraded_verdicts_and_a_final_flush_accounts_for_everything() -> None:
    out = io.StringIO()
    writer = LogWriter(out, max_queue=30)  # small: some lines do not fit the queue and must be counted
    log = DecisionLog(writer, "abc", per_route_per_second=10)
    for i in range(200):  # one route: every request denied by the limit and its auth decided open
        log.record(request_id=f"r{i}", route="a", check="rate_limit", decision="deny", basis="checked",
                   reason=None, status=429, client="c", principal=None)
        log.record(request_id=f"r{i}", route="a", check="auth", decision="allow", basis="open", reason="timeout",
                   status=429, client="c", principal=None)
    log.flush(final=True)  # the current second too
    writer.close()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    totals: dict[tuple[str, str], int] = {}
    for x in lines:
        key = (x["check"], x["basis"])
        totals[key] = totals.get(key, 0) + x.get("suppressed", 1)
    assert totals == {("rate_limit", "checked"): 200, ("auth", "open"): 200}
    assert any(x["check"] == "auth" and "request_id" in x for x in lines)  # degraded verdicts got lines of their own


def test_a_route_budget_starts_again_each_second_and_the_seconds_over_are_summarized_apart() -> None:
    out = io.StringIO()
    writer = LogWriter(out)
    log = DecisionLog(writer, "abc", per_route_per_second=2)
    first = _next_second()

    def degraded(n: int) -> None:
        for _ in range(n):
            log.record(request_id="r", route="a", check="auth", decision="allow", basis="open", reason="timeout",
                       status=200, client="c", principal=None)

    degraded(5)  # 2 lines, 3 counted
    while int(time.time()) == first:
        time.sleep(0.005)
    degraded(4)  # a new second: 2 lines again, 2 counted — before any flush
    log.flush(final=True)
    writer.close()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len([x for x in lines if "request_id" in x]) == 4
    assert sorted((x["second"] - first, x["suppressed"]) for x in lines if "suppressed" in x) == [(0, 3), (1, 2)]


class Silent:
    """A store that never answers (what a hung Redis looks like to one request), and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def execute(self, ops: object) -> list[object]:
        import asyncio

        self.calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_probe_whose_request_is_cancelled_does_not_keep_the_breaker_shut() -> None:
    """Through the check pipeline: the client of the half-open probe goes away; the next request is a probe again
    (not refused forever as `breaker_open`)."""
    import asyncio

    from multidict import CIMultiDict

    from proxy.compiled import Runtime
    from proxy.config import load_text
    from proxy.pipeline import run_checks
    from proxy.store.breaker import BreakerStore

    loaded = load_text("""version: 1
upstreams: {api: {url: "http://127.0.0.1:9"}}
routes:
  - {name: rl, match: {path: /}, upstream: api, rate_limit: {limit: 5, per: 1m, key: route, on_store_error: closed}}
""", "t.yaml")
    clock = Clock()
    breaker = Breaker(1, 5.0, clock=clock)
    breaker.failure()
    assert breaker.state == OPEN
    silent = Silent()
    rt = Runtime(loaded, BreakerStore(silent, breaker))
    route = rt.router.match("GET", None, "/")
    headers = CIMultiDict({"Host": "x"})
    refused = await run_checks(rt, route, headers, "10.0.0.1")
    assert refused.deny is not None and refused.deny.basis == "closed" and silent.calls == 0  # open: not asked
    clock.t += 5.0
    probe = asyncio.ensure_future(run_checks(rt, route, headers, "10.0.0.1"))
    await asyncio.sleep(0)
    assert silent.calls == 1 and breaker.state == HALF_OPEN
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)
    second = asyncio.ensure_future(run_checks(rt, route, headers, "10.0.0.1"))
    await asyncio.sleep(0)
    assert silent.calls == 2  # the next request went out as the probe
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)

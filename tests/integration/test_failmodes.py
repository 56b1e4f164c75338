"""Chaos tests: real redis-server killed, paused, slowed and restarted under the real proxy; every
route does what its YAML says, the breaker opens and recovers, and every degraded decision is tagged, counted
and logged."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import aiohttp

from benchmarks.faultproxy import FaultProxy
from proxy.observe.metrics import REGISTRY
from tests.helpers import InProcessProxy, ProxyProcess, Upstream, config_text, raw_request, until
from tests.redis_server import RedisServer

TIMEOUT_MS = 150


def store(url: str, failures: int = 3, open_for: str = "1s") -> str:
    return (f"store: {{url: '{url}', timeout: {TIMEOUT_MS}ms, connect_timeout: {TIMEOUT_MS}ms, "
            f"breaker: {{failures: {failures}, open_for: {open_for}}}}}\n")


def route(name: str, body: str) -> str:
    return f"- name: {name}\n  match: {{path: /{name}, prefix: true}}\n  upstream: api\n{body}"


ROUTES = (
    route("guard", "  rate_limit: {limit: 1000, per: 1m, key: route, on_store_error: open}\n")
    + route("gate", "  rate_limit: {limit: 1000, per: 1m, key: route, on_store_error: closed}\n")
    + route("exact", "  rate_limit: {limit: 5, per: 1m, algorithm: fixed_window, key: route, on_store_error: open}\n")
)


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def timed(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = await raw_request(port, path, headers=headers)
    return time.perf_counter() - t0, r


async def test_paused_store_breaker_opens_then_recovers_with_exact_counts(upstream: Upstream,
                                                                        redis_server: RedisServer) -> None:
    log = io.StringIO()
    async with InProcessProxy(config_text(upstream.url, ROUTES, extra=store(redis_server.url)), log_stream=log) as p:
        assert (await raw_request(p.port, "/guard")).status == 200
        open_before = sample("failgate_decisions_total", {"route": "guard", "check": "rate_limit",
                                                          "decision": "allow", "basis": "open"})
        breaker_before = sample("failgate_store_operations_total", {"result": "breaker_open"})
        redis_server.pause()
        reasons, slow = [], 0
        for _ in range(12):
            took, r = await timed(p.port, "/guard")
            assert r.status == 200  # type: ignore[attr-defined]
            tag = r.headers["failgate-degraded"]  # type: ignore[attr-defined]
            reasons.append(tag.split("reason=")[1])
            slow += took > 1.0  # generous: store.timeout is 150 ms
        assert reasons[:3] == ["timeout"] * 3 and reasons[3:] == ["breaker_open"] * 9
        assert slow == 0
        assert sample("failgate_breaker_state", {"dependency": "store"}) == 2
        # while open, nobody waits: a burst of concurrent requests is answered at once, gates closed
        started = time.perf_counter()
        rs = await asyncio.gather(*(raw_request(p.port, "/gate") for _ in range(50)))
        assert time.perf_counter() - started < 2.0
        assert {r.status for r in rs} == {503}
        assert all(r.headers["failgate-degraded"] == "rate_limit;mode=closed;reason=breaker_open" for r in rs)
        assert all(r.headers["retry-after"] == "1" for r in rs)
        assert sample("failgate_decisions_total", {"route": "guard", "check": "rate_limit", "decision": "allow",
                                                   "basis": "open"}) - open_before == 12
        assert sample("failgate_store_operations_total", {"result": "breaker_open"}) - breaker_before >= 59
        redis_server.resume()

        still_open = []

        async def probed() -> bool:  # once open_for has passed, a request is the probe; it closes the breaker
            r = await raw_request(p.port, "/guard")
            if "failgate-degraded" in r.headers:
                still_open.append(r.headers["failgate-degraded"])
            return r.status == 200 and "failgate-degraded" not in r.headers

        await until("the probe closes the breaker", probed)
        assert set(still_open) <= {"rate_limit;mode=open;reason=breaker_open"}
        assert sample("failgate_breaker_state", {"dependency": "store"}) == 0
        statuses = [(await raw_request(p.port, "/exact")).status for _ in range(6)]
        assert statuses == [200, 200, 200, 200, 200, 429]  # exact counting again: 5 in all

    def logged() -> list[dict]:  # type: ignore[type-arg]
        return [json.loads(x) for x in log.getvalue().splitlines()]

    await until("the decision log is written", lambda: sum(x.get("route") == "guard" for x in logged())
                == 12 + len(still_open))
    lines = logged()
    changes = [x["breaker"] for x in lines if x.get("event") == "dependency" and x.get("dependency") == "store"]
    assert changes == ["open", "half-open", "closed"]  # one structured line per state change
    degraded = [x for x in lines if x.get("route") == "guard"]
    assert len(degraded) == 12 + len(still_open)  # the outage's 12, and the answers before the probe closed it
    assert {(x["check"], x["decision"], x["basis"], x["status"]) for x in degraded} == {
        ("rate_limit", "allow", "open", 200)}
    assert {x["reason"] for x in degraded} == {"timeout", "breaker_open"}
    assert all(x["client"] == "127.0.0.1" and x["config_sha256"] == p.loaded.sha256 for x in degraded)
    denied = [x for x in lines if x.get("route") == "exact"]
    assert [(x["decision"], x["basis"], x["status"]) for x in denied] == [("deny", "checked", 429)]


async def test_killed_store(upstream: Upstream, redis_server: RedisServer) -> None:
    async with InProcessProxy(config_text(upstream.url, ROUTES, extra=store(redis_server.url))) as p:
        assert (await raw_request(p.port, "/gate")).status == 200
        redis_server.kill()
        r = await raw_request(p.port, "/gate")
        assert (r.status, r.json()["error"]) == (503, "store_unavailable")
        assert r.headers["failgate-degraded"] == "rate_limit;mode=closed;reason=unavailable"
        r = await raw_request(p.port, "/guard")
        assert r.status == 200
        assert upstream.seen[-1]["headers"].count(("Failgate-Degraded", "rate_limit;mode=open;reason=unavailable")) == 1
        redis_server.start()  # same port, empty
        for _ in range(40):
            r = await raw_request(p.port, "/guard")
            if "failgate-degraded" not in r.headers:
                break
            await asyncio.sleep(0.1)
        assert "failgate-degraded" not in r.headers


async def test_store_slower_than_its_timeout(upstream: Upstream, redis_server: RedisServer,
                                             fault_proxy: FaultProxy) -> None:
    async with InProcessProxy(config_text(upstream.url, ROUTES, extra=store(fault_proxy.url, failures=100))) as p:
        assert (await raw_request(p.port, "/gate")).status == 200
        fault_proxy.set("delay", 0.4)
        rs = [await timed(p.port, "/gate") for _ in range(4)]
        assert all(r.status == 503 for _, r in rs)  # type: ignore[attr-defined]
        # The first waited on a connection that was up: a timeout. It was then discarded (silent for the whole
        # timeout), and the next requests wait for a new one, whose handshake goes through the same slow path: each
        # is a timeout of its own, or fails with that connection attempt (unavailable: it could not be connected in
        # time), whichever comes first — both are the store being too slow, and both the closed mode's 503.
        reasons = [r.headers["failgate-degraded"] for _, r in rs]  # type: ignore[attr-defined]
        assert reasons[0] == "rate_limit;mode=closed;reason=timeout"
        assert set(reasons) <= {"rate_limit;mode=closed;reason=timeout", "rate_limit;mode=closed;reason=unavailable"}
        assert sum(took > 1.0 for took, _ in rs) == 0
        fault_proxy.set("pass")
        for _ in range(40):
            r = await raw_request(p.port, "/gate")
            if r.status == 200:
                break
            await asyncio.sleep(0.1)
        assert r.status == 200 and "failgate-degraded" not in r.headers


async def test_malformed_input_cannot_open_the_breaker(upstream: Upstream, redis_server: RedisServer) -> None:
    import hashlib

    redis_server.command("SET", "failgate:epoch", "1")
    bad = "attacker-planted"
    redis_server.command("SET", f"failgate:apikey:{hashlib.sha256(bad.encode()).hexdigest()}", "[1,2")
    routes = ROUTES + route("login", "  auth: {type: api_key, on_store_error: closed}\n")
    async with InProcessProxy(config_text(upstream.url, routes, extra=store(redis_server.url, failures=2))) as p:
        rs = await asyncio.gather(*(raw_request(p.port, "/login", headers={"Authorization": bad})
                                    for _ in range(100)))
        assert {r.status for r in rs} == {503}
        assert {r.headers["failgate-degraded"] for r in rs} == {"auth;mode=closed;reason=error"}
        # unknown random keys are plain 401s, and none of it touched the breaker
        rs = await asyncio.gather(*(raw_request(p.port, "/login", headers={"Authorization": f"k{i}"})
                                    for i in range(100)))
        assert {r.status for r in rs} == {401}
        assert sample("failgate_breaker_state", {"dependency": "store"}) == 0
        r = await raw_request(p.port, "/guard")
        assert r.status == 200 and "failgate-degraded" not in r.headers


async def test_degraded_header_lists_each_check_in_order(upstream: Upstream, redis_server: RedisServer) -> None:
    routes = route("both", "  auth: {type: api_key, on_store_error: open}\n"
                           "  rate_limit: {limit: 10, per: 1m, on_store_error: open}\n")
    async with InProcessProxy(config_text(upstream.url, routes, extra=store(redis_server.url))) as p:
        redis_server.kill()
        r = await raw_request(p.port, "/both", headers={"Authorization": "k"})
        assert r.status == 200
        tag = "auth;mode=open;reason=unavailable, rate_limit;mode=open;reason=unavailable"
        assert r.headers["failgate-degraded"] == tag
        assert upstream.seen[-1]["headers"].count(("Failgate-Degraded", tag)) == 1
        assert "ratelimit" not in r.headers


async def test_game_day_switch_reaches_every_worker(upstream: Upstream, redis_server: RedisServer,
                                                    tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    text = config_text(upstream.url, ROUTES, extra=store(redis_server.url) + "workers: 2\n")
    cfg.write_text(text.replace("admin: {host: 127.0.0.1, port: ",
                                "admin: {chaos: true, token: t0ken, host: 127.0.0.1, port: "))
    p = ProxyProcess(cfg).start()
    auth = {"Authorization": "Bearer t0ken"}
    try:
        await p.wait_ready(workers=2)
        async with aiohttp.ClientSession() as s:
            async with s.post(p.admin + "/chaos/store", json={"fault": "refuse", "for": "30s"}) as r:
                assert r.status == 401
            async with s.post(p.admin + "/chaos/store", json={"fault": "melt"}, headers=auth) as r:
                assert r.status == 400 and "hang, refuse or slow" in (await r.json())["detail"]
            async with s.post(p.admin + "/chaos/store", json={"fault": "refuse", "for": "11m"}, headers=auth) as r:
                assert r.status == 400 and "at most 10m" in (await r.json())["detail"]
            async with s.post(p.admin + "/chaos/store", json={"fault": "refuse", "for": "30s"}, headers=auth) as r:
                assert r.status == 200
            await asyncio.sleep(0.3)
            tags = set()
            for _ in range(40):  # fresh connections land on both workers
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as c, \
                        c.get(p.url + "/guard") as r:
                    assert r.status == 200
                    tags.add(r.headers.get("Failgate-Degraded"))
            assert tags == {"rate_limit;mode=open;reason=unavailable"} or tags == {
                "rate_limit;mode=open;reason=unavailable", "rate_limit;mode=open;reason=breaker_open"}
            async with s.get(p.admin + "/readyz") as r:
                body = await r.json()
                assert r.status == 200 and body["chaos"] == "refuse"  # a down store does not make it unready
            async with s.delete(p.admin + "/chaos/store", headers=auth) as r:
                assert r.status == 200
            await asyncio.sleep(1.5)  # past open_for: the probe closes each breaker
            for _ in range(20):
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as c, \
                        c.get(p.url + "/guard") as r:
                    tags.add(r.headers.get("Failgate-Degraded"))
                    last = r.headers.get("Failgate-Degraded")
            assert last is None
    finally:
        assert p.stop() == 0


async def test_a_worker_restarted_during_a_rehearsal_joins_it(upstream: Upstream, redis_server: RedisServer,
                                                              tmp_path: Path) -> None:
    import os
    import signal as sig

    from tests.integration.test_workers import children

    cfg = tmp_path / "f.yaml"
    text = config_text(upstream.url, ROUTES, extra=store(redis_server.url, failures=1000) + "workers: 2\n")
    cfg.write_text(text.replace("admin: {host: 127.0.0.1, port: ", "admin: {chaos: true, host: 127.0.0.1, port: "))
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready(workers=2)
        async with aiohttp.ClientSession() as s, s.post(p.admin + "/chaos/store",
                                                        json={"fault": "refuse", "for": "60s"}) as r:
            assert r.status == 200
        assert p.proc is not None
        victim = sorted(children(p.proc.pid))[0]
        os.kill(victim, sig.SIGKILL)
        for _ in range(100):
            await asyncio.sleep(0.1)
            kids = children(p.proc.pid)
            if victim not in kids and len(kids) == 2:
                break
        await p.wait_ready(workers=2)
        tags = set()
        for _ in range(30):  # both workers, the new one included, refuse the store
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as c, \
                    c.get(p.url + "/guard") as r:
                tags.add(r.headers.get("Failgate-Degraded"))
        assert tags == {"rate_limit;mode=open;reason=unavailable"}
    finally:
        assert p.stop() == 0


async def test_a_renamed_degraded_header_is_the_only_tag_both_ways(upstream: Upstream,
                                                                   redis_server: RedisServer) -> None:
    """`headers.degraded` renames the tag: the response and the upstream get the new name; client copies of it, and
    of the default name, are stripped; the default name is not sent at all."""
    extra = store(redis_server.url) + "headers: {degraded: X-Acme-Unchecked}\n"
    async with InProcessProxy(config_text(upstream.url, ROUTES, extra=extra)) as p:
        forged = {"X-Acme-Unchecked": "forged", "Failgate-Degraded": "forged-default"}
        r = await raw_request(p.port, "/guard", headers=forged)
        assert r.status == 200 and "x-acme-unchecked" not in r.headers
        names = [k.lower() for k, _ in upstream.seen[-1]["headers"]]
        # healthy store: nothing to tag, and both forged copies are gone
        assert "x-acme-unchecked" not in names and "failgate-degraded" not in names
        redis_server.kill()
        r = await raw_request(p.port, "/guard", headers=forged)
        assert r.status == 200
        assert r.headers["x-acme-unchecked"] == "rate_limit;mode=open;reason=unavailable"
        assert "failgate-degraded" not in r.headers
        sent = upstream.seen[-1]["headers"]
        assert [v for k, v in sent if k.lower() == "x-acme-unchecked"] == ["rate_limit;mode=open;reason=unavailable"]
        assert "failgate-degraded" not in [k.lower() for k, _ in sent]

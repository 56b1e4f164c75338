"""Rate limiting through the real proxy, on a real redis-server and on memory://."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from proxy.observe.metrics import REGISTRY
from tests.helpers import InProcessProxy, ProxyProcess, Upstream, config_text, raw_request
from tests.redis_server import RedisServer


def store_block(url: str) -> str:
    # Store timeouts well above a loaded CI machine's hiccups: these tests are not about timeouts.
    return f"store: {{url: '{url}', timeout: 500ms, connect_timeout: 1s}}\n"


def route(name: str, rate_limit: str, path: str | None = None) -> str:
    return (f"- name: {name}\n  match: {{path: {path or '/' + name}, prefix: true}}\n  upstream: api\n"
            f"  rate_limit: {rate_limit}\n")


def decisions(route: str, decision: str, basis: str) -> float:
    return REGISTRY.get_sample_value("failgate_decisions_total", {
        "route": route, "check": "rate_limit", "decision": decision, "basis": basis}) or 0.0


@pytest.fixture(params=["redis", "memory"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


async def test_limit_then_429_with_the_standard_fields(upstream: Upstream, store_url: str) -> None:
    routes = route("search", "{limit: 3, per: 10s, algorithm: fixed_window, key: route, on_store_error: open}")
    allow0, deny0 = decisions("search", "allow", "checked"), decisions("search", "deny", "checked")
    async with InProcessProxy(config_text(upstream.url, routes, extra=store_block(store_url))) as p:
        rs = [await raw_request(p.port, "/search/q") for _ in range(4)]
    assert [r.status for r in rs] == [200, 200, 200, 429]
    for r, left in zip(rs, [2, 1, 0, 0], strict=True):
        assert r.headers["ratelimit-policy"] == '"search";q=3;w=10'
        name, r_, t_ = r.headers["ratelimit"].split(";")
        assert (name, r_) == ('"search"', f"r={left}")
        assert 1 <= int(t_[2:]) <= 10
    denied = rs[3]
    assert denied.json()["error"] == "rate_limited" and denied.json()["route"] == "search"
    assert 1 <= int(denied.headers["retry-after"]) <= 10
    assert "failgate-degraded" not in denied.headers
    assert len(upstream.seen) == 3  # the denied request never reached the upstream
    assert decisions("search", "allow", "checked") - allow0 == 3
    assert decisions("search", "deny", "checked") - deny0 == 1


async def test_header_key_buckets_and_the_shared_anonymous_bucket(upstream: Upstream, store_url: str) -> None:
    routes = route("api", "{limit: 2, per: 1m, key: 'header:X-Api-Client', on_store_error: open}")
    async with InProcessProxy(config_text(upstream.url, routes, extra=store_block(store_url))) as p:
        async def status(headers: dict[str, str]) -> int:
            return (await raw_request(p.port, "/api", headers=headers)).status

        assert [await status({"X-Api-Client": "alice"}) for _ in range(3)] == [200, 200, 429]
        assert [await status({"X-Api-Client": "bob"}) for _ in range(3)] == [200, 200, 429]
        assert [await status({}) for _ in range(2)] + [await status({})] == [200, 200, 429]


async def test_client_ip_key_believes_x_forwarded_for_only_from_trusted_proxies(upstream: Upstream,
                                                                               store_url: str) -> None:
    routes = route("ip", "{limit: 1, per: 1m, key: client_ip, on_store_error: open}")
    trusted = store_block(store_url) + "trusted_proxies: [127.0.0.0/8]\n"
    async with InProcessProxy(config_text(upstream.url, routes, extra=trusted)) as p:
        a = {"X-Forwarded-For": "198.51.100.7, 10.0.0.1"}
        assert (await raw_request(p.port, "/ip", headers=a)).status == 200
        assert (await raw_request(p.port, "/ip", headers=a)).status == 429
        b = {"X-Forwarded-For": "198.51.100.8"}
        assert (await raw_request(p.port, "/ip", headers=b)).status == 200
    routes = route("ip2", "{limit: 1, per: 1m, key: client_ip, on_store_error: open}")
    async with InProcessProxy(config_text(upstream.url, routes, extra=store_block(store_url))) as p:
        # not trusted: the header is ignored and every request is 127.0.0.1's
        assert (await raw_request(p.port, "/ip2", headers={"X-Forwarded-For": "198.51.100.9"})).status == 200
        assert (await raw_request(p.port, "/ip2", headers={"X-Forwarded-For": "198.51.100.10"})).status == 429


async def test_routes_do_not_share_counters(upstream: Upstream, store_url: str) -> None:
    rl = "{limit: 1, per: 1m, key: client_ip, on_store_error: open}"
    async with InProcessProxy(config_text(upstream.url, route("one", rl) + route("two", rl),
                                          extra=store_block(store_url))) as p:
        assert [(await raw_request(p.port, u)).status for u in ("/one", "/two", "/one", "/two")] == [
            200, 200, 429, 429]


async def test_a_changed_algorithm_or_window_never_reads_an_incompatible_key(upstream: Upstream,
                                                                            redis_server: RedisServer) -> None:
    shapes = ["{limit: 2, per: 1m, algorithm: fixed_window, key: route, on_store_error: closed}",
              "{limit: 2, per: 1m, algorithm: gcra, key: route, on_store_error: closed}",
              "{limit: 2, per: 1m, algorithm: sliding_window, key: route, on_store_error: closed}",
              "{limit: 2, per: 2m, algorithm: gcra, key: route, on_store_error: closed}"]
    for shape in shapes:
        text = config_text(upstream.url, route("shape", shape), extra=store_block(redis_server.url))
        async with InProcessProxy(text) as p:
            # a fresh key for each shape: two admitted, then 429 — never a 503 from a WRONGTYPE reply
            assert [(await raw_request(p.port, "/shape")).status for _ in range(3)] == [200, 200, 429], shape
    keys = redis_server.command("KEYS", "failgate:rl:*").decode()
    assert keys.count("failgate:rl:{shape:route}:") == 4
    for part in (":fixed_window:60000", ":gcra:60000", ":sliding_window:60000", ":gcra:120000"):
        assert part in keys


async def test_two_instances_sharing_one_redis_admit_exactly_limit_together(upstream: Upstream,
                                                                           redis_server: RedisServer,
                                                                           tmp_path: Path) -> None:
    routes = route("shared", "{limit: 25, per: 1m, algorithm: sliding_window, key: route, on_store_error: closed}")
    procs = []
    for i in range(2):
        cfg = tmp_path / f"i{i}.yaml"
        cfg.write_text(config_text(upstream.url, routes, extra=store_block(redis_server.url)))
        procs.append(ProxyProcess(cfg).start())
    try:
        for p in procs:
            await p.wait_ready()
        async with aiohttp.ClientSession() as s:
            async def hit(url: str) -> int:
                async with s.get(url + "/shared") as r:
                    return r.status

            statuses = await asyncio.gather(*(hit(procs[i % 2].url) for i in range(80)))
        assert statuses.count(200) == 25
        assert statuses.count(429) == 55
    finally:
        for p in procs:
            assert p.stop() == 0


async def test_store_down_open_closed_and_stale(upstream: Upstream, redis_server: RedisServer) -> None:
    routes = (route("guard", "{limit: 100, per: 1m, key: route, on_store_error: open}")
              + route("gate", "{limit: 100, per: 1m, key: route, on_store_error: closed, status_on_error: 429}")
              + route("local", "{limit: 3, per: 1m, algorithm: fixed_window, key: route, on_store_error: stale}"))
    text = config_text(upstream.url, routes, extra=store_block(redis_server.url).replace(
        "timeout: 500ms", "timeout: 300ms, breaker: {open_for: 3s}"))
    async with InProcessProxy(text) as p:
        assert (await raw_request(p.port, "/local")).status == 200  # the store says 1 of 3 used
        redis_server.kill()
        r = await raw_request(p.port, "/guard")
        assert r.status == 200
        assert r.headers["failgate-degraded"] == "rate_limit;mode=open;reason=unavailable"
        assert "ratelimit" not in r.headers  # unknown while degraded open
        assert upstream.seen[-1]["headers"].count(("Failgate-Degraded", "rate_limit;mode=open;reason=unavailable")) == 1
        r = await raw_request(p.port, "/gate")
        assert (r.status, r.json()["error"], r.headers["retry-after"]) == (429, "store_unavailable", "3")
        assert r.headers["failgate-degraded"] == "rate_limit;mode=closed;reason=unavailable"
        # stale continues locally from the last count the store reported: 2 more of 3, then 429
        rs = [await raw_request(p.port, "/local") for _ in range(3)]
        assert [x.status for x in rs] == [200, 200, 429]
        assert rs[0].headers["failgate-degraded"].startswith("rate_limit;mode=stale;reason=unavailable;age=")
        assert rs[2].json()["error"] == "rate_limited" and rs[2].headers["ratelimit"].startswith('"local";r=0;')

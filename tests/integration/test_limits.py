"""Several limits on a route, plans, shadow limits, and RateLimit fields that never contradict one another — through
the real proxy on a real redis-server. Every field is parsed with a third-party RFC 8941 parser (http-sfv)."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import http_sfv
import pytest

from proxy.config import load_text
from proxy.keys import add
from tests.helpers import InProcessProxy, RawResponse, Upstream, config_text, raw_request
from tests.redis_server import RedisServer


def store(url: str) -> str:
    return f"store: {{url: '{url}', timeout: 500ms, connect_timeout: 1s, breaker: {{failures: 1000}}}}\n"


def fields(r: RawResponse) -> dict[str, dict[str, Any]]:
    """policy -> {q, w, r, t}, from RateLimit-Policy and RateLimit parsed as RFC 8941 lists."""
    out: dict[str, dict[str, Any]] = {}
    for name in ("ratelimit-policy", "ratelimit"):
        parsed = http_sfv.List()
        parsed.parse(r.headers[name].encode())
        for item in parsed:
            out.setdefault(item.value, {}).update(dict(item.params))
    return out


def coherent(r: RawResponse) -> None:
    """r never above q; on a 429, Retry-After is the largest retry of the denying limits and no t is below it."""
    f = fields(r)
    for policy in f.values():
        assert set(policy) == {"q", "w", "r", "t"} and 0 <= policy["r"] <= policy["q"]
    if r.status == 429:
        retry = int(r.headers["retry-after"])
        spent = [p for p in f.values() if p["r"] == 0]  # the denying limits are among these
        assert spent and max(p["t"] for p in spent) >= retry


async def get(p: InProcessProxy, path: str, **headers: str) -> RawResponse:
    r = await raw_request(p.port, path, headers=headers)
    if "ratelimit" in r.headers:
        coherent(r)
    return r


def commands(redis_server: RedisServer, name: str) -> int:
    info = redis_server.command("INFO", "commandstats").decode()
    m = re.search(rf"^cmdstat_{name}:calls=(\d+)", info, re.M)
    return int(m[1]) if m else 0


TWO_ON_ONE_KEY = """\
- name: api
  match: {path: /api}
  upstream: api
  rate_limit:
    - {name: burst, limit: 3, per: 1h, algorithm: fixed_window, key: route, on_store_error: stale}
    - {name: daily, limit: 5, per: 1d, algorithm: fixed_window, key: route, on_store_error: open}
"""


async def test_a_burst_denial_consumes_nothing_from_the_daily_limit(upstream: Upstream,
                                                                    redis_server: RedisServer) -> None:
    async with InProcessProxy(config_text(upstream.url, TWO_ON_ONE_KEY, extra=store(redis_server.url))) as p:
        before = commands(redis_server, "evalsha")
        statuses = []
        for _ in range(6):
            r = await get(p, "/api")
            statuses.append(r.status)
        assert statuses == [200, 200, 200, 429, 429, 429]
        assert commands(redis_server, "evalsha") - before == 6  # one script per request for both limits
        f = fields(r)
        assert f["api.burst"] == {"q": 3, "w": 3600, "r": 0, "t": f["api.burst"]["t"]}
        assert f["api.daily"]["r"] == 2  # 3 admitted; the three denied ones counted nowhere
        assert r.json()["detail"].startswith("rate limit api.burst of 3 per 3600s exceeded")
        # the daily limit's own state in Redis agrees
        daily = "failgate:rl:{api:route}:daily:fixed_window:86400000"
        assert redis_server.command("HGET", daily, "c") == b"$1\r\n3\r\n"


async def test_limits_on_different_keys_are_independent(upstream: Upstream, redis_server: RedisServer) -> None:
    routes = """\
    - name: api
      match: {path: /api}
      upstream: api
      rate_limit:
        - {name: per-client, limit: 2, per: 1h, key: "header:X-Client", on_store_error: open}
        - {name: overall, limit: 3, per: 1h, key: route, on_store_error: open}
    """
    async with InProcessProxy(config_text(upstream.url, routes, extra=store(redis_server.url))) as p:
        a = [(await get(p, "/api", **{"X-Client": "a"})).status for _ in range(3)]
        assert a == [200, 200, 429]  # a's own limit; its denial still counted against the overall one
        r = await get(p, "/api", **{"X-Client": "b"})
        assert r.status == 429 and fields(r)["api.overall"]["r"] == 0  # overall: 3 of 3 used by a
        assert fields(r)["api.per-client"]["r"] == 1  # b's own bucket is fresh


def key_for(redis_url: str, principal: str, plan: str | None = None) -> str:
    loaded = load_text(config_text("http://127.0.0.1:1", "- {name: x, match: {path: /}, upstream: api}\n",
                                   extra=store(redis_url)), "keys.yaml")
    return add(loaded, principal, [], None, plan)[0]


PLANS = """\
- name: api
  match: {path: /api}
  upstream: api
  auth: {type: api_key, on_store_error: closed}
  rate_limit:
    - {name: burst, limit: 100, per: 1h, algorithm: fixed_window, key: principal, on_store_error: open}
    - name: daily
      limit: 2
      per: 1d
      algorithm: fixed_window
      key: principal
      plans: {pro: 4, internal: unlimited}
      on_store_error: open
- name: public
  match: {path: /public}
  upstream: api
  auth: {type: api_key, on_store_error: open}
  rate_limit: {limit: 2, per: 1h, key: route, on_store_error: open, plans: {pro: 9}}
"""


async def test_plans_pick_the_quota_and_unlimited_asks_nothing(upstream: Upstream, redis_server: RedisServer) -> None:
    free, pro, internal = (key_for(redis_server.url, "ann"), key_for(redis_server.url, "bob", "pro"),
                           key_for(redis_server.url, "cat", "internal"))
    text = config_text(upstream.url, PLANS, extra=store(redis_server.url))
    async with InProcessProxy(text) as p:
        assert [(await get(p, "/api", Authorization=free)).status for _ in range(3)] == [200, 200, 429]
        statuses = []
        for _ in range(5):
            r = await get(p, "/api", Authorization=pro)
            statuses.append(r.status)
        assert statuses == [200] * 4 + [429]
        assert fields(r)["api.daily"]["q"] == 4  # the quota that applied, under the limit's own name
        assert dict(upstream.seen[-1]["headers"]).get("X-Failgate-Plan") == "pro"
        before = commands(redis_server, "evalsha")
        for _ in range(10):
            r = await get(p, "/api", Authorization=internal)
            assert r.status == 200
        assert "api.daily" not in fields(r) and "api.burst" in fields(r)  # unlimited: no quota to report
        assert commands(redis_server, "evalsha") - before == 10  # only the burst limit was asked, once each
        # a key without a plan, and no key at all (401, still counted), get `limit`
        assert [(await get(p, "/public", Authorization=free)).status for _ in range(3)] == [200, 200, 429]
        r = await get(p, "/public")
        assert r.status == 401 and fields(r)["public"]["q"] == 2


async def test_shadow_limits_count_and_report_but_never_deny(upstream: Upstream, redis_server: RedisServer) -> None:
    from proxy.observe.metrics import REGISTRY

    routes = """\
    - name: sh
      match: {path: /sh}
      upstream: api
      rate_limit:
        - {name: real, limit: 100, per: 1h, key: route, on_store_error: open}
        - {name: trial, limit: 2, per: 1h, key: route, shadow: true, on_store_error: open}
    """
    log = io.StringIO()
    async with InProcessProxy(config_text(upstream.url, routes, extra=store(redis_server.url)), log_stream=log) as p:
        rs = [await get(p, "/sh") for _ in range(5)]
    lines = [json.loads(x) for x in log.getvalue().splitlines()]
    assert [(x["check"], x["decision"], x["status"]) for x in lines] == [("rate_limit.trial", "shadow_deny", 200)] * 3
    assert [r.status for r in rs] == [200] * 5
    assert [fields(r)["sh.trial"]["r"] for r in rs] == [1, 0, 0, 0, 0]
    assert [fields(r)["sh.real"]["r"] for r in rs] == [99, 98, 97, 96, 95]  # a shadow never stops the others
    shadow = REGISTRY.get_sample_value("failgate_decisions_total", {"route": "sh", "check": "rate_limit.trial",
                                                                    "decision": "shadow_deny", "basis": "checked"})
    assert shadow == 3


async def test_the_store_down_each_limit_decides_by_its_own_mode_tagged_by_its_name(
        upstream: Upstream, redis_server: RedisServer) -> None:
    async with InProcessProxy(config_text(upstream.url, TWO_ON_ONE_KEY, extra=store(redis_server.url))) as p:
        assert (await get(p, "/api")).status == 200  # burst remembers 1 of 3 for `stale`
        redis_server.kill()
        rs = [await get(p, "/api") for _ in range(3)]
    assert [r.status for r in rs] == [200, 200, 429]  # burst: continues locally from 1 of 3
    tags = rs[0].headers["failgate-degraded"]
    parsed = http_sfv.List()
    parsed.parse(tags.encode())
    assert [(item.value.__str__(), item.params["mode"].__str__()) for item in parsed] == [
        ("rate_limit.burst", "stale"), ("rate_limit.daily", "open")]
    assert set(fields(rs[0])) == {"api.burst"}  # open reports nothing; stale reports its local state


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window", "gcra"])
async def test_fields_are_coherent_for_every_algorithm(upstream: Upstream, redis_server: RedisServer,
                                                       algorithm: str) -> None:
    burst = ", burst: 4" if algorithm == "gcra" else ""
    routes = f"""\
    - name: c
      match: {{path: /c}}
      upstream: api
      rate_limit:
        - {{name: fast, limit: 2, per: 10s, algorithm: {algorithm}{burst}, key: route, on_store_error: open}}
        - {{name: slow, limit: 50, per: 1h, algorithm: {algorithm}, key: route, on_store_error: open}}
    """
    async with InProcessProxy(config_text(upstream.url, routes, extra=store(redis_server.url))) as p:
        rs = [await get(p, "/c") for _ in range(8)]  # `get` checks coherence on every response
    assert 429 in [r.status for r in rs]
    if algorithm == "gcra":
        assert fields(rs[0])["c.fast"]["q"] == 4  # a gcra bucket reports its burst as the quota


def test_check_lists_every_limit_with_its_mode() -> None:
    from proxy.checkcmd import describe

    text = config_text("http://127.0.0.1:9", TWO_ON_ONE_KEY.replace("on_store_error: open}",
                                                                    "on_store_error: open, shadow: true}"))
    text = text.replace("routes:\n", "defaults: {rate_limit: {status_on_error: 429}}\nroutes:\n", 1)
    out = describe(load_text(text, "two.yaml"))
    assert ("rate_limit.burst: 3 per 1h (fixed_window) by route; on_store_error stale (declared)") in out
    assert ("rate_limit.daily: 5 per 1d (fixed_window) by route; on_store_error open (declared) "
            "(shadow: counted, never denies)") in out
    plans = describe(load_text(config_text("http://127.0.0.1:9", PLANS), "plans.yaml"))
    assert "rate_limit.daily: 2 per 1d (fixed_window) by principal; plans pro=4, internal=unlimited;" in plans

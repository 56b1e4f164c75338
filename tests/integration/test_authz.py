"""An external HTTP authorizer through the real proxy: what it is told, what its answers do, what reaches the
upstream, its verdict memory, and its failures — with its own breaker, independent of the store's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.observe.metrics import REGISTRY
from tests.authz_server import AuthzServer
from tests.helpers import InProcessProxy, RawResponse, Upstream, config_text, raw_request, until
from tests.redis_server import RedisServer


def route(authz: AuthzServer, mode: str = "stale", *, name: str = "app", path: str = "/app", extra: str = "",
          rate_limit: str = "") -> str:
    stale = "stale_for: 1h, stale_fallback: closed, " if mode == "stale" else ""
    text = (f"- name: {name}\n  match: {{path: {path}, prefix: true}}\n  upstream: api\n"
            f"  auth: {{type: http, url: '{authz.url}', upstream_headers: [X-User-Id, X-User-Plan], "
            f"principal_header: X-User-Id, plan_header: X-User-Plan, timeout: 300ms, "
            f"breaker: {{failures: 3, open_for: 30s}}, {stale}{extra}on_store_error: {mode}}}\n")
    return text + (f"  rate_limit: {rate_limit}\n" if rate_limit else "")


@pytest.fixture
async def authz() -> AsyncIterator[AuthzServer]:
    server = await AuthzServer().start()
    yield server
    await server.stop()


async def get(p: InProcessProxy, path: str, credential: str | None, **headers: str) -> RawResponse:
    if credential is not None:
        headers["Authorization"] = credential
    return await raw_request(p.port, path, headers=headers)


def seen(upstream: Upstream, name: str) -> list[str]:
    return [v for k, v in upstream.seen[-1]["headers"] if k.lower() == name.lower()]


async def test_a_cookie_the_authorizer_sets_for_one_client_is_never_sent_for_another(upstream: Upstream,
                                                                                       authz: AuthzServer) -> None:
    # By name, not by address: an HTTP client's cookie jar keeps no cookie an IP address sets.
    named = route(authz).replace("http://127.0.0.1:", "http://localhost:")
    async with InProcessProxy(config_text(upstream.url, named)) as p:
        assert (await get(p, "/app/x", "Bearer good-alice")).status == 200
        assert (await get(p, "/app/x", "Bearer good-bob")).status == 200
        assert len(authz.calls) == 2
        assert "cookie" not in authz.calls[1]  # bob's check does not arrive as alice
        assert authz.calls[1]["host"] == f"localhost:{authz.port}"  # the authorizer is asked by the name it has


async def test_allow_deny_and_redirect_and_what_the_upstream_sees(upstream: Upstream, authz: AuthzServer) -> None:
    async with InProcessProxy(config_text(upstream.url, route(authz))) as p:
        r = await get(p, "/app/x?q=1", "Bearer good", **{"X-User-Id": "admin", "X_User_Id": "admin"})
        assert r.status == 200
        assert seen(upstream, "X-User-Id") == ["alice"] and seen(upstream, "X-User-Plan") == ["pro"]
        assert seen(upstream, "X_User_Id") == [] and seen(upstream, "X-Other") == []
        assert seen(upstream, "X-Failgate-Principal") == ["alice"] and seen(upstream, "X-Failgate-Plan") == ["pro"]
        told = authz.calls[-1]
        assert (told["x-forwarded-method"], told["x-forwarded-uri"], told["authorization"]) == ("GET", "/app/x?q=1",
                                                                                                "Bearer good")
        assert "x-request-id" in told and told["x-forwarded-for"] == "127.0.0.1"
        r = await get(p, "/app/x", "Bearer nope")
        assert (r.status, r.headers["www-authenticate"], r.body) == (401, 'Bearer realm="authz"', b'{"why": "no"}')
        r = await get(p, "/app/x", "Bearer redirect")
        assert (r.status, r.headers["location"]) == (302, "https://login.test/?next=/")
        r = await get(p, "/app/x", "Bearer forbidden")
        # Its body reaches the client as a body it can read: Failgate asks for no compressed encoding it would
        # then pass on unlabelled.
        assert (r.status, r.body) == (403, b"not for you")
        assert "accept-encoding" not in authz.calls[-1]
        before = len(upstream.seen)
        await get(p, "/app/x", "Bearer nope", **{"X-User-Id": "admin"})
        assert len(upstream.seen) == before  # denied: nothing went upstream


async def test_cache_for_cuts_calls_and_never_crosses_requests(upstream: Upstream, authz: AuthzServer) -> None:
    async with InProcessProxy(config_text(upstream.url, route(authz, extra="cache_for: 5s, "))) as p:
        for _ in range(5):
            assert (await get(p, "/app/public", "Bearer good")).status == 200
        assert len(authz.calls) == 1
        r = await raw_request(p.port, "/app/admin", method="DELETE", headers={"Authorization": "Bearer good"})
        assert r.status == 200 and len(authz.calls) == 2  # another method and path: asked again
        assert seen(upstream, "X-User-Id") == ["alice"]  # a remembered allow restores its headers too




@pytest.mark.parametrize("failure", ["hang", "error", "refuse", "reset"])
@pytest.mark.parametrize("mode", ["stale", "closed", "open"])
async def test_the_authorizer_failing(upstream: Upstream, authz: AuthzServer, mode: str, failure: str) -> None:
    async with InProcessProxy(config_text(upstream.url, route(authz, mode))) as p:
        assert (await get(p, "/app/x", "Bearer good")).status == 200  # an allow to remember
        assert (await get(p, "/app/x", "Bearer nope")).status == 401  # a deny to remember
        if failure == "refuse":
            await authz.stop()
        else:
            authz.mode = failure
        reason = {"hang": "timeout", "error": "error", "refuse": "unavailable", "reset": "unavailable"}[failure]
        rs = await asyncio.gather(*(get(p, "/app/x", "Bearer good", **{"X-User-Id": "admin"}) for _ in range(5)))
        denied = await get(p, "/app/x", "Bearer nope")
        fresh = await get(p, "/app/x", "Bearer never-seen")
        tags = {r.headers["failgate-degraded"].rsplit(";age=", 1)[0] for r in rs}
        assert tags <= {f"auth;mode={mode};reason={reason}", f"auth;mode={mode};reason=breaker_open"}
        if mode == "stale":
            assert {r.status for r in rs} == {200} and seen(upstream, "X-User-Id") == ["alice"]
            assert denied.status == 401  # a remembered deny stays a deny
            assert (fresh.status, fresh.headers["failgate-degraded"].split(";fallback=")[1]) == (503, "closed")
        elif mode == "closed":
            assert {r.status for r in rs} == {503}
        else:
            assert {r.status for r in rs} == {200} and seen(upstream, "X-User-Id") == []  # never the client's
    # the store's breaker was never involved
    assert (REGISTRY.get_sample_value("failgate_breaker_state", {"dependency": "store"}) or 0) == 0


@pytest.mark.parametrize("mode", ["stale", "closed"])
async def test_a_refusal_for_want_of_the_authorizer_says_retry_after_its_own_breaker(
        upstream: Upstream, authz: AuthzServer, mode: str) -> None:
    """`closed`, and `stale` with nothing remembered (its `closed` fallback): Retry-After is the authorizer's
    breaker.open_for (30 s here), not the store's (2 s by default) — the authorizer is what is being waited for."""
    async with InProcessProxy(config_text(upstream.url, route(authz, mode))) as p:
        await authz.stop()
        r = await get(p, "/app/x", "Bearer never-seen")
        assert r.status == 503 and r.headers["retry-after"] == "30"
        assert ("fallback=closed" in r.headers["failgate-degraded"]) == (mode == "stale")


async def test_its_breaker_opens_and_recovers_while_the_store_stays_healthy(upstream: Upstream,
                                                                          authz: AuthzServer) -> None:
    text = config_text(upstream.url, route(authz, "closed").replace("open_for: 30s", "open_for: 1s"))
    async with InProcessProxy(text) as p:
        authz.mode = "error"
        for _ in range(3):
            assert (await get(p, "/app/x", "Bearer good")).status == 503
        calls = len(authz.calls)
        r = await get(p, "/app/x", "Bearer good")
        assert r.headers["failgate-degraded"] == "auth;mode=closed;reason=breaker_open" and len(authz.calls) == calls
        assert REGISTRY.get_sample_value("failgate_breaker_state", {"dependency": "authz:app"}) == 2
        authz.mode = "ok"

        async def recovered() -> bool:
            return (await get(p, "/app/x", "Bearer good")).status == 200

        await until("the probe closes the breaker", recovered)
        assert REGISTRY.get_sample_value("failgate_breaker_state", {"dependency": "authz:app"}) == 0


async def test_a_principal_limit_keyed_by_the_authorizers_answer(upstream: Upstream, authz: AuthzServer) -> None:
    text = config_text(upstream.url, route(authz, "closed", rate_limit="{limit: 2, per: 1h, key: principal, "
                                                                        "on_store_error: open}"))
    async with InProcessProxy(text) as p:
        statuses = [(await get(p, "/app/x", "Bearer good-ann")).status for _ in range(3)]
        assert statuses == [200, 200, 429]
        assert (await get(p, "/app/x", "Bearer good-bob")).status == 200  # another principal, its own bucket


def test_check_explains_an_http_auth_route() -> None:
    from proxy.checkcmd import describe
    from proxy.config import load_text

    class Fake:
        url = "http://authz.test/check"

    out = describe(load_text(config_text("http://127.0.0.1:9", route(Fake(), "closed",  # type: ignore[arg-type]
                                                                     extra="cache_for: 5s, ")), "h.yaml"))
    assert ("auth: http authorizer http://authz.test/check (timeout 300ms, its own breaker 3 failures / 30s), "
            "verdicts reused 5s; sends Authorization; copies X-User-Id,X-User-Plan upstream; on_store_error closed "
            "(declared) for the authorizer, status 503") in out


async def test_a_dead_store_does_not_touch_the_authorizers_breaker(upstream: Upstream, authz: AuthzServer,
                                                                   redis_server: RedisServer) -> None:
    text = config_text(upstream.url, route(authz, "closed", rate_limit="{limit: 100, per: 1h, key: route, "
                                                                        "on_store_error: open}"),
                       extra=f"store: {{url: '{redis_server.url}', timeout: 100ms, breaker: {{failures: 2}}}}\n")
    async with InProcessProxy(text) as p:
        assert (await get(p, "/app/x", "Bearer good")).status == 200
        redis_server.kill()
        for _ in range(4):
            r = await get(p, "/app/x", "Bearer good")
            assert r.status == 200  # the authorizer still decides; the limit fails open
            assert r.headers["failgate-degraded"].startswith("rate_limit;mode=open;reason=")
        assert REGISTRY.get_sample_value("failgate_breaker_state", {"dependency": "store"}) == 2
        assert REGISTRY.get_sample_value("failgate_breaker_state", {"dependency": "authz:app"}) == 0


async def test_the_authorizer_and_the_store_are_asked_at_the_same_time(upstream: Upstream, authz: AuthzServer,
                                                                     redis_server: RedisServer) -> None:
    routes = route(authz, "closed", rate_limit="{limit: 100, per: 1h, key: route, on_store_error: closed}")
    text = config_text(upstream.url, routes.replace("timeout: 300ms", "timeout: 10s"),
                       extra=f"store: {{url: '{redis_server.url}', timeout: 1s}}\n")
    async with InProcessProxy(text) as p:
        assert (await get(p, "/app/x", "Bearer good")).status == 200  # connections and scripts warm
        before = _evalsha(redis_server)
        authz.mode = "gate"  # the authorizer holds its answer until the test lets it go
        request = asyncio.ensure_future(get(p, "/app/x", "Bearer good"))

        async def store_asked() -> bool:  # while the authorizer has not answered
            return _evalsha(redis_server) > before

        await until("the store was asked before the authorizer answered", store_asked)
        assert not request.done() and len(authz.calls) == 2
        authz.release.set()
        assert (await request).status == 200


def _evalsha(redis_server: RedisServer) -> int:
    import re

    info = redis_server.command("INFO", "commandstats").decode()
    m = re.search(r"^cmdstat_evalsha:calls=(\d+)", info, re.M)
    return int(m[1]) if m else 0


@pytest.mark.parametrize("cache_for", ["5s", "0s"])
async def test_the_same_question_asked_meanwhile_shares_one_call(upstream: Upstream, authz: AuthzServer,
                                                                 cache_for: str) -> None:
    # A verdict expired from cache_for under load is one call, not one per request; without cache_for every request
    # is asked about on its own (it carries its own client address and request id).
    text = config_text(upstream.url, f"""\
- name: app
  match: {{path: /app, prefix: true}}
  upstream: api
  auth: {{type: http, url: '{authz.url}', timeout: 5s, cache_for: {cache_for}, on_store_error: closed}}
""")
    async with InProcessProxy(text) as p:
        authz.mode = "gate"
        waiting = [asyncio.ensure_future(get(p, "/app/x", "Bearer good")) for _ in range(20)]
        await until("every request is in the proxy", lambda: p.serving.runtime.active == 20)
        await until("the authorizer was asked", lambda: len(authz.calls) >= 1)
        authz.release.set()
        statuses = [r.status for r in await asyncio.gather(*waiting)]
        assert statuses == [200] * 20
        assert len(authz.calls) == (1 if cache_for == "5s" else 20)


async def test_at_most_a_hundred_calls_are_in_flight_to_one_authorizer(upstream: Upstream,
                                                                       authz: AuthzServer) -> None:
    # A flood of distinct credentials must not open a connection per request to the authorizer: the rest wait for
    # a turn (within `timeout`), as they would for a free connection.
    text = config_text(upstream.url, f"""\
- name: app
  match: {{path: /app, prefix: true}}
  upstream: api
  auth: {{type: http, url: '{authz.url}', timeout: 10s, on_store_error: closed}}
""", extra="limits: {max_connections: 1000}\n")
    async with InProcessProxy(text) as p:
        authz.mode = "gate"
        waiting = [asyncio.ensure_future(get(p, "/app/x", f"Bearer good-{i}")) for i in range(120)]
        authorizer = p.serving.runtime.memories.authorizers["app"]
        await until("100 calls are held and 20 wait for a turn",
                    lambda: len(authz.calls) == 100 and len(authorizer.slots._waiters or ()) == 20)
        assert len(authorizer.pool.open) == 100
        authz.release.set()
        assert [r.status for r in await asyncio.gather(*waiting)] == [200] * 120
        assert len(authz.calls) == 120 and len(authorizer.pool.open) <= 100

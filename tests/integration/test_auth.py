"""API-key auth through the real proxy on a real redis-server; the keys CLI."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.config import load_text
from proxy.keys import add, revoke
from tests.helpers import ROOT, InProcessProxy, ProxyProcess, Upstream, config_text, raw_request
from tests.redis_server import RedisServer


def store(url: str, extra: str = "") -> str:
    return f"store: {{url: '{url}', timeout: 500ms, connect_timeout: 1s{extra}}}\n"


def auth_route(name: str, auth: str, rate_limit: str | None = None) -> str:
    text = f"- name: {name}\n  match: {{path: /{name}, prefix: true}}\n  upstream: api\n  auth: {auth}\n"
    if rate_limit:
        text += f"  rate_limit: {rate_limit}\n"
    return text


def new_key(redis_url: str, principal: str, scopes: list[str], expires: str | None = None) -> str:
    loaded = load_text(config_text("http://127.0.0.1:1", "- {name: x, match: {path: /}, upstream: api}\n",
                                   extra=store(redis_url)), "keys.yaml")
    key, _ = add(loaded, principal, scopes, expires)
    return key


def seen_header(upstream: Upstream, name: str) -> list[str]:
    return [v for k, v in upstream.seen[-1]["headers"] if k.lower() == name.lower()]


ROUTES = (auth_route("pay", "{type: api_key, scheme: Bearer, scopes: [payments:write], on_store_error: closed}")
          + auth_route("admin", "{type: api_key, header: X-Api-Key, scopes: [admin], on_store_error: closed, "
                                "forward_credentials: false}"))


async def test_401_403_and_200_with_identity_upstream(upstream: Upstream, redis_server: RedisServer) -> None:
    alice = new_key(redis_server.url, "alice", ["payments:write", "reports"])
    bob = new_key(redis_server.url, "bob", ["reports"])
    async with InProcessProxy(config_text(upstream.url, ROUTES, extra=store(redis_server.url))) as p:
        r = await raw_request(p.port, "/pay")
        assert (r.status, r.json()["error"]) == (401, "unauthorized")
        assert r.headers["www-authenticate"] == 'Bearer realm="failgate"'
        r = await raw_request(p.port, "/pay", headers={"Authorization": alice})  # no scheme
        assert r.status == 401
        r = await raw_request(p.port, "/pay", headers={"Authorization": "Bearer not-a-key"})
        assert (r.status, r.json()["detail"]) == (401, "unknown API key")
        r = await raw_request(p.port, "/pay", headers={"Authorization": f"Bearer {bob}"})
        assert (r.status, r.json()["error"], r.json()["detail"]) == (403, "forbidden", "missing scope: payments:write")
        assert upstream.seen == []
        r = await raw_request(p.port, "/pay/charge", headers={
            "Authorization": f"bearer {alice}", "X-Failgate-Principal": "root", "X_Failgate_Scopes": "admin"})
        assert r.status == 200
        assert seen_header(upstream, "X-Failgate-Principal") == ["alice"]
        assert seen_header(upstream, "X-Failgate-Scopes") == ["payments:write,reports"]
        assert seen_header(upstream, "X_Failgate_Scopes") == []
        assert seen_header(upstream, "Authorization") == [f"bearer {alice}"]
        # forward_credentials: false keeps the key from the upstream
        admin = new_key(redis_server.url, "ops", ["admin"])
        r = await raw_request(p.port, "/admin", headers={"X-Api-Key": admin})
        assert r.status == 200 and "www-authenticate" not in r.headers
        assert seen_header(upstream, "X-Api-Key") == [] and seen_header(upstream, "X-Failgate-Principal") == ["ops"]


async def test_expired_key_is_401(upstream: Upstream, redis_server: RedisServer) -> None:
    key = "expired-key-material"
    digest = hashlib.sha256(key.encode()).hexdigest()
    redis_server.command("SET", "failgate:epoch", "1")
    redis_server.command("SET", f"failgate:apikey:{digest}",
                         json.dumps({"principal": "old", "scopes": ["payments:write"], "expires_at": time.time() - 1}))
    async with InProcessProxy(config_text(upstream.url, ROUTES, extra=store(redis_server.url))) as p:
        r = await raw_request(p.port, "/pay", headers={"Authorization": f"Bearer {key}"})
        assert (r.status, r.json()["detail"]) == (401, "the API key has expired")


async def test_each_request_judges_the_record_the_store_has_now(upstream: Upstream,
                                                                 redis_server: RedisServer) -> None:
    """A credential's read and its last decoded record are kept between requests: a record changed in the store
    (a new principal, a scope removed, the value broken) must be what the next request is judged by."""
    key = "record-that-changes"
    name = f"failgate:apikey:{hashlib.sha256(key.encode()).hexdigest()}"
    redis_server.command("SET", "failgate:epoch", "1")
    redis_server.command("SET", name, json.dumps({"principal": "first", "scopes": ["payments:write"]}))
    async with InProcessProxy(config_text(upstream.url, ROUTES, extra=store(redis_server.url))) as p:
        for spelling in (f"Bearer {key}", f"bearer  {key}", f"Bearer {key}"):
            assert (await raw_request(p.port, "/pay", headers={"Authorization": spelling})).status == 200
            assert seen_header(upstream, "X-Failgate-Principal") == ["first"]
        redis_server.command("SET", name, json.dumps({"principal": "second", "scopes": ["payments:write"]}))
        assert (await raw_request(p.port, "/pay", headers={"Authorization": f"Bearer {key}"})).status == 200
        assert seen_header(upstream, "X-Failgate-Principal") == ["second"]
        redis_server.command("SET", name, json.dumps({"principal": "second", "scopes": []}))
        r = await raw_request(p.port, "/pay", headers={"Authorization": f"Bearer {key}"})
        assert (r.status, r.json()["detail"]) == (403, "missing scope: payments:write")
        redis_server.command("SET", name, "{broken")
        r = await raw_request(p.port, "/pay", headers={"Authorization": f"Bearer {key}"})
        assert (r.status, r.headers["failgate-degraded"]) == (503, "auth;mode=closed;reason=error")
        redis_server.command("DEL", name)
        r = await raw_request(p.port, "/pay", headers={"Authorization": f"Bearer {key}"})
        assert (r.status, r.json()["detail"]) == (401, "unknown API key")


async def test_a_record_that_expires_is_refused_once_it_has_without_a_change_in_the_store(
        upstream: Upstream, redis_server: RedisServer) -> None:
    key = "expires-soon"
    redis_server.command("SET", "failgate:epoch", "1")
    record = {"principal": "brief", "scopes": ["payments:write"], "expires_at": time.time() + 1}
    redis_server.command("SET", f"failgate:apikey:{hashlib.sha256(key.encode()).hexdigest()}", json.dumps(record))
    async with InProcessProxy(config_text(upstream.url, ROUTES, extra=store(redis_server.url))) as p:
        h = {"Authorization": f"Bearer {key}"}
        assert (await raw_request(p.port, "/pay", headers=h)).status == 200
        deadline = time.monotonic() + 10
        while (r := await raw_request(p.port, "/pay", headers=h)).status == 200:  # the same bytes every time
            assert time.monotonic() < deadline, "the key never expired"
            await asyncio.sleep(0.05)
        assert (r.status, r.json()["detail"]) == (401, "the API key has expired")


async def test_a_revocation_overrides_cache_for(upstream: Upstream, redis_server: RedisServer) -> None:
    key = new_key(redis_server.url, "carol", [])
    routes = auth_route("api", "{type: api_key, cache_for: 1h, on_store_error: closed}")
    async with InProcessProxy(config_text(upstream.url, routes, extra=store(redis_server.url))) as p:
        h = {"Authorization": key}
        assert (await raw_request(p.port, "/api", headers=h)).status == 200  # cached for an hour from now on
        loaded = load_text(config_text("http://x", routes, extra=store(redis_server.url)), "k.yaml")
        revoke(loaded, key)
        deadline = time.monotonic() + 10
        while (r := await raw_request(p.port, "/api", headers=h)).status == 200:  # until the channel delivers it
            assert time.monotonic() < deadline, "the revocation never arrived"
            await asyncio.sleep(0.02)
        assert (r.status, r.json()["detail"]) == (401, "the API key was revoked")


@pytest.mark.parametrize("how", ["flush", "restart"])
async def test_a_store_that_lost_its_data_is_a_store_error_not_401s(upstream: Upstream, redis_server: RedisServer,
                                                                    how: str) -> None:
    key = new_key(redis_server.url, "dave", ["payments:write"])
    routes = ROUTES + auth_route("soft", "{type: api_key, on_store_error: open}")
    async with InProcessProxy(config_text(upstream.url, routes, extra=store(redis_server.url))) as p:
        h = {"Authorization": f"Bearer {key}"}
        assert (await raw_request(p.port, "/pay", headers=h)).status == 200
        if how == "flush":
            redis_server.command("FLUSHALL")
        else:
            redis_server.restart()
        for _ in range(20):  # after a restart the first attempts may find the connection gone
            r = await raw_request(p.port, "/pay", headers=h)
            if r.headers.get("failgate-degraded", "").endswith("reason=error"):
                break
            await asyncio.sleep(0.05)
        assert (r.status, r.json()["error"]) == (503, "store_unavailable")
        assert r.headers["failgate-degraded"] == "auth;mode=closed;reason=error"
        r = await raw_request(p.port, "/soft", headers={"Authorization": "anything"})
        assert r.status == 200 and r.headers["failgate-degraded"] == "auth;mode=open;reason=error"
        assert seen_header(upstream, "X-Failgate-Principal") == []  # unknown while degraded


async def test_a_malformed_record_fails_that_request_only(upstream: Upstream, redis_server: RedisServer) -> None:
    good = new_key(redis_server.url, "erin", ["payments:write"])
    bad = "bad-record-key"
    redis_server.command("SET", f"failgate:apikey:{hashlib.sha256(bad.encode()).hexdigest()}", "{not json")
    async with InProcessProxy(config_text(upstream.url, ROUTES, extra=store(redis_server.url))) as p:
        r = await raw_request(p.port, "/pay", headers={"Authorization": f"Bearer {bad}"})
        assert (r.status, r.headers["failgate-degraded"]) == (503, "auth;mode=closed;reason=error")
        assert "Traceback" not in r.body.decode()
        assert (await raw_request(p.port, "/pay", headers={"Authorization": f"Bearer {good}"})).status == 200


async def test_auth_stale_remembers_allows_and_revocations_then_falls_back(upstream: Upstream,
                                                                          redis_server: RedisServer) -> None:
    kept = new_key(redis_server.url, "frank", ["payments:write"])
    gone = new_key(redis_server.url, "gina", ["payments:write"])
    weak = new_key(redis_server.url, "hank", [])
    never = new_key(redis_server.url, "ivy", ["payments:write"])
    routes = auth_route("pay", "{type: api_key, scopes: [payments:write], on_store_error: stale, stale_for: 2s, "
                               "stale_fallback: closed}")
    text = config_text(upstream.url, routes, extra=store(redis_server.url, ", breaker: {open_for: 4s}"))
    async with InProcessProxy(text) as p:
        for k in (kept, gone, weak):
            await raw_request(p.port, "/pay", headers={"Authorization": k})
        loaded = load_text(config_text("http://x", routes, extra=store(redis_server.url)), "k.yaml")
        revoke(loaded, gone)
        assert (await raw_request(p.port, "/pay", headers={"Authorization": gone})).status == 401  # seen revoked
        redis_server.kill()
        r = await raw_request(p.port, "/pay", headers={"Authorization": kept})
        assert r.status == 200
        assert r.headers["failgate-degraded"].startswith("auth;mode=stale;reason=unavailable;age=")
        assert seen_header(upstream, "X-Failgate-Principal") == ["frank"]
        r = await raw_request(p.port, "/pay", headers={"Authorization": gone})
        assert (r.status, r.json()["detail"]) == (401, "the API key was revoked")
        r = await raw_request(p.port, "/pay", headers={"Authorization": weak})
        assert r.status == 403  # the route's own scope check applies to the remembered record
        r = await raw_request(p.port, "/pay", headers={"Authorization": never})
        assert (r.status, r.json()["error"]) == (503, "store_unavailable")
        assert r.headers["failgate-degraded"] == "auth;mode=stale;reason=unavailable;fallback=closed"
        assert r.headers["retry-after"] == "4"
        await asyncio.sleep(2.1)  # stale_for has passed
        r = await raw_request(p.port, "/pay", headers={"Authorization": kept})
        assert r.status == 503 and r.headers["failgate-degraded"].endswith("fallback=closed")


async def test_principal_rate_limit_key(upstream: Upstream, redis_server: RedisServer) -> None:
    a = new_key(redis_server.url, "alice", [])
    a2 = new_key(redis_server.url, "alice", [])
    b = new_key(redis_server.url, "bob", [])
    routes = auth_route("api", "{type: api_key, on_store_error: closed}",
                        "{limit: 2, per: 1m, key: principal, on_store_error: closed}")
    async with InProcessProxy(config_text(upstream.url, routes, extra=store(redis_server.url))) as p:
        async def st(k: str) -> int:
            return (await raw_request(p.port, "/api", headers={"Authorization": k})).status

        # alice's two keys share one principal bucket; bob has his own; a denied auth counts nothing
        assert [await st(a), await st(a2), await st(a)] == [200, 200, 429]
        got = [await st("wrong"), await st("wrong"), await st(b), await st(b), await st(b)]
        assert got == [401, 401, 200, 200, 429]


async def test_denied_auth_still_counts_against_an_ip_limit_in_the_same_round_trip(
        upstream: Upstream, redis_server: RedisServer) -> None:
    good = new_key(redis_server.url, "jo", [])
    routes = auth_route("api", "{type: api_key, on_store_error: closed}",
                        "{limit: 3, per: 1m, key: client_ip, on_store_error: closed}")
    async with InProcessProxy(config_text(upstream.url, routes, extra=store(redis_server.url))) as p:
        statuses = [(await raw_request(p.port, "/api", headers={"Authorization": "guess"})).status for _ in range(3)]
        assert statuses == [401, 401, 401]
        r = await raw_request(p.port, "/api", headers={"Authorization": good})
        assert r.status == 429  # three guesses used this client's budget
        assert r.headers["ratelimit"].startswith('"api";r=0;')


def failgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_keys_cli_round_trip(redis_server: RedisServer, tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text("http://127.0.0.1:1", "- {name: x, match: {path: /}, upstream: api}\n",
                               extra=store(redis_server.url)))
    r = failgate("keys", "add", "--principal", "kim", "--scopes", "a,b", "--expires", "30d", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert len(key) >= 43 and "\n" not in key  # 256 bits, URL-safe base64
    digest = hashlib.sha256(key.encode()).hexdigest()
    stored = redis_server.command("GET", f"failgate:apikey:{digest}").decode()
    assert '"principal":"kim"' in stored and key not in stored
    assert b"failgate:epoch" in redis_server.command("KEYS", "failgate:*")
    listing = failgate("keys", "list", "-c", str(cfg))
    assert listing.returncode == 0
    assert "kim" in listing.stdout and "a,b" in listing.stdout and digest[:12] in listing.stdout
    assert key not in listing.stdout and digest not in listing.stdout
    r = failgate("keys", "revoke", key, "-c", str(cfg))
    assert r.returncode == 0 and digest[:12] in r.stdout
    assert redis_server.command("GET", f"failgate:apikey:{digest}") == b"$-1\r\n"
    r = failgate("keys", "revoke", digest, "-c", str(cfg))
    assert r.returncode == 1 and f"no key with hash {digest[:12]}" in r.stderr


def test_keys_cli_explains_memory_and_unreachable_stores(tmp_path: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(config_text("http://127.0.0.1:1", "- {name: x, match: {path: /}, upstream: api}\n"))
    r = failgate("keys", "list", "-c", str(cfg))
    assert r.returncode == 1 and "memory://, which lives inside the running proxy process" in r.stderr
    from tests.helpers import free_port

    cfg.write_text(config_text("http://127.0.0.1:1", "- {name: x, match: {path: /}, upstream: api}\n",
                               extra=store(f"redis://:sekret@127.0.0.1:{free_port()}/0")))
    r = failgate("keys", "add", "--principal", "x", "-c", str(cfg))
    assert r.returncode == 1
    assert "cannot use the store at redis://:***@127.0.0.1:" in r.stderr and "sekret" not in r.stderr
    assert "Traceback" not in r.stderr


async def test_no_key_material_in_logs_metrics_or_config(upstream: Upstream, redis_server: RedisServer,
                                                         tmp_path: Path) -> None:
    key = new_key(redis_server.url, "lee", ["payments:write"])
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, ROUTES, extra=store(redis_server.url) + "access_log: true\n"))
    p = ProxyProcess(cfg, "-v").start()
    try:
        await p.wait_ready()
        for k in (key, "wrong-guess-key-material"):
            await raw_request(p.port, "/pay", headers={"Authorization": f"Bearer {k}"})
        import aiohttp

        async with aiohttp.ClientSession() as s:
            for path in ("/metrics", "/config"):
                async with s.get(p.admin + path) as r:
                    text = await r.text()
                    assert key not in text and "wrong-guess-key-material" not in text
    finally:
        p.stop()
    log = p.log()
    assert '"status":200' in log and '"status":401' in log  # the access log did run
    assert key not in log and "wrong-guess-key-material" not in log
    assert hashlib.sha256(key.encode()).hexdigest() not in log


async def test_each_round_trip_of_a_principal_limit_has_its_own_store_timeout(upstream: Upstream,
                                                                              redis_server: RedisServer,
                                                                              fault_proxy) -> None:  # type: ignore
    key = new_key(redis_server.url, "pat", [])
    routes = auth_route("api", "{type: api_key, on_store_error: closed}",
                        "{limit: 100, per: 1m, key: principal, on_store_error: open}")
    extra = f"store: {{url: '{fault_proxy.url}', timeout: 400ms, connect_timeout: 1s, breaker: {{failures: 100}}}}\n"
    async with InProcessProxy(config_text(upstream.url, routes, extra=extra)) as p:
        assert (await raw_request(p.port, "/api", headers={"Authorization": key})).status == 200
        fault_proxy.set("delay_replies", 0.25)  # each round trip now takes 250 ms: within 400 each, 500 together
        r = await raw_request(p.port, "/api", headers={"Authorization": key})
        assert (r.status, r.headers.get("failgate-degraded")) == (200, None)
        assert r.headers["ratelimit"].startswith('"api";r=98;')  # the second trip was answered: counted
        assert seen_header(upstream, "X-Failgate-Principal") == ["pat"]
        fault_proxy.set("delay_replies", 0.5)  # past store.timeout: the first trip (auth, closed) fails
        r = await raw_request(p.port, "/api", headers={"Authorization": key})
        assert (r.status, r.headers["failgate-degraded"]) == (503, "auth;mode=closed;reason=timeout")


async def test_a_checked_request_leaves_nothing_for_the_garbage_collector(upstream: Upstream,
                                                                          redis_server: RedisServer) -> None:
    # What a request allocates is freed when the request ends, by reference counting: a reference cycle made per
    # request is work for the collector on every request (and was found in the store client once).
    key = new_key(redis_server.url, "alice", [])
    routes = auth_route("arl", "{type: api_key, scheme: Bearer, on_store_error: closed}",
                        "{limit: 1000000, per: 1m, key: client_ip, on_store_error: open}")
    async with InProcessProxy(config_text(upstream.url, routes, extra=store(redis_server.url))) as p:
        await raw_request(p.port, "/arl", headers={"Authorization": f"Bearer {key}"})
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage instead of freed
        try:
            for _ in range(20):
                r = await raw_request(p.port, "/arl", headers={"Authorization": f"Bearer {key}"})
                assert r.status == 200
            gc.collect()
            ours = sorted({type(o).__qualname__ for o in gc.garbage
                           if (type(o).__module__ or "").startswith("proxy")})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert ours == []

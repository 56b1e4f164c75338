"""JWT auth through the real proxy, against a real JWKS endpoint (aiohttp, keys made with `cryptography`): every
token rule, key rotation, and the identity provider failing in every way, for a route in each fail mode."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.helpers import InProcessProxy, ProxyProcess, RawResponse, Upstream, config_text, raw_request, until
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, Key


def route(idp: JwksServer, mode: str = "stale", *, name: str = "pay", refresh: str = "10m", extra: str = "",
          stale_for: str = "1h") -> str:
    stale = f"stale_for: {stale_for}, stale_fallback: closed, " if mode == "stale" else ""
    return (f"- name: {name}\n  match: {{path: /{name}}}\n  upstream: api\n"
            f"  auth: {{type: jwt, jwks_url: '{idp.url}', issuer: '{ISSUER}', audiences: [{AUDIENCE}], "
            f"algorithms: [RS256, ES256], scopes: [payments:write], plan_claim: plan, jwks_refresh: {refresh}, "
            f"jwks_timeout: 300ms, jwks_startup_wait: 2s, {stale}{extra}on_store_error: {mode}}}\n")


@pytest.fixture
async def idp() -> AsyncIterator[JwksServer]:
    server = await JwksServer().start()
    yield server
    await server.stop()


async def call(p: InProcessProxy | ProxyProcess, token: str, path: str = "/pay") -> RawResponse:
    return await raw_request(p.port, path, headers={"Authorization": f"Bearer {token}"})




def forged_hs256(key: Key) -> str:
    """The classic algorithm confusion: HS256 signed with the RSA public key (PEM) as the HMAC secret."""
    pem = key.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    import hashlib
    import hmac

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    body = b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "eve", "scope": "payments:write",
                           "exp": int(time.time()) + 600}).encode())
    sig = b64(hmac.new(pem, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


def alg_none(key: Key) -> str:
    head = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": key.kid}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "eve",
                                                "scope": "payments:write", "exp": int(time.time()) + 600})
                                    .encode()).rstrip(b"=")
    return (head + b"." + body + b".").decode()


async def test_every_token_rule(upstream: Upstream, idp: JwksServer) -> None:
    rsa, ec = idp.keys
    async with InProcessProxy(config_text(upstream.url, route(idp))) as p:
        for key in (rsa, ec):
            r = await call(p, key.token(plan="pro"))
            assert (r.status, r.headers.get("failgate-degraded")) == (200, None), r.body
            headers = dict(upstream.seen[-1]["headers"])
            assert (headers["X-Failgate-Principal"], headers["X-Failgate-Scopes"],
                    headers["X-Failgate-Plan"]) == ("ann", "payments:write", "pro")
        refused = {
            "expired": rsa.token(exp=time.time() - 120),
            "not yet valid": rsa.token(nbf=int(time.time()) + 600),
            "wrong issuer": rsa.token(iss="https://evil.test/"),
            "wrong audience": rsa.token(aud="other-api"),
            "alg none": alg_none(rsa),
            "HS256 with the public key as secret": forged_hs256(rsa),
            "unknown kid": rsa.token(kid="nobody"),
            "garbage": "not.a.token",
            "20 KB": rsa.token(padding="x" * 20_000),
            "signed by another key": Key("rsa-1", "RS256").token(),
        }
        for what, token in refused.items():
            r = await call(p, token)
            assert r.status == 401, what
            assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"', what
        r = await call(p, rsa.token(scope="reports"))
        assert (r.status, r.json()["error"]) == (403, "forbidden")
        r = await raw_request(p.port, "/pay")
        assert r.headers["www-authenticate"] == 'Bearer realm="failgate"' and r.status == 401


async def test_key_rotation_is_picked_up_on_refresh_and_on_an_unknown_kid(upstream: Upstream,
                                                                          idp: JwksServer) -> None:
    old = idp.keys[0]
    async with InProcessProxy(config_text(upstream.url, route(idp, refresh="1s", extra=""))) as p:
        assert (await call(p, old.token())).status == 200
        new = Key("rsa-2", "RS256")
        idp.keys = [new, idp.keys[1]]  # rotated: a new key published, the old one removed
        fetches = idp.fetches
        assert (await call(p, new.token())).status in (200, 401)  # an unknown kid asks for a refetch at once

        async def new_key_works() -> bool:
            return (await call(p, new.token())).status == 200

        await until("the new key verifies", new_key_works, timeout=5)
        assert idp.fetches > fetches

        async def old_key_refused() -> bool:
            return (await call(p, old.token())).status == 401

        await until("a token of the removed key is refused", old_key_refused, timeout=5)


async def test_a_remembered_token_is_refused_once_it_expires_or_its_key_is_gone(upstream: Upstream,
                                                                               idp: JwksServer) -> None:
    """A route keeps each header value's token hash and the verified tokens' identities: a token it has seen
    must still be refused once it expires, or once the key set no longer has its key."""
    rsa, ec = idp.keys
    async with InProcessProxy(config_text(upstream.url, route(idp, refresh="1s", extra="leeway: 0s, "))) as p:
        brief, steady = rsa.token(exp=time.time() + 2), ec.token()
        for value in (f"Bearer {steady}", f"bearer   {steady}", f"Bearer {brief}", f"Bearer {brief}"):
            r = await raw_request(p.port, "/pay", headers={"Authorization": value})
            assert r.status == 200, value

        async def refused(token: str) -> bool:
            return (await call(p, token)).status == 401

        await until("the expired token is refused", lambda: refused(brief), timeout=10)
        assert (await call(p, steady)).status == 200
        idp.keys = [rsa]  # the EC key removed from the set
        await until("a token of the removed key is refused", lambda: refused(steady), timeout=10)


QUICK = {("stale", "refuse"), ("closed", "hang"), ("open", "error"), ("stale", "garbage")}


@pytest.mark.parametrize(("mode", "failure"), [
    pytest.param(mode, failure, marks=() if (mode, failure) in QUICK else (pytest.mark.slow,))
    for mode in ("stale", "closed", "open") for failure in ("refuse", "hang", "error", "garbage")])
async def test_the_identity_provider_failing(upstream: Upstream, idp: JwksServer, mode: str, failure: str) -> None:
    log = io.StringIO()
    text = config_text(upstream.url, route(idp, mode, refresh="1s"))
    async with InProcessProxy(text, log_stream=log) as p:
        token = idp.keys[0].token()
        assert (await call(p, token)).status == 200
        if failure == "refuse":
            await idp.stop()
        else:
            idp.mode = failure
        reason = {"refuse": "unavailable", "hang": "timeout", "error": "error", "garbage": "error"}[failure]

        async def degraded() -> bool:
            return "failgate-degraded" in (await call(p, token)).headers

        await until("the key set is no longer fresh", degraded)  # after 2 x jwks_refresh
        rs = await asyncio.gather(*(call(p, token) for _ in range(20)))  # under some load
        tags = {r.headers["failgate-degraded"].rsplit(";age=", 1)[0] for r in rs}
        if mode == "stale":
            assert {r.status for r in rs} == {200} and tags == {f"auth;mode=stale;reason={reason}"}
            assert all(float(r.headers["failgate-degraded"].rsplit("age=", 1)[1]) >= 2 for r in rs)
            assert (await call(p, idp.keys[0].token(exp=1))).status == 401  # a token's own validity still holds
        elif mode == "closed":
            assert {r.status for r in rs} == {503} and tags == {f"auth;mode=closed;reason={reason}"}
        else:
            assert {r.status for r in rs} == {200} and tags == {f"auth;mode=open;reason={reason}"}
            assert (await call(p, "garbage")).status == 401  # open verifies with what it holds
        assert dict(upstream.seen[-1]["headers"]).get("Failgate-Degraded") if mode != "closed" else True
    lines = [json.loads(x) for x in log.getvalue().splitlines() if x.startswith("{")]
    assert any(x.get("check") == "auth" and x.get("basis") == mode and x.get("reason") == reason for x in lines)


async def test_the_identity_provider_down_at_start_serves_the_fallback_after_the_wait(
        upstream: Upstream, idp: JwksServer) -> None:
    await idp.stop()
    started = time.monotonic()
    async with InProcessProxy(config_text(upstream.url, route(idp))) as p:
        assert time.monotonic() - started < 10  # ready after jwks_startup_wait (2s), not blocked
        r = await call(p, idp.keys[0].token())
        assert (r.status, r.headers["failgate-degraded"]) == (503, "auth;mode=stale;reason=unavailable;"
                                                                     "fallback=closed")


async def test_random_kids_cannot_hammer_the_idp_nor_age_the_set(upstream: Upstream, idp: JwksServer,
                                                                tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, route(idp), extra="workers: 2\nstore: {url: 'redis://127.0.0.1:1/0'}\n"))
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready(workers=2)
        token = idp.keys[0].token()
        assert (await call(p, token)).status == 200
        before = idp.fetches
        flood = [idp.keys[0].token(kid=os.urandom(8).hex()) for _ in range(200)]
        rs = await asyncio.gather(*(call(p, t) for t in flood))
        assert {r.status for r in rs} == {401}

        async def refetched() -> bool:  # the one refetch they may ask for has been made and answered
            return idp.fetches > before and await fetches_reported(p) == idp.fetches

        await until("the flood's refetch is done", refetched)
        assert idp.fetches - before <= 1
        r = await call(p, token)
        assert (r.status, r.headers.get("failgate-degraded")) == (200, None)  # the set is as fresh as before
    finally:
        p.stop()


async def fetches_reported(p: ProxyProcess) -> int:
    """Key-set fetches the instance counted (all results), from its metrics."""
    import re

    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(p.admin + "/metrics") as r:
        text = await r.text()
    return int(sum(float(m[1]) for m in re.finditer(r'^failgate_jwks_fetches_total\{[^}]*\} (\S+)', text, re.M)))


async def test_a_restart_while_the_idp_is_down_verifies_with_the_saved_set(upstream: Upstream, idp: JwksServer,
                                                                          tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, route(idp, refresh="1s", stale_for="4s")))
    state = tmp_path / "state"
    p = ProxyProcess(cfg, "--state-dir", str(state)).start()
    try:
        await p.wait_ready()
        assert (await call(p, idp.keys[0].token())).status == 200
    finally:
        p.stop()
    assert any(f.name.startswith("jwks-") for f in state.iterdir())
    await idp.stop()
    # Age the saved set past 2 x jwks_refresh but within stale_for: it must be served as stale.
    (saved,) = [f for f in state.iterdir() if f.name.startswith("jwks-")]
    doc = json.loads(saved.read_text())
    saved.write_text(json.dumps({**doc, "fetched_at": doc["fetched_at"] - 2.2}))
    p = ProxyProcess(cfg, "--state-dir", str(state), port=p.port, admin_port=p.admin_port).start()
    try:
        await p.wait_ready()
        r = await call(p, idp.keys[0].token())
        assert r.status == 200
        tag = r.headers["failgate-degraded"]
        assert tag.startswith("auth;mode=stale;reason=unavailable;age=") and int(tag.rsplit("=", 1)[1]) >= 2

        async def fallback() -> bool:  # past stale_for (4 s after the original fetch): the fallback
            return (await call(p, idp.keys[0].token())).status == 503

        await until("stale_for has passed", fallback)
        r = await call(p, idp.keys[0].token())
        assert r.headers["failgate-degraded"] == "auth;mode=stale;reason=unavailable;fallback=closed"
    finally:
        p.stop()


def test_check_explains_a_jwt_route_and_warns_about_open(idp_url: str = "https://idp.test/jwks.json") -> None:
    from proxy.checkcmd import describe
    from proxy.config import load_text

    class Fake:
        url = idp_url

    text = config_text("http://127.0.0.1:9", route(Fake(), "open"))  # type: ignore[arg-type]
    out = describe(load_text(text, "jwt.yaml"))
    assert (f"auth: jwt (RS256,ES256) in Authorization Bearer, keys from {idp_url} (refreshed every 10m); issuer "
            f"{ISSUER}, audiences {AUDIENCE}; scopes payments:write on_store_error open (declared) for the key "
            "set") in out
    assert "on_store_error open keeps verifying with whatever key set is held" in out


async def test_key_set_metrics(upstream: Upstream, idp: JwksServer) -> None:
    from proxy.observe.metrics import REGISTRY

    async with InProcessProxy(config_text(upstream.url, route(idp, name="metered"))) as p:
        assert (await call(p, idp.keys[0].token(), "/metered")).status == 200
        ok = REGISTRY.get_sample_value("failgate_jwks_fetches_total", {"route": "metered", "result": "ok"})
        age = REGISTRY.get_sample_value("failgate_jwks_age_seconds", {"route": "metered"})
        assert ok is not None and ok >= 1 and age is not None and 0 <= age < 60
        assert REGISTRY.get_sample_value("failgate_breaker_state", {"dependency": "jwks:127.0.0.1"}) == 0

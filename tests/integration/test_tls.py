"""TLS: the HTTPS listener, and upstream certificates verified unless `tls_verify: false`."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.certs import CA
from tests.helpers import InProcessProxy, ProxyProcess, Upstream, config_text, free_port, raw_request

ALL = "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n"


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path)


async def test_https_listener(upstream: Upstream, ca: CA, tmp_path: Path) -> None:
    leaf = ca.issue("proxy")
    cfg = tmp_path / "f.yaml"
    port = free_port()
    text = config_text(upstream.url, ALL, port=port)
    cfg.write_text(text.replace(f"listen: {{host: 127.0.0.1, port: {port}}}",
                                f"listen: {{host: 127.0.0.1, port: {port}, tls: {{cert: {leaf.cert}, "
                                f"key: {leaf.key}}}}}"))
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready()
        trusted = ssl.create_default_context(cafile=str(ca.cert))
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://127.0.0.1:{port}/x", ssl=trusted) as r:
                assert r.status == 200
            seen = [v for k, v in upstream.seen[-1]["headers"] if k == "X-Forwarded-Proto"]
            assert seen == ["https"]
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with s.get(f"https://127.0.0.1:{port}/x"):  # the system CAs don't know ours
                    pass
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://127.0.0.1:{port}/x"):  # plain HTTP on the TLS port
                    pass
    finally:
        assert p.stop() == 0


async def _tls_upstream(leaf_cert: Path, leaf_key: Path) -> tuple[web.AppRunner, int]:
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="secure hello")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(leaf_cert), str(leaf_key))
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    return runner, port


@pytest.mark.parametrize(
    ("san", "tls_verify", "trust_ca", "status", "host"),
    [
        ("DNS:localhost,IP:127.0.0.1", True, True, 200, "127.0.0.1"),   # a certificate we trust: verified and used
        ("DNS:localhost,IP:127.0.0.1", True, False, 502, "127.0.0.1"),  # an unknown CA: refused
        ("DNS:elsewhere.example", True, True, 502, "127.0.0.1"),        # the wrong name: refused
        ("DNS:elsewhere.example", False, False, 200, "127.0.0.1"),      # tls_verify: false accepts anything
        ("DNS:localhost", True, True, 200, "localhost"),     # a target by name: the name is what is verified
        ("DNS:elsewhere.example", True, True, 502, "localhost"),
    ],
)
async def test_upstream_certificates_are_verified(ca: CA, tmp_path: Path, san: str, tls_verify: bool,
                                                  trust_ca: bool, status: int, host: str,
                                                  monkeypatch) -> None:  # type: ignore
    leaf = ca.issue("upstream", san)
    runner, up_port = await _tls_upstream(leaf.cert, leaf.key)
    try:
        cfg = tmp_path / "f.yaml"
        cfg.write_text(config_text(f"https://{host}:{up_port}", ALL,
                                   upstream_extra=f"tls_verify: {'true' if tls_verify else 'false'}\n"))
        if trust_ca:
            monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert))  # OpenSSL's default trust store, for the proxy
        p = ProxyProcess(cfg).start()
        try:
            await p.wait_ready()
            async with aiohttp.ClientSession() as s, s.get(p.url + "/x") as r:
                assert r.status == status
                if status == 200:
                    assert await r.text() == "secure hello"
                else:
                    assert (await r.json())["error"] == "upstream_unavailable"
        finally:
            assert p.stop() == 0
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("trust_ca", "status"), [(True, 200), (False, 503)])
async def test_an_authorizer_over_https_is_verified(ca: CA, upstream: Upstream, trust_ca: bool, status: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    leaf = ca.issue("authorizer", "DNS:localhost")
    runner, authz_port = await _tls_upstream(leaf.cert, leaf.key)  # answers 200 to any GET: it allows
    try:
        if trust_ca:
            monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert))
        routes = (f"- name: app\n  match: {{path: /app, prefix: true}}\n  upstream: api\n"
                  f"  auth: {{type: http, url: 'https://localhost:{authz_port}/check', timeout: 2s, "
                  f"on_store_error: closed}}\n")
        async with InProcessProxy(config_text(upstream.url, routes)) as p:
            r = await raw_request(p.port, "/app/x")
            assert r.status == status  # an authorizer whose certificate is not trusted is one that cannot answer
            if status == 503:
                assert r.headers["failgate-degraded"].startswith("auth;mode=closed;reason=unavailable")
    finally:
        await runner.cleanup()

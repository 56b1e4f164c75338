"""End to end through the real proxy listener to a real aiohttp upstream on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import aiohttp
import pytest
from yarl import URL

from tests.helpers import InProcessProxy, Upstream, config_text, free_port, raw_request

ROUTES = """\
- name: public
  match: {path: /public, prefix: true}
  upstream: api
- name: v1
  match: {path: /api/v1, prefix: true, methods: [GET, POST]}
  upstream: api
  strip_prefix: true
- name: admin
  match: {path: /admin, prefix: true}
  upstream: api
"""


def proxy(upstream: Upstream, routes: str = ROUTES, **kw: str) -> InProcessProxy:
    return InProcessProxy(config_text(upstream.url, routes, **kw))


def header(seen: dict, name: str) -> list[str]:  # type: ignore[type-arg]
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


async def test_request_headers_reach_the_upstream_rewritten(upstream: Upstream) -> None:
    async with proxy(upstream) as p, aiohttp.ClientSession() as s, \
            s.get(URL(p.url + "/public/x?b=2&a=%2F", encoded=True), headers={
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "gopher", "X-Forwarded-Host": "evil",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "must not pass", "Keep-Alive": "timeout=5", "TE": "trailers", "Proxy-Authorization": "x",
            "Failgate-Degraded": "auth;mode=open", "X-Failgate-Principal": "root", "X_Failgate_Scopes": "admin",
            "X-Failgate_Principal": "root", "X-Custom": "kept", "Authorization": "Bearer abc",
            }) as r:
        assert r.status == 200
        rid = r.headers["X-Request-Id"]
    seen = upstream.seen[-1]
    assert seen["raw_path"] == "/public/x?b=2&a=%2F"
    assert header(seen, "X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]
    assert header(seen, "X-Forwarded-Proto") == ["http"]
    assert header(seen, "X-Forwarded-Host") == [f"127.0.0.1:{p.port}"]
    assert header(seen, "Host") == [f"127.0.0.1:{upstream.port}"]
    assert header(seen, "X-Request-Id") == [rid] and len(rid) == 24
    for name in ("X-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "Failgate-Degraded", "X-Failgate-Principal",
                 "X_Failgate_Scopes", "X-Failgate_Principal"):
        assert header(seen, name) == [], name
    assert header(seen, "X-Custom") == ["kept"]
    assert header(seen, "Authorization") == ["Bearer abc"]


async def test_request_id_is_kept_when_safe_and_replaced_when_not(upstream: Upstream) -> None:
    async with proxy(upstream) as p, aiohttp.ClientSession() as s:
        async with s.get(p.url + "/public", headers={"X-Request-Id": "abc-123.x:y"}) as r:
            assert r.headers["X-Request-Id"] == "abc-123.x:y"
        for bad in ("a" * 129, "has space", "<script>"):
            async with s.get(p.url + "/public", headers={"X-Request-Id": bad}) as r:
                assert r.headers["X-Request-Id"] != bad
                assert header(upstream.seen[-1], "X-Request-Id") == [r.headers["X-Request-Id"]]


async def test_response_hop_by_hop_headers_are_dropped(upstream: Upstream) -> None:
    async with proxy(upstream) as p, aiohttp.ClientSession() as s, s.get(p.url + "/public/../hop") as r:
        assert r.status == 404  # /hop is not under /public after normalization
    async with proxy(upstream, "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n") as p, \
            aiohttp.ClientSession() as s, s.get(p.url + "/hop") as r:
        assert r.status == 200 and await r.text() == "hop"
        for name in ("X-Private", "Keep-Alive", "Proxy-Authenticate", "Trailer"):
            assert name not in r.headers, name
        assert r.headers["X-Public"] == "ok"
        assert r.headers["Set-Cookie"] == "session=abc"


async def test_upstream_cookies_are_never_replayed_to_other_clients(upstream: Upstream) -> None:
    async with proxy(upstream, "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n") as p, \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.get(p.url + "/hop") as r:
            assert r.headers["Set-Cookie"] == "session=abc"
        async with s.get(p.url + "/next") as r:
            assert r.status == 200
    assert header(upstream.seen[-1], "Cookie") == []


async def test_strip_prefix_and_normalized_path_reach_the_upstream(upstream: Upstream) -> None:
    async with proxy(upstream) as p:
        cases = [
            ("/api/v1/users?id=7", "/users?id=7"),
            ("/api/v1", "/"),
            ("/api/v1/", "/"),
            ("/api//v1/./a/../b%7e?q=%2e", "/b~?q=%2e"),
            ("/public/%2e/x//y", "/public/x/y"),
        ]
        for target, forwarded in cases:
            r = await raw_request(p.port, target)
            assert r.status == 200, (target, r.status, r.body)
            assert r.json()["raw_path"] == forwarded, target


async def test_a_request_never_reaches_a_route_its_normalized_path_does_not_match(upstream: Upstream) -> None:
    routes = """\
    - name: public
      match: {path: /public, prefix: true}
      upstream: api
    """
    async with proxy(upstream, routes) as p:
        for target in ("/public/../admin", "/public/%2e%2e/admin", "/public/%2E%2E/admin", "/public/x/../../admin"):
            r = await raw_request(p.port, target)
            assert r.status == 404, target
            assert r.json()["error"] == "not_found"
        assert upstream.seen == []


async def test_preserve_host(upstream: Upstream) -> None:
    text = config_text(upstream.url, "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n",
                       upstream_extra="preserve_host: true\n")
    async with InProcessProxy(text) as p:
        r = await raw_request(p.port, "/x", headers={})
        assert r.status == 200
    assert header(upstream.seen[-1], "Host") == [f"127.0.0.1:{p.port}"]


async def test_host_matching_is_case_insensitive_and_ignores_the_port(upstream: Upstream) -> None:
    routes = """\
    - name: api-host
      match: {path: /, prefix: true, host: api.example.com}
      upstream: api
    """
    async with proxy(upstream, routes) as p:
        r = await raw_request(p.port, "/x", headers={})
        assert r.status == 404
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: API.Example.COM:8443\r\nConnection: close\r\n\r\n")
        from tests.helpers import read_response

        resp = await read_response(reader)
        writer.close()
        assert resp.status == 200


async def test_absolute_form_is_matched_by_path_and_sent_to_the_route_upstream(upstream: Upstream) -> None:
    async with proxy(upstream) as p:
        r = await raw_request(p.port, "http://elsewhere.example/api/v1/a/../b?x=1")
        assert r.status == 200
        assert r.json()["raw_path"] == "/b?x=1"
        assert header(upstream.seen[-1], "Host") == [f"127.0.0.1:{upstream.port}"]


@pytest.mark.parametrize(
    "target",
    ["/public/a%2Fb", "/public/a%5cb", "/public/a\\b", "/public/a;b=1", "/public/a%00", "/public/%zz",
     "/public/../../x", "/public/a%0d%0ab"],
)
async def test_unsafe_targets_get_400_and_never_reach_the_upstream(upstream: Upstream, target: str) -> None:
    async with proxy(upstream) as p:
        r = await raw_request(p.port, target)
        assert r.status == 400
        body = r.json()
        assert body["error"] == "bad_request" and body["request_id"] == r.headers["x-request-id"]
        assert "Traceback" not in r.body.decode()
    assert upstream.seen == []


async def test_status_codes_failgate_makes_itself(upstream: Upstream) -> None:
    async with proxy(upstream) as p:
        r = await raw_request(p.port, "/nope")
        assert (r.status, r.json()["error"], r.json()["route"]) == (404, "not_found", None)
        r = await raw_request(p.port, "/api/v1/x", method="DELETE")
        assert (r.status, r.json()["error"], r.headers["allow"]) == (405, "method_not_allowed", "GET, POST")
        r = await raw_request(p.port, "127.0.0.1:443", method="CONNECT")
        assert (r.status, r.json()["error"]) == (405, "method_not_allowed")
        r = await raw_request(p.port, "/public/x", headers={"Connection": "Upgrade", "Upgrade": "h2c"})
        assert (r.status, r.json()["error"], r.json()["route"]) == (501, "not_implemented", "public")
        # a WebSocket handshake without its key and version: refused before the upstream is asked
        r = await raw_request(p.port, "/public/ws", headers={"Connection": "Upgrade", "Upgrade": "websocket"})
        assert (r.status, r.json()["error"], r.json()["route"]) == (400, "bad_request", "public")
    assert upstream.seen == []


async def test_upstream_status_and_body_pass_through(upstream: Upstream) -> None:
    async with proxy(upstream, "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n") as p, \
            aiohttp.ClientSession() as s:
        for status in (201, 302, 404, 500, 503):
            async with s.get(p.url + f"/status/{status}", allow_redirects=False) as r:
                assert r.status == status
                assert await r.text() == "custom"


async def test_upstream_refusing_connections_is_502(upstream: Upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with InProcessProxy(config_text(dead, ROUTES)) as p:
        r = await raw_request(p.port, "/public/x")
        assert (r.status, r.json()["error"], r.json()["route"]) == (502, "upstream_unavailable", "public")


async def test_upstream_connect_timeout_is_502() -> None:
    # A listening socket that never accepts, with its backlog filled: the next SYN is not answered.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    try:
        text = config_text(f"http://127.0.0.1:{port}", ROUTES, upstream_extra="connect_timeout: 300ms\n")
        async with InProcessProxy(text) as p:
            r = await raw_request(p.port, "/public/x")
            assert r.status == 502
            assert r.json()["detail"] == "could not connect to the upstream in time"
    finally:
        for c in fillers:
            c.close()
        blackhole.close()


async def test_upstream_slower_than_timeout_is_504(upstream: Upstream) -> None:
    text = config_text(upstream.url, ROUTES, upstream_extra="timeout: 300ms\n")
    async with InProcessProxy(text) as p:
        r = await raw_request(p.port, "/public/../public/x/../../sleep?s=2".replace("/public/x/../../", "/"))
        assert r.status == 404  # /sleep is not routed: make sure the route table is what we think
        text2 = config_text(upstream.url, "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n",
                            upstream_extra="timeout: 300ms\n")
    async with InProcessProxy(text2) as p:
        r = await raw_request(p.port, "/sleep?s=2")
        assert (r.status, r.json()["error"], r.json()["route"]) == (504, "upstream_timeout", "all")


async def test_idle_upstream_while_streaming_cuts_the_response(upstream: Upstream) -> None:
    text = config_text(upstream.url, "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n",
                       upstream_extra="idle_timeout: 300ms\n")
    async with InProcessProxy(text) as p, aiohttp.ClientSession() as s:
        # A large body streams: its status is sent before the stall, so the stream is cut.
        async with s.get(p.url + "/stall?s=3&bytes=1000000") as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        # A small body is read whole before answering: the stall is still a clean 502.
        async with s.get(p.url + "/stall?s=3&bytes=100") as r:
            assert r.status == 502
            assert (await r.json())["detail"] == "the upstream response was cut short"
        # and the proxy goes on serving
        async with s.get(p.url + "/ok") as r:
            assert r.status == 200


async def test_body_over_max_body_is_413(upstream: Upstream) -> None:
    text = config_text(upstream.url, "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n",
                       extra="limits: {max_body: 1KiB}\n")
    async with InProcessProxy(text) as p:
        r = await raw_request(p.port, "/upload", method="POST", body=b"x" * 1025)
        assert (r.status, r.json()["error"]) == (413, "payload_too_large")
        r = await raw_request(p.port, "/upload", method="POST", body=b"x" * 1024)
        assert r.status == 200 and r.json()["bytes"] == 1024

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(8):
                yield b"y" * 512

        async with aiohttp.ClientSession() as s, s.post(p.url + "/upload", data=chunks()) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "payload_too_large"


async def test_expect_100_continue_is_answered_after_routing(upstream: Upstream) -> None:
    async with proxy(upstream) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        writer.write(b"POST /public/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.startswith(b"HTTP/1.1 100")
        await reader.readline()
        writer.write(b"hello")
        from tests.helpers import read_response

        resp = await read_response(reader)
        writer.close()
        assert resp.status == 200
    assert header(upstream.seen[-1], "Expect") == []


async def test_keep_alive_connections_to_the_upstream_are_reused(upstream: Upstream) -> None:
    async with proxy(upstream) as p, aiohttp.ClientSession() as s:
        for _ in range(20):
            async with s.get(p.url + "/public/x") as r:
                assert r.status == 200
    assert len(upstream.peers) == 20
    assert len(set(upstream.peers)) == 1


async def test_client_disconnect_mid_download_is_quiet(upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    async with proxy(upstream, "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n") as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        writer.write(b"GET /download?bytes=100000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readexactly(100_000)
        writer.transport.abort()
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as s, s.get(p.url + "/download?bytes=10") as r:
            assert r.status == 200 and await r.read() == b"x" * 10
    assert not [rec for rec in caplog.records if rec.levelname in ("ERROR", "CRITICAL")]


async def test_metrics_count_requests_by_route_and_status(upstream: Upstream) -> None:
    from proxy.observe.metrics import REGISTRY

    def value(route: str, status: str) -> float:
        return REGISTRY.get_sample_value("failgate_requests_total", {"route": route, "status": status}) or 0.0

    async with proxy(upstream) as p:
        before_ok, before_404 = value("public", "200"), value("", "404")
        await raw_request(p.port, "/public/a")
        await raw_request(p.port, "/public/b")
        await raw_request(p.port, "/missing")
        assert value("public", "200") - before_ok == 2
        assert value("", "404") - before_404 == 1
        assert (REGISTRY.get_sample_value("failgate_upstream_duration_seconds_count", {"upstream": "api"}) or 0) >= 2


def test_url_building_keeps_the_normalized_path_verbatim() -> None:
    from proxy.targets import Settings, Target

    client = Target(Settings("api", "http://10.0.0.1:8000/base/", 1.0, True))
    assert client.url_for("/a%20b/~?q=%2F") == URL("http://10.0.0.1:8000/base/a%20b/~?q=%2F", encoded=True)
    assert str(client.url_for("/x")) == "http://10.0.0.1:8000/base/x"


async def test_the_access_log_says_what_each_leg_did(upstream: Upstream) -> None:
    import io
    import json

    log = io.StringIO()
    dead = f"http://127.0.0.1:{free_port()}"
    routes = ("- {name: up, match: {path: /upload}, upstream: api}\n"
              "- {name: gone, match: {path: /gone}, upstream: nowhere}\n"
              "- name: limited\n  match: {path: /x}\n  upstream: api\n"
              "  rate_limit: {limit: 100, per: 1m, on_store_error: open}\n")
    text = config_text(upstream.url, routes, extra="access_log: true\n").replace(
        "upstreams:\n", f"upstreams:\n  nowhere: {{url: '{dead}', connect_timeout: 200ms}}\n")
    async with InProcessProxy(text, log_stream=log) as p, aiohttp.ClientSession() as s:
        async with s.post(p.url + "/upload", data=b"z" * 1000) as r:
            body = await r.read()
        async with s.get(p.url + "/gone") as r:
            assert r.status == 502
        async with s.get(p.url + "/x") as r:
            assert r.status == 200
    lines = [json.loads(line) for line in log.getvalue().splitlines() if '"bytes_out"' in line]
    upload, gone, limited = lines
    assert (upload["status"], upload["bytes_in"], upload["bytes_out"]) == (200, 1000, len(body))
    assert (upload["upstream_target"], upload["upstream_status"]) == (upstream.url, 200)
    assert upload["upstream_ms"] > 0 and upload["duration_ms"] >= upload["upstream_ms"]
    assert upload["checks_ms"] == 0 and upload["degraded"] == []
    assert (gone["status"], gone["upstream_target"], gone["upstream_status"], gone["upstream_ms"]) == \
        (502, dead, None, None)
    assert limited["checks_ms"] > 0 and limited["bytes_in"] == 0

"""Hostile input, sent as raw bytes (no HTTP library between the attacker and the proxy to tidy anything up), to
the real proxy as its own process. Each attempt asserts the status, what reached the upstream (an upstream that
records the request head byte for byte), and that the proxy logged no traceback."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import (
    InProcessProxy,
    ProxyProcess,
    RawResponse,
    RawUpstream,
    Upstream,
    config_text,
    free_port,
    read_response,
)

ROUTES = """\
- name: internal
  match: {path: /, prefix: true, host: internal.example.com}
  upstream: api
  rate_limit: {limit: 1000, per: 1m, key: route, on_store_error: open}
- name: keyed
  match: {path: /keyed, prefix: true}
  upstream: api
  auth: {type: api_key, scheme: Bearer, on_store_error: closed}
  rate_limit: {limit: 100, per: 1m, key: "header:Authorization", on_store_error: open}
- name: counted
  match: {path: /counted, prefix: true}
  upstream: api
  rate_limit: {limit: 2, per: 1m, key: "header:Authorization", on_store_error: open}
- name: basic
  match: {path: /basic, prefix: true}
  upstream: secret
- name: all
  match: {path: /, prefix: true}
  upstream: api
"""


@dataclass
class Rig:
    proxy: ProxyProcess
    upstream: RawUpstream

    async def send(self, data: bytes) -> tuple[bytes, RawResponse]:
        """Raw bytes in; the status line and the response out."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.port)
        try:
            writer.write(data)
            await writer.drain()
            status_line = await reader.readuntil(b"\r\n")
            rest = await read_response(_Prefixed(status_line, reader))  # type: ignore[arg-type]
            return status_line.strip(), rest
        finally:
            writer.close()

    async def get(self, target: str, *lines: str, version: str = "1.1") -> tuple[bytes, RawResponse]:
        head = f"GET {target} HTTP/{version}\r\n" + "".join(f"{line}\r\n" for line in lines)
        return await self.send(head.encode("latin-1") + b"Connection: close\r\n\r\n")


class _Prefixed:
    """A reader that yields a line already read, then the rest (so the status line can be kept as sent)."""

    def __init__(self, first: bytes, reader: asyncio.StreamReader) -> None:
        self._first: bytes | None = first
        self._reader = reader

    async def readline(self) -> bytes:
        if self._first is not None:
            line, self._first = self._first, None
            return line
        return await self._reader.readline()

    async def readexactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)

    async def read(self, n: int = -1) -> bytes:
        return await self._reader.read(n)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    up = await RawUpstream().start()
    secret = f"http://user:s3cret@127.0.0.1:{up.port}"
    text = config_text(up.url, ROUTES, extra="limits: {header_timeout: 1s, max_body: 1KiB}\n",
                       upstream_extra="preserve_host: true\n")
    text = text.replace("routes:\n", f"  secret: {{url: '{secret}'}}\nroutes:\n", 1)
    cfg = tmp_path / "failgate.yaml"
    cfg.write_text(text)
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready()
        yield Rig(p, up)
    finally:
        p.stop()
        await up.stop()
    log = p.log()
    assert "Traceback" not in log, log


async def test_one_authority_decides_both_the_route_and_what_the_upstream_is_told(rig: Rig) -> None:
    # absolute-form: its authority wins over Host — for matching *and* for the upstream
    status, r = await rig.get("http://public.example.com/secret", "Host: internal.example.com")
    assert status == b"HTTP/1.1 200 OK"
    assert rig.upstream.header("Host") == ["public.example.com"]  # preserve_host: the one authority
    assert rig.upstream.header("X-Forwarded-Host") == ["public.example.com"]
    assert "ratelimit" not in r.headers  # the catch-all, not the internal route
    status, r = await rig.get("/secret", "Host: internal.example.com")
    assert r.status == 200 and r.headers["ratelimit-policy"] == '"internal";q=1000;w=60'
    assert rig.upstream.header("Host") == ["internal.example.com"]
    # userinfo, a bad host, a trailing dot
    for host in ("x:y@internal.example.com", "internal.example.com@x", "a b", "inter nal.example.com"):
        status, r = await rig.get("/secret", f"Host: {host}")
        assert r.status == 400, host
    seen = len(rig.upstream.heads)
    status, r = await rig.get("/secret", "Host: INTERNAL.example.com.")
    assert r.status == 200 and r.headers["ratelimit-policy"] == '"internal";q=1000;w=60'
    assert rig.upstream.header("Host") == ["internal.example.com"] and len(rig.upstream.heads) == seen + 1
    status, r = await rig.get("http://x:y@internal.example.com/secret", "Host: internal.example.com")
    assert r.status == 400
    status, r = await rig.get("/secret", "Host: internal.example.com", "Host: other.example.com")
    assert r.status == 400
    assert len(rig.upstream.heads) == seen + 1  # none of the refused ones reached the upstream


async def test_legitimate_hosts_keep_working(rig: Rig) -> None:
    _, r = await rig.get("/x", version="1.0")  # HTTP/1.0 without Host: no host, only host-less routes
    assert r.status == 200 and "ratelimit" not in r.headers
    assert rig.upstream.header("Host") == [f"127.0.0.1:{rig.upstream.port}"]
    assert rig.upstream.header("X-Forwarded-Host") == []
    for host, told in (("api_gateway", "api_gateway"), ("internal.example.com:8443", "internal.example.com:8443"),
                       ("internal.example.com:80", "internal.example.com"), ("[::1]:8080", "[::1]:8080"),
                       ("[::1]", "[::1]")):
        _, r = await rig.get("/x", f"Host: {host}")
        assert r.status == 200, host
        assert rig.upstream.header("Host") == [told]
        assert rig.upstream.header("X-Forwarded-Host") == [told]
    _, r = await rig.get("http://internal.example.com:8443/x", "Host: internal.example.com:8443")  # forward proxy
    assert r.status == 200 and r.headers["ratelimit-policy"] == '"internal";q=1000;w=60'
    assert rig.upstream.header("Host") == ["internal.example.com:8443"]


async def test_credential_spelling_does_not_make_a_fresh_bucket(rig: Rig) -> None:
    statuses = []
    for spelling in ("Bearer K1", "bearer K1", "BEARER  K1", "Bearer\tK1 "):
        _, r = await rig.get("/counted", f"Authorization: {spelling}", "Host: t")
        statuses.append(r.status)
    assert statuses == [200, 200, 429, 429]
    remaining = []
    for spelling in ("Bearer K2", "bearer K2", "BEARER  K2"):  # a route with auth: counted as auth reads it
        _, r = await rig.get("/keyed", f"Authorization: {spelling}", "Host: t")
        assert r.status == 503  # memory:// holds no API keys (no epoch marker): auth cannot be checked
        remaining.append(re.search(r"r=(\d+)", r.headers["ratelimit"])[1])  # type: ignore[index]
    assert remaining == ["99", "98", "97"]


async def test_two_credential_headers_are_refused_on_a_route_with_auth(rig: Rig) -> None:
    seen = len(rig.upstream.heads)
    _, r = await rig.get("/keyed", "Authorization: Bearer a", "Authorization: Bearer b", "Host: t")
    assert r.status == 400 and r.json()["error"] == "bad_request"
    _, r = await rig.get("/x", "Authorization: Bearer a", "Authorization: Bearer b", "Host: t")  # no auth there
    assert r.status == 200
    assert len(rig.upstream.heads) == seen + 1


async def test_headers_a_client_could_lie_with_never_reach_the_upstream(rig: Rig) -> None:
    _, r = await rig.get("/x", "Host: t", "Forwarded: for=10.0.0.1;proto=https", "X-Real-IP: 10.0.0.1",
                         "X-Original-URL: /admin", "X-Rewrite-URL: /admin", "X_Forwarded_For: 10.0.0.1",
                         "X-Forwarded-Proto: https", "X-Forwarded-Port: 443", "X-Forwarded-Prefix: /admin",
                         "X_Real_IP: 10.0.0.1", "X-Failgate_Principal: root", "X-Custom: kept")
    assert r.status == 200
    names = {n.lower() for n in rig.upstream.names()}
    for name in ("forwarded", "x-real-ip", "x-original-url", "x-rewrite-url", "x_forwarded_for", "x-forwarded-port",
                 "x-forwarded-prefix", "x_real_ip", "x-failgate_principal"):
        assert name not in names, name
    assert rig.upstream.header("X-Forwarded-Proto") == ["http"]
    assert rig.upstream.header("X-Forwarded-For") == ["127.0.0.1"]
    assert rig.upstream.header("X-Custom") == ["kept"]


async def test_upstream_userinfo_is_basic_auth_never_host(rig: Rig) -> None:
    _, r = await rig.get("/basic", "Host: t", "Authorization: Bearer client-key")
    assert r.status == 200
    assert rig.upstream.header("Host") == [f"127.0.0.1:{rig.upstream.port}"]
    assert rig.upstream.header("Authorization") == ["Basic dXNlcjpzM2NyZXQ="]  # user:s3cret, replacing the client's
    async with aiohttp.ClientSession() as s, s.get(rig.proxy.admin + "/config") as resp:
        text = await resp.text()
    assert "s3cret" not in text and "user:***@" in text


async def test_oversized_input_is_refused_before_any_work(rig: Rig) -> None:
    seen = len(rig.upstream.heads)
    _, r = await rig.get("/" + "a" * 9000, "Host: t")
    assert r.status == 414 and r.json()["error"] == "uri_too_long"
    _, r = await rig.get("/x", "Host: t", *(f"X-H{i}: v" for i in range(101)))
    assert r.status == 431
    _, r = await rig.get("/x", "Host: t", *(f"X-H{i}: {'v' * 1000}" for i in range(40)))  # 40 KB in all
    assert r.status == 431 and r.json()["error"] == "request_header_fields_too_large"
    _, r = await rig.get("/x", "Host: t", "X-Big: " + "v" * 40_000)
    assert r.status == 431
    assert len(rig.upstream.heads) == seen
    _, r = await rig.get("/x", "Host: t", *(f"X-H{i}: {'v' * 300}" for i in range(90)))  # 27 KB: allowed
    assert r.status == 200


async def test_only_http_1_0_and_1_1_are_served(rig: Rig) -> None:
    status, _ = await rig.get("/x", "Host: t", version="2.0")
    assert status.startswith(b"HTTP/1.1 505"), status  # answered in a version the client can read
    for version in ("0.9", "1.2", "3.0"):  # the parser refuses some of these itself: 400 then
        status, _ = await rig.get("/x", "Host: t", version=version)
        assert status.split()[1] in (b"400", b"505"), status


async def test_malformed_requests_get_one_summary_line_and_no_traceback(rig: Rig) -> None:
    for _ in range(20):
        _, r = await rig.send(b"GET /x HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
        assert r.status == 400 and r.json()["error"] == "bad_request"
        assert r.headers["server"] == "failgate"
    deadline = time.monotonic() + 5
    while "malformed requests refused" not in rig.proxy.log():
        assert time.monotonic() < deadline, rig.proxy.log()
        await asyncio.sleep(0.05)
    lines = [line for line in rig.proxy.log().splitlines() if "malformed requests refused" in line]
    assert len(lines) == 1 and "400 x20" in lines[0]
    async with aiohttp.ClientSession() as s, s.get(rig.proxy.admin + "/metrics") as resp:
        assert 'failgate_requests_total{route="",status="400"} 20.0' in await resp.text()


async def test_expect_100_continue_only_after_the_size_check_and_never_to_http_1_0(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    line = await reader.readline()
    assert line.startswith(b"HTTP/1.1 413")  # not 100 first
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.port)
    writer.write(b"POST /x HTTP/1.0\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    await writer.drain()
    writer.write(b"hello")
    line = await reader.readline()
    assert line.startswith(b"HTTP/1.0 200")  # no interim 100 for HTTP/1.0
    writer.close()


async def test_header_timeout_holds_for_a_request_pipelined_behind_one_in_flight(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\nGET /y HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    first = await read_response(reader)
    assert first.status == 200
    started = time.monotonic()
    rest = await asyncio.wait_for(reader.read(), 10)  # the proxy closes the connection: header_timeout is 1s
    assert rest == b""
    assert time.monotonic() - started < 5
    writer.close()


async def test_admin_listener_refuses_cross_site_and_bad_tokens(tmp_path: Path, upstream: Upstream) -> None:
    text = config_text(upstream.url, "- {name: all, match: {path: /}, upstream: api}\n")
    text = re.sub(r"admin: \{host: 127.0.0.1, port: (\d+)\}",
                  r"admin: {host: 127.0.0.1, port: \1, token: t0ken, chaos: true}", text)
    cfg = tmp_path / "f.yaml"
    cfg.write_text(text)
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready()
        async with aiohttp.ClientSession() as s:
            async with s.get(p.admin + "/config") as r:
                assert r.status == 401
            async with s.get(p.admin + "/config", headers={"Authorization": "Bearer t0ken"}) as r:
                assert r.status == 200
            async with s.post(p.admin + "/chaos/store", data='{"fault": "refuse"}',
                              headers={"Authorization": "Bearer t0ken", "Content-Type": "text/plain"}) as r:
                assert r.status == 415
        reader, writer = await asyncio.open_connection("127.0.0.1", p.admin_port)
        writer.write(b"POST /reload HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer \xff\xfe\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert (await read_response(reader)).status == 401
        writer.close()
    finally:
        p.stop()
    assert "Traceback" not in p.log()


async def test_a_client_that_stops_reading_is_cut_after_idle_timeout(upstream: Upstream) -> None:
    text = config_text(upstream.url, "- {name: all, match: {path: /, prefix: true}, upstream: api}\n",
                       upstream_extra="idle_timeout: 1s\n")
    async with InProcessProxy(text) as p:
        socks = []
        for _ in range(5):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", p.port))
            sock.sendall(b"GET /download?bytes=50000000 HTTP/1.1\r\nHost: t\r\n\r\n")
            socks.append(sock)
        # nobody reads; the proxy must give up on each within idle_timeout, not hold it for the whole 50 MB
        deadline = time.monotonic() + 15
        while p.serving._server.active:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the proxy still holds clients that stopped reading"
            await asyncio.sleep(0.1)
        for sock in socks:
            sock.setblocking(False)
            total = 0
            with contextlib.suppress(BlockingIOError, ConnectionError):
                while chunk := sock.recv(1 << 20):
                    total += len(chunk)
            assert total < 50_000_000
            sock.close()


def test_shipped_configs_pass_check_strict_and_fall_through_is_warned(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = {**os.environ, "FAILGATE_ADMIN_TOKEN": "x", "REDIS_URL": "redis://127.0.0.1:6379/0",
           "UPSTREAM_URL": "http://127.0.0.1:8000"}
    files = sorted(str(f) for f in (ROOT / "config").glob("*.yaml")) + sorted(
        str(f) for f in (ROOT / "config" / "examples").glob("*.yaml"))
    done = subprocess.run([sys.executable, "-m", "proxy", "check", "--strict", *files], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    risky = tmp_path / "risky.yaml"
    risky.write_text(config_text("http://127.0.0.1:9", """\
    - name: search
      match: {path: /search, prefix: true, methods: [GET]}
      upstream: api
      rate_limit: {limit: 10, per: 1m, on_store_error: open}
    - {name: rest, match: {path: /, prefix: true}, upstream: api}
    """, port=free_port()))
    done = subprocess.run([sys.executable, "-m", "proxy", "check", "--strict", "-c", str(risky)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert ("routes[0] (search) accepts only GET: HEAD, POST, PUT, PATCH, DELETE, OPTIONS /search fall through to "
            "routes[1] (rest), which has no rate_limit") in done.stdout
    done = subprocess.run([sys.executable, "-m", "proxy", "check", str(risky)], cwd=ROOT, capture_output=True)
    assert done.returncode == 0  # without --strict a warning is only a warning


async def test_ambiguous_framing_is_refused(rig: Rig) -> None:
    seen = len(rig.upstream.heads)
    for framing in (b"Content-Length: 4\r\nContent-Length: 5\r\n",
                    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                    b"Transfer-Encoding: chunked, identity\r\n",
                    b"Transfer-Encoding: xchunked\r\n",
                    b"X-Folded: a\r\n b\r\n"):
        status, _ = await rig.send(b"POST /x HTTP/1.1\r\nHost: t\r\n" + framing +
                                   b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status.split()[1] in (b"400", b"501"), (framing, status)
    assert len(rig.upstream.heads) == seen  # neither the outer request nor the smuggled one went anywhere


async def test_a_compressed_request_body_reaches_the_upstream_as_sent(rig: Rig) -> None:
    # A proxy passes Content-Encoding through: the upstream decodes it. Decoding here and forwarding the plain
    # bytes under `Content-Encoding: gzip` would corrupt the request (and inflate a small body past max_body).
    plain = b'{"q": "' + b"a" * 600 + b'"}'
    packed = gzip.compress(plain)
    for framing in (b"Content-Length: %d\r\n" % len(packed), b"Transfer-Encoding: chunked\r\n"):
        body = packed if framing.startswith(b"Content-Length") else b"%x\r\n%b\r\n0\r\n\r\n" % (len(packed), packed)
        status, _ = await rig.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Encoding: gzip\r\n" + framing +
                                   b"Connection: close\r\n\r\n" + body)
        assert status.split()[1] == b"200", (framing, status)
        assert rig.upstream.header("Content-Encoding") == ["gzip"]
        assert rig.upstream.bodies[-1] == packed


async def test_a_response_without_a_type_is_relayed_without_one(rig: Rig) -> None:
    # aiohttp would label it application/octet-stream; a client that sniffs the type could no longer do so
    for path in ("/plain", "/chunked"):
        status, response = await rig.get(path, "Host: t")
        assert status.split()[1] == b"200", path
        assert response.body == b"ok" and "content-type" not in response.headers, (path, response.headers)

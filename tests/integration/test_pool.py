"""The upstream connection pool (proxy/pool.py) against upstreams that misbehave on purpose: each test scripts what
the upstream does on each connection, as raw bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from multidict import CIMultiDict

import proxy.pool
from tests.helpers import InProcessProxy, Upstream, config_text, free_port, raw_request, until

ALL = "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n"

Script = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """An upstream that runs `script(n, reader, writer)` for its n-th connection (0, 1, …) and keeps each request
    head it read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.port = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self.port = free_port()
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = self.connections
        self.connections += 1
        try:
            await self.script(n, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _proxy(up: Scripted) -> InProcessProxy:
    return InProcessProxy(config_text(up.url, ALL, port=free_port(), admin_port=free_port()))


@pytest.mark.parametrize(("method", "status", "connections"), [("GET", 200, 2), ("PUT", 200, 2), ("POST", 502, 1)])
async def test_a_kept_alive_connection_the_upstream_dropped_is_retried_only_for_an_idempotent_request(
        method: str, status: int, connections: int) -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.head(reader)
        writer.write(OK)
        await writer.drain()
        if n == 0:
            await up.head(reader)  # its keep-alive ran out as the second request arrived: closed, unanswered
            return
        while True:
            await up.head(reader)
            writer.write(OK)

    async with Scripted(script) as up, _proxy(up) as p:
        assert (await raw_request(p.port, "/first")).status == 200
        r = await raw_request(p.port, "/second", method=method)
        assert r.status == status
        assert up.connections == connections
        if status == 200:
            assert r.body == b"ok"
            assert up.heads[-1].startswith(f"{method} /second ".encode())


async def test_interim_responses_are_skipped_and_a_response_without_length_runs_to_the_end() -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.head(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\nX-Answer: final\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")
        await writer.drain()

    async with Scripted(script) as up, _proxy(up) as p:
        r = await raw_request(p.port, "/x")
        assert (r.status, r.headers.get("x-answer"), r.body) == (200, "final", b"part one, part two")
        assert "link" not in r.headers  # the interim response's fields are not the answer's
        r = await raw_request(p.port, "/y")  # the connection ended with that body: a new one is made
        assert r.status == 200 and up.connections == 2


async def test_an_upstream_that_answers_before_the_streamed_body_is_sent_is_heard() -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.head(reader)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo much")
        await writer.drain()

    async with Scripted(script) as up, _proxy(up) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfirs\r\n")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.startswith(b"HTTP/1.1 413 ")
        assert b"chunked" in up.heads[0].lower()  # the body was on its way, streamed
        writer.close()


async def test_a_bodiless_post_says_so_and_a_get_does_not() -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await up.head(reader)
            writer.write(OK)

    async with Scripted(script) as up, _proxy(up) as p:
        assert (await raw_request(p.port, "/a", method="POST")).status == 200
        assert (await raw_request(p.port, "/b")).status == 200
        assert b"\r\ncontent-length: 0\r\n" in up.heads[0].lower()
        assert b"content-length" not in up.heads[1].lower()
        assert up.connections == 1  # kept alive between them


async def test_an_idle_connection_is_not_reused_past_its_time(monkeypatch: pytest.MonkeyPatch) -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await up.head(reader)
            writer.write(OK)

    async with Scripted(script) as up, _proxy(up) as p:
        assert (await raw_request(p.port, "/a")).status == 200
        assert (await raw_request(p.port, "/b")).status == 200
        assert up.connections == 1
        monkeypatch.setattr(proxy.pool, "IDLE_FOR", 0.0)
        assert (await raw_request(p.port, "/c")).status == 200
        assert up.connections == 2
        [target] = p.serving.runtime.targets.values()
        pool = target.pool
        await until("the idle connection it replaced is closed", lambda: len(pool.open) == 1)


async def test_a_response_that_is_not_http_is_a_502_and_its_connection_is_not_reused() -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.head(reader)
        if n == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nine\r\n\r\nok")
            await writer.drain()
            await reader.read()  # it would keep the connection open: the proxy must close it
            return
        writer.write(OK)

    async with Scripted(script) as up, _proxy(up) as p:
        r = await raw_request(p.port, "/bad")
        assert r.status == 502
        assert (await raw_request(p.port, "/good")).status == 200
        assert up.connections == 2


async def test_a_response_finished_after_its_pool_closed_does_not_keep_its_connection() -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await up.head(reader)
            writer.write(OK)

    async with Scripted(script) as up:
        pool = proxy.pool.Pool("127.0.0.1", up.port, None, 5.0)
        r = await pool.request("GET", "/x", CIMultiDict(Host="a"), None)
        await pool.close()  # a reload retired this target while the response was in flight
        assert await r.read() == b"ok"
        await until("its connection is closed", lambda: not pool.open)
        assert not pool.idle


async def test_no_connection_is_left_open_outside_the_pool_after_clients_walk_away(upstream: Upstream) -> None:
    size = 4_000_000

    async def download(p: InProcessProxy, whole: bool) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        writer.write(f"GET /download?bytes={size} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        await writer.drain()
        got = 0
        while chunk := await reader.read(1 << 16):
            got += len(chunk)
            if not whole and got > 100_000:
                break  # walks away mid-body
            if got >= size:
                break
        writer.close()
        return got

    async with InProcessProxy(config_text(upstream.url, ALL, port=free_port(), admin_port=free_port())) as p:
        results = await asyncio.gather(*[download(p, whole=i % 2 == 0) for i in range(20)],
                                       *[raw_request(p.port, "/small") for _ in range(20)])
        assert all(got > size for got in results[:20:2])  # (with the response head)
        assert all(r.status == 200 for r in results[20:])
        [target] = p.serving.runtime.targets.values()
        pool = target.pool
        # Every connection is either idle in the pool (its exchange complete) or closed.
        await until("only pooled connections stay open", lambda: len(pool.open) == len(pool.idle))
        assert 1 <= len(pool.idle) <= 40
        assert (await raw_request(p.port, "/after")).status == 200


async def test_a_burst_of_new_connections_to_a_named_target_resolves_the_name_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await up.head(reader)
            writer.write(OK)

    loop = asyncio.get_running_loop()
    resolved = []
    original = loop.getaddrinfo

    async def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        resolved.append(args[0])
        return await original(*args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    async with Scripted(script) as up:
        pool = proxy.pool.Pool("localhost", up.port, None, 5.0)
        try:
            responses = await asyncio.gather(*[pool.request("GET", f"/{i}", CIMultiDict(Host="a"), None)
                                               for i in range(20)])
            assert [await r.read() for r in responses] == [b"ok"] * 20
            assert up.connections == 20 and resolved == ["localhost"]  # 20 connections, one resolution
            for r in await asyncio.gather(*[pool.request("GET", "/more", CIMultiDict(Host="a"), None)
                                            for _ in range(25)]):
                await r.read()
            assert up.connections == 25 and resolved == ["localhost"]  # 5 more connections, the name remembered
            monkeypatch.setattr(proxy.pool, "RESOLVED_FOR", 0.0)
            for r in await asyncio.gather(*[pool.request("GET", "/again", CIMultiDict(Host="a"), None)
                                            for _ in range(30)]):
                await r.read()
            assert up.connections == 30 and resolved == ["localhost"] * 2  # expired: resolved again
        finally:
            await pool.close()


async def test_idle_connections_are_closed_without_further_traffic(monkeypatch: pytest.MonkeyPatch) -> None:
    async def script(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await up.head(reader)
            writer.write(OK)

    monkeypatch.setattr(proxy.pool, "IDLE_FOR", 0.3)
    async with Scripted(script) as up:
        pool = proxy.pool.Pool("127.0.0.1", up.port, None, 5.0)
        try:
            for r in await asyncio.gather(*[pool.request("GET", "/", CIMultiDict(Host="a"), None) for _ in range(5)]):
                await r.read()
            assert len(pool.idle) == 5
            await until("the idle connections are closed, with no request to notice", lambda: not pool.open)
            assert not pool.idle
            r = await pool.request("GET", "/later", CIMultiDict(Host="a"), None)
            assert await r.read() == b"ok" and up.connections == 6
        finally:
            await pool.close()

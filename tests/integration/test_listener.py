"""Slow clients cannot starve others: limits.header_timeout and limits.max_connections."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.helpers import InProcessProxy, Upstream, config_text, read_response

ALL = "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n"


async def test_slow_header_client_is_cut_off_while_others_are_served(upstream: Upstream) -> None:
    text = config_text(upstream.url, ALL, extra="limits: {header_timeout: 500ms}\n")
    async with InProcessProxy(text) as p:
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", p.port)
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", p.port)
        slow_w.write(b"GET /x HTTP/1.1\r\nHost: ")
        await slow_w.drain()
        served = 0
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.get(p.url + "/ok") as r:
                    assert r.status == 200
                    served += 1
                await asyncio.sleep(0.05)
        # Both the client dribbling its headers and the one that never sent anything are disconnected.
        assert await asyncio.wait_for(slow_r.read(), 3) == b""
        assert await asyncio.wait_for(silent_r.read(), 3) == b""
        slow_w.close()
        silent_w.close()
        assert served == 5


async def test_idle_keep_alive_between_requests_is_not_a_slow_header(upstream: Upstream) -> None:
    text = config_text(upstream.url, ALL, extra="limits: {header_timeout: 300ms}\n")
    async with InProcessProxy(text) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        for _ in range(2):
            writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = await asyncio.wait_for(read_response(reader), 5)
            assert resp.status == 200
            await asyncio.sleep(0.6)  # idle longer than header_timeout, but no request has started
        writer.close()


async def test_a_request_body_slower_than_header_timeout_is_not_cut(upstream: Upstream) -> None:
    text = config_text(upstream.url, ALL, extra="limits: {header_timeout: 300ms}\n")
    async with InProcessProxy(text) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
        await asyncio.sleep(0.6)
        writer.write(b"def")
        resp = await asyncio.wait_for(read_response(reader), 5)
        assert resp.status == 200 and resp.json()["bytes"] == 6
        writer.close()


async def test_connections_beyond_max_connections_are_closed(upstream: Upstream) -> None:
    text = config_text(upstream.url, ALL, extra="limits: {max_connections: 2}\n")
    async with InProcessProxy(text) as p:
        held = [await asyncio.open_connection("127.0.0.1", p.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        r3, w3 = await asyncio.open_connection("127.0.0.1", p.port)
        w3.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            data = await asyncio.wait_for(r3.read(), 3)
        except ConnectionResetError:
            data = b""
        assert data == b""
        w3.close()
        # the held connections still work, and once one closes a new one is accepted
        r1, w1 = held[0]
        w1.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(read_response(r1), 5)).status == 200
        held[1][1].close()
        await asyncio.sleep(0.1)
        r4, w4 = await asyncio.open_connection("127.0.0.1", p.port)
        w4.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(read_response(r4), 5)).status == 200
        w1.close()
        w4.close()

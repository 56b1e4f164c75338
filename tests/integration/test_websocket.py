"""WebSocket through the checks: a real aiohttp WebSocket upstream, aiohttp's `ws_connect` as the client, the real
proxy (in-process, or as a process for SIGTERM and memory)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from benchmarks.ports import free_port
from proxy.config import load_text
from proxy.keys import add
from proxy.observe.metrics import REGISTRY
from tests.helpers import InProcessProxy, ProxyProcess, config_text, until
from tests.redis_server import RedisServer


class WsUpstream:
    """A WebSocket server that records each handshake: /echo echoes; /close?code=N closes with N after the first
    message; /proto takes subprotocol v2 only; /refuse answers 403; /vanish drops the connection at the first
    message; /flood?n=N&size=S sends N messages as fast as the connection takes them (counting what it sent)."""

    def __init__(self) -> None:
        self.port = 0
        self.handshakes: list[dict[str, Any]] = []
        self.closed: list[int | None] = []
        self.sent = 0
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> WsUpstream:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append({"path_qs": request.path_qs, "headers": dict(request.headers)})
        if request.path.endswith("/refuse"):
            return web.Response(status=403, text="not you")
        ws = web.WebSocketResponse(protocols=("v2",) if request.path.endswith("/proto") else (),
                                   max_msg_size=8 << 20)
        await ws.prepare(request)
        if request.path.endswith("/flood"):
            chunk = b"f" * int(request.query["size"])
            with contextlib.suppress(ConnectionError):
                for _ in range(int(request.query["n"])):
                    await ws.send_bytes(chunk)
                    self.sent += len(chunk)
            await ws.close()
            return ws
        close_code = int(request.query["code"]) if request.path.endswith("/close") else None
        async for msg in ws:
            if request.path.endswith("/vanish"):  # the upstream process dies: no close frame, the connection gone
                assert request.transport is not None
                request.transport.abort()
                break
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            if close_code is not None:
                await ws.close(code=close_code, message=b"upstream says bye")
                break
        self.closed.append(ws.close_code)
        return ws


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    up = await WsUpstream().start()
    yield up
    await up.stop()


ROUTES = """\
- name: open
  match: {path: /open, prefix: true}
  upstream: api
- name: keyed
  match: {path: /keyed, prefix: true}
  upstream: api
  auth: {type: api_key, scheme: Bearer, query_param: access_token, on_store_error: closed}
  rate_limit: {limit: 3, per: 1h, key: route, on_store_error: open}
- name: soft
  match: {path: /soft, prefix: true}
  upstream: api
  rate_limit: {limit: 100, per: 1h, key: route, on_store_error: open}
"""


@contextlib.asynccontextmanager
async def proxy(up: WsUpstream, redis: RedisServer, upstream_extra: str = "", extra: str = "", log: Any = None,
                ) -> AsyncIterator[tuple[InProcessProxy, str]]:
    text = config_text(up.url, ROUTES, upstream_extra=upstream_extra,
                       extra=f"store: {{url: '{redis.url}', timeout: 500ms}}\n" + extra)
    text = text.replace("admin: {host: 127.0.0.1, ", "admin: {chaos: true, host: 127.0.0.1, ")  # outage rehearsals
    async with InProcessProxy(text, log_stream=log) as p:
        key, _ = add(p.loaded, "alice", [], None)
        yield p, key


def messages(direction: str) -> float:
    return REGISTRY.get_sample_value("failgate_websocket_messages_total",
                                     {"route": "keyed", "direction": direction}) or 0.0


async def test_messages_both_ways_through_a_checked_handshake(
        ws_upstream: WsUpstream, redis_server: RedisServer) -> None:
    before_up, before_client = messages("to_upstream"), messages("to_client")
    async with proxy(ws_upstream, redis_server) as (p, key), aiohttp.ClientSession() as s:
        async with s.ws_connect(p.url + "/keyed/echo", headers={"Authorization": f"Bearer {key}"},
                                autoping=False, max_msg_size=8 << 20) as ws:
            assert ws._response.headers["RateLimit"].startswith('"keyed";r=2;')  # fields on the 101
            await ws.send_str("hello")
            assert await ws.receive_str() == "hello"
            big = bytes(range(256)) * 4096  # 1 MiB
            await ws.send_bytes(big)
            assert await ws.receive_bytes() == big
            for i in range(10_000):
                await ws.send_str(f"m{i}")
            assert [await ws.receive_str() for _ in range(10_000)] == [f"m{i}" for i in range(10_000)]
            await ws.ping(b"are you there")  # relayed; the upstream answers, its pong comes back
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.PONG, b"are you there")
        hs = ws_upstream.handshakes[-1]
        assert hs["headers"]["X-Failgate-Principal"] == "alice"
        assert "Failgate-Degraded" not in hs["headers"]
        assert messages("to_upstream") - before_up == 10_003  # text, binary, 10,000 texts, the ping
        assert messages("to_client") - before_client == 10_003  # and their echoes, the pong


async def test_handshakes_refused_by_the_checks_never_reach_the_upstream(
        ws_upstream: WsUpstream, redis_server: RedisServer) -> None:
    async with proxy(ws_upstream, redis_server) as (p, key), aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as no_key:
            await s.ws_connect(p.url + "/keyed/echo")
        assert no_key.value.status == 401
        for _ in range(2):  # (the refused handshake counted too: limit 3, key route)
            async with s.ws_connect(p.url + "/keyed/echo", headers={"Authorization": f"Bearer {key}"}):
                pass
        with pytest.raises(aiohttp.WSServerHandshakeError) as limited:
            await s.ws_connect(p.url + "/keyed/echo", headers={"Authorization": f"Bearer {key}"})
        assert limited.value.status == 429
        assert limited.value.headers is not None and limited.value.headers["Retry-After"]
        assert len(ws_upstream.handshakes) == 2


async def test_a_store_outage_on_the_handshake_follows_the_fail_modes(
        ws_upstream: WsUpstream, redis_server: RedisServer) -> None:
    async with proxy(ws_upstream, redis_server) as (p, key), aiohttp.ClientSession() as s:
        assert p.serving.control({"op": "chaos", "fault": "refuse", "for": "30s"})["ok"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as closed:  # auth: closed
            await s.ws_connect(p.url + "/keyed/echo", headers={"Authorization": f"Bearer {key}"})
        assert closed.value.status == 503
        async with s.ws_connect(p.url + "/soft/echo") as ws:  # rate limit: open, tagged on the 101 and upstream
            tag = ws._response.headers["Failgate-Degraded"]
            assert tag.startswith("rate_limit;mode=open;reason=")
            await ws.send_str("through")
            assert await ws.receive_str() == "through"
        assert ws_upstream.handshakes[-1]["headers"]["Failgate-Degraded"] == tag


async def test_the_upstream_refusal_and_subprotocol_are_passed_on(
        ws_upstream: WsUpstream, redis_server: RedisServer) -> None:
    async with proxy(ws_upstream, redis_server) as (p, _), aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(p.url + "/open/refuse")
        assert refused.value.status == 403
        async with s.ws_connect(p.url + "/open/proto", protocols=("v1", "v2")) as ws:
            assert ws.protocol == "v2"  # the upstream's choice
        async with s.ws_connect(p.url + "/open/echo", protocols=("v9",)) as ws:
            assert ws.protocol is None  # the upstream chose none


async def test_close_codes_pass_through_from_either_side(ws_upstream: WsUpstream, redis_server: RedisServer) -> None:
    async with proxy(ws_upstream, redis_server) as (p, _), aiohttp.ClientSession() as s:
        async with s.ws_connect(p.url + "/open/echo") as ws:
            await ws.send_str("x")
            assert await ws.receive_str() == "x"
            await ws.close(code=4001, message=b"client says bye")
        await until("the upstream saw the close", lambda: len(ws_upstream.closed) == 1)
        assert ws_upstream.closed == [4001]
        async with s.ws_connect(p.url + "/open/close?code=4002") as ws:
            await ws.send_str("x")
            assert await ws.receive_str() == "x"
            msg = await ws.receive()
            assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4002, "upstream says bye")


async def test_a_lost_upstream_connection_closes_the_client_with_1014(
        ws_upstream: WsUpstream, redis_server: RedisServer) -> None:
    async with proxy(ws_upstream, redis_server) as (p, _), aiohttp.ClientSession() as s, \
            s.ws_connect(p.url + "/open/vanish") as ws:
        await ws.send_str("x")
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1014)


async def test_a_message_over_the_limit_closes_with_1009(ws_upstream: WsUpstream, redis_server: RedisServer) -> None:
    async with proxy(ws_upstream, redis_server, upstream_extra="websocket_max_message: 1KiB\n") as (p, _), \
            aiohttp.ClientSession() as s, s.ws_connect(p.url + "/open/echo") as ws:
        await ws.send_str("small")
        assert await ws.receive_str() == "small"
        await ws.send_bytes(b"x" * 2000)
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)


async def test_idle_and_maximum_duration_close_with_1001(ws_upstream: WsUpstream, redis_server: RedisServer) -> None:
    async with proxy(ws_upstream, redis_server, upstream_extra="websocket_idle_timeout: 300ms\n") as (p, _), \
            aiohttp.ClientSession() as s, s.ws_connect(p.url + "/open/echo") as ws:
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1001, "the tunnel was idle too long")
    async with proxy(ws_upstream, redis_server, upstream_extra="websocket_max_duration: 600ms\n") as (p, _), \
            aiohttp.ClientSession() as s, s.ws_connect(p.url + "/open/echo") as ws:
        for i in range(1000):  # busy, so never idle: the maximum duration ends it
            await ws.send_str(str(i))
            msg = await ws.receive(timeout=10)
            if msg.type is not WSMsgType.TEXT:
                break
            await asyncio.sleep(0.02)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1001, "the tunnel reached its maximum duration")
        assert 10 < i < 100


async def test_a_tunnel_outlives_the_config_it_was_opened_under(
        ws_upstream: WsUpstream, redis_server: RedisServer) -> None:
    port, admin_port = free_port(), free_port()
    text = config_text(ws_upstream.url, ROUTES, port=port, admin_port=admin_port)
    async with InProcessProxy(text) as p, aiohttp.ClientSession() as s, s.ws_connect(p.url + "/open/echo") as ws:
        old = p.serving.runtime
        await ws.send_str("before")
        assert await ws.receive_str() == "before"
        assert old.active == 0  # an established tunnel does not hold its config's drain
        new_text = config_text(ws_upstream.url, ROUTES, port=port, admin_port=admin_port,
                               upstream_extra="connect_timeout: 2s\n")  # new target pools
        await p.serving.reload(load_text(new_text, "test.yaml"))
        await until("the old config is retired", lambda: not p.serving._retiring)
        assert all(t._pool is None for t in old.targets.values())
        await ws.send_str("after")
        assert await ws.receive_str() == "after"


async def test_the_query_string_credential_stays_out_of_the_upstream_target_and_the_logs(
        ws_upstream: WsUpstream, redis_server: RedisServer) -> None:
    log = io.StringIO()
    async with proxy(ws_upstream, redis_server, extra="access_log: true\n", log=log) as (p, key), \
            aiohttp.ClientSession() as s:
        async with s.ws_connect(p.url + f"/keyed/echo?room=7&access_token={key}&x=1") as ws:
            await ws.send_str("in")
            assert await ws.receive_str() == "in"
        with pytest.raises(aiohttp.WSServerHandshakeError) as wrong:  # a wrong one is refused like a header
            await s.ws_connect(p.url + "/keyed/echo?access_token=wrong-key-0123456789")
        assert wrong.value.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as two:
            await s.ws_connect(p.url + f"/keyed/echo?access_token={key}",
                               headers={"Authorization": f"Bearer {key}"})
        assert two.value.status == 400
    hs = ws_upstream.handshakes[0]
    assert hs["path_qs"] == "/keyed/echo?room=7&x=1"
    assert hs["headers"]["Authorization"] == f"Bearer {key}"  # as auth read it (forward_credentials)
    lines = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
    assert any(line.get("status") == 101 for line in lines)
    assert key not in log.getvalue() and "wrong-key" not in log.getvalue()


async def _proxy_process(tmp_path: Path, up: WsUpstream, extra: str = "") -> ProxyProcess:
    cfg = tmp_path / "failgate.yaml"
    cfg.write_text(config_text(up.url, ROUTES, extra=extra))
    p = ProxyProcess(cfg).start()
    await p.wait_ready()
    return p


async def test_sigterm_closes_open_tunnels_with_1001_after_the_grace(tmp_path: Path, ws_upstream: WsUpstream) -> None:
    p = await _proxy_process(tmp_path, ws_upstream, extra="shutdown_grace: 1s\n")
    try:
        async with aiohttp.ClientSession() as s, s.ws_connect(p.url + "/open/echo") as ws:
            await ws.send_str("x")
            assert await ws.receive_str() == "x"
            assert p.proc is not None
            p.proc.send_signal(signal.SIGTERM)
            await ws.send_str("during the grace")  # still relayed while the grace lasts
            assert await ws.receive_str() == "during the grace"
            msg = await ws.receive(timeout=15)
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
        await until("the upstream saw 1001", lambda: ws_upstream.closed == [1001])
        assert p.stop() == 0
    finally:
        p.stop()
    assert "Traceback" not in p.log()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_client_that_does_not_read_cannot_grow_the_proxy(tmp_path: Path, ws_upstream: WsUpstream) -> None:
    p = await _proxy_process(tmp_path, ws_upstream)
    try:
        assert p.proc is not None
        before = _rss(p.proc.pid)
        total = 2000 * 65536  # 125 MiB offered by a fast upstream
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(p.url + "/open/flood?n=2000&size=65536", max_msg_size=1 << 20) as ws:
            seen: list[int] = []

            async def stalled() -> bool:  # the upstream's sending stopped: back-pressure reached it
                seen.append(ws_upstream.sent)
                return len(seen) > 10 and seen[-1] == seen[-10] > 0

            await until("the upstream is held back", stalled, timeout=30)
            held = ws_upstream.sent
            grown = _rss(p.proc.pid) - before
            got = 0
            async for msg in ws:  # now read everything: nothing was lost
                got += len(msg.data)
        assert held < total / 4, held  # the proxy buffered a bounded amount, not the flood
        assert grown < 32 << 20, grown  # measured here: under 1 MiB, with 10 MiB held in socket buffers
        assert got == total
    finally:
        p.stop()

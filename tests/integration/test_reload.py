"""Config reload with last-known-good: bad files never take traffic down."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from pathlib import Path

import aiohttp

from proxy.config import load_text
from tests.helpers import InProcessProxy, ProxyProcess, Upstream, config_text, free_port, raw_request, until
from tests.redis_server import RedisServer

ALL = "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n"


class Setup:
    def __init__(self, tmp_path: Path, upstream: Upstream, extra: str = "") -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.path = tmp_path / "failgate.yaml"
        self.upstream = upstream
        self.extra = extra

    def text(self, routes: str = ALL, extra: str = "") -> str:
        return config_text(self.upstream.url, routes, port=self.port, admin_port=self.admin_port,
                           extra=self.extra + extra)

    def write(self, text: str | bytes) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, self.path)


async def admin(p: ProxyProcess, method: str, path: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    body = {} if method == "POST" else None
    async with aiohttp.ClientSession() as s, s.request(method, p.admin + path, json=body) as r:
        return r.status, await r.json()


async def metric(p: ProxyProcess, line_start: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(p.admin + "/metrics") as r:
        text = await r.text()
    return "\n".join(x for x in text.splitlines() if x.startswith(line_start))


BROKEN = {
    "yaml syntax": "version: 1\nroutes: [\n",
    "unknown key": None,  # filled in below from a good config
    "bad duration": None,
    "unknown upstream": None,
    "empty file": "",
    "binary garbage": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",
}


async def test_broken_files_are_rejected_and_the_running_config_keeps_serving(upstream: Upstream,
                                                                             tmp_path: Path) -> None:
    s = Setup(tmp_path, upstream)
    good = s.text()
    s.write(good)
    broken = dict(BROKEN)
    broken["unknown key"] = good + "bogus: 1\n"
    broken["bad duration"] = good + "shutdown_grace: soon\n"
    broken["unknown upstream"] = good.replace("upstream: api", "upstream: nope")
    p = ProxyProcess(s.path).start()
    try:
        await p.wait_ready()
        status, cfg = await admin(p, "GET", "/config")
        sha = cfg["sha256"]
        for name, text in [*broken.items(), ("file removed", None)]:
            if text is None:
                s.path.unlink()
            else:
                s.write(text)
            status, body = await admin(p, "POST", "/reload")
            assert (status, body["result"], body["sha256"]) == (422, "rejected", sha), name
            assert body["error"].startswith(str(s.path)), name
            assert (await raw_request(p.port, "/x")).status == 200, name
            _, cfg = await admin(p, "GET", "/config")
            assert cfg["sha256"] == sha and cfg["last_reload_error"] == body["error"], name
        assert 'failgate_config_reloads_total{result="rejected"} 7.0' in await metric(p, "failgate_config_reloads")
        assert await metric(p, "failgate_config_info") == f'failgate_config_info{{sha256="{sha}"}} 1.0'
        # a good file again: accepted, the error is cleared, exactly one config_info series
        s.write(s.text(extra="shutdown_grace: 5s\n"))
        status, body = await admin(p, "POST", "/reload")
        assert (status, body["result"]) == (200, "accepted") and body["sha256"] != sha
        _, cfg = await admin(p, "GET", "/config")
        assert cfg["last_reload_error"] is None and cfg["sha256"] == body["sha256"]
        assert await metric(p, "failgate_config_info") == f'failgate_config_info{{sha256="{body["sha256"]}"}} 1.0'
        errors = p.log()
        assert "reload rejected, still serving" in errors and "Traceback" not in errors
    finally:
        assert p.stop() == 0


async def test_reload_under_live_traffic_fails_no_request(upstream: Upstream, tmp_path: Path) -> None:
    s = Setup(tmp_path, upstream)
    s.write(s.text())
    p = ProxyProcess(s.path).start()
    try:
        await p.wait_ready()
        statuses: list[int] = []
        stop = asyncio.Event()

        async def traffic() -> None:
            async with aiohttp.ClientSession() as c:
                while not stop.is_set():
                    async with c.get(p.url + "/x") as r:
                        statuses.append(r.status)

        tasks = [asyncio.create_task(traffic()) for _ in range(8)]
        assert p.proc is not None
        for i in range(6):
            routes = ALL if i % 2 else ALL + "- name: extra\n  match: {path: /extra}\n  upstream: api\n"
            s.write(s.text(routes, extra=f"shutdown_grace: {i + 2}s\n"))
            p.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)
        assert len(statuses) > 100 and set(statuses) == {200}
        _, cfg = await admin(p, "GET", "/config")
        assert cfg["config"]["shutdown_grace"] == "7s"
    finally:
        assert p.stop() == 0


async def test_two_reloads_in_quick_succession_end_on_the_newest_file(upstream: Upstream, tmp_path: Path) -> None:
    s = Setup(tmp_path, upstream)
    s.write(s.text())
    p = ProxyProcess(s.path).start()
    try:
        await p.wait_ready()
        assert p.proc is not None
        s.write(s.text(extra="shutdown_grace: 3s\n"))
        p.proc.send_signal(signal.SIGHUP)
        s.write(s.text(extra="shutdown_grace: 4s\n"))
        p.proc.send_signal(signal.SIGHUP)
        newest = load_text(s.path.read_text(), str(s.path)).sha256
        for _ in range(50):
            _, cfg = await admin(p, "GET", "/config")
            if cfg["sha256"] == newest:
                break
            await asyncio.sleep(0.1)
        assert cfg["sha256"] == newest and cfg["config"]["shutdown_grace"] == "4s"
    finally:
        assert p.stop() == 0


async def test_the_watcher_picks_up_an_edit(upstream: Upstream, tmp_path: Path) -> None:
    s = Setup(tmp_path, upstream, extra="watch: true\n")
    s.write(s.text())
    p = ProxyProcess(s.path).start()
    try:
        await p.wait_ready()
        assert (await raw_request(p.port, "/only")).status == 200
        s.write(s.text("- name: only\n  match: {path: /only}\n  upstream: api\n"))
        for _ in range(60):
            if (await raw_request(p.port, "/other")).status == 404:
                break
            await asyncio.sleep(0.1)
        assert (await raw_request(p.port, "/other")).status == 404
        assert (await raw_request(p.port, "/only")).status == 200
    finally:
        assert p.stop() == 0


async def test_restart_with_a_broken_file_starts_from_the_last_good_copy(upstream: Upstream, tmp_path: Path) -> None:
    s = Setup(tmp_path, upstream)
    last_good = tmp_path / "state" / "last-good.yaml"
    last_good.parent.mkdir()
    good = s.text()
    s.write(good)
    p = ProxyProcess(s.path, "--last-good", str(last_good)).start()
    await p.wait_ready()
    assert p.stop() == 0
    assert last_good.read_text() == good
    assert stat.S_IMODE(last_good.stat().st_mode) == 0o600
    s.write(good + "bogus: true\n")
    p = ProxyProcess(s.path, "--last-good", str(last_good), port=s.port, admin_port=s.admin_port).start()
    try:
        await p.wait_ready()
        assert (await raw_request(p.port, "/x")).status == 200
        _, cfg = await admin(p, "GET", "/config")
        assert cfg["source"] == str(last_good) and cfg["from_last_good"] is True
        assert "unknown key `bogus`" in cfg["last_reload_error"]
        assert "CONFIG IS INVALID" in p.log()
        # the next good reload takes the real file again
        s.write(s.text(extra="shutdown_grace: 9s\n"))
        _status, body = await admin(p, "POST", "/reload")
        assert body["result"] == "accepted"
        _, cfg = await admin(p, "GET", "/config")
        assert cfg["source"] == str(s.path) and cfg["from_last_good"] is False and cfg["last_reload_error"] is None
        assert "shutdown_grace: 9s" in last_good.read_text()
    finally:
        assert p.stop() == 0
    # no copy and a broken file: exit non-zero with the error
    s.write("version: 1\n")
    r = ProxyProcess(s.path, "--last-good", str(tmp_path / "none.yaml"), port=s.port, admin_port=s.admin_port).start()
    assert r.proc is not None and r.proc.wait(30) == 1
    r.stop()
    assert "error: " in r.log() and "missing required key `upstreams`" in r.log()


async def test_reload_reaches_both_workers(upstream: Upstream, tmp_path: Path) -> None:
    s = Setup(tmp_path, upstream, extra="workers: 2\nstore: {url: 'redis://127.0.0.1:6399/0'}\n")
    s.write(s.text())
    p = ProxyProcess(s.path).start()
    try:
        await p.wait_ready(workers=2)
        s.write(s.text("- name: only\n  match: {path: /only}\n  upstream: api\n"))
        _status, body = await admin(p, "POST", "/reload")
        assert body["result"] == "accepted"
        for _ in range(50):
            _, ready = await admin(p, "GET", "/readyz")
            if ready["workers"]["sha256"] == [body["sha256"]] * 2:
                break
            await asyncio.sleep(0.1)
        assert ready["workers"]["sha256"] == [body["sha256"]] * 2
        for _ in range(20):  # fresh connections: both workers route with the new table
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as c, \
                    c.get(p.url + "/x") as r:
                assert r.status == 404
        assert await metric(p, "failgate_config_info") == f'failgate_config_info{{sha256="{body["sha256"]}"}} 1.0'
    finally:
        assert p.stop() == 0


async def test_counters_survive_a_reload_and_a_changed_limit_applies_next(upstream: Upstream,
                                                                         redis_server: RedisServer) -> None:
    def routes(limit: int) -> str:
        return ALL + f"  rate_limit: {{limit: {limit}, per: 1m, algorithm: fixed_window, key: route, " \
                     "on_store_error: closed}\n"

    extra = f"store: {{url: '{redis_server.url}', timeout: 500ms}}\n"
    port, admin_port = free_port(), free_port()
    async with InProcessProxy(config_text(upstream.url, routes(3), port=port, admin_port=admin_port,
                                          extra=extra)) as p:
        assert [(await raw_request(p.port, "/x")).status for _ in range(2)] == [200, 200]
        old = p.serving.runtime
        await p.serving.reload(load_text(config_text(upstream.url, routes(5), port=port, admin_port=admin_port,
                                                     extra=extra), "test.yaml"))
        assert p.serving.runtime is not old
        assert p.serving.runtime.store is old.store  # same store stack, breaker and stale state
        assert p.serving.runtime.local is old.local and p.serving.runtime.keys is old.keys
        assert [(await raw_request(p.port, "/x")).status for _ in range(4)] == [200, 200, 200, 429]


async def test_in_flight_requests_finish_and_changed_upstream_pools_close(upstream: Upstream) -> None:
    port, admin_port = free_port(), free_port()
    async with InProcessProxy(config_text(upstream.url, ALL, port=port, admin_port=admin_port)) as p:
        old = p.serving.runtime
        slow = asyncio.ensure_future(raw_request(p.port, "/sleep?s=0.5"))
        await until("the slow request is in flight", lambda: old.active == 1)
        [old_target] = old.targets.values()
        assert old_target._pool is not None
        # the new config changes the target's connection settings (so a new pool) and removes the route
        new_text = config_text(upstream.url, "- name: other\n  match: {path: /other}\n  upstream: api\n",
                               port=port, admin_port=admin_port, upstream_extra="connect_timeout: 2s\n")
        await p.serving.reload(load_text(new_text, "test.yaml"))
        assert (await raw_request(p.port, "/sleep?s=0")).status == 404  # new requests: the new routes
        r = await slow
        assert (r.status, r.body) == (200, b"slept")  # the old request finished on its old config
        await until("the old pool is closed once drained", lambda: old.active == 0 and old_target._pool is None)
        [new_target] = p.serving.runtime.targets.values()
        assert new_target is not old_target
        assert (await raw_request(p.port, "/other")).status == 200


async def test_an_unchanged_upstream_keeps_its_connection_pool(upstream: Upstream) -> None:
    port, admin_port = free_port(), free_port()
    async with InProcessProxy(config_text(upstream.url, ALL, port=port, admin_port=admin_port)) as p:
        assert (await raw_request(p.port, "/a")).status == 200
        old = p.serving.runtime
        [target] = old.targets.values()
        # `timeout` is read per request: changing it keeps the pool
        await p.serving.reload(load_text(config_text(upstream.url, ALL, port=port, admin_port=admin_port,
                                                     extra="shutdown_grace: 3s\n", upstream_extra="timeout: 5s\n"),
                                         "test.yaml"))
        assert list(p.serving.runtime.targets.values()) == [target]
        assert (await raw_request(p.port, "/b")).status == 200
        await until("the old config is retired", lambda: not p.serving._retiring)
        assert target._pool is not None and not target._pool.closed
        assert len(set(upstream.peers)) == 1  # one pooled connection served both

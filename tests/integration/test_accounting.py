"""Every degraded verdict accounted for: the decision log across reloads and a stop, and the small things an
operator needs to see — a store that lost its data, a rehearsal that survives a reload, a clean drain, a line per
502/504, reloads counted as what they were."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.config import load_text
from proxy.observe import metrics
from proxy.observe.metrics import REGISTRY
from tests.helpers import (
    InProcessProxy,
    ProxyProcess,
    Upstream,
    config_text,
    free_port,
    raw_request,
    read_response,
)
from tests.redis_server import RedisServer

LIMITED = """\
- name: r1
  match: {{path: /r1}}
  upstream: api
  rate_limit: {{limit: {limit}, per: 1m, key: route, on_store_error: open}}
- name: r2
  match: {{path: /r2}}
  upstream: api
  rate_limit: {{limit: 1000, per: 1m, on_store_error: open}}
"""


def json_lines(text: str) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict):
                out.append(doc)
    return out


def accounted(lines: list[dict], route: str) -> dict[tuple[str, str, str | None], int]:  # type: ignore[type-arg]
    """(check, basis, reason) -> decision lines + summary counts, for one route."""
    totals: dict[tuple[str, str, str | None], int] = {}
    for x in lines:
        if x.get("route") == route and "check" in x:
            key = (x["check"], x["basis"], x["reason"])
            totals[key] = totals.get(key, 0) + x.get("suppressed", 1)
    return totals


async def test_every_degraded_verdict_is_a_line_or_counted_in_a_summary_across_reloads_and_a_stop(
        upstream: Upstream, tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: every check is decided by its fail mode
    cfg = tmp_path / "f.yaml"
    port, admin = free_port(), free_port()

    def write(limit: int) -> None:
        cfg.write_text(config_text(upstream.url, LIMITED.format(limit=limit), port=port, admin_port=admin,
                                   extra=f"workers: 2\nstore: {{url: '{dead}', timeout: 20ms}}\n"))

    write(100)
    p = ProxyProcess(cfg).start()
    answered = {"r1": 0, "r2": 0}
    try:
        await p.wait_ready(workers=2)
        stop = asyncio.Event()

        async def client(path: str) -> None:
            while not stop.is_set():
                r = await raw_request(p.port, "/" + path)
                assert r.status == 200 and "failgate-degraded" in r.headers
                answered[path] += 1

        clients = [asyncio.create_task(client(path)) for path in ("r1", "r2") for _ in range(8)]
        async with aiohttp.ClientSession() as s:
            for i in range(5):  # five reloads under full degradation
                await asyncio.sleep(0.4)
                write(200 + i)
                async with s.post(p.admin + "/reload", json={}) as r:
                    assert (await r.json())["result"] == "accepted"
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*clients)
    finally:
        assert p.stop(signal.SIGTERM) == 0  # right after the traffic, in the same second
    lines = json_lines(p.log())
    for route in ("r1", "r2"):
        totals = accounted(lines, route)
        assert sum(totals.values()) == answered[route], (route, totals)
        assert {basis for _, basis, _ in totals} == {"open"}
    assert answered["r1"] > 200  # more than the line budgets: summaries did the accounting
    assert any("suppressed" in x for x in lines)


async def test_a_flood_of_denies_does_not_hide_degraded_verdicts(upstream: Upstream) -> None:
    routes = """\
    - name: api
      match: {path: /api}
      upstream: api
      auth: {type: api_key, on_store_error: open}
      rate_limit: {limit: 1, per: 1h, key: route, on_store_error: open}
    """
    log = io.StringIO()
    async with InProcessProxy(config_text(upstream.url, routes), log_stream=log) as p:  # memory:// has no API keys
        statuses = [(await raw_request(p.port, "/api", headers={"Authorization": "k"})).status for _ in range(300)]
    assert statuses.count(429) == 299
    totals = accounted(json_lines(log.getvalue()), "api")
    assert totals[("auth", "open", "error")] == 300  # auth could not be checked: every one of them shows
    assert totals[("rate_limit", "checked", None)] == 299
    assert any(x.get("check") == "auth" and "request_id" in x for x in json_lines(log.getvalue()))


async def test_a_store_that_lost_its_data_is_counted_and_logged(upstream: Upstream, redis_server: RedisServer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from tests.integration.test_stale import new_key, store

    key = new_key(redis_server.url, "alice")
    routes = "- {name: pay, match: {path: /pay}, upstream: api, auth: {type: api_key, on_store_error: closed}}\n"
    before = REGISTRY.get_sample_value("failgate_store_data_lost_total") or 0
    metrics._data_lost_logged[0] = 0.0  # the once-every-10s log line: not already spent by another test
    async with InProcessProxy(config_text(upstream.url, routes, extra=store(redis_server.url))) as p:
        assert (await raw_request(p.port, "/pay", headers={"Authorization": key})).status == 200
        redis_server.restart()  # empty: no persistence
        with caplog.at_level(logging.ERROR, logger="failgate.store"):
            for _ in range(5):
                r = await raw_request(p.port, "/pay", headers={"Authorization": key})
                assert (r.status, r.headers["failgate-degraded"]) == (503, "auth;mode=closed;reason=error")
    assert (REGISTRY.get_sample_value("failgate_store_data_lost_total") or 0) - before == 5
    lost = [r for r in caplog.records if "epoch marker is missing" in r.getMessage()]
    assert len(lost) == 1  # rate-limited: one line, not one per request


async def test_a_rehearsal_survives_a_reload_that_changes_the_store(upstream: Upstream) -> None:
    routes = "- {name: g, match: {path: /g}, upstream: api, rate_limit: {limit: 9, per: 1m, on_store_error: open}}\n"
    async with InProcessProxy(config_text(upstream.url, routes, extra="store: {timeout: 50ms}\n")) as p:
        assert p.serving.control({"op": "chaos", "fault": "refuse", "for": "30s"})["ok"]
        r = await raw_request(p.port, "/g")
        assert r.headers["failgate-degraded"] == "rate_limit;mode=open;reason=unavailable"
        await p.serving.reload(load_text(config_text(upstream.url, routes, port=p.port,
                                                     extra="store: {timeout: 80ms}\n"), "t.yaml"))
        r = await raw_request(p.port, "/g")
        assert r.headers["failgate-degraded"] == "rate_limit;mode=open;reason=unavailable"  # still rehearsing
        assert p.serving.state()["chaos"] == "refuse"


async def test_a_keep_alive_client_during_drain_is_told_to_close_then_refused(upstream: Upstream,
                                                                              tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, "- {name: all, match: {path: /, prefix: true}, upstream: api}\n",
                               extra="shutdown_grace: 10s\n"))
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready()
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        writer.write(b"GET /sleep?s=1 HTTP/1.1\r\nHost: t\r\n\r\n")  # keep-alive, in flight when the stop comes
        deadline = time.monotonic() + 10
        while not any(seen["raw_path"].startswith("/sleep") for seen in upstream.seen):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert p.proc is not None
        p.proc.send_signal(signal.SIGTERM)
        r = await read_response(reader)
        assert r.status == 200 and r.headers["connection"] == "close"
        assert await reader.read() == b""  # then closed cleanly by the proxy, not reset
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", p.port)
    finally:
        p.stop()


async def test_each_502_and_504_is_one_structured_line(upstream: Upstream) -> None:
    routes = """\
    - {name: gone, match: {path: /gone}, upstream: dead}
    - {name: slow, match: {path: /sleep}, upstream: api}
    """
    text = config_text(upstream.url, routes, upstream_extra="timeout: 200ms\n")
    text = text.replace("routes:\n", f"  dead: {{url: 'http://127.0.0.1:{free_port()}'}}\nroutes:\n", 1)
    log = io.StringIO()
    async with InProcessProxy(text, log_stream=log) as p:
        assert (await raw_request(p.port, "/gone")).status == 502
        assert (await raw_request(p.port, "/sleep?s=2")).status == 504
    events = [x for x in json_lines(log.getvalue()) if x.get("event") == "upstream_error"]
    assert [(x["route"], x["upstream"], x["status"]) for x in events] == [("gone", "dead", 502), ("slow", "api", 504)]
    assert all(re.fullmatch(r"[0-9a-f]{24}", x["request_id"]) for x in events)


async def test_reloads_are_counted_as_what_they_were(upstream: Upstream, tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, "- {name: all, match: {path: /}, upstream: api}\n"))
    p = ProxyProcess(cfg, "--last-good", str(tmp_path / "last-good.yaml")).start()
    try:
        await p.wait_ready()
        async with aiohttp.ClientSession() as s:
            async with s.post(p.admin + "/reload", json={}) as r:
                assert (await r.json())["result"] == "unchanged"
            async with s.get(p.admin + "/metrics") as r:
                text = await r.text()
        assert 'failgate_config_reloads_total{result="unchanged"} 1.0' in text
        assert 'failgate_config_reloads_total{result="accepted"} 0.0' in text
        assert "failgate_config_from_last_good 0.0" in text
    finally:
        p.stop()
    cfg.write_text("version: 1\nnot valid: [")  # a restart now starts from the last-good copy
    p = ProxyProcess(cfg, "--last-good", str(tmp_path / "last-good.yaml"), port=p.port,
                     admin_port=p.admin_port).start()
    try:
        await p.wait_ready()
        async with aiohttp.ClientSession() as s, s.get(p.admin + "/metrics") as r:
            assert "failgate_config_from_last_good 1.0" in await r.text()
    finally:
        p.stop()

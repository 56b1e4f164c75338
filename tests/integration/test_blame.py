"""Blame only the dependency: a healthy Redis behind a busy Failgate must never put a route into its fail mode.

The proxy runs as its own process (its event loop is the one that stalls), in front of a real redis-server:
- a burst of long-path requests arriving in one event-loop iteration stalls it past `store.timeout`;
- a test-only hook (FAILGATE_TEST_HOOKS=1, `POST /_test/stall`) blocks its loop while store calls are queued, or
  while their replies are in flight;
and every answer is still a checked one: a spent `open` limit answers 429, a `closed` gate admits a valid key, a
`stale_fallback: open` route refuses garbage, the breaker stays closed. A real hang or a dead Redis still opens
the breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from proxy.config import load_text
from proxy.keys import add
from tests.helpers import ProxyProcess, Upstream, config_text, raw_request, read_response
from tests.redis_server import RedisServer

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
TIMEOUT_MS = 30
FAILURES = 5
BURST = 40
LONG_PATH = "/spent/" + "%41" * 2700  # ~8 KB, each costs milliseconds to normalize

ROUTES = """\
- {name: free, match: {path: /free}, upstream: api}
- name: spent
  match: {path: /spent, prefix: true}
  upstream: api
  rate_limit: {limit: 5, per: 1h, algorithm: fixed_window, key: route, on_store_error: open}
- name: guard
  match: {path: /guard, prefix: true}
  upstream: api
  rate_limit: {limit: 1000000, per: 1h, key: route, on_store_error: open}
- name: pay
  match: {path: /pay, prefix: true}
  upstream: api
  auth: {type: api_key, on_store_error: closed}
- name: soft
  match: {path: /soft, prefix: true}
  upstream: api
  auth: {type: api_key, on_store_error: stale, stale_fallback: open}
"""


def store(url: str) -> str:
    return (f"store: {{url: '{url}', timeout: {TIMEOUT_MS}ms, connect_timeout: 500ms, "
            f"breaker: {{failures: {FAILURES}, open_for: 30s}}}}\n")


@dataclass
class Setup:
    proxy: ProxyProcess
    redis: RedisServer
    key: str


@pytest.fixture
async def setup(upstream: Upstream, redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Setup]:
    text = config_text(upstream.url, ROUTES, extra=store(redis_server.url))
    key, _ = add(load_text(text, "keys.yaml"), "alice", [], None)
    cfg = tmp_path / "failgate.yaml"
    cfg.write_text(text)
    p = ProxyProcess(cfg, env={"FAILGATE_TEST_HOOKS": "1"}).start()
    try:
        await p.wait_ready()
        for _ in range(5):  # spend the limit: from now on every checked answer on /spent is 429
            assert (await raw_request(p.port, "/spent")).status == 200
        assert (await raw_request(p.port, "/spent")).status == 429
        yield Setup(p, redis_server, key)
    finally:
        p.stop()
    assert "Traceback" not in p.log()


async def metrics(p: ProxyProcess) -> str:
    async with aiohttp.ClientSession() as s, s.get(p.admin + "/metrics") as r:
        return await r.text()


def degraded_decisions(text: str) -> float:
    """Every verdict counted with a basis other than `checked`."""
    pattern = r'^failgate_decisions_total\{[^}]*basis="(?!checked)[^"]*"[^}]*\} (\S+)'
    return sum(float(m[1]) for m in re.finditer(pattern, text, re.M))


def max_lag_bucket(text: str) -> float:
    """The smallest bucket bound that holds every event-loop lag sample (how long the loop stalled at most)."""
    total = float(re.search(r"^failgate_event_loop_lag_seconds_count (\S+)", text, re.M)[1])  # type: ignore[index]
    for m in re.finditer(r'^failgate_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', text, re.M):
        if float(m[2]) >= total:
            return float(m[1])
    raise AssertionError("no lag bucket holds every sample")


async def breaker(p: ProxyProcess) -> str:
    async with aiohttp.ClientSession() as s, s.get(p.admin + "/readyz") as r:
        return str((await r.json())["breaker"])


@contextlib.asynccontextmanager
async def connections(p: ProxyProcess, n: int) -> AsyncIterator[list[Conn]]:
    """n keep-alive connections, each already accepted and served once (on a route without checks)."""
    conns = [await asyncio.open_connection("127.0.0.1", p.port) for _ in range(n)]
    try:
        for reader, writer in conns:
            writer.write(b"GET /free HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_response(reader)).status == 200
        yield conns
    finally:
        for _, writer in conns:
            writer.close()


async def burst(conns: list[Conn], target: str) -> list[tuple[int, str]]:
    """One request on every connection, written back to back so they reach the proxy in one loop iteration."""
    request = f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    for _, writer in conns:
        writer.write(request)
    answers = await asyncio.gather(*(read_response(reader) for reader, _ in conns))
    return [(r.status, r.headers.get("failgate-degraded", "")) for r in answers]


async def assert_still_checked(s: Setup) -> None:
    """The fail modes are not in force: each route gives the answer only a working store can give."""
    p = s.proxy
    r = await raw_request(p.port, "/spent")
    assert (r.status, r.headers.get("failgate-degraded")) == (429, None)
    r = await raw_request(p.port, "/pay", headers={"Authorization": s.key})
    assert (r.status, r.headers.get("failgate-degraded")) == (200, None)
    r = await raw_request(p.port, "/soft", headers={"Authorization": "garbage"})
    assert (r.status, r.headers.get("failgate-degraded")) == (401, None)
    assert await breaker(p) == "closed"
    assert degraded_decisions(await metrics(p)) == 0


async def test_a_burst_of_long_paths_is_not_blamed_on_the_store(setup: Setup) -> None:
    # How long one burst stalls the loop depends on the machine (a faster one needs more connections), and the lag
    # sampler, a 20 ms timer, sees only the part of a stall after its timer fell due. So the burst doubles until
    # the lag histogram shows a stall past store.timeout; CI's machine once read 25 ms after 40 long paths, and the
    # compiled build of 2026-12-03 often needed 640 (320 stalled it past 30 ms in 4 runs of 10).
    size = BURST
    while True:
        async with connections(setup.proxy, size) as conns:
            answers = await burst(conns, LONG_PATH)
        assert answers == [(429, "")] * size  # every one checked: the spent limit denies, nothing fails open
        if max_lag_bucket(await metrics(setup.proxy)) > TIMEOUT_MS / 1000:
            break  # the burst did stall the proxy's loop for longer than store.timeout: the test tests its claim
        assert size < BURST * 16, "even 640 long paths did not stall the loop past store.timeout"
        size *= 2
    await assert_still_checked(setup)


@pytest.mark.parametrize("at", ["queued", "inflight"])
async def test_an_event_loop_stall_is_not_blamed_on_the_store(setup: Setup, at: str) -> None:
    p = setup.proxy
    async with connections(p, 20) as conns:
        async with aiohttp.ClientSession() as s, s.post(p.admin + "/_test/stall", json={"ms": 200, "at": at}) as r:
            assert r.status == 200, await r.text()
        answers = await burst(conns, "/spent")
        assert answers == [(429, "")] * 20
    text = await metrics(p)
    assert max_lag_bucket(text) >= 0.1  # the hook did block the loop for 200 ms
    await assert_still_checked(setup)


async def load(p: ProxyProcess, path: str, until: asyncio.Event, seen: list[tuple[float, str]]) -> None:
    """One client sending requests back to back until `until` is set, recording (time, reason) of each."""
    while not until.is_set():
        r = await raw_request(p.port, path)
        assert r.status == 200, r.body
        tag = r.headers.get("failgate-degraded", "")
        seen.append((time.monotonic(), tag.split("reason=")[1] if tag else "checked"))


@contextlib.contextmanager
def resumed(server: RedisServer) -> Iterator[None]:
    try:
        yield
    finally:
        if server.paused:
            server.resume()


async def run_until_breaker_opens(s: Setup, fault: str) -> tuple[float, list[tuple[float, str]]]:
    """20 concurrent clients on an `open` route; inject the fault; poll until the breaker is open."""
    p = s.proxy
    stop, seen = asyncio.Event(), []  # type: ignore[var-annotated]
    clients = [asyncio.create_task(load(p, "/guard", stop, seen)) for _ in range(20)]
    try:
        while len(seen) < 200:  # healthy traffic first
            await asyncio.sleep(0.01)
        assert {reason for _, reason in seen} == {"checked"}
        began = time.monotonic()
        if fault == "hang":
            s.redis.pause()
        else:
            s.redis.kill()
        while await breaker(p) != "open":
            assert time.monotonic() - began < 10, "the breaker never opened"
            await asyncio.sleep(0.02)
        while not any(reason == "breaker_open" for _, reason in seen):
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    return began, seen


async def test_a_hang_still_opens_the_breaker_under_load(setup: Setup) -> None:
    with resumed(setup.redis):
        began, seen = await run_until_breaker_opens(setup, "hang")
        after = [(t - began, reason) for t, reason in seen if t >= began]
        first_open = min(t for t, reason in after if reason == "breaker_open")
        # Every request the hang caught timed out (one round trip each for the breaker, however many shared it),
        # and the breaker opened after about `failures` round trips: well within failures x (timeout + a poll)
        # plus the time the 20 clients need to notice.
        assert {reason for _, reason in after} <= {"checked", "timeout", "unavailable", "breaker_open"}
        assert first_open < FAILURES * TIMEOUT_MS / 1000 + 2.0
        assert sum(reason == "timeout" for _, reason in after) >= 1


async def test_a_dead_store_opens_the_breaker_at_once(setup: Setup) -> None:
    began, seen = await run_until_breaker_opens(setup, "kill")
    after = [(t - began, reason) for t, reason in seen if t >= began]
    first_open = min(t for t, reason in after if reason == "breaker_open")
    assert {reason for _, reason in after} <= {"checked", "unavailable", "breaker_open"}
    # Refused connections fail at once: at most a few round trips per client before the breaker is open.
    assert sum(reason == "unavailable" for _, reason in after) <= 20 * FAILURES
    assert first_open < 2.0

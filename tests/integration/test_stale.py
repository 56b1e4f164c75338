"""Stale that forgets nothing: local limits per key through a partial store failure, revocations that reach every
process, memory that survives a restart. Real redis-server, real proxy."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.config import load_text
from proxy.keys import add
from proxy.keyspace import digest_of
from proxy.observe.metrics import REGISTRY
from tests.helpers import (
    ROOT,
    InProcessProxy,
    ProxyProcess,
    Upstream,
    children,
    config_text,
    raw_request,
    read_response,
    until,
)
from tests.redis_server import RedisServer


def store(url: str, extra: str = "") -> str:
    return f"store: {{url: '{url}', timeout: 500ms, connect_timeout: 1s{extra}}}\n"


async def test_a_store_out_of_memory_keeps_each_clients_local_count(upstream: Upstream,
                                                                   redis_server: RedisServer) -> None:
    routes = """\
    - name: api
      match: {path: /api, prefix: true}
      upstream: api
      rate_limit: {limit: 10, per: 1m, algorithm: fixed_window, key: "header:X-Client", on_store_error: stale}
    """
    async with InProcessProxy(config_text(upstream.url, routes, extra=store(redis_server.url))) as p:
        async def send(client: str) -> tuple[int, str]:
            r = await raw_request(p.port, "/api", headers={"X-Client": client})
            return r.status, r.headers.get("failgate-degraded", "")

        assert [(await send("a"))[0] for _ in range(11)] == [200] * 10 + [429]  # a is over its limit
        assert [(await send("b"))[0] for _ in range(2)] == [200, 200]  # b has used 2 of 10
        assert redis_server.command("CONFIG", "SET", "maxmemory-policy", "noeviction").startswith(b"+OK")
        assert redis_server.command("CONFIG", "SET", "maxmemory", "1").startswith(b"+OK")  # every write fails: OOM
        admitted = 0
        for _ in range(100):
            status, tag = await send("a")  # over its limit: the script denies without writing, so Redis answers
            assert (status, tag) == (429, "")
            status, tag = await send("b")  # b's count needs a write: OOM, so b is enforced locally
            assert tag.startswith("rate_limit;mode=stale;reason=error")
            admitted += status == 200
        assert admitted == 8  # continuing from b's 2 of 10, however often a's answers came in between
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
    # the out-of-memory replies were counted as what they are
    assert (REGISTRY.get_sample_value("failgate_store_errors_total", {"kind": "oom"}) or 0) >= 100


ROUTES = """\
- name: pay
  match: {path: /pay, prefix: true}
  upstream: api
  auth: {type: api_key, on_store_error: stale, stale_for: 5m, stale_fallback: FALLBACK}
"""


def instance(tmp: Path, name: str, upstream: Upstream, redis_url: str, *, workers: int = 1,
             fallback: str = "closed") -> ProxyProcess:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(config_text(upstream.url, ROUTES.replace("FALLBACK", fallback),
                               extra=store(redis_url) + f"workers: {workers}\n"))
    return ProxyProcess(cfg, "--state-dir", str(tmp / f"{name}-state"))


async def statuses(p: ProxyProcess, key: str, n: int = 40) -> list[int]:
    """n requests, each on a new connection (so every worker of the instance gets its share)."""
    return [(await raw_request(p.port, "/pay", headers={"Authorization": key})).status for _ in range(n)]


async def metric(p: ProxyProcess, name: str, labels: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(p.admin + "/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m[1]) if m else 0.0




def new_key(redis_url: str, principal: str) -> str:
    loaded = load_text(config_text("http://127.0.0.1:1", "- {name: x, match: {path: /}, upstream: api}\n",
                                   extra=store(redis_url)), "keys.yaml")
    return add(loaded, principal, [], None)[0]


def keys_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = config_text("http://127.0.0.1:1", "- {name: x, match: {path: /}, upstream: api}\n", extra=store(redis_url))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(cfg)
    return subprocess.run([sys.executable, "-m", "proxy", "keys", *args, "-c", f.name], cwd=ROOT,
                          capture_output=True, text=True)


async def test_a_key_revoked_with_the_cli_stays_refused_in_every_process_when_the_store_dies(
        upstream: Upstream, redis_server: RedisServer, tmp_path: Path) -> None:
    key = new_key(redis_server.url, "mallory")
    a = instance(tmp_path, "a", upstream, redis_server.url, workers=2).start()
    b = instance(tmp_path, "b", upstream, redis_server.url).start()
    try:
        await a.wait_ready(workers=2)
        await b.wait_ready()
        assert await statuses(a, key) == [200] * 40 and await statuses(b, key) == [200] * 40  # every worker knows it
        done = keys_cli(redis_server.url, "revoke", key)
        assert done.returncode == 0, done.stderr

        async def everyone_heard() -> bool:
            return (await metric(a, "failgate_revocations_total", 'source="publish"') >= 2
                    and await metric(b, "failgate_revocations_total", 'source="publish"') >= 1)

        await until("both workers of one instance and the other instance heard the revocation", everyone_heard)
        redis_server.kill()
        assert await statuses(a, key) == [401] * 40  # not served from the remembered record
        assert await statuses(b, key) == [401] * 40
    finally:
        a.stop()
        b.stop()


async def test_an_admin_revocation_during_an_outage_is_refused_everywhere_and_after_a_restart(
        upstream: Upstream, redis_server: RedisServer, tmp_path: Path) -> None:
    key, other = new_key(redis_server.url, "mallory"), new_key(redis_server.url, "alice")
    a = instance(tmp_path, "a", upstream, redis_server.url, workers=2).start()
    try:
        await a.wait_ready(workers=2)
        assert await statuses(a, key) == [200] * 40 and await statuses(a, other) == [200] * 40
        confirmed = time.time()  # the store confirmed `other` before this
        redis_server.kill()
        assert await statuses(a, key, 10) == [200] * 10  # stale: the remembered record
        async with aiohttp.ClientSession() as s, s.post(a.admin + "/keys/revoke", json={"key": key}) as r:
            body = await r.json()
            assert r.status == 200 and body["applied"] and body["persisted"] and not body["in_store"]
        assert await statuses(a, key) == [401] * 40  # both workers, at once
    finally:
        a.stop()
    a = instance(tmp_path, "a", upstream, redis_server.url, workers=2).start()  # the store is still down
    try:
        await a.wait_ready(workers=2)
        assert await statuses(a, key) == [401] * 40
        # (a fast machine restarts within the second the record was confirmed: its age would read 0 either way)
        await until("the remembered record is over a second old", lambda: time.time() - confirmed >= 1.1)
        r = await raw_request(a.port, "/pay", headers={"Authorization": other})
        assert r.status == 200  # remembered across the restart, from the state directory
        assert r.headers["failgate-degraded"].startswith("auth;mode=stale;reason=")
        age = float(r.headers["failgate-degraded"].rsplit("age=", 1)[1])
        assert age >= 1  # the original age, not "just now"
        redis_server.start()  # back (empty of keys: it had no persistence) — the pending revocation is written

        async def written() -> bool:
            return redis_server.command("ZSCORE", "failgate:revoked", digest_of(key)) != b"$-1\r\n"

        await until("the admin revocation reached the store", written)
    finally:
        a.stop()


async def test_a_restarted_worker_replays_the_revocation_log(upstream: Upstream, redis_server: RedisServer,
                                                             tmp_path: Path) -> None:
    key = new_key(redis_server.url, "mallory")
    assert keys_cli(redis_server.url, "revoke", digest_of(key)[:12]).returncode == 0  # the prefix `list` shows
    a = instance(tmp_path, "a", upstream, redis_server.url, workers=2, fallback="open").start()
    try:
        await a.wait_ready(workers=2)

        def replayed(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return await metric(a, "failgate_revocations_total", 'source="log"') >= n
            return check

        await until("both workers replayed the log at start", replayed(2))
        assert a.proc is not None
        os.kill(children(a.proc.pid)[0], signal.SIGKILL)
        await until("the restarted worker replayed the log", replayed(3))
        await a.wait_ready(workers=2)
        redis_server.kill()
        # fallback open would admit any key nobody remembers — but not one the log said was revoked
        assert await statuses(a, key) == [401] * 40
        assert (await raw_request(a.port, "/pay", headers={"Authorization": "never-seen"})).status == 200
    finally:
        a.stop()


@pytest.mark.slow
async def test_a_flood_of_client_chosen_keys_cannot_fill_redis(upstream: Upstream, tmp_path: Path) -> None:
    """200,000 random `header:` values into a Redis of 20 MB with volatile-ttl (the README's setting): counters,
    which expire, are evicted; API keys, which do not, stay; and every answer is a checked one."""
    redis_server = RedisServer(tmp_path / "redis", extra=["--maxmemory", "20mb", "--maxmemory-policy",
                                                          "volatile-ttl"]).start()
    try:
        key = new_key(redis_server.url, "alice")
        routes = """\
        - name: flood
          match: {path: /flood}
          upstream: api
          rate_limit: {limit: 5, per: 1d, algorithm: fixed_window, key: "header:X-Client", on_store_error: closed}
        - name: pay
          match: {path: /pay}
          upstream: api
          auth: {type: api_key, on_store_error: closed}
        """
        cfg = tmp_path / "flood.yaml"
        cfg.write_text(config_text(upstream.url, routes, extra=store(redis_server.url)))
        p = ProxyProcess(cfg).start()
        try:
            await p.wait_ready()
            counts: dict[tuple[int, bool], int] = {}

            async def client(worker: int, n: int) -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
                try:
                    for batch in range(0, n, 100):
                        writer.write(b"".join(
                            f"GET /flood HTTP/1.1\r\nHost: t\r\nX-Client: {worker}-{batch + i}-{os.urandom(8).hex()}"
                            f"\r\n\r\n".encode() for i in range(100)))
                        for _ in range(100):
                            r = await read_response(reader)
                            status = (r.status, "failgate-degraded" in r.headers)
                            counts[status] = counts.get(status, 0) + 1
                finally:
                    writer.close()

            await asyncio.gather(*(client(w, 200_000 // 20) for w in range(20)))
            assert counts == {(200, False): 200_000}  # every one counted by Redis; none degraded
            info = redis_server.command("INFO", "stats").decode()
            assert int(re.search(r"evicted_keys:(\d+)", info)[1]) > 0  # type: ignore[index]  # it did fill up
            r = await raw_request(p.port, "/pay", headers={"Authorization": key})
            assert (r.status, r.headers.get("failgate-degraded")) == (200, None)  # the key and the marker survived
        finally:
            p.stop()
    finally:
        redis_server.stop()


async def test_a_store_user_that_may_not_use_the_revocation_channel_is_reported_at_start(
        upstream: Upstream, redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    # An ACL user that may run commands on every key, but on no pub/sub channel.
    assert redis_server.command("ACL", "SETUSER", "narrow", "on", ">pw", "~*", "+@all", "resetchannels") \
        .startswith(b"+OK")
    url = f"redis://narrow:pw@127.0.0.1:{redis_server.port}/0"
    with caplog.at_level(logging.ERROR, logger="failgate.revocations"):
        async with InProcessProxy(config_text(upstream.url, ROUTES.replace("FALLBACK", "closed"),
                                              extra=store(url))) as p:
            async def reported() -> bool:
                return any("may not subscribe" in r.getMessage() for r in caplog.records)

            await until("the missing channel permission is reported", reported)
            assert p.serving.state()["revocations"] == "no channel permission"

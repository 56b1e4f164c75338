"""Redis Sentinel: a master, a replica and three sentinels as real processes; the master SIGKILLed under load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config import load_file
from proxy.keys import add, revoke
from tests.helpers import ProxyProcess, Upstream, config_text, raw_request, until
from tests.sentinel_set import SentinelSet

pytestmark = pytest.mark.slow

ROUTES = """\
- name: pay
  match: {path: /pay, prefix: true}
  upstream: api
  auth: {type: api_key, on_store_error: closed}
- name: exact
  match: {path: /exact, prefix: true}
  upstream: api
  rate_limit: {limit: 5, per: 1h, algorithm: fixed_window, key: "header:X-Client", on_store_error: open}
"""


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    s = SentinelSet(tmp_path / "sentinel").start()
    yield s
    s.stop()
    print(s.logs())  # (pytest shows it only when the test failed: what the sentinels did, and when)


async def test_the_master_killed_under_load_is_followed_to_the_promoted_replica(
        tmp_path: Path, upstream: Upstream, sentinels: SentinelSet) -> None:
    cfg = tmp_path / "failgate.yaml"
    cfg.write_text(config_text(upstream.url, ROUTES, extra=f"store: {{url: '{sentinels.url}', timeout: 100ms, "
                               f"connect_timeout: 300ms, breaker: {{failures: 3, open_for: 500ms}}}}\n"))
    loaded = load_file(str(cfg))
    key, _ = add(loaded, "alice", [], None)
    gone, _ = add(loaded, "mallory", [], None)
    revoke(loaded, gone)  # before the kill: must stay refused after it
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready()
        assert (await raw_request(p.port, "/pay", headers={"Authorization": key})).status == 200
        assert (await p.readyz())["master"] == f"127.0.0.1:{sentinels.master.port}"
        seen: list[tuple[float, float, int, str]] = []  # (sent, answered, status, tag)
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                r = await raw_request(p.port, "/pay", headers={"Authorization": key})
                seen.append((sent, time.monotonic(), r.status, r.headers.get("failgate-degraded", "")))

        load = [asyncio.create_task(client()) for _ in range(8)]
        await until("traffic flows", lambda: len(seen) > 200)
        killed = time.monotonic()
        sentinels.master.kill()
        await until("the sentinels promoted the replica",
                    lambda: sentinels.current_master_port() == sentinels.replica.port, timeout=30)

        def checked_again() -> bool:  # a request sent after the kill, answered by a store that works
            return any(sent > killed and not tag and status == 200 for sent, _, status, tag in seen[-50:])

        await until("a checked answer from the new master", checked_again, timeout=30)
        stop.set()
        await asyncio.gather(*load)
        first_checked = min(done for sent, done, status, tag in seen if sent > killed and not tag)
        during = [(status, tag) for sent, done, status, tag in seen if sent > killed and done < first_checked]
        print(f"\nkill to first checked answer: {first_checked - killed:.2f}s; {len(during)} answers between, "
              f"statuses {sorted({s for s, _ in during})}, tags {sorted({tag for _, tag in during})}")
        # never a 500, never a 401 for a valid key: every answer is 200 checked, or the closed mode's 503, tagged
        assert {status for _, _, status, _ in seen} <= {200, 503}
        assert during and all(status == 503 and tag.startswith("auth;mode=closed;reason=") for status, tag in during)
        assert all(tag == "" for _, _, status, tag in seen if status == 200)
        assert (await p.readyz())["master"] == f"127.0.0.1:{sentinels.replica.port}"
        # counts exact again on the new master
        statuses = [(await raw_request(p.port, "/exact", headers={"X-Client": "after"})).status for _ in range(7)]
        assert statuses == [200] * 5 + [429] * 2
        # the revocation made before the kill came through with the replica
        assert (await raw_request(p.port, "/pay", headers={"Authorization": gone})).status == 401
        # the revocation channel was subscribed again on the new master: a revocation published there arrives
        published = await p.metric("failgate_revocations_total", 'source="publish"')
        later, _ = add(loaded, "trent", [], None)
        revoke(loaded, later)
        await until("the new master's revocation reached the proxy",
                    lambda: p.metric_above("failgate_revocations_total", 'source="publish"', published), timeout=30)
        # the old master, restarted, becomes a replica; Failgate does not write to it
        sentinels.master.start()
        await until("the old master is a replica", lambda: b"role:slave" in sentinels.master.command(
            "INFO", "replication"), timeout=30)
        for i in range(20):
            assert (await raw_request(p.port, "/exact", headers={"X-Client": f"late-{i}"})).status == 200
            assert (await raw_request(p.port, "/pay", headers={"Authorization": key})).status == 200
        assert sentinels.master.calls("evalsha") == sentinels.master.calls("eval") == 0
        assert sentinels.master.calls("get") == 0
        assert sentinels.replica.calls("evalsha") >= 20
    finally:
        p.stop()
    assert "Traceback" not in p.log()


@pytest.fixture(params=["open", "passwords", "tls"])
def planned(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SentinelSet]:
    """A Sentinel set as is; with passwords on the data nodes and on the sentinels (sentinel_password); or with
    data nodes that speak TLS only (rediss+sentinel, a private CA in ssl_ca_certs)."""
    protected = request.param == "passwords"
    s = SentinelSet(tmp_path / "sentinel", password="data-pw" if protected else None,
                    sentinel_password="sentinel-pw" if protected else None, tls=request.param == "tls").start()
    yield s
    s.stop()
    print(s.logs())  # (shown only when the test failed)


async def test_a_planned_failover_moves_every_worker_off_the_demoted_master(
        tmp_path: Path, upstream: Upstream, planned: SentinelSet) -> None:
    """`SENTINEL FAILOVER`: the old master stays up and becomes a replica — connections to it stay open and would
    answer READONLY. Every worker moves to the new master (the switch message, or the READONLY reply), and the
    demoted one gets nothing more."""
    sentinels = planned
    cfg = tmp_path / "failgate.yaml"
    cfg.write_text(config_text(upstream.url, ROUTES, extra=f"workers: 2\nstore: {{url: '{sentinels.url}', "
                               "timeout: 100ms, connect_timeout: 300ms, breaker: {failures: 3, open_for: 500ms}}\n"))
    key, _ = add(load_file(str(cfg)), "alice", [], None)
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready(workers=2)
        statuses: list[int] = []
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                statuses.append((await raw_request(p.port, "/pay", headers={"Authorization": key})).status)

        load = [asyncio.create_task(client()) for _ in range(8)]
        await until("both workers use the master",
                    lambda: _master_is(p, f"127.0.0.1:{sentinels.master.port}"))
        assert sentinels.sentinels[0].command("SENTINEL", "FAILOVER", "failgate-master").startswith(b"+OK")
        await until("the replica is the master", lambda: sentinels.current_master_port() == sentinels.replica.port,
                    timeout=30)
        await until("every worker follows it", lambda: _master_is(p, f"127.0.0.1:{sentinels.replica.port}"),
                    timeout=30)
        before = sentinels.master.calls("evalsha") + sentinels.master.calls("get")
        mark = len(statuses)
        await until("traffic after the move", lambda: len(statuses) > mark + 300)
        stop.set()
        await asyncio.gather(*load)
        assert set(statuses) <= {200, 503}  # never a 500, never a 401 for the valid key
        assert set(statuses[mark:]) == {200}
        assert sentinels.master.calls("evalsha") + sentinels.master.calls("get") == before  # nothing sent to it
    finally:
        p.stop()
    assert "Traceback" not in p.log()


async def _master_is(p: ProxyProcess, at: str) -> bool:
    return (await p.readyz()).get("master") == at

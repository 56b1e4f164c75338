"""workers: N — a supervising parent, N workers on one port (SO_REUSEPORT), restarts, aggregated metrics."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import aiohttp
from prometheus_client.mmap_dict import MmapedDict

from tests.helpers import ProxyProcess, Upstream, config_text, until

ALL = "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n"
# No check touches the store yet; a redis:// URL is what lets a config run several workers.
TWO = "workers: 2\nstore: {url: 'redis://127.0.0.1:6399/0'}\n"


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out |= {int(c) for c in text}
    return out


def requests_counted_by(metrics_dir: Path) -> dict[int, float]:
    """Per worker pid: its failgate_requests_total, read from prometheus-client's multiprocess files."""
    out: dict[int, float] = {}
    for f in metrics_dir.glob("counter_*.db"):
        pid = int(re.findall(r"\d+", f.name)[0])
        total = sum(item[1] for item in MmapedDict.read_all_values_from_file(str(f))
                    if '"failgate_requests_total"' in item[0])
        out[pid] = total
    return out


async def fresh_connection_requests(url: str, n: int) -> list[int]:
    statuses = []
    for _ in range(n):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
                s.get(url) as r:
            statuses.append(r.status)
    return statuses


async def test_two_workers_serve_and_metrics_aggregate(upstream: Upstream, tmp_path: Path,
                                                       monkeypatch) -> None:  # type: ignore[no-untyped-def]
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale file from an earlier run")
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, ALL, extra=TWO))
    p = ProxyProcess(cfg)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    p.start()
    try:
        ready = await p.wait_ready(workers=2)
        assert ready["workers"]["configured"] == 2
        assert p.proc is not None
        workers = children(p.proc.pid)
        assert len(workers) == 2
        statuses = await fresh_connection_requests(p.url + "/x", 200)
        assert statuses == [200] * 200
        # a worker adds its counts to its file every second
        await until("both workers' counts are in their files",
                    lambda: sum(requests_counted_by(metrics_dir).get(w, 0) for w in workers) == 200)
        counted = requests_counted_by(metrics_dir)
        assert 999999 not in counted  # the directory was wiped at start
        assert all(counted[w] > 0 for w in workers), counted  # both workers took connections
        async with aiohttp.ClientSession() as s, s.get(p.admin + "/metrics") as r:
            text = await r.text()
        assert 'failgate_requests_total{route="all",status="200"} 200.0' in text
    finally:
        assert p.stop() == 0
    assert not any(os.path.exists(f"/proc/{w}") and Path(f"/proc/{w}/stat").read_text().split()[2] != "Z"
                   for w in workers)


async def test_a_killed_worker_is_replaced_and_traffic_continues(upstream: Upstream, tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, ALL, extra=TWO))
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready(workers=2)
        assert p.proc is not None
        before = children(p.proc.pid)
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        # Requests keep being served by the other worker while the victim is replaced.
        statuses = await fresh_connection_requests(p.url + "/x", 30)
        assert statuses == [200] * 30
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            after = children(p.proc.pid)
            async with aiohttp.ClientSession() as s, s.get(p.admin + "/readyz") as r:
                body = await r.json()
            if len(after) == 2 and victim not in after and body["workers"]["ready"] == 2:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"worker not replaced: {after} {body}")
        assert body["workers"]["restarts"] == 1
        assert "exited with -9; restarting it" in p.log()
        assert await fresh_connection_requests(p.url + "/x", 10) == [200] * 10
    finally:
        assert p.stop() == 0


async def test_sigterm_stops_every_worker(upstream: Upstream, tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, ALL, extra=TWO))
    p = ProxyProcess(cfg).start()
    await p.wait_ready(workers=2)
    assert p.proc is not None
    workers = children(p.proc.pid)
    assert p.stop(signal.SIGTERM) == 0
    await asyncio.sleep(0.2)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}")]


async def test_workers_flag_overrides_the_config(upstream: Upstream, tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, ALL, extra="workers: 1\nstore: {url: 'redis://127.0.0.1:6399/0'}\n"))
    p = ProxyProcess(cfg, "--workers", "3").start()
    try:
        body = await p.wait_ready(workers=3)
        assert body["workers"]["configured"] == 3
        assert p.proc is not None and len(children(p.proc.pid)) == 3
        async with aiohttp.ClientSession() as s, s.get(p.url + "/x") as r:
            assert r.status == 200
    finally:
        assert p.stop() == 0

"""The proxy as users run it: `python -m proxy run` in its own process — streaming memory, exit codes, signals."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import ProxyProcess, Upstream, config_text, until

ALL = "- name: all\n  match: {path: /, prefix: true}\n  upstream: api\n"
MiB = 1 << 20


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_256_mib_up_and_down_stream_through_in_bounded_memory(upstream: Upstream, tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, ALL, extra="limits: {max_body: 1GiB}\n"))
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready()
        size = 256 * MiB
        block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
        expected = hashlib.sha256()

        async def body():  # type: ignore[no-untyped-def]
            for _ in range(size // len(block)):
                expected.update(block)
                yield block

        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            async with s.post(p.url + "/upload", data=body()) as r:
                assert r.status == 200
                assert await r.json() == {"bytes": size, "sha256": expected.hexdigest()}
            async with s.get(p.url + f"/download?bytes={size}") as r:
                assert r.status == 200 and r.content_length == size
                got = 0
                async for chunk in r.content.iter_any():
                    got += len(chunk)
                assert got == size
        assert p.proc is not None
        peak = peak_rss_mib(p.proc.pid)
        assert peak < 150, f"proxy peak RSS {peak:.0f} MiB while streaming 256 MiB each way"
    finally:
        assert p.stop() == 0


async def test_sigterm_exits_zero_and_sigint_too(upstream: Upstream, tmp_path: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        cfg = tmp_path / f"f{sig}.yaml"
        cfg.write_text(config_text(upstream.url, ALL))
        p = ProxyProcess(cfg).start()
        await p.wait_ready()
        async with aiohttp.ClientSession() as s, s.get(p.url + "/x") as r:
            assert r.status == 200
        assert p.stop(sig) == 0


async def test_admin_endpoints(upstream: Upstream, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FG_TEST_SECRET_URL", upstream.url)
    cfg = tmp_path / "f.yaml"
    text = config_text("${FG_TEST_SECRET_URL}", ALL, extra="admin: {token: hunter2-token}\n")
    # config_text puts its own admin block first; keep the port, add the token
    text = text.replace("admin: {host: 127.0.0.1, port: ", "admin: {token: hunter2-token, host: 127.0.0.1, port: ")
    text = text.replace("admin: {token: hunter2-token}\n", "")
    cfg.write_text(text)
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready()
        async with aiohttp.ClientSession() as s:
            async with s.get(p.url + "/x") as r:
                assert r.status == 200
            async with s.get(p.admin + "/healthz") as r:
                assert r.status == 200 and (await r.json())["status"] == "alive"
            async with s.get(p.admin + "/readyz") as r:
                body = await r.json()
                assert r.status == 200 and body["ready"] is True and body["draining"] is False
            async with s.get(p.admin + "/config") as r:
                assert r.status == 401  # a token is set: the running config is behind it too
            async with s.get(p.admin + "/config", headers={"Authorization": "Bearer hunter2-token"}) as r:
                body = await r.json()
                raw = await r.text()
                assert body["sha256"] == hashlib.sha256(cfg.read_bytes()).hexdigest()
                assert body["source"] == str(cfg)
                assert body["last_reload_error"] is None
                assert body["config"]["admin"]["token"] == "***"
                assert body["config"]["upstreams"]["api"]["url"] == "***"  # it came from ${VAR}
                assert body["config"]["upstreams"]["api"]["timeout"] == "30s"
                assert "hunter2" not in raw and upstream.url not in raw
            async with s.get(p.admin + "/metrics") as r:
                text = await r.text()
                assert 'failgate_requests_total{route="all",status="200"} 1.0' in text
                assert 'failgate_request_duration_seconds_count{route="all"} 1.0' in text
                assert 'failgate_upstream_duration_seconds_count{upstream="api"} 1.0' in text
            # the proxy port never serves admin paths
            async with s.get(p.url + "/metrics") as r:
                assert "failgate_requests_total" not in await r.text()
    finally:
        assert p.stop() == 0


async def test_an_upload_in_progress_at_sigterm_is_finished_within_the_grace(upstream: Upstream,
                                                                              tmp_path: Path) -> None:
    """aiohttp marks connections closing at shutdown and then drops every byte they receive: an upload that was
    half sent would have stalled until the grace ran out. Its connection now keeps reading until it is done."""
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, ALL, extra="shutdown_grace: 10s\n"))
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready()
        first_sent = asyncio.Event()
        chunks = [bytes([65 + i]) * 65536 for i in range(8)]

        async def body() -> Any:
            for i, chunk in enumerate(chunks):
                yield chunk
                if i == 0:
                    first_sent.set()
                    await until("the proxy is draining", lambda: _draining(p))
        async with aiohttp.ClientSession() as s:
            upload = asyncio.create_task(s.post(p.url + "/upload", data=body()))
            await first_sent.wait()
            assert p.proc is not None
            p.proc.send_signal(signal.SIGTERM)
            async with await upload as r:
                assert r.status == 200
                assert (await r.json())["bytes"] == 8 * 65536
        assert p.proc.wait(15) == 0
    finally:
        p.stop()


async def _draining(p: ProxyProcess) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(p.admin + "/readyz") as r:
            return bool((await r.json())["draining"])
    except aiohttp.ClientError:
        return False


async def test_sigterm_under_load_finishes_every_request_in_flight(upstream: Upstream, tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, ALL, extra="shutdown_grace: 10s\n"))
    p = ProxyProcess(cfg).start()
    try:
        await p.wait_ready()
        async with aiohttp.ClientSession() as s:
            async def slow() -> int:
                async with s.get(p.url + "/sleep?s=1.5") as r:
                    assert await r.text() == "slept"
                    return r.status

            in_flight = [asyncio.create_task(slow()) for _ in range(20)]
            await asyncio.sleep(0.5)
            assert p.proc is not None
            p.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with s.get(p.admin + "/readyz") as r:  # unready at once, while draining
                assert r.status == 503 and (await r.json())["draining"] is True
            try:
                async with aiohttp.ClientSession() as fresh, fresh.get(p.url + "/x") as r:
                    refused = False
            except aiohttp.ClientConnectionError:
                refused = True
            assert refused  # no longer accepting
            assert await asyncio.gather(*in_flight) == [200] * 20
        assert p.proc.wait(15) == 0
    finally:
        p.stop()


async def test_ready_means_serving_and_a_sigterm_at_once_is_a_clean_stop(upstream: Upstream, tmp_path: Path) -> None:
    """`/readyz` turns 200 only once the proxy port accepts and the stop signals are in place: an orchestrator
    that routes traffic or sends SIGTERM on the first 200 gets an answer and a clean exit, never the default
    SIGTERM death (which is what a test saw when the admin answered before the listener started)."""
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, ALL))
    p = ProxyProcess(cfg).start()
    assert p.proc is not None
    try:
        async with aiohttp.ClientSession() as s:
            while True:  # poll without pausing, to land as close to the first 200 as we can
                assert p.proc.poll() is None, p.log()
                try:
                    async with s.get(p.admin + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.005)
            async with s.get(p.url + "/x") as r:
                assert r.status == 200
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(15) == 0
    finally:
        p.stop()


async def test_single_process_is_unready_until_its_proxy_port_listens(upstream: Upstream, tmp_path: Path) -> None:
    from proxy.reload import ConfigState
    from proxy.server import SingleProcess

    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(upstream.url, ALL))
    state = ConfigState(str(cfg), None)
    state.load_initial()
    owner = SingleProcess(state)
    assert owner.ready()[0] is False  # the admin may already answer; readiness waits for the listener
    await owner.serving.start()
    try:
        assert owner.ready()[0] is True
        port = owner.serving.loaded.config.listen.port
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/x") as r:
            assert r.status == 200
    finally:
        await owner.serving.stop()
    assert owner.ready()[0] is False

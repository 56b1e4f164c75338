"""Several targets per upstream, with real target processes (killed and restarted on their port) behind the real
proxy: balancing, passive ejection, the one safe retry, re-admission, a reload that adds a target."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from benchmarks.ports import free_port
from proxy.config import load_text
from tests.helpers import InProcessProxy, ProxyProcess, until
from tests.redis_server import RedisServer
from tests.target_server import TargetProcess


def config(urls: list[str], *, balance: str = "round_robin", failures: int = 5, eject_for: str = "10s",
           workers: int = 1, port: int | None = None, admin_port: int | None = None,
           store: str = "memory://") -> str:
    targets = "".join(f"      - {u}\n" for u in urls)
    return (f"version: 1\nworkers: {workers}\nstore: {{url: '{store}'}}\n"
            f"listen: {{host: 127.0.0.1, port: {port or free_port()}}}\n"
            f"admin: {{host: 127.0.0.1, port: {admin_port or free_port()}}}\n"
            "upstreams:\n  api:\n    targets:\n" + targets +
            f"    balance: {balance}\n    connect_timeout: 500ms\n    timeout: 5s\n"
            f"    eject: {{failures: {failures}, for: {eject_for}}}\n"
            "routes:\n  - {name: all, match: {path: /, prefix: true}, upstream: api}\n")


@contextlib.contextmanager
def targets(*specs: dict[str, Any]) -> Iterator[list[TargetProcess]]:
    started = [TargetProcess(f"t{i}", **spec).start() for i, spec in enumerate(specs)]
    try:
        yield started
    finally:
        for t in started:
            t.kill()


@contextlib.asynccontextmanager
async def proxy(tmp_path: Path, text: str) -> AsyncIterator[ProxyProcess]:
    path = tmp_path / "failgate.yaml"
    path.write_text(text)
    p = ProxyProcess(path).start()
    try:
        await p.wait_ready()
        yield p
    finally:
        p.stop()
    assert "Traceback" not in p.log()


async def readyz(p: ProxyProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(p.admin + "/readyz") as r:
        return await r.json()  # type: ignore[no-any-return]


async def up(p: ProxyProcess) -> dict[str, bool]:
    """Each target's state on /readyz: True in rotation."""
    return {t["url"]: t["up"] for t in (await readyz(p))["upstreams"]["api"]["targets"]}


async def metric(p: ProxyProcess, name: str, labels: str = "") -> float:
    async with aiohttp.ClientSession() as s, s.get(p.admin + "/metrics") as r:
        text = await r.text()
    pattern = rf"^{name}\{{[^}}]*{labels}[^}}]*\}} (\S+)$"
    return sum(float(m[1]) for m in re.finditer(pattern, text, re.M))


async def send(session: aiohttp.ClientSession, url: str, method: str = "GET", data: bytes | None = None,
               ) -> tuple[int, str]:
    async with session.request(method, url, data=data) as r:
        await r.read()
        return r.status, r.headers.get("X-Target", "")


async def spread(p: ProxyProcess, n: int, concurrency: int = 16, path: str = "/x") -> collections.Counter[str]:
    """n GETs, `concurrency` at a time: which target answered each (or the status when none did)."""
    counts: collections.Counter[str] = collections.Counter()
    queue = iter(range(n))
    async with aiohttp.ClientSession() as s:
        async def client() -> None:
            for _ in queue:
                status, target = await send(s, p.url + path)
                counts[target if status == 200 else str(status)] += 1
        await asyncio.gather(*(client() for _ in range(concurrency)))
    return counts


async def test_round_robin_spreads_evenly(tmp_path: Path) -> None:
    with targets({}, {}, {}) as ts:
        for t in ts:
            await t.wait_up()
        async with proxy(tmp_path, config([t.url for t in ts])) as p:
            counts = await spread(p, 3000)
    assert sorted(counts) == ["t0", "t1", "t2"]
    for name in ("t0", "t1", "t2"):
        assert 900 <= counts[name] <= 1100, counts  # within ±10 % of a third


async def test_least_request_sends_fewer_requests_to_a_slow_target(tmp_path: Path) -> None:
    with targets({"delay": 0.05}, {}) as ts:
        for t in ts:
            await t.wait_up()
        async with proxy(tmp_path, config([t.url for t in ts], balance="least_request")) as p:
            counts = await spread(p, 600)
    # round robin would give each half; the slow one holds its requests longer, so it is picked far less
    assert counts["t0"] + counts["t1"] == 600
    assert counts["t0"] < 600 * 0.25, counts


async def test_a_target_killed_under_load_costs_no_idempotent_request(tmp_path: Path) -> None:
    with targets({"delay": 0.01}, {"delay": 0.01}, {"delay": 0.01}) as ts:
        for t in ts:
            await t.wait_up()
        async with proxy(tmp_path, config([t.url for t in ts], failures=2, eject_for="1m")) as p:
            results: list[tuple[float, float, int]] = []  # (sent, answered, status)
            stop = asyncio.Event()
            async with aiohttp.ClientSession() as s:
                async def client() -> None:
                    while not stop.is_set():
                        sent = time.monotonic()
                        status, _ = await send(s, p.url + "/x")
                        results.append((sent, time.monotonic(), status))
                load = [asyncio.create_task(client()) for _ in range(16)]
                await until("traffic flows", lambda: len(results) > 300)
                killed_at = time.monotonic()
                ts[1].kill()
                await until("the killed target is out", lambda: _is_out(p, ts[1].url))
                ejected_at = time.monotonic()
                after = len(results)
                await until("traffic after the ejection", lambda: len(results) > after + 300)
                stop.set()
                await asyncio.gather(*load)
            retries = await metric(p, "failgate_upstream_retries_total")
    failed = [(sent, status) for sent, _, status in results if status != 200]
    # Only requests already in flight when it was killed could fail (none did here: each got its retry)...
    assert all(sent < killed_at for sent, _ in failed), failed
    assert len(failed) <= 16
    # ...and nothing failed once it was out.
    assert [r for r in results if r[0] >= ejected_at and r[2] != 200] == []
    assert retries >= 1  # the requests that reached the dead target were sent again, not failed


async def _is_out(p: ProxyProcess, url: str) -> bool:
    return (await up(p))[url] is False


async def test_a_post_is_never_retried_and_a_get_always_is(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every connection is refused
    with targets({}) as [live]:
        await live.wait_up()
        # failures high enough that the dead target stays in rotation for the whole test
        async with proxy(tmp_path, config([live.url, dead], failures=1000)) as p:
            async with aiohttp.ClientSession() as s:
                posts = [await send(s, p.url + "/x", "POST", b"order") for _ in range(10)]
                gets = [await send(s, p.url + "/x") for _ in range(10)]
                puts = [await send(s, p.url + "/x", "PUT", b"x" * 1000) for _ in range(10)]
                # a body too big to hold for a second try is streamed, so it cannot be sent again
                big = [await send(s, p.url + "/x", "PUT", b"x" * 200_000) for _ in range(4)]
            seen = await live.seen()
    assert sorted(posts) == [(200, "t0")] * 5 + [(502, "")] * 5  # round robin: half went to the dead target
    assert seen["POST"] == 5  # and none of those was sent again
    assert gets == [(200, "t0")] * 10
    assert puts == [(200, "t0")] * 10  # a small body is read whole first, so it can go again
    assert sorted(big) == [(200, "t0")] * 2 + [(502, "")] * 2


@pytest.mark.parametrize(("status", "ejected"), [(503, True), (500, False)])
async def test_a_503_ejects_a_target_and_an_application_500_does_not(tmp_path: Path, status: int,
                                                                      ejected: bool) -> None:
    with targets({}, {"status": status}) as ts:
        for t in ts:
            await t.wait_up()
        async with proxy(tmp_path, config([t.url for t in ts], failures=3, eject_for="1m")) as p:
            first = await spread(p, 40, concurrency=1)
            then = await spread(p, 40, concurrency=1)
            state = await up(p)
            gauge = await metric(p, "failgate_upstream_target_up", f'target="{ts[1].url}"')
    assert first["t0"] >= 20  # (the failing target's answers carry its status, not a name)
    assert state[ts[1].url] is not ejected
    assert gauge == (0.0 if ejected else 1.0)
    if ejected:
        assert first[str(status)] == 3 and then == {"t0": 40}  # three in a row, then out
    else:
        assert then == {"t0": 20, str(status): 20}  # its 500s are answers: it keeps its share


async def test_a_killed_target_comes_back_after_eject_for(tmp_path: Path) -> None:
    with targets({}, {}) as ts:
        for t in ts:
            await t.wait_up()
        async with proxy(tmp_path, config([t.url for t in ts], failures=2, eject_for="1s")) as p:
            ts[1].kill()
            await until("it is out", lambda: _spread_then_out(p, ts[1].url))
            assert await spread(p, 20, concurrency=1) == {"t0": 20}
            ts[1].start()
            await ts[1].wait_up()
            await until("it is back in rotation", lambda: _is_up(p, ts[1].url))
            counts = await spread(p, 20, concurrency=1)
    assert counts == {"t0": 10, "t1": 10}


async def _spread_then_out(p: ProxyProcess, url: str) -> bool:
    await spread(p, 4, concurrency=1)
    return await _is_out(p, url)


async def _is_up(p: ProxyProcess, url: str) -> bool:
    return (await up(p))[url] is True


async def test_never_more_than_half_of_the_targets_are_out(tmp_path: Path) -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    with targets({}) as [live]:
        await live.wait_up()
        async with proxy(tmp_path, config([live.url, *dead], failures=1, eject_for="1m")) as p:
            # The first dead target reached is taken out; a GET retried from it may land on the other dead one
            # (one retry, and that one stays in: never more than half).
            first = await spread(p, 3, concurrency=1)
            counts = await spread(p, 60, concurrency=1)
            state = await up(p)
    assert sum(not v for v in state.values()) == 1  # 3 targets: at most one out, though two are dead
    assert first["t0"] >= 2
    assert counts == {"t0": 60}  # then every GET is answered: the dead one left in rotation is retried past


async def test_workers_report_their_own_ejections_on_readyz(tmp_path: Path, redis_server: RedisServer) -> None:
    with targets({}, {"status": 503}) as ts:
        for t in ts:
            await t.wait_up()
        async with proxy(tmp_path, config([t.url for t in ts], failures=1, eject_for="1m", workers=2,
                                          store=redis_server.url)) as p:
            await p.wait_ready(workers=2)

            async def out_somewhere() -> bool:
                await spread(p, 8)
                state = (await readyz(p))["upstreams"]["api"]["targets"]
                return state[1]["out_in_workers"] >= 1 and state[1]["up"] is False

            await until("a worker took the failing target out", out_somewhere)
            assert (await readyz(p))["upstreams"]["api"]["targets"][0] == {"url": ts[0].url, "up": True,
                                                                            "out_in_workers": 0}


async def test_a_reload_that_adds_a_target_keeps_the_pool_of_the_other(tmp_path: Path) -> None:
    with targets({}, {}) as ts:
        for t in ts:
            await t.wait_up()
        port, admin_port = free_port(), free_port()
        async with InProcessProxy(config([ts[0].url], port=port, admin_port=admin_port)) as p:
            assert await spread_in(p.url, 10) == {"t0": 10}
            [first] = p.serving.runtime.targets.values()
            pool = first._pool
            await p.serving.reload(load_text(config([ts[0].url, ts[1].url], port=port, admin_port=admin_port),
                                             "test.yaml"))
            assert await spread_in(p.url, 10) == {"t0": 5, "t1": 5}
            await until("the old config is retired", lambda: not p.serving._retiring)
            assert first in p.serving.runtime.targets.values()
            assert first._pool is pool and pool is not None and not pool.closed


async def spread_in(url: str, n: int) -> collections.Counter[str]:
    async with aiohttp.ClientSession() as s:
        return collections.Counter([(await send(s, url + "/x"))[1] for _ in range(n)])

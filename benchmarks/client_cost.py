"""What sending one request upstream and reading its answer costs the proxy's process: aiohttp's ClientSession (what
the reference proxy uses, set up as Failgate's was) against Failgate's connection pool (proxy/pool.py).

    python -m benchmarks.client_cost [--requests 20000] [--concurrency 64]

The bundled upstream runs in another process, on the other core when there are two; this process is pinned to one
and reports its own CPU time per request (process_time), each client measured twice, interleaved."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop
from multidict import CIMultiDict

from proxy.pool import Pool

from .suite import ROOT, _port, _wait_port, stop_processes

_HEADERS = {"Host": "api.internal", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "http",
            "X-Request-Id": "06f73707ec35000000000004", "User-Agent": "bench/1"}


async def _cpu_per_request(one: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> float:
    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    await asyncio.gather(*[worker(50) for _ in range(concurrency)])  # connections made, code warm
    started = time.process_time()
    await asyncio.gather(*[worker(requests // concurrency) for _ in range(concurrency)])
    return (time.process_time() - started) / (requests // concurrency * concurrency) * 1e6


async def _session(port: int, requests: int, concurrency: int) -> float:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"), trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
    url = f"http://127.0.0.1:{port}/v1/items?page=2"

    async def one() -> None:
        r = await session.request("GET", url, headers=CIMultiDict(_HEADERS), allow_redirects=False, compress=None,
                                  auto_decompress=False)
        await r.read()

    try:
        return await _cpu_per_request(one, requests, concurrency)
    finally:
        await session.close()


async def _pool(port: int, requests: int, concurrency: int) -> float:
    pool = Pool("127.0.0.1", port, None, 5.0)

    async def one() -> None:
        r = await pool.request("GET", "/v1/items?page=2", CIMultiDict(_HEADERS), None)
        await r.read()

    try:
        return await _cpu_per_request(one, requests, concurrency)
    finally:
        await pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.client_cost")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="failgate-client-"))
    port = _port()
    upstream = subprocess.Popen([sys.executable, "-m", "benchmarks.upstream", str(port)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if len(cores) > 1:
            os.sched_setaffinity(upstream.pid, {cores[0]})
            os.sched_setaffinity(0, {cores[1]})
        _wait_port(port)
        print(f"CPU µs per request of this process, {args.requests} requests, {args.concurrency} at a time")
        results: dict[str, list[float]] = {"aiohttp ClientSession": [], "Failgate pool": []}
        for _ in range(2):
            results["aiohttp ClientSession"].append(uvloop.run(_session(port, args.requests, args.concurrency)))
            results["Failgate pool"].append(uvloop.run(_pool(port, args.requests, args.concurrency)))
        for name, figures in results.items():
            print(f"  {name:<22} {min(figures):6.1f} µs  (runs: {', '.join(f'{f:.1f}' for f in figures)})")
        ratio = min(results["aiohttp ClientSession"]) / min(results["Failgate pool"])
        print(f"  the pool costs 1/{ratio:.1f} of the session")
    finally:
        stop_processes([upstream], work)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the check pipeline itself costs, without sockets: `python -m benchmarks.pipeline_cost`

Runs a rate-limited route's checks against an in-process store that answers at once, and against one that
answers on the next event-loop turn (as a reply from Redis would), 64 requests at a time; and, for scale, a bare
suspend/resume. Steady figures (no network, no other process), to tell the pipeline's own CPU from the
event-loop and I/O costs the suite measures."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import uvloop
from multidict import CIMultiDict

from proxy.compiled import Runtime
from proxy.config import load_text
from proxy.pipeline import run_checks
from proxy.store.breaker import Breaker, BreakerStore
from proxy.store.ops import RateResult

CONFIG = """version: 1
store: {url: "memory://"}
upstreams: {api: {url: "http://127.0.0.1:1"}}
routes:
  - name: rl
    match: {path: /rl}
    upstream: api
    rate_limit: {limit: 1000000000, per: 1m, key: client_ip, on_store_error: open}
"""
ANSWER = [RateResult(True, 100, 12.0, 0.0, (1, 2, 3))]


class Instant:
    async def execute(self, ops: Any) -> list[Any]:
        return ANSWER


class NextTurn:
    async def execute(self, ops: Any) -> list[Any]:
        loop = asyncio.get_running_loop()
        f: asyncio.Future[list[Any]] = loop.create_future()
        loop.call_soon(f.set_result, ANSWER)
        return await f


async def _per_request(make: Any, n: int = 64 * 300) -> float:
    for _ in range(5):
        await asyncio.gather(*(make() for _ in range(64)))
    t0 = time.perf_counter()
    for _ in range(n // 64):
        await asyncio.gather(*(make() for _ in range(64)))
    return (time.perf_counter() - t0) / n * 1e6


async def main() -> None:
    loaded = load_text(CONFIG, "pipeline_cost")
    headers = CIMultiDict({"Host": "x"})
    loop = asyncio.get_running_loop()
    for name, store in (("instant store", Instant()), ("store answering next turn", NextTurn())):
        rt = Runtime(loaded, BreakerStore(store, Breaker(5, 2.0)))
        route = rt.router.match("GET", None, "/rl")

        async def one(rt: Runtime = rt, route: Any = route) -> Any:
            return await run_checks(rt, route, headers, "127.0.0.1")

        print(f"  run_checks, {name:<26} {await _per_request(one):6.2f} µs per request (64 at a time)")

    async def bare() -> int:
        f: asyncio.Future[int] = loop.create_future()
        loop.call_soon(f.set_result, 1)
        return await f

    print(f"  bare suspend and resume{'':<20} {await _per_request(bare):6.2f} µs per request (64 at a time)")


if __name__ == "__main__":
    uvloop.run(main())

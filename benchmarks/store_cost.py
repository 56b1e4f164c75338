"""What one store round trip costs this process, measured without HTTP: `python -m benchmarks.store_cost`

Starts its own redis-server on a free loopback port, then lets N coroutines (N = 64, 8, 1) each make one
sliding-window rate-limit call after another, and reports this process's CPU microseconds per call (its own
CPU accounting, so Redis's CPU is not counted) and the average batch size the client wrote:

  store      RedisStore.execute, as the reference proxy calls it
  stack      the same through the breaker (and the idle chaos switch), called as Failgate's pipeline calls it
  two        as `stack`, for two limits on one key (a 1 s sliding window and a daily fixed window, one script)
  yield      a bare suspend/resume on the next loop turn: the floor any round trip pays per request

The store's "added cost per request" of issue #3 is `stack` (a proxy with no store call pays none of it).
`--calls N` per concurrency level (default 60000); `--repeat R` keeps the median of R runs.

`--instructions` counts instructions per call instead, under valgrind's callgrind (deterministic, where CPU time
moves by tens of percent on shared cores): each case runs twice under callgrind, with N and 3N calls, and the
difference of the two totals is divided by the 4N calls between them (each run makes a warm-up pass of its calls
first), so start-up cancels out."""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import uvloop

from benchmarks.ports import free_port
from proxy.store.breaker import Breaker, BreakerStore
from proxy.store.chaos import ChaosStore
from proxy.store.ops import LimitsOp, RateOp
from proxy.store.redis import RedisStore

OP = RateOp("sliding_window", "bench:{rl:one}:sliding_window:60000", 1_000_000_000, 60_000_000, 1_000_000_000)
_TWO = (RateOp("sliding_window", "bench:{rl:two}:burst:sliding_window:1000", 1_000_000_000, 1_000_000, 1_000_000_000),
        RateOp("fixed_window", "bench:{rl:two}:daily:fixed_window:86400000", 1_000_000_000, 86_400_000_000,
               1_000_000_000))
TWO = LimitsOp(_TWO, tuple((o.algorithm, o.limit, o.window, o.burst, o.shadow) for o in _TWO))


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"redis://127.0.0.1:{port}/0"


async def _wait_up(store: RedisStore) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            await store.execute([OP])
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _measure(call: Any, concurrency: int, calls: int) -> float:
    per = calls // concurrency

    async def worker() -> None:
        for _ in range(per):
            await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm-up pass (connections, script cache)
    t0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - t0) / (per * concurrency) * 1e6


KINDS = ("store", "stack", "two", "yield")


async def _calls(url: str) -> tuple[RedisStore, dict[str, Any]]:
    store = RedisStore(url, timeout=5.0, connect_timeout=1.0, pool_size=4)
    await _wait_up(store)
    stack = BreakerStore(ChaosStore(store, 5.0), Breaker(5, 5.0))
    loop = asyncio.get_running_loop()
    ops, two = [OP], [TWO]

    async def via_store() -> None:
        await store.execute(ops)

    async def via_stack() -> None:  # as proxy/pipeline.py calls it
        await stack.round_trip(ops)

    async def via_stack_two() -> None:
        await stack.round_trip(two)

    async def bare_yield() -> None:
        f = loop.create_future()
        loop.call_soon(f.set_result, None)
        await f

    return store, dict(zip(KINDS, (via_store, via_stack, via_stack_two, bare_yield), strict=True))


async def one(url: str, kind: str, concurrency: int, calls: int) -> None:
    """One case, for the callgrind runs: a warm-up pass, then `calls` calls."""
    store, cases = await _calls(url)
    await _measure(cases[kind], concurrency, calls)
    await store.close()


def count_instructions(levels: list[int], calls: int) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind")
    with tempfile.TemporaryDirectory(prefix="failgate-bench-") as workdir:
        proc, url = start_redis(workdir)
        try:
            print(f"instructions per call (callgrind; {calls} and {3 * calls} calls per case)")
            print(f"{'concurrency':>11} " + " ".join(f"{k:>9}" for k in KINDS))
            for c in levels:
                row = []
                for kind in KINDS:
                    totals = []
                    for n in (calls, 3 * calls):
                        done = subprocess.run(
                            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/cg.out",
                             sys.executable, "-m", f"{__package__}.store_cost", "--one", kind, "--url", url,
                             "--concurrency", str(c), "--calls", str(n)],
                            capture_output=True, text=True, check=True)
                        found = re.search(r"Collected : (\d+)", done.stderr)
                        assert found, done.stderr[-2000:]
                        totals.append(int(found.group(1)))
                    row.append((totals[1] - totals[0]) / (4 * calls))  # each run: a warm-up pass, then its calls
                print(f"{c:>11} " + " ".join(f"{v / 1000:>8.1f}k" for v in row), flush=True)
        finally:
            proc.terminate()
            proc.wait()


async def main(calls: int, repeat: int, levels: list[int]) -> None:
    with tempfile.TemporaryDirectory(prefix="failgate-bench-") as workdir:
        proc, url = start_redis(workdir)
        try:
            store, cases = await _calls(url)
            via_store, via_stack, via_two, bare_yield = (cases[k] for k in KINDS)
            batches = _BatchCounter(store)
            print(f"{'concurrency':>11} {'store µs':>9} {'stack µs':>9} {'two µs':>9} {'yield µs':>9} {'avg batch':>9}")
            for c in levels:
                row = []
                for call in (via_store, via_stack, via_two, bare_yield):
                    batches.reset()
                    row.append(statistics.median([await _measure(call, c, calls) for _ in range(repeat)]))
                    if call is via_stack:
                        avg = batches.average()
                print(f"{c:>11} " + " ".join(f"{v:>9.1f}" for v in row) + f" {avg:>9.1f}")
            await store.close()
        finally:
            proc.terminate()
            proc.wait()


class _BatchCounter:
    """Batches written and the groups they carried, from the client's own counters."""

    def __init__(self, store: RedisStore) -> None:
        self.client = store.client
        self.reset()

    def reset(self) -> None:
        self.writes, self.groups = self.client.writes, self.client.groups_written

    def average(self) -> float:
        writes = self.client.writes - self.writes
        return (self.client.groups_written - self.groups) / writes if writes else 0.0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m benchmarks.store_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=60000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[64, 8, 1])
    ap.add_argument("--instructions", action="store_true", help="count instructions under callgrind instead")
    ap.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        uvloop.run(one(a.url, a.one, a.concurrency[0], a.calls))
    elif a.instructions:
        count_instructions(a.concurrency, a.calls if a.calls != 60000 else 3200)
    else:
        uvloop.run(main(a.calls, a.repeat, a.concurrency))

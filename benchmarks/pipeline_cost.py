"""What the check pipeline itself costs, without sockets: `python -m benchmarks.pipeline_cost`

Runs a rate-limited route's checks — one limit, and two limits on one key (a burst and a daily quota, one store
operation) — with their RateLimit fields, against an in-process store that answers at once, and against one that
answers on the next event-loop turn (as a reply from Redis would), 64 requests at a time; auth answered from
memory, each with 1,000 credentials in rotation: an API key from `cache_for`, a JWT the verified-token memory
holds, an authorizer's verdict from `cache_for`; for scale, a bare suspend/resume, and the same inside a timeout
(asyncio.timeout, and the slotted timeouts of timeouts.py); and what picking an upstream target costs (one target,
three). Steady figures (no network, no other process), to tell the pipeline's own CPU from the event-loop and I/O
costs the suite measures.

`--instructions` counts instructions per request instead, under valgrind's callgrind (deterministic, where CPU
time moves by tens of percent on shared cores): each case runs twice, with N and 3N batches of 64, and the
difference of the two totals is divided by the requests between them, so start-up and warm-up cancel out."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from multidict import CIMultiDict

from proxy.app import _rate_limit_fields
from proxy.checks.authz import HttpAuthCheck
from proxy.checks.memo import Record
from proxy.compiled import Runtime
from proxy.config import load_text
from proxy.decision import Verdict
from proxy.keyspace import digest_of
from proxy.pipeline import run_checks
from proxy.store.breaker import Breaker, BreakerStore
from proxy.store.ops import LimitsOp, RateResult
from proxy.targets import Balancer, Settings, Target
from proxy.timeouts import expiry

CONFIG = """version: 1
store: {url: "memory://"}
upstreams: {api: {url: "http://127.0.0.1:1"}}
routes:
  - name: rl
    match: {path: /rl}
    upstream: api
    rate_limit: {limit: 1000000000, per: 1m, key: client_ip, on_store_error: open}
  - name: rl-two
    match: {path: /rl-two}
    upstream: api
    rate_limit:
      - {name: burst, limit: 1000000000, per: 1s, key: client_ip, on_store_error: open}
      - {name: daily, limit: 1000000000, per: 1d, algorithm: fixed_window, key: client_ip, on_store_error: open}
"""
AUTH_CONFIG = """version: 1
store: {url: "memory://"}
upstreams: {api: {url: "http://127.0.0.1:1"}}
routes:
  - name: key
    match: {path: /key}
    upstream: api
    auth: {type: api_key, scheme: Bearer, cache_for: 60s, on_store_error: closed}
  - name: jwt
    match: {path: /jwt}
    upstream: api
    auth: {type: jwt, jwks_file: "%s", issuer: bench, audiences: [bench], algorithms: [ES256], on_store_error: closed}
  - {name: authz, match: {path: /authz}, upstream: api, auth: {type: http, url: "http://127.0.0.1:1/", cache_for: 60s,
     on_store_error: closed}}
"""
RESULT = RateResult(True, 100, 12.0, 0.0, (1, 2, 3))
CASES = {"one limit": "/rl", "two limits on one key": "/rl-two"}
STORES = ("instant", "next-turn")
AUTH_CASES = {"api_key from cache_for": "/key", "jwt, remembered token": "/jwt",
              "http authorizer from cache_for": "/authz"}
ROTATION = 1000  # distinct credentials per auth case, used in turn


def _answer(ops: Any) -> list[Any]:
    return [[RESULT] * len(op.limits) if type(op) is LimitsOp else RESULT for op in ops]


class Instant:
    async def execute(self, ops: Any) -> list[Any]:
        return _answer(ops)


class NextTurn:
    async def execute(self, ops: Any) -> list[Any]:
        loop = asyncio.get_running_loop()
        f: asyncio.Future[list[Any]] = loop.create_future()
        loop.call_soon(f.set_result, _answer(ops))
        return await f


async def _batches(make: Any, n: int) -> None:
    for _ in range(n):
        await asyncio.gather(*(make() for _ in range(64)))


async def _per_request(make: Any, n: int = 300) -> float:
    await _batches(make, 5)
    t0 = time.perf_counter()
    await _batches(make, n)
    return (time.perf_counter() - t0) / (n * 64) * 1e6


def _request(store: str, path: str) -> Any:
    rt = Runtime(load_text(CONFIG, "pipeline_cost"), BreakerStore(Instant() if store == "instant" else NextTurn(),
                                                                  Breaker(5, 2.0)))
    route = rt.router.match("GET", None, path)
    headers = CIMultiDict({"Host": "x"})

    async def one() -> int:
        decision = await run_checks(rt, route, headers, "127.0.0.1")  # type: ignore[arg-type]
        return _rate_limit_fields(decision.verdicts, [])

    return one


def _auth_request(path: str) -> Any:
    """run_checks on an auth route whose every answer comes from memory: ROTATION credentials, each remembered
    before the measurement (a record confirmed by the store, a verified token, an authorizer's allow)."""
    from .suite import _jwt_tokens

    jwks = Path(tempfile.mkdtemp(prefix="failgate-pipeline-")) / "jwks.json"
    tokens = _jwt_tokens(jwks, ROTATION if path == "/jwt" else 1)
    rt = Runtime(load_text(AUTH_CONFIG % jwks, "pipeline_cost"), BreakerStore(Instant(), Breaker(5, 2.0)))
    route = rt.router.match("GET", None, path)
    assert route is not None and route.auth is not None
    now = time.time()
    request = ("GET", path, None, "rid")
    if path == "/jwt":
        values = [value for _, value in tokens]
    else:
        values = [f"Bearer fg_bench_{i:04d}_{'x' * 32}" for i in range(ROTATION)]
    headers = [CIMultiDict({"Host": "x", "Authorization": v}) for v in values]
    for i, (h, v) in enumerate(zip(headers, values, strict=True)):
        if path == "/key":
            rt.keys.confirmed(digest_of(v.split()[1]), Record(f"user-{i}", ["read"]), now)
        elif isinstance(route.auth, HttpAuthCheck):
            route.auth.authorizer.allows.put(route.auth.memory_key(h, *request[:2], None), Verdict("auth", True), now)
        else:  # a jwt is verified the first time it is seen, and remembered
            assert route.auth.plan(h, rt.keys, now)[0].allow, "the benchmark's token was refused"  # type: ignore[union-attr]
    turn = itertools.cycle(headers)

    async def one() -> None:
        decision = await run_checks(rt, route, next(turn), "127.0.0.1", request)  # type: ignore[arg-type]
        assert decision.deny is None and not decision.verdicts[0].degraded

    return one


async def main() -> None:
    loop = asyncio.get_running_loop()
    for store in STORES:
        for case, path in CASES.items():
            print(f"  run_checks + fields, {case:<22} store {store:<10} "
                  f"{await _per_request(_request(store, path)):6.2f} µs per request (64 at a time)")
    for case, path in AUTH_CASES.items():
        print(f"  run_checks, {case:<32} {ROTATION} credentials "
              f"{await _per_request(_auth_request(path)):6.2f} µs per request (64 at a time)")

    async def bare() -> int:
        f: asyncio.Future[int] = loop.create_future()
        loop.call_soon(f.set_result, 1)
        return await f

    print(f"  bare suspend and resume{'':<37} {await _per_request(bare):6.2f} µs per request (64 at a time)")

    async def with_asyncio_timeout() -> int:
        async with asyncio.timeout(30.0):
            return await bare()

    async def with_slotted_timeout() -> int:
        with expiry(30.0):
            return await bare()

    for name, make in (("asyncio.timeout", with_asyncio_timeout), ("slotted (timeouts.py)", with_slotted_timeout)):
        print(f"  the same inside a timeout, {name:<22}{'':<11} {await _per_request(make):6.2f} µs per request "
              "(64 at a time)")
    for balance, n in (("round_robin", 1), ("round_robin", 3), ("least_request", 3)):
        print(f"  picking a target, {balance:<13} of {n}{'':<24} {_pick_cost(balance, n):6.3f} µs per request")


def _pick_cost(balance: str, n: int, calls: int = 200_000) -> float:
    """What the balancer adds to a request: a pick, and the in-flight count kept around it."""
    targets = [Target(Settings("bench", f"http://127.0.0.1:{8000 + i}", 1.0, True)) for i in range(n)]
    balancer = Balancer("bench", targets, balance, 5, 10.0)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            t = balancer.pick()
            t.in_flight += 1  # type: ignore[union-attr]
            t.in_flight -= 1  # type: ignore[union-attr]
        best = min(best, time.perf_counter() - t0)
    return best / calls * 1e6


def _counted(store: str, path: str, batches: int) -> float:
    """Instructions per request of one case: callgrind runs it with N and 3N batches; the difference of the totals
    over the requests between them."""
    totals = []
    for n in (batches, 3 * batches):
        done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                               "-m", f"{__package__}.pipeline_cost", "--one", store, path, "--batches", str(n)],
                              capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", done.stderr)
        assert found, done.stderr[-2000:]
        totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) / (2 * batches * 64)


def count_instructions(batches: int) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind")
    print(f"instructions per request (callgrind; {batches} and {3 * batches} batches of 64 per case)")
    for store in STORES:
        for case, path in CASES.items():
            print(f"  {case:<22} store {store:<10} {_counted(store, path, batches) / 1000:7.1f}k", flush=True)
    for case, path in AUTH_CASES.items():
        print(f"  {case:<33} {_counted('memory', path, batches) / 1000:7.1f}k  ({ROTATION} credentials in rotation)",
              flush=True)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--instructions", action="store_true", help="count instructions under callgrind instead")
    ap.add_argument("--batches", type=int, default=100, help="batches of 64 requests per callgrind run")
    ap.add_argument("--one", nargs=2, metavar=("STORE", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        store, path = a.one
        uvloop.run(_batches(_auth_request(path) if store == "memory" else _request(store, path), a.batches))
    elif a.instructions:
        count_instructions(a.batches)
    else:
        uvloop.run(main())

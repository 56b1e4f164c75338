"""aiocache's SimpleMemoryCache against the bounded LRU used for API-key answers (proxy/checks/memo.py), under
100k random credentials. `python -m benchmarks.cache_compare`

Measures, per operation: a miss lookup plus a store of the answer, then a hit lookup; and what each holds
afterwards (entries, traced memory). The LRU must hold its bound; SimpleMemoryCache has none."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import tracemalloc

from aiocache import SimpleMemoryCache

from proxy.checks.memo import KeyMemory, Record

N = 100_000
BOUND = 10_000
RECORD = Record(principal="p", scopes=["a"])


def digests() -> list[str]:
    return [hashlib.sha256(os.urandom(16)).hexdigest() for _ in range(N)]


async def bench_aiocache(keys: list[str]) -> dict[str, float]:
    tracemalloc.start()
    cache = SimpleMemoryCache(timeout=None)  # no per-call wait_for
    t0 = time.perf_counter()
    for k in keys:
        if await cache.get(k) is None:
            await cache.set(k, (RECORD, 0.0), ttl=300)
    t1 = time.perf_counter()
    for k in keys:
        await cache.get(k)
    t2 = time.perf_counter()
    mem = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    entries = len(cache._cache)  # type: ignore[attr-defined]
    await cache.clear()
    return {"miss+set_us": (t1 - t0) / N * 1e6, "hit_us": (t2 - t1) / N * 1e6, "entries": entries, "mib": mem / 2**20}


def bench_lru(keys: list[str]) -> dict[str, float]:
    tracemalloc.start()
    memo = KeyMemory(max_entries=BOUND)
    t0 = time.perf_counter()
    for k in keys:
        if memo.get(k) is None:
            memo.confirmed(k, RECORD, 0.0)
    t1 = time.perf_counter()
    for k in keys:
        memo.get(k)
    t2 = time.perf_counter()
    mem = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"miss+set_us": (t1 - t0) / N * 1e6, "hit_us": (t2 - t1) / N * 1e6, "entries": len(memo),
            "mib": mem / 2**20}


def main() -> None:
    keys = digests()
    a = asyncio.run(bench_aiocache(keys))
    b = bench_lru(keys)
    print(f"{N} random credentials; LRU bound {BOUND}")
    for name, r in (("aiocache SimpleMemoryCache, timeout=None", a), ("bounded LRU (KeyMemory)", b)):
        print(f"  {name:<34} miss+set {r['miss+set_us']:.2f} µs  hit {r['hit_us']:.2f} µs  entries "
              f"{int(r['entries'])}  memory {r['mib']:.1f} MiB")


if __name__ == "__main__":
    main()

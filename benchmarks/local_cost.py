"""What one decision of the local (stale) rate limiter costs as the number of keys it holds grows, with every
call on a new key (so every call past the bound evicts one): the cost must stay flat.

    python -m benchmarks.local_cost [--calls 200000]
"""

from __future__ import annotations

import argparse
import time

from proxy.checks.local import LocalLimiter

S = 1_000_000


def per_call(held: int, calls: int) -> tuple[float, float]:
    """(µs per decide, µs per remember) with `held` keys already in a limiter bounded at `held`."""
    local = LocalLimiter(max_keys=held)
    now = 1_800_000_000 * S
    for i in range(held):
        local.remember(f"warm{i}", (now // (60 * S), 1), now / S)
    started = time.perf_counter()
    for i in range(calls):
        local.decide(f"new{i}", "sliding_window", 100, 60 * S, 100, 1.0, now + i)
    decide = (time.perf_counter() - started) / calls * 1e6
    started = time.perf_counter()
    for i in range(calls):
        local.remember(f"again{i}", (now // (60 * S), 1), now / S)
    remember = (time.perf_counter() - started) / calls * 1e6
    assert len(local) == held
    return decide, remember


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.local_cost")
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    print(f"local limiter, {args.calls} calls each on a new key (every call evicts one)")
    print(f"{'keys held':>10} {'decide µs':>10} {'remember µs':>12}")
    for held in (1_000, 10_000, 100_000):
        decide, remember = per_call(held, args.calls)
        print(f"{held:>10} {decide:>10.2f} {remember:>12.2f}")


if __name__ == "__main__":
    main()

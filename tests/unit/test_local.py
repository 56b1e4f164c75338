"""The local limiter used by rate_limit stale."""

from __future__ import annotations

from proxy.checks.local import LocalLimiter

S = 1_000_000
T0 = 1_800_000_000 * S


def test_continues_from_the_last_store_state_scaled_by_local_share() -> None:
    local = LocalLimiter()
    idx = T0 // (60 * S)
    local.remember("k", (idx, 60), at=T0 / S - 5)  # the fleet used 60 of 100 this window, 5 s ago
    results = []
    for i in range(30):
        out, age = local.decide("k", "fixed_window", 100, 60 * S, 100, 0.5, T0 + i)
        results.append(out.allowed)
        if i == 0:
            assert age == 5.0
    # this process's share: limit 50, already 30 used -> 20 more
    assert results.count(True) == 20 and results[20:] == [False] * 10


def test_without_state_starts_from_an_empty_bucket_and_forgets_per_key_when_the_store_answers() -> None:
    local = LocalLimiter()
    outs = [local.decide("k", "fixed_window", 3, 60 * S, 3, 1.0, T0 + i)[0].allowed for i in range(4)]
    assert outs == [True, True, True, False]
    # The store answered for another key (out of memory, it can still deny what writes nothing): k keeps its count.
    local.remember("other", (T0 // (60 * S), 0), at=T0 / S)
    assert not local.decide("k", "fixed_window", 3, 60 * S, 3, 1.0, T0 + 5)[0].allowed
    local.remember("k", (T0 // (60 * S), 1), at=T0 / S)  # the store answered for k: its state takes over
    out, age = local.decide("k", "fixed_window", 3, 60 * S, 3, 1.0, T0 + 10)
    assert out.allowed and age is not None


def test_remembered_keys_are_bounded() -> None:
    local = LocalLimiter(max_keys=100)
    for i in range(1000):
        local.remember(f"k{i}", (1, 1), at=0.0)
    for i in range(1000):
        local.decide(f"d{i}", "fixed_window", 3, 60 * S, 3, 1.0, T0)  # keys only ever enforced locally, too
    assert len(local) == 100
    assert "d999" in local._keys and "k999" not in local._keys

"""The pure algorithm functions, at window edges (µs)."""

from __future__ import annotations

from proxy.checks.algorithms import fixed_window, gcra, sliding_window

S = 1_000_000
T0 = 1_800_000_000 * S


def test_fixed_window_counts_admissions_and_resets_at_the_boundary() -> None:
    state = None
    outs = []
    for i in range(3):
        out = fixed_window(state, T0 + i, 2, 10 * S)
        state = out.state if out.allowed else state
        outs.append(out)
    assert [o.allowed for o in outs] == [True, True, False]
    assert outs[2].retry_after == 10 * S - 2 and outs[2].state == (T0 // (10 * S), 2)
    assert fixed_window(state, T0 + 10 * S, 2, 10 * S).allowed


def test_sliding_window_retry_after_when_the_previous_window_is_the_problem() -> None:
    # the previous window had 10 of 10; 2 s into the next it weighs 8, so two more fit (9, 10)
    idx = T0 // (10 * S)
    state: tuple[int, ...] = (idx, 10, 0)
    now = T0 + 12 * S
    first = sliding_window(state, now, 10, 10 * S)
    assert first.allowed and first.remaining == 1 and first.state == (idx + 1, 1, 10)
    second = sliding_window(first.state, now, 10, 10 * S)
    assert second.allowed and second.remaining == 0
    third = sliding_window(second.state, now, 10, 10 * S)
    assert not third.allowed
    # 10 * (10 s - e) / 10 s + 2 + 1 <= 10  <=>  e >= 3 s: one more second
    assert third.retry_after == 1 * S
    assert sliding_window(second.state, now + S, 10, 10 * S).allowed
    assert not sliding_window(second.state, now + S - 1, 10, 10 * S).allowed


def test_sliding_window_never_admits_more_than_limit_in_any_window_span() -> None:
    state = None
    admitted: list[int] = []
    now = T0
    for _ in range(5000):
        now += 7_919  # ~8 ms apart, 2.5x the rate
        out = sliding_window(state, now, 50, S)
        if out.allowed:
            state = out.state
            admitted.append(now)
    # in every 1 s span, at most limit + the approximation's slack (the weighted count is an estimate)
    j = 0
    for i, t in enumerate(admitted):
        while admitted[j] <= t - S:
            j += 1
        assert i - j + 1 <= 55


def test_gcra_sustained_rate_and_burst() -> None:
    state = None
    allowed = 0
    now = T0
    for _ in range(1000):
        out = gcra(state, now, 10, S, 5)
        if out.allowed:
            state = out.state
            allowed += 1
        now += 10_000  # 100 per second offered
    # 10 s at 10/s plus the burst of 5 in hand at the start
    assert allowed in (104, 105)

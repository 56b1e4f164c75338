"""The balancer without sockets: turns, fewest in flight, ejection counts, the half rule, probation."""

from __future__ import annotations

import asyncio

from proxy.targets import Balancer, Settings, Target


def make(n: int, balance: str = "round_robin", failures: int = 3) -> Balancer:
    targets = [Target(Settings("unit", f"http://10.0.0.{i}:80", 1.0, True)) for i in range(n)]
    return Balancer("unit", targets, balance, failures, 0.05)


def names(b: Balancer, n: int) -> list[int]:
    """Which target (by index) each of n picks took."""
    picked = []
    for _ in range(n):
        t = b.pick()
        assert t is not None
        picked.append(b.targets.index(t))
    return picked


async def test_round_robin_takes_turns_and_skips_a_target_that_is_out() -> None:
    b = make(3)
    assert names(b, 6) == [0, 1, 2] * 2
    for _ in range(3):
        b.failed(b.targets[1], "test")
    assert b.targets[1].out
    assert names(b, 6) == [0, 2] * 3


async def test_least_request_takes_the_fewest_in_flight() -> None:
    b = make(3, "least_request")
    b.targets[0].in_flight, b.targets[1].in_flight, b.targets[2].in_flight = 4, 1, 2
    assert {b.pick() for _ in range(5)} == {b.targets[1]}
    b.targets[1].in_flight = 2  # a tie between 1 and 2: in turn
    assert {b.pick() for _ in range(6)} == {b.targets[1], b.targets[2]}


async def test_an_answer_clears_the_count_and_never_more_than_half_are_out() -> None:
    b = make(4, failures=2)
    b.failed(b.targets[0], "test")
    b.answered(b.targets[0])
    b.failed(b.targets[0], "test")
    assert not b.targets[0].out  # not two in a row
    for t in b.targets:
        b.failed(t, "test")
        b.failed(t, "test")
    assert sum(t.out for t in b.targets) == 2  # half of four
    assert b.pick(exclude=b.targets[2]) is b.targets[3]


async def test_a_target_back_from_out_is_on_probation() -> None:
    b = make(2, failures=3)
    t = b.targets[0]
    for _ in range(3):
        b.failed(t, "test")
    assert t.out and b.pick(exclude=b.targets[1]) is None
    while t.out:  # eject.for is 50 ms here
        await asyncio.sleep(0.01)
    b.failed(t, "test")
    assert t.out  # one failure on probation takes it out again
    while t.out:
        await asyncio.sleep(0.01)
    b.answered(t)
    b.failed(t, "test")
    assert not t.out  # an answer ended the probation


async def test_one_target_is_never_taken_out() -> None:
    b = make(1, failures=1)
    for _ in range(10):
        b.failed(b.targets[0], "test")
    assert not b.targets[0].out and b.pick() is b.targets[0] and b.pick(exclude=b.targets[0]) is None

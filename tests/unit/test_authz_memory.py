"""An authorizer's verdict memory: allows and denies are remembered apart, so denials cannot push out allows."""

from __future__ import annotations

from proxy.checks.authz import Authorizer, Remembered
from proxy.decision import Verdict
from proxy.store.breaker import Breaker


def test_a_flood_of_denials_does_not_evict_remembered_allows() -> None:
    memory = Authorizer(Breaker(5, 2.0), allows=Remembered(100), denies=Remembered(10))
    allowed = Verdict("auth", True)
    for i in range(100):
        memory.allows.put(("app", "GET", None, "/", f"Bearer good-{i}"), allowed, 1.0)
    for i in range(50_000):  # garbage credentials, each refused
        memory.denies.put(("app", "GET", None, "/", f"Bearer garbage-{i}"), Verdict("auth", False, status=401), 2.0)
    assert len(memory.allows) == 100 and len(memory.denies) == 10
    assert all(("app", "GET", None, "/", f"Bearer good-{i}") in memory.allows for i in range(100))

"""The API-key memory: bounded, keyed by hash, never holding credentials the store did not confirm."""

from __future__ import annotations

import hashlib
import os

from proxy.checks.memo import REVOKED, KeyMemory, Record


def test_random_unknown_credentials_are_never_stored() -> None:
    memo = KeyMemory(max_entries=1000)
    memo.confirmed("real", Record(principal="p"), 1.0)
    for _ in range(100_000):
        memo.missing(hashlib.sha256(os.urandom(16)).hexdigest(), 2.0)
    assert len(memo) == 1
    assert memo.get("real") == (Record(principal="p"), 1.0)


def test_bounded_with_least_recently_used_out_first() -> None:
    memo = KeyMemory(max_entries=1000)
    memo.confirmed("keep", Record(principal="k"), 0.0)
    for i in range(100_000):
        memo.confirmed(f"d{i}", Record(principal="p"), 0.0)
        if i % 500 == 0:
            memo.get("keep")  # in use: stays
    assert len(memo) == 1000
    assert memo.get("keep") is not None and memo.get("d0") is None and memo.get("d99999") is not None


def test_a_revocation_is_remembered_only_for_a_confirmed_credential() -> None:
    memo = KeyMemory()
    memo.missing("never-seen", 1.0)
    assert memo.get("never-seen") is None
    memo.confirmed("seen", Record(principal="p"), 1.0)
    memo.missing("seen", 2.0)
    assert memo.get("seen") == (REVOKED, 2.0)

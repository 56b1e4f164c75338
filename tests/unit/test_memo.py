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


def test_a_routes_memory_of_credentials_is_bounded_and_reads_what_the_header_says() -> None:
    from multidict import CIMultiDict

    from proxy.checks import auth
    from proxy.config.schema import Auth
    from proxy.keyspace import digest_of

    check = auth.AuthCheck("pay", Auth(type="api_key", scheme="Bearer", on_store_error="closed"), key_prefix="fg:",
                           retry_after=1.0)
    memo = KeyMemory()
    first = check.plan(CIMultiDict(Authorization="Bearer k1"), memo, 0.0)[1]
    again = check.plan(CIMultiDict(Authorization="bearer   k1"), memo, 0.0)[1]
    assert first is not None and again is not None and first.digest == again.digest == digest_of("k1")
    assert first is check.plan(CIMultiDict(Authorization="Bearer k1"), memo, 0.0)[1]  # the same value: kept
    assert first.op.key == "fg:apikey:" + digest_of("k1")
    verdict, lookup = check.plan(CIMultiDict(Authorization="Basic k1"), memo, 0.0)
    assert lookup is None and verdict is not None and verdict.status == 401
    for i in range(auth._RECENT + 10):  # a flood of new credentials
        check.plan(CIMultiDict(Authorization=f"Bearer flood-{i}"), memo, 0.0)
    assert len(check._recent) <= auth._RECENT

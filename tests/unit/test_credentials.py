"""A credential header as auth reads it, and as a rate limit keyed by that header counts it."""

from __future__ import annotations

import hashlib

import pytest

from proxy.checks.auth import credential_subject, parse_credential


@pytest.mark.parametrize(
    ("value", "scheme", "credential"),
    [("Bearer K", "bearer", "K"), ("bearer K", "bearer", "K"), ("BEARER   K ", "bearer", "K"),
     ("Bearer\tK", "bearer", "K"), ("Basic K", "bearer", None), ("Bearer", "bearer", None), ("", "bearer", None),
     (None, "bearer", None), ("  K  ", None, "K"), ("", None, None)],
)
def test_parse_credential(value: str | None, scheme: str | None, credential: str | None) -> None:
    assert parse_credential(value, scheme) == credential


def test_every_spelling_of_one_credential_is_one_subject() -> None:
    spellings = ["Bearer K", "bearer K", "BEARER  K", " Bearer\tK "]
    assert {credential_subject(v, "bearer") for v in spellings} == {"K"}
    assert {credential_subject(v, None) for v in spellings} == {"bearer K"}
    assert credential_subject("Basic abc", "bearer") == "basic abc"  # another scheme: folded the same way
    assert credential_subject("Bearer K", None) != credential_subject("Bearer L", None)


def test_a_keys_digest_is_its_sha256_however_many_keys_clients_send() -> None:
    from proxy import keyspace

    assert keyspace.digest_of("fg_abc") == hashlib.sha256(b"fg_abc").hexdigest()
    assert keyspace.digest_of("fg_abc") == hashlib.sha256(b"fg_abc").hexdigest()  # remembered, the same
    for i in range(10_000):  # a flood of random keys: the memory of digests stays bounded
        assert keyspace.digest_of(f"k{i}") == hashlib.sha256(f"k{i}".encode()).hexdigest()
    assert len(keyspace._DIGESTS) <= 4096


def test_a_new_key_never_starts_with_a_dash() -> None:
    from proxy.keys import new_key

    keys = [new_key() for _ in range(3000)]  # without the rule, ~47 of them would
    assert not [k for k in keys if k.startswith("-")]
    assert len(set(keys)) == len(keys) and all(len(k) == 43 for k in keys)

"""A credential header as auth reads it, and as a rate limit keyed by that header counts it."""

from __future__ import annotations

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

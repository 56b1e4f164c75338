"""An API key's record as the store keeps it. (A module of its own: a msgspec Struct must stay plain Python —
msgspec reads the annotations a compiled class no longer carries — while the memory of records, memo.py, is on
every API-key request and is compiled.)"""

from __future__ import annotations

import msgspec


class Record(msgspec.Struct, frozen=True):
    """A key's record in the store (keyspace.py; written by `failgate keys add`)."""

    principal: str
    scopes: tuple[str, ...] = ()  # (decoded as a tuple: an identity takes it as it is, no copy per request)
    expires_at: float | None = None  # unix seconds
    plan: str | None = None  # picks the quota of limits with `plans`

"""Where Failgate's API-key data lives in the store: the one place that spells the layout.

- `<prefix>apikey:<sha256 hex>`: a key's record (JSON: principal, scopes, expires_at), written by `failgate keys
  add`. Only the hash of a key is ever stored; the key itself is printed once.
- `<prefix>epoch`: the epoch marker, written with the first key. Read with every lookup: when it is missing the
  store lost its data, and a lookup is a store error, not a 401 for every valid key.
- `<prefix>revoked`: the revocation log (a sorted set of hashes scored by when), and the channel of the same name
  on which each revocation is published.
No key here has a TTL, so a Redis with a `volatile-*` eviction policy evicts counters (which expire), never these.
"""

from __future__ import annotations

import hashlib

RECORD = "apikey:"


def digest_of(key: str) -> str:
    """A key's SHA-256, as the store and every log know it."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def record_key(prefix: str, digest: str) -> str:
    return prefix + RECORD + digest


def record_pattern(prefix: str, digest_start: str = "") -> str:
    """A SCAN pattern for the records (whose hash starts with `digest_start`)."""
    return prefix + RECORD + digest_start + "*"


def digest_in(prefix: str, name: str) -> str:
    """The hash in a record's key name."""
    return name[len(prefix) + len(RECORD):]


def epoch_key(prefix: str) -> str:
    return prefix + "epoch"


def revoked_key(prefix: str) -> str:
    return prefix + "revoked"

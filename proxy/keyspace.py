"""Where Failgate's API-key data lives in the store: the one place that spells the layout.

- `<prefix>apikey:<sha256 hex>`: a key's record (JSON: principal, scopes, expires_at), written by `failgate keys
  add`. Only the hash of a key is ever stored; the key itself is printed once.
- `<prefix>epoch`: the epoch marker, written with the first key. Read with every lookup: when it is missing the
  store lost its data, and a lookup is a store error, not a 401 for every valid key.
- `<prefix>revoked`: the revocation log (a sorted set of hashes scored by when), and the channel of the same name
  on which each revocation is published.
No key here has a TTL, so a Redis with a `volatile-*` eviction policy evicts counters (which expire), never these.

On a Redis Cluster the records are bucketed (`bucketed=True`): `<prefix>apikey:{NN}<sha256 hex>`, NN the hash's
first two hex digits (256 buckets), and each bucket has its own marker `<prefix>epoch:{NN}` in the same slot. A
lookup reads the record and its bucket's marker from the node that holds both, so a master that restarted empty
is seen for what it is (its buckets' markers are gone), and a dead node fails only the lookups of its buckets.
"""

from __future__ import annotations

import hashlib

RECORD = "apikey:"


def digest_of(key: str) -> str:
    """A key's SHA-256, as the store and every log know it. Clients repeat their keys: the digests of the last
    few thousand are remembered (a SHA-256 through OpenSSL costs more to set up than to compute)."""
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        if len(_DIGESTS) >= 4096:  # bounded whatever clients send: random keys only keep clearing it
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


_DIGESTS: dict[str, str] = {}


BUCKETS = [f"{i:02x}" for i in range(256)]


def record_key(prefix: str, digest: str, bucketed: bool = False) -> str:
    if bucketed:
        return f"{prefix}{RECORD}{{{digest[:2]}}}{digest}"
    return prefix + RECORD + digest


def record_pattern(prefix: str, digest_start: str = "", bucketed: bool = False) -> str:
    """A SCAN pattern for the records (whose hash starts with `digest_start`)."""
    if bucketed and len(digest_start) >= 2:
        return f"{prefix}{RECORD}{{{digest_start[:2]}}}{digest_start}*"
    if bucketed:
        return f"{prefix}{RECORD}{{{digest_start}*"
    return prefix + RECORD + digest_start + "*"


def digest_in(prefix: str, name: str) -> str:
    """The hash in a record's key name (either layout)."""
    rest = name[len(prefix) + len(RECORD):]
    return rest[4:] if rest.startswith("{") else rest


def epoch_key(prefix: str, bucket: str | None = None) -> str:
    """The epoch marker; of one bucket (two hex digits) in the bucketed layout."""
    return prefix + "epoch" if bucket is None else f"{prefix}epoch:{{{bucket}}}"


def revoked_key(prefix: str) -> str:
    return prefix + "revoked"

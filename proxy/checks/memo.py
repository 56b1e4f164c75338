"""A bounded memory of API-key answers, keyed by the credential's SHA-256 (never the key itself).

One entry per credential the store has *confirmed*: its record, or REVOKED once a record it returned before
went missing. Credentials never seen valid are never stored, so a flood of random keys cannot grow it or push
real entries out. The oldest entries (least recently used) go first past `max_entries`.

It serves both `cache_for` (reuse a fresh answer without asking) and `on_store_error: stale` (reuse the last
answer while the store cannot be asked). aiocache's SimpleMemoryCache was measured for this and not used: it has
no entry bound and arms one timer per key (benchmarks/cache_compare.py; figures in the README).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import msgspec


class Record(msgspec.Struct, frozen=True):
    """What the store holds under `<prefix>apikey:<sha256 hex>` (written by `failgate keys add`)."""

    principal: str
    scopes: list[str] = []
    expires_at: float | None = None  # unix seconds


REVOKED: Final = "revoked"


class KeyMemory:
    def __init__(self, max_entries: int = 100_000) -> None:
        self._entries: OrderedDict[str, tuple[Record | str, float]] = OrderedDict()
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> tuple[Record | str, float] | None:
        """(record or REVOKED, when the store said so)."""
        entry = self._entries.get(digest)
        if entry is not None:
            self._entries.move_to_end(digest)
        return entry

    def confirmed(self, digest: str, record: Record, at: float) -> None:
        self._put(digest, (record, at))

    def missing(self, digest: str, at: float) -> None:
        """The store has no record: remember a revocation only for a credential it once confirmed."""
        if digest in self._entries:
            self._put(digest, (REVOKED, at))

    def _put(self, digest: str, entry: tuple[Record | str, float]) -> None:
        entries = self._entries
        entries[digest] = entry
        entries.move_to_end(digest)
        if len(entries) > self._max:
            entries.popitem(last=False)

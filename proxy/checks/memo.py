"""A bounded memory of API-key answers, keyed by the credential's SHA-256 (never the key itself).

One entry per credential the store has *confirmed*: its record, or REVOKED once a record it returned before
went missing. Credentials never seen valid are never stored, so a flood of random keys cannot grow it or push
real entries out. The oldest entries (least recently used) go first past `max_entries`.

It serves both `cache_for` (reuse a fresh answer without asking) and `on_store_error: stale` (reuse the last
answer while the store cannot be asked).

Revocations learned from the store's revocation log, its channel or the admin listener are *pinned*: never
evicted, and they win over any remembered or cached record, so a revoked key stays refused in every process, in
every mode, until the pin is older than the log keeps revocations (by then every record remembered before it
is older than the longest `stale_for`). aiocache's SimpleMemoryCache was measured for this and not used: it has
no entry bound and arms one timer per key (benchmarks/cache_compare.py; figures in the README).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from .record import Record

__all__ = ["PIN_FOR", "REVOKED", "KeyMemory", "Record"]

REVOKED: Final = "revoked"


PIN_FOR = 25 * 3600.0  # how long a pinned revocation is kept: the store's log keeps them 24 h, plus a margin


class KeyMemory:
    def __init__(self, max_entries: int = 100_000) -> None:
        self._entries: OrderedDict[str, tuple[Record | str, float]] = OrderedDict()
        self._revoked: dict[str, float] = {}  # pinned: hash -> when it was revoked
        self._max = max_entries
        self.changes = 0  # bumped on every change, so a saver knows when there is something to write

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> tuple[Record | str, float] | None:
        """(record or REVOKED, when the store said so)."""
        if self._revoked and digest in self._revoked:
            return REVOKED, self._revoked[digest]
        entry = self._entries.get(digest)
        if entry is not None:
            self._entries.move_to_end(digest)
        return entry

    def pinned(self, digest: str) -> bool:
        """Is this hash a pinned revocation? (Free when there are none.)"""
        return bool(self._revoked) and digest in self._revoked

    def revoke(self, digest: str, at: float) -> bool:
        """Pin a revocation; True when it is new here."""
        if digest in self._revoked:
            return False
        self._revoked[digest] = at
        self._entries.pop(digest, None)
        self.changes += 1
        return True

    def prune(self, now: float) -> None:
        old = [d for d, at in self._revoked.items() if now - at > PIN_FOR]
        for digest in old:
            del self._revoked[digest]
        if old:
            self.changes += 1

    def revoked(self) -> dict[str, float]:
        return dict(self._revoked)

    def entries(self) -> list[tuple[str, Record | str, float]]:
        return [(digest, value, at) for digest, (value, at) in self._entries.items()]

    def confirmed(self, digest: str, record: Record, at: float) -> None:
        if self._revoked and digest in self._revoked:
            return  # revoked here (the admin listener, during an outage): the store has not caught up yet
        self._put(digest, (record, at))

    def missing(self, digest: str, at: float) -> None:
        """The store has no record: remember a revocation only for a credential it once confirmed."""
        if digest in self._entries:
            self._put(digest, (REVOKED, at))

    def restore(self, digest: str, value: Record | str, at: float) -> None:
        """An answer remembered before a restart (from the state directory); the newer one wins."""
        current = self._entries.get(digest)
        if current is None or current[1] < at:
            self._put(digest, (value, at))

    def _put(self, digest: str, entry: tuple[Record | str, float]) -> None:
        self.changes += 1
        entries = self._entries
        entries[digest] = entry
        entries.move_to_end(digest)
        if len(entries) > self._max:
            entries.popitem(last=False)

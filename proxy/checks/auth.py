"""The auth check (api_key): request facts in, the store's record (or a remembered one) out, a Verdict.

The presented key is hashed (SHA-256) and looked up as `<prefix>apikey:<hex>` together with the store's epoch
marker `<prefix>epoch`, in the same round trip as the route's rate limit. A missing marker means the store lost
its data (restart without persistence, flush, eviction): that is a store `error`, not a 401 for every valid key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgspec

from ..config.schema import Auth
from ..decision import Verdict
from ..store.errors import StoreUnavailable
from ..store.ops import GetOp
from .memo import REVOKED, KeyMemory, Record

_decode_record = msgspec.json.Decoder(Record).decode


@dataclass(frozen=True, slots=True)
class Identity:
    principal: str
    scopes: tuple[str, ...]


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def parse_record(raw: bytes) -> Record:
    try:
        return _decode_record(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # One malformed record: this request's check fails as `error`; the store itself is fine.
        raise StoreUnavailable("error", f"malformed API-key record: {exc}", transport=False) from None


class AuthCheck:
    name = "auth"

    def __init__(self, route: str, cfg: Auth, *, key_prefix: str) -> None:
        self.route = route
        self.cfg = cfg
        self.header = cfg.header
        self.scheme = cfg.scheme.lower() + " " if cfg.scheme else None
        self.scopes = frozenset(cfg.scopes)
        self.key_prefix = key_prefix + "apikey:"
        self.epoch_key = key_prefix + "epoch"
        self._epoch_op = GetOp(self.epoch_key)  # the same for every request: made once
        self.challenge = [("WWW-Authenticate", f'{cfg.scheme} realm="failgate"')] if cfg.scheme else []

    def credential(self, headers: object) -> str | None:
        value: str | None = headers.get(self.header)  # type: ignore[attr-defined]
        if not value:
            return None
        if self.scheme is not None:
            if value[: len(self.scheme)].lower() != self.scheme:
                return None
            value = value[len(self.scheme):].strip()
        return value or None

    def ops(self, digest: str) -> list[GetOp]:
        return [GetOp(self.key_prefix + digest), self._epoch_op]

    # --- verdicts ---------------------------------------------------------------------------------------------
    def unauthorized(self, detail: str, **kw: object) -> Verdict:
        return Verdict("auth", False, status=401, code="unauthorized", detail=detail, headers=list(self.challenge),
                       **kw)  # type: ignore[arg-type]

    def judge(self, record: Record | str, now: float, **kw: object) -> tuple[Verdict, Identity | None]:
        """Apply this route's rules to a record (fresh from the store, cached, or remembered)."""
        if record == REVOKED:
            return self.unauthorized("the API key was revoked", **kw), None
        assert isinstance(record, Record)
        if record.expires_at is not None and record.expires_at <= now:
            return self.unauthorized("the API key has expired", **kw), None
        if not self.scopes.issubset(record.scopes):
            missing = ", ".join(sorted(self.scopes.difference(record.scopes)))
            return Verdict("auth", False, status=403, code="forbidden", detail=f"missing scope: {missing}",
                           **kw), None  # type: ignore[arg-type]
        return Verdict("auth", True, **kw), Identity(record.principal, tuple(record.scopes))  # type: ignore[arg-type]

    def from_store(self, digest: str, record_raw: object, epoch_raw: object, memory: KeyMemory,
                   now: float) -> tuple[Verdict, Identity | None]:
        """Raises StoreUnavailable("error") for a lost store or a malformed record."""
        for raw in (record_raw, epoch_raw):
            if isinstance(raw, StoreUnavailable):
                raise raw
        if epoch_raw is None:
            raise StoreUnavailable("error", "the store's epoch marker is missing: it lost its data (restart "
                                   "without persistence, flush or eviction)")
        if record_raw is None:
            memory.missing(digest, now)
            return self.unauthorized("unknown API key"), None
        assert isinstance(record_raw, bytes)
        record = parse_record(record_raw)
        memory.confirmed(digest, record, now)
        return self.judge(record, now)

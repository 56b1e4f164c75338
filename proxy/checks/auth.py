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
from ..observe.metrics import data_lost
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


def parse_credential(value: str | None, scheme: str | None) -> str | None:
    """The credential in a header value, as auth reads it and as a rate limit keyed by that header counts it:
    with a scheme, the token after it (the scheme matched case-insensitively, any whitespace around it ignored —
    `bearer K`, `BEARER  K` and `Bearer K` are one credential); without, the value stripped. None when absent or
    when the value does not use the scheme."""
    if not value:
        return None
    if scheme is None:
        return value.strip() or None
    parts = value.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != scheme:
        return None
    return parts[1].strip() or None


def credential_subject(value: str, scheme: str | None) -> str:
    """What a rate limit keyed by a credential header counts: the credential as auth reads it; a value in
    another scheme as `<scheme lower-cased> <token>` (so spelling cannot make a fresh bucket either)."""
    credential = parse_credential(value, scheme) if scheme is not None else None
    if credential is not None:
        return credential
    parts = value.split(None, 1)
    return parts[0].lower() + " " + parts[1].strip() if len(parts) == 2 else value.strip()


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
        self.scheme = cfg.scheme.lower() if cfg.scheme else None
        self.scopes = frozenset(cfg.scopes)
        self.key_prefix = key_prefix + "apikey:"
        self.epoch_key = key_prefix + "epoch"
        self._epoch_op = GetOp(self.epoch_key)  # the same for every request: made once
        self.challenge = [("WWW-Authenticate", f'{cfg.scheme} realm="failgate"')] if cfg.scheme else []

    def credential(self, headers: object) -> str | None:
        return parse_credential(headers.get(self.header), self.scheme)  # type: ignore[attr-defined]

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
            data_lost()
            raise StoreUnavailable("error", "the store's epoch marker is missing: it lost its data (restart "
                                   "without persistence, flush or eviction)")
        if record_raw is None:
            memory.missing(digest, now)
            return self.unauthorized("unknown API key"), None
        assert isinstance(record_raw, bytes)
        record = parse_record(record_raw)
        memory.confirmed(digest, record, now)
        return self.judge(record, now)

"""The auth check (api_key): request facts in, the store's record (or a remembered one) out, a Verdict.

The presented key is hashed (SHA-256) and its record read together with the store's epoch marker (the layout is
in keyspace.py) in one command, in the same round trip as the route's rate limit. A missing marker means the store lost
its data (restart without persistence, flush, eviction): that is a store `error`, not a 401 for every valid key.
"""

from __future__ import annotations

import msgspec
from multidict import istr

from ..config.schema import Auth
from ..decision import Basis, Identity, Reason, Verdict
from ..failmode import FailMode
from ..keyspace import BUCKETS, digest_of, epoch_key, record_key
from ..observe.metrics import data_lost
from ..store.errors import StoreUnavailable
from ..store.ops import GetOp
from . import CheckKind
from .memo import REVOKED, KeyMemory, Record

_decode_record = msgspec.json.Decoder(Record).decode


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


_RECENT = 4096  # credentials whose lookup one route keeps at most


class Lookup:
    """What a credential's check asks the store, made once per credential and kept (`AuthCheck._recent`): its
    hash, the read of its record and the epoch marker, and the last record read for it, decoded, with the route's
    verdict on it (the store's answer is usually the same bytes as last time). A plain class, shared by the
    requests of one credential."""

    __slots__ = ("digest", "op", "raw", "record", "verdict")

    def __init__(self, digest: str, op: GetOp) -> None:
        self.digest = digest
        self.op = op
        self.raw: bytes | None = None
        self.record: Record | None = None
        self.verdict: Verdict | None = None  # the record's verdict, when it cannot change with time (no expiry)


class AuthCheck(CheckKind):
    """The api_key check kind: its config compiled, its plan (a verdict reached without the store, or the
    credential's hash to look up), its decide (the store's answer, or its failure through the fail-mode table)
    and its stale memory (the remembered records, memo.py)."""

    name = "auth"

    def __init__(self, route: str, cfg: Auth, *, key_prefix: str, retry_after: float, bucketed: bool = False) -> None:
        super().__init__(route, cfg, retry_after)
        self.cfg: Auth = cfg
        self.failmode = FailMode("auth", self.mode, "auth", status=cfg.status_on_error, retry_after=retry_after,
                                 stale_fallback=cfg.stale_fallback)
        self.header = istr(cfg.header)
        self.scheme = cfg.scheme.lower() if cfg.scheme else None
        self.scopes = frozenset(cfg.scopes)
        self.cache_for = float(cfg.cache_for)  # (a plain float: read on every request)
        self.key_prefix = key_prefix
        self.bucketed = bucketed  # a Redis Cluster: records and markers per bucket (keyspace.py)
        self._epoch = epoch_key(key_prefix)
        self._bucket_epochs = {b: epoch_key(key_prefix, b) for b in BUCKETS} if bucketed else {}
        self.challenge = [("WWW-Authenticate", f'{cfg.scheme} realm="failgate"')] if cfg.scheme else []
        self._missing = "missing credentials" if cfg.scheme is None else \
            f"missing credentials ({cfg.scheme} <key> in {cfg.header})"
        # header value -> its Lookup: clients repeat their credentials. Bounded: a flood of new ones (valid or
        # not) only keeps clearing it, as the digests' memo (keyspace.py) does.
        self._recent: dict[str, Lookup] = {}

    # --- plan -------------------------------------------------------------------------------------------------
    def plan(self, headers: object, memory: KeyMemory, now: float) -> tuple[Verdict | None, Lookup | None]:
        """(the verdict, when it needs no store: no credential, a pinned revocation, a `cache_for` answer) or
        (None, the credential's Lookup, whose `op` goes in the round trip)."""
        value = headers.get(self.header)  # type: ignore[attr-defined]
        lookup = self._recent.get(value) if value is not None else None
        if lookup is None:
            credential = parse_credential(value, self.scheme)
            if credential is None:
                return self.unauthorized(self._missing), None
            lookup = self.lookup(digest_of(credential))
            if len(self._recent) >= _RECENT:
                self._recent.clear()
            self._recent[value] = lookup
        digest = lookup.digest
        if memory.pinned(digest) or self.cache_for > 0:
            cached = memory.get(digest)
            if cached is not None and (cached[0] == REVOKED or now - cached[1] < self.cache_for):
                return self.judge(cached[0], now), None
        return None, lookup

    def lookup(self, digest: str) -> Lookup:
        """The read of a credential's record and the epoch marker, in one command (on a Cluster both are in the
        record's bucket's slot)."""
        if self.bucketed:
            return Lookup(digest, GetOp(record_key(self.key_prefix, digest, True), self._bucket_epochs[digest[:2]]))
        return Lookup(digest, GetOp(record_key(self.key_prefix, digest), self._epoch))

    # --- decide -----------------------------------------------------------------------------------------------
    def decide(self, lookup: Lookup, answer: list[object] | StoreUnavailable, memory: KeyMemory,
               now: float) -> Verdict:
        """The store's answer to the lookup's read (or its failure, decided by the fail-mode table) as a
        Verdict."""
        digest = lookup.digest
        if type(answer) is not StoreUnavailable:
            assert isinstance(answer, list)
            read = answer[0]  # [record, marker], or this read's own error reply
            try:
                if type(read) is StoreUnavailable:
                    raise read
                assert isinstance(read, list)
                return self.from_store(lookup, read[0], read[1], memory, now)
            except StoreUnavailable as exc:
                answer = exc
        assert isinstance(answer, StoreUnavailable)

        def remembered(reason: Reason) -> Verdict:
            entry = memory.get(digest)
            if entry is not None and now - entry[1] <= self.cfg.stale_for:
                return self.judge(entry[0], now, basis="stale", reason=reason, age=now - entry[1])
            return self.failmode.fallback(reason)

        return self.failmode.decide(answer, remembered)

    def from_store(self, lookup: Lookup, record_raw: object, epoch_raw: object, memory: KeyMemory,
                   now: float) -> Verdict:
        """Raises StoreUnavailable("error") for a lost store or a malformed record."""
        if epoch_raw is None:
            data_lost()
            raise StoreUnavailable("error", "the store's epoch marker is missing: it lost its data (restart "
                                   "without persistence, flush or eviction)")
        if record_raw is None:
            memory.missing(lookup.digest, now)
            return self.unauthorized("unknown API key")
        assert isinstance(record_raw, bytes)
        if record_raw == lookup.raw:  # the same bytes as last time: the same record
            record = lookup.record
            assert record is not None
        else:
            record = parse_record(record_raw)
            lookup.raw, lookup.record, lookup.verdict = record_raw, record, None
        memory.confirmed(lookup.digest, record, now)
        verdict = lookup.verdict
        if verdict is None:
            verdict = self.judge(record, now)
            if record.expires_at is None:  # the same record, the same route: the same verdict until it changes
                lookup.verdict = verdict
        return verdict

    # --- verdicts ---------------------------------------------------------------------------------------------
    def unauthorized(self, detail: str, basis: Basis = "checked", reason: Reason | None = None,
                     age: float | None = None) -> Verdict:
        return Verdict("auth", False, basis, status=401, code="unauthorized", detail=detail,
                       headers=list(self.challenge), reason=reason, age=age)

    def judge(self, record: Record | str, now: float, basis: Basis = "checked", reason: Reason | None = None,
              age: float | None = None) -> Verdict:
        """Apply this route's rules to a record (fresh from the store, cached, or remembered). (Each argument is
        passed by name rather than forwarded as **kw: on every allowed request, and a compiled build calls a
        known signature directly.)"""
        if record == REVOKED:
            return self.unauthorized("the API key was revoked", basis, reason, age)
        assert isinstance(record, Record)
        if record.expires_at is not None and record.expires_at <= now:
            return self.unauthorized("the API key has expired", basis, reason, age)
        if self.scopes and not self.scopes.issubset(record.scopes):
            missing = ", ".join(sorted(self.scopes.difference(record.scopes)))
            return Verdict("auth", False, basis, status=403, code="forbidden", detail=f"missing scope: {missing}",
                           reason=reason, age=age)
        identity = Identity(record.principal, tuple(record.scopes), record.plan)
        return Verdict("auth", True, basis, reason=reason, age=age, identity=identity)

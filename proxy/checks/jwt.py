"""The jwt check kind: a bearer token verified with the identity provider's key set. Its dependency is the key
set (jwks.py fetches it in the background); its stale memory is the last good set; it never asks the store.

Verification is PyJWT's (with `cryptography`), never our own: signature, `exp`, `nbf`, `iss`, `aud`, the `alg`
in `algorithms` and of the key's own type (an RSA public key is never an HMAC secret), the `kid` looked up in the
held set. A token that fails verification with a held key is 401 in every mode: no fail mode relaxes a token's
own validity. Verified tokens are remembered until they expire (keyed by the token's hash), so a repeated token
costs a look-up, not a signature check; a key the set no longer has invalidates what it verified.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import jwt as pyjwt
from jwt.exceptions import PyJWTError
from multidict import istr

from ..config.schema import Auth
from ..decision import Identity, Reason, Verdict
from ..failmode import FailMode, unchecked_allow
from ..jwks import KeySet
from ..store.errors import StoreUnavailable
from . import CheckKind
from .auth import parse_credential

MAX_TOKEN = 16 * 1024  # longer than any real token; refused before any work
_RECENT = 4096  # header values whose token hash one route keeps at most


class TokenMemory:
    """Verified tokens until they expire: sha256(token) -> (identity, exp, kid). Bounded, oldest out first."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._entries: OrderedDict[str, tuple[Identity, float, str | None]] = OrderedDict()
        self._max = max_entries

    def get(self, digest: str, now: float) -> tuple[Identity, float, str | None] | None:
        entry = self._entries.get(digest)
        if entry is not None and entry[1] <= now:
            del self._entries[digest]
            return None
        return entry

    def put(self, digest: str, identity: Identity, exp: float, kid: str | None) -> None:
        entries = self._entries
        entries[digest] = (identity, exp, kid)
        if len(entries) > self._max:
            entries.popitem(last=False)


class JwtCheck(CheckKind):
    name = "auth"

    def __init__(self, route: str, cfg: Auth, *, retry_after: float, keyset: KeySet, tokens: TokenMemory) -> None:
        super().__init__(route, cfg, retry_after)
        self.cfg: Auth = cfg
        self.failmode = FailMode("jwt", self.mode, "auth", status=cfg.status_on_error, retry_after=retry_after,
                                 stale_fallback=cfg.stale_fallback)
        self.keyset = keyset
        self.tokens = tokens
        self.header = istr(cfg.header)
        self.scheme = (cfg.scheme or "Bearer").lower()
        self.scopes = frozenset(cfg.scopes)
        self.algorithms = list(cfg.algorithms or [])
        self.audiences = cfg.audiences or None
        self.challenge = [("WWW-Authenticate", f'{cfg.scheme or "Bearer"} realm="failgate"')]
        self.invalid = [("WWW-Authenticate", f'{cfg.scheme or "Bearer"} error="invalid_token"')]
        # header value -> its token's hash: clients repeat their tokens, and a hash through OpenSSL costs more to
        # set up than to compute. Bounded: a flood of new values only keeps clearing it.
        self._recent: dict[str, str] = {}

    # --- plan: a jwt route decides without the store ----------------------------------------------------------
    def plan(self, headers: object, memory: object, now: float) -> tuple[Verdict, None]:
        value = headers.get(self.header)  # type: ignore[attr-defined]
        keyset = self.keyset
        digest = self._recent.get(value) if value is not None else None
        if digest is not None and keyset.fresh(now):  # a token seen here before, verified and not expired: most often
            identity = self._known(digest, now)
            if identity is not None:
                return self._judge(identity), None
        token = parse_credential(value, self.scheme)
        if token is None:
            return Verdict("auth", False, status=401, code="unauthorized", detail="missing bearer token",
                           headers=list(self.challenge)), None
        if len(token) > MAX_TOKEN:
            return self._invalid("the token is too large"), None
        if digest is None:
            digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
            if len(self._recent) >= _RECENT:
                self._recent.clear()
            self._recent[value] = digest
        if keyset.fresh(now):
            return self._verify(token, digest, now), None
        # The key set could not be refreshed: the fail-mode table decides what the held set is still good for.
        failure = StoreUnavailable(keyset.failure or "unavailable")  # type: ignore[arg-type]

        def remembered(reason: Reason) -> Verdict:
            held = keyset.keys and keyset.fetched_at is not None
            if self.mode == "open":
                if held:
                    return self._verify(token, digest, now, basis="open", reason=reason)
                return unchecked_allow("auth", reason, basis="open")
            age = now - keyset.fetched_at if keyset.fetched_at is not None else None
            if held and age is not None and age <= self.cfg.stale_for:
                return self._verify(token, digest, now, basis="stale", reason=reason, age=age)
            return self.failmode.fallback(reason)

        return self.failmode.decide(failure, remembered), None

    # --- verification -----------------------------------------------------------------------------------------
    def _known(self, digest: str, now: float) -> Identity | None:
        """The identity of a token verified before, not expired, whose key the set still has."""
        known = self.tokens.get(digest, now)
        if known is not None and (known[2] in self.keyset.keys or self.keyset.always_fresh):
            return known[0]
        return None

    def _verify(self, token: str, digest: str, now: float, **tag: Any) -> Verdict:
        """`digest`: the token's SHA-256, the verified tokens' memory's key."""
        identity = self._known(digest, now)
        if identity is not None:
            return self._judge(identity, **tag)
        try:
            header = pyjwt.get_unverified_header(token)
        except PyJWTError:
            return self._invalid("the token is not a JWT", **tag)
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.algorithms:
            return self._invalid(f"the token's algorithm {alg!r} is not accepted here", **tag)
        key: Any
        if alg.startswith("HS"):
            key = self.cfg.secret
        else:
            key = self.keyset.key(kid if isinstance(kid, str) else None, alg)
            if key is None:
                if self.keyset.refetch is not None and kid not in self.keyset.keys:
                    self.keyset.refetch()  # perhaps a key published since the last refresh
                return self._invalid("the token's key is not in the key set", **tag)
        try:
            claims = pyjwt.decode(token, key, algorithms=[alg], audience=self.audiences, issuer=self.cfg.issuer,
                                  leeway=self.cfg.leeway, options={"require": ["exp"]})
        except PyJWTError as exc:
            return self._invalid(f"the token is not valid: {exc}", **tag)
        principal = claims.get(self.cfg.principal_claim)
        if not isinstance(principal, str) or not principal:
            return self._invalid(f"the token has no {self.cfg.principal_claim} claim", **tag)
        raw_scopes = claims.get(self.cfg.scopes_claim, [])
        scopes = raw_scopes.split() if isinstance(raw_scopes, str) else [s for s in raw_scopes if isinstance(s, str)] \
            if isinstance(raw_scopes, list) else []
        plan = claims.get(self.cfg.plan_claim) if self.cfg.plan_claim else None
        identity = Identity(principal, tuple(scopes), plan if isinstance(plan, str) else None)
        self.tokens.put(digest, identity, float(claims["exp"]) + self.cfg.leeway, kid if isinstance(kid, str) else None)
        return self._judge(identity, **tag)

    def _judge(self, identity: Identity, **tag: Any) -> Verdict:
        if not self.scopes.issubset(identity.scopes):
            missing = ", ".join(sorted(self.scopes.difference(identity.scopes)))
            return Verdict("auth", False, status=403, code="forbidden", detail=f"missing scope: {missing}", **tag)
        if not tag:  # checked: the common case, a direct call (keyword arguments passed on are a dictionary)
            return Verdict("auth", True, identity=identity)
        return Verdict("auth", True, identity=identity, **tag)

    def _invalid(self, detail: str, **tag: Any) -> Verdict:
        return Verdict("auth", False, status=401, code="unauthorized", detail=detail, headers=list(self.invalid),
                       **tag)

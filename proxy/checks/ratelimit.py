"""The rate_limit check kind: its config compiled, its plan (a key and one store operation), its decide (the
store's answer, or its failure through the fail-mode table, as a Verdict) and its stale memory (local.py).

Keys: `<prefix>rl:{<route>:<subject>}:<algorithm>:<window ms>`, where the subject is a hash of the
client's address (IPv6 per /64), of a header's value, of the principal, or the route itself. Client input never
appears in a key; the algorithm and window are part of it, so a changed limit never reads an incompatible value;
the braces are a hash tag that keeps a check's keys in one cluster slot.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math

from ..config.schema import RateLimit
from ..decision import Basis, Reason, Verdict
from ..failmode import degraded
from ..store.errors import StoreUnavailable
from ..store.ops import RateOp, RateResult
from . import CheckKind
from .auth import credential_subject
from .local import LocalLimiter


def subject_hash(value: str) -> str:
    return hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()


_CLIENT_KEYS: dict[str, str] = {}  # address -> hashed subject: clients repeat, hashing each time is waste


def client_key(address: str) -> str:
    key = _CLIENT_KEYS.get(address)
    if key is None:
        if len(_CLIENT_KEYS) >= 50_000:
            _CLIENT_KEYS.clear()
        key = _CLIENT_KEYS[address] = "ip:" + subject_hash(client_subject(address))
    return key


def client_subject(address: str) -> str:
    """IPv4 as is; IPv6 by its /64 (one host usually owns the whole /64)."""
    if ":" in address:
        try:
            ip = ipaddress.IPv6Address(address.split("%", 1)[0])
        except ValueError:
            return address
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False).network_address) + "/64"
    return address


class RateLimitCheck(CheckKind):
    name = "rate_limit"

    def __init__(self, route: str, cfg: RateLimit, *, key_prefix: str, workers: int, retry_after: float,
                 auth_header: str | None = None, auth_scheme: str | None = None) -> None:
        super().__init__(route, cfg, retry_after)
        self.cfg: RateLimit = cfg
        self.algorithm = cfg.algorithm
        self.limit = cfg.limit
        self.window = round(cfg.per * 1_000_000)
        self.burst = cfg.burst or cfg.limit
        self.key_kind, _, self.header = cfg.key.partition(":")
        # A credential header is counted as auth reads it, never by its raw bytes: `bearer K` and `Bearer  K`
        # must not be two buckets. The route's auth header uses the route's scheme.
        low = self.header.lower()
        self._credential: tuple[str | None] | None = None  # (the scheme auth expects,) for a credential header
        if auth_header is not None and low == auth_header.lower():
            self._credential = (auth_scheme.lower() if auth_scheme else None,)
        elif low in ("authorization", "proxy-authorization"):
            self._credential = (None,)
        self.local_share = cfg.local_share if cfg.local_share is not None else 1.0 / workers
        self._key_head = f"{key_prefix}rl:{{{route}:"
        self._key_tail = f"}}:{cfg.algorithm}:{round(cfg.per * 1000)}"
        self._fixed_key: str | None = None
        self._fixed_op: RateOp | None = None
        if self.key_kind == "route":
            self._fixed_key = self._key_head + "route" + self._key_tail
            self._fixed_op = RateOp(cfg.algorithm, self._fixed_key, cfg.limit, self.window, self.burst)
        window_s = max(1, math.ceil(cfg.per))
        self.policy = ("RateLimit-Policy", f'"{route}";q={cfg.limit};w={window_s}')

    def key(self, client: str, headers: object, principal: str | None) -> str:
        if self._fixed_key is not None:
            return self._fixed_key
        if self.key_kind == "client_ip":
            subject = client_key(client)
        elif self.key_kind == "header":
            value = headers.get(self.header)  # type: ignore[attr-defined]
            if value is None:
                subject = "anonymous"
            else:
                if self._credential is not None:
                    value = credential_subject(value, self._credential[0])
                subject = "h:" + subject_hash(value)
        else:  # principal; unknown (auth decided degraded) falls back to the client address
            subject = "p:" + subject_hash(principal) if principal else client_key(client)
        return self._key_head + subject + self._key_tail

    def op(self, key: str) -> RateOp:
        if key is self._fixed_key and self._fixed_op is not None:
            return self._fixed_op  # a `route` key: the same operation for every request, made once
        return RateOp(self.algorithm, key, self.limit, self.window, self.burst)

    def decide(self, key: str, answer: RateResult | StoreUnavailable, memory: LocalLimiter, now: float) -> Verdict:
        """The store's answer for `key` (or its failure, decided by the fail-mode table) as a Verdict."""
        if type(answer) is not StoreUnavailable:
            assert isinstance(answer, RateResult)
            if self.mode == "stale":
                memory.remember(key, answer.state, now)
            return self.verdict(answer)
        assert isinstance(answer, StoreUnavailable)

        def local(reason: Reason) -> Verdict:
            result, age = memory.decide(key, self.algorithm, self.limit, self.window, self.burst, self.local_share,
                                        int(now * 1_000_000))
            return self.verdict(result, basis="stale", reason=reason, age=age)

        return degraded("rate_limit", self.mode, answer, status=self.cfg.status_on_error,
                        retry_after=self.retry_after, remembered=local)

    def verdict(self, result: RateResult, *, basis: Basis = "checked", reason: Reason | None = None,
                age: float | None = None) -> Verdict:
        """One answer — from the store, or enforced locally while it cannot answer — as a Verdict."""
        headers = [self.policy, ("RateLimit", f'"{self.route}";r={result.remaining};t={math.ceil(result.reset_after)}')]
        if result.allowed:
            return Verdict("rate_limit", True, basis=basis, reason=reason, headers=headers, age=age)
        retry = max(1, math.ceil(result.retry_after))
        headers.append(("Retry-After", str(retry)))
        where = " (enforced locally while the store cannot answer)" if basis == "stale" else ""
        return Verdict("rate_limit", False, basis=basis, reason=reason, status=429, code="rate_limited",
                       detail=f"rate limit of {self.limit} per {self.cfg.per:g}s exceeded{where}; retry in {retry}s",
                       headers=headers, age=age)

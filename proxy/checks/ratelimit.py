"""The rate_limit check kind: its config compiled (`RateLimitCheck`, one limit), its plan and decide per subject
(`LimitGroup`: every limit of a route counted by the same key, decided together), its stale memory (local.py).

A route has one limit or a list of named ones. Limits counted by the same key (`client_ip`, one `header:`,
`principal`, `route`) form a group: one store operation for all of them, decided atomically — a request one limit
denies consumes nothing from the others; a `shadow` limit is counted and reported but never denies. Limits on
different keys are independent. A limit with `plans` takes its quota from the credential's plan.

Keys: `<prefix>rl:{<route>:<subject>}[:<name>][@<plan>]:<algorithm>:<window ms>`, where the subject is a hash of
the client's address (IPv6 per /64), of a header's value (a credential as auth reads it), of the principal, or
the route itself. Client input never appears in a key; the algorithm and window are part of it, so a changed
limit never reads an incompatible value; the braces are a hash tag that keeps a subject's keys in one cluster slot.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Callable

from ..config.schema import RateLimit
from ..decision import Basis, Quota, Reason, Verdict
from ..failmode import FailMode
from ..store.errors import StoreUnavailable
from ..store.ops import LimitsOp, Op, RateOp, RateResult
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


UNLIMITED = -1  # a plan's quota that skips the limit (and its store call)
_RECENT = 10_000  # subjects whose store operation a limit group keeps at most
_new_tuple = tuple.__new__  # a NamedTuple made without its Python-level __new__: on every request


_Call = tuple[str, str, int, int, int, bool]  # algorithm, key tail, quota, window, burst, shadow
_Made = tuple[tuple["RateLimitCheck", ...], tuple[_Call, ...], tuple[object, ...] | None]


class Planned:
    """A subject's store operation, with the limit behind each of its parts. (A plain class, made for every
    rate-limited request: compiled, one call; see decision.py.)"""

    __slots__ = ("limits", "op", "ops")

    def __init__(self, op: Op, limits: tuple[RateLimitCheck, ...], ops: tuple[RateOp, ...]) -> None:
        self.op = op
        self.limits = limits
        self.ops = ops


class RateLimitCheck(CheckKind):
    """One limit, compiled."""

    name = "rate_limit"

    def __init__(self, route: str, cfg: RateLimit, *, retry_after: float, workers: int) -> None:
        super().__init__(route, cfg, retry_after)
        self.cfg: RateLimit = cfg
        self.check = f"rate_limit.{cfg.name}" if cfg.name else "rate_limit"  # in metrics, tags, the log
        self.failmode = FailMode("rate_limit", self.mode, self.check, status=cfg.status_on_error,
                                 retry_after=retry_after)
        self.policy = f"{route}.{cfg.name}" if cfg.name else route  # the IETF policy name
        self.algorithm = cfg.algorithm
        self.limit = cfg.limit
        self.window = round(cfg.per * 1_000_000)
        self.window_s = max(1, math.ceil(cfg.per))
        self.burst = cfg.burst or cfg.limit
        self.shadow = cfg.shadow
        self.local_share = cfg.local_share if cfg.local_share is not None else 1.0 / workers
        self.plans = {plan: UNLIMITED if quota == "unlimited" else int(quota)
                      for plan, quota in (cfg.plans or {}).items()}
        # Everything about the store call but the subject, made once per plan: (key tail, limit, burst) or None
        # for an unlimited plan. gcra's bucket is `burst`, or the plan's quota when a plan picked it.
        tail = f"{':' + cfg.name if cfg.name else ''}%s:{cfg.algorithm}:{round(cfg.per * 1000)}"
        burst = self.burst if cfg.algorithm == "gcra" else cfg.limit
        self._calls: dict[str | None, tuple[str, int, int] | None] = {None: (tail % "", cfg.limit, burst)}
        for plan, quota in self.plans.items():
            self._calls[plan] = None if quota == UNLIMITED else (tail % f"@{plan}", quota, quota)
        self._items: dict[int, str] = {}  # quota -> its RateLimit-Policy item

    def call(self, plan: str | None) -> tuple[str, int, int] | None:
        """(key tail, quota, burst) of this limit's store call for a plan; None: unlimited for it."""
        return self._calls[plan] if plan in self._calls else self._calls[None]

    def op(self, subject_key: str, plan: str | None) -> RateOp | None:
        """This limit's store call for a subject (None: unlimited for the plan). Without `plans` every request
        is counted against `limit`; with them, a plan they name picks its quota and its own counter."""
        call = self._calls[plan] if plan in self._calls else self._calls[None]
        if call is None:
            return None
        tail, limit, burst = call
        return RateOp(self.algorithm, subject_key + tail, limit, self.window, burst, None, self.shadow)

    def verdict(self, op: RateOp, result: RateResult, *, basis: Basis = "checked", reason: Reason | None = None,
                age: float | None = None) -> Verdict:
        """One answer — from the store, or enforced locally while it cannot answer — as a Verdict."""
        q = op.burst if op.algorithm == "gcra" else op.limit  # what the quota is: a gcra bucket holds `burst`
        item = self._items.get(q)
        if item is None:
            item = self._items[q] = f'"{self.policy}";q={q};w={self.window_s}'
        allowed = result.allowed
        quota = Quota(item, self.policy, q, result.remaining if result.remaining < q else q, result.reset_after,
                      0.0 if allowed else result.retry_after)
        if allowed:
            if reason is None:  # checked: the common case, with the fewest arguments
                return Verdict(self.check, True, quota=quota)
            return Verdict(self.check, True, basis=basis, reason=reason, age=age, quota=quota)
        if self.shadow:
            return Verdict(self.check, True, basis=basis, reason=reason, age=age, quota=quota, shadow_deny=True)
        where = " (enforced locally while the store cannot answer)" if basis == "stale" else ""
        retry = max(1, math.ceil(result.retry_after))
        return Verdict(self.check, False, basis=basis, reason=reason, status=429, code="rate_limited",
                       detail=f"rate limit {self.policy} of {op.limit} per {self.cfg.per:g}s exceeded{where}; "
                              f"retry in {retry}s", age=age, quota=quota)


class LimitGroup:
    """The limits of one route counted by one key: planned and decided together."""

    def __init__(self, route: str, limits: list[RateLimitCheck], *, key_prefix: str, auth_header: str | None,
                 auth_scheme: str | None) -> None:
        self.route = route
        self.limits = limits
        first = limits[0].cfg
        self.key_kind, _, self.header = first.key.partition(":")
        # Needs auth's answer first: the principal, or the plan that picks a quota.
        self.needs_auth = self.key_kind == "principal" or any(limit.plans for limit in limits)
        # A credential header is counted as auth reads it, never by its raw bytes: `bearer K` and `Bearer  K`
        # must not be two buckets. The route's auth header uses the route's scheme.
        low = self.header.lower()
        self._credential: tuple[str | None] | None = None  # (the scheme auth expects,) for a credential header
        if auth_header is not None and low == auth_header.lower():
            self._credential = (auth_scheme.lower() if auth_scheme else None,)
        elif low in ("authorization", "proxy-authorization"):
            self._credential = (None,)
        self._single = limits[0] if len(limits) == 1 else None
        # Per plan the limits name (any other plan is None's): what its requests share, made once (`_make`).
        self._plans = frozenset(plan for limit in limits for plan in limit.plans)
        self._made: dict[str | None, _Made] = {}
        self._stale = any(limit.mode == "stale" for limit in limits)  # some answers are remembered locally
        self._singles = (limits[0],)
        self._key_head = f"{key_prefix}rl:{{{route}:"
        self._fixed_key = self._key_head + "route}" if self.key_kind == "route" else None
        # the same operation for every request of a `route` key without plans: made once
        self._fixed = self._plan(self._fixed_key, None) if self._fixed_key is not None and not self.needs_auth \
            else None
        # the operations of recent subjects (without a plan): a client's requests repeat it — operations are
        # values the store only reads. Bounded: a flood of new subjects only keeps clearing it. Found by the
        # subject's key, or for a `client_ip` key by the address itself (its key is made only the first time).
        self._recent: dict[str, Planned] = {}
        self._by_address = self.key_kind == "client_ip"

    # --- plan -------------------------------------------------------------------------------------------------
    def key(self, client: str, headers: object, principal: str | None) -> str:
        """The subject's key stem (each limit adds its own tail)."""
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
        return self._key_head + subject + "}"

    def plan_request(self, client: str, headers: object, principal: str | None, plan: str | None) -> Planned | None:
        """`plan(key(…), plan)` for one request, through the memory of recent subjects."""
        if self._by_address and plan is None:
            planned = self._recent.get(client)
            if planned is None:
                planned = self._plan(self.key(client, headers, principal), None)
                self._remember(client, planned)
            return planned
        return self.plan(self.key(client, headers, principal), plan)

    def _remember(self, name: str, planned: Planned | None) -> None:
        if planned is not None:
            if len(self._recent) >= _RECENT:
                self._recent.clear()
            self._recent[name] = planned

    def plan(self, key: str, plan: str | None) -> Planned | None:
        """The store operation for this subject, and which limit each part is (None: every limit is unlimited
        for this plan — nothing to ask)."""
        if self._fixed is not None:
            return self._fixed
        if plan is not None:
            return self._plan(key, plan)
        planned = self._recent.get(key)
        if planned is None:
            planned = self._plan(key, None)
            self._remember(key, planned)
        return planned

    def _plan(self, key: str, plan: str | None) -> Planned | None:
        if self._single is not None:  # one limit: the common case, without the lists
            op = self._single.op(key, plan)
            return None if op is None else Planned(op, self._singles, (op,))
        if plan not in self._plans:
            plan = None  # a plan no limit names (client-influenced) is no plan: the table stays bounded
        made = self._made.get(plan) or self._make(plan)
        limits, calls, shape = made
        if not calls:
            return None
        ops = tuple([RateOp(algorithm, key + tail, limit, window, burst, None, shadow)
                     for algorithm, tail, limit, window, burst, shadow in calls])
        if shape is None:
            return Planned(ops[0], limits, ops)
        return Planned(_new_tuple(LimitsOp, (ops, shape)), limits, ops)

    def _make(self, plan: str | None) -> _Made:
        """What every request of a plan shares (made once per plan the limits name, and once for the rest): the
        limits that count, everything of their store calls but the subject, and the call's shape."""
        limits, calls = [], []
        for limit in self.limits:
            call = limit.call(plan)
            if call is not None:
                tail, quota, burst = call
                limits.append(limit)
                calls.append((limit.algorithm, tail, quota, limit.window, burst, limit.shadow))
        shape = tuple((c[0], c[2], c[3], c[4], c[5]) for c in calls) if len(calls) > 1 else None
        made = self._made[plan] = (tuple(limits), tuple(calls), shape)
        return made

    # --- decide -----------------------------------------------------------------------------------------------
    def decide(self, planned: Planned, answer: object, memory: LocalLimiter, now: float) -> list[Verdict]:
        """The store's answer to the planned operation (or its failure, decided limit by limit by the fail-mode
        table), one Verdict per limit."""
        op, limits, ops = planned.op, planned.limits, planned.ops
        if type(answer) is RateResult:  # one limit, answered: the common case
            limit = limits[0]
            if limit.mode == "stale":
                memory.remember(op.key, answer.state, now)  # type: ignore[union-attr]
            return [limit.verdict(op, answer)]  # type: ignore[arg-type]
        if type(answer) is not StoreUnavailable:
            for result in answer:  # type: ignore[attr-defined]
                if type(result) is StoreUnavailable:  # an error reply: the whole group failed
                    return self.decide(planned, result, memory, now)
            if self._stale:
                for limit, o, result in zip(limits, ops, answer, strict=True):  # type: ignore[call-overload]
                    if limit.mode == "stale":
                        memory.remember(o.key, result.state, now)
            return [limit.verdict(o, result) for limit, o, result in zip(limits, ops, answer, strict=True)]  # type: ignore[call-overload]
        assert isinstance(answer, StoreUnavailable)
        if not self._stale:  # nothing remembered locally: each limit's allow or deny, from the table
            return [limit.failmode.decide(answer) for limit in limits]
        # every stale limit of the subject, decided together here as the store would
        stale = [(limit, o) for limit, o in zip(limits, ops, strict=True) if limit.mode == "stale"]
        answers = memory.decide_together([(o, limit.local_share) for limit, o in stale], int(now * 1_000_000))
        local = {id(o): (limit, o, result, age) for (limit, o), (result, age) in zip(stale, answers, strict=True)}

        def remembered_for(o: RateOp) -> Callable[[Reason], Verdict]:
            def remembered(reason: Reason) -> Verdict:
                limit, _, result, age = local[id(o)]
                return limit.verdict(o, result, basis="stale", reason=reason, age=age)
            return remembered

        return [limit.failmode.decide(answer, remembered_for(o) if limit.failmode.remembers else None)
                for limit, o in zip(limits, ops, strict=True)]

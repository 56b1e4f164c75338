"""The http check kind: an external authorizer decides (`GET <url>` with the request's credentials and facts).

Its dependency is the authorizer itself: its own connection pool and its own breaker (its failures never open
the store's breaker, nor the store's its). A 2xx allows (the named response headers go upstream); any other status
below 500 denies with that status, the authorizer's `WWW-Authenticate`, `Location` and body passed on (a 302 to a
login page works); a 5xx, a timeout, a refused or reset connection is a failure of the dependency, and the route's
fail mode decides. Its stale memory: the verdicts the authorizer actually gave, keyed by route, method, host,
normalized path and the forwarded headers (or `cache_key`), allows and denies in separate bounded memories so a
flood of garbage credentials cannot push out the remembered allows. The call runs concurrently with the store's
round trip (pipeline.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDict, istr
from yarl import URL

from ..config.schema import Auth
from ..deadline import within
from ..decision import Identity, Reason, Verdict
from ..failmode import FailMode
from ..observe.metrics import AUTHZ_DURATION, AUTHZ_REQUESTS, BREAKER_STATE
from ..pool import Origin, Pool
from ..store.breaker import Breaker
from ..store.errors import StoreUnavailable
from . import CheckKind

MAX_BODY = 64 * 1024  # of a deny's body passed on to the client
CALLS_AT_ONCE = 100  # to one authorizer, from one process


class Remembered(OrderedDict[tuple[Any, ...], tuple[Verdict, float]]):
    """A bounded memory of verdicts, oldest out first."""

    def __init__(self, max_entries: int) -> None:
        super().__init__()
        self.max_entries = max_entries

    def put(self, key: tuple[Any, ...], verdict: Verdict, at: float) -> None:
        self[key] = (verdict, at)
        self.move_to_end(key)
        if len(self) > self.max_entries:
            self.popitem(last=False)


@dataclass
class Authorizer:
    """What outlives a config for one route's authorizer: its breaker, its pool, its remembered verdicts."""

    breaker: Breaker
    url: str | None = None
    settings: Any = None  # the breaker settings it was made with
    allows: Remembered = field(default_factory=lambda: Remembered(100_000))
    denies: Remembered = field(default_factory=lambda: Remembered(10_000))
    pool: Pool | None = None
    # Calls in flight at once (and so connections): more wait for a turn within the call's timeout.
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CALLS_AT_ONCE))
    # With cache_for: the calls under way, by memory key — the same question asked again meanwhile waits for
    # that answer instead of asking again (an expired verdict under load is one call, not one per request).
    asking: dict[tuple[Any, ...], asyncio.Future[Verdict]] = field(default_factory=dict)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()


class HttpAuthCheck(CheckKind):
    name = "auth"
    remote = True  # a dependency of its own, called concurrently with the store

    def __init__(self, route: str, cfg: Auth, *, retry_after: float, authorizer: Authorizer) -> None:
        super().__init__(route, cfg, retry_after)
        self.cfg: Auth = cfg
        # a refusal may be tried again when the authorizer's own breaker would let a call through
        self.failmode = FailMode("http", self.mode, "auth", status=cfg.status_on_error,
                                 retry_after=cfg.breaker.open_for, stale_fallback=cfg.stale_fallback)
        self.authorizer = authorizer
        self.header = istr(cfg.header)  # the credential header (two of them are refused before the call)
        url = URL(cfg.url or "")  # (validated: an http or https URL with a host)
        self._origin = Origin.of(url)
        self._target = url.raw_path_qs or "/"  # what is asked for: the URL's path and query, as written
        self.forward = list(cfg.forward_headers)
        self.key_headers = list(cfg.cache_key) if cfg.cache_key is not None else self.forward
        self.copy = list(cfg.upstream_headers)
        self._requests = {r: AUTHZ_REQUESTS.labels(route, r) for r in ("allow", "deny", "timeout", "unavailable",
                                                                       "error", "breaker_open")}
        self._duration = AUTHZ_DURATION.labels(route)
        state = BREAKER_STATE.labels(f"authz:{route}")
        authorizer.breaker.on_change = state.set

    def begin(self, headers: Any, method: str, uri: str, host: str | None, client: str, request_id: str,
              now: float) -> tuple[Verdict | None, asyncio.Future[Verdict] | None]:
        """(a verdict reached without calling, from `cache_for`) or (None, the call, already under way). A call
        shared with other requests (`cache_for`) is handed out shielded: a request that goes away cannot cancel it
        for the others."""
        key = self.memory_key(headers, method, uri, host)
        authorizer = self.authorizer
        if self.cfg.cache_for > 0:
            for memory in (authorizer.allows, authorizer.denies):
                hit = memory.get(key)
                if hit is not None and now - hit[1] < self.cfg.cache_for:
                    return hit[0], None
        shared = self.cfg.cache_for > 0  # (without cache_for every request is asked about on its own)
        if shared and (asked := authorizer.asking.get(key)) is not None:
            return None, asyncio.shield(asked)
        if not authorizer.breaker.allow():
            self._requests["breaker_open"].inc()
            return self._failed(key, StoreUnavailable("breaker_open", "the authorizer breaker is open"), now), None
        sent: CIMultiDict[str] = CIMultiDict((h, v) for h in self.forward if (v := headers.get(h)) is not None)
        sent["X-Forwarded-Method"] = method
        sent["X-Forwarded-Uri"] = uri
        sent["X-Forwarded-For"] = client
        sent["X-Request-Id"] = request_id
        if host is not None:
            sent["X-Forwarded-Host"] = host
        sent["Host"] = self._origin.host_header
        call = asyncio.ensure_future(self._call(key, sent, now))
        if not shared:
            return None, call
        authorizer.asking[key] = call
        call.add_done_callback(lambda _: authorizer.asking.pop(key, None))
        return None, asyncio.shield(call)

    def memory_key(self, headers: Any, method: str, uri: str, host: str | None) -> tuple[Any, ...]:
        """What a remembered verdict is filed under: never reused for another route, method, host or path."""
        return (self.route, method, host, uri, *[headers.get(h) for h in self.key_headers])

    async def _call(self, key: tuple[Any, ...], sent: CIMultiDict[str], now: float) -> Verdict:
        authorizer = self.authorizer
        if authorizer.pool is None:
            # Failgate's upstream connection pool (pool.py): no cookie jar (a cookie the authorizer sets while
            # checking one client never goes with another's), no default headers (no Accept-Encoding: a deny's body
            # is passed on as it comes).
            authorizer.pool = Pool.to(self._origin, True, self.cfg.timeout)
        started = time.perf_counter()
        failure: StoreUnavailable | None
        try:
            async with within(self.cfg.timeout), authorizer.slots:
                resp = await authorizer.pool.request("GET", self._target, sent, None)
                try:
                    status = resp.status
                    got = resp.headers
                    answer = {h: v for h in self.copy if (v := got.get(h)) is not None}
                    passed = [(h, v) for h in ("WWW-Authenticate", "Location") if (v := got.get(h)) is not None]
                    principal = got.get(self.cfg.principal_header) if self.cfg.principal_header else None
                    plan = got.get(self.cfg.plan_header) if self.cfg.plan_header else None
                    body = await resp.content.read(MAX_BODY) if not 200 <= status < 300 else b""
                    content_type = got.get("Content-Type", "text/plain")
                finally:
                    resp.release()  # (kept for the next call only when its whole body has arrived)
        except TimeoutError:
            failure = StoreUnavailable("timeout", f"no answer within {self.cfg.timeout:g}s")
        except (aiohttp.ClientConnectionError, OSError) as exc:
            failure = StoreUnavailable("unavailable", repr(exc))
        except aiohttp.ClientError as exc:
            failure = StoreUnavailable("error", repr(exc))
        else:
            failure = StoreUnavailable("error", f"HTTP {status}") if status >= 500 else None
        finally:
            self._duration.observe(time.perf_counter() - started)
        breaker = authorizer.breaker
        if failure is not None:
            breaker.failure()
            self._requests[failure.reason].inc()
            return self._failed(key, failure, now)
        breaker.success()
        if 200 <= status < 300:
            self._requests["allow"].inc()
            identity = Identity(principal, (), plan) if principal else None
            verdict = Verdict("auth", True, identity=identity, upstream=list(answer.items()))
            authorizer.allows.put(key, verdict, now)
            authorizer.denies.pop(key, None)
            return verdict
        self._requests["deny"].inc()
        verdict = Verdict("auth", False, status=status, code="unauthorized" if status == 401 else "forbidden",
                          detail="the authorizer refused the request", headers=passed,
                          body=(body, content_type))
        authorizer.denies.put(key, verdict, now)
        authorizer.allows.pop(key, None)
        return verdict

    def _failed(self, key: tuple[Any, ...], failure: StoreUnavailable, now: float) -> Verdict:
        authorizer = self.authorizer

        def remembered(reason: Reason) -> Verdict:
            for memory in (authorizer.allows, authorizer.denies):
                hit = memory.get(key)
                if hit is not None and now - hit[1] <= self.cfg.stale_for:
                    given = hit[0]
                    return Verdict("auth", given.allow, basis="stale", reason=reason, age=now - hit[1],
                                   status=given.status, code=given.code, detail=given.detail,
                                   headers=list(given.headers), identity=given.identity,
                                   upstream=list(given.upstream), body=given.body)
            return self.failmode.fallback(reason)

        return self.failmode.decide(failure, remembered)

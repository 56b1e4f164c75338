"""Key sets for jwt routes: what a process holds (`KeySet`), and the background fetcher that keeps it current
(`JwksFetcher`) — never on a request's path.

One fetcher per `jwks_url` per instance: the process that owns the admin listener (the single process, or the
parent) fetches, and hands each result to its serving processes (the parent over their control channel). A fetch
is bounded by `jwks_timeout` with the rules of deadline.py (a busy Failgate does not blame the IdP); the set is
refreshed every `jwks_refresh` (a shorter `Cache-Control: max-age` is honoured, down to 30 s), with backoff after
failures and `Retry-After` honoured on 429 and 503. A token with an unknown `kid` asks for one refetch at most
every 30 s; such a refetch that fails is not counted against the set (a flood of random `kid`s can neither
hammer the IdP nor age the set). Every successful fetch is written to the state directory, so a restart while
the IdP is down still verifies with the last good set (its age counted from the original fetch).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from .background import Background
from .deadline import within
from .observe.metrics import register_owned
from .statefiles import StateDir, write_private

log = logging.getLogger("failgate.jwks")

REFETCH_EVERY = 30.0  # at most one unknown-kid refetch per endpoint in this long
MAX_AGE_FLOOR = 30.0
_MAX_AGE = re.compile(r"max-age=(\d+)")


class KeySetError(ValueError):
    """A key set document that is not one."""


def parse_jwks(doc: Any) -> dict[str | None, dict[str, Any]]:
    """kid -> JWK (as a dict) from a JWKS document; raises KeySetError."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeySetError('expected a JSON object with a "keys" list')
    keys: dict[str | None, dict[str, Any]] = {}
    for jwk in doc["keys"]:
        if isinstance(jwk, dict) and jwk.get("use", "sig") == "sig" and isinstance(jwk.get("kty"), str):
            keys[jwk.get("kid")] = jwk
    if not keys:
        raise KeySetError("the key set has no signing key")
    return keys


class KeySet:
    """The key set of one source as this process holds it, and how fresh it is."""

    def __init__(self, source: str, refresh: float, *, always_fresh: bool = False) -> None:
        self.source = source
        self.refresh = refresh
        self.always_fresh = always_fresh  # a jwks_file or a secret: no dependency
        self.keys: dict[str | None, dict[str, Any]] = {}
        self.fetched_at: float | None = None  # wall clock of the last successful fetch
        self.failure: str | None = None  # why the last refresh failed (None: it succeeded)
        self.refetch: Callable[[], None] | None = None  # asks for the set again (an unknown kid)
        self._prepared: dict[tuple[str | None, str], PyJWK | None] = {}

    def load(self, jwks: Any, fetched_at: float) -> None:
        self.keys = parse_jwks(jwks)
        self.fetched_at = fetched_at
        self.failure = None
        self._prepared.clear()

    def failed(self, reason: str) -> None:
        self.failure = reason

    def fresh(self, now: float) -> bool:
        """The last refresh succeeded within 2 x jwks_refresh."""
        if self.always_fresh:
            return True
        return self.fetched_at is not None and now - self.fetched_at <= 2 * self.refresh

    def key(self, kid: str | None, algorithm: str) -> PyJWK | None:
        """The key for a token's `kid` and `alg`, prepared once; None when the set has no such key or the key is
        not of the algorithm's type (an RSA key is never an HMAC secret)."""
        cache_key = (kid, algorithm)
        if cache_key in self._prepared:
            return self._prepared[cache_key]
        jwk = self.keys.get(kid)
        if jwk is None and kid is None and len(self.keys) == 1:
            jwk = next(iter(self.keys.values()))  # a token without kid, a set of one key
        prepared = None
        if jwk is not None and jwk.get("alg", algorithm) == algorithm:
            try:
                prepared = PyJWK(jwk, algorithm=algorithm)
            except (PyJWKError, ValueError, TypeError):
                prepared = None
        if len(self._prepared) < 1024:
            self._prepared[cache_key] = prepared
        return prepared


class PersistedSet(msgspec.Struct):
    source: str
    fetched_at: float
    jwks: Any


_persisted = msgspec.json.Decoder(PersistedSet)


def _state_path(state: StateDir, source: str) -> str:
    return os.path.join(state.path, f"jwks-{hashlib.sha256(source.encode()).hexdigest()[:16]}.json")


def load_persisted(state: StateDir | None, source: str) -> PersistedSet | None:
    if state is None:
        return None
    try:
        with open(_state_path(state, source), "rb") as f:
            saved = _persisted.decode(f.read())
        parse_jwks(saved.jwks)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError, KeySetError) as exc:
        log.error("the saved key set for %s is unusable, ignored: %s", source, exc)
        return None
    return saved if saved.source == source else None


class JwksFetcher(Background):
    """Fetches one `jwks_url` in the background; `publish(jwks or None, fetched_at, failure)` gets every result."""

    def __init__(self, url: str, *, refresh: float, timeout: float, state: StateDir | None,
                 publish: Callable[[Any, float, str | None], None],
                 count: Callable[[str], None] = lambda result: None) -> None:
        self.url = url
        self.refresh = refresh
        self.timeout = timeout
        self.state = state
        self.publish = publish
        self.count = count
        self.fetched_at: float | None = None
        self.jwks: Any = None
        self.first = asyncio.Event()  # set after the first fetch, whatever its outcome (or a persisted set)
        self.fetches = 0
        self._wake = asyncio.Event()
        self._last_refetch = -REFETCH_EVERY
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        saved = load_persisted(self.state, self.url)
        if saved is not None:
            self.jwks, self.fetched_at = saved.jwks, saved.fetched_at
            self.publish(saved.jwks, saved.fetched_at, None)
            log.info("key set for %s loaded from the state directory (fetched %.0fs ago)", self.url,
                     time.time() - saved.fetched_at)
            self.first.set()
        super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._session is not None:
            await self._session.close()

    def request_refetch(self) -> None:
        """A token named a kid the set does not have: fetch again, at most once every 30 s."""
        now = time.monotonic()
        if now - self._last_refetch >= REFETCH_EVERY:
            self._last_refetch = now
            self._wake.set()

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            wait, ok = await self._fetch(counted=True)
            if ok:
                backoff = 1.0
            else:
                wait = max(wait, min(backoff, self.refresh))
                backoff = min(backoff * 2, self.refresh)
            self.first.set()
            due = time.monotonic() + wait
            while (left := due - time.monotonic()) > 0:  # until the next regular fetch, answer unknown kids
                self._wake.clear()
                try:
                    async with asyncio.timeout(left):
                        await self._wake.wait()
                except TimeoutError:
                    break
                await self._fetch(counted=False)  # asked for by an unknown kid: a failure here is not counted

    async def _fetch(self, *, counted: bool) -> tuple[float, bool]:
        """One fetch; (seconds until the next regular one, whether it succeeded)."""
        self.fetches += 1
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        next_in = self.refresh
        try:
            async with within(self.timeout), self._session.get(self.url, allow_redirects=False) as resp:
                if resp.status != 200:
                    retry = resp.headers.get("Retry-After", "")
                    if resp.status in (429, 503) and retry.isdigit():
                        next_in = float(retry)
                    raise KeySetError(f"HTTP {resp.status}")
                body = await resp.read()
                cache = _MAX_AGE.search(resp.headers.get("Cache-Control", ""))
            jwks = msgspec.json.decode(body)
            parse_jwks(jwks)
        except TimeoutError:
            return self._failed("timeout", f"no answer within {self.timeout:g}s", counted, next_in)
        except (aiohttp.ClientConnectionError, OSError) as exc:
            return self._failed("unavailable", repr(exc), counted, next_in)
        except (aiohttp.ClientError, KeySetError, msgspec.DecodeError, ValueError) as exc:
            return self._failed("error", str(exc), counted, next_in)
        fetched_at = time.time()
        changed = jwks != self.jwks
        self.jwks, self.fetched_at = jwks, fetched_at
        self.count("ok")
        self.publish(jwks, fetched_at, None)
        if changed:
            log.info("key set for %s fetched: %d key(s)", self.url, len(parse_jwks(jwks)))
        self._persist(jwks, fetched_at)
        if cache is not None:
            next_in = min(next_in, max(MAX_AGE_FLOOR, float(cache.group(1))))
        return next_in, True

    def _failed(self, reason: str, detail: str, counted: bool, next_in: float) -> tuple[float, bool]:
        self.count(reason)
        if counted:
            log.warning("key set fetch from %s failed (%s: %s); still holding the last good set", self.url, reason,
                        detail)
            self.publish(None, self.fetched_at or 0.0, reason)
        return next_in, False

    def _persist(self, jwks: Any, fetched_at: float) -> None:
        if self.state is None:
            return
        try:
            write_private(_state_path(self.state, self.url),
                          msgspec.json.encode(PersistedSet(self.url, fetched_at, jwks)))
        except OSError as exc:
            log.error("could not save the key set in %s: %s", self.state.path, exc)


SUPPLIES: set[JwksSupply] = set()  # every supply of this process, for the metrics collector


class JwksSupply:
    """The fetchers of the process that owns the admin listener: one per `jwks_url` in the config, each result
    handed to the serving processes as a control command (`{"op": "jwks", …}`); metrics for them."""

    def __init__(self, state: StateDir | None, hand_over: Callable[[dict[str, Any]], object]) -> None:
        self.state = state
        self.hand_over = hand_over
        self.fetchers: dict[str, JwksFetcher] = {}
        self.routes: dict[str, list[str]] = {}  # url -> the routes that use it (metric labels)
        self.counts: dict[tuple[str, str], int] = {}  # (url, result) -> fetches
        self.last: dict[str, dict[str, Any]] = {}  # url -> the last command handed over (for a new worker)
        SUPPLIES.add(self)

    def configure(self, config: Any) -> None:
        """Fetch every `jwks_url` the config names; stop fetching those it no longer does."""
        wanted: dict[str, tuple[Any, list[str]]] = {}
        for route in config.routes:
            auth = route.auth
            if auth is not None and auth.type == "jwt" and auth.jwks_url:
                wanted.setdefault(auth.jwks_url, (auth, []))[1].append(route.name)
        for url in list(self.fetchers):
            if url not in wanted:
                task = asyncio.get_running_loop().create_task(self.fetchers.pop(url).stop())
                task.add_done_callback(lambda t: t.exception())
        for url, (auth, routes) in wanted.items():
            self.routes[url] = routes
            if url not in self.fetchers:
                fetcher = self.fetchers[url] = JwksFetcher(
                    url, refresh=auth.jwks_refresh, timeout=auth.jwks_timeout, state=self.state,
                    publish=functools.partial(self._publish, url), count=functools.partial(self._count, url))
                fetcher.start()

    async def ready(self, timeout: float) -> None:
        """Wait (at most `timeout`) until every fetcher has a first answer or a persisted set."""
        waits = [asyncio.ensure_future(f.first.wait()) for f in self.fetchers.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for w in pending:
                w.cancel()

    def refetch(self, url: str) -> None:
        fetcher = self.fetchers.get(url)
        if fetcher is not None:
            fetcher.request_refetch()

    async def stop(self) -> None:
        SUPPLIES.discard(self)
        for fetcher in self.fetchers.values():
            await fetcher.stop()

    @staticmethod
    def startup_wait(config: Any) -> float:
        return max((r.auth.jwks_startup_wait for r in config.routes
                    if r.auth is not None and r.auth.type == "jwt" and r.auth.jwks_url), default=0.0)

    def _publish(self, url: str, jwks: Any, fetched_at: float, failure: str | None) -> None:
        fetcher = self.fetchers.get(url)
        cmd = {"op": "jwks", "url": url, "jwks": jwks, "fetched_at": fetched_at, "failure": failure,
               "refresh": float(fetcher.refresh) if fetcher is not None else 600.0}
        if failure is not None and url in self.last:
            cmd = {**self.last[url], "failure": failure}  # a new worker must still get the last good set
        self.last[url] = cmd
        self.hand_over(cmd)

    def _count(self, url: str, result: str) -> None:
        self.counts[(url, result)] = self.counts.get((url, result), 0) + 1



class JwksCollector:
    """failgate_jwks_fetches_total and failgate_jwks_age_seconds, from every supply of this process."""

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        fetches = CounterMetricFamily("failgate_jwks_fetches", "Key set fetches by result (ok, timeout, "
                                      "unavailable, error)", labels=["route", "result"])
        age = GaugeMetricFamily("failgate_jwks_age_seconds", "Seconds since the held key set was fetched",
                                labels=["route"])
        now = time.time()
        for supply in list(SUPPLIES):
            for url, fetcher in supply.fetchers.items():
                for route in supply.routes.get(url, []):
                    for result in ("ok", "timeout", "unavailable", "error"):
                        fetches.add_metric([route, result], supply.counts.get((url, result), 0))
                    if fetcher.fetched_at is not None:
                        age.add_metric([route], now - fetcher.fetched_at)
        yield fetches
        yield age


register_owned(JwksCollector())

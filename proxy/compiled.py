"""A compiled config (`Runtime`): routes, their checks and upstreams, and the per-request settings — built once
from a validated config, and swapped whole on reload, so a request in flight never sees its config change.

What outlives a config is not built here: the `Memories` (the store stack, the stale memories, upstream pools,
the decision log) are made by the serving process and handed in, and a reload hands the same ones to the next
`Runtime` when they still fit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import hdrs, web_response
from multidict import istr

from .checks.auth import AuthCheck
from .checks.authz import Authorizer, HttpAuthCheck
from .checks.jwt import JwtCheck, TokenMemory
from .checks.local import LocalLimiter
from .checks.memo import KeyMemory
from .checks.ratelimit import LimitGroup, RateLimitCheck
from .config import LoadedConfig
from .config.values import resolve_workers
from .forward import HOP_BY_HOP, SPOOFABLE, UpstreamClient
from .jwks import KeySet
from .observe.decisionlog import DecisionLog, LogWriter
from .observe.metrics import RouteMetrics
from .routing import Router, compile_match
from .store.breaker import Breaker, BreakerStore
from .store.cluster import is_cluster
from .targets import Settings, Target

# Failgate's own identity headers: a client must never be able to send them upstream. Always removed from what
# clients send, whatever `headers.degraded` renames the tag to: an upstream that once read the default name must
# not be fooled by a client copy of it after a rename.
OWN_HEADERS = ("failgate-degraded", "x-failgate-principal", "x-failgate-scopes", "x-failgate-plan")


@dataclass
class Memories:
    """The process-wide state a config is compiled against: kept across reloads while it still fits."""

    store: BreakerStore
    decisions: DecisionLog
    local: LocalLimiter = field(default_factory=LocalLimiter)  # rate-limit state for `stale`
    keys: KeyMemory = field(default_factory=KeyMemory)  # API-key answers for `cache_for` and `stale`
    targets: dict[Settings, Target] = field(default_factory=dict)  # upstream targets: pools and health
    keysets: dict[str, KeySet] = field(default_factory=dict)  # jwt key sets, by source
    tokens: TokenMemory = field(default_factory=TokenMemory)  # verified jwt tokens
    authorizers: dict[str, Authorizer] = field(default_factory=dict)  # by route: breaker, pool, verdicts


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    upstream: UpstreamClient
    prefix_chars: int  # characters of the matched prefix to remove before forwarding; 0 without strip_prefix
    preserve_host: bool
    metrics: RouteMetrics
    auth: AuthCheck | JwtCheck | HttpAuthCheck | None
    limits: tuple[LimitGroup, ...]  # the route's rate limits, grouped by the key they count by
    drop_credentials: str | None  # the credential header, when forward_credentials is false
    query_param: str | None = None  # a WebSocket handshake's credential may be this query parameter
    websocket_max_duration: float | None = None  # seconds a tunnel may stay open

    @property
    def checked(self) -> bool:
        return self.auth is not None or bool(self.limits)


def authorizer_for(memories: Memories, route: str, auth: Any) -> Authorizer:
    """A route's authorizer state, kept across reloads while its URL and breaker settings do not change."""
    kept = memories.authorizers.get(route)
    if kept is None or kept.url != auth.url or kept.settings != auth.breaker:
        kept = memories.authorizers[route] = Authorizer(Breaker(auth.breaker.failures, auth.breaker.open_for),
                                                        url=auth.url, settings=auth.breaker)
    return kept


def keyset_for(memories: Memories, route: str, auth: Any) -> KeySet:
    """The process-wide key set of a jwt route's source: a jwks_url (fetched by the owner and handed in), a
    jwks_file (read now) or a secret (nothing to fetch)."""
    if auth.jwks_url:
        source = auth.jwks_url
        keyset = memories.keysets.get(source)
        if keyset is None:
            keyset = memories.keysets[source] = KeySet(source, auth.jwks_refresh)
        return keyset
    keyset = KeySet(f"file:{auth.jwks_file}" if auth.jwks_file else f"secret:{route}", auth.jwks_refresh,
                    always_fresh=True)
    if auth.jwks_file:
        with open(auth.jwks_file, "rb") as f:
            keyset.load(msgspec.json.decode(f.read()), time.time())
    return keyset


class Runtime:
    """One compiled config."""

    def __init__(self, loaded: LoadedConfig, memories: Memories | BreakerStore, *, workers: int | None = None) -> None:
        if isinstance(memories, BreakerStore):  # a bare store stack: fresh memories around it
            memories = Memories(memories, DecisionLog(LogWriter(), loaded.sha256))
        cfg = loaded.config
        self.loaded = loaded
        self.memories = memories
        self.store = memories.store
        self.decisions = memories.decisions
        self.local = memories.local
        self.keys = memories.keys
        workers = workers or resolve_workers(cfg.workers)
        # A target whose URL and connection settings did not change keeps its pooled session and its health
        # across a reload.
        self.targets: dict[Settings, Target] = {}
        self.upstreams: dict[str, UpstreamClient] = {}
        for name, up in cfg.upstreams.items():
            chosen = []
            for url in up.urls:
                settings = Settings(name, url, up.connect_timeout, up.tls_verify)
                target = self.targets[settings] = memories.targets.get(settings) or Target(settings)
                chosen.append(target)
            self.upstreams[name] = UpstreamClient(name, up, chosen)
        memories.targets = self.targets
        self.active = 0  # requests in flight on this runtime
        self._drained: asyncio.Event | None = None
        retry_after = cfg.store.breaker.open_for
        prefix = cfg.store.key_prefix
        entries = []
        for r in cfg.routes:
            m = compile_match(r.match.path, r.match.prefix, r.match.methods, r.match.host)
            prefix_chars = len(m.path) if r.strip_prefix and m.path != "/" else 0
            auth: AuthCheck | JwtCheck | HttpAuthCheck | None = None
            by_key: dict[str, list[RateLimitCheck]] = {}
            for cfg_limit in r.limits:
                by_key.setdefault(cfg_limit.key, []).append(
                    RateLimitCheck(r.name, cfg_limit, retry_after=retry_after, workers=workers))
            groups = tuple(LimitGroup(r.name, limits, key_prefix=prefix,
                                      auth_header=r.auth.header if r.auth is not None else None,
                                      auth_scheme=r.auth.scheme if r.auth is not None else None)
                           for limits in by_key.values())
            if r.auth is not None and r.auth.type == "http":
                auth = HttpAuthCheck(r.name, r.auth, retry_after=retry_after,
                                     authorizer=authorizer_for(memories, r.name, r.auth))
            elif r.auth is not None and r.auth.type == "jwt":
                auth = JwtCheck(r.name, r.auth, retry_after=retry_after, keyset=keyset_for(memories, r.name, r.auth),
                                tokens=memories.tokens)
            elif r.auth is not None:
                auth = AuthCheck(r.name, r.auth, key_prefix=prefix, retry_after=retry_after,
                                 bucketed=is_cluster(cfg.store.url))
            drop = r.auth.header.lower() if r.auth is not None and not r.auth.forward_credentials else None
            up = cfg.upstreams[r.upstream]
            # A credential is checked at the handshake only: on a route with auth, a tunnel lasts 1 h unless told.
            max_duration = up.websocket_max_duration if up.websocket_max_duration is not None else \
                3600.0 if r.auth is not None else None
            route = Route(r.name, self.upstreams[r.upstream], prefix_chars, up.preserve_host, RouteMetrics(r.name),
                          auth, groups, drop, r.auth.query_param if r.auth is not None else None, max_duration)
            entries.append((m, route))
        self.router: Router = Router(entries)
        self.trusted = [ipaddress.ip_network(c, strict=False) for c in cfg.trusted_proxies]
        # header names as multidict's case-insensitive strings: a lookup or a set with one skips lower-casing it
        self.request_id_header = istr(cfg.headers.request_id)
        self.degraded_header = istr(cfg.headers.degraded)
        self.max_body = cfg.limits.max_body
        self.max_header_size = cfg.limits.max_header_size
        # aiohttp names itself and Python's version in the Server header of every response unless told otherwise.
        web_response.SERVER_SOFTWARE = cfg.headers.server
        # Request headers never passed on as the client sent them (Failgate sets its own) — and, from a peer that
        # trusted_proxies does not vouch for, also the headers a client could use to lie about itself.
        # Every header an authorizer's answer may set upstream, on any route: a client must never send it itself.
        authorizer_headers = [h.lower() for r in cfg.routes if r.auth is not None and r.auth.type == "http"
                              for h in r.auth.upstream_headers]
        self.drop_headers = frozenset(
            [cfg.headers.degraded.lower(), *OWN_HEADERS, *authorizer_headers, "host", "x-forwarded-host",
             "x-forwarded-for", cfg.headers.request_id.lower(), "expect"]
        ) | HOP_BY_HOP
        self.drop_headers_untrusted = self.drop_headers | SPOOFABLE
        self.own_headers = frozenset([cfg.headers.degraded.lower(), *OWN_HEADERS, *authorizer_headers])

    async def close(self, keep: Runtime | None = None) -> None:
        """Close the pools of this config's targets (all, or those `keep` no longer uses)."""
        shown = {(t.settings.upstream, t.label) for t in keep.targets.values()} if keep is not None else set()
        for settings, target in self.targets.items():
            if keep is None or keep.targets.get(settings) is not target:
                await target.close()
                if (settings.upstream, target.label) not in shown:  # (a target with new settings shows in its place)
                    target.forget()

    async def drained(self) -> None:
        """Wait until no request started on this runtime is still in flight (after a swap)."""
        if self.active == 0:
            return
        self._drained = asyncio.Event()
        await self._drained.wait()

    def finished(self) -> None:
        self.active -= 1
        if self.active == 0 and self._drained is not None:
            self._drained.set()

    def is_trusted_peer(self, peer: str | None) -> bool:
        return bool(self.trusted) and peer is not None and self._is_trusted(peer)

    def client_address(self, peer: str | None, headers: Any) -> str:
        """The rightmost address of X-Forwarded-For not in `trusted_proxies` (the peer itself when it is not
        trusted)."""
        if peer is None:
            return ""
        if not self.trusted or not self._is_trusted(peer):
            return peer
        values: list[str] = headers.getall(hdrs.X_FORWARDED_FOR, [])
        hops = [h.strip() for v in values for h in v.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _is_trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

"""The config file's shape, as msgspec Structs (the README's configuration reference lists every key).

Decoding rejects unknown keys and wrong types with the path of the offending value; everything about *meaning*
(cross references, ranges that depend on other keys) is checked afterwards in `validate.py`. Durations and sizes
are written with units in YAML and decoded here into seconds and bytes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct


class Duration(float):
    """Seconds, written in YAML as `250ms`, `2s`, `1m`, `1h` or `1d`."""


class ByteSize(int):
    """Bytes, written as a number or with a unit: `512KiB`, `10MiB`, `1GiB`, `10MB`."""


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^(\d+)\s*(B|KiB|MiB|GiB|kB|KB|MB|GB)?$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "kB": 1000, "KB": 1000,
               "MB": 1000**2, "GB": 1000**3}


def parse_duration(value: object) -> Duration:
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m:
            return Duration(float(m.group(1)) * _DURATION_UNITS[m.group(2)])
    raise ValueError(f"expected a duration such as 250ms, 2s, 1m, 1h or 1d, got {value!r}")


def parse_size(value: object) -> ByteSize:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return ByteSize(value)
    if isinstance(value, str):
        m = _SIZE.match(value.strip())
        if m:
            return ByteSize(int(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError(f"expected a size such as 1048576, 512KiB or 10MiB, got {value!r}")


def dec_hook(type_: type, value: Any) -> Any:
    if type_ is Duration:
        return parse_duration(value)
    if type_ is ByteSize:
        return parse_size(value)
    raise NotImplementedError(type_)


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m", "s"):
        n = seconds / _DURATION_UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{round(seconds * 1000, 3):g}ms"


Port = Annotated[int, Meta(ge=1, le=65535)]
Positive = Annotated[int, Meta(ge=1)]
Status = Annotated[int, Meta(ge=400, le=599)]
FailMode = Literal["open", "closed", "stale"]


class _Strict(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class TLS(_Strict, kw_only=True, frozen=True):
    cert: str
    key: str


class Listen(_Strict, kw_only=True, frozen=True):
    host: str = "0.0.0.0"
    port: Port = 8080
    tls: TLS | None = None


class Admin(_Strict, kw_only=True, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 9901
    token: str | None = None
    chaos: bool = False


class Breaker(_Strict, kw_only=True, frozen=True):
    failures: Positive = 5
    open_for: Duration = Duration(2.0)


class Store(_Strict, kw_only=True, frozen=True):
    url: str = "memory://"
    timeout: Duration = Duration(0.05)
    connect_timeout: Duration = Duration(0.2)
    pool_size: Positive = 16
    breaker: Breaker = msgspec.field(default_factory=Breaker)
    key_prefix: str = "failgate:"


class Headers(_Strict, kw_only=True, frozen=True):
    degraded: str = "Failgate-Degraded"
    request_id: str = "X-Request-Id"
    server: str = "failgate"  # the Server header of Failgate's own responses; "" sends none


class Limits(_Strict, kw_only=True, frozen=True):
    max_body: ByteSize = ByteSize(10 << 20)
    header_timeout: Duration = Duration(10.0)
    max_connections: Positive = 10000
    max_target: ByteSize = ByteSize(8 << 10)  # request target; longer: 414
    max_headers: Positive = 100  # header fields; more: 431
    max_header_size: ByteSize = ByteSize(32 << 10)  # all header fields together; more: 431


class Eject(_Strict, kw_only=True, frozen=True):
    """Passive health of an upstream's targets: consecutive gateway failures that take a target out, and for how
    long (`for` in YAML)."""

    failures: Positive = 5
    for_: Duration = msgspec.field(default=Duration(10.0), name="for")


class Upstream(_Strict, kw_only=True, frozen=True):
    url: str | None = None  # one target; or `targets` for several
    targets: list[str] | None = None
    balance: Literal["round_robin", "least_request"] = "round_robin"
    eject: Eject = msgspec.field(default_factory=Eject)
    connect_timeout: Duration = Duration(1.0)
    timeout: Duration = Duration(30.0)
    idle_timeout: Duration = Duration(60.0)
    preserve_host: bool = False
    tls_verify: bool = True
    websocket_max_message: ByteSize = ByteSize(4 << 20)  # a bigger message closes the tunnel with 1009
    websocket_idle_timeout: Duration = Duration(600.0)  # no message either way this long: closed with 1001
    websocket_max_duration: Duration | None = None  # default: 1h on routes with auth, none otherwise

    @property
    def urls(self) -> list[str]:
        """Every target's URL (validation makes sure there is one at least)."""
        return self.targets if self.targets is not None else [self.url] if self.url is not None else []


class Match(_Strict, kw_only=True, frozen=True):
    path: str
    prefix: bool = False
    methods: list[str] | None = None
    host: str | None = None


class AuthDefaults(_Strict, kw_only=True, frozen=True):
    """`defaults.auth`: every auth key but `type`."""

    header: str | None = None
    scheme: str | None = None
    scopes: list[str] | None = None
    cache_for: Duration | None = None
    forward_credentials: bool | None = None
    on_store_error: FailMode | None = None
    status_on_error: Status | None = None
    stale_for: Duration | None = None
    stale_fallback: Literal["open", "closed"] | None = None
    query_param: str | None = None
    # jwt only (merged only into jwt routes)
    jwks_url: str | None = None
    jwks_file: str | None = None
    secret: str | None = None
    issuer: str | None = None
    audiences: list[str] | None = None
    algorithms: list[str] | None = None
    principal_claim: str | None = None
    scopes_claim: str | None = None
    plan_claim: str | None = None
    leeway: Duration | None = None
    jwks_refresh: Duration | None = None
    jwks_timeout: Duration | None = None
    jwks_startup_wait: Duration | None = None
    # http only
    url: str | None = None
    forward_headers: list[str] | None = None
    upstream_headers: list[str] | None = None
    principal_header: str | None = None
    plan_header: str | None = None
    timeout: Duration | None = None
    cache_key: list[str] | None = None
    breaker: Breaker | None = None


# The keys of `auth` that only some types use (`defaults.auth` merges a key into a route only when its type uses it).
JWT_ONLY = frozenset({"jwks_url", "jwks_file", "secret", "issuer", "audiences", "algorithms", "principal_claim",
                      "scopes_claim", "plan_claim", "leeway", "jwks_refresh", "jwks_timeout", "jwks_startup_wait"})
HTTP_ONLY = frozenset({"url", "forward_headers", "upstream_headers", "principal_header", "plan_header", "timeout",
                       "cache_key", "breaker"})
TYPES_OF = {**dict.fromkeys(JWT_ONLY, frozenset({"jwt"})), **dict.fromkeys(HTTP_ONLY, frozenset({"http"})),
            "cache_for": frozenset({"api_key", "http"}), "query_param": frozenset({"api_key", "jwt"})}


def used_by(auth_type: object, key: str) -> bool:
    """Does an `auth` of this type use this key? (Keys every type uses are not in TYPES_OF.)"""
    return key not in TYPES_OF or auth_type in TYPES_OF[key]


class Auth(_Strict, kw_only=True, frozen=True):
    type: Literal["api_key", "jwt", "http"]
    header: str = "Authorization"
    scheme: str | None = None  # api_key: none; jwt: Bearer
    scopes: list[str] = msgspec.field(default_factory=list)
    cache_for: Duration = Duration(0.0)
    forward_credentials: bool = True
    on_store_error: FailMode | None = None
    status_on_error: Status = 503
    stale_for: Duration = Duration(300.0)
    stale_fallback: Literal["open", "closed"] | None = None
    query_param: str | None = None  # api_key, jwt: on a WebSocket handshake, the credential may be this parameter
    # --- jwt ---
    jwks_url: str | None = None  # the identity provider's key set, fetched in the background
    jwks_file: str | None = None  # or a key set on disk (no dependency then)
    secret: str | None = None  # for HS* algorithms (use ${VAR})
    issuer: str | None = None
    audiences: list[str] = msgspec.field(default_factory=list)
    algorithms: list[str] | None = None
    principal_claim: str = "sub"
    scopes_claim: str = "scope"
    plan_claim: str | None = None
    leeway: Duration = Duration(30.0)
    jwks_refresh: Duration = Duration(600.0)
    jwks_timeout: Duration = Duration(2.0)
    jwks_startup_wait: Duration = Duration(5.0)
    # --- http (an external authorizer) ---
    url: str | None = None  # GET <url> decides
    forward_headers: list[str] = msgspec.field(default_factory=lambda: ["Authorization"])
    upstream_headers: list[str] = msgspec.field(default_factory=list)  # its response headers copied upstream
    principal_header: str | None = None
    plan_header: str | None = None
    timeout: Duration = Duration(0.1)
    cache_key: list[str] | None = None  # the forwarded headers a verdict depends on (default: all of them)
    breaker: Breaker = msgspec.field(default_factory=lambda: Breaker())


class RateLimitDefaults(_Strict, kw_only=True, frozen=True):
    """`defaults.rate_limit`: every rate-limit key but `limit` and `per` (and `type`, which it has none of)."""

    algorithm: Literal["fixed_window", "sliding_window", "gcra"] | None = None
    burst: Positive | None = None
    key: str | None = None
    on_store_error: FailMode | None = None
    status_on_error: Status | None = None
    local_share: Annotated[float, Meta(gt=0, le=1)] | None = None


class RateLimit(_Strict, kw_only=True, frozen=True):
    name: str | None = None  # required in a list of limits
    limit: Positive
    per: Duration
    algorithm: Literal["fixed_window", "sliding_window", "gcra"] = "sliding_window"
    burst: Positive | None = None
    key: str = "client_ip"
    on_store_error: FailMode | None = None
    status_on_error: Status = 503
    local_share: Annotated[float, Meta(gt=0, le=1)] | None = None
    plans: dict[str, Positive | Literal["unlimited"]] | None = None  # the request's plan picks the limit
    shadow: bool = False  # counted and reported, never denies


class Defaults(_Strict, kw_only=True, frozen=True):
    auth: AuthDefaults | None = None
    rate_limit: RateLimitDefaults | None = None


class Route(_Strict, kw_only=True, frozen=True):
    name: str
    match: Match
    upstream: str
    strip_prefix: bool = False
    auth: Auth | None = None
    rate_limit: RateLimit | list[RateLimit] | None = None

    @property
    def limits(self) -> list[RateLimit]:
        """Every rate limit of the route (one, or the list)."""
        if self.rate_limit is None:
            return []
        return self.rate_limit if isinstance(self.rate_limit, list) else [self.rate_limit]


class Config(_Strict, kw_only=True, frozen=True):
    version: Literal[1]
    listen: Listen = msgspec.field(default_factory=Listen)
    admin: Admin = msgspec.field(default_factory=Admin)
    workers: Positive | Literal["auto"] = 1
    shutdown_grace: Duration = Duration(15.0)
    watch: bool = False
    store: Store = msgspec.field(default_factory=Store)
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    headers: Headers = msgspec.field(default_factory=Headers)
    limits: Limits = msgspec.field(default_factory=Limits)
    access_log: bool = False
    defaults: Defaults = msgspec.field(default_factory=Defaults)
    upstreams: dict[str, Upstream]
    routes: list[Route]

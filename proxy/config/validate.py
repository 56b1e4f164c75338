"""Config loading, pass two: what the keys *mean* together. Runs on decoded Structs; raises ConfigError."""

from __future__ import annotations

import ipaddress
import os
import re
from typing import TYPE_CHECKING

from yarl import URL

from ..routing import BadTarget, normalize_path
from ..store.cluster import SCHEMES as CLUSTER_SCHEMES
from ..store.cluster import parse as parse_cluster
from ..store.sentinel import SCHEMES as SENTINEL_SCHEMES
from ..store.sentinel import parse as parse_sentinel
from .errors import ConfigError
from .schema import TYPES_OF, Auth, format_duration
from .values import is_loopback, redact_url, resolve_workers

if TYPE_CHECKING:
    from .load import LoadedConfig

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token: header names, methods, schemes
_LIMIT_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")
_SERVER = re.compile(r"^[!-~][ -~]{0,63}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FAIL_MODES = (
    "choose open (let requests through when the store cannot answer), closed (refuse them with "
    "status_on_error) or stale (reuse the last known good answer)"
)


def validate(loaded: LoadedConfig) -> None:
    cfg, src = loaded.config, loaded.source

    def fail(path: str, message: str) -> ConfigError:
        return ConfigError(src, path, message)

    # --- listeners -------------------------------------------------------------------------------------------
    if cfg.listen.tls is not None:
        for key in ("cert", "key"):
            file = getattr(cfg.listen.tls, key)
            if not os.path.isfile(file):
                raise fail(f"listen.tls.{key}", f"no such file: {file}")
    if not is_loopback(cfg.admin.host) and not cfg.admin.token:
        raise fail("admin.token", f"required when admin.host ({cfg.admin.host}) is not a loopback address, "
                   "so that POST endpoints cannot be called by anyone who reaches the port")
    if cfg.admin.port == cfg.listen.port:
        raise fail("admin.port", f"must differ from listen.port ({cfg.listen.port}); the admin listener is "
                   "never served on the proxy port")

    # --- store and workers -----------------------------------------------------------------------------------
    store_url = cfg.store.url
    scheme = store_url.split("://", 1)[0] if "://" in store_url else ""
    if scheme not in ("memory", "redis", "rediss", "unix", *SENTINEL_SCHEMES, *CLUSTER_SCHEMES):
        raise fail("store.url", f"expected memory://, redis://host:port/db, rediss://…, unix:///path, "
                   f"redis+sentinel://host:26379,…/<master-name>/<db> or redis+cluster://host:7000,…/, "
                   f"got {redact_url(store_url)!r}")
    if scheme in CLUSTER_SCHEMES or scheme in SENTINEL_SCHEMES:
        try:
            (parse_cluster if scheme in CLUSTER_SCHEMES else parse_sentinel)(store_url)
        except ValueError as exc:
            raise fail("store.url", f"{exc} (in {redact_url(store_url)!r})") from None
    workers = resolve_workers(cfg.workers)
    if scheme == "memory" and workers > 1:
        raise fail("workers", f"memory:// keeps state inside one process and needs workers: 1 (got "
                   f"{cfg.workers}); use a redis:// store to run several workers")
    for i, cidr in enumerate(cfg.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise fail(f"trusted_proxies[{i}]", f"expected an IP address or CIDR such as 10.0.0.0/8, "
                       f"got {cidr!r}") from None
    for key in ("degraded", "request_id"):
        name = getattr(cfg.headers, key)
        if not _TOKEN.match(name):
            raise fail(f"headers.{key}", f"expected an HTTP header name, got {name!r}")
    if cfg.headers.server and not _SERVER.match(cfg.headers.server):
        raise fail("headers.server", f"expected a product name such as failgate (visible ASCII, at most 64 "
                   f"characters), or \"\" to send no Server header; got {cfg.headers.server!r}")
    lim = cfg.limits
    if not 256 <= lim.max_target <= 1 << 20:
        raise fail("limits.max_target", f"expected a size from 256 to 1MiB, got {int(lim.max_target)}")
    if not 1024 <= lim.max_header_size <= 1 << 20:
        raise fail("limits.max_header_size", f"expected a size from 1KiB to 1MiB, got {int(lim.max_header_size)}")
    if lim.max_headers > 1000:
        raise fail("limits.max_headers", f"expected at most 1000, got {lim.max_headers}")

    # --- upstreams -------------------------------------------------------------------------------------------
    if not cfg.upstreams:
        raise fail("upstreams", "expected at least one upstream")
    for name, up in cfg.upstreams.items():
        path = f"upstreams.{name}"
        if not _NAME.match(name):
            raise fail(path, "an upstream name is 1-64 letters, digits, '_', '.' or '-'")
        if (up.url is None) == (up.targets is None):
            raise fail(path, "expected either `url` (one target) or `targets` (a list of URLs), not "
                       + ("both" if up.url is not None else "neither"))
        if up.targets is not None and not up.targets:
            raise fail(f"{path}.targets", "expected at least one URL")
        where = [f"{path}.url"] if up.targets is None else [f"{path}.targets[{i}]" for i in range(len(up.targets))]
        credentials: set[tuple[str | None, str | None]] = set()
        seen_urls: dict[str, str] = {}
        for at, raw in zip(where, up.urls, strict=True):
            try:
                url = URL(raw)
            except ValueError:
                url = None
            if url is None or url.scheme not in ("http", "https") or not url.host:
                raise fail(at, f"expected an http:// or https:// URL such as http://127.0.0.1:8000, "
                           f"got {redact_url(raw)!r}")
            if url.query_string or url.fragment:
                raise fail(at, "a query string or fragment is not allowed in an upstream URL")
            same = f"{url.scheme}://{url.host}:{url.port}{url.path.rstrip('/')}"  # the same target however spelled
            if same in seen_urls:
                raise fail(at, f"the same target twice (also {seen_urls[same]})")
            seen_urls[same] = at
            credentials.add((url.user, url.password))
        if len(credentials) > 1:
            raise fail(f"{path}.targets", "every target of an upstream must carry the same credentials (user:password "
                       "in the URL): they are the upstream's, whichever target a request goes to")
        if up.eject.for_ <= 0:
            raise fail(f"{path}.eject.for", "expected a duration greater than 0")
        for key in ("connect_timeout", "timeout", "idle_timeout", "websocket_idle_timeout"):
            if getattr(up, key) <= 0:
                raise fail(f"{path}.{key}", "expected a duration greater than 0")
        if up.websocket_max_duration is not None and up.websocket_max_duration <= 0:
            raise fail(f"{path}.websocket_max_duration", "expected a duration greater than 0")
        if not 125 <= up.websocket_max_message <= 1 << 30:
            raise fail(f"{path}.websocket_max_message", f"expected a size from 125 bytes to 1GiB, got "
                       f"{int(up.websocket_max_message)}")

    # --- routes ----------------------------------------------------------------------------------------------
    if not cfg.routes:
        raise fail("routes", "expected at least one route")
    seen: dict[str, int] = {}
    for i, route in enumerate(cfg.routes):
        rp = f"routes[{i}]"
        if not _NAME.match(route.name):
            raise fail(f"{rp}.name", f"a route name is 1-64 letters, digits, '_', '.' or '-', got {route.name!r}")
        if route.name in seen:
            raise fail(f"{rp}.name", f"duplicate route name {route.name!r} (also routes[{seen[route.name]}])")
        seen[route.name] = i
        if route.upstream not in cfg.upstreams:
            raise fail(f"{rp}.upstream", f"unknown upstream {route.upstream!r}; expected one of: "
                       f"{', '.join(cfg.upstreams)}")
        _validate_match(route, rp, fail)
        if route.strip_prefix and not route.match.prefix:
            raise fail(f"{rp}.strip_prefix", "needs match.prefix: true (there is no prefix to strip)")
        if route.auth is not None:
            _validate_auth(route, rp, fail)
        if isinstance(route.rate_limit, list):
            if not route.rate_limit:
                raise fail(f"{rp}.rate_limit", "expected at least one limit, or leave the key out")
            names: dict[str, int] = {}
            for j, limit in enumerate(route.rate_limit):
                lp = f"{rp}.rate_limit[{j}]"
                if limit.name is None:
                    raise fail(lp, "a limit in a list needs a name (such as burst or daily): it names the limit "
                               "in metrics, tags and the RateLimit fields")
                if limit.name in names:
                    raise fail(f"{lp}.name", f"duplicate limit name {limit.name!r} (also {rp}.rate_limit"
                               f"[{names[limit.name]}])")
                names[limit.name] = j
                _validate_rate_limit(route, limit, lp, fail)
        elif route.rate_limit is not None:
            _validate_rate_limit(route, route.rate_limit, f"{rp}.rate_limit", fail)


def _validate_match(route, rp, fail) -> None:  # type: ignore[no-untyped-def]
    m = route.match
    if not m.path.startswith("/"):
        raise fail(f"{rp}.match.path", f"expected a path starting with /, got {m.path!r}")
    try:
        normal = normalize_path(m.path)
    except BadTarget as exc:
        raise fail(f"{rp}.match.path", f"{exc}; got {m.path!r}") from None
    if normal != m.path or "?" in m.path:
        raise fail(f"{rp}.match.path", f"expected a normalized path (requests are matched after "
                   f"normalization), got {m.path!r}; write {normal!r}")
    if m.methods is not None:
        if not m.methods:
            raise fail(f"{rp}.match.methods", "expected at least one method, or leave the key out for all")
        for j, method in enumerate(m.methods):
            if not _TOKEN.match(method) or method != method.upper():
                raise fail(f"{rp}.match.methods[{j}]", f"expected an upper-case HTTP method such as GET, "
                           f"got {method!r}")
            if method == "CONNECT":
                raise fail(f"{rp}.match.methods[{j}]", "CONNECT is not proxied (it is always answered 405)")
    if m.host is not None and (not m.host or any(c in m.host for c in "/ ?#@")):
        raise fail(f"{rp}.match.host", f"expected a host name such as api.example.com, got {m.host!r}")


_ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
_HMAC = frozenset({"HS256", "HS384", "HS512"})


def _validate_auth(route, rp, fail) -> None:  # type: ignore[no-untyped-def]
    a = route.auth
    p = f"{rp}.auth"
    if a.on_store_error is None:
        raise fail(p, f"on_store_error is not set here or in defaults.auth; {_FAIL_MODES}")
    if not _TOKEN.match(a.header):
        raise fail(f"{p}.header", f"expected an HTTP header name, got {a.header!r}")
    if a.scheme is not None and not _TOKEN.match(a.scheme):
        raise fail(f"{p}.scheme", f"expected an auth scheme such as Bearer, got {a.scheme!r}")
    if a.on_store_error == "stale":
        if a.stale_fallback is None:
            raise fail(f"{p}.stale_fallback", "required with on_store_error: stale — what to do when no "
                       "remembered answer exists: open or closed")
        if not 0 < a.stale_for <= 86400:
            raise fail(f"{p}.stale_for", f"expected a duration above 0 and at most 24h, got "
                       f"{format_duration(a.stale_for)}")
    if a.cache_for < 0:
        raise fail(f"{p}.cache_for", "expected a duration of 0s or more")
    plain = Auth(type=a.type)
    for key, types in sorted(TYPES_OF.items()):
        if a.type not in types and getattr(a, key) != getattr(plain, key):
            raise fail(f"{p}.{key}", f"only applies to type: {' or '.join(sorted(types))}")
    if a.query_param is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{1,64}", a.query_param):
        raise fail(f"{p}.query_param", f"expected a query parameter name (letters, digits, '.', '_', '~', '-'), "
                   f"got {a.query_param!r}")
    if a.type == "jwt":
        _validate_jwt(a, p, fail)
    elif a.type == "http":
        _validate_http(a, p, fail)


def _validate_http(a, p, fail) -> None:  # type: ignore[no-untyped-def]
    url = URL(a.url) if a.url and "://" in a.url else None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise fail(f"{p}.url", f"required for type: http — the authorizer's http:// or https:// URL, got {a.url!r}")
    for key in ("forward_headers", "upstream_headers", "cache_key"):
        for j, name in enumerate(getattr(a, key) or []):
            if not _TOKEN.match(name):
                raise fail(f"{p}.{key}[{j}]", f"expected an HTTP header name, got {name!r}")
    for key in ("principal_header", "plan_header"):
        name = getattr(a, key)
        if name is not None and not _TOKEN.match(name):
            raise fail(f"{p}.{key}", f"expected an HTTP header name, got {name!r}")
    if a.timeout <= 0:
        raise fail(f"{p}.timeout", "expected a duration greater than 0")
    if a.cache_key is not None:
        forwarded = {h.lower() for h in a.forward_headers}
        for j, name in enumerate(a.cache_key):
            if name.lower() not in forwarded:
                raise fail(f"{p}.cache_key[{j}]", f"{name} is not in forward_headers: a verdict can only depend "
                           "on what the authorizer was sent")


def _validate_jwt(a, p, fail) -> None:  # type: ignore[no-untyped-def]
    if not a.algorithms:
        raise fail(f"{p}.algorithms", "required for type: jwt — the algorithms tokens may be signed with, such as "
                   "[RS256, ES256]")
    for j, alg in enumerate(a.algorithms):
        if alg not in _ASYMMETRIC | _HMAC:
            hint = " (`none` is never accepted)" if alg.lower() == "none" else ""
            raise fail(f"{p}.algorithms[{j}]", f"expected one of {', '.join(sorted(_ASYMMETRIC | _HMAC))}, got "
                       f"{alg!r}{hint}")
    asymmetric = [alg for alg in a.algorithms if alg in _ASYMMETRIC]
    hmac = [alg for alg in a.algorithms if alg in _HMAC]
    if hmac and not a.secret:
        raise fail(f"{p}.secret", f"required with {', '.join(hmac)} (use ${{VAR}} to keep it out of the file)")
    if a.secret and not hmac:
        raise fail(f"{p}.secret", "only applies to HS256, HS384 or HS512 in algorithms")
    if asymmetric and not (a.jwks_url or a.jwks_file):
        raise fail(p, f"{', '.join(asymmetric)} need the identity provider's keys: jwks_url (fetched in the "
                   "background) or jwks_file")
    if a.jwks_url and a.jwks_file:
        raise fail(f"{p}.jwks_file", "give jwks_url or jwks_file, not both")
    if a.jwks_url is not None:
        url = URL(a.jwks_url) if "://" in a.jwks_url else None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise fail(f"{p}.jwks_url", f"expected an http:// or https:// URL, got {a.jwks_url!r}")
        if a.on_store_error == "stale" and a.stale_for <= 2 * a.jwks_refresh:
            raise fail(f"{p}.stale_for", f"must be more than 2 x jwks_refresh ({format_duration(a.jwks_refresh)}): "
                       "the key set only goes stale after two refreshes failed")
        for key in ("jwks_refresh", "jwks_timeout"):
            if getattr(a, key) <= 0:
                raise fail(f"{p}.{key}", "expected a duration greater than 0")
    if a.jwks_file is not None and not os.path.isfile(a.jwks_file):
        raise fail(f"{p}.jwks_file", f"no such file: {a.jwks_file}")


def _validate_rate_limit(route, r, p, fail) -> None:  # type: ignore[no-untyped-def]
    if r.name is not None and not _LIMIT_NAME.match(r.name):
        raise fail(f"{p}.name", f"a limit name is 1-32 of a-z, 0-9, '_' and '-', got {r.name!r}")
    if r.plans is not None:
        if route.auth is None:
            raise fail(f"{p}.plans", "plans need auth on the same route (the plan comes with the credential)")
        for plan in r.plans:
            if not _LIMIT_NAME.match(plan):
                raise fail(f"{p}.plans", f"a plan name is 1-32 of a-z, 0-9, '_' and '-', got {plan!r}")
    if r.on_store_error is None:
        raise fail(p, f"on_store_error is not set here or in defaults.rate_limit; {_FAIL_MODES}")
    if r.per < 0.001:
        raise fail(f"{p}.per", "expected a window of at least 1ms")
    if r.burst is not None and r.algorithm != "gcra":
        raise fail(f"{p}.burst", f"only applies to algorithm: gcra (this route uses {r.algorithm})")
    key = r.key
    if key.startswith("header:"):
        if not _TOKEN.match(key[len("header:") :]):
            raise fail(f"{p}.key", f"expected header:<Name> with an HTTP header name, got {key!r}")
    elif key == "principal":
        if route.auth is None:
            raise fail(f"{p}.key", "principal needs auth on the same route (the principal comes from it)")
    elif key not in ("client_ip", "route"):
        raise fail(f"{p}.key", f"expected one of: client_ip, header:<Name>, principal, route; got {key!r}")

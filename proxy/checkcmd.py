"""`failgate check FILE`: validate a config and explain what it will do, route by route."""

from __future__ import annotations

from typing import Any

from .config import LoadedConfig, format_duration
from .config.values import redact_url, resolve_workers
from .routing import RouteMatch, compile_match


def describe(loaded: LoadedConfig) -> str:
    cfg = loaded.config
    lines = [
        f"{loaded.source}: OK (sha256 {loaded.sha256[:16]})",
        f"listen {cfg.listen.host}:{cfg.listen.port}{' (TLS)' if cfg.listen.tls else ''}; "
        f"admin {cfg.admin.host}:{cfg.admin.port}; workers {cfg.workers} ({resolve_workers(cfg.workers)}); "
        f"store {redact_url(cfg.store.url)}",
        "routes (first match wins):",
    ]
    for i, r in enumerate(cfg.routes):
        m = r.match
        methods = ",".join(m.methods) if m.methods else "any method"
        path = f"{m.path} and below" if m.prefix else f"{m.path} exactly"
        host = f" host {m.host}" if m.host else ""
        up = cfg.upstreams[r.upstream]
        strip = " (prefix stripped)" if r.strip_prefix else ""
        dest = redact_url(up.urls[0]) if len(up.urls) == 1 else f"({len(up.urls)} targets)"
        lines.append(f"  [{i}] {r.name}: {methods} {path}{host} -> {r.upstream} {dest}{strip}")
        if r.auth is None and not r.limits:
            lines.append("      no checks")
        inherited = loaded.inherited
        if r.auth is not None:
            a = r.auth
            how = _how(inherited.get((i, "auth"), frozenset()), "on_store_error")
            extra = ""
            if a.on_store_error == "stale":
                extra = f", stale_for {format_duration(a.stale_for)}, then {a.stale_fallback}"
            if a.on_store_error == "closed":
                extra = f", status {a.status_on_error}"
            scopes = f" scopes {','.join(a.scopes)}" if a.scopes else ""
            if a.type == "http":
                cached = f", verdicts reused {format_duration(a.cache_for)}" if a.cache_for else ""
                lines.append(f"      auth: http authorizer {a.url} (timeout {format_duration(a.timeout)}, its own "
                             f"breaker {a.breaker.failures} failures / {format_duration(a.breaker.open_for)}){cached}; "
                             f"sends {','.join(a.forward_headers)}; copies {','.join(a.upstream_headers) or 'nothing'}"
                             f" upstream; on_store_error {a.on_store_error} ({how}) for the authorizer{extra}")
            elif a.type == "jwt":
                source = (f"keys from {a.jwks_url} (refreshed every {format_duration(a.jwks_refresh)})" if a.jwks_url
                          else f"keys from {a.jwks_file}" if a.jwks_file else "a shared secret")
                lines.append(f"      auth: jwt ({','.join(a.algorithms or [])}) in {a.header} "
                             f"{a.scheme or 'Bearer'}, {source}; issuer {a.issuer or 'any'}, audiences "
                             f"{','.join(a.audiences) or 'any'};{scopes} on_store_error {a.on_store_error} ({how})"
                             f" for the key set{extra}")
            else:
                lines.append(f"      auth: api_key in {a.header}{' ' + a.scheme if a.scheme else ''}{scopes}; "
                             f"on_store_error {a.on_store_error} ({how}){extra}")
        for j, rl in enumerate(r.limits):
            where = (i, f"rate_limit[{j}]") if isinstance(r.rate_limit, list) else (i, "rate_limit")
            how = _how(inherited.get(where, frozenset()), "on_store_error")
            extra = f", status {rl.status_on_error}" if rl.on_store_error == "closed" else ""
            label = f"rate_limit.{rl.name}" if rl.name else "rate_limit"
            plans = ""
            if rl.plans:
                plans = " plans " + ", ".join(f"{plan}={quota}" for plan, quota in rl.plans.items()) + ";"
            shadow = " (shadow: counted, never denies)" if rl.shadow else ""
            lines.append(f"      {label}: {rl.limit} per {format_duration(rl.per)} ({rl.algorithm}) by "
                         f"{rl.key};{plans} on_store_error {rl.on_store_error} ({how}){extra}{shadow}")
    lines.append("upstreams:")
    for name, up in cfg.upstreams.items():
        if len(up.urls) == 1:
            lines.append(f"  {name}: {redact_url(up.urls[0])}")
            continue
        lines.append(f"  {name}: {len(up.urls)} targets, {up.balance}; a target out for "
                     f"{format_duration(up.eject.for_)} after {up.eject.failures} gateway failures in a row "
                     f"(at most {len(up.urls) // 2} out at once); idempotent requests retried once on another")
        lines.extend(f"    - {redact_url(url)}" for url in up.urls)
    warns = warnings(loaded)
    if warns:
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in warns)
    return "\n".join(lines)


# The methods a client can send to any route; a route that lists some refuses the rest by falling through.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def warnings(loaded: LoadedConfig) -> list[str]:
    cfg = loaded.config
    out: list[str] = []
    matches = [compile_match(r.match.path, r.match.prefix, r.match.methods, r.match.host) for r in cfg.routes]
    for j, later in enumerate(matches):
        for i in range(j):
            if matches[i].covers(later):
                out.append(f"routes[{j}] ({cfg.routes[j].name}) can never match: routes[{i}] "
                           f"({cfg.routes[i].name}) matches every request it would")
                break
    out.extend(_fall_through(cfg.routes, matches))
    for i, r in enumerate(cfg.routes):
        if r.auth is not None and r.auth.on_store_error == "open" and r.auth.type == "jwt":
            out.append(f"routes[{i}].auth ({r.name}): on_store_error open keeps verifying with whatever key set is "
                       "held, and lets every request through unauthenticated when none was ever fetched")
        elif r.auth is not None and r.auth.on_store_error == "open":
            what = "the authorizer" if r.auth.type == "http" else "the store"
            out.append(f"routes[{i}].auth ({r.name}): on_store_error open lets every request through "
                       f"unauthenticated while {what} cannot answer")
        if r.auth is not None and r.auth.type == "jwt" and not (r.auth.issuer and r.auth.audiences):
            out.append(f"routes[{i}].auth ({r.name}): without issuer and audiences, a token any client of the "
                       "identity provider obtained for another service is accepted here")
        if r.auth is not None and r.auth.on_store_error == "stale" and r.auth.stale_fallback == "open":
            out.append(f"routes[{i}].auth ({r.name}): stale_fallback open lets credentials never seen before "
                       "through unauthenticated while the store cannot answer")
    return out


def _fall_through(routes: Any, matches: list[RouteMatch]) -> list[str]:
    """A route that accepts only some methods does not refuse the others: they go on down the list. Warn when
    the route they reach on the same path checks less (no auth, or no rate limit, where this one has it)."""
    out: list[str] = []
    for i, m in enumerate(matches):
        if m.methods is None:
            continue
        escapes: dict[int, list[str]] = {}
        for method in _METHODS:
            if method in m.methods:
                continue
            for j in range(i + 1, len(matches)):
                later = matches[j]
                if ((later.host is None or later.host == m.host) and later.matches_path(m.path)
                        and (later.methods is None or method in later.methods)):
                    escapes.setdefault(j, []).append(method)
                    break
        for j, methods in escapes.items():
            weaker = [kind for kind in ("auth", "rate_limit")
                      if getattr(routes[i], kind) is not None and getattr(routes[j], kind) is None]  # (any limit)
            if weaker:
                out.append(f"routes[{i}] ({routes[i].name}) accepts only {', '.join(sorted(m.methods))}: "
                           f"{', '.join(methods)} {m.path} fall through to routes[{j}] ({routes[j].name}), "
                           f"which has no {' and no '.join(weaker)}; list every method on routes[{i}] or add a route "
                           "that refuses the others")
    return out


def _how(inherited: frozenset[str], key: str) -> str:
    return "inherited from defaults" if key in inherited else "declared"


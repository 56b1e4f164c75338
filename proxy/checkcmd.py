"""`failgate check FILE`: validate a config and explain what it will do, route by route."""

from __future__ import annotations

from .config import LoadedConfig, format_duration
from .config.validate import redact_url, resolve_workers
from .routing import compile_match


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
        lines.append(f"  [{i}] {r.name}: {methods} {path}{host} -> {r.upstream} {up.url}{strip}")
        if r.auth is None and r.rate_limit is None:
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
            lines.append(f"      auth: api_key in {a.header}{' ' + a.scheme if a.scheme else ''}{scopes}; "
                         f"on_store_error {a.on_store_error} ({how}){extra}")
        if r.rate_limit is not None:
            rl = r.rate_limit
            how = _how(inherited.get((i, "rate_limit"), frozenset()), "on_store_error")
            extra = f", status {rl.status_on_error}" if rl.on_store_error == "closed" else ""
            lines.append(f"      rate_limit: {rl.limit} per {format_duration(rl.per)} ({rl.algorithm}) by "
                         f"{rl.key}; on_store_error {rl.on_store_error} ({how}){extra}")
    warns = warnings(loaded)
    if warns:
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in warns)
    return "\n".join(lines)


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
    for i, r in enumerate(cfg.routes):
        if r.auth is not None and r.auth.on_store_error == "open":
            out.append(f"routes[{i}].auth ({r.name}): on_store_error open lets every request through "
                       "unauthenticated while the store cannot answer")
        if r.auth is not None and r.auth.on_store_error == "stale" and r.auth.stale_fallback == "open":
            out.append(f"routes[{i}].auth ({r.name}): stale_fallback open lets credentials never seen before "
                       "through unauthenticated while the store cannot answer")
    return out


def _how(inherited: frozenset[str], key: str) -> str:
    return "inherited from defaults" if key in inherited else "declared"


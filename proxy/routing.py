"""Request-target normalization and route matching. No I/O.

Matching runs on the raw request target, normalized once: unreserved characters are percent-decoded (so `%41`
and `A` are the same path), `.`/`..` segments resolved, `//` collapsed. Anything that could make the proxy and
the upstream disagree about which path was asked for is refused with 400 instead: an encoded `/` or `\\`, a raw
`\\` or `;`, control characters, bad escapes, `..` above the root. The upstream receives exactly the normalized
path plus the original query string.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters allowed raw in a path (RFC 3986 pchar + "/"), minus ";" which we refuse (matrix parameters are
# read differently by different servers) and "%" which is handled as an escape.
_PATH_RAW = _UNRESERVED | frozenset("!$&'()*+,=:@/")


class BadTarget(ValueError):
    """The request target cannot be normalized safely: answer 400 with this message as the detail."""


class Target(NamedTuple):  # (made per request: a NamedTuple costs half what a frozen dataclass does)
    path: str  # normalized
    query: str  # raw, without "?"; "" when absent
    authority: str | None  # from an absolute-form target
    port: int = 0  # the default port of an absolute-form target's scheme (80 or 443)


def parse_target(raw: str) -> Target:
    authority = None
    port = 0
    if raw[:1] != "/":
        lower = raw[:8].lower()
        if lower.startswith("http://") or lower.startswith("https://"):
            port = 443 if lower.startswith("https") else 80
            rest = raw[raw.index("//") + 2 :]
            cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
            authority, raw = rest[:cut], rest[cut:]
            if raw[:1] != "/":
                raw = "/" + raw
        else:
            raise BadTarget("the request target must be a path or an absolute http(s) URL")
    path, _, query = raw.partition("?")
    if "#" in raw:
        raise BadTarget("a fragment (#) is not allowed in a request target")
    return Target(normalize_path(path), query, authority, port)


def normalize_path(path: str) -> str:
    # Fast path: the overwhelmingly common clean path needs no rewriting.
    if "%" not in path and "/." not in path and "//" not in path and _all_raw_ok(path):
        return path
    if not path.startswith("/"):
        raise BadTarget("the path must start with /")
    # Escape by escape, each looked up in a table, and the raw text between them checked by one regex: a hostile
    # target of thousands of escapes costs one dictionary look-up each, not a Python step per character.
    parts = path.split("%")
    _check_raw_run(parts[0])
    out = [parts[0]]
    for part in parts[1:]:
        decoded = _ESCAPES.get(part[:2])
        if decoded is None:
            raise BadTarget(_escape_error(part[:2]))
        out.append(decoded)
        rest = part[2:]
        if rest:
            _check_raw_run(rest)
            out.append(rest)
    return _resolve_dots("".join(out))


def _escape_table() -> dict[str, str]:
    """Every two-hex-digit spelling of an allowed escape -> what it normalizes to: the character itself when it
    is unreserved, else the escape with upper-case hex. Encoded `/`, `\\` and control characters are absent."""
    table = {}
    for code in range(256):
        if code < 0x20 or code == 0x7F or chr(code) in "/\\":
            continue
        upper = f"{code:02X}"
        normal = chr(code) if chr(code) in _UNRESERVED else "%" + upper
        for spelling in {upper, upper.lower(), upper[0] + upper[1].lower(), upper[0].lower() + upper[1]}:
            table[spelling] = normal
    return table


def _escape_error(h: str) -> str:
    if len(h) != 2 or h[0] not in _HEX or h[1] not in _HEX:
        return "invalid percent-escape in the path"
    if chr(int(h, 16)) in "/\\":
        return "an encoded / or \\ is not allowed in the path"
    return "an encoded control character is not allowed in the path"


_RAW_RUN: Final = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/]*")


def _check_raw_run(text: str) -> None:
    if _RAW_RUN.fullmatch(text) is None:
        for c in text:  # only to name the offending character
            _check_raw(c)


_CLEAN: Final = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")


_ESCAPES: Final = _escape_table()


def _all_raw_ok(path: str) -> bool:
    return _CLEAN.fullmatch(path) is not None


def _check_raw(c: str) -> None:
    if c in _PATH_RAW:
        return
    if c == "\\":
        raise BadTarget("a backslash is not allowed in the path")
    if c == ";":
        raise BadTarget("a semicolon is not allowed in the path")
    if ord(c) < 0x20 or ord(c) == 0x7F:
        raise BadTarget("a control character is not allowed in the path")
    if ord(c) > 0x7E:
        raise BadTarget("a non-ASCII character must be percent-encoded in the path")
    raise BadTarget(f"the character {c!r} must be percent-encoded in the path")


def _resolve_dots(path: str) -> str:
    segments = path.split("/")[1:]
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "." or (seg == "" and not last):
            if last:
                out.append("")
            continue
        if seg == "..":
            if not out:
                raise BadTarget("the path climbs above the root with ..")
            out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out)


@dataclass(frozen=True, slots=True)
class Authority:
    """The one host of a request: `name` is what routes match (lower case, no trailing dot, no port); `value` is
    what the upstream and X-Forwarded-Host are told (the name plus a port that is not the default one)."""

    name: str
    value: str


_HOST: Final = re.compile(r"(?:([a-z0-9_-]+(?:\.[a-z0-9_-]+)*)\.?|\[([0-9a-f:.]+)\])(?::([0-9]{1,5}))?")
_AUTHORITIES: Final[dict[tuple[str, int], Authority]] = {}  # clients repeat their Host: parsed once


def authority_of(raw: str, default_port: int) -> Authority:
    """`Example.COM.:80` -> Authority("example.com", "example.com"); raises BadTarget for userinfo or anything
    that is not host[:port] (letters, digits, `-`, `_` and `.` in names; IPv6 in brackets)."""
    cached = _AUTHORITIES.get((raw, default_port))
    if cached is not None:
        return cached
    if "@" in raw:
        raise BadTarget("userinfo (user:password@) is not allowed in the host")
    m = _HOST.fullmatch(raw.lower())
    if m is None:
        raise BadTarget("the host is not a valid host[:port]")
    name, ipv6, port = m.group(1), m.group(2), m.group(3)
    if ipv6 is not None:
        try:
            ipaddress.IPv6Address(ipv6)
        except ValueError:
            raise BadTarget("the host is not a valid IPv6 address in brackets") from None
        name = f"[{ipv6}]"
    value = name
    if port is not None:
        number = int(port)
        if not 0 < number <= 65535:
            raise BadTarget("the port in the host is not 1-65535")
        if number != default_port:
            value = f"{name}:{number}"
    found = Authority(name, value)
    if len(_AUTHORITIES) >= 4096:
        _AUTHORITIES.clear()
    _AUTHORITIES[(raw, default_port)] = found
    return found


def host_of(value: str | None) -> str | None:
    """A route's `match.host` as requests are matched: `Example.COM.:8080` -> `example.com`."""
    if not value:
        return None
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    return value.split(":", 1)[0].removesuffix(".")


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The matching part of a route, compiled."""

    path: str  # normalized; for prefixes without a trailing slash (except "/")
    prefix: bool
    methods: frozenset[str] | None  # None = all
    host: str | None  # lower case, no port

    def matches_path(self, path: str) -> bool:
        if not self.prefix:
            return path == self.path
        p = self.path
        if p == "/":
            return True
        return path == p or (path.startswith(p) and path[len(p)] == "/")

    def matches(self, method: str, host: str | None, path: str) -> bool:
        if self.host is not None and self.host != host:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        return self.matches_path(path)

    def covers(self, other: RouteMatch) -> bool:
        """Whether every request `other` matches is matched by self (so `other`, listed later, is shadowed)."""
        if self.host is not None and self.host != other.host:
            return False
        if self.methods is not None and (other.methods is None or not other.methods <= self.methods):
            return False
        if other.prefix:
            return self.prefix and self.matches_path(other.path)
        return self.matches_path(other.path)


def compile_match(path: str, prefix: bool, methods: Sequence[str] | None, host: str | None) -> RouteMatch:
    if prefix and path != "/" and path.endswith("/"):
        path = path.rstrip("/") or "/"
    return RouteMatch(
        path=path,
        prefix=prefix,
        methods=frozenset(m.upper() for m in methods) if methods else None,
        host=host_of(host),
    )


def _first_segment(path: str) -> str:
    """`/api/v1/x` → `api`; `/` → `` (paths are normalized: they start with one slash)."""
    end = path.find("/", 1)
    return path[1:] if end < 0 else path[1:end]


class Router:
    """First match wins; `allowed` lists the methods of routes whose host and path matched, for a 405.

    A request is tried only against the routes that can match its path's first segment — those whose path starts
    with it, and the `/` prefix routes that match every path — in config order, so the first match is the one a
    walk through every route would find, and a config with many routes costs no more per request than one with a
    few."""

    def __init__(self, entries: Sequence[tuple[RouteMatch, object]]) -> None:
        self._entries = list(entries)
        self._anywhere: list[tuple[RouteMatch, object]] = []  # the `/` prefix routes
        self._by_segment: dict[str, list[tuple[RouteMatch, object]]] = {}
        for entry in self._entries:  # in config order, so every list keeps it
            m = entry[0]
            if m.prefix and m.path == "/":
                self._anywhere.append(entry)
                for candidates in self._by_segment.values():
                    candidates.append(entry)
            else:  # a segment's list starts with the `/` routes listed before its first route
                self._by_segment.setdefault(_first_segment(m.path), list(self._anywhere)).append(entry)

    def match(self, method: str, host: str | None, path: str) -> object | None:
        candidates = self._by_segment.get(_first_segment(path))
        for m, route in self._anywhere if candidates is None else candidates:
            if m.matches(method, host, path):
                return route
        return None

    def allowed(self, host: str | None, path: str) -> set[str]:
        out: set[str] = set()
        for m, _ in self._entries:
            if (m.host is None or m.host == host) and m.matches_path(path) and m.methods is not None:
                out |= m.methods
        return out

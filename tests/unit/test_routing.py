"""Normalization and matching rules of the README's "How requests are handled", one table row per rule."""

from __future__ import annotations

import random

import pytest

from proxy.routing import Authority, BadTarget, Router, authority_of, compile_match, host_of, parse_target


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/", "/", ""),
        ("/a/b", "/a/b", ""),
        ("/a/b?x=1&y=%2F", "/a/b", "x=1&y=%2F"),  # the query is passed on untouched
        ("/a/./b", "/a/b", ""),
        ("/a/../b", "/b", ""),
        ("/a/b/..", "/a/", ""),
        ("/a/b/.", "/a/b/", ""),
        ("/a//b///c", "/a/b/c", ""),
        ("//a", "/a", ""),
        ("/%61%62c", "/abc", ""),  # unreserved escapes decoded
        ("/%7e%7E%2d%2E%5f", "/~~-._", ""),
        ("/a/%2e%2e/b", "/b", ""),  # decoded dots are dot segments
        ("/a%20b", "/a%20b", ""),  # reserved / other escapes kept, hex upper-cased
        ("/a%3fb", "/a%3Fb", ""),
        ("/a/%25", "/a/%25", ""),
        ("/A..b/..c", "/A..b/..c", ""),  # dots inside a segment are just characters
        ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,=", ""),
    ],
)
def test_normalizes(raw: str, path: str, query: str) -> None:
    t = parse_target(raw)
    assert (t.path, t.query) == (path, query)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("/a%2fb", "encoded / or \\"),
        ("/a%2Fb", "encoded / or \\"),
        ("/a%5cb", "encoded / or \\"),
        ("/a%5Cb", "encoded / or \\"),
        ("/a\\b", "backslash"),
        ("/a;b", "semicolon"),
        ("/a;jsessionid=1", "semicolon"),
        ("/a\x00b", "control character"),
        ("/a\x1fb", "control character"),
        ("/a\x7fb", "control character"),
        ("/a%00b", "encoded control character"),
        ("/a%0ab", "encoded control character"),
        ("/a%zzb", "invalid percent-escape"),
        ("/a%2", "invalid percent-escape"),
        ("/a%", "invalid percent-escape"),
        ("/..", "above the root"),
        ("/a/../..", "above the root"),
        ("/a/../../b", "above the root"),
        ("/%2e%2e", "above the root"),
        ("/caf\u00e9", "non-ASCII"),
        ("/a b", "percent-encoded"),
        ("/a#frag", "fragment"),
        ("*", "path or an absolute"),
        ("a/b", "path or an absolute"),
        ("ftp://h/x", "path or an absolute"),
    ],
)
def test_refuses(raw: str, reason: str) -> None:
    with pytest.raises(BadTarget) as exc:
        parse_target(raw)
    assert reason in str(exc.value)


@pytest.mark.parametrize(
    ("raw", "authority", "path", "query"),
    [
        ("http://api.example.com/x/../y?q=1", "api.example.com", "/y", "q=1"),
        ("HTTPS://Api.Example.com:8443", "Api.Example.com:8443", "/", ""),
        ("http://h?q", "h", "/", "q"),
    ],
)
def test_absolute_form(raw: str, authority: str, path: str, query: str) -> None:
    t = parse_target(raw)
    assert (t.authority, t.path, t.query) == (authority, path, query)


@pytest.mark.parametrize(
    ("value", "host"),
    [("Example.COM", "example.com"), ("example.com:8080", "example.com"), ("[::1]:80", "[::1]"),
     ("[::1]", "[::1]"), ("", None), (None, None)],
)
def test_host_of(value: str | None, host: str | None) -> None:
    assert host_of(value) == host


@pytest.mark.parametrize(
    ("path", "prefix", "request_path", "matches"),
    [
        ("/pay", True, "/pay", True),
        ("/pay", True, "/pay/", True),
        ("/pay", True, "/pay/x/y", True),
        ("/pay", True, "/payroll", False),
        ("/pay", True, "/pa", False),
        ("/pay/", True, "/pay", True),  # a trailing slash on a prefix is not significant
        ("/pay/", True, "/pay/x", True),
        ("/pay/", True, "/payroll", False),
        ("/", True, "/anything/at/all", True),
        ("/pay", False, "/pay", True),
        ("/pay", False, "/pay/", False),
        ("/pay", False, "/pay/x", False),
    ],
)
def test_prefix_matches_at_segment_boundary(path: str, prefix: bool, request_path: str, matches: bool) -> None:
    m = compile_match(path, prefix, None, None)
    assert m.matches("GET", None, request_path) is matches


def test_host_and_methods() -> None:
    m = compile_match("/", True, ["GET", "POST"], "API.example.com")
    assert m.matches("GET", "api.example.com", "/x")
    assert not m.matches("GET", "other.example.com", "/x")
    assert not m.matches("GET", None, "/x")
    assert not m.matches("DELETE", "api.example.com", "/x")


def test_first_match_wins_and_allowed_methods() -> None:
    router = Router([
        (compile_match("/a", True, ["GET"], None), "first"),
        (compile_match("/a/b", False, None, None), "second"),
        (compile_match("/a", True, ["PUT"], None), "third"),
    ])
    assert router.match("GET", None, "/a/b") == "first"
    assert router.match("POST", None, "/a/b") == "second"
    assert router.match("PUT", None, "/a/c") == "third"
    assert router.match("POST", None, "/a/c") is None
    assert router.allowed(None, "/a/c") == {"GET", "PUT"}
    assert router.match("GET", None, "/b") is None
    assert router.allowed(None, "/b") == set()


def test_the_segment_index_finds_what_a_walk_through_every_route_finds() -> None:
    # The router tries only the routes that can match a path's first segment (and the `/` prefix routes):
    # against a plain first-match walk over random routes and paths, the same route every time.
    rnd = random.Random(7)
    parts = ["", "a", "ab", "b", "a/b", "a/b/c", "ab/c", "c"]

    def path() -> str:
        return "/" + rnd.choice(parts)

    for _ in range(200):
        entries = [(compile_match(path(), rnd.random() < 0.6, rnd.choice([None, ["GET"], ["POST"]]),
                                  rnd.choice([None, None, "x.com"])), i) for i in range(rnd.randrange(1, 9))]
        router = Router(entries)
        for _ in range(30):
            method, host, target = rnd.choice(["GET", "POST"]), rnd.choice([None, "x.com"]), path() + \
                rnd.choice(["", "/", "/z", "z"])
            walk = next((r for m, r in entries if m.matches(method, host, target)), None)
            assert router.match(method, host, target) == walk, (entries, method, host, target)


@pytest.mark.parametrize(
    ("first", "later", "shadowed"),
    [
        (("/", True, None, None), ("/x", False, None, None), True),
        (("/a", True, None, None), ("/a/b", True, None, None), True),
        (("/a", True, None, None), ("/ab", True, None, None), False),
        (("/a/b", True, None, None), ("/a", True, None, None), False),
        (("/a", False, None, None), ("/a", True, None, None), False),
        (("/a", True, ["GET"], None), ("/a/b", False, None, None), False),
        (("/a", True, ["GET", "POST"], None), ("/a/b", False, ["GET"], None), True),
        (("/a", True, None, "x.com"), ("/a/b", False, None, None), False),
        (("/a", True, None, None), ("/a/b", False, None, "x.com"), True),
    ],
)
def test_covers(first: tuple, later: tuple, shadowed: bool) -> None:  # type: ignore[type-arg]
    assert compile_match(*first).covers(compile_match(*later)) is shadowed


@pytest.mark.parametrize(
    ("raw", "default_port", "name", "value"),
    [("Example.COM", 80, "example.com", "example.com"), ("example.com.:80", 80, "example.com", "example.com"),
     ("example.com:8080", 80, "example.com", "example.com:8080"),
     ("example.com:443", 443, "example.com", "example.com"), ("[::1]:80", 80, "[::1]", "[::1]"),
     ("[::1]:8443", 80, "[::1]", "[::1]:8443"), ("compose_svc", 80, "compose_svc", "compose_svc")],
)
def test_one_authority(raw: str, default_port: int, name: str, value: str) -> None:
    assert authority_of(raw, default_port) == Authority(name, value)


@pytest.mark.parametrize("raw", ["x:y@example.com", "example.com@evil", "a b", "", "[zz]", "[::1", "h:0", "h:99999",
                                 "h:x", "ex/ample", "ex%61mple"])
def test_authority_refused(raw: str) -> None:
    with pytest.raises(BadTarget):
        authority_of(raw, 80)

"""Config loading: every error names the file, the path and what was expected — asserted exactly."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_file, load_text

BASE = """\
version: 1
upstreams:
  api: {url: "http://127.0.0.1:8000"}
routes:
  - name: all
    match: {path: /, prefix: true}
    upstream: api
"""


def load(text: str) -> None:
    load_text(textwrap.dedent(text), "f.yaml")


def error(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load(text)
    return str(exc.value)


def test_minimal_config_gets_the_documented_defaults() -> None:
    loaded = load_text(BASE, "f.yaml")
    cfg = loaded.config
    assert (cfg.listen.host, cfg.listen.port) == ("0.0.0.0", 8080)
    assert (cfg.admin.host, cfg.admin.port, cfg.admin.token, cfg.admin.chaos) == ("127.0.0.1", 9901, None, False)
    assert cfg.workers == 1 and cfg.shutdown_grace == 15.0 and cfg.watch is False
    assert cfg.store.url == "memory://" and cfg.store.timeout == 0.05 and cfg.store.connect_timeout == 0.2
    assert cfg.store.pool_size == 16 and cfg.store.breaker.failures == 5 and cfg.store.breaker.open_for == 2.0
    assert cfg.store.key_prefix == "failgate:"
    assert cfg.headers.degraded == "Failgate-Degraded" and cfg.headers.request_id == "X-Request-Id"
    assert cfg.limits.max_body == 10 * 1024 * 1024 and cfg.limits.header_timeout == 10.0
    assert cfg.limits.max_connections == 10000 and cfg.access_log is False and cfg.trusted_proxies == []
    up = cfg.upstreams["api"]
    assert (up.connect_timeout, up.timeout, up.idle_timeout, up.preserve_host, up.tls_verify) == (
        1.0, 30.0, 60.0, False, True)
    r = cfg.routes[0]
    assert (r.match.prefix, r.match.methods, r.match.host, r.strip_prefix) == (True, None, None, False)
    assert len(loaded.sha256) == 64


@pytest.mark.parametrize(
    ("text", "value"),
    [("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1d", 86400.0), ("1.5s", 1.5)],
)
def test_durations(text: str, value: float) -> None:
    loaded = load_text(BASE + f"shutdown_grace: {text}\n", "f.yaml")
    assert loaded.config.shutdown_grace == value


@pytest.mark.parametrize(("text", "value"), [("1024", 1024), ("512KiB", 512 * 1024), ("10MiB", 10 << 20),
                                             ("1GiB", 1 << 30), ("10MB", 10_000_000)])
def test_sizes(text: str, value: int) -> None:
    loaded = load_text(BASE + f"limits: {{max_body: {text}}}\n", "f.yaml")
    assert loaded.config.limits.max_body == value


ROUTE = """\
version: 1
upstreams:
  api: {url: "http://127.0.0.1:8000"}
routes:
  - name: a
    match: {path: /a}
    upstream: api
"""

CASES = [
    # --- reading the file ---
    ("", "f.yaml: the file is empty; expected a mapping that starts with `version: 1`"),
    ("routes: [\n", "f.yaml: not valid YAML: line 2, column 1: expected the node content, but found '<stream end>'"),
    ("- 1\n- 2\n", "f.yaml: expected a mapping at the top level, got a list"),
    ("version: 1\nversion: 1\n", "f.yaml: not valid YAML: line 2, column 1: duplicate key 'version'"),
    # --- shape ---
    ("version: 2\nupstreams: {}\nroutes: []\n", "f.yaml: version: expected one of: 1; got 2"),
    ("upstreams: {}\nroutes: []\n", "f.yaml: missing required key `version`"),
    (ROUTE + "listen: {port: 70000}\n", "f.yaml: listen.port: expected int <= 65535, got 70000"),
    (ROUTE + "listen: {prot: 1}\n", "f.yaml: listen: unknown key `prot`; expected one of: host, port, tls"),
    (ROUTE + "bogus: 1\n",
     "f.yaml: unknown key `bogus`; expected one of: version, listen, admin, workers, shutdown_grace, watch, "
     "store, trusted_proxies, headers, limits, access_log, defaults, upstreams, routes"),
    (ROUTE + "workers: many\n", "f.yaml: workers: expected an integer or one of: auto; got 'many'"),
    (ROUTE + "workers: 0\n", "f.yaml: workers: expected int >= 1 or one of: auto, got 0"),
    (ROUTE + "shutdown_grace: 15\n",
     "f.yaml: shutdown_grace: expected a duration such as 250ms, 2s, 1m, 1h or 1d, got 15"),
    (ROUTE + "shutdown_grace: 2 weeks\n",
     "f.yaml: shutdown_grace: expected a duration such as 250ms, 2s, 1m, 1h or 1d, got '2 weeks'"),
    (ROUTE + "limits: {max_body: lots}\n",
     "f.yaml: limits.max_body: expected a size such as 1048576, 512KiB or 10MiB, got 'lots'"),
    (ROUTE + "watch: yes\n", "f.yaml: watch: expected bool, got 'yes'"),  # YAML 1.1's yes is not a boolean
    (ROUTE + "access_log: off\n", "f.yaml: access_log: expected bool, got 'off'"),
    ("version: 1\nupstreams:\n  api: {url: 5}\nroutes: []\n", "f.yaml: upstreams.api.url: expected str | null, got 5"),
    ("version: 1\nupstreams:\n  api: {url: 'http://x', timeout: soon}\nroutes: []\n",
     "f.yaml: upstreams.api.timeout: expected a duration such as 250ms, 2s, 1m, 1h or 1d, got 'soon'"),
    ("version: 1\nupstreams: []\nroutes: []\n", "f.yaml: upstreams: expected a mapping, got a list"),
    # --- Redis Sentinel ---
    ("version: 1\nstore: {url: 'redis+sentinel://127.0.0.1:26379'}\nupstreams: {a: {url: 'http://a'}}\nroutes: []\n",
     "f.yaml: store.url: expected the master's name in the path: …/<master-name>/<db> "
     "(in 'redis+sentinel://127.0.0.1:26379')"),
    ("version: 1\nstore: {url: 'redis+sentinel://h:x/m/0'}\nupstreams: {a: {url: 'http://a'}}\nroutes: []\n",
     "f.yaml: store.url: expected sentinels as host:port, comma-separated; got 'h:x' "
     "(in 'redis+sentinel://h:x/m/0')"),
    ("version: 1\nstore: {url: 'redis+sentinel://h:1/m/0?password=s'}\nupstreams: {a: {url: 'http://a'}}\n"
     "routes: []\n",
     "f.yaml: store.url: unknown query parameter 'password'; the known ones are sentinel_password and "
     "ssl_ca_certs (in 'redis+sentinel://h:1/m/0?password=***')"),
    # --- several targets ---
    ("version: 1\nupstreams:\n  api: {timeout: 1s}\nroutes: []\n",
     "f.yaml: upstreams.api: expected either `url` (one target) or `targets` (a list of URLs), not neither"),
    ("version: 1\nupstreams:\n  api: {url: 'http://a', targets: ['http://b']}\nroutes: []\n",
     "f.yaml: upstreams.api: expected either `url` (one target) or `targets` (a list of URLs), not both"),
    ("version: 1\nupstreams:\n  api: {targets: []}\nroutes: []\n",
     "f.yaml: upstreams.api.targets: expected at least one URL"),
    ("version: 1\nupstreams:\n  api: {targets: ['http://a:80', 'ftp://b']}\nroutes: []\n",
     "f.yaml: upstreams.api.targets[1]: expected an http:// or https:// URL such as http://127.0.0.1:8000, got 'ftp://b'"),
    ("version: 1\nupstreams:\n  api: {targets: ['http://a:80/v1', 'http://A/v1/']}\nroutes: []\n",
     "f.yaml: upstreams.api.targets[1]: the same target twice (also upstreams.api.targets[0])"),
    ("version: 1\nupstreams:\n  api: {targets: ['http://u:p@a', 'http://b']}\nroutes: []\n",
     "f.yaml: upstreams.api.targets: every target of an upstream must carry the same credentials (user:password in "
     "the URL): they are the upstream's, whichever target a request goes to"),
    ("version: 1\nupstreams:\n  api: {targets: ['http://a'], balance: random}\nroutes: []\n",
     "f.yaml: upstreams.api.balance: expected one of: round_robin, least_request; got 'random'"),
    ("version: 1\nupstreams:\n  api: {targets: ['http://a'], eject: {for: 0s}}\nroutes: []\n",
     "f.yaml: upstreams.api.eject.for: expected a duration greater than 0"),
    (ROUTE + "    bogus: true\n",
     "f.yaml: routes[0]: unknown key `bogus`; expected one of: name, match, upstream, strip_prefix, auth, "
     "rate_limit"),
    (ROUTE.replace("{path: /a}", "{path: /a, prefix: no}"), "f.yaml: routes[0].match.prefix: expected bool, got 'no'"),
    (ROUTE + "    rate_limit: {limit: 0, per: 1m, on_store_error: open}\n",
     "f.yaml: routes[0].rate_limit.limit: expected int >= 1, got 0"),
    (ROUTE + "    rate_limit: {limit: 10, per: 1m, on_store_error: sometimes}\n",
     "f.yaml: routes[0].rate_limit.on_store_error: expected one of: open, closed, stale; got 'sometimes'"),
    (ROUTE + "    rate_limit: {limit: 10, per: 1m, on_store_error: open, algorithm: leaky}\n",
     "f.yaml: routes[0].rate_limit.algorithm: expected one of: fixed_window, sliding_window, gcra; got 'leaky'"),
    (ROUTE + "    auth: {type: oauth, on_store_error: closed}\n",
     "f.yaml: routes[0].auth.type: expected one of: api_key, jwt, http; got 'oauth'"),
    (ROUTE + "    auth: {type: jwt, on_store_error: closed}\n",
     "f.yaml: routes[0].auth.algorithms: required for type: jwt — the algorithms tokens may be signed with, such "
     "as [RS256, ES256]"),
    (ROUTE + "    auth: {type: jwt, algorithms: [none], jwks_url: 'http://i/k', on_store_error: closed}\n",
     "f.yaml: routes[0].auth.algorithms[0]: expected one of ES256, ES384, ES512, EdDSA, HS256, HS384, HS512, PS256, "
     "PS384, PS512, RS256, RS384, RS512, got 'none' (`none` is never accepted)"),
    (ROUTE + "    auth: {type: jwt, algorithms: [HS256], on_store_error: closed}\n",
     "f.yaml: routes[0].auth.secret: required with HS256 (use ${VAR} to keep it out of the file)"),
    (ROUTE + "    auth: {type: jwt, algorithms: [RS256], on_store_error: closed}\n",
     "f.yaml: routes[0].auth: RS256 need the identity provider's keys: jwks_url (fetched in the background) or "
     "jwks_file"),
    (ROUTE + "    auth: {type: jwt, algorithms: [RS256], jwks_url: 'http://i/k', on_store_error: stale, "
     "stale_fallback: closed, stale_for: 15m}\n",
     "f.yaml: routes[0].auth.stale_for: must be more than 2 x jwks_refresh (10m): the key set only goes stale after "
     "two refreshes failed"),
    (ROUTE + "    auth: {type: api_key, issuer: x, on_store_error: closed}\n",
     "f.yaml: routes[0].auth.issuer: only applies to type: jwt"),
    (ROUTE + "    auth: {type: api_key, on_store_error: closed, status_on_error: 200}\n",
     "f.yaml: routes[0].auth.status_on_error: expected int >= 400, got 200"),
    # --- meaning ---
    (ROUTE.replace("upstream: api", "upstream: apii"),
     "f.yaml: routes[0].upstream: unknown upstream 'apii'; expected one of: api"),
    (ROUTE + "  - name: a\n    match: {path: /b}\n    upstream: api\n",
     "f.yaml: routes[1].name: duplicate route name 'a' (also routes[0])"),
    (ROUTE + "    rate_limit: {limit: 10, per: 1m}\n",
     "f.yaml: routes[0].rate_limit: on_store_error is not set here or in defaults.rate_limit; choose open (let "
     "requests through when the store cannot answer), closed (refuse them with status_on_error) or stale (reuse "
     "the last known good answer)"),
    (ROUTE + "    auth: {type: api_key}\n",
     "f.yaml: routes[0].auth: on_store_error is not set here or in defaults.auth; choose open (let requests "
     "through when the store cannot answer), closed (refuse them with status_on_error) or stale (reuse the last "
     "known good answer)"),
    (ROUTE + "    auth: {type: api_key, on_store_error: stale}\n",
     "f.yaml: routes[0].auth.stale_fallback: required with on_store_error: stale — what to do when no remembered "
     "answer exists: open or closed"),
    (ROUTE + "    auth: {type: api_key, on_store_error: stale, stale_fallback: closed, stale_for: 2d}\n",
     "f.yaml: routes[0].auth.stale_for: expected a duration above 0 and at most 24h, got 2d"),
    (ROUTE + "    rate_limit: {limit: 10, per: 1m, on_store_error: open, burst: 5}\n",
     "f.yaml: routes[0].rate_limit.burst: only applies to algorithm: gcra (this route uses sliding_window)"),
    (ROUTE + "    rate_limit: {limit: 10, per: 1m, on_store_error: open, key: cookie}\n",
     "f.yaml: routes[0].rate_limit.key: expected one of: client_ip, header:<Name>, principal, route; got 'cookie'"),
    (ROUTE + "    rate_limit: {limit: 10, per: 1m, on_store_error: open, key: principal}\n",
     "f.yaml: routes[0].rate_limit.key: principal needs auth on the same route (the principal comes from it)"),
    (ROUTE.replace("{path: /a}", "{path: a}"),
     "f.yaml: routes[0].match.path: expected a path starting with /, got 'a'"),
    (ROUTE.replace("{path: /a}", "{path: /a/../b}"),
     "f.yaml: routes[0].match.path: expected a normalized path (requests are matched after normalization), got "
     "'/a/../b'; write '/b'"),
    (ROUTE.replace("{path: /a}", "{path: '/a;b'}"),
     "f.yaml: routes[0].match.path: a semicolon is not allowed in the path; got '/a;b'"),
    (ROUTE.replace("{path: /a}", "{path: /a, methods: [get]}"),
     "f.yaml: routes[0].match.methods[0]: expected an upper-case HTTP method such as GET, got 'get'"),
    (ROUTE.replace("{path: /a}", "{path: /a, methods: [CONNECT]}"),
     "f.yaml: routes[0].match.methods[0]: CONNECT is not proxied (it is always answered 405)"),
    (ROUTE.replace("{path: /a}", "{path: /a}\n    strip_prefix: true"),
     "f.yaml: routes[0].strip_prefix: needs match.prefix: true (there is no prefix to strip)"),
    (ROUTE.replace('"http://127.0.0.1:8000"', '"ftp://x"'),
     "f.yaml: upstreams.api.url: expected an http:// or https:// URL such as http://127.0.0.1:8000, got 'ftp://x'"),
    (ROUTE.replace('"http://127.0.0.1:8000"', '"http://u:hunter2@x"') + "store: {url: 'mysql://u:pw@h'}\n",
     "f.yaml: store.url: expected memory://, redis://host:port/db, rediss://…, unix:///path, "
     "redis+sentinel://host:26379,…/<master-name>/<db> or redis+cluster://host:7000,…/, got 'mysql://u:***@h'"),
    (ROUTE + "workers: 2\n",
     "f.yaml: workers: memory:// keeps state inside one process and needs workers: 1 (got 2); use a redis:// store "
     "to run several workers"),
    (ROUTE + "admin: {host: 0.0.0.0}\n",
     "f.yaml: admin.token: required when admin.host (0.0.0.0) is not a loopback address, so that POST endpoints "
     "cannot be called by anyone who reaches the port"),
    (ROUTE + "admin: {port: 8080}\n",
     "f.yaml: admin.port: must differ from listen.port (8080); the admin listener is never served on the proxy port"),
    (ROUTE + "trusted_proxies: [10.0.0.0/33]\n",
     "f.yaml: trusted_proxies[0]: expected an IP address or CIDR such as 10.0.0.0/8, got '10.0.0.0/33'"),
    (ROUTE + "listen: {tls: {cert: /nonexistent.pem, key: /nonexistent.key}}\n",
     "f.yaml: listen.tls.cert: no such file: /nonexistent.pem"),
    (ROUTE + "headers: {degraded: 'Bad Header'}\n",
     "f.yaml: headers.degraded: expected an HTTP header name, got 'Bad Header'"),
    ("version: 1\nupstreams:\n  api: {url: 'http://x'}\nroutes: []\n", "f.yaml: routes: expected at least one route"),
    # --- defaults ---
    (ROUTE + "defaults:\n  rate_limit: {limit: 5}\n",
     "f.yaml: defaults.rate_limit: unknown key `limit`; expected one of: algorithm, burst, key, on_store_error, "
     "status_on_error, local_share"),
    (ROUTE + "defaults:\n  auth: {stale_for: forever}\n",
     "f.yaml: defaults.auth.stale_for: expected a duration such as 250ms, 2s, 1m, 1h or 1d, got 'forever'"),
    # --- environment ---
    (ROUTE + "admin: {token: '${FAILGATE_TEST_UNSET_VAR}'}\n",
     "f.yaml: admin.token: environment variable FAILGATE_TEST_UNSET_VAR is not set (used as "
     "${FAILGATE_TEST_UNSET_VAR})"),
]


@pytest.mark.parametrize(("text", "message"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_exact_error_messages(text: str, message: str) -> None:
    os.environ.pop("FAILGATE_TEST_UNSET_VAR", None)
    assert error(text) == message


def test_defaults_merge_key_by_key_and_the_route_wins() -> None:
    loaded = load_text(ROUTE + "    rate_limit: {limit: 10, per: 1m, algorithm: gcra}\n"
                       "  - name: b\n    match: {path: /b}\n    upstream: api\n"
                       "    rate_limit: {limit: 5, per: 1s, on_store_error: closed}\n"
                       "defaults:\n  rate_limit: {on_store_error: open, algorithm: fixed_window, key: route}\n",
                       "f.yaml")
    a, b = loaded.config.routes[0].rate_limit, loaded.config.routes[1].rate_limit
    assert a is not None and b is not None
    assert (a.on_store_error, a.algorithm, a.key) == ("open", "gcra", "route")
    assert (b.on_store_error, b.algorithm, b.key) == ("closed", "fixed_window", "route")
    assert loaded.inherited[(0, "rate_limit")] == {"on_store_error", "key"}
    assert loaded.inherited[(1, "rate_limit")] == {"algorithm", "key"}


def test_environment_substitution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FG_UP", "http://10.1.2.3:9000")
    monkeypatch.setenv("FG_TOKEN", "s3cret")
    text = ROUTE.replace('"http://127.0.0.1:8000"', '"${FG_UP}"') + "admin: {token: 'Bearer-${FG_TOKEN}'}\n"
    loaded = load_text(text, "f.yaml")
    assert loaded.config.upstreams["api"].url == "http://10.1.2.3:9000"
    assert loaded.config.admin.token == "Bearer-s3cret"
    assert loaded.from_env == {"upstreams.api.url", "admin.token"}


def test_yaml_1_1_surprises_stay_strings() -> None:
    # `NO` (a country), `on` and `0600` are strings/decimal here, not booleans or octal.
    loaded = load_text(ROUTE.replace("name: a", "name: 'NO'").replace("{path: /a}", "{path: /on}")
                       + "limits: {max_connections: 0600}\n", "f.yaml")
    assert loaded.config.routes[0].name == "NO"
    assert loaded.config.routes[0].match.path == "/on"
    assert loaded.config.limits.max_connections == 600


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as exc:
        load_file(str(missing))
    assert str(exc.value) == f"{missing}: cannot read the file: No such file or directory"
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(ConfigError) as exc:
        load_file(str(garbage))
    assert str(exc.value) == f"{garbage}: not UTF-8 text (byte 0); expected a YAML file"


def test_the_shipped_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("config/failgate.yaml", "config/demo.yaml"):
        load_file(str(root / name))


def test_passwords_in_urls_are_redacted_wherever_they_are_shown() -> None:
    from proxy.admin import redacted
    from proxy.config import load_text

    text = """version: 1
store: {url: "redis://:userinfo-secret@127.0.0.1:6379/0?password=query-secret&db=0"}
upstreams:
  api: {url: "http://user:upstream-secret@127.0.0.1:9"}
  many: {targets: ["http://user:target-secret@127.0.0.1:10", "http://user:target-secret@127.0.0.1:11"]}
routes: [{name: r, match: {path: /}, upstream: api}]
"""
    doc = str(redacted(load_text(text, "t.yaml")))
    for secret in ("userinfo-secret", "query-secret", "upstream-secret", "target-secret"):
        assert secret not in doc
    assert "password=***" in doc and ":***@127.0.0.1:6379" in doc


def test_workers_auto_respects_a_container_cpu_quota(tmp_path: Path) -> None:
    from proxy.config.values import resolve_workers

    cpus = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2: 1.5 CPUs
    assert resolve_workers("auto", str(tmp_path)) == min(cpus, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no quota
    assert resolve_workers("auto", str(tmp_path)) == cpus
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")  # cgroup v1: half a CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert resolve_workers("auto", str(tmp_path)) == 1
    assert resolve_workers(3, str(tmp_path)) == 3


async def test_a_websocket_tunnel_on_a_route_with_auth_lasts_an_hour_unless_told() -> None:
    from proxy.compiled import Runtime
    from proxy.config import load_text
    from proxy.store.breaker import Breaker, BreakerStore
    from proxy.store.memory import MemoryStore

    text = """version: 1
upstreams:
  api: {url: "http://127.0.0.1:8000"}
  short: {url: "http://127.0.0.1:8001", websocket_max_duration: 5m}
routes:
  - {name: keyed, match: {path: /k}, upstream: api, auth: {type: api_key, on_store_error: closed}}
  - {name: free, match: {path: /f}, upstream: api}
  - {name: told, match: {path: /t}, upstream: short, auth: {type: api_key, on_store_error: closed}}
"""
    rt = Runtime(load_text(text, "t.yaml"), BreakerStore(MemoryStore(), Breaker(5, 2.0)))
    durations = {path: rt.router.match("GET", None, path).websocket_max_duration  # type: ignore[union-attr]
                 for path in ("/k", "/f", "/t")}
    assert durations == {"/k": 3600.0, "/f": None, "/t": 300.0}

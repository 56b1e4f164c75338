"""The command line: `failgate check` exit codes and output, `run` on a bad config, `demo`."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.helpers import ROOT
from tests.redis_server import RedisServer


def failgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_check_accepts_the_example_config_and_explains_it() -> None:
    r = failgate("check", "config/failgate.yaml")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("config/failgate.yaml: OK (sha256 ")
    assert "[1] payments: any method /payments and below -> payments http://127.0.0.1:8100 (prefix stripped)" in out
    assert "on_store_error stale (declared), stale_for 5m, then closed" in out
    assert "rate_limit: 100 per 1m (sliding_window) by client_ip; on_store_error open (inherited from defaults)" in out
    assert "auth: api_key in X-Api-Key scopes admin; on_store_error closed (inherited from defaults), status 503" in out


def test_version_and_a_reader_that_goes_away() -> None:
    r = failgate("--version")
    assert (r.returncode, r.stdout.strip()) == (0, "failgate 0.1.0")
    # `failgate check F … | head -1`: the pipe closes after one line, long before the output (more than a pipe's
    # buffer) is written; no traceback, a clean exit
    files = " ".join(["config/failgate.yaml"] * 200)
    done = subprocess.run(f"{sys.executable} -m proxy check {files} | head -1", shell=True, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("config/failgate.yaml: OK")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_check_lists_an_upstream_s_targets_without_their_password(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("version: 1\nupstreams:\n  api:\n    targets: ['http://u:secret@10.0.0.1:81', "
                   "'http://u:secret@10.0.0.2:81']\n    balance: least_request\n"
                   "routes:\n  - {name: all, match: {path: /, prefix: true}, upstream: api}\n")
    r = failgate("check", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "-> api (2 targets)" in r.stdout
    assert ("  api: 2 targets, least_request; a target out for 10s after 5 gateway failures in a row (at most 1 out "
            "at once); idempotent requests retried once on another") in r.stdout
    assert "    - http://u:***@10.0.0.1:81\n    - http://u:***@10.0.0.2:81" in r.stdout
    assert "secret" not in r.stdout


def test_check_warns_about_shadowed_routes_and_auth_that_fails_open(tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text("""\
version: 1
upstreams: {api: {url: "http://127.0.0.1:1"}}
routes:
  - name: everything
    match: {path: /, prefix: true}
    upstream: api
  - name: users
    match: {path: /users}
    upstream: api
    auth: {type: api_key, on_store_error: open}
  - name: pay
    match: {path: /pay}
    upstream: api
    auth: {type: api_key, on_store_error: stale, stale_fallback: open}
""")
    r = failgate("check", str(cfg))
    assert r.returncode == 0
    assert "  - routes[1] (users) can never match: routes[0] (everything) matches every request it would" in r.stdout
    assert ("  - routes[1].auth (users): on_store_error open lets every request through unauthenticated while the "
            "store cannot answer") in r.stdout
    assert ("  - routes[2].auth (pay): stale_fallback open lets credentials never seen before through "
            "unauthenticated while the store cannot answer") in r.stdout


def test_check_rejects_a_bad_config_with_exit_1_and_no_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("version: 1\nupstreams: {api: {url: 'http://x'}}\nroutes:\n"
                   "  - {name: a, match: {path: /}, upstream: nope}\n")
    r = failgate("check", str(cfg))
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == f"error: {cfg}: routes[0].upstream: unknown upstream 'nope'; expected one of: api\n"
    r = failgate("check", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1
    assert "cannot read the file: No such file or directory" in r.stderr and "Traceback" not in r.stderr


def test_run_with_an_invalid_config_exits_1(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("version: 1\nupstreams: {}\nroutes: []\nlisten: {port: nope}\n")
    r = failgate("run", "-c", str(cfg))
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {cfg}: listen.port: expected int, got 'nope'"


def test_python_m_proxy_and_the_console_script_are_the_same_program() -> None:
    script = Path(sys.executable).parent / "failgate"
    a = subprocess.run([str(script), "check", "config/demo.yaml"], capture_output=True, text=True, cwd=ROOT)
    b = failgate("check", "config/demo.yaml")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


async def test_demo_serves_the_echo_api_through_the_proxy_with_a_seeded_key() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out = ""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        key = token = None
        while key is None or token is None:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
            assert line, "demo exited early"
            out += line
            if "export KEY=" in line:
                key = line.split("KEY=", 1)[1].strip()
            if "export TOKEN=" in line:
                token = line.split("TOKEN=", 1)[1].strip()
            assert time.monotonic() < deadline
        async with aiohttp.ClientSession() as s:
            async with s.get("http://127.0.0.1:8080/api/v1/users?id=7") as r:
                assert r.status == 401
            async with s.get("http://127.0.0.1:8080/api/v1/users?id=7",
                             headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200
                body = await r.json()
                assert (body["path"], body["query"]) == ("/users", "id=7")
                assert body["headers"]["X-Failgate-Principal"] == "demo"
            async with s.get("http://127.0.0.1:8080/admin", headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 403
            async with s.get("http://127.0.0.1:8080/jwt/me", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200 and "Failgate-Degraded" not in r.headers  # verified, with a fresh key set
                assert (await r.json())["headers"]["X-Failgate-Principal"] == "demo-user"
            async with s.get("http://127.0.0.1:8080/jwt/me", headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 401  # an API key is not a JWT
            statuses = []
            for _ in range(6):
                async with s.get("http://127.0.0.1:8080/public/x") as r:
                    statuses.append(r.status)
            assert statuses == [200] * 5 + [429]
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        out += rest or ""
    assert proc.returncode == 0
    assert "Failgate demo is running." in out and "A demo API key" in out


def test_run_workers_override_is_checked_like_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "mem.yaml"
    cfg.write_text("version: 1\nupstreams: {api: {url: 'http://127.0.0.1:9'}}\n"
                   "routes: [{name: all, match: {path: /, prefix: true}, upstream: api}]\n")
    r = failgate("run", "-c", str(cfg), "--workers", "2")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"error: {cfg}: workers: memory:// keeps state inside one process and needs 1 worker "
                                f"(--workers 2 given)")
    r = failgate("run", "-c", str(cfg), "--workers", "0")
    assert (r.returncode, r.stderr.strip()) == (1, "error: --workers must be 1 or more")


async def test_a_second_instance_on_a_taken_port_refuses_to_start(tmp_path: Path, redis_server: RedisServer) -> None:
    """Workers listen with SO_REUSEPORT: without a check, a second `failgate run` on the same port would start
    and silently take half the traffic."""
    from tests.helpers import ProxyProcess, Upstream, config_text

    up = Upstream()
    await up.start()
    cfg = tmp_path / "f.yaml"
    cfg.write_text(config_text(up.url, "- {name: all, match: {path: /, prefix: true}, upstream: api}\n",
                               extra=f"workers: 2\nstore: {{url: '{redis_server.url}'}}\n"))
    first = ProxyProcess(cfg).start()
    try:
        await first.wait_ready(workers=2)
        second = subprocess.run([sys.executable, "-m", "proxy", "run", "-c", str(cfg)], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert f"cannot listen (listen) on 127.0.0.1:{first.port}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.stop()
        await up.stop()

"""`python -m benchmarks suite [--quick]`: what Failgate costs, measured in one run against direct and a bare
reference proxy, with the store healthy and failing. Starts its own upstream, redis-server and Failgate on
loopback; reports requests/s, p50/p99, the ratio to direct, and CPU microseconds per request of every server
process (from /proc — steadier than requests/s when everything shares the same cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import peers
from .load import Options, Result, competing_warning, run_load
from .ports import free_port as _port

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
STORE_TIMEOUT_MS = 50
RELAYED = "failgate via fault proxy"  # the Failgate whose store calls pass the fault proxy: the store-failing rows


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def redis_command(port: int, workdir: Path) -> list[str]:
    """A throwaway redis-server on a loopback port: nothing saved, its files in `workdir`."""
    return [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    serving_pid: int | None = None  # the process whose CPU is measured, when not the one started (nginx's worker)

    @property
    def pid(self) -> int:
        return self.serving_pid or self.popen.pid


@dataclass
class Row:
    scenario: str
    target: str
    concurrency: int
    result: dict[str, Any]
    cpu_us: dict[str, float]
    note: str = ""
    ratio: float | None = None


@dataclass
class Bench:
    quick: bool
    workdir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    pin_core: int | None = None  # --pin: the proxies under test run on this core, everything else on the others
    wrk: list[tuple[str, int, float, float]] = field(default_factory=list)  # (scenario, c, generator rps, wrk rps)

    @property
    def duration(self) -> float:
        return 3.0 if self.quick else 10.0

    def spawn(self, name: str, args: list[str], port: int, stdin: bool = False, under_test: bool = False) -> Proc:
        """`under_test`: a proxy being measured — with --pin, on its own core."""
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115
        core = self.pin_core if under_test else None
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                             preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None)
        _wait_port(port)
        proc = Proc(name, p, port)
        self.procs[name] = proc
        return proc

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                p.popen.terminate()
                try:
                    p.popen.wait(10)
                except subprocess.TimeoutExpired:
                    p.popen.kill()

    def measure(self, scenario: str, url: str, *, concurrency: int = 64, servers: tuple[str, ...] = (),
                headers: list[tuple[str, str]] | None = None, note: str = "",
                during: Callable[[], None] | None = None, rotate: list[tuple[str, str]] | None = None) -> Row:
        """`rotate`: one header whose values the requests take in turn (1,000 JWTs, say)."""
        before = {s: _cpu_seconds(self.procs[s].pid) for s in servers}
        opts = Options(url, concurrency=concurrency, duration=self.duration, headers=headers or [],
                       warmup=1.0, progress=False, rotate=rotate or [])
        if during is not None:
            during()
        result = run_load(opts)
        # CPU is read after the whole run (warm-up included): divide by everything served, warm-up included.
        served = result.requests * (1 + opts.warmup / opts.duration)
        cpu = {s: round((_cpu_seconds(self.procs[s].pid) - before[s]) * 1e6 / served, 1) if served else 0.0
               for s in servers}
        row = Row(scenario, url, concurrency, result.summary(), cpu, note)
        self.rows.append(row)
        warning = competing_warning(result)
        lat = row.result["latency_us"]
        print(f"  {scenario:<34} c={concurrency:<3} {row.result['rps']:>9.0f} req/s  p50 {lat['p50'] / 1000:6.2f}ms  "
              f"p99 {lat['p99'] / 1000:6.2f}ms  cpu µs/req {cpu}  statuses {row.result['statuses']}"
              + (f"  degraded {row.result['degraded']}" if row.result["degraded"] else ""), flush=True)
        if warning and not self.quick:
            print("    " + warning)
        self._last = result
        return row


def _failgate_config(path: Path, port: int, admin: int, upstream: int, store_url: str,
                     jwks_file: Path | None = None, three: list[int] | None = None) -> None:
    """`three`: the ports of three upstream servers, for a route whose upstream balances over them."""
    rl = "on_store_error: open"
    jwt_route = f"""  - name: jwt
    match: {{path: /jwt, prefix: true}}
    upstream: api
    auth: {{type: jwt, jwks_file: "{jwks_file}", issuer: bench, audiences: [bench], algorithms: [ES256], \
on_store_error: closed}}
""" if jwks_file is not None else ""
    path.write_text(f"""version: 1
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
store: {{url: "{store_url}", timeout: {STORE_TIMEOUT_MS}ms}}
upstreams:
  api: {{url: "http://127.0.0.1:{upstream}"}}
  three: {{targets: [{", ".join(f'"http://127.0.0.1:{p}"' for p in three or [upstream])}]}}
routes:
  - {{name: pass, match: {{path: /pass, prefix: true}}, upstream: api}}
  - {{name: pass3, match: {{path: /pass3, prefix: true}}, upstream: three}}
  - name: rl-fixed
    match: {{path: /rl/fixed, prefix: true}}
    upstream: api
    rate_limit: {{limit: 1000000000, per: 1m, algorithm: fixed_window, key: client_ip, {rl}}}
  - name: rl-sliding
    match: {{path: /rl/sliding, prefix: true}}
    upstream: api
    rate_limit: {{limit: 1000000000, per: 1m, algorithm: sliding_window, key: client_ip, {rl}}}
  - name: rl-gcra
    match: {{path: /rl/gcra, prefix: true}}
    upstream: api
    rate_limit: {{limit: 1000000000, per: 1m, algorithm: gcra, key: client_ip, {rl}}}
  - name: rl-two
    match: {{path: /rl/two, prefix: true}}
    upstream: api
    rate_limit:
      - {{name: burst, limit: 1000000000, per: 1s, algorithm: sliding_window, key: client_ip, {rl}}}
      - {{name: daily, limit: 1000000000, per: 1d, algorithm: fixed_window, key: client_ip, {rl}}}
  - name: auth
    match: {{path: /auth, prefix: true}}
    upstream: api
    auth: {{type: api_key, scheme: Bearer, on_store_error: closed}}
  - name: auth-cached
    match: {{path: /auth-cached, prefix: true}}
    upstream: api
    auth: {{type: api_key, scheme: Bearer, cache_for: 60s, on_store_error: closed}}
  - name: authz-every
    match: {{path: /authz-every, prefix: true}}
    upstream: api
    auth: {{type: http, url: "http://127.0.0.1:{upstream}/check", timeout: 100ms, on_store_error: closed}}
  - name: authz-cached
    match: {{path: /authz-cached, prefix: true}}
    upstream: api
    auth: {{type: http, url: "http://127.0.0.1:{upstream}/check", timeout: 100ms, cache_for: 5s, \
on_store_error: closed}}
  - name: auth-rl
    match: {{path: /auth-rl, prefix: true}}
    upstream: api
    auth: {{type: api_key, scheme: Bearer, on_store_error: closed}}
    rate_limit: {{limit: 1000000000, per: 1m, key: client_ip, {rl}}}
  - name: gate-stale
    match: {{path: /gate-stale, prefix: true}}
    upstream: api
    auth: {{type: api_key, scheme: Bearer, on_store_error: stale, stale_for: 5m, stale_fallback: closed}}
    rate_limit: {{limit: 1000000000, per: 1m, key: client_ip, on_store_error: open}}
  - name: open
    match: {{path: /open, prefix: true}}
    upstream: api
    rate_limit: {{limit: 1000000000, per: 1m, key: route, on_store_error: open}}
  - name: closed
    match: {{path: /closed, prefix: true}}
    upstream: api
    rate_limit: {{limit: 1000000000, per: 1m, key: route, on_store_error: closed}}
""" + jwt_route)


def _failgates(workdir: Path, upstream: int, redis_port: int, fault_port: int) -> dict[str, tuple[Path, int]]:
    """The two Failgates' configs and ports: the same routes, but one talks to redis-server directly, as the
    nginx + Lua limiter does — every healthy row, the peer table's among them — and the other through the fault
    proxy, for the rows where the store fails. (A relay in the path costs a checked request a few µs: it answers
    later, so fewer requests share each write and each read.)"""
    made = {}
    for name, store_port in (("failgate", redis_port), (RELAYED, fault_port)):
        cfg = workdir / f"{name.replace(' ', '-')}.yaml"
        _failgate_config(cfg, port := _port(), _port(), upstream, f"redis://127.0.0.1:{store_port}/0",
                         jwks_file=workdir / "jwks.json")
        made[name] = (cfg, port)
    return made


def _jwt_tokens(jwks_path: Path, n: int) -> list[tuple[str, str]]:
    """A key set on disk and `n` distinct valid ES256 tokens for it (as Authorization headers)."""
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(jwt.get_algorithm_by_name("ES256").to_jwk(key.public_key()))
    jwks_path.write_text(json.dumps({"keys": [{**public, "kid": "bench", "use": "sig", "alg": "ES256"}]}))
    exp = int(time.time()) + 3600
    return [("Authorization", "Bearer " + jwt.encode({"iss": "bench", "aud": "bench", "sub": f"user-{i}",
                                                       "exp": exp}, key, algorithm="ES256",
                                                      headers={"kid": "bench"})) for i in range(n)]


def stop_processes(procs: list[subprocess.Popen[bytes]], work: Path) -> None:
    """End what a benchmark started (politely, then not) and remove its work directory."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(work, ignore_errors=True)


def _seed_key(redis_url: str) -> str:
    from proxy.config import load_text
    from proxy.keys import add

    loaded = load_text(f"version: 1\nstore: {{url: '{redis_url}'}}\nupstreams: {{a: {{url: 'http://x'}}}}\n"
                       "routes: [{name: a, match: {path: /}, upstream: a}]\n", "bench")
    key, _ = add(loaded, "bench", [], None)
    return key


def run_suite(quick: bool, out: str, only: list[str] | None = None, pin: bool = False,
              rounds: int = 1) -> int:
    """`rounds`: the rows of the peer table measured that many times in turn; the table shows their medians."""
    workdir = Path(tempfile.mkdtemp(prefix="failgate-bench-"))
    bench = Bench(quick, workdir)
    py = sys.executable
    print(f"Failgate benchmark suite ({'quick' if quick else 'full'}), Failgate {build()}, work dir {workdir}")
    if pin:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            print("  --pin: one core only; nothing pinned")
        else:  # the proxy under test alone on the first core; the generator, upstream and Redis on the rest
            bench.pin_core = cores[0]
            os.sched_setaffinity(0, set(cores[1:]))
            print(f"  --pin: proxies under test on core {cores[0]}, everything else on {cores[1:]}")
    try:
        up = bench.spawn("upstream", [py, "-m", f"{__package__}.upstream", str(p := _port())], p)
        redis_port = _port()
        redis_args = redis_command(redis_port, workdir)
        bench.spawn("redis", redis_args, redis_port)
        fault_port = _port()
        fault = bench.spawn("faultproxy", [py, "-m", f"{__package__}.faultproxy", str(fault_port), str(redis_port)],
                            fault_port, stdin=True)
        ref = bench.spawn("reference", [py, "-m", f"{__package__}.refproxy", str(p := _port()),
                                        f"http://127.0.0.1:{up.port}"], p, under_test=True)
        tokens = _jwt_tokens(workdir / "jwks.json", 1000)
        for name, (cfg, port) in _failgates(workdir, up.port, redis_port, fault_port).items():
            bench.spawn(name, [py, "-m", "proxy", "run", "-c", str(cfg)], port, under_test=True)
        nginx = peers.nginx()
        if nginx is not None:
            ng = bench.spawn("nginx", peers.nginx_command(workdir, p := _port(), up.port, redis_port), p,
                             under_test=True)
            ng.serving_pid = peers.worker_of(ng.popen.pid)
        base = f"http://127.0.0.1:{bench.procs['failgate'].port}"
        relayed = f"http://127.0.0.1:{bench.procs[RELAYED].port}"

        def want(name: str) -> bool:
            return only is None or any(name.startswith(o) for o in only)

        print("healthy store:")
        if want("direct"):
            for c in (64, 8, 1):
                bench.measure("direct", f"http://127.0.0.1:{up.port}/", concurrency=c, servers=("upstream",))
        if want("reference"):
            bench.measure("reference proxy (aiohttp)", f"http://127.0.0.1:{ref.port}/", servers=("reference",))
        if want("nginx"):
            if nginx is None:
                print("  nginx: skipped (install Debian's nginx and libnginx-mod-http-lua to compare)")
            else:
                ng_base = f"http://127.0.0.1:{bench.procs['nginx'].port}"
                bench.measure("nginx proxy_pass", ng_base + "/pass", servers=("nginx",))
                bench.measure("nginx + Lua + Redis limiter", ng_base + "/rl", servers=("nginx", "redis"))
        if want("passthrough"):
            for c in (64, 8, 1):
                bench.measure("failgate passthrough", base + "/pass", concurrency=c, servers=("failgate",))
        key = _seed_key(f"redis://127.0.0.1:{redis_port}/0")
        bearer = [("Authorization", f"Bearer {key}")]
        if want("auth"):
            bench.measure("failgate auth", base + "/auth", servers=("failgate", "redis"), headers=bearer)
            for c in (64, 8, 1):
                bench.measure("failgate auth + rate_limit", base + "/auth-rl", concurrency=c,
                              servers=("failgate", "redis"), headers=bearer)
            # auth answered from memory: an API key from cache_for, an authorizer's verdict from cache_for (the
            # upstream's /check allows), 1,000 JWTs in rotation from the verified-token memory
            bench.measure("failgate auth from cache_for", base + "/auth-cached", servers=("failgate",), headers=bearer)
            bench.measure("failgate http authorizer, cache_for", base + "/authz-cached", servers=("failgate",),
                          headers=bearer)
            # and asked on every request (the bench upstream is the authorizer too: its CPU is not counted here)
            bench.measure("failgate http authorizer, every request", base + "/authz-every", servers=("failgate",),
                          headers=bearer)
            run_load(Options(base + "/jwt", concurrency=8, duration=2.0, warmup=0.0, progress=False, rotate=tokens))
            bench.measure("failgate jwt, 1,000 tokens", base + "/jwt", servers=("failgate",), rotate=tokens)
        if want("rate_limit"):
            for algo in ("fixed", "sliding", "gcra"):
                bench.measure(f"failgate rate_limit {algo}", base + f"/rl/{algo}", servers=("failgate", "redis"))
            for c in (8, 1):
                bench.measure("failgate rate_limit sliding", base + "/rl/sliding", concurrency=c,
                              servers=("failgate", "redis"))

        # (scenario, url, servers, headers, a header rotated through)
        peers_again: list[tuple[str, str, tuple[str, ...], list[tuple[str, str]] | None,
                                list[tuple[str, str]] | None]] = []
        if want("reference"):
            peers_again.append(("reference proxy (aiohttp)", f"http://127.0.0.1:{ref.port}/", ("reference",), None,
                                None))
        if want("nginx") and nginx is not None:
            ng_base = f"http://127.0.0.1:{bench.procs['nginx'].port}"
            peers_again += [("nginx proxy_pass", ng_base + "/pass", ("nginx",), None, None),
                            ("nginx + Lua + Redis limiter", ng_base + "/rl", ("nginx", "redis"), None, None)]
        if want("passthrough"):
            peers_again.append(("failgate passthrough", base + "/pass", ("failgate",), None, None))
        if want("rate_limit"):
            peers_again.append(("failgate rate_limit sliding", base + "/rl/sliding", ("failgate", "redis"), None,
                                None))
        if want("auth"):
            peers_again += [("failgate auth", base + "/auth", ("failgate", "redis"), bearer, None),
                            ("failgate auth + rate_limit", base + "/auth-rl", ("failgate", "redis"), bearer, None),
                            # auth from memory: its goal compares these three with each other
                            ("failgate auth from cache_for", base + "/auth-cached", ("failgate",), bearer, None),
                            ("failgate http authorizer, cache_for", base + "/authz-cached", ("failgate",), bearer,
                             None),
                            ("failgate jwt, 1,000 tokens", base + "/jwt", ("failgate",), None, tokens)]
        for n in range(2, rounds + 1):
            # every other round backwards: a row is not always measured right after the same one (on shared
            # cores what ran just before — Redis busy or not — moves the next row's figure)
            print(f"the peer table's rows, round {n} of {rounds}{' (in reverse order)' if n % 2 == 0 else ''}:")
            for scenario, url, servers, headers, rotate in (peers_again[::-1] if n % 2 == 0 else peers_again):
                bench.measure(scenario, url, servers=servers, headers=headers, rotate=rotate, note=f"round {n}")

        def switch(mode: str) -> Callable[[], None]:
            def apply() -> None:
                assert fault.popen.stdin is not None
                fault.popen.stdin.write(mode.encode() + b"\n")
                fault.popen.stdin.flush()
            return apply

        if want("outage"):
            print(f"store failing (store.timeout {STORE_TIMEOUT_MS}ms):")

            def store(condition: str) -> None:
                """Healthy, hung (the fault proxy swallows everything) or killed (redis-server SIGKILLed, saved
                first so that its restart brings back the API key, the counters and the epoch marker)."""
                if bench.procs["redis"].popen.poll() is not None:  # killed before: back from its save
                    bench.spawn("redis", redis_args, redis_port)
                if condition == "killed":
                    switch("pass")()
                    _redis_save(redis_port)
                    redis = bench.procs["redis"]
                    redis.popen.kill()
                    redis.popen.wait()
                    return
                switch("pass" if condition == "healthy" else "blackhole")()

            # the outage goal's rows: each route healthy, hung and killed, measured in turn each round like the
            # peer table's rows, so that each outage is compared with its own round's healthy figure
            for n in range(1, rounds + 1):
                conditions = list(_OUTAGE)
                for condition in (conditions[::-1] if n % 2 == 0 else conditions):
                    store(condition)
                    for _, scenario, path, servers, keyed in _OUTAGE_ROUTES:
                        if condition == "healthy":  # the breaker closed again: a real check decides
                            _until_checked(relayed + path, headers=bearer if keyed else None)
                        bench.measure(scenario.format(_OUTAGE[condition]), relayed + path,
                                      servers=servers if condition == "healthy" else (RELAYED,),
                                      headers=bearer if keyed else None, note=f"round {n}")
            store("healthy")
            for label, mode in (("hung (blackhole)", "blackhole"), ("slow (+80ms)", "delay 0.08"),
                                ("refusing (reset)", "reset")):
                for route in ("open", "closed") if mode != "blackhole" else ("closed",):
                    bench.measure(f"store {label}: {route} route", relayed + f"/{route}", servers=(RELAYED,),
                                  during=switch(mode))
                switch("pass")()
            store("killed")
            bench.measure("store killed: closed route", relayed + "/closed", servers=(RELAYED,))
            store("healthy")

        if want("wrk"):
            cross_check(bench)
        timeline = None
        if want("timeline"):
            timeline = _timeline(bench, relayed, switch)
        _ratios(bench.rows)
        table = peer_table(bench.rows)
        if table:
            print("\n".join(["against peers (CPU µs per request of the serving process, 64 connections):", *table]))
        if outage := outage_table(bench.rows):
            print("\n".join(["store outage (64 connections):", *outage]))
        paths = _write(bench, Path(out), timeline)
        print("results: " + ", ".join(str(p) for p in paths))
        return 0
    finally:
        bench.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)  # (logs worth keeping are in the results)


def _timeline(bench: Bench, base: str, switch: Callable[[str], Callable[[], None]]) -> dict[str, Any]:
    """Steady open-loop load; the store hung for a while in the middle, then resumed."""
    total, hang_at, hang_for = (16, 4, 8) if bench.quick else (30, 10, 10)
    rate = 1500.0
    print(f"outage timeline: {rate:.0f} req/s open loop for {total}s on the open route, store hung at {hang_at}s "
          f"for {hang_for}s")
    import threading

    switched: list[float] = []

    def outage() -> None:
        time.sleep(1.5 + hang_at)  # the generator's start-up and warm-up, roughly; lined up exactly below
        switch("blackhole")()
        switched.append(time.time())
        time.sleep(hang_for)
        switch("pass")()
        switched.append(time.time())

    t = threading.Thread(target=outage, daemon=True)
    t.start()
    result: Result = run_load(Options(base + "/open", concurrency=128, duration=total, rate=rate, warmup=1.0,
                                      progress=False))
    t.join()
    s = result.summary()
    # where the outage really fell on the measured timeline
    fell_at = round(switched[0] - result.started_wall, 1)
    fell_for = round(switched[1] - switched[0], 1)
    print("  second  req/s  p99(ms)  degraded")
    for sec in s["timeline"]:
        print(f"  {sec['second']:>6} {sec['n']:>6} {sec['p99_us'] / 1000:>8.2f} {sec['degraded']:>9}")
    return {"rate": rate, "hang_at": fell_at, "hang_for": fell_for, "summary": s}


def cross_check(bench: Bench) -> None:
    """wrk (a client nobody here wrote) on the healthy 64-connection rows that need no headers: its req/s beside
    the generator's, so a flaw in the generator cannot hide."""
    if shutil.which("wrk") is None:
        print("  wrk cross-check: skipped (wrk is not installed)")
        return
    print("wrk cross-check (64 connections):")
    for row in [r for r in bench.rows if r.concurrency == 64 and not r.note and not r.result["degraded"]
                and "auth" not in r.scenario and "jwt" not in r.scenario
                and not r.scenario.startswith("store ")]:  # (wrk sends no credential)
        rps = peers.wrk_rps(row.target, 64, bench.duration)
        if rps is not None:
            bench.wrk.append((row.scenario, 64, row.result["rps"], rps))
            print(f"  {row.scenario:<34} generator {row.result['rps']:>9.0f} req/s   wrk {rps:>9.0f} req/s")


# The outage goal's rows, measured in turn each round: each condition of the store (and how a scenario's name says
# it), then each route (its label in the outage table, scenario, path, servers measured when healthy, with the API
# key)
_OUTAGE = {"healthy": "healthy", "hung": "store hung (blackhole)", "killed": "store killed"}
_OUTAGE_ROUTES = (("auth stale + rate_limit open", "{}: auth stale + rate_limit open", "/gate-stale",
                   (RELAYED, "redis"), True),
                  ("rate_limit open", "{}: open route", "/open", (RELAYED, "redis"), False))


def _redis_save(port: int) -> None:
    """SAVE: write the data set to the work directory, where a restarted redis-server finds it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"SAVE\r\n")
        reply = s.recv(64)
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"redis SAVE failed: {reply!r}")


def _until_checked(url: str, headers: list[tuple[str, str]] | None, timeout: float = 30.0) -> None:
    """Wait until a request to `url` is decided by real checks again (no degraded tag): the store answers and the
    breaker has closed."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(urllib.request.Request(url, headers=dict(headers or [])), timeout=2) as resp:
            if resp.headers.get("Failgate-Degraded") is None:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url}: still decided without the store after {timeout:.0f}s")


def _share(own: list[Row], healthy: list[Row]) -> str:
    """`own`'s throughput as a share of healthy: paired by round when there is a healthy row for each, else against
    the healthy median."""
    if not own:
        return ""
    if len(own) == len(healthy):
        each = [o.result["rps"] / h.result["rps"] for o, h in zip(own, healthy, strict=True)]
    else:
        each = [o.result["rps"] / statistics.median(h.result["rps"] for h in healthy) for o in own]
    shown = f" [{' '.join(f'{v:.2f}' for v in each)}]" if len(each) > 1 else ""
    return f"{statistics.median(o.result['rps'] for o in own):.0f} ({statistics.median(each):.2f}x{shown})"


def outage_table(rows: list[Row]) -> list[str]:
    """The outage goal from the rows: a route's throughput with the store hung and killed as a share of its
    healthy throughput, and the p99s. Each outage row is paired with the healthy row of its round (the median of
    the rounds' ratios); a row measured a different number of times, against the healthy median."""
    def measured(scenario: str) -> list[Row]:
        return [r for r in rows if r.scenario == scenario and r.concurrency == 64]

    def p99(own: list[Row]) -> str:
        return f"{statistics.median(r.result['latency_us']['p99'] for r in own) / 1000:.2f}" if own else ""

    lines = ["| route | healthy req/s | store hung | store killed | p99 ms healthy / hung / killed |",
             "|---|---|---|---|---|"]
    for label, scenario, *_ in _OUTAGE_ROUTES:
        healthy, hung, killed = (measured(scenario.format(_OUTAGE[c])) for c in ("healthy", "hung", "killed"))
        if healthy:
            rps = statistics.median(r.result["rps"] for r in healthy)
            lines.append(f"| {label} | {rps:.0f} | {_share(hung, healthy)} | {_share(killed, healthy)} | "
                         f"{p99(healthy)} / {p99(hung)} / {p99(killed)} |")
    if len(lines) == 2:
        return []
    return [*lines, "", f"Goal: throughput at least 0.90x healthy, p99 at most healthy p99 + store.timeout "
            f"({STORE_TIMEOUT_MS} ms). Each outage row is paired with the healthy row of its round (the median of "
            "the rounds' ratios, in brackets); the p99s are medians of the rounds."]


def _ratios(rows: list[Row]) -> None:
    direct = {r.concurrency: r.result["rps"] for r in rows if r.scenario == "direct"}
    for r in rows:
        if direct.get(r.concurrency):
            r.ratio = round(r.result["rps"] / direct[r.concurrency], 3)


# The peer table: (label, scenario, serving process). Failgate's goals are ratios within one run.
_PEERS = (("nginx proxy_pass", "nginx proxy_pass", "nginx"),
          ("nginx + Lua + Redis limiter", "nginx + Lua + Redis limiter", "nginx"),
          ("reference aiohttp proxy", "reference proxy (aiohttp)", "reference"),
          ("Failgate passthrough", "failgate passthrough", "failgate"),
          ("Failgate rate limit (sliding window)", "failgate rate_limit sliding", "failgate"),
          ("Failgate auth", "failgate auth", "failgate"),
          ("Failgate auth + rate limit", "failgate auth + rate_limit", "failgate"),
          ("Failgate API key from cache_for", "failgate auth from cache_for", "failgate"),
          ("Failgate authorizer from cache_for", "failgate http authorizer, cache_for", "failgate"),
          ("Failgate jwt, 1,000 tokens", "failgate jwt, 1,000 tokens", "failgate"))


def peer_table(rows: list[Row]) -> list[str]:
    """Each peer's CPU per request next to Failgate's, and the goals as ratios (markdown lines; [] when the run
    had no passthrough row). With --rounds, each row shows the median of its rounds, and each comparison is paired:
    the median of the per-round differences (or ratios) of two rows measured in the same round, so a machine whose
    speed drifts between rounds moves both sides of a comparison together."""
    per_round: dict[str, list[float]] = {}
    cpu: dict[str, tuple[float, float | None]] = {}
    rounds = 1
    for label, scenario, server in _PEERS:
        measured = [r for r in rows if r.scenario == scenario and r.concurrency == 64 and server in r.cpu_us]
        if measured:
            rounds = max(rounds, len(measured))
            per_round[label] = [r.cpu_us[server] for r in measured]  # in the order measured: one per round
            in_redis = [r.cpu_us["redis"] for r in measured if "redis" in r.cpu_us]
            cpu[label] = (statistics.median(per_round[label]), statistics.median(in_redis) if in_redis else None)
    if "Failgate passthrough" not in cpu:
        return []

    def paired(label: str, base: str, ratio: bool = False) -> tuple[float, str] | None:
        """The median of `label`'s per-round difference from `base` (or ratio to it), and the rounds' figures."""
        if base not in per_round:
            return None
        pairs = list(zip(per_round[label], per_round[base], strict=False))
        each = [own / other if ratio else own - other for own, other in pairs if other]
        if not each:
            return None
        shown = " ".join(f"{v:.2f}x" if ratio else f"{v:+.1f}" for v in each)
        return statistics.median(each), f" [{shown}]" if len(each) > 1 else ""

    def note(label: str) -> str:
        if label == "Failgate passthrough" and (vs := paired(label, "reference aiohttp proxy", ratio=True)):
            return f"{vs[0]:.2f}x the reference proxy{vs[1]} (goal: at most 1x)"
        over = paired(label, "Failgate passthrough")
        if label == "Failgate rate limit (sliding window)" and over:
            text = f"{over[0]:+.1f} over passthrough{over[1]} (goal: +10)"
            limiter = paired(label, "nginx + Lua + Redis limiter", ratio=True)
            return text + (f"; {limiter[0]:.1f}x the nginx limiter{limiter[1]} (anchor: 3x)" if limiter else "")
        if label == "Failgate auth + rate limit" and over:
            return f"{over[0]:+.1f} over passthrough{over[1]} (goal: +15)"
        if label == "Failgate auth" and over:
            return f"{over[0]:+.1f} over passthrough{over[1]}"
        if label in ("Failgate authorizer from cache_for", "Failgate jwt, 1,000 tokens") and \
                (vs := paired(label, "Failgate API key from cache_for", ratio=True)):
            return f"{vs[0]:.2f}x the API key from cache_for{vs[1]} (goal: at most 1.10x)"
        return ""

    lines = ["| | CPU µs/req | |", "|---|---|---|"]
    for label, (own, redis) in cpu.items():
        lines.append(f"| {label} | {own:.1f}{f' (+{redis:.1f})' if redis is not None else ''} | {note(label)} |")
    if rounds > 1:
        lines += ["", f"Each figure is the median of {rounds} rounds, measured in turn (every row of a round before "
                  "the next round; every other round in reverse order). Each comparison is the median of its rounds' "
                  "differences (or ratios), shown in brackets: two rows of one round, measured minutes apart at "
                  "most, against each other."]
    return lines


def _machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {model}, Linux {platform.release()}, Python {platform.python_version()}"


def build() -> str:
    """Which build of Failgate the suite measures: the one this process imports is the one it starts."""
    import proxy.app

    return "compiled (mypyc)" if str(proxy.app.__file__).endswith(".so") else "plain Python"


def _write(bench: Bench, out: Path, timeline: dict[str, Any] | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M%S")
    machine = _machine()
    lines = [f"# Failgate benchmark suite — {stamp}", "",
             f"Machine: {machine}. Failgate build: {build()}. Everything (generator, servers, Redis) shares these "
             "cores; compare CPU µs per "
             "request and ratios from one run. Duration per row: "
             f"{bench.duration:.0f}s after 1s warm-up. store.timeout {STORE_TIMEOUT_MS}ms. Two Failgates with the "
             f"same routes: `failgate` talks to redis-server directly (every healthy row), `{RELAYED}` through the "
             "fault proxy (the rows where the store fails, and their healthy rows).", "",
             "| scenario | c | req/s | ratio to direct | p50 ms | p99 ms | CPU µs/req | statuses | degraded |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in bench.rows:
        lat = r.result["latency_us"]
        cpu = ", ".join(f"{k} {v}" for k, v in r.cpu_us.items())
        lines.append(f"| {r.scenario} | {r.concurrency} | {r.result['rps']:.0f} | "
                     f"{r.ratio if r.ratio is not None else ''} | {lat['p50'] / 1000:.2f} | {lat['p99'] / 1000:.2f} | "
                     f"{cpu} | {r.result['statuses']} | {r.result['degraded'] or ''} |")
    table = peer_table(bench.rows)
    if table:
        lines += ["", "## Against peers", "", "CPU µs per request of the serving process (Redis's in parentheses), "
                  "64 connections, from the rows above.", "", *table]
    outage = outage_table(bench.rows)
    if outage:
        lines += ["", "## Store outage", "", *outage]
    if bench.wrk:
        lines += ["", "## Cross-check with wrk", "", "| scenario | c | generator req/s | wrk req/s |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {c} | {ours:.0f} | {theirs:.0f} |" for name, c, ours, theirs in bench.wrk]
    png = None
    if timeline is not None:
        lines += ["", "## Outage timeline", "",
                  f"{timeline['rate']:.0f} req/s offered (open loop) on an `open` route; the store hung (blackholed) "
                  f"at {timeline['hang_at']}s for {timeline['hang_for']}s.", "",
                  "| second | responses | p99 ms | degraded |", "|---|---|---|---|"]
        for sec in timeline["summary"]["timeline"]:
            lines.append(f"| {sec['second']} | {sec['n']} | {sec['p99_us'] / 1000:.2f} | {sec['degraded']} |")
        png = _plot(timeline, out / f"timeline-{stamp}.png")
        if png is not None:
            lines += ["", f"![outage timeline]({png.name})"]
    md = out / f"suite-{stamp}.md"
    md.write_text("\n".join(lines) + "\n")
    data = {"stamp": stamp, "machine": machine, "build": build(), "quick": bench.quick, "duration": bench.duration,
            "rows": [r.__dict__ for r in bench.rows], "wrk": bench.wrk, "timeline": timeline}
    js = out / f"suite-{stamp}.json"
    js.write_text(json.dumps(data, indent=1, default=str))
    shutil.copyfile(md, out / "latest.md")
    shutil.copyfile(js, out / "latest.json")
    return [p for p in (md, js, png) if p is not None]


def _plot(timeline: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no PNG; `pip install -e '.[bench]'`)")
        return None
    secs = timeline["summary"]["timeline"]
    x = [s["second"] for s in secs]
    fig, ax = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    ax[0].plot(x, [s["n"] for s in secs])
    ax[0].set_ylabel("responses/s")
    ax[1].plot(x, [s["p99_us"] / 1000 for s in secs], color="tab:red")
    ax[1].set_ylabel("p99 ms")
    ax[2].plot(x, [s["degraded"] / s["n"] * 100 if s["n"] else 0 for s in secs], color="tab:orange")
    ax[2].set_ylabel("degraded %")
    ax[2].set_xlabel("second")
    for a in ax:
        a.axvspan(timeline["hang_at"], timeline["hang_at"] + timeline["hang_for"], color="grey", alpha=0.2)
    fig.suptitle("Failgate during a store outage (grey: store hung)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

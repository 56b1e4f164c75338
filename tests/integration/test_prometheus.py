"""The shipped alert rules and dashboard: promtool's own checks and unit tests, and a real Prometheus scraping a
real Failgate through a rehearsed outage."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from benchmarks.ports import free_port
from tests.helpers import ROOT, ProxyProcess, Upstream, config_text, raw_request, until

RULES = ROOT / "deploy" / "prometheus" / "failgate-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "failgate.json"
ALERTS = {"FailgateFailingOpen", "FailgateDegradedRatioHigh", "FailgateBreakerOpen", "FailgateStoreLatencyHigh",
          "FailgateStoreDataLost", "FailgateJwksStale", "FailgateConfigReloadRejected",
          "FailgateRunningFromLastGood", "FailgateEventLoopLag"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed (tests/run installs Debian's prometheus package)"
    return subprocess.run([binary, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=60)


def test_the_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "failgate-rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == ALERTS
    unit = (RULES.parent / "failgate-rules.test.yml").read_text()
    assert all(f"alertname: {name}" in unit for name in ALERTS)  # every alert has a unit test


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def test_the_dashboard_has_the_rows_it_promises() -> None:
    doc = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in doc["panels"] if p["type"] == "row"]
    assert rows == ["Traffic", "Decisions", "Dependencies", "JWT key sets", "Process", "Config"]
    assert len(dashboard_queries()) >= 20


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(jwt.get_algorithm_by_name("ES256").to_jwk(key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**public, "kid": "k", "use": "sig", "alg": "ES256"}]}))
    return path


class Prometheus:
    def __init__(self, workdir: Path, scrape: str, rules: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "failgate", "static_configs": [{"targets": [scrape]}]}],
        }))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (tests/run installs Debian's prometheus package)"
        self.log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([binary, f"--config.file={self.config}",
                                      f"--storage.tsdb.path={self.workdir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        return self

    async def get(self, path: str, **params: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.url + path, params=params) as r:
            return await r.json()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


@pytest.fixture
def rules_for_the_test(tmp_path: Path) -> Path:
    """The shipped rules, with FailgateFailingOpen's `for:` shortened so the test waits seconds, not minutes."""
    doc = yaml.safe_load(RULES.read_text())
    for rule in doc["groups"][0]["rules"]:
        if rule["alert"] == "FailgateFailingOpen":
            rule["for"] = "2s"
            rule["expr"] = rule["expr"].replace("[1m]", "[10s]")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
async def test_a_real_prometheus_sees_failgate_fail_open_and_every_dashboard_query_is_valid(
        tmp_path: Path, upstream: Upstream, jwks_file: Path, rules_for_the_test: Path) -> None:
    routes = f"""\
- name: search
  match: {{path: /search, prefix: true}}
  upstream: api
  rate_limit: {{limit: 1000000, per: 1m, on_store_error: open}}
- name: me
  match: {{path: /me, prefix: true}}
  upstream: api
  auth: {{type: jwt, jwks_file: "{jwks_file}", algorithms: [ES256], issuer: t, audiences: [t], on_store_error: closed}}
"""
    cfg = tmp_path / "failgate.yaml"
    cfg.write_text(config_text(upstream.url, routes).replace("admin: {host: 127.0.0.1, ",
                                                            "admin: {chaos: true, host: 127.0.0.1, "))
    p = ProxyProcess(cfg).start()
    prom = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{p.admin_port}", rules_for_the_test)
    try:
        await p.wait_ready()
        prom.start()
        await until("Prometheus is up", lambda: _ready(prom), timeout=60)
        await until("Failgate is scraped", lambda: _scraped(prom), timeout=60)
        assert (await raw_request(p.port, "/search")).status == 200
        async with aiohttp.ClientSession() as s, s.post(p.admin + "/chaos/store",
                                                        json={"fault": "refuse", "for": "60s"}) as r:
            assert r.status == 200, await r.text()

        async def firing() -> bool:
            for _ in range(20):  # traffic while the store is "down": every answer an open allow
                r = await raw_request(p.port, "/search")
                assert (r.status, r.headers.get("failgate-degraded", "")[:24]) == (200, "rate_limit;mode=open;rea")
            alerts = (await prom.get("/api/v1/alerts"))["data"]["alerts"]
            return any(a["labels"]["alertname"] == "FailgateFailingOpen" and a["state"] == "firing"
                       and a["labels"].get("route") == "search" for a in alerts)

        await until("FailgateFailingOpen fires in Prometheus", firing, timeout=90)

        exported = await _exported_names(p)
        for expr in dashboard_queries():
            query = expr.replace("$__rate_interval", "1m")
            answer = await prom.get("/api/v1/query", query=query)
            assert answer["status"] == "success", (query, answer)
            names = set(re.findall(r"\b(failgate_[a-z_]+)", expr))
            for name in names:
                assert re.sub(r"_(bucket|sum|count)$", "", name) in exported, (name, expr)
    finally:
        prom.stop()
        p.stop()


async def _ready(prom: Prometheus) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(prom.url + "/-/ready") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def _scraped(prom: Prometheus) -> bool:
    targets = (await prom.get("/api/v1/targets"))["data"]["activeTargets"]
    return bool(targets) and targets[0]["health"] == "up"


async def _exported_names(p: ProxyProcess) -> set[str]:
    """Every metric family Failgate's /metrics declares (# TYPE), as the names queries use."""
    async with aiohttp.ClientSession() as s, s.get(p.admin + "/metrics") as r:
        text = await r.text()
    names = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = m[1], m[2]
        names.add(name)
        if kind == "counter" and not name.endswith("_total"):
            names.add(name + "_total")
    await asyncio.sleep(0)
    return names

"""Ready to deploy: example configs validate, the image's install and start commands work, the README's
configuration reference covers the whole schema."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import typing
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from proxy.config.schema import Config
from tests.helpers import ROOT, free_port, until

EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_validates(path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "proxy", "check", str(path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "OK (sha256" in r.stdout


def test_there_are_examples_for_each_fail_mode() -> None:
    text = "".join(p.read_text() for p in EXAMPLES)
    for mode in ("open", "closed", "stale"):
        assert f"on_store_error: {mode}" in text


def _leaves(t: typing.Any, parent: str) -> list[tuple[str, str]]:
    """(parent path, key) for every key of the schema."""
    out = []
    hints = typing.get_type_hints(t, include_extras=True)
    for name, key in zip(t.__struct_fields__, t.__struct_encode_fields__, strict=True):  # (key: as YAML spells it)
        structs = [m for m in _members(hints[name]) if isinstance(m, type) and issubclass(m, msgspec.Struct)]
        if not structs:
            out.append((parent, key))
        for member in structs:
            out += _leaves(member, f"{parent}.{key}".strip("."))
    return out


def _members(t: typing.Any) -> list[typing.Any]:
    args = typing.get_args(t)
    origin = typing.get_origin(t)
    if origin in (typing.Union, __import__("types").UnionType) or origin is typing.Annotated:
        return [m for a in args for m in _members(a)]
    if origin in (list, dict):
        return _members(args[-1])
    return [t]


def test_the_readme_reference_covers_every_config_key() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Reference", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) > 30
    missing = []
    for parent, key in _leaves(Config, ""):
        if parent.startswith("defaults"):
            continue  # defaults.* takes the check keys, described once under the check
        tail = parent.split(".")[-1] if parent else ""
        found = any(re.search(rf"[`.]{re.escape(key)}[`,]", row.split("|")[1])
                    and (not tail or tail in row or "<check>" in row) for row in rows)
        if not found:
            missing.append(f"{parent}.{key}".strip("."))
    assert missing == []


def test_the_dockerfile_is_what_the_brief_asks_for() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"^USER failgate$", text, re.M) and "useradd --system" in text
    assert re.search(r"^EXPOSE 8080 9901$", text, re.M)
    health = re.search(r"^  CMD (\[.*\])$", text, re.M)
    assert health is not None and json.loads(health.group(1)) == ["failgate", "health", "-c",
                                                                  "/etc/failgate/failgate.yaml"]
    assert re.search(r'^VOLUME \["/var/lib/failgate"\]$', text, re.M)
    assert "-e UPSTREAM_URL=" in text  # the image's own example names every variable its config needs
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    assert entry == ["failgate"]  # exec form: signals reach Failgate
    assert "COPY config/docker.yaml /etc/failgate/failgate.yaml" in text


def fresh_env() -> dict[str, str]:
    """The environment of a fresh install: nothing of the one running the tests (tests/compiled puts its build on
    PYTHONPATH, where pip would find Failgate already installed)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}


async def test_the_image_install_and_start_commands_run(tmp_path: Path) -> None:
    """No Docker engine here: run the image's steps directly — build the wheel, install it into a fresh
    environment, start it with the image's command and config, and run the HEALTHCHECK command."""
    clean = fresh_env()
    if os.environ.get("FAILGATE_EXPECT_COMPILED") == "1":
        wheels = ROOT / "build" / "wheel"  # the compiled wheel tests/compiled built, as the image builds it
    else:
        wheels = tmp_path / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", str(wheels),
                        str(ROOT)], check=True, timeout=300, env=clean)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=clean)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *map(str, wheels.glob("*.whl"))], check=True,
                   timeout=600, env=clean)
    compiled = list(venv.glob("lib/python*/site-packages/proxy/app.*.so"))
    assert bool(compiled) == (os.environ.get("FAILGATE_EXPECT_COMPILED") == "1")
    port, admin = free_port(), free_port()
    cfg = tmp_path / "failgate.yaml"
    cfg.write_text((ROOT / "config" / "docker.yaml").read_text()
                   .replace("port: 8080", f"port: {port}").replace("port: 9901", f"port: {admin}"))
    env = {**clean, "FAILGATE_ADMIN_TOKEN": "s3cret", "REDIS_URL": "redis://127.0.0.1:6399/0",
           "UPSTREAM_URL": "http://127.0.0.1:1"}
    cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M).group(1)  # type: ignore[union-attr]
    args = [a.replace("/etc/failgate/failgate.yaml", str(cfg)).replace("/var/lib/failgate", str(tmp_path))
            for a in json.loads(cmd)]
    proc = subprocess.Popen([str(venv / "bin" / "failgate"), *args], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as s:
            status = None
            for _ in range(150):  # workers: auto — ready once a worker is
                try:
                    async with s.get(f"http://127.0.0.1:{admin}/readyz") as r:
                        status = r.status
                        if status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            assert status == 200
            async with s.post(f"http://127.0.0.1:{admin}/reload", json={}) as r:
                assert r.status == 401  # admin on 0.0.0.0: the token is required
        health = [str(venv / "bin" / "failgate"), "health", "-c", str(cfg)]  # the HEALTHCHECK, at this config
        assert subprocess.run(health, env=env, timeout=30, capture_output=True).returncode == 0
        assert (tmp_path / "last-good.yaml").exists()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    stopped = subprocess.run(health, env=env, timeout=30, capture_output=True, text=True)
    assert stopped.returncode == 1 and "not ready" in stopped.stderr


@pytest.mark.slow
async def test_the_wheel_works_outside_the_checkout(tmp_path: Path, upstream: Any) -> None:
    """Build the wheel, install it in a fresh environment, and use it from a directory that is not the checkout:
    the version, a starter config, its strict check, the bundled load generator, and the demo."""
    wheels = tmp_path / "wheels"
    clean = fresh_env()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", str(wheels), str(ROOT)],
                   check=True, timeout=300, env=clean)
    [wheel] = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "proxy/resources/examples/failgate.yaml" in names and "failgate_bench/load.py" in names
    assert not any(n.startswith(("benchmarks/", "tests/")) for n in names)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=clean)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, timeout=600, env=clean)
    home = tmp_path / "elsewhere"
    home.mkdir()
    fg = str(venv / "bin" / "failgate")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([fg, *args], cwd=home, capture_output=True, text=True, timeout=120, env=clean)

    assert run("--version").stdout.strip() == "failgate 0.1.0"
    made = run("init")
    assert made.returncode == 0 and "failgate check failgate.yaml" in made.stdout
    assert (home / "failgate.yaml").read_text() == (ROOT / "config" / "failgate.yaml").read_text()
    assert run("init").returncode == 1  # never overwrites
    checked = run("check", "--strict", "failgate.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    load = await asyncio.to_thread(run, "bench", "load", upstream.url + "/x", "-c", "4", "-d", "1", "-w", "0",
                                   "--json")
    assert load.returncode == 0, load.stderr
    summary = json.loads(load.stdout)
    assert summary["requests"] > 0 and summary["statuses"] == {"200": summary["requests"]}
    assert sorted(p.name for p in home.iterdir()) == ["failgate.yaml"]  # nothing else written here
    demo = subprocess.Popen([fg, "demo"], cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean)
    try:
        async with aiohttp.ClientSession() as s:
            async def ready() -> bool:
                try:
                    async with s.get("http://127.0.0.1:9901/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await until("the demo is ready", ready, timeout=60)
            async with s.get("http://127.0.0.1:8080/public/x") as r:
                assert r.status == 200
    finally:
        demo.terminate()
        assert demo.wait(30) == 0


@pytest.mark.slow
def test_the_suite_compares_with_nginx_and_writes_only_where_told(tmp_path: Path) -> None:
    from benchmarks import peers

    done = subprocess.run([sys.executable, "-m", "proxy", "bench", "suite", "--quick", "--only",
                           "direct,reference,nginx,wrk", "--out", "results"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # nothing else written here
    report = (tmp_path / "results" / "latest.md").read_text()
    if peers.nginx() is not None:  # (tests/run installs nginx and its Lua module)
        assert "| nginx proxy_pass | 64 |" in report and "| nginx + Lua + Redis limiter | 64 |" in report
        data = json.loads((tmp_path / "results" / "latest.json").read_text())
        limiter = next(r for r in data["rows"] if r["scenario"] == "nginx + Lua + Redis limiter")
        assert limiter["result"]["statuses"] == {"200": limiter["result"]["requests"]}
        assert limiter["cpu_us"]["redis"] > 0  # it did count in Redis
    else:
        assert "nginx: skipped" in done.stdout
    if shutil.which("wrk") is not None:
        assert "## Cross-check with wrk" in report
    assert "work dir" in done.stdout
    workdir = re.search(r"work dir (\S+)", done.stdout).group(1)  # type: ignore[union-attr]
    assert not Path(workdir).exists()  # the suite removed its temporary directory

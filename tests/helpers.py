"""Real parts for tests: an upstream HTTP server on loopback, the proxy in-process or as a process, a raw client."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from benchmarks.ports import free_port
from proxy.config import load_text
from proxy.server import Serving

ROOT = Path(__file__).resolve().parent.parent


# --- upstream -------------------------------------------------------------------------------------------------

@dataclass
class Upstream:
    """A real aiohttp server that records what reached it."""

    port: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.peers.append(peer[:2])
        if path == "/upload":
            digest, n = hashlib.sha256(), 0
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                n += len(chunk)
            return web.json_response({"bytes": n, "sha256": digest.hexdigest()})
        body = await request.read()
        self.seen.append({"method": request.method, "raw_path": request.raw_path,
                          "headers": list(request.headers.items()), "body": body})
        if path.startswith("/status/"):
            return web.Response(status=int(path.rsplit("/", 1)[1]), text="custom")
        if path == "/sleep":
            await asyncio.sleep(float(request.query["s"]))
            return web.Response(text="slept")
        if path == "/download":
            size = int(request.query["bytes"])
            resp = web.StreamResponse()
            resp.content_length = size
            await resp.prepare(request)
            chunk = b"x" * (1 << 16)
            sent = 0
            try:
                while sent < size:
                    part = chunk[: min(len(chunk), size - sent)]
                    await resp.write(part)
                    sent += len(part)
                await resp.write_eof()
            except ConnectionError:
                pass  # the proxy dropped us: expected in disconnect tests
            return resp
        if path == "/stall":
            size = int(request.query.get("bytes", "100"))
            resp = web.StreamResponse()
            resp.content_length = size
            await resp.prepare(request)
            await resp.write(b"y" * 10)
            await asyncio.sleep(float(request.query["s"]))
            with contextlib.suppress(ConnectionError):
                await resp.write(b"y" * (size - 10))
            return resp
        if path == "/hop":
            return web.Response(text="hop", headers={
                "Connection": "X-Private", "X-Private": "secret", "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic", "Trailer": "X-T", "X-Public": "ok",
                "Set-Cookie": "session=abc"})
        return web.json_response({"method": request.method, "raw_path": request.raw_path,
                                  "headers": list(request.headers.items()), "body_bytes": len(body)})


# --- proxy ----------------------------------------------------------------------------------------------------

def config_text(upstream_url: str, routes: str, *, port: int | None = None, admin_port: int | None = None,
                extra: str = "", upstream_extra: str = "") -> str:
    port = port or free_port()
    admin_port = admin_port or free_port()
    return (
        "version: 1\n"
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin_port}}}\n"
        + textwrap.dedent(extra)
        + "upstreams:\n"
        f"  api:\n    url: {upstream_url}\n"
        + textwrap.indent(textwrap.dedent(upstream_extra), "    ")
        + "routes:\n"
        + textwrap.indent(textwrap.dedent(routes), "  ")
    )


class InProcessProxy:
    """The real proxy listener, served in the test's own event loop."""

    def __init__(self, text: str, source: str = "test.yaml", log_stream: Any = None) -> None:
        self.loaded = load_text(text, source)
        self.serving = Serving(self.loaded, reuse_port=False, log_stream=log_stream)
        self.port = self.loaded.config.listen.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> InProcessProxy:
        await self.serving.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.serving.stop()


class ProxyProcess:
    """`python -m proxy run -c FILE` as a real process."""

    def __init__(self, config_path: Path, *args: str, port: int | None = None, admin_port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.args = args
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        if port is None or admin_port is None:
            from proxy.config import load_file

            cfg = load_file(str(config_path)).config
            port, admin_port = cfg.listen.port, cfg.admin.port
        self.port, self.admin_port = port, admin_port
        self.log_path = config_path.with_suffix(".log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> ProxyProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(self.config_path), *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True,
        )
        return self

    async def wait_ready(self, timeout: float = 20.0, workers: int | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"proxy exited {self.proc.returncode}: {self.log()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(self.admin + "/readyz") as r:
                        body = await r.json()
                        if r.status == 200 and (workers is None or body["workers"]["ready"] == workers):
                            return body  # type: ignore[no-any-return]
                await asyncio.sleep(0.1)
        raise AssertionError(f"proxy not ready in {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def readyz(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.admin + "/readyz") as r:
            return await r.json()  # type: ignore[no-any-return]

    async def metric_above(self, name: str, labels: str, value: float) -> bool:
        return await self.metric(name, labels) > value

    async def metric(self, name: str, labels: str = "") -> float:
        """The sum of a metric's samples whose labels contain `labels` (e.g. 'source="publish"')."""
        async with aiohttp.ClientSession() as s, s.get(self.admin + "/metrics") as r:
            text = await r.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and labels in line)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# --- a raw HTTP/1.1 client, for request targets no URL library would send -----------------------------------

@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(port: int, target: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                      body: bytes = b"") -> RawResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("connection closed before a response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        data = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        data = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            data += await reader.readexactly(size)
            await reader.readline()
    else:
        data = await reader.read()
    return RawResponse(status, headers, data)


async def drain_body(it: AsyncIterator[bytes]) -> int:
    n = 0
    async for chunk in it:
        n += len(chunk)
    return n


# --- an upstream that records requests exactly as they arrived on the wire ------------------------------------

@dataclass
class RawUpstream:
    """A bare asyncio server: keeps every request head as the bytes that reached it (no HTTP library between
    them and the test to normalize anything) and answers 200 `ok` without a Content-Type (chunked for GET
    /chunked)."""

    port: int = 0
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # each request's body as it arrived (chunked: de-chunked)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        self.port = free_port()
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def header(self, name: str, index: int = -1) -> list[str]:
        """Every value of one header in a recorded request, as sent (latin-1)."""
        lines = self.heads[index].decode("latin-1").split("\r\n")[1:]
        return [v.strip() for k, _, v in (line.partition(":") for line in lines if line)
                if k.lower() == name.lower()]

    def names(self, index: int = -1) -> list[str]:
        lines = self.heads[index].decode("latin-1").split("\r\n")[1:]
        return [line.partition(":")[0] for line in lines if line]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                text = head.decode("latin-1").lower()
                body = b""
                if "transfer-encoding: chunked" in text:
                    while (size := int((await reader.readline()).strip() or b"0", 16)) != 0:
                        body += (await reader.readexactly(size + 2))[:-2]
                    await reader.readline()
                elif "content-length:" in text:
                    length = int(text.split("content-length:", 1)[1].split("\r\n", 1)[0])
                    body = await reader.readexactly(length)
                self.bodies.append(body)
                if head.startswith(b"GET /chunked "):  # a streamed answer (no length), and like the other no type
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# --- waiting for a state ----------------------------------------------------------------------------------------

async def until(what: str, predicate: Any, timeout: float = 15.0) -> None:
    """Poll `predicate()` (awaited when it is a coroutine) every 50 ms until it is true; fail naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc (no `ps`: a fresh machine may not have procps)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # pid (comm) state ppid …; comm may hold spaces and parentheses: split after the last ")"
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found

"""An upstream target as its own process, so a test can SIGKILL it and start it again on the same port.

    python -m tests.target_server PORT NAME [--delay SECONDS] [--status CODE]

Every answer names the target (`X-Target: NAME` and the body); `--delay` makes every answer that slow; `--status`
makes every answer that status (a target that fails). It counts what it received: `GET /_seen` answers
`{"GET": n, "POST": n, …}` (never counted itself).
"""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time

from aiohttp import web

from benchmarks.ports import free_port


def main() -> None:
    port, name = int(sys.argv[1]), sys.argv[2]
    args = sys.argv[3:]
    delay = float(args[args.index("--delay") + 1]) if "--delay" in args else 0.0
    status = int(args[args.index("--status") + 1]) if "--status" in args else 200
    seen: collections.Counter[str] = collections.Counter()

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/_seen":
            return web.json_response(seen)
        body = await request.read()
        seen[request.method] += 1
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status, text=f"{name} {len(body)}", headers={"X-Target": name})

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handle_signals=True)


class TargetProcess:
    """A target server process on a fixed loopback port (it keeps its port across a restart)."""

    def __init__(self, name: str, *, delay: float = 0.0, status: int = 200, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.args = [*(["--delay", str(delay)] if delay else []), *(["--status", str(status)] if status != 200 else [])]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TargetProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.target_server", str(self.port), self.name,
                                      *self.args])
        return self

    async def wait_up(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                assert self.proc is not None and self.proc.poll() is None, f"target {self.name} exited"
                assert time.monotonic() < deadline, f"target {self.name} did not start"
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def seen(self) -> dict[str, int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"GET /_seen HTTP/1.0\r\n\r\n")
        data = await reader.read()
        writer.close()
        return json.loads(data.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()

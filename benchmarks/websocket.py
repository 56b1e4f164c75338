"""WebSocket messages through Failgate against the same echo upstream directly, in one run:
`python -m benchmarks.websocket [--connections 8] [--seconds 5] [--size 128]`

Starts an aiohttp WebSocket echo server and Failgate (one process, a route without checks and one with a rate
limit on the handshake) as separate processes. Each of N client connections sends a message and waits for its
echo, over and over. Reported per target: round trips per second, and CPU µs per message of the echo server and
of Failgate (from /proc; every message crosses Failgate twice, once each way)."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web

from .ports import free_port
from .suite import ROOT, _cpu_seconds, _wait_port


def serve_echo(port: int) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 24)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def _drive(url: str, connections: int, seconds: float, size: int) -> int:
    payload = b"m" * size
    stop = time.monotonic() + seconds
    counts = [0] * connections

    async def one(i: int, s: aiohttp.ClientSession) -> None:
        async with s.ws_connect(url, max_msg_size=1 << 24) as ws:
            while time.monotonic() < stop:
                await ws.send_bytes(payload)
                await ws.receive_bytes()
                counts[i] += 1

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(one(i, s) for i in range(connections)))
    return sum(counts)


def _measure(url: str, pids: dict[str, int], args: argparse.Namespace) -> tuple[int, dict[str, float]]:
    uvloop.run(_drive(url, args.connections, 1.0, args.size))  # warm-up
    before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    n = uvloop.run(_drive(url, args.connections, args.seconds, args.size))
    return n, {name: (_cpu_seconds(pid) - before[name]) / max(n, 1) * 1e6 for name, pid in pids.items()}


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.websocket", description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=128, help="message bytes (default 128)")
    ap.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo:
        serve_echo(args.echo)
        return 0
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="failgate-ws-") as work:
        try:
            up, fg, admin = free_port(), free_port(), free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", f"{__package__}.websocket", "--echo", str(up)],
                                          cwd=ROOT))
            cfg = Path(work) / "failgate.yaml"
            cfg.write_text(f"""version: 1
listen: {{host: 127.0.0.1, port: {fg}}}
admin: {{host: 127.0.0.1, port: {admin}}}
upstreams: {{echo: {{url: "http://127.0.0.1:{up}"}}}}
routes:
  - {{name: ws, match: {{path: /ws, prefix: true}}, upstream: echo}}
  - name: ws-limited
    match: {{path: /limited, prefix: true}}
    upstream: echo
    rate_limit: {{limit: 1000000, per: 1m, on_store_error: open}}
""")
            procs.append(subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(cfg)], cwd=ROOT,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_port(up)
            _wait_port(fg)
            echo_pid, fg_pid = procs[0].pid, procs[1].pid
            print(f"WebSocket round trips, {args.connections} connections, {args.size}-byte messages, "
                  f"{args.seconds:g}s each")
            rows = [("direct to the echo upstream", f"http://127.0.0.1:{up}/ws", {"echo": echo_pid}),
                    ("through failgate", f"http://127.0.0.1:{fg}/ws", {"echo": echo_pid, "failgate": fg_pid}),
                    ("through failgate, limited route", f"http://127.0.0.1:{fg}/limited",
                     {"echo": echo_pid, "failgate": fg_pid})]
            direct = 0
            for name, url, pids in rows:
                n, cpu = _measure(url, pids, args)
                direct = direct or n
                per = "  ".join(f"{k} {v:6.1f} µs/msg" for k, v in cpu.items())
                print(f"  {name:<32} {n / args.seconds:9.0f} msg/s ({n / direct:.2f}x direct)  {per}")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())

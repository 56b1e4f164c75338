"""`python -m benchmarks load URL`: an HTTP/1.1 keep-alive load generator that is not the bottleneck.

Each process runs uvloop with raw `asyncio.Protocol` connections and parses responses itself (Content-Length
and chunked), costing a few microseconds per request where an aiohttp client costs ~55 (BASELINES.md).

- closed loop (`--concurrency N`): N connections, each sends its next request when the last one is answered;
- open loop (`--rate R`): requests are due at fixed times; latency is measured from the time a request was
  *due*, not from when a connection was free to send it, so a stall shows up in the percentiles instead of
  silently lowering the offered load (coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .histogram import Histogram


@dataclass
class Options:
    url: str
    concurrency: int = 64
    duration: float = 10.0
    rate: float | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    rotate: list[tuple[str, str]] = field(default_factory=list)  # one more header, taking these values in turn
    method: str = "GET"
    body: bytes = b""
    procs: int = 1
    warmup: float = 0.0
    progress: bool = True


@dataclass
class Result:
    requests: int = 0
    duration: float = 0.0
    hist: Histogram = field(default_factory=Histogram)
    statuses: Counter[int] = field(default_factory=Counter)
    degraded: Counter[str] = field(default_factory=Counter)  # by mode (a response may carry several)
    errors: Counter[str] = field(default_factory=Counter)
    cpu: float = 0.0  # the generator's own CPU seconds
    started_wall: float = 0.0  # time.time() when measuring began (for lining up events)
    timeline: list[dict[str, Any]] = field(default_factory=list)  # per second: n, degraded, p99_us, statuses

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration else 0.0

    def merge(self, other: Result) -> None:
        self.requests += other.requests
        self.duration = max(self.duration, other.duration)
        self.hist.merge(other.hist)
        self.statuses.update(other.statuses)
        self.degraded.update(other.degraded)
        self.errors.update(other.errors)
        self.cpu += other.cpu
        self.started_wall = min(self.started_wall or other.started_wall, other.started_wall or self.started_wall)
        for i, sec in enumerate(other.timeline):
            if i >= len(self.timeline):
                self.timeline.append({"n": 0, "degraded": 0, "hist": Histogram(), "statuses": Counter()})
            mine = self.timeline[i]
            mine["n"] += sec["n"]
            mine["degraded"] += sec["degraded"]
            mine["hist"].merge(sec["hist"])
            mine["statuses"].update(sec["statuses"])

    def summary(self) -> dict[str, Any]:
        h = self.hist
        return {
            "requests": self.requests, "duration_s": round(self.duration, 3), "rps": round(self.rps, 1),
            "latency_us": {"p50": h.percentile(50), "p90": h.percentile(90), "p99": h.percentile(99),
                           "p99.9": h.percentile(99.9), "max": h.max,
                           "mean": round(h.total / h.count) if h.count else 0},
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "degraded": dict(self.degraded), "errors": dict(self.errors),
            "generator_cpu_s": round(self.cpu, 3), "started_wall": self.started_wall,
            "generator_cpu_us_per_request": round(self.cpu * 1e6 / self.requests, 1) if self.requests else None,
            "timeline": [{"second": i, "n": s["n"], "degraded": s["degraded"], "p99_us": s["hist"].percentile(99),
                          "statuses": {str(k): v for k, v in s["statuses"].items()}}
                         for i, s in enumerate(self.timeline)],
        }


# --- one process ----------------------------------------------------------------------------------------------

class _Conn(asyncio.Protocol):
    __slots__ = ("buf", "gen", "intended", "transport")

    def __init__(self, gen: _Generator) -> None:
        self.gen = gen
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.intended = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gen.ready(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.gen.lost(self, exc)

    def send(self, intended: float) -> None:
        self.intended = intended
        assert self.transport is not None
        gen = self.gen
        if gen.requests:
            gen.sent += 1
            self.transport.write(gen.requests[gen.sent % len(gen.requests)])
        else:
            self.transport.write(gen.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            cl = head.find(b"\r\ncontent-length:")
            body_start = end + 4
            if cl >= 0:
                eol = head.find(b"\r\n", cl + 2)
                total = body_start + int(head[cl + 17: eol if eol >= 0 else len(head)])
            elif b"transfer-encoding: chunked" in head:
                total = _chunked_end(buf, body_start)
                if total < 0:
                    break
            else:
                total = body_start  # no body (204/304) — a close-delimited body is not supported
            if len(buf) < total:
                break
            status = int(head[9:12])
            degraded = None
            d = head.find(b"\r\nfailgate-degraded:")
            if d >= 0:
                eol = head.find(b"\r\n", d + 2)
                degraded = head[d + 20: eol if eol >= 0 else len(head)]
            buf = buf[total:]
            self.gen.done(self, status, degraded)
        self.buf = buf


def _chunked_end(buf: bytes, pos: int) -> int:
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return -1
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)
            return -1 if end < 0 else end + 4
        pos = eol + 2 + size + 2
        if pos > len(buf):
            return -1


class _Generator:
    def __init__(self, opts: Options, connections: int, rate: float | None) -> None:
        u = urlsplit(opts.url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        head = f"{opts.method} {target} HTTP/1.1\r\nHost: {u.netloc}\r\n"
        for k, v in opts.headers:
            head += f"{k}: {v}\r\n"
        if opts.body or opts.method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(opts.body)}\r\n"
        self.request = head.encode("latin-1") + b"\r\n" + opts.body
        # With `rotate`, every request carries the next value of one more header (1,000 tokens, say): built once.
        self.requests = [(head + f"{k}: {v}\r\n").encode("latin-1") + b"\r\n" + opts.body for k, v in opts.rotate]
        self.sent = 0
        self.opts = opts
        self.connections = connections
        self.rate = rate
        self.idle: list[_Conn] = []
        self.conns: set[_Conn] = set()
        self.backlog: list[float] = []
        self.result = Result()
        self.start = 0.0
        self.measure_from = 0.0
        self.stop_at = 0.0
        self.stopping = False
        self.loop = asyncio.get_running_loop()

    def _second(self, now: float) -> dict[str, Any]:
        i = int(now - self.measure_from)
        tl = self.result.timeline
        while len(tl) <= i:
            tl.append({"n": 0, "degraded": 0, "hist": Histogram(), "statuses": Counter()})
        return tl[i]

    def ready(self, conn: _Conn) -> None:
        self.conns.add(conn)
        self._next(conn)

    def _next(self, conn: _Conn) -> None:
        if self.stopping or conn.transport is None:
            return
        now = time.perf_counter()
        if self.rate is None:
            conn.send(now)
        elif self.backlog:
            conn.send(self.backlog.pop(0))
        else:
            self.idle.append(conn)

    def done(self, conn: _Conn, status: int, degraded: bytes | None) -> None:
        now = time.perf_counter()
        if self.measure_from <= now < self.stop_at:
            us = int((now - conn.intended) * 1e6)
            r = self.result
            r.requests += 1
            r.hist.record(us)
            r.statuses[status] += 1
            sec = self._second(now)
            sec["n"] += 1
            sec["hist"].record(us)
            sec["statuses"][status] += 1
            if degraded is not None:
                sec["degraded"] += 1
                for item in degraded.split(b","):
                    for param in item.split(b";"):
                        if param.strip().startswith(b"mode="):
                            r.degraded[param.strip()[5:].decode()] += 1
        if now >= self.stop_at:
            self.stopping = True
        self._next(conn)

    def lost(self, conn: _Conn, exc: Exception | None) -> None:
        self.conns.discard(conn)
        if self.stopping:
            return
        self.result.errors["connection lost" if exc is None else type(exc).__name__] += 1
        if conn in self.idle:
            self.idle.remove(conn)
        self.loop.call_later(0.01, lambda: self.loop.create_task(self._open()))

    async def _open(self) -> None:
        if self.stopping:
            return
        try:
            await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError as exc:
            self.result.errors[type(exc).__name__] += 1
            await asyncio.sleep(0.05)
            self.loop.create_task(self._open())

    async def run(self) -> Result:
        self.start = time.perf_counter()
        self.measure_from = self.start + self.opts.warmup
        self.result.started_wall = time.time() + self.opts.warmup
        self.stop_at = self.measure_from + self.opts.duration
        cpu_at_start: list[float] = []
        self.loop.call_later(self.opts.warmup, lambda: cpu_at_start.append(_cpu()))
        for _ in range(self.connections):
            await self._open()
        if self.rate is not None:
            await self._schedule()
        while time.perf_counter() < self.stop_at:
            await asyncio.sleep(0.05)
        self.stopping = True
        self.result.duration = self.opts.duration
        self.result.cpu = _cpu() - (cpu_at_start[0] if cpu_at_start else 0.0)
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)
        return self.result

    async def _schedule(self) -> None:
        assert self.rate is not None
        interval = 1.0 / self.rate
        due = self.start
        while due < self.stop_at:
            now = time.perf_counter()
            while due <= now:
                if self.idle:
                    self.idle.pop().send(due)
                else:
                    self.backlog.append(due)
                due += interval
            await asyncio.sleep(min(max(due - time.perf_counter(), 0), 0.005))


def _cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _child(opts: Options, connections: int, rate: float | None, out: Any) -> None:
    import uvloop

    async def main() -> Result:
        return await _Generator(opts, connections, rate).run()

    result = uvloop.run(main())
    out.send(_encode(result))
    out.close()


def _encode(r: Result) -> str:
    return json.dumps({
        "requests": r.requests, "duration": r.duration, "hist": r.hist.to_json(), "statuses": r.statuses,
        "degraded": r.degraded, "errors": r.errors, "cpu": r.cpu, "started_wall": r.started_wall,
        "timeline": [{"n": s["n"], "degraded": s["degraded"], "hist": s["hist"].to_json(), "statuses": s["statuses"]}
                     for s in r.timeline],
    })


def _decode(text: str) -> Result:
    d = json.loads(text)
    return Result(
        requests=d["requests"], duration=d["duration"], hist=Histogram.from_json(d["hist"]),
        statuses=Counter({int(k): v for k, v in d["statuses"].items()}), degraded=Counter(d["degraded"]),
        errors=Counter(d["errors"]), cpu=d["cpu"], started_wall=d["started_wall"],
        timeline=[{"n": s["n"], "degraded": s["degraded"], "hist": Histogram.from_json(s["hist"]),
                   "statuses": Counter({int(k): v for k, v in s["statuses"].items()})} for s in d["timeline"]],
    )


def run_load(opts: Options) -> Result:
    """Run the load in `opts.procs` processes and merge their results."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: never a fork of a running event loop
    procs = []
    total = Result()
    per = [opts.concurrency // opts.procs + (1 if i < opts.concurrency % opts.procs else 0) for i in range(opts.procs)]
    for conns in per:
        if conns == 0:
            continue
        parent, child = ctx.Pipe(duplex=False)
        rate = opts.rate * conns / opts.concurrency if opts.rate else None
        p = ctx.Process(target=_child, args=(opts, conns, rate, child), daemon=True)
        p.start()
        child.close()
        procs.append((p, parent))
    if opts.progress:
        _progress(opts)
    for p, conn in procs:
        total.merge(_decode(conn.recv()))
        p.join()
    return total


def _progress(opts: Options) -> None:
    start = time.monotonic()
    end = start + opts.warmup + opts.duration
    while (now := time.monotonic()) < end:
        phase = "warm-up" if now - start < opts.warmup else "measuring"
        sys.stderr.write(f"\r{phase}: {now - start:5.1f}s / {opts.warmup + opts.duration:.0f}s")
        sys.stderr.flush()
        time.sleep(min(1.0, end - now))
    sys.stderr.write("\r" + " " * 40 + "\r")


def competing_warning(result: Result) -> str | None:
    cores = os.cpu_count() or 1
    share = result.cpu / (result.duration * cores) if result.duration else 0
    if share > 0.2:
        return (f"warning: the generator itself used {share:.0%} of this machine's {cores} cores; it competes "
                "with the target for CPU (run it on another machine, or compare CPU per request instead of req/s)")
    return None


def format_report(result: Result) -> str:
    s = result.summary()
    lat = s["latency_us"]
    lines = [
        f"requests  {s['requests']} in {s['duration_s']}s = {s['rps']} req/s",
        "latency   " + "  ".join(f"{k} {v / 1000:.2f}ms" for k, v in lat.items() if k != "mean"),
        "statuses  " + "  ".join(f"{k}: {v}" for k, v in s["statuses"].items()),
    ]
    if s["degraded"]:
        lines.append("degraded  " + "  ".join(f"{k}: {v}" for k, v in s["degraded"].items()))
    if s["errors"]:
        lines.append("errors    " + "  ".join(f"{k}: {v}" for k, v in s["errors"].items()))
    lines.append(f"generator {s['generator_cpu_s']}s CPU, {s['generator_cpu_us_per_request']} µs per request")
    warning = competing_warning(result)
    if warning:
        lines.append(warning)
    return "\n".join(lines)

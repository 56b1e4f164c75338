"""The decision log (SPEC §9) and the optional access log, written off the event loop.

The request path only formats a small dict and puts it on a queue; a thread encodes and writes the lines. Bursts
are summarized: at most `per_route_per_second` decision lines per route per second, then one line
`{"suppressed": N, ...}` for that route and second. Lines never carry a key, token or password: the principal is
the store's name for the caller, the client is an address.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from typing import IO, Any

import msgspec

_encode = msgspec.json.Encoder().encode
_STOP = object()


class LogWriter:
    """One thread, one queue, one stream: JSON lines, in order."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="failgate-log", daemon=True)
        self._thread.start()

    def put(self, line: dict[str, Any]) -> None:
        self._queue.put(line)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            stream = self._stream or sys.stderr
            try:
                stream.write(_encode(item).decode() + "\n")
                if self._queue.empty():
                    stream.flush()
            except (OSError, ValueError):
                pass  # a closed stream must not kill the proxy

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=5)


class DecisionLog:
    def __init__(self, writer: LogWriter, config_sha256: str, per_route_per_second: int = 50) -> None:
        self.writer = writer
        self.config_sha256 = config_sha256
        self.limit = per_route_per_second
        self._second: dict[str, tuple[int, int]] = {}  # route -> (second, lines written or suppressed so far)

    def record(self, *, request_id: str, route: str, check: str, decision: str, basis: str, reason: str | None,
               status: int, client: str, principal: str | None) -> None:
        now = time.time()
        sec = int(now)
        seen = self._second.get(route)
        if seen is None or seen[0] != sec:
            if seen is not None and seen[1] > self.limit:
                self._suppressed(now, route, seen)
            seen = (sec, 0)
        count = seen[1] + 1
        self._second[route] = (sec, count)
        if count > self.limit:
            return
        self.writer.put({
            "ts": round(now, 3), "request_id": request_id, "route": route, "check": check, "decision": decision,
            "basis": basis, "reason": reason, "status": status, "client": client, "principal": principal,
            "config_sha256": self.config_sha256,
        })

    def flush_suppressed(self) -> None:
        """Write the pending "suppressed" lines (called once a second, and at shutdown)."""
        now = time.time()
        sec = int(now)
        for route, (s, count) in list(self._second.items()):
            if s != sec and count > self.limit:
                self._suppressed(now, route, (s, count))
                self._second[route] = (s, self.limit)

    def _suppressed(self, now: float, route: str, seen: tuple[int, int]) -> None:
        self.writer.put({"ts": round(now, 3), "route": route, "suppressed": seen[1] - self.limit, "second": seen[0],
                         "config_sha256": self.config_sha256})

"""The decision log and the optional access log, written off the event loop.

The request path only formats a small dict and puts it on a queue; a thread encodes and writes the lines. Every
deny and every degraded verdict is accounted for, and none can hide another:
- each route has two budgets a second — denies, and degraded verdicts — of `per_route_per_second` lines each
  (per process: with N workers an instance writes up to N times that), so a flood of 429s never uses up the lines
  that would show a fail-open;
- past a budget, verdicts are counted, and summarized once that second is over: one line per (route, check,
  decision, basis, reason) with the count (`"suppressed": N`);
- the queue is bounded (`max_queue` lines); a line that does not fit is counted in the same summaries;
- `flush(final=True)` — at reload, when a retired config has drained, and at shutdown — writes the summaries of
  the current second too, so lines + summary counts = verdicts across orderly reloads and stops.
Lines never carry a key, token or password: the principal is the store's name for the caller, the client is an
address. The same writer carries events an operator needs: an upstream's 502/504, a dependency's state change.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from time import time
from typing import IO, Any

import msgspec

_encode = msgspec.json.Encoder().encode
_STOP = object()


class LogWriter:
    """One thread, one bounded queue, one stream: JSON lines, in order. Complete lines go out in one write, so
    the lines of several worker processes sharing a stream never interleave inside a line."""

    def __init__(self, stream: IO[str] | None = None, max_queue: int = 20_000) -> None:
        self._stream = stream
        self.max_queue = max_queue
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # (not `_thread`: in the compiled build that attribute's C name would be the C keyword `__thread`)
        self._worker = threading.Thread(target=self._run, name="failgate-log", daemon=True)
        self._worker.start()

    def put(self, line: dict[str, Any]) -> bool:
        """Queue a line; False (not queued) when the queue is full — the caller accounts for it."""
        if self._queue.qsize() >= self.max_queue:
            return False
        self._queue.put(line)
        return True

    def put_always(self, line: dict[str, Any]) -> None:
        """For the few lines that account for others (summaries): never dropped."""
        self._queue.put(line)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = []
            while item is not _STOP:
                batch.append(_encode(item) + b"\n")
                if self._queue.empty() or len(batch) >= 256:
                    break
                item = self._queue.get()
            self._write(b"".join(batch))
            if item is _STOP:
                return

    def _write(self, data: bytes) -> None:
        if not data:
            return
        stream = self._stream or sys.stderr
        try:
            fileno = stream.fileno()
        except (OSError, ValueError, AttributeError):
            fileno = None
        try:
            if fileno is not None:
                stream.flush()
                os.write(fileno, data)
            else:
                stream.write(data.decode())
                stream.flush()
        except (OSError, ValueError):
            pass  # a closed stream must not kill the proxy

    def close(self) -> None:
        self._queue.put(_STOP)
        self._worker.join(timeout=5)


class _Budget:
    """One route's lines of one kind (denies, or degraded verdicts) in the current second, and the verdicts past
    the budget, counted by (check, decision, basis, reason)."""

    def __init__(self, second: int) -> None:
        self.second = second
        self.lines = 0
        self.suppressed: dict[tuple[str, str, str, str | None], int] = {}


class DecisionLog:
    def __init__(self, writer: LogWriter, config_sha256: str, per_route_per_second: int = 50) -> None:
        self.writer = writer
        self.config_sha256 = config_sha256
        self.limit = per_route_per_second
        self._denies: dict[str, _Budget] = {}  # by route
        self._degraded: dict[str, _Budget] = {}
        # the counts of seconds that are over, not yet written: (second, route, kind, counts)
        self._over: list[tuple[int, str, str, dict[tuple[str, str, str, str | None], int]]] = []

    def record(self, *, request_id: str, route: str, check: str, decision: str, basis: str, reason: str | None,
               status: int, client: str, principal: str | None) -> None:
        now = time()
        sec = int(now)
        budgets = self._denies if basis == "checked" else self._degraded
        budget = budgets.get(route)
        if budget is None:
            budget = budgets[route] = _Budget(sec)
        elif budget.second != sec:
            if budget.suppressed:
                self._over.append((budget.second, route, "deny" if basis == "checked" else "degraded",
                                   budget.suppressed))
                budget.suppressed = {}
            budget.second = sec
            budget.lines = 0
        budget.lines += 1
        if budget.lines <= self.limit and self.writer.put({
            "ts": round(now, 3), "request_id": request_id, "route": route, "check": check, "decision": decision,
            "basis": basis, "reason": reason, "status": status, "client": client, "principal": principal,
            "config_sha256": self.config_sha256,
        }):
            return
        group = (check, decision, basis, reason)
        budget.suppressed[group] = budget.suppressed.get(group, 0) + 1

    def event(self, line: dict[str, Any]) -> None:
        """An operator event (an upstream failure, a dependency's state change): one line each, never dropped."""
        self.writer.put_always({"ts": round(time(), 3), **line, "config_sha256": self.config_sha256})

    def flush(self, final: bool = False) -> None:
        """Write the summaries of every second that is over (called once a second) — and, with `final`, of the
        current one too (at reload and shutdown: nothing may stay behind)."""
        now = time()
        sec = int(now)
        over, self._over = self._over, []
        for kind, budgets in (("deny", self._denies), ("degraded", self._degraded)):
            for route, budget in list(budgets.items()):
                if budget.suppressed and (final or budget.second != sec):
                    over.append((budget.second, route, kind, budget.suppressed))
                    budget.suppressed = {}
                if budget.second != sec:
                    del budgets[route]
        for second, route, kind, counts in over:
            for (check, decision, basis, reason), n in counts.items():
                self.writer.put_always({
                    "ts": round(now, 3), "route": route, "second": second, "kind": kind, "check": check,
                    "decision": decision, "basis": basis, "reason": reason, "suppressed": n,
                    "config_sha256": self.config_sha256,
                })

"""Hooks for Failgate's own test suite, enabled by FAILGATE_TEST_HOOKS=1 in the environment and inert otherwise:
nothing here is reachable in a normal run (the admin listener adds no route for them).

`POST /_test/stall {"ms": 200, "at": "queued" | "inflight"}` blocks the serving process's event loop once, for
`ms` milliseconds:
- queued: once the next store calls are queued, before their batch is written (and its deadline armed);
- inflight: in an I/O callback of the loop's very next poll after the next write to the store, so the replies
  arrive while the loop is blocked and the loop's next step is its timers, not reading them (a stall in an
  ordinary callback would be followed by a poll, which reads them first).
It is how the tests make Failgate itself slow while Redis stays healthy, without a CPU hog that would slow Redis
too on a small machine.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

ENABLED = os.environ.get("FAILGATE_TEST_HOOKS") == "1"


def parse_stall(cmd: dict[str, Any]) -> tuple[float, str]:
    """(seconds, at) from a stall command; ValueError when it is not valid."""
    ms, at = cmd.get("ms"), cmd.get("at")
    if not isinstance(ms, int) or not 0 < ms <= 10_000:
        raise ValueError("ms must be a whole number of milliseconds, 1 to 10000")
    if at not in ("queued", "inflight"):
        raise ValueError("at must be queued or inflight")
    return ms / 1000, at


def stall_store_client(client: Any, seconds: float, at: str) -> None:
    """Arm a one-shot stall on a PipelinedClient through its test hooks (each runs once, then is gone)."""
    if at == "queued":
        # on purpose: block the whole event loop, as an expensive burst of requests would
        client.on_flush = lambda: time.sleep(seconds)
    else:
        client.on_send = lambda: _stall_in_next_poll(seconds)  # armed before the write: found before any reply


def _stall_in_next_poll(seconds: float) -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()

    def stall() -> None:
        loop.remove_reader(ours.fileno())
        ours.close()
        theirs.close()
        time.sleep(seconds)

    loop.add_reader(ours.fileno(), stall)
    theirs.send(b"x")

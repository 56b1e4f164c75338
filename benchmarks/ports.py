"""Free loopback ports for servers the tests and benchmarks start themselves."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, never handed out before in this process.

    Below the ephemeral range no outgoing connection can take the port between the moment it is picked and the
    moment a server (or a server restarted on the same port, like Redis in the suite) binds it."""
    low = _ephemeral_low()
    while True:
        port = random.randrange(10000, max(10001, low - 1))
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port

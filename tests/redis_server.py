"""A real redis-server process per test: free loopback port, temp dir, no persistence; kill, pause, restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from tests.helpers import free_port


def raw_command(port: int, args: tuple[str, ...] | list[str], password: str | None = None,
                tls_ca: Path | None = None) -> bytes:
    def pack(parts: tuple[str, ...] | list[str]) -> str:
        return f"*{len(parts)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in parts)

    raw = socket.create_connection(("127.0.0.1", port), timeout=2)
    if tls_ca is not None:
        raw = ssl.create_default_context(cafile=str(tls_ca)).wrap_socket(raw, server_hostname="127.0.0.1")
    with raw as s:
        if password is not None:
            s.sendall(pack(["AUTH", password]).encode())
            assert s.recv(1 << 10).startswith(b"+OK")
        s.sendall(pack(args).encode())
        return s.recv(1 << 16)


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None,
                 password: str | None = None, tls_ca: Path | None = None) -> None:
        self.password = password
        self.tls_ca = tls_ca  # commands over TLS, trusting this CA (a server with --port 0 --tls-port …)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (tests/run installs it)"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"), "--protected-mode", "no",
             *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.command("PING").startswith((b"+PONG", b"-NOAUTH")):  # up (NOAUTH: with requirepass)
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    def command(self, *args: str) -> bytes:
        """One command over a fresh socket (after AUTH when `password` is set); returns the raw reply (for set-up
        and assertions)."""
        return raw_command(self.port, args, self.password, self.tls_ca)

    def calls(self, command: str) -> int:
        """How many times this server ran `command` (INFO commandstats; 0 when never)."""
        for line in self.command("INFO", "commandstats").decode().splitlines():
            if line.startswith(f"cmdstat_{command}:"):
                return int(line.split("calls=", 1)[1].split(",", 1)[0])
        return 0

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.paused:
            self.resume()  # never leave a stopped process behind
        self.kill()

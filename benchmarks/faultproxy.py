"""A small fault-injecting TCP proxy for the store: put it between Failgate and redis-server, switch at run time.

Modes: `pass` (forward), `delay` (hold every chunk `delay` seconds, both ways), `delay_replies` (only the
server's replies), `blackhole` (accept and read, never forward or answer), `reset` (abort every connection, and
new ones at once).
"""

from __future__ import annotations

import asyncio
import contextlib

from .ports import free_port


class FaultProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.mode = "pass"
        self.delay = 0.0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    def set(self, mode: str, delay: float = 0.0) -> None:
        self.mode, self.delay = mode, delay
        if mode == "reset":
            for w in list(self._writers):
                w.transport.abort()

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "reset":
            cwriter.transport.abort()
            return
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cwriter.transport.abort()
            return
        self._writers |= {cwriter, swriter}
        try:
            await asyncio.gather(self._pipe(creader, swriter, False), self._pipe(sreader, cwriter, True))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (cwriter, swriter):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool) -> None:
        while data := await reader.read(65536):
            if self.mode == "blackhole":
                continue
            if self.mode == "reset":
                writer.transport.abort()
                return
            if (self.mode == "delay" or (self.mode == "delay_replies" and replies)) and self.delay:
                await asyncio.sleep(self.delay)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):  # RuntimeError: uvloop's transport is already closed
            writer.write_eof()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self._server.wait_closed()


if __name__ == "__main__":
    # python -m tests.faultproxy LISTEN_PORT TARGET_PORT: a standalone fault proxy (for the benchmark suite),
    # switched by writing lines to its stdin: "pass", "blackhole", "reset", "delay 0.08", "delay_replies 0.08".
    import sys

    import uvloop

    async def main() -> None:
        fp = FaultProxy(int(sys.argv[2]))
        fp.port = int(sys.argv[1])
        await fp.start()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            mode, *rest = line.decode().split()
            fp.set(mode, float(rest[0]) if rest else 0.0)
        await fp.stop()

    uvloop.run(main())

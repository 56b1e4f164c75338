"""The benchmark's upstream: a minimal HTTP/1.1 keep-alive server on a raw asyncio.Protocol (uvloop), answering
every request with a 2-byte body, so that it costs far less than anything measured in front of it.

`python -m benchmarks.upstream PORT`"""

from __future__ import annotations

import asyncio
import sys

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class _Serve(asyncio.Protocol):
    __slots__ = ("buf", "transport")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            cl = head.find(b"\r\ncontent-length:")
            length = 0
            if cl >= 0:
                eol = head.find(b"\r\n", cl + 2)
                length = int(head[cl + 17: eol if eol >= 0 else len(head)])
            elif b"transfer-encoding: chunked" in head:
                term = buf.find(b"\r\n0\r\n\r\n", end)
                if term < 0:
                    break
                length = term + 7 - (end + 4)
            if len(buf) < end + 4 + length:
                break
            buf = buf[end + 4 + length:]
            out.append(_RESPONSE)
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(int(sys.argv[1])))

"""`redis://`, `rediss://`, `unix://`: operations become Lua EVALSHA / GET commands on the pipelined client.

URL parsing and TLS settings come from redis-py (`parse_url`), the wire work from our own pipelined client
(`resp.py`): redis-py has no auto-pipelining, and its per-call overhead is what BASELINES.md measured.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Sequence
from importlib import resources
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

from ..observe.metrics import store_error
from .errors import StoreUnavailable
from .ops import GetOp, Op, RateOp, RateResult
from .resp import Command, Endpoint, PipelinedClient, pack_commands


class Script:
    def __init__(self, name: str) -> None:
        self.name = name
        self.source = resources.files("proxy.store").joinpath(f"scripts/{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


SCRIPTS = {name: Script(name) for name in ("fixed_window", "sliding_window", "gcra")}


def endpoint_from_url(url: str) -> Endpoint:
    kw: dict[str, Any] = dict(parse_url(url))
    context = None
    if kw.get("connection_class") is SSLConnection:
        context = ssl.create_default_context(cafile=kw.get("ssl_ca_certs"))
        if kw.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    return Endpoint(host=kw.get("host"), port=int(kw.get("port") or 6379), path=kw.get("path"),
                    username=kw.get("username"), password=kw.get("password"), db=int(kw.get("db") or 0),
                    ssl=context)


def _rate_command(op: RateOp, *, by_source: bool = False) -> Command:
    script = SCRIPTS[op.algorithm]
    now = "" if op.now is None else op.now
    if by_source:
        return ("EVAL", script.source, 1, op.key, op.limit, op.window, op.burst, now)
    return ("EVALSHA", script.sha, 1, op.key, op.limit, op.window, op.burst, now)


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _rate_parts(op: RateOp) -> tuple[bytes, bytes]:
    """An EVALSHA command as the bytes before and after its key: everything but the key is the same for every
    request of a rate-limit check, so it is packed once."""
    now = b"" if op.now is None else str(op.now).encode()
    head = b"*8\r\n" + _bulk(b"EVALSHA") + _bulk(SCRIPTS[op.algorithm].sha.encode()) + _bulk(b"1")
    tail = b"".join(_bulk(str(v).encode()) for v in (op.limit, op.window, op.burst)) + _bulk(now)
    return head, tail


class RedisStore:
    def __init__(self, url: str, *, timeout: float, connect_timeout: float, pool_size: int) -> None:
        self.client = PipelinedClient(endpoint_from_url(url), timeout=timeout, connect_timeout=connect_timeout,
                                      pool_size=pool_size)
        self._parts: dict[tuple[str, int, int, int], tuple[bytes, bytes]] = {}

    def _pack(self, op: Op) -> bytes:
        key = op.key.encode()
        if type(op) is GetOp:
            return b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(key), key)
        assert type(op) is RateOp
        if op.now is not None:  # tests pin the clock: not worth caching
            head, tail = _rate_parts(op)
        else:
            shape = (op.algorithm, op.limit, op.window, op.burst)
            parts = self._parts.get(shape)
            if parts is None:
                if len(self._parts) > 10_000:  # only configs make shapes; a bound all the same
                    self._parts.clear()
                parts = self._parts[shape] = _rate_parts(op)
            head, tail = parts
        return b"%b$%d\r\n%b\r\n%b" % (head, len(key), key, tail)

    def execute(self, ops: Sequence[Op]) -> asyncio.Future[list[Any]]:
        """Not a coroutine: the returned future resolves with the decoded results, decoded in the client's
        reading callback (one coroutine level less for every request)."""
        payload = self._pack(ops[0]) if len(ops) == 1 else b"".join([self._pack(op) for op in ops])
        return self.client.submit(payload, len(ops), self._finish, ops)

    def _finish(self, future: asyncio.Future[list[Any]], replies: list[Any], ops: Sequence[Op]) -> None:
        if len(replies) == 1 and type(replies[0]) is list:  # the common case: one script's answer
            future.set_result([_result(ops[0], replies[0])])
            return
        for r in replies:
            if type(r) is hiredis.ReplyError and str(r).startswith("NOSCRIPT"):
                store_error("NOSCRIPT")
                # Redis lost its script cache (restart, SCRIPT FLUSH). The script did not run, so sending it
                # again as EVAL (which also caches it) cannot count twice. Same future: the caller still waits.
                again = [i for i, reply in enumerate(replies) if _is_noscript(reply)]
                retry = [_rate_command(ops[i], by_source=True) for i in again]  # type: ignore[arg-type]
                self.client.submit(pack_commands(retry), len(again), self._merge, (ops, replies, again), future)
                return
        future.set_result([_result(op, r) for op, r in zip(ops, replies, strict=True)])

    def _merge(self, future: asyncio.Future[list[Any]], retried: list[Any],
               ctx: tuple[Sequence[Op], list[Any], list[int]]) -> None:
        ops, replies, again = ctx
        replies = list(replies)
        for i, r in zip(again, retried, strict=True):
            replies[i] = r
        future.set_result([_result(op, r) for op, r in zip(ops, replies, strict=True)])

    async def close(self) -> None:
        await self.client.close()


_new_tuple = tuple.__new__


def _result(op: Op, reply: Any) -> Any:
    if type(reply) is hiredis.ReplyError:
        # An error reply: the server answered, but not with a result. Returned in place, for this op only.
        store_error(str(reply))
        return StoreUnavailable("error", str(reply), transport=_server_wide(reply))
    if type(op) is GetOp:
        return reply
    try:
        if type(reply) is not list or len(reply) < 4:
            raise TypeError
        # tuple.__new__ directly: a NamedTuple's own __new__ is a Python function, this is on every request
        return _new_tuple(RateResult, (reply[0] == 1, reply[1], reply[2] / 1e6, reply[3] / 1e6, tuple(reply[4:])))
    except TypeError:
        return StoreUnavailable("error", f"unexpected reply {reply!r}", transport=False)


def _is_noscript(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


_SERVER_WIDE = ("LOADING", "READONLY", "MASTERDOWN", "OOM", "BUSY", "NOAUTH", "WRONGPASS", "CLUSTERDOWN",
                "TRYAGAIN", "MOVED", "ASK", "NOPERM")


def _server_wide(reply: hiredis.ReplyError) -> bool:
    """An error about the server (it is loading, read-only, out of memory…) counts as a transport failure for the
    breaker; one about a single record (WRONGTYPE, a script error on a malformed value) does not."""
    return str(reply).split(" ", 1)[0] in _SERVER_WIDE

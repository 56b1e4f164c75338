"""`redis://`, `rediss://`, `unix://`: operations become Lua EVALSHA / GET commands on the pipelined client.

URL parsing and TLS settings come from redis-py (`parse_url`), the wire work from our own pipelined client
(`resp.py`): redis-py has no auto-pipelining, and its per-call overhead is what BASELINES.md measured.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Sequence
from importlib import resources
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

from .errors import StoreUnavailable
from .ops import GetOp, Op, RateOp, RateResult
from .resp import Command, Endpoint, PipelinedClient


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


class RedisStore:
    def __init__(self, url: str, *, timeout: float, connect_timeout: float, pool_size: int) -> None:
        self.client = PipelinedClient(endpoint_from_url(url), timeout=timeout, connect_timeout=connect_timeout,
                                      pool_size=pool_size)

    async def execute(self, ops: Sequence[Op]) -> list[Any]:
        commands = [_rate_command(op) if type(op) is RateOp else ("GET", op.key) for op in ops]  # type: ignore[union-attr]
        replies = await self.client.submit(commands)
        errors = False
        for r in replies:
            if type(r) is hiredis.ReplyError:
                errors = True
                break
        if errors and any(_is_noscript(r) for r in replies):
            # Redis lost its script cache (restart, SCRIPT FLUSH). The script did not run, so sending it again
            # as EVAL (which also caches it) cannot count twice.
            commands = [_rate_command(op, by_source=True) if isinstance(op, RateOp) and _is_noscript(r) else c
                        for op, r, c in zip(ops, replies, commands, strict=True)]
            retry = [c for c, r in zip(commands, replies, strict=True) if _is_noscript(r)]
            again = iter(await self.client.submit(retry))
            replies = [next(again) if _is_noscript(r) else r for r in replies]
        return [self._result(op, r) for op, r in zip(ops, replies, strict=True)]

    @staticmethod
    def _result(op: Op, reply: Any) -> Any:
        if isinstance(reply, hiredis.ReplyError):
            # An error reply: the server answered, but not with a result. Returned in place, for this op only.
            return StoreUnavailable("error", str(reply), transport=_server_wide(reply))
        if isinstance(op, GetOp):
            return reply
        try:
            allowed, remaining, reset, retry, *state = reply
            return RateResult(allowed == 1, remaining, reset / 1e6, retry / 1e6, tuple(state))
        except (TypeError, ValueError):
            return StoreUnavailable("error", f"unexpected reply {reply!r}", transport=False)

    async def close(self) -> None:
        await self.client.close()


def _is_noscript(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


_SERVER_WIDE = ("LOADING", "READONLY", "MASTERDOWN", "OOM", "BUSY", "NOAUTH", "WRONGPASS", "CLUSTERDOWN",
                "TRYAGAIN", "MOVED", "ASK", "NOPERM")


def _server_wide(reply: hiredis.ReplyError) -> bool:
    """An error about the server (it is loading, read-only, out of memory…) counts as a transport failure for the
    breaker; one about a single record (WRONGTYPE, a script error on a malformed value) does not."""
    return str(reply).split(" ", 1)[0] in _SERVER_WIDE

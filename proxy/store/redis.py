"""`redis://`, `rediss://`, `unix://`, `redis+sentinel://`: operations become Lua EVALSHA / GET commands on the
pipelined client (Sentinel: sentinel.py says where the master is).

URL parsing and TLS settings come from redis-py (`parse_url`), the wire work from our own pipelined client
(`resp.py`): redis-py has no auto-pipelining, and its per-call overhead is what BASELINES.md measured.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

from ..checks.algorithms import CODES
from ..observe.metrics import store_error
from .errors import StoreUnavailable
from .ops import GetOp, LimitsOp, Op, RateOp, RateResult
from .resp import Endpoint, PipelinedClient
from .sentinel import Locator, SwitchWatch, is_sentinel
from .sentinel import parse as parse_sentinel


class Script:
    def __init__(self, name: str) -> None:
        self.name = name
        self.source = resources.files("proxy.store").joinpath(f"scripts/{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


LIMITS = Script("limits")  # every rate-limit operation: one limit, or several on one subject


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


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _limits_of(op: Op) -> tuple[RateOp, ...]:
    return (op,) if type(op) is RateOp else op.limits  # type: ignore[union-attr,return-value]


def _limit_parts(limits: tuple[RateOp, ...], *, by_source: bool = False) -> tuple[bytes, bytes]:
    """The script call for these limits as the bytes before and after their keys: everything but the keys is
    the same for every request of a route's limits (for one plan), so it is packed once. By source (EVAL) when
    Redis lost its script cache."""
    n = len(limits)
    now = limits[0].now
    verb, script = (b"EVAL", LIMITS.source.encode()) if by_source else (b"EVALSHA", LIMITS.sha.encode())
    head = b"*%d\r\n" % (4 + 6 * n) + _bulk(verb) + _bulk(script) + _bulk(b"%d" % n)
    tail = _bulk(b"" if now is None else str(now).encode())
    for op in limits:
        tail += b"".join(_bulk(str(v).encode()) for v in (CODES[op.algorithm], op.limit, op.window, op.burst,
                                                          int(op.shadow)))
    return head, tail


def _pack_get(op: GetOp) -> bytes:
    key = op.key.encode()
    if not op.more:
        return b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(key), key)
    keys = [key, *[k.encode() for k in op.more]]
    return b"*%d\r\n$4\r\nMGET\r\n%b" % (len(keys) + 1, b"".join([_bulk(k) for k in keys]))


def _pack_limits(limits: tuple[RateOp, ...], parts: tuple[bytes, bytes]) -> bytes:
    head, tail = parts
    out = [head]
    for op in limits:
        key = op.key.encode()
        out.append(b"$%d\r\n%b\r\n" % (len(key), key))
    out.append(tail)
    return b"".join(out)


class RedisStore:
    def __init__(self, url: str, *, timeout: float, connect_timeout: float, pool_size: int) -> None:
        self.locator: Locator | None = None
        self._watch: SwitchWatch | None = None
        if is_sentinel(url):  # the master is wherever the sentinels say, followed through failovers
            spec = parse_sentinel(url)
            self.locator = Locator(spec, connect_timeout)
            self.client = PipelinedClient(
                Endpoint(username=spec.username, password=spec.password, db=spec.db, ssl=spec.ssl_context()),
                timeout=timeout, connect_timeout=connect_timeout, pool_size=pool_size, locate=self.locator.master)
            self._watch = SwitchWatch(spec, connect_timeout, lambda: self.client.rediscover("the master moved"))
            self._watch.start()
        else:
            self.client = PipelinedClient(endpoint_from_url(url), timeout=timeout, connect_timeout=connect_timeout,
                                          pool_size=pool_size)
        self._parts: dict[Any, tuple[bytes, bytes]] = {}

    def describe(self) -> dict[str, Any]:
        """For /readyz: the master a Sentinel store is using."""
        if self.locator is None:
            return {}
        at = self.locator.current
        return {"master": f"{at[0]}:{at[1]}" if at is not None else None}

    def _pack(self, op: Op) -> bytes:
        if type(op) is GetOp:
            wire = op.wire
            if wire is None:
                wire = op.wire = _pack_get(op)
            return wire
        if type(op) is RateOp and op.now is None:  # (tests pin the clock: not worth caching)
            wire = op.wire
            if wire is None:
                shape: Any = (op.algorithm, op.limit, op.window, op.burst, op.shadow)
                parts = self._parts.get(shape)
                if parts is None:
                    parts = self._shape(shape, (op,))
                key = op.key.encode()
                wire = op.wire = b"%b$%d\r\n%b\r\n%b" % (parts[0], len(key), key, parts[1])
            return wire
        limits = _limits_of(op)
        if limits[0].now is not None:
            return _pack_limits(limits, _limit_parts(limits))
        shape = op.shape if type(op) is LimitsOp and op.shape else \
            tuple((o.algorithm, o.limit, o.window, o.burst, o.shadow) for o in limits)
        parts = self._parts.get(shape)
        if parts is None:
            parts = self._shape(shape, limits)
        return _pack_limits(limits, parts)

    def _shape(self, shape: Any, limits: tuple[RateOp, ...]) -> tuple[bytes, bytes]:
        if len(self._parts) > 10_000:  # only configs (and their plans) make shapes; a bound all the same
            self._parts.clear()
        parts = self._parts[shape] = _limit_parts(limits)
        return parts

    def execute(self, ops: Sequence[Op]) -> asyncio.Future[list[Any]]:
        """Not a coroutine: the returned future resolves with the decoded results, decoded in the client's
        reading callback (one coroutine level less for every request)."""
        payload = self._pack(ops[0]) if len(ops) == 1 else b"".join([self._pack(op) for op in ops])
        return self.client.submit(payload, len(ops), self._finish, ops)

    def execute_asking(self, op: Op) -> asyncio.Future[list[Any]]:
        """One operation after `ASKING`, on the same connection (a Cluster slot being migrated). A script goes by
        its source (EVAL): the importing node may never have run it, and ASKING holds for one command only, so a
        NOSCRIPT could not be retried on it."""
        if type(op) is GetOp:
            payload = self._pack(op)
        else:
            limits = _limits_of(op)
            payload = _pack_limits(limits, _limit_parts(limits, by_source=True))
        return self.client.submit(b"*1\r\n$6\r\nASKING\r\n" + payload, 2, self._finish_asking, op)

    @staticmethod
    def _finish_asking(future: asyncio.Future[list[Any]], replies: list[Any], op: Op) -> None:
        future.set_result([_result(op, replies[1])])

    def _finish(self, future: asyncio.Future[list[Any]], replies: list[Any], ops: Sequence[Op]) -> None:
        if len(replies) == 1 and type(replies[0]) is list:  # the common case: one script's answer
            future.set_result([_result(ops[0], replies[0])])
            return
        if not any(type(r) is ReplyError for r in replies):  # next: an API key's read and a limit's script
            future.set_result([_result(ops[i], r) for i, r in enumerate(replies)])
            return
        if self.locator is not None and any(type(r) is ReplyError and str(r).startswith("READONLY")
                                            for r in replies):
            self.client.rediscover("the server is a replica now")  # a demoted master: ask the sentinels again
        for r in replies:
            if type(r) is ReplyError and str(r).startswith("NOSCRIPT"):
                store_error("NOSCRIPT")
                # Redis lost its script cache (restart, SCRIPT FLUSH). The script did not run, so sending it
                # again as EVAL (which also caches it) cannot count twice. Same future: the caller still waits.
                again = [i for i, reply in enumerate(replies) if _is_noscript(reply)]
                retry = b"".join(_pack_limits(_limits_of(ops[i]), _limit_parts(_limits_of(ops[i]), by_source=True))
                                 for i in again)
                self.client.submit(retry, len(again), self._merge, (ops, replies, again), future)
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
        if self._watch is not None:
            await self._watch.stop()
        await self.client.close()
        if self.locator is not None:
            await self.locator.close()


_SIZE: Final = {"fixed_window": 2, "sliding_window": 3, "gcra": 1}
ReplyError: Final = hiredis.ReplyError  # (looked up once: it is tested on every reply)


def _result(op: Op, reply: Any) -> Any:
    if type(reply) is ReplyError:
        # An error reply: the server answered, but not with a result. Returned in place, for this op only.
        store_error(str(reply))
        return StoreUnavailable("error", str(reply), transport=_server_wide(reply))
    if type(op) is GetOp:
        return reply
    try:
        if type(reply) is not list:
            raise TypeError
        if type(op) is RateOp and len(reply) == 8:  # one limit: the common case
            return RateResult(reply[0] == 1, reply[1], reply[2] / 1e6, reply[3] / 1e6,
                              tuple(reply[5:5 + _SIZE[op.algorithm]]), reply[4] == 1)
        limits = _limits_of(op)
        if len(reply) != 8 * len(limits):
            raise TypeError
        results = []
        i = 0
        for limit in limits:
            results.append(RateResult(reply[i] == 1, reply[i + 1], reply[i + 2] / 1e6, reply[i + 3] / 1e6,
                                      tuple(reply[i + 5:i + 5 + _SIZE[limit.algorithm]]), reply[i + 4] == 1))
            i += 8
        return results[0] if type(op) is RateOp else results
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

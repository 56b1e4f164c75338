"""An auto-pipelining Redis client: the calls of every request in one event-loop turn go out in one write.

Theory of operation
- `submit(payload, count)` queues one request's commands (already packed, `count` of them) as a *group* and
  returns a future for all their replies — or for what the group's `finish` makes of them: a caller can decode
  the replies as they arrive, in the reading callback, instead of in one more coroutine after the wake-up.
  The first submit in a loop turn schedules `_flush` with call_soon; the flush writes every queued group in one
  `transport.write` on one connection, registering each command's group in that connection's FIFO of pending
  replies in the same synchronous step (nothing can reorder writes and registrations).
- Replies are parsed by hiredis and handed to the pending groups in order. A group whose future is already done
  (its request went away) still consumes its replies — they are dropped, never given to someone else.
- Deadlines (`store.timeout`) blame the store only for its own slowness (deadline.py): one per batch, armed when
  the batch is flushed — written, or waiting for a connection — never when a request queues a call; it fails
  the batch only after `timeout` of real time *and* an I/O poll, so replies that arrived while Failgate was busy
  are read first. If the connection the batch was written to has sent no byte at all since, it is discarded:
  every group waiting on it fails with StoreUnavailable("unavailable"); nothing is retried (a retried INCR would
  count twice). Every failure made in one pass of the loop shares one `Trip`: the breaker counts it once.
- Connections are opened lazily up to `pool_size`; each is ready only after its handshake (AUTH, SELECT, PING)
  answered within `connect_timeout` (with the same rules). A flushed batch waits for a ready connection no longer
  than its deadline.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hiredis

from ..deadline import Deadline, within
from .errors import StoreUnavailable, Trip

log = logging.getLogger("failgate.store")

Command = tuple[str | bytes | int, ...]
Finish = Callable[[asyncio.Future[Any], list[Any], Any], None]


@dataclass(frozen=True)
class Endpoint:
    host: str | None = None
    port: int = 6379
    path: str | None = None  # unix socket
    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl: ssl_module.SSLContext | None = None


def pack_commands(commands: Sequence[Command]) -> bytes:
    pack = hiredis.pack_command
    if len(commands) == 1:
        return pack(commands[0])  # type: ignore[arg-type]
    return b"".join([pack(c) for c in commands])  # type: ignore[arg-type]


class _Group:
    """One request's commands; resolves its future when the last reply arrives: with the list of replies, or
    through `finish(future, replies, ctx)`, which must resolve it."""

    __slots__ = ("batch", "ctx", "finish", "future", "needed", "replies")

    def __init__(self, future: asyncio.Future[Any], needed: int, finish: Finish | None = None, ctx: Any = None,
                 batch: _Batch | None = None) -> None:
        self.future = future
        self.needed = needed
        self.replies: list[Any] = []
        self.finish = finish
        self.ctx = ctx
        self.batch = batch

    def add(self, reply: Any) -> None:
        replies = self.replies
        replies.append(reply)
        if len(replies) == self.needed:
            batch = self.batch
            if batch is not None:
                batch.answered()
                self.batch = None  # (the batch lists its groups: a cycle, which only the collector would free)
            future = self.future
            if future.done():
                return  # its request timed out or went away: the reply is dropped, in order
            if self.finish is None:
                future.set_result(replies)
                return
            try:
                self.finish(future, replies, self.ctx)
            except Exception as exc:  # a decoding bug must fail one request, never the connection's reader
                log.exception("store reply could not be decoded")
                if not future.done():
                    future.set_exception(StoreUnavailable("error", f"undecodable reply: {exc!r}"))

    def fail(self, exc: StoreUnavailable) -> None:
        if self.batch is not None:
            self.batch.answered()
            self.batch = None
        if not self.future.done():
            self.future.set_exception(exc)
            # The awaiting request may already be gone; don't warn about a never-retrieved exception.
            self.future.exception()


class _Batch:
    __slots__ = ("conn", "deadline", "groups", "open", "payload", "seen_at_send")

    def __init__(self) -> None:
        self.groups: list[_Group] = []
        self.payload: list[bytes] = []
        self.conn: _Connection | None = None
        self.seen_at_send = 0  # the connection's `received` count when this batch was written
        self.deadline: Deadline | None = None
        self.open = 0  # groups still waiting for their replies

    def answered(self) -> None:
        """One group has all its replies (or failed): once none waits, the deadline goes, not kept until due (a
        timer left pending per batch held every batch's requests and replies in memory for `store.timeout`, and
        cost more than the round trip itself)."""
        self.open -= 1
        if not self.open and self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def pending(self) -> bool:
        return any(not g.future.done() for g in self.groups)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: PipelinedClient) -> None:
        self.pool = pool
        self.reader = hiredis.Reader()
        self.pending: collections.deque[_Group] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.ready = False
        self.closed = False
        self.received = 0  # data_received calls so far: "has it said anything since?" without clock resolution

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports aren't asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.received += 1
        self.reader.feed(data)
        pending = self.pending
        try:
            while (reply := self.reader.gets()) is not False:
                pending.popleft().add(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self.discard(StoreUnavailable("unavailable", f"protocol error: {exc}", trip=self.pool.trip()))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.discard(StoreUnavailable("unavailable", "connection lost", trip=self.pool.trip()))

    def write(self, groups: list[_Group], payload: bytes) -> None:
        """Register every group's replies in order and write, with nothing in between that could reorder them."""
        pending = self.pending
        for group in groups:
            n = group.needed
            if n == 1:
                pending.append(group)
            else:
                pending.extend([group] * n)
        assert self.transport is not None
        self.transport.write(payload)

    def discard(self, exc: StoreUnavailable) -> None:
        if self.closed:
            return
        self.closed = True
        self.ready = False
        if self.transport is not None:
            self.transport.abort()
        while self.pending:
            self.pending.popleft().fail(exc)
        self.pool._forget(self)


class PipelinedClient:
    def __init__(self, endpoint: Endpoint, *, timeout: float, connect_timeout: float, pool_size: int,
                 locate: Callable[[], Awaitable[tuple[str, int]]] | None = None) -> None:
        self.endpoint = endpoint
        self.locate = locate  # where to connect, asked for each new connection (Sentinel); else the endpoint's
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.pool_size = pool_size
        self.loop = asyncio.get_running_loop()
        self._conns: list[_Connection] = []
        self._connecting = 0
        self._batch: _Batch | None = None  # being filled during this loop turn
        self._waiting: collections.deque[_Batch] = collections.deque()  # flushed, but no connection was ready
        self._rr = 0
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._trip: Trip | None = None  # shared by the failures of this pass of the loop
        self.writes = 0  # batches written, and the groups (requests) they carried: how well calls are batched
        self.groups_written = 0
        # One-shot test hooks (testhooks.py), each checked once per batch: called at the start of the next flush
        # (the calls are queued, nothing is written), or just before the next batch is written.
        self.on_flush: Callable[[], None] | None = None
        self.on_send: Callable[[], None] | None = None

    # --- the hot path ---------------------------------------------------------------------------------------
    def submit(self, payload: bytes, count: int, finish: Finish | None = None, ctx: Any = None,
               future: asyncio.Future[Any] | None = None) -> asyncio.Future[Any]:
        """Queue `count` packed commands as one group for this loop turn's write. `future` (default: a new one)
        is what the group resolves."""
        if future is None:
            future = self.loop.create_future()
        if self._closed:
            future.set_exception(StoreUnavailable("unavailable", "store client closed"))
            return future
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
            self.loop.call_soon(self._flush)
        batch.groups.append(_Group(future, count, finish, ctx, batch))
        batch.open += 1
        batch.payload.append(payload)
        return future

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        if self.on_flush is not None:
            hook, self.on_flush = self.on_flush, None
            hook()
        # The deadline starts now, not when the requests queued their calls: however long this loop turn took to
        # get here, it was Failgate's time, not the store's.
        batch.deadline = Deadline(self.loop, self.timeout, lambda: self._expire(batch), batch.pending)
        conn = self._pick()
        if conn is None:
            self._waiting.append(batch)
            self._grow()
            return
        self._send(conn, batch)

    def _send(self, conn: _Connection, batch: _Batch) -> None:
        groups, payload = batch.groups, batch.payload
        for g in groups:
            if g.future.done():  # some request gave up while its batch waited for a connection: skip those
                live = [(g, p) for g, p in zip(groups, payload, strict=True) if not g.future.done()]
                if not live:
                    return
                groups, payload = [g for g, _ in live], [p for _, p in live]
                break
        batch.conn = conn
        batch.seen_at_send = conn.received
        self.writes += 1
        self.groups_written += len(groups)
        if self.on_send is not None:
            hook, self.on_send = self.on_send, None
            hook()
        conn.write(groups, payload[0] if len(payload) == 1 else b"".join(payload))
        if len(conn.pending) > 64 and len(self._conns) + self._connecting < self.pool_size:
            self._grow()

    def _pick(self) -> _Connection | None:
        ready = [c for c in self._conns if c.ready]
        if not ready:
            return None
        # Round robin over ready connections, preferring one with nothing in flight.
        for _ in range(len(ready)):
            self._rr = (self._rr + 1) % len(ready)
            c = ready[self._rr]
            if not c.pending:
                return c
        return min(ready, key=lambda c: len(c.pending))

    def _expire(self, batch: _Batch) -> None:
        trip = self.trip()
        exc = StoreUnavailable("timeout", f"no answer within {self.timeout * 1000:g}ms", trip=trip)
        for g in batch.groups:
            g.fail(exc)
        if batch in self._waiting:
            self._waiting.remove(batch)
        conn = batch.conn
        if conn is not None and not conn.closed and conn.received == batch.seen_at_send:
            log.warning("store connection gave no reply for %gms; discarding it", self.timeout * 1000)
            conn.discard(StoreUnavailable("unavailable", "connection discarded: no reply", trip=trip))

    def trip(self) -> Trip:
        """The failed round trip of this pass of the event loop: every failure made before the loop moves on
        shares it."""
        trip = self._trip
        if trip is None:
            trip = self._trip = Trip()
            self.loop.call_soon(self._end_pass)
        return trip

    def _end_pass(self) -> None:
        self._trip = None

    # --- connections ----------------------------------------------------------------------------------------
    def _grow(self) -> None:
        if self._closed or len(self._conns) + self._connecting >= self.pool_size or self._connecting:
            return
        self._connecting += 1
        task = self.loop.create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        conn: _Connection | None = None
        try:
            async with within(self.connect_timeout):
                conn = await self._open()
                await self._handshake(conn)
        except Exception as exc:  # the boundary: whatever went wrong, it is "unavailable", never a wedged pool
            if isinstance(exc, (OSError, TimeoutError, StoreUnavailable, ssl_module.SSLError)):
                log.debug("store connect failed: %r", exc)
            else:
                log.exception("store connect failed unexpectedly")
            trip = self.trip()
            if conn is not None:
                conn.discard(StoreUnavailable("unavailable", "handshake failed", trip=trip))
            self._fail_waiting(StoreUnavailable("unavailable", f"cannot connect: {exc!r}", trip=trip))
            return
        finally:
            self._connecting -= 1
        if self._closed:
            conn.discard(StoreUnavailable("unavailable", "store client closed"))
            return
        conn.ready = True
        while self._waiting:
            self._send(conn, self._waiting.popleft())

    async def _open(self) -> _Connection:
        ep = self.endpoint
        conn = _Connection(self)
        if ep.path is not None:
            await self.loop.create_unix_connection(lambda: conn, ep.path)
        elif self.locate is not None:
            host, port = await self.locate()
            await self.loop.create_connection(lambda: conn, host, port, ssl=ep.ssl,
                                              server_hostname=host if ep.ssl is not None else None)
        else:
            await self.loop.create_connection(lambda: conn, ep.host or "127.0.0.1", ep.port, ssl=ep.ssl)
        self._conns.append(conn)
        return conn

    async def _handshake(self, conn: _Connection) -> None:
        ep = self.endpoint
        commands: list[Command] = []
        if ep.password is not None:
            commands.append(("AUTH", ep.username, ep.password) if ep.username else ("AUTH", ep.password))
        if ep.db:
            commands.append(("SELECT", ep.db))
        commands.append(("PING",))
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        conn.write([_Group(future, len(commands))], pack_commands(commands))
        replies = await future
        for r in replies:
            if isinstance(r, hiredis.ReplyError):
                raise StoreUnavailable("unavailable", f"handshake refused: {r}")

    def _fail_waiting(self, exc: StoreUnavailable) -> None:
        while self._waiting:
            for g in self._waiting.popleft().groups:
                g.fail(exc)

    def rediscover(self, why: str) -> None:
        """Drop every connection (their calls in flight fail): the next ones ask `locate` where to go."""
        for conn in list(self._conns):
            conn.discard(StoreUnavailable("unavailable", why, trip=self.trip()))

    def _forget(self, conn: _Connection) -> None:
        if conn in self._conns:
            self._conns.remove(conn)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._conns):
            conn.discard(StoreUnavailable("unavailable", "store client closed"))
        self._fail_waiting(StoreUnavailable("unavailable", "store client closed"))

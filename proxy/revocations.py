"""Revocations that reach every process before an outage can matter.

Where they live in Redis: `<prefix>revoked`, a sorted set of revoked key hashes scored by when (kept at least 24 h,
the longest `stale_for`), and the channel of the same name, on which each revocation is published. `failgate keys
revoke` deletes the record, adds the hash to the log and publishes it in one transaction (`revoke_in_store`).

`RevocationFeed` (one per serving process) subscribes to the channel and, every time it (re)connects, replays the
log — so a process that was down, restarting or cut off when a revocation was published still learns it; each
revocation is pinned in the process's key memory (checks/memo.py). It uses redis-py's pub/sub client on its own
connection, never the pipelined client of the hot path.

`RevocationDesk` (in the process that owns the admin listener) takes `POST /keys/revoke`: the revocation is
applied to every serving process at once, persisted in the state directory, and written to the store — now, or
as soon as the store is back (it keeps trying while any is pending).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode

from .background import Background
from .keyspace import record_key
from .keyspace import revoked_key as log_key
from .observe.metrics import REVOCATIONS
from .statefiles import StateDir
from .store.cluster import is_cluster
from .store.cluster import parse as parse_cluster
from .store.sentinel import async_master, is_sentinel

log = logging.getLogger("failgate.revocations")

KEEP = 24 * 3600 + 3600  # seconds a revocation stays in the store's log: the longest stale_for, plus a margin

Apply = Callable[[str, float, str], None]  # (hash, when, source)


def revoke_commands(pipe: Any, prefix: str, digest: str, now: float) -> None:
    """Queue a revocation on a redis-py pipeline (sync or asyncio): record gone, hash logged, log trimmed to
    KEEP, and published — in the caller's transaction."""
    pipe.delete(record_key(prefix, digest))
    pipe.zadd(log_key(prefix), {digest: now})
    pipe.zremrangebyscore(log_key(prefix), "-inf", now - KEEP)
    pipe.publish(log_key(prefix), f"{digest} {now}")


def cluster_revocation(prefix: str, digest: str, now: float) -> list[tuple[str, tuple[Any, ...]]]:
    """`revoke_commands` on a Cluster, as (client method, arguments) to call in order on a redis-py cluster client
    (sync or asyncio): the log and the record live in different slots, so no transaction — logged and published
    first, then the record deleted."""
    return [("zadd", (log_key(prefix), {digest: now})), ("zremrangebyscore", (log_key(prefix), "-inf", now - KEEP)),
            ("publish", (log_key(prefix), f"{digest} {now}")), ("delete", (record_key(prefix, digest, True),))]


def redis_client(url: str, connect_timeout: float, timeout: float | None) -> aioredis.Redis:
    """A redis-py client of the store (of its master, through the sentinels, for Sentinel: after a failover the
    feed's reconnection finds the new master and subscribes there)."""
    if is_sentinel(url):
        return async_master(url, connect_timeout, timeout, health_check_interval=5)
    if is_cluster(url):  # (the log is one key: its slot's master; redis-py's cluster client finds it)
        seeds, username, password, tls = parse_cluster(url)
        return aioredis.RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds],  # type: ignore[return-value]
                                     username=username, password=password, ssl=tls,
                                     socket_connect_timeout=connect_timeout, socket_timeout=timeout)
    return aioredis.Redis.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=timeout,
                                   health_check_interval=5)


def channel_client(url: str, connect_timeout: float, turn: int) -> aioredis.Redis | None:
    """On a Cluster, the channel is subscribed on one node (a classic PUBLISH reaches every node), another one
    at each reconnection (`turn`); None elsewhere: the log's client serves the channel too."""
    if not is_cluster(url):
        return None
    seeds, username, password, tls = parse_cluster(url)
    host, port = seeds[turn % len(seeds)]
    return aioredis.Redis(host=host, port=port, username=username, password=password, ssl=tls,
                          socket_connect_timeout=connect_timeout, health_check_interval=5)


class RevocationFeed(Background):
    """Subscribes, replays the log on every (re)connection, applies what it learns; reconnects with backoff."""

    def __init__(self, url: str, prefix: str, connect_timeout: float, apply: Apply) -> None:
        self.url = url
        self.prefix = prefix
        self.connect_timeout = connect_timeout
        self.apply = apply
        self.state = "connecting"  # subscribed | no channel permission | disconnected

    async def _run(self) -> None:
        backoff = 0.2
        reported = False
        turn = 0
        while True:
            client = redis_client(self.url, self.connect_timeout, None)
            node = channel_client(self.url, self.connect_timeout, turn)
            turn += 1
            pubsub = (node or client).pubsub(ignore_subscribe_messages=True)
            try:
                channel = log_key(self.prefix)
                if self.state == "no channel permission":  # the log alone, read every 10 s
                    await self._replay(client)
                    await asyncio.sleep(10)
                    continue
                await pubsub.subscribe(channel)
                await self._replay(client)  # after subscribing: nothing published meanwhile can be missed
                self.state = "subscribed"
                backoff = 0.2
                if reported:
                    log.info("revocation channel subscribed again; log replayed")
                    reported = False
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        digest, _, when = message["data"].decode().partition(" ")
                        self.apply(digest, float(when or time.time()), "publish")
            except redis.exceptions.NoPermissionError as exc:  # (Redis says so with the first reply read)
                log.error("the store user may not subscribe to %s (%s): revocations made elsewhere reach this "
                          "process only from the log, read every 10s; grant the channel (ACL &%s) so they arrive "
                          "at once", log_key(self.prefix), exc, log_key(self.prefix))
                self.state = "no channel permission"
                continue
            except asyncio.CancelledError:
                raise
            except (redis.exceptions.RedisError, OSError) as exc:
                if not reported:
                    log.warning("revocation channel lost (%s); retrying, and replaying the log when back", exc)
                    reported = True
                self.state = "disconnected"
            finally:
                await _close(pubsub, client)
                if node is not None:
                    await _close(None, node)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _replay(self, client: aioredis.Redis) -> None:
        now = time.time()
        found: Any = await client.zrangebyscore(log_key(self.prefix), now - KEEP, "+inf", withscores=True)
        for digest, when in found:
            self.apply(digest.decode(), float(when), "log")


async def _close(pubsub: Any, client: aioredis.Redis) -> None:
    try:
        if pubsub is not None:
            await pubsub.aclose()
        await client.aclose()
    except (redis.exceptions.RedisError, OSError):
        pass


class RevocationDesk(Background):
    """Admin-listener revocations: to every serving process at once, to the state directory, to the store."""

    def __init__(self, url: str, prefix: str, connect_timeout: float, state: StateDir | None,
                 broadcast: Callable[[str, float], Awaitable[None]]) -> None:
        self.url = url
        self.prefix = prefix
        self.connect_timeout = connect_timeout
        self.state = state
        self.broadcast = broadcast
        self.revoked: dict[str, float] = {}
        self.pending: list[str] = []
        if state is not None:
            saved = state.load_revocations()
            now = time.time()
            self.revoked = {d: at for d, at in saved.revoked if now - at <= KEEP}
            self.pending = [d for d in saved.pending if d in self.revoked]

    async def revoke(self, digest: str) -> dict[str, Any]:
        now = time.time()
        self.revoked.setdefault(digest, now)
        await self.broadcast(digest, self.revoked[digest])
        if digest not in self.pending:
            self.pending.append(digest)
        persisted = self._persist()
        stored = await self._write_pending()
        return {"hash": digest, "applied": True, "persisted": persisted, "in_store": stored}

    def _persist(self) -> bool:
        if self.state is None:
            return False
        try:
            self.state.save_revocations(self.revoked, self.pending)
        except OSError as exc:
            log.error("could not persist a revocation in %s: %s", self.state.path, exc)
            return False
        return True

    async def _write_pending(self) -> bool:
        if not self.pending:
            return True
        if self.url.startswith("memory://"):
            self.pending.clear()  # nothing outside this process to write to
            self._persist()
            return False
        client = redis_client(self.url, self.connect_timeout, 2.0)
        try:
            if is_cluster(self.url):  # the log and the records live in different slots: no transaction
                for digest in self.pending:
                    for method, args in cluster_revocation(self.prefix, digest, self.revoked[digest]):
                        await getattr(client, method)(*args)
            else:
                pipe = client.pipeline(transaction=True)
                for digest in self.pending:
                    revoke_commands(pipe, self.prefix, digest, self.revoked[digest])
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("revocation of %d key(s) not yet in the store (%s); retrying", len(self.pending), exc)
            return False
        finally:
            await client.aclose()
        log.info("revocation of %d key(s) written to the store", len(self.pending))
        self.pending.clear()
        self._persist()
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            if self.pending:
                await self._write_pending()
            for digest in [d for d, at in self.revoked.items() if time.time() - at > KEEP]:
                del self.revoked[digest]


def count(source: str) -> None:
    REVOCATIONS.labels(source).inc()

"""Redis Cluster: each operation to the master of its key's slot, one pipelined write per node per loop turn, and a
breaker per node.

`redis+cluster://[user:pass@]h1:7000,h2:7001,…/` (`rediss+cluster://` for TLS): the hosts are seeds; the slot map
comes from `CLUSTER SLOTS`, read at start and again after a `MOVED` reply or a node's connection failure. Slot
hashing is redis-py's (`key_slot`). Every operation's keys share one hash tag (rate limits `{route:subject}`,
API-key records and their bucket's marker `{NN}`), so each operation has one slot and one node.

Each node is a `RedisStore` of its own (its pipelined client, its script cache — `NOSCRIPT` is handled per node)
behind a `Breaker` of its own: a dead master fails only the operations whose keys it holds, in their place in the
answer (their checks then follow their fail mode), and its breaker opens without touching the others'. `MOVED`
is followed once to the node it names (and the map refreshed); `ASK` once with `ASKING` on the same connection;
`TRYAGAIN` (a slot being moved, the operation's keys on both nodes) is an error for that operation — its check
is decided degraded, tagged — except for a read, which is then made key by key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.crc import key_slot

from ..observe.metrics import BREAKER_STATE, StoreMetrics
from .breaker import NAMES, Breaker
from .errors import StoreUnavailable
from .hosts import userinfo_and_hosts
from .ops import GetOp, LimitsOp, Op, RateOp
from .redis import RedisStore

log = logging.getLogger("failgate.cluster")

SCHEMES = ("redis+cluster", "rediss+cluster")
# Told every change of the masters or their breakers (`describe()["nodes"]`): a worker tells its parent, for /readyz.
on_nodes: Callable[[list[dict[str, Any]]], None] | None = None
SLOTS = 16384
_REFRESH_EVERY = 1.0  # seconds: the slot map is read again at most this often


def is_cluster(url: str) -> bool:
    return url.split("://", 1)[0] in SCHEMES


def parse(url: str) -> tuple[list[tuple[str, int]], str | None, str | None, bool]:
    """(seeds, username, password, tls); ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"expected {' or '.join(s + '://' for s in SCHEMES)}")
    username, password, seeds = userinfo_and_hosts(parts.netloc, "cluster nodes")
    if parts.path.strip("/") or parts.query:
        raise ValueError("a cluster has one database and no options: expected nothing after the hosts but '/'")
    return seeds, username, password, parts.scheme == "rediss+cluster"


def _split_read(op: Op, answer: object) -> TypeGuard[GetOp]:
    """A read of several keys answered `TRYAGAIN`: its slot is being moved, with its keys on both nodes."""
    return type(answer) is StoreUnavailable and answer.detail.startswith("TRYAGAIN") and type(op) is GetOp \
        and bool(op.more)


def key_of(op: Op) -> str:
    if type(op) is LimitsOp:
        return op.limits[0].key
    return op.key  # type: ignore[union-attr]


class _Node:
    """One master: its client and its breaker."""

    def __init__(self, address: tuple[str, int], store: RedisStore, breaker: Breaker) -> None:
        self.address = address
        self.label = f"{address[0]}:{address[1]}"
        self.store = store
        self.breaker = breaker


class ClusterStore:
    counts_node_calls = True  # failgate_store_operations_total: one per node call, with that node's result

    def __init__(self, url: str, *, timeout: float, connect_timeout: float, pool_size: int,
                 failures: int = 5, open_for: float = 2.0) -> None:
        self.seeds, self._username, self._password, self._tls = parse(url)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.pool_size = pool_size
        self.failures = failures
        self.open_for = open_for
        self.nodes: dict[tuple[str, int], _Node] = {}
        self.metrics = StoreMetrics()
        self.slots: list[tuple[str, int] | None] = [None] * SLOTS
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0
        self._again = False
        self._later: asyncio.TimerHandle | None = None
        self.refresh()

    # --- the slot map -----------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the slot map again, in the background: at most once a second — a request made sooner is carried
        out when the second is over, never dropped (the map must end up current)."""
        if self._refreshing is not None and not self._refreshing.done():
            self._again = True  # the map may change while it is being read: read it once more after
            return
        wait = self._refreshed_at + _REFRESH_EVERY - time.monotonic()
        if wait > 0 and any(self.slots):
            if self._later is None:
                self._later = asyncio.get_running_loop().call_later(wait, self._deferred)
            return
        self._refreshed_at = time.monotonic()
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        self._refreshing.add_done_callback(self._read)

    def _deferred(self) -> None:
        self._later = None
        self.refresh()

    def _read(self, _: object) -> None:
        if self._again:
            self._again = False
            self.refresh()

    async def _refresh(self) -> None:
        known = [n.address for n in self.nodes.values()]
        for host, port in [*known, *[s for s in self.seeds if s not in known]]:
            client = aioredis.Redis(host=host, port=port, username=self._username, password=self._password,
                                    ssl=self._tls, socket_connect_timeout=self.connect_timeout,
                                    socket_timeout=max(self.connect_timeout, 1.0))
            try:
                ranges = await client.execute_command("CLUSTER SLOTS")
            except (redis.exceptions.RedisError, OSError):
                continue
            finally:
                await client.aclose()
            slots: list[tuple[str, int] | None] = [None] * SLOTS
            for entry in ranges:
                start, end, master = entry[0], entry[1], entry[2]
                name = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
                address = (name or host, int(master[1]))  # (an empty name: the node we asked)
                self._node(address)
                for slot in range(int(start), int(end) + 1):
                    slots[slot] = address
            if slots != self.slots:
                if any(self.slots):
                    log.warning("cluster slot map changed: masters now %s",
                                ", ".join(sorted({f"{h}:{p}" for h, p in {a for a in slots if a}})))
                self.slots = slots
                self._report()
            return
        log.warning("cluster slot map: no node answered CLUSTER SLOTS (seeds %s)",
                    ", ".join(f"{h}:{p}" for h, p in self.seeds))

    async def ready(self) -> None:
        """Wait for the first slot map (start-up)."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)

    def _node(self, address: tuple[str, int]) -> _Node:
        node = self.nodes.get(address)
        if node is None:
            scheme = "rediss" if self._tls else "redis"
            auth = ""
            if self._password is not None:
                auth = f"{self._username or ''}:{self._password}@"
            store = RedisStore(f"{scheme}://{auth}{address[0]}:{address[1]}/0", timeout=self.timeout,
                               connect_timeout=self.connect_timeout, pool_size=self.pool_size)
            label = f"store:{address[0]}:{address[1]}"
            gauge = BREAKER_STATE.labels(label)
            gauge.set(0)

            def changed(state: int, label: str = label, gauge: Any = gauge) -> None:
                gauge.set(state)
                log.warning("cluster node %s breaker %s", label, NAMES[state])
                self._report()

            node = self.nodes[address] = _Node(address, store, Breaker(self.failures, self.open_for,
                                                                       on_change=changed))
        return node

    # --- the hot path -----------------------------------------------------------------------------------------
    async def execute(self, ops: Sequence[Op]) -> list[Any]:
        """Every operation's answer in its place; a node that cannot answer gives its operations a
        StoreUnavailable each (never raises: the other nodes' answers stand)."""
        slots = self.slots
        groups: dict[tuple[str, int] | None, list[int]] = {}
        for i, op in enumerate(ops):
            groups.setdefault(slots[key_slot(key_of(op).encode())], []).append(i)
        results: list[Any] = [None] * len(ops)
        calls = [self._call(address, [ops[i] for i in idx], idx, results) for address, idx in groups.items()]
        if len(calls) == 1:
            await calls[0]
        else:
            await asyncio.gather(*calls)
        return results

    async def _call(self, address: tuple[str, int] | None, ops: list[Op], idx: list[int], results: list[Any],
                    redirected: bool = False) -> None:
        if address is None:  # no slot map yet, or a slot no master serves
            self.metrics.observe("unavailable", 0.0)
            self.refresh()
            for i in idx:
                results[i] = StoreUnavailable("unavailable", "no cluster node serves this slot", transport=False)
            return
        node = self._node(address)
        breaker = node.breaker
        started = time.perf_counter()
        if not breaker.allow():
            self.metrics.observe("breaker_open", 0.0)
            for i in idx:
                results[i] = StoreUnavailable("breaker_open", f"the breaker of node {node.label} is open",
                                              transport=False)
            return
        try:
            got = await node.store.execute(ops)
        except StoreUnavailable as exc:
            self.metrics.observe(exc.reason, time.perf_counter() - started)
            breaker.failed_call(exc)
            if exc.transport:
                self.refresh()  # a replica may be taking over its slots
            for i in idx:
                results[i] = StoreUnavailable(exc.reason, f"node {node.label}: {exc.detail}", transport=False)
            return
        except BaseException:
            breaker.abandon()
            raise
        failed = False
        follow: list[tuple[int, Op, str]] = []
        split: list[tuple[int, GetOp]] = []
        for i, op, r in zip(idx, ops, got, strict=True):
            if type(r) is StoreUnavailable:
                word = r.detail.split(" ", 1)[0]
                if word in ("MOVED", "ASK") and not redirected:
                    follow.append((i, op, r.detail))
                    continue
                if _split_read(op, r) and not redirected:
                    split.append((i, op))
                    continue
                if r.transport and word not in ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"):
                    failed = True  # LOADING, OOM, READONLY…: about the node
                r = StoreUnavailable(r.reason, f"node {node.label}: {r.detail}", transport=False)
            results[i] = r
        self.metrics.observe("error" if failed else "ok", time.perf_counter() - started)
        if failed:
            breaker.failure()
        elif breaker.consecutive or breaker.state:
            breaker.success()
        for i, op, detail in follow:
            await self._follow(i, op, detail, results)
        for i, op in split:
            await self._read_one_by_one(i, op, results)

    async def _read_one_by_one(self, i: int, op: GetOp, results: list[Any]) -> None:
        """A read of several keys whose slot is being moved while they are on both nodes (`TRYAGAIN`: an API key's
        record and its bucket's marker): each key read where it is (following its own `ASK`). A read never counts
        twice, so asking again is safe."""
        keys = (op.key, *op.more)
        parts: list[Any] = [None] * len(keys)
        await self._call(self.slots[key_slot(op.key.encode())], [GetOp(k) for k in keys], list(range(len(keys))),
                         parts)
        failure = next((part for part in parts if type(part) is StoreUnavailable), None)
        results[i] = failure if failure is not None else parts

    async def _follow(self, i: int, op: Op, detail: str, results: list[Any]) -> None:
        """`MOVED <slot> <host>:<port>` (the slot lives there now: refresh the map, send it there once) or
        `ASK <slot> <host>:<port>` (being migrated: send it there once, after ASKING)."""
        word, _, rest = detail.partition(" ")
        host, _, port = rest.split(" ")[-1].rpartition(":")
        address = (host or self.seeds[0][0], int(port))
        if word == "MOVED":
            self.refresh()
            one: list[Any] = [None]
            await self._call(address, [op], [0], one, redirected=True)
            results[i] = one[0]
            return
        node = self._node(address)
        try:
            answer = (await node.store.execute_asking(op))[0]
        except StoreUnavailable as exc:
            results[i] = StoreUnavailable(exc.reason, f"node {node.label}: {exc.detail}", transport=False)
            return
        if _split_read(op, answer):
            await self._read_one_by_one(i, op, results)
            return
        results[i] = answer

    def _report(self) -> None:
        if on_nodes is not None:
            on_nodes(self.describe()["nodes"])

    def describe(self) -> dict[str, Any]:
        """For /readyz: each master, its slot count and its breaker."""
        counts: dict[tuple[str, int], int] = {}
        for address in self.slots:
            if address is not None:
                counts[address] = counts.get(address, 0) + 1
        return {"nodes": [{"node": f"{h}:{p}", "slots": n, "breaker": NAMES[self.nodes[(h, p)].breaker.state]}
                          for (h, p), n in sorted(counts.items())]}

    async def close(self) -> None:
        if self._later is not None:
            self._later.cancel()
        if self._refreshing is not None:
            self._refreshing.cancel()
        for node in self.nodes.values():
            await node.store.close()


__all__ = ["ClusterStore", "GetOp", "RateOp", "is_cluster", "parse"]

"""Redis Sentinel: where the master is, and following it through a failover.

`redis+sentinel://[user:pass@]h1:26379,h2:26379,h3:26379/<master-name>/<db>` (`rediss+sentinel://` for TLS to the
data nodes, `?ssl_ca_certs=FILE` for a private CA; `?sentinel_password=…` when the sentinels require one;
user:pass are the data nodes').

Discovery is redis-py's (`Sentinel.discover_master`: the first sentinel that knows a master it does not consider
down). The hot path keeps its pipelined client (resp.py); each new connection of it asks where the master is, so
a lost connection finds the new master by itself. Two more events move it at once: a `READONLY` reply (it is
talking to a demoted master: redis.py drops every connection) and a `+switch-master` message from a sentinel
(`SwitchWatch`, subscribed here). redis-py's own Sentinel clients serve the rest (the revocation channel,
`failgate keys`): they re-discover on every new connection too.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as asentinel
import redis.exceptions
import redis.sentinel

from ..background import Background
from .hosts import userinfo_and_hosts

log = logging.getLogger("failgate.sentinel")

SCHEMES = ("redis+sentinel", "rediss+sentinel")
# Told "host:port" of each master a process starts using (a worker tells its parent, for /readyz).
on_master: Callable[[str], None] | None = None


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0] in SCHEMES


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    ca_certs: str | None = None  # rediss+sentinel: the CA file that signs the data nodes' certificates

    def master_kwargs(self) -> dict[str, Any]:
        """Connection settings for the data nodes, as redis-py's clients take them."""
        kw: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.tls:
            kw["ssl"] = True
            if self.ca_certs:
                kw["ssl_ca_certs"] = self.ca_certs
        return kw

    def ssl_context(self) -> ssl.SSLContext | None:
        """For the pipelined client's connections to the data nodes (rediss+sentinel)."""
        return ssl.create_default_context(cafile=self.ca_certs) if self.tls else None

    def sentinel_kwargs(self, timeout: float) -> dict[str, Any]:
        return {"password": self.sentinel_password, "socket_timeout": timeout, "socket_connect_timeout": timeout}


def parse(url: str) -> SentinelUrl:
    """ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"expected {' or '.join(s + '://' for s in SCHEMES)}")
    username, password, sentinels = userinfo_and_hosts(parts.netloc, "sentinels", default_port=26379)
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("expected the master's name in the path: …/<master-name>/<db>")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("expected the path /<master-name>/<db>, with db a number")
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password", "ssl_ca_certs"}
    if unknown:
        raise ValueError(f"unknown query parameter {sorted(unknown)[0]!r}; the known ones are sentinel_password and "
                         "ssl_ca_certs")
    return SentinelUrl(tuple(sentinels), unquote(path[0]), int(path[1]) if len(path) == 2 else 0, username,
                       password, query.get("sentinel_password", [None])[0], parts.scheme == "rediss+sentinel",
                       query.get("ssl_ca_certs", [None])[0])


class Locator:
    """Where the master is now, asked of the sentinels (redis-py's discovery)."""

    def __init__(self, spec: SentinelUrl, timeout: float) -> None:
        self.spec = spec
        self._sentinel = asentinel.Sentinel(list(spec.sentinels), sentinel_kwargs=spec.sentinel_kwargs(timeout))
        self.current: tuple[str, int] | None = None

    async def master(self) -> tuple[str, int]:
        try:
            host, port = await self._sentinel.discover_master(self.spec.master)
        except redis.exceptions.RedisError as exc:  # (MasterNotFoundError: none knows a master that is up)
            raise OSError(f"no master {self.spec.master!r} from the sentinels: {exc}") from None
        found = (str(host), int(port))
        if found != self.current:
            if self.current is not None:
                log.warning("store master %s is now at %s:%d (was %s:%d)", self.spec.master, *found, *self.current)
            self.current = found
            if on_master is not None:
                on_master(f"{found[0]}:{found[1]}")
        return found

    async def close(self) -> None:
        for s in self._sentinel.sentinels:
            await s.aclose()


class SwitchWatch(Background):
    """Subscribed to `+switch-master` on one sentinel after another: calls `moved()` when our master moved."""

    def __init__(self, spec: SentinelUrl, timeout: float, moved: Callable[[], None]) -> None:
        self.spec = spec
        self.timeout = timeout
        self.moved = moved

    async def _run(self) -> None:
        turn = 0
        while True:
            host, port = self.spec.sentinels[turn % len(self.spec.sentinels)]
            turn += 1
            client = aioredis.Redis(host=host, port=port, password=self.spec.sentinel_password,
                                    socket_connect_timeout=self.timeout)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe("+switch-master")
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    name = message["data"].decode(errors="replace").split(" ", 1)[0]
                    if name == self.spec.master:
                        self.moved()
            except asyncio.CancelledError:
                raise
            except (redis.exceptions.RedisError, OSError):
                pass
            finally:
                try:
                    await pubsub.aclose()
                    await client.aclose()
                except (redis.exceptions.RedisError, OSError):
                    pass
            await asyncio.sleep(0.5)


def async_master(url: str, connect_timeout: float, timeout: float | None, **kw: Any) -> aioredis.Redis:
    """A redis-py asyncio client of the master (re-discovered on every new connection)."""
    spec = parse(url)
    sentinel = asentinel.Sentinel(list(spec.sentinels), sentinel_kwargs=spec.sentinel_kwargs(connect_timeout))
    return sentinel.master_for(spec.master, socket_connect_timeout=connect_timeout, socket_timeout=timeout,
                               **spec.master_kwargs(), **kw)


def sync_master(url: str, timeout: float, **kw: Any) -> redis.Redis:
    """A redis-py client of the master, for `failgate keys`."""
    spec = parse(url)
    sentinel = redis.sentinel.Sentinel(list(spec.sentinels), sentinel_kwargs=spec.sentinel_kwargs(timeout))
    return sentinel.master_for(spec.master, socket_timeout=timeout, socket_connect_timeout=timeout,
                               **spec.master_kwargs(), **kw)

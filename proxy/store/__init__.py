"""The store boundary: one small protocol, `memory://` and `redis://` behind it, every failure
translated into StoreUnavailable(reason) here and nowhere else."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from ..config.schema import Store as StoreConfig
from .errors import StoreUnavailable
from .ops import GetOp, Op, RateOp, RateResult


class Store(Protocol):
    def execute(self, ops: Sequence[Op]) -> Awaitable[list[Any]]:
        """Run one request's operations in one round trip (a coroutine function, or a function returning a
        future). Raises StoreUnavailable when the round trip failed (timeout, connection); an error reply about
        one operation is returned in its place as a StoreUnavailable("error") instance, so the other checks of
        the request still get their answers."""

    async def close(self) -> None: ...


def open_store(cfg: StoreConfig) -> Store:
    """Must be called inside the running loop."""
    if cfg.url.startswith("memory://"):
        from .memory import MemoryStore

        return MemoryStore()
    from .cluster import ClusterStore, is_cluster
    from .redis import RedisStore

    if is_cluster(cfg.url):  # a breaker per node inside; the process-wide one then never opens
        return ClusterStore(cfg.url, timeout=cfg.timeout, connect_timeout=cfg.connect_timeout,
                            pool_size=cfg.pool_size, failures=cfg.breaker.failures, open_for=cfg.breaker.open_for)
    return RedisStore(cfg.url, timeout=cfg.timeout, connect_timeout=cfg.connect_timeout, pool_size=cfg.pool_size)


__all__ = ["GetOp", "Op", "RateOp", "RateResult", "Store", "StoreUnavailable", "open_store"]

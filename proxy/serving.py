"""One serving process: its store stack (client -> chaos switch -> breaker), the compiled config, the proxy
listener, the log writer — and the control commands the parent (or the admin listener) sends it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import IO, TYPE_CHECKING, Any

from aiohttp import web

from .config import LoadedConfig
from .config.schema import parse_duration
from .observe.decisionlog import DecisionLog, LogWriter
from .observe.metrics import BREAKER_STATE
from .store import open_store
from .store.breaker import NAMES, Breaker, BreakerStore
from .store.chaos import ChaosStore

if TYPE_CHECKING:
    from .app import Proxy, Runtime

log = logging.getLogger("failgate.serving")


class Serving:
    def __init__(self, loaded: LoadedConfig, *, reuse_port: bool, workers: int = 1,
                 log_stream: IO[str] | None = None) -> None:
        self.loaded = loaded
        self.workers = workers
        self._reuse_port = reuse_port
        self._runner: web.ServerRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.runtime: Runtime | None = None
        self.proxy: Proxy | None = None
        self.store: Any = None  # the raw client (memory or redis)
        self.chaos: ChaosStore | None = None
        self.breaker: Breaker | None = None
        self.writer = LogWriter(log_stream)

    async def start(self) -> None:
        from .app import Proxy, Runtime
        from .listener import ProxyServer

        cfg = self.loaded.config
        self.store = open_store(cfg.store)
        self.chaos = ChaosStore(self.store, cfg.store.timeout)
        BREAKER_STATE.set(0)
        self.breaker = Breaker(cfg.store.breaker.failures, cfg.store.breaker.open_for, on_change=BREAKER_STATE.set)
        store = BreakerStore(self.chaos, self.breaker)
        decisions = DecisionLog(self.writer, self.loaded.sha256)
        self.runtime = Runtime(self.loaded, store, workers=self.workers, decisions=decisions)
        self.proxy = Proxy(self.runtime, tls=cfg.listen.tls is not None)
        kwargs: dict[str, Any] = {"access_log": None}
        if cfg.access_log:
            from .observe.accesslog import JsonAccessLogger, access_logger

            JsonAccessLogger.writer = self.writer
            kwargs = {"access_log": access_logger(), "access_log_class": JsonAccessLogger}
        server = ProxyServer(self.proxy.handle, header_timeout=cfg.limits.header_timeout,
                             max_connections=cfg.limits.max_connections, keepalive_timeout=75.0, **kwargs)
        self._runner = web.ServerRunner(server, shutdown_timeout=cfg.shutdown_grace)
        await self._runner.setup()
        ssl_context = None
        if cfg.listen.tls is not None:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(cfg.listen.tls.cert, cfg.listen.tls.key)
        site = web.TCPSite(self._runner, cfg.listen.host, cfg.listen.port, ssl_context=ssl_context,
                           backlog=1024, reuse_port=self._reuse_port or None)
        await site.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.runtime is not None:
                self.runtime.decisions.flush_suppressed()

    def state(self) -> dict[str, Any]:
        """Store and breaker state, for /readyz."""
        fault = self.chaos.active() if self.chaos is not None else None
        return {
            "store": self.loaded.config.store.url.split("://", 1)[0],
            "breaker": NAMES[self.breaker.state] if self.breaker is not None else "closed",
            "chaos": fault.kind if fault is not None else None,
        }

    def control(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Apply a control command; returns the reply (ok, or error with a message)."""
        op = cmd.get("op")
        if op == "chaos":
            assert self.chaos is not None
            try:
                delay = parse_duration(cmd["delay"]) if cmd.get("delay") else 0.0
                self.chaos.set(str(cmd.get("fault")), delay, parse_duration(cmd.get("for", "30s")))
            except (ValueError, KeyError) as exc:
                return {"ok": False, "error": str(exc)}
            log.warning("chaos: store fault %s for %s (delay %s)", cmd.get("fault"), cmd.get("for", "30s"),
                        cmd.get("delay") or "-")
            return {"ok": True}
        if op == "chaos_clear":
            assert self.chaos is not None
            self.chaos.clear()
            log.warning("chaos: store fault cleared")
            return {"ok": True}
        return {"ok": False, "error": f"unknown control op {op!r}"}

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish within shutdown_grace, close pools, store and log."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self.runtime is not None:
            self.runtime.decisions.flush_suppressed()
            await self.runtime.close()
        if self.store is not None:
            await self.store.close()
        self.writer.close()

"""One serving process: its store stack (client -> chaos switch -> breaker), the compiled config, the proxy
listener, the log writer — and the control commands the parent (or the admin listener) sends it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from yarl import URL

from .checks.memo import REVOKED, KeyMemory, Record
from .compiled import Memories, Runtime
from .config import LoadedConfig
from .jwks import JwksSupply, KeySet
from .observe import metrics
from .observe.decisionlog import DecisionLog, LogWriter
from .observe.lag import LagSampler
from .observe.metrics import BREAKER_STATE
from .revocations import RevocationFeed
from .revocations import count as count_revocation
from .statefiles import KeysFile, StateDir
from .store import open_store
from .store.breaker import NAMES, Breaker, BreakerStore
from .store.chaos import ChaosStore, parse_fault

if TYPE_CHECKING:
    from .app import Proxy

log = logging.getLogger("failgate.serving")
STORE_BREAKER = BREAKER_STATE.labels("store")


class Serving:
    def __init__(self, loaded: LoadedConfig, *, reuse_port: bool, workers: int = 1,
                 log_stream: IO[str] | None = None, state: StateDir | None = None, index: int = 0,
                 fetch_keys: bool = True) -> None:
        self.loaded = loaded
        self.workers = workers
        self.state_dir = state
        self.index = index  # this serving process's number among the workers: its file in the state directory
        self.feed: RevocationFeed | None = None
        self.notify: Callable[[int], None] | None = None  # told of breaker changes (a worker tells its parent)
        self.keysets: dict[str, KeySet] = {}  # jwt key sets, by jwks_url: handed in by whoever fetches them
        # Fetches the key sets itself (one process), or has them handed in by its parent (a worker), who is also
        # who `refetch` asks for a key set again when a token names an unknown key.
        self.supply = JwksSupply(state, self.control) if fetch_keys else None
        self.refetch: Callable[[str], None] = self.supply.refetch if self.supply is not None else lambda url: None
        self._saved_changes = -1
        self._reuse_port = reuse_port
        self._runner: web.ServerRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.listening = False  # true once the proxy port accepts connections
        self.runtime: Runtime | None = None
        self.proxy: Proxy | None = None
        self.store: Any = None  # the raw client (memory or redis)
        self.chaos: ChaosStore | None = None
        self.breaker: Breaker | None = None
        self.stack: Any = None
        self._server: Any = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.writer = LogWriter(log_stream)
        self.lag = LagSampler()

    async def start(self) -> None:
        from .app import Proxy
        from .listener import ProxyServer

        cfg = self.loaded.config
        if self.supply is not None:  # the key sets first: readiness waits (a bounded time) for them
            self.supply.configure(cfg)
            await self.supply.ready(JwksSupply.startup_wait(cfg))
        memories = Memories(self._store_stack(cfg.store), DecisionLog(self.writer, self.loaded.sha256),
                            keysets=self.keysets)
        await self._store_ready()
        self._restore(memories.keys)
        self.runtime = Runtime(self.loaded, memories, workers=self.workers)
        self._start_feed(cfg.store)
        self.proxy = Proxy(self.runtime, tls=cfg.listen.tls is not None,
                           access_log=self.writer if cfg.access_log else None)
        kwargs: dict[str, Any] = {
            "access_log": None,  # Failgate writes its own (one JSON line per request)
            # A request body goes upstream as the client encoded it: aiohttp would otherwise decompress a gzip body
            # and Failgate forward the plain bytes still labelled `Content-Encoding: gzip`.
            "auto_decompress": False,
        }
        lim = cfg.limits
        server = self._server = ProxyServer(self.proxy.handle, header_timeout=lim.header_timeout,
                                           max_connections=lim.max_connections, keepalive_timeout=75.0,
                                           max_target=lim.max_target, max_headers=lim.max_headers,
                                           max_header_size=lim.max_header_size, refuse=self.proxy.refuse, **kwargs)
        self._runner = web.ServerRunner(server, shutdown_timeout=cfg.shutdown_grace)
        await self._runner.setup()
        ssl_context = None
        if cfg.listen.tls is not None:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(cfg.listen.tls.cert, cfg.listen.tls.key)
        site = web.TCPSite(self._runner, cfg.listen.host, cfg.listen.port, ssl_context=ssl_context,
                           backlog=1024, reuse_port=self._reuse_port or None)
        await site.start()
        self.listening = True
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        self.lag.start()

    def _store_stack(self, store_cfg: Any) -> BreakerStore:
        """client -> chaos switch -> breaker; the breaker's state goes to the gauge (and, in a worker, the parent)."""
        self.store = open_store(store_cfg)
        self.chaos = ChaosStore(self.store, store_cfg.timeout)
        STORE_BREAKER.set(0)
        self.breaker = Breaker(store_cfg.breaker.failures, store_cfg.breaker.open_for, on_change=self._breaker_changed)
        self.stack = BreakerStore(self.chaos, self.breaker)
        return self.stack

    async def _store_ready(self) -> None:
        """A Cluster store reads its slot map before this process serves (a bounded wait: each seed once, within
        connect_timeout); without one every check would be a store error until it arrived."""
        ready = getattr(self.store, "ready", None)
        if ready is not None:
            await ready()

    def _breaker_changed(self, state: int) -> None:
        """A dependency's state change: the gauge, one structured line, and the parent (in a worker)."""
        STORE_BREAKER.set(state)
        if self.runtime is not None:
            self.runtime.decisions.event({"event": "dependency", "dependency": "store", "breaker": NAMES[state]})
        if self.notify is not None:
            self.notify(state)

    def _restore(self, keys: KeyMemory) -> None:
        """What the state directory remembers: API-key answers (so a restart during an outage still serves
        `stale`) and pinned revocations."""
        if self.state_dir is None:
            return
        restored = 0
        for saved in self.state_dir.load_keys():
            for digest, record, at in saved.entries:
                keys.restore(digest, REVOKED if record is None else msgspec.convert(record, Record), at)
                restored += 1
            for digest, at in saved.revoked:
                if keys.revoke(digest, at):
                    count_revocation("state")
        for digest, at in self.state_dir.load_revocations().revoked:
            if keys.revoke(digest, at):
                count_revocation("state")
        if restored:
            log.info("restored %d remembered API-key answers from %s", restored, self.state_dir.path)

    async def save_state(self) -> None:
        """Write this process's remembered API-key answers (hashes only) when they changed; off the event loop."""
        if self.state_dir is None or self.runtime is None:
            return
        keys = self.runtime.keys
        if keys.changes == self._saved_changes:
            return
        self._saved_changes = keys.changes
        entries, revoked = keys.entries(), keys.revoked()
        snapshot = KeysFile(1, [(d, None if v == REVOKED else msgspec.to_builtins(v), at) for d, v, at in entries],
                            sorted(revoked.items()))
        state, index = self.state_dir, self.index
        try:
            await asyncio.get_running_loop().run_in_executor(None, state.save_keys, index, snapshot)
        except OSError as exc:
            log.error("could not save remembered API keys in %s: %s", state.path, exc)

    def _start_feed(self, store_cfg: Any) -> None:
        if store_cfg.url.startswith("memory://"):
            return
        self.feed = RevocationFeed(store_cfg.url, store_cfg.key_prefix, store_cfg.connect_timeout, self.revoked)
        self.feed.start()

    def revoked(self, digest: str, at: float, source: str) -> None:
        """A revocation learned from the store's log or channel, the admin listener or the state directory."""
        if self.runtime is not None and self.runtime.keys.revoke(digest, at):
            count_revocation(source)
            log.info("API key %s… revoked (%s)", digest[:12], source)

    async def reload(self, loaded: LoadedConfig) -> None:
        """Swap to a new, already validated config. Requests in flight finish on the runtime they started with;
        the store client, breaker and stale state are kept when `store` did not change."""
        old, old_cfg, cfg = self.runtime, self.loaded.config, loaded.config
        assert old is not None and self.proxy is not None
        for key in ("listen", "workers", "access_log", "shutdown_grace", "admin"):
            if getattr(cfg, key) != getattr(old_cfg, key):
                log.warning("reload: `%s` changed; it takes effect at the next restart", key)
        old_store = None
        decisions = DecisionLog(self.writer, loaded.sha256)
        if cfg.store != old_cfg.store:
            old_store = self.store
            rehearsal = self.chaos.active() if self.chaos is not None else None
            memories = Memories(self._store_stack(cfg.store), decisions, targets=old.targets,
                                keysets=self.keysets, tokens=old.memories.tokens)
            await self._store_ready()
            if rehearsal is not None and self.chaos is not None:
                self.chaos.fault = rehearsal  # an outage rehearsal goes on for what is left of it, on the new store
            for digest, at in old.keys.revoked().items():  # a revocation is about the key, whatever the store
                memories.keys.revoke(digest, at)
            if self.feed is not None:
                await self.feed.stop()
                self.feed = None
            self._start_feed(cfg.store)
            log.info("reload: `store` changed; new store client, breaker and stale state")
        else:
            memories = Memories(old.store, decisions, old.local, old.keys, old.targets, self.keysets,
                                old.memories.tokens)
        if self.supply is not None:
            self.supply.configure(cfg)
        new = Runtime(loaded, memories, workers=self.workers)
        self.proxy.runtime = self.runtime = new  # the atomic swap
        self.loaded = loaded
        self._server.header_timeout = cfg.limits.header_timeout
        self._server.max_connections = cfg.limits.max_connections
        task = asyncio.get_running_loop().create_task(self._retire(old, new, old_store))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: Runtime, new: Runtime, old_store: Any) -> None:
        await old.drained()
        await old.close(keep=new)
        old.decisions.flush(final=True)
        if old_store is not None:
            await old_store.close()

    async def _tick(self) -> None:
        seconds = 0
        while True:
            await asyncio.sleep(1.0)
            seconds += 1
            metrics.flush()  # (a worker's counts reach its parent's /metrics through its files)
            if self.runtime is not None:
                self.runtime.decisions.flush()
                if seconds % 30 == 0:
                    self.runtime.keys.prune(time.time())
                    await self.save_state()

    def state(self) -> dict[str, Any]:
        """Store and breaker state, for /readyz."""
        fault = self.chaos.active() if self.chaos is not None else None
        return {
            "store": self.loaded.config.store.url.split("://", 1)[0],
            **(self.store.describe() if hasattr(self.store, "describe") else {}),
            "breaker": NAMES[self.breaker.state] if self.breaker is not None else "closed",
            "chaos": fault.kind if fault is not None else None,
            "revocations": self.feed.state if self.feed is not None else None,
            "upstreams": {name: up.state() for name, up in self.runtime.upstreams.items()} if self.runtime else {},
        }

    def control(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Apply a control command; returns the reply (ok, or error with a message)."""
        op = cmd.get("op")
        if op == "chaos":
            assert self.chaos is not None
            try:
                self.chaos.set(*parse_fault(cmd))
            except ValueError as exc:
                return {"ok": False, "error": str(exc)}
            log.warning("chaos: store fault %s for %s (delay %s)", cmd.get("fault"), cmd.get("for", "30s"),
                        cmd.get("delay") or "-")
            return {"ok": True}
        if op == "chaos_clear":
            assert self.chaos is not None
            self.chaos.clear()
            log.warning("chaos: store fault cleared")
            return {"ok": True}
        if op == "jwks":  # a key set fetched (or failing to be) by whoever fetches it
            url = str(cmd.get("url"))
            keyset = self.keysets.get(url)
            if keyset is None:
                keyset = self.keysets[url] = KeySet(url, float(cmd.get("refresh") or 600.0))
            keyset.refetch = functools.partial(self.refetch, url)
            if cmd.get("jwks") is not None:
                try:
                    keyset.load(cmd["jwks"], float(cmd.get("fetched_at") or 0.0))
                except ValueError as exc:
                    return {"ok": False, "error": f"unusable key set: {exc}"}
            if cmd.get("failure"):
                keyset.failed(str(cmd["failure"]))
            # The key set's state next to the breakers': 0 while fresh, 2 once it is not (as an open breaker).
            BREAKER_STATE.labels(f"jwks:{URL(url).host}").set(0 if keyset.fresh(time.time()) else 2)
            return {"ok": True}
        if op == "revoke":
            digest, at = cmd.get("hash"), cmd.get("at")
            if not isinstance(digest, str) or not isinstance(at, (int, float)):
                return {"ok": False, "error": "revoke needs a hash and a time"}
            self.revoked(digest, float(at), "admin")
            return {"ok": True}
        if op == "test_stall":
            from . import testhooks

            client = getattr(self.store, "client", None)
            if not testhooks.ENABLED or client is None:
                return {"ok": False, "error": "test hooks are off, or the store is not Redis"}
            try:
                testhooks.stall_store_client(client, *testhooks.parse_stall(cmd))
            except ValueError as exc:
                return {"ok": False, "error": str(exc)}
            return {"ok": True}
        return {"ok": False, "error": f"unknown control op {op!r}"}

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish within shutdown_grace, close pools, store and log."""
        self.listening = False
        if self.proxy is not None:
            self.proxy.draining = True  # responses from now on say Connection: close
        self.lag.stop()
        if self.feed is not None:
            await self.feed.stop()
        if self.supply is not None:
            await self.supply.stop()
        closing = None
        if self.proxy is not None:
            # Open WebSocket tunnels get shutdown_grace like requests in flight, then a 1001 close both ways.
            closing = asyncio.get_running_loop().call_later(self.loaded.config.shutdown_grace,
                                                            self.proxy.tunnels.close_all)
        if self._runner is not None:
            await self._runner.cleanup()
        if closing is not None:
            closing.cancel()
        if self.proxy is not None:
            await self.proxy.tunnels.close()
        for task in list(self._retiring):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        metrics.flush()
        if self.runtime is not None:
            self.runtime.decisions.flush(final=True)
            await self.save_state()
            await self.runtime.close()
            for authorizer in self.runtime.memories.authorizers.values():
                await authorizer.close()
        if self.store is not None:
            await self.store.close()
        self.writer.close()

"""Processes: one serving process, or a supervising parent with N workers sharing the port.

- `workers: 1` runs everything in one process: the proxy listener and the admin listener.
- `workers: N > 1`: the parent validates the config once, starts N workers (`python -m proxy _worker`) that each
  bind the proxy port with SO_REUSEPORT, restarts a worker that dies, and serves the admin listener with metrics
  aggregated across workers. Each worker's stdin is its control channel from the parent (JSON lines) and its
  stdout the channel back; a worker whose stdin closes (the parent died) drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import msgspec
from aiohttp import web

from .config import ConfigError, LoadedConfig, load_text
from .config.values import redact_url, resolve_workers
from .jwks import JwksSupply
from .reload import ConfigCollector, ConfigState, watch_file
from .revocations import RevocationDesk
from .serving import Serving
from .statefiles import StateDir
from .store.cluster import is_cluster
from .store.sentinel import is_sentinel

log = logging.getLogger("failgate.server")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _install_stop_signals(stop: asyncio.Event, signals: tuple[int, ...]) -> None:
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)


# --- one process ----------------------------------------------------------------------------------------------

class SingleProcess:
    def __init__(self, state: ConfigState, state_dir: StateDir | None = None) -> None:
        assert state.current is not None
        self.config = state
        self.serving = Serving(state.current, reuse_port=False, state=state_dir)
        self.draining = False
        self._lock = asyncio.Lock()
        self.desk = _desk(state.current.config.store, state_dir, self._apply_revocation)

    async def _apply_revocation(self, digest: str, at: float) -> None:
        self.serving.control({"op": "revoke", "hash": digest, "at": at})

    async def revoke(self, digest: str) -> dict[str, Any]:
        return await self.desk.revoke(digest)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        listening = self.serving.listening
        return listening and not self.draining, {"draining": self.draining,
                                                 "workers": {"configured": 1, "ready": int(listening)},
                                                 "sha256": self.serving.loaded.sha256, **self.serving.state()}

    async def control(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return self.serving.control(cmd)

    async def reload(self) -> dict[str, Any]:
        async with self._lock:  # one at a time: the last one wins
            loaded = self.config.try_reload()
            if loaded is not None:
                await self.serving.reload(loaded)
            return _reload_result(self.config, loaded)


def _desk(store: Any, state_dir: StateDir | None, broadcast: Any) -> RevocationDesk:
    return RevocationDesk(store.url, store.key_prefix, store.connect_timeout, state_dir, broadcast)


def _reload_result(state: ConfigState, loaded: LoadedConfig | None) -> dict[str, Any]:
    assert state.current is not None
    if state.last_error is not None and loaded is None:
        return {"result": "rejected", "error": state.last_error, "sha256": state.current.sha256}
    return {"result": "accepted" if loaded is not None else "unchanged", "sha256": state.current.sha256}


async def _serve_admin(owner: Any, cfg: Any) -> web.AppRunner:
    from .admin import build_admin

    admin = web.AppRunner(build_admin(owner, cfg.admin.token, chaos=cfg.admin.chaos), access_log=None)
    await admin.setup()
    await web.TCPSite(admin, cfg.admin.host, cfg.admin.port).start()
    return admin


def settle_gc() -> None:
    """Called once a process serves. What exists by then (modules, the compiled config, pools) lives as long as the
    process: gc.freeze() takes it out of every later collection's walk. A request allocates hundreds of
    short-lived containers and almost never a cycle, so the youngest generation is collected every 10,000
    allocations instead of 700."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _stop_event() -> asyncio.Event:
    """SIGTERM/SIGINT set it. Installed before anything listens, so that a process that already answers
    `/readyz` never dies of the default SIGTERM action."""
    stop = asyncio.Event()
    _install_stop_signals(stop, (signal.SIGTERM, signal.SIGINT))
    return stop


async def _until_stopped(owner: Any, cfg: Any, stop: asyncio.Event) -> None:
    """Returns once `stop` is set; SIGHUP (and, with `watch`, a changed file) reloads meanwhile."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()

    def reload_soon() -> None:
        task = loop.create_task(owner.reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_soon)
    watcher = None
    if cfg.watch:
        async def changed() -> None:
            await owner.reload()

        watcher = loop.create_task(watch_file(owner.config.path, changed))
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    for task in list(tasks):
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_single(state: ConfigState, on_started: Any = None, state_dir: StateDir | None = None) -> None:
    assert state.current is not None
    cfg = state.current.config
    stop = _stop_event()
    owner = SingleProcess(state, state_dir)
    admin = await _serve_admin(owner, cfg)
    await owner.serving.start()
    owner.desk.start()
    settle_gc()
    if on_started is not None:
        on_started(owner.serving)
    log.info("failgate serving on %s:%d (admin %s:%d), config %s sha256 %s", cfg.listen.host, cfg.listen.port,
             cfg.admin.host, cfg.admin.port, state.current.source, state.current.sha256[:12])
    await _until_stopped(owner, cfg, stop)
    owner.draining = True
    log.info("draining (up to %ss)", cfg.shutdown_grace)
    await owner.desk.stop()
    await owner.serving.stop()
    await admin.cleanup()


# --- worker process -------------------------------------------------------------------------------------------

async def worker_main() -> None:
    """Entry of `python -m proxy _worker`: read `start` from stdin, serve, obey the parent, exit on EOF."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    _install_stop_signals(stop, (signal.SIGTERM,))
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def send(event: dict[str, Any]) -> None:
        sys.stdout.buffer.write(_encode(event) + b"\n")
        sys.stdout.buffer.flush()

    first = await reader.readline()
    if not first:
        return
    msg = _decode(first)
    loaded = load_text(msg["text"], msg["source"])
    state_dir = StateDir(msg["state_dir"]) if msg.get("state_dir") else None
    serving = Serving(loaded, reuse_port=True, workers=int(msg.get("workers", 1)), state=state_dir,
                      index=int(msg.get("index", 0)), fetch_keys=False)  # the parent fetches the key sets
    from . import targets
    from .store import cluster, sentinel
    from .store.breaker import NAMES

    # What the parent's /readyz shows of each worker: its breaker, targets taken out, Sentinel master, Cluster nodes
    # (told from the start: a Cluster's slot map is read while the worker starts).
    serving.notify = lambda state: send({"event": "state", "breaker": NAMES[state]})
    targets.on_change = lambda t: send({"event": "target", "upstream": t.settings.upstream, "target": t.label,
                                        "up": not t.out})
    sentinel.on_master = lambda at: send({"event": "master", "at": at})
    cluster.on_nodes = lambda nodes: send({"event": "nodes", "nodes": nodes})
    await serving.start()
    serving.refetch = lambda url: send({"event": "jwks_refetch", "url": url})
    settle_gc()
    send({"event": "ready", "pid": os.getpid(), "sha256": loaded.sha256})

    async def control() -> None:
        while True:
            line = await reader.readline()
            if not line:
                break  # the parent is gone
            cmd = _decode(line)
            if cmd.get("op") == "stop":
                break
            if cmd.get("op") == "reload":
                try:
                    new = load_text(cmd["text"], cmd["source"])
                except ConfigError as exc:  # the parent validated it; this would be a bug, not a bad file
                    log.error("reload refused in the worker: %s", exc)
                    continue
                await serving.reload(new)
                send({"event": "reloaded", "sha256": new.sha256})
                continue
            reply = serving.control(cmd)
            if not reply.get("ok"):
                log.warning("control message %r refused: %s", cmd.get("op"), reply.get("error"))
        stop.set()

    task = asyncio.create_task(control())
    await stop.wait()
    task.cancel()
    await serving.stop()


# --- supervising parent ---------------------------------------------------------------------------------------

class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self.breaker = "closed"
        self.out: set[tuple[str, str]] = set()  # (upstream, target) this worker has taken out
        self.master: str | None = None  # the Sentinel master it uses
        self.nodes: list[dict[str, Any]] = []  # the Cluster masters it uses, with its breakers
        self.sha256 = ""
        self.started_at = 0.0
        self.listener: asyncio.Task[None] | None = None


class Supervisor:
    def __init__(self, state: ConfigState, count: int, state_dir: StateDir | None = None) -> None:
        assert state.current is not None
        self.config = state
        self.state_dir = state_dir
        self.desk = _desk(state.current.config.store, state_dir, self._apply_revocation)
        self.jwks = JwksSupply(state_dir, self.broadcast)  # one fetcher per jwks_url for all workers
        self.loaded = state.current
        self._lock = asyncio.Lock()
        self.workers = [Worker(i) for i in range(count)]
        self.draining = False
        self.restarts = 0
        self._chaos: tuple[dict[str, Any], float] | None = None

    @property
    def chaos(self) -> str | None:
        if self._chaos is None or time.monotonic() >= self._chaos[1]:
            return None
        return str(self._chaos[0].get("fault"))

    def ready(self) -> tuple[bool, dict[str, Any]]:
        n = sum(w.ready for w in self.workers)
        ok = n > 0 and not self.draining
        breakers = sorted({w.breaker for w in self.workers if w.ready})
        return ok, {"draining": self.draining,
                    "workers": {"configured": len(self.workers), "ready": n, "restarts": self.restarts,
                                "sha256": [w.sha256 for w in self.workers]},
                    "sha256": self.loaded.sha256,
                    "store": self.loaded.config.store.url.split("://", 1)[0],
                    "breaker": breakers[0] if len(breakers) == 1 else ",".join(breakers) or "closed",
                    "chaos": self.chaos, "upstreams": self._upstreams(),
                    **({"master": ",".join(sorted({w.master for w in self.workers if w.ready and w.master})) or None}
                       if is_sentinel(self.loaded.config.store.url) else {}),
                    **({"nodes": self._nodes()} if is_cluster(self.loaded.config.store.url) else {})}

    def _nodes(self) -> list[dict[str, Any]]:
        """The Cluster's masters as the workers see them: a node's breaker is the worst any worker has."""
        worst = {"closed": 0, "half-open": 1, "open": 2}
        merged: dict[str, dict[str, Any]] = {}
        for w in self.workers:
            for n in w.nodes if w.ready else ():
                seen = merged.setdefault(n["node"], dict(n))
                seen["slots"] = n["slots"]
                if worst.get(n["breaker"], 0) > worst.get(seen["breaker"], 0):
                    seen["breaker"] = n["breaker"]
        return [merged[k] for k in sorted(merged)]

    def _upstreams(self) -> dict[str, Any]:
        """Each upstream's targets as the workers see them: up unless a worker has taken it out."""
        ready = [w for w in self.workers if w.ready]
        out: dict[str, Any] = {}
        for name, up in self.loaded.config.upstreams.items():
            targets = []
            for url in up.urls:
                label = redact_url(url)
                by = sum((name, label) in w.out for w in ready)
                targets.append({"url": label, "up": by == 0, "out_in_workers": by})
            out[name] = {"balance": up.balance, "targets": targets}
        return out

    async def control(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Validate here, then send to every worker (their stdin is their control channel)."""
        if cmd.get("op") == "chaos":
            from .store.chaos import parse_fault

            try:
                _, _, duration = parse_fault(cmd)
            except ValueError as exc:
                return {"ok": False, "error": str(exc)}
            # Remembered so that a worker started meanwhile (a restart) joins the rehearsal for what is left of it.
            self._chaos = (cmd, time.monotonic() + duration)
        elif cmd.get("op") == "chaos_clear":
            self._chaos = None
        self.broadcast(cmd)
        return {"ok": True}

    async def _apply_revocation(self, digest: str, at: float) -> None:
        self.broadcast({"op": "revoke", "hash": digest, "at": at})

    async def revoke(self, digest: str) -> dict[str, Any]:
        return await self.desk.revoke(digest)

    def broadcast(self, cmd: dict[str, Any]) -> None:
        line = _encode(cmd) + b"\n"
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None and w.proc.stdin is not None:
                with contextlib.suppress(ConnectionError):
                    w.proc.stdin.write(line)

    async def reload(self) -> dict[str, Any]:
        """Parse, validate and compile once here; then every worker swaps."""
        async with self._lock:
            loaded = self.config.try_reload()
            if loaded is not None:
                self.loaded = loaded
                self.jwks.configure(loaded.config)
                self.broadcast({"op": "reload", "source": loaded.source, "text": loaded.text})
            return _reload_result(self.config, loaded)

    async def spawn(self, w: Worker) -> None:
        w.ready = False
        w.started_at = time.monotonic()
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "_worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert w.proc.stdin is not None
        start = {"op": "start", "source": self.loaded.source, "text": self.loaded.text, "workers": len(self.workers),
                 "index": w.index, "state_dir": self.state_dir.path if self.state_dir is not None else None}
        w.proc.stdin.write(_encode(start) + b"\n")
        if self.chaos is not None and self._chaos is not None:
            cmd, until = self._chaos
            w.proc.stdin.write(_encode({**cmd, "for": f"{max(0.001, until - time.monotonic()):.3f}s"}) + b"\n")
        for cmd in self.jwks.last.values():  # the key sets held so far
            w.proc.stdin.write(_encode(cmd) + b"\n")
        await w.proc.stdin.drain()
        w.listener = asyncio.create_task(self._listen(w, w.proc))

    async def _listen(self, w: Worker, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            event = _decode(line)
            if event.get("event") in ("ready", "reloaded"):
                w.sha256 = event.get("sha256", "")
            if event.get("event") == "ready":
                w.ready = True
                w.breaker = "closed"
                w.out = set()
                log.info("worker %d ready (pid %d)", w.index, proc.pid)
            elif event.get("event") == "state":
                w.breaker = event.get("breaker", w.breaker)
            elif event.get("event") == "master":
                w.master = str(event.get("at"))
            elif event.get("event") == "nodes":
                w.nodes = list(event.get("nodes") or [])
            elif event.get("event") == "target":
                which = (str(event.get("upstream")), str(event.get("target")))
                if event.get("up"):
                    w.out.discard(which)
                else:
                    w.out.add(which)
            elif event.get("event") == "jwks_refetch":
                self.jwks.refetch(str(event.get("url")))
        code = await proc.wait()
        w.ready = False
        from .observe.metrics import mark_dead

        mark_dead(proc.pid)
        if self.draining:
            return
        log.error("worker %d (pid %d) exited with %s; restarting it", w.index, proc.pid, code)
        self.restarts += 1
        # Don't spin on a worker that dies at start.
        if time.monotonic() - w.started_at < 1.0:
            await asyncio.sleep(1.0)
        if not self.draining:
            await self.spawn(w)

    async def stop(self, grace: float) -> None:
        self.draining = True
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None and w.proc.stdin is not None:
                with contextlib.suppress(ConnectionError):
                    w.proc.stdin.write(_encode({"op": "stop"}) + b"\n")
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                await asyncio.wait_for(w.proc.wait(), grace + 5.0)
            except TimeoutError:
                log.error("worker %d did not stop within the grace period; killing it", w.index)
                w.proc.kill()
                await w.proc.wait()


def prepare_multiprocess_metrics() -> str:
    """A fresh, empty directory for prometheus-client's multiprocess files, exported to the workers."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
    else:
        path = tempfile.mkdtemp(prefix="failgate-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


async def run_supervisor(state: ConfigState, count: int, state_dir: StateDir | None = None) -> None:
    assert state.current is not None
    loaded = state.current
    cfg = loaded.config
    stop = _stop_event()
    sup = Supervisor(state, count, state_dir)
    sup.jwks.configure(cfg)  # the key sets first: workers start with them (or after a bounded wait, without)
    await sup.jwks.ready(JwksSupply.startup_wait(cfg))
    for w in sup.workers:
        await sup.spawn(w)
    admin = await _serve_admin(sup, cfg)
    sup.desk.start()
    log.info("failgate supervising %d workers on %s:%d (admin %s:%d), config %s sha256 %s", count,
             cfg.listen.host, cfg.listen.port, cfg.admin.host, cfg.admin.port, loaded.source, loaded.sha256[:12])
    await _until_stopped(sup, cfg, stop)
    log.info("draining %d workers (up to %ss)", count, cfg.shutdown_grace)
    await sup.desk.stop()
    await sup.jwks.stop()
    await sup.stop(cfg.shutdown_grace)
    await admin.cleanup()


def run(state: ConfigState, workers_override: int | None = None, state_dir: StateDir | None = None) -> None:
    import uvloop

    assert state.current is not None
    count = workers_override or resolve_workers(state.current.config.workers)
    from .observe.metrics import register_owned  # after PROMETHEUS_MULTIPROC_DIR is settled

    register_owned(ConfigCollector(state))
    if count == 1:
        uvloop.run(run_single(state, state_dir=state_dir))
        return
    metrics_dir = prepare_multiprocess_metrics()
    try:
        uvloop.run(run_supervisor(state, count, state_dir))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def run_worker() -> None:
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    uvloop.run(worker_main())

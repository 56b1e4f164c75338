"""Fail stale for Failgate's own config : load -> validate -> compile, then an atomic swap.

An invalid file never replaces the running config: the error is logged, counted and shown on /config. With
`--last-good PATH`, every accepted config is copied there (write, fsync, rename; mode 0600), and a start whose
file is invalid starts from that copy instead — loudly — and goes back to the real file at the next good reload.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .config import ConfigError, LoadedConfig, load_file
from .statefiles import write_private

log = logging.getLogger("failgate.reload")


class ConfigState:
    """The running config and its history; the owner of config metrics (exported by the admin process)."""

    def __init__(self, path: str, last_good: str | None) -> None:
        self.path = path
        self.last_good = last_good
        self.current: LoadedConfig | None = None
        self.last_error: str | None = None
        self.from_last_good = False
        self.counts = {"accepted": 0, "rejected": 0, "unchanged": 0}

    def load_initial(self) -> LoadedConfig:
        """The config to start from; raises ConfigError when neither the file nor a last-good copy is valid."""
        try:
            loaded = load_file(self.path)
        except ConfigError as exc:
            if self.last_good is None or not os.path.exists(self.last_good):
                raise
            try:
                copy = load_file(self.last_good)
            except ConfigError as copy_exc:
                raise ConfigError(exc.source, exc.path, f"{exc.message} (and the last-good copy is unusable: "
                                  f"{copy_exc})") from None
            log.error("CONFIG IS INVALID: %s — starting from the last good copy %s (sha256 %s); fix the file and "
                      "reload", exc, self.last_good, copy.sha256[:12])
            self.last_error = str(exc)
            self.from_last_good = True
            self.current = copy
            return copy
        self.current = loaded
        self._save(loaded)
        return loaded

    def try_reload(self) -> LoadedConfig | None:
        """Load the file again: the new config when it is valid and different, None otherwise."""
        try:
            loaded = load_file(self.path)
        except ConfigError as exc:
            self.counts["rejected"] += 1
            self.last_error = str(exc)
            log.error("reload rejected, still serving sha256 %s: %s",
                      self.current.sha256[:12] if self.current else "-", exc)
            return None
        self.last_error = None
        if self.current is not None and loaded.sha256 == self.current.sha256 and loaded.source == self.current.source:
            self.counts["unchanged"] += 1
            log.info("reload: %s is unchanged (sha256 %s)", self.path, loaded.sha256[:12])
            return None
        self.counts["accepted"] += 1
        self.from_last_good = False
        self.current = loaded
        self._save(loaded)
        log.info("reload accepted: %s sha256 %s", self.path, loaded.sha256[:12])
        return loaded

    def _save(self, loaded: LoadedConfig) -> None:
        if self.last_good is None:
            return
        try:
            write_private(self.last_good, loaded.text.encode())
        except OSError as exc:
            log.error("could not write the last-good copy %s: %s", self.last_good, exc)

    def describe(self) -> dict[str, Any]:
        return {"source": self.last_good if self.from_last_good else self.path,
                "from_last_good": self.from_last_good, "last_reload_error": self.last_error}


class ConfigCollector(Collector):
    """failgate_config_reloads_total{result} and failgate_config_info{sha256}, from the one process that owns
    the config: exactly the running config, no stale series, whatever the workers do."""

    def __init__(self, state: ConfigState) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        reloads = CounterMetricFamily("failgate_config_reloads", "Config reloads by result", labels=["result"])
        for result, n in self.state.counts.items():
            reloads.add_metric([result], n)
        yield reloads
        info = GaugeMetricFamily("failgate_config_info", "The running config (1)", labels=["sha256"])
        if self.state.current is not None:
            info.add_metric([self.state.current.sha256], 1)
        yield info
        yield GaugeMetricFamily("failgate_config_from_last_good", "1 while the running config is the last-good copy "
                                "(the file failed to load at start and has not been fixed and reloaded since)",
                                value=1 if self.state.from_last_good else 0)


async def watch_file(path: str, trigger: Callable[[], Awaitable[None]], interval: float = 1.0) -> None:
    """Poll the file (mtime, size, inode) and call `trigger` when it changes; a removed file is a change too
    (the reload then fails and is rejected)."""
    def stamp() -> tuple[float, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime, st.st_size, st.st_ino)

    last = stamp()
    while True:
        await asyncio.sleep(interval)
        now = stamp()
        if now != last:
            last = now
            await asyncio.sleep(0.05)  # let an editor finish writing
            last = stamp()
            await trigger()

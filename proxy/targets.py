"""An upstream's targets: which one a request goes to, and which ones are out (passive health).

Each target has its own pool of keep-alive connections (pool.py) and its own health, kept across a reload while its
URL and connection settings do not change (so a reload neither drops warm connections nor re-admits a target it
took out).

Balancing: `round_robin` takes the targets in turn; `least_request` takes the one with the fewest requests in
flight in this process (ties in turn). A target that is out is skipped.

Passive health: `eject.failures` consecutive gateway failures — it could not be connected to, it closed or reset
the connection before a response, it did not answer in time, or it answered 502, 503 or 504 — take a target out
for `eject.for`. An application's own answers (a 500 among them) are answers, not failures, and clear the count.
Never more than half of an upstream's targets are out at once: past that, a failing target keeps its traffic
(every backend failing is an outage to see, not one to hide by sending everything to one survivor). A target
back from being out is on probation: its first gateway failure takes it out again, its first answer clears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import NamedTuple

from aiohttp import BasicAuth
from yarl import URL

from .config.values import redact_url
from .observe.metrics import UPSTREAM_TARGET_UP
from .pool import Origin, Pool

log = logging.getLogger("failgate.upstream")
# Told of every target taken out or put back (a worker tells its parent, whose /readyz shows every worker's view).
on_change: Callable[[Target], None] | None = None


class Settings(NamedTuple):
    """What a target's connection pool depends on: a change means a new pool (and fresh health)."""

    upstream: str
    url: str
    connect_timeout: float
    tls_verify: bool


class Target:
    """One target URL of an upstream: its connection pool, its requests in flight, its health."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        url = URL(settings.url)
        self.label = redact_url(settings.url)  # as metrics, /readyz and logs show it
        self.origin = Origin.of(url)
        self.host_header = self.origin.host_header  # what Host says unless preserve_host
        self.authorization = BasicAuth(url.user or "", url.password or "").encode() if url.user is not None else None
        self._base_url = f"{url.scheme}://{self.host_header}{url.raw_path.rstrip('/')}"
        self.base_path = url.raw_path.rstrip("/")  # what a request's path is appended to
        self._pool: Pool | None = None
        self.in_flight = 0
        self.failures = 0  # consecutive gateway failures
        self.out = False  # ejected: skipped by the balancer until `readmit`
        self._readmit: asyncio.TimerHandle | None = None
        self._up = UPSTREAM_TARGET_UP.labels(settings.upstream, self.label)
        self._up.set(1)

    def url_for(self, path_qs: str) -> URL:
        return URL(self._base_url + path_qs, encoded=True)

    @property
    def pool(self) -> Pool:
        # Created lazily, on the running loop.
        if self._pool is None:
            self._pool = Pool.to(self.origin, self.settings.tls_verify, self.settings.connect_timeout)
        return self._pool

    async def close(self) -> None:
        if self._readmit is not None:
            self._readmit.cancel()
            self._readmit = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def forget(self) -> None:
        """No longer shown in metrics (removed from the config)."""
        with contextlib.suppress(KeyError):
            UPSTREAM_TARGET_UP.remove(self.settings.upstream, self.label)

    def eject(self, seconds: float) -> None:
        self.out = True
        self.failures = 0
        self._up.set(0)
        self._readmit = asyncio.get_running_loop().call_later(seconds, self.readmit)
        if on_change is not None:
            on_change(self)

    def readmit(self) -> None:
        self._readmit = None
        self.out = False
        self.failures = -1  # probation: the next gateway failure takes it out again
        self._up.set(1)
        log.warning("upstream %s: target %s back in rotation", self.settings.upstream, self.label)
        if on_change is not None:
            on_change(self)

    def state(self) -> dict[str, object]:
        return {"url": self.label, "up": not self.out, "in_flight": self.in_flight}


class Balancer:
    """Picks a target for each request and keeps the count of their gateway failures."""

    def __init__(self, upstream: str, targets: list[Target], balance: str, eject_failures: int,
                 eject_for: float) -> None:
        self.upstream = upstream
        self.targets = targets
        self.least_request = balance == "least_request"
        self.eject_failures = eject_failures
        self.eject_for = eject_for
        self.max_out = len(targets) // 2
        self._single = targets[0] if len(targets) == 1 else None
        self._next = 0

    def pick(self, exclude: Target | None = None) -> Target | None:
        """The target for a request; None when every target but `exclude` is out."""
        single = self._single
        if single is not None:
            return single if exclude is None else None
        targets = self.targets
        n = len(targets)
        start = self._next
        if not self.least_request:
            for i in range(n):
                at = (start + i) % n
                t = targets[at]
                if not t.out and t is not exclude:
                    self._next = at + 1 if at + 1 < n else 0  # the turn after the one taken: skipped ones add none
                    return t
            return None
        self._next = start + 1 if start + 1 < n else 0
        best: Target | None = None
        for i in range(n):
            t = targets[(start + i) % n]
            if not t.out and t is not exclude and (best is None or t.in_flight < best.in_flight):
                best = t
        return best

    def answered(self, target: Target) -> None:
        if target.failures:
            target.failures = 0

    def failed(self, target: Target, why: str) -> None:
        """A gateway failure of `target`: out after `eject_failures` in a row (1 on probation), unless half the
        targets are out already."""
        if target.out or self._single is not None:
            return
        probation = target.failures < 0
        target.failures = 1 if probation else target.failures + 1
        if probation or target.failures >= self.eject_failures:
            if sum(t.out for t in self.targets) >= self.max_out:
                return  # never more than half: it keeps its traffic
            target.eject(self.eject_for)
            log.warning("upstream %s: target %s out for %gs after %s%s", self.upstream, target.label,
                        self.eject_for, why, " (on probation)" if probation else
                        f" ({self.eject_failures} gateway failures in a row)")

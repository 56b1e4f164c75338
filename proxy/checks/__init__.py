"""Check kinds: each one module — its compiled config, its plan, its decide, its stale memory."""

from __future__ import annotations

from typing import Any


class CheckKind:
    """What every check kind knows: its route, its config, its fail mode, and when a `closed` refusal may be
    tried again (`breaker.open_for`)."""

    name = ""
    remote = False  # True: a dependency of its own (an authorizer), called concurrently with the store

    def __init__(self, route: str, cfg: Any, retry_after: float) -> None:
        assert cfg.on_store_error is not None  # validation requires it (or its default)
        self.route = route
        self.cfg = cfg
        self.mode: str = cfg.on_store_error
        self.retry_after = retry_after

"""The values that flow through the check pipeline: a check's Verdict and the Basis it was reached on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Basis = Literal["checked", "open", "closed", "stale"]
Reason = Literal["timeout", "unavailable", "error", "breaker_open"]


@dataclass(slots=True)
class Verdict:
    check: str  # "auth" | "rate_limit"
    allow: bool
    basis: Basis = "checked"
    status: int = 200  # the response status when denied
    code: str = ""  # the error code of a denial (SPEC §8)
    detail: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)  # sent on the response, allowed or not
    reason: Reason | None = None  # why the store could not answer (degraded verdicts only)
    age: float | None = None  # seconds, stale only
    fallback: str | None = None  # stale had nothing and stale_fallback applied

    @property
    def degraded(self) -> bool:
        return self.basis != "checked"

    def tag(self) -> str:
        """This verdict as one RFC 8941 list item of the degraded header."""
        item = f"{self.check};mode={self.basis};reason={self.reason}"
        if self.age is not None:
            item += f";age={int(self.age)}"
        if self.fallback is not None:
            item += f";fallback={self.fallback}"
        return item

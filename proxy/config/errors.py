"""The one error type config loading raises: it always names the file, the path inside it and what was wrong."""

from __future__ import annotations


class ConfigError(Exception):
    def __init__(self, source: str, path: str, message: str) -> None:
        self.source = source
        self.path = path
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.path:
            return f"{self.source}: {self.path}: {self.message}"
        return f"{self.source}: {self.message}"


def join_path(parent: str, key: str | int) -> str:
    """`routes` + 2 -> `routes[2]`; `routes[2]` + `auth` -> `routes[2].auth`."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key

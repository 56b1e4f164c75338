"""Small value helpers shared by the config and the running program: how many workers `auto` means, whether a
host is loopback, a URL with its passwords hidden."""

from __future__ import annotations

import ipaddress
import os
import re

_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def resolve_workers(workers: int | str) -> int:
    return (os.cpu_count() or 1) if workers == "auto" else int(workers)


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_PASSWORD_IN_URL = re.compile(r"(//[^:/@]*:)[^@/]*@")
_PASSWORD_PARAM = re.compile(r"([?&][a-z_]*password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`redis://:secret@host/0?password=x` -> `redis://:***@host/0?password=***`: the userinfo password and every
    `…password=` query parameter, for messages, /config, logs and `failgate check`."""
    return _PASSWORD_PARAM.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***@", url))

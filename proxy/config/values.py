"""Small value helpers shared by the config and the running program: how many workers `auto` means, whether a
host is loopback, a URL with its passwords hidden."""

from __future__ import annotations

import ipaddress
import math
import os
import re

_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def resolve_workers(workers: int | str, cgroup: str = "/sys/fs/cgroup") -> int:
    """`auto`: the CPUs this process may use — its affinity, and in a container its CPU quota (cgroup v2
    `cpu.max`, or v1 `cpu.cfs_quota_us`), rounded up: a container limited to 2 CPUs on a 64-core host gets 2."""
    if workers != "auto":
        return int(workers)
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cpu_quota(cgroup)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cpu_quota(root: str) -> float | None:
    """CPUs allowed by the cgroup quota, or None when there is none."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:  # cgroup v2: "<quota> <period>" or "max <period>"
            quota, _, period = f.read().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:  # cgroup v1
            quota_us = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def port_in_use(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on — taken by another process, even one listening with SO_REUSEPORT
    (a second Failgate on the same port would otherwise start and silently take half the traffic) — or None."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            return f"{host}:{port}: {exc.strerror or exc}"
    return None


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

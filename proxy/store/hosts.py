"""The part of a Sentinel or Cluster store URL they share: `[user:pass@]host:port,host:port,…`."""

from __future__ import annotations

from urllib.parse import unquote


def userinfo_and_hosts(netloc: str, what: str, default_port: int | None = None,
                       ) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """(username, password, [(host, port), …]); ValueError naming `what` the hosts are. Without `default_port`
    every host needs its port."""
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, pw = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(pw) or None
    found = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep and default_port is not None:
            host, port = item.strip(), str(default_port)
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected {what} as host:port, comma-separated; got {item!r}")
        found.append((host, int(port)))
    return username, password, found

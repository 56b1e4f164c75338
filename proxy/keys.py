"""`failgate keys add | revoke | list`: API keys in the config's store. Only the SHA-256 of a key is stored;
the key itself is printed once, at `add`, and never again."""

from __future__ import annotations

import re
import secrets
import sys
import time
from typing import Any

import msgspec
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from .checks.memo import Record
from .config import LoadedConfig
from .config.schema import parse_duration
from .config.values import redact_url
from .keyspace import BUCKETS, digest_in, digest_of, epoch_key, record_key, record_pattern
from .revocations import cluster_revocation, revoke_commands
from .store.cluster import is_cluster
from .store.cluster import parse as parse_cluster
from .store.sentinel import is_sentinel, sync_master

_encode = msgspec.json.Encoder().encode
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{6,63}$")


class KeysError(Exception):
    """A message for the user; the CLI prints it and exits 1."""


def new_key() -> str:
    """256 bits, URL-safe, and never starting with `-`: a command line would take such a key for an option
    (`failgate keys revoke -Xy…` fails; one key in 64 would)."""
    while True:
        key = secrets.token_urlsafe(32)
        if not key.startswith("-"):
            return key


def _client(loaded: LoadedConfig) -> redis.Redis:
    url = loaded.config.store.url
    if url.startswith("memory://"):
        raise KeysError(f"{loaded.source}: store.url is memory://, which lives inside the running proxy process; "
                        "`failgate keys` cannot reach it. Use a redis:// store, or `failgate demo`, which seeds "
                        "a demo key at start and prints it.")
    if is_sentinel(url):
        return sync_master(url, 2.0, retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
    if is_cluster(url):
        seeds, username, password, tls = parse_cluster(url)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds], username=username,  # type: ignore[return-value]
                            password=password, ssl=tls, socket_timeout=2.0, socket_connect_timeout=2.0)
    return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                retry=Retry(NoBackoff(), 0), retry_on_timeout=False)


def _replicated(loaded: LoadedConfig, client: redis.Redis) -> None:
    """With Sentinel, a write the master acknowledged is lost if the master dies before a replica has it: wait
    (up to 1 s, within the client's 2 s socket timeout) until one replica does, and say so when none did."""
    if not is_sentinel(loaded.config.store.url):
        return
    if int(client.execute_command("WAIT", 1, 1000)) < 1:
        print("failgate keys: written to the master, but no replica confirmed it within 1s; a failover now could "
              "lose it (run the command again once the replicas are back)", file=sys.stderr)


def _bucket_markers(client: redis.Redis, prefix: str) -> None:
    """A Cluster store's 256 epoch markers, those still missing (one pipelined write per node)."""
    now = str(int(time.time()))
    pipe = client.pipeline(transaction=False)
    for bucket in BUCKETS:
        pipe.set(epoch_key(prefix, bucket), now, nx=True)
    pipe.execute()


def _run(loaded: LoadedConfig, fn: Any) -> Any:
    client = _client(loaded)
    try:
        return fn(client)
    except redis.exceptions.RedisError as exc:
        where = redact_url(loaded.config.store.url)
        raise KeysError(f"cannot use the store at {where}: {exc}") from None
    finally:
        client.close()


def add(loaded: LoadedConfig, principal: str, scopes: list[str], expires: str | None,
        plan: str | None = None) -> tuple[str, str]:
    """Store a new key's record; returns (key, digest)."""
    expires_at = None
    if expires:
        try:
            expires_at = time.time() + parse_duration(expires)
        except ValueError as exc:
            raise KeysError(f"--expires: {exc}") from None
    key = new_key()
    digest = digest_of(key)
    prefix = loaded.config.store.key_prefix
    if plan is not None and not re.match(r"^[a-z0-9_-]{1,32}$", plan):
        raise KeysError(f"--plan: a plan name is 1-32 of a-z, 0-9, '_' and '-', got {plan!r}")
    record = Record(principal=principal, scopes=tuple(scopes), expires_at=expires_at, plan=plan)

    bucketed = is_cluster(loaded.config.store.url)

    def write(client: redis.Redis) -> None:
        if bucketed:  # every bucket's marker, then the record: both of one bucket live in one slot
            _bucket_markers(client, prefix)
            client.set(record_key(prefix, digest, True), _encode(record))
            return
        pipe = client.pipeline(transaction=True)
        pipe.set(epoch_key(prefix), str(int(time.time())), nx=True)
        pipe.set(record_key(prefix, digest), _encode(record))
        pipe.execute()
        _replicated(loaded, client)

    _run(loaded, write)
    return key, digest


def revoke(loaded: LoadedConfig, key_or_hash: str) -> str:
    """Revoke by the key itself, its 64-hex hash, or a unique prefix of the hash (as `keys list` shows it): the
    record is deleted, and the hash logged and published so every Failgate process refuses it — also during a
    later store outage, from its memory."""
    prefix = loaded.config.store.key_prefix

    bucketed = is_cluster(loaded.config.store.url)

    def write(client: redis.Redis) -> str:
        digest = _resolve(client, prefix, key_or_hash, bucketed)
        if not client.exists(record_key(prefix, digest, bucketed)):
            raise KeysError(f"no key with hash {digest[:12]}… in the store")
        if bucketed:
            for method, args in cluster_revocation(prefix, digest, time.time()):
                getattr(client, method)(*args)
            return digest
        pipe = client.pipeline(transaction=True)
        revoke_commands(pipe, prefix, digest, time.time())
        pipe.execute()
        _replicated(loaded, client)
        return digest

    return str(_run(loaded, write))


def _resolve(client: redis.Redis, prefix: str, value: str, bucketed: bool = False) -> str:
    if _HEX64.match(value):
        return value
    if _HEX_PREFIX.match(value):
        matches = [digest_in(prefix, name.decode())
                   for name in client.scan_iter(match=record_pattern(prefix, value, bucketed), count=1000)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise KeysError(f"hash prefix {value} is ambiguous: {len(matches)} keys start with it; give more of it")
    return digest_of(value)  # the key itself


def list_keys(loaded: LoadedConfig) -> list[tuple[str, Record | None]]:
    prefix = loaded.config.store.key_prefix

    bucketed = is_cluster(loaded.config.store.url)

    def read(client: redis.Redis) -> list[tuple[str, Record | None]]:
        out: list[tuple[str, Record | None]] = []
        for name in client.scan_iter(match=record_pattern(prefix, bucketed=bucketed), count=500):
            raw = client.get(name)
            digest = digest_in(prefix, name.decode())
            try:
                out.append((digest, msgspec.json.decode(raw, type=Record) if raw else None))
            except (msgspec.DecodeError, msgspec.ValidationError):
                out.append((digest, None))
        return sorted(out, key=lambda item: (item[1].principal if item[1] else "", item[0]))

    return list(_run(loaded, read))


def migrate(loaded: LoadedConfig) -> int:
    """Move records written in the single-node layout (`<prefix>apikey:<hash>`, e.g. copied over from a single
    Redis) to the Cluster's bucketed one, writing every bucket's marker; returns how many moved."""
    if not is_cluster(loaded.config.store.url):
        raise KeysError(f"{loaded.source}: store.url is not a redis+cluster:// store; the single-node layout is "
                        "what other stores use, there is nothing to migrate")
    prefix = loaded.config.store.key_prefix

    def move(client: redis.Redis) -> int:
        _bucket_markers(client, prefix)
        moved = 0
        for name in list(client.scan_iter(match=record_pattern(prefix), count=1000)):
            text = name.decode()
            digest = digest_in(prefix, text)
            if text.startswith(prefix + "apikey:{") or not _HEX64.match(digest):
                continue  # already bucketed
            raw = client.get(name)
            if raw is not None:
                client.set(record_key(prefix, digest, True), raw)
            client.delete(name)
            moved += 1
        return moved

    return int(_run(loaded, move))


def format_list(items: list[tuple[str, Record | None]]) -> str:
    if not items:
        return "no API keys in the store"
    lines = [f"{'principal':<24} {'scopes':<32} {'plan':<12} {'expires':<20} hash"]
    for digest, rec in items:
        if rec is None:
            lines.append(f"{'(malformed record)':<24} {'':<32} {'':<12} {'':<20} {digest[:12]}")
            continue
        expiry = "never" if rec.expires_at is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(rec.expires_at))
        lines.append(f"{rec.principal:<24} {','.join(rec.scopes) or '-':<32} {rec.plan or '-':<12} {expiry:<20} "
                     f"{digest[:12]}")
    return "\n".join(lines)

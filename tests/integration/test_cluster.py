"""Redis Cluster: three masters and three replicas as real processes behind the real proxy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from proxy.checks.ratelimit import subject_hash
from proxy.config import load_file
from proxy.keys import add, migrate, revoke
from proxy.keyspace import digest_of, record_key
from tests.cluster_set import ClusterSet
from tests.helpers import ProxyProcess, Upstream, config_text, raw_request, until

pytestmark = pytest.mark.slow

ROUTES = """\
- name: pay
  match: {path: /pay, prefix: true}
  upstream: api
  auth: {type: api_key, on_store_error: closed}
- name: exact
  match: {path: /exact, prefix: true}
  upstream: api
  rate_limit: {limit: 5, per: 1h, algorithm: fixed_window, key: "header:X-Client", on_store_error: closed}
- name: load
  match: {path: /load, prefix: true}
  upstream: api
  rate_limit: {limit: 1000000000, per: 1h, key: "header:X-Client", on_store_error: closed}
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSet]:
    c = ClusterSet(tmp_path / "cluster").start()
    yield c
    c.stop()


def write_config(tmp_path: Path, upstream: Upstream, cluster: ClusterSet, workers: int = 1) -> Path:
    cfg = tmp_path / "failgate.yaml"
    cfg.write_text(config_text(upstream.url, ROUTES, extra=f"workers: {workers}\nstore: {{url: '{cluster.url}', "
                               "timeout: 100ms, connect_timeout: 300ms, breaker: {failures: 3, open_for: 500ms}}\n"))
    return cfg


def slot_of_client(value: str, route: str = "exact") -> int:
    """The slot of a route's counter for `X-Client: value` (its hash tag)."""
    return key_slot(f"{{{route}:h:{subject_hash(value)}}}".encode())


async def started(cfg: Path) -> ProxyProcess:
    p = ProxyProcess(cfg).start()
    await p.wait_ready()
    await until("the slot map is read", lambda: _nodes(p, 3))
    return p


async def _nodes(p: ProxyProcess, n: int) -> bool:
    return len((await p.readyz()).get("nodes", [])) == n


@pytest.mark.parametrize("workers", [1, 2])
async def test_limits_are_exact_on_every_master(tmp_path: Path, upstream: Upstream, cluster: ClusterSet,
                                                workers: int) -> None:
    p = await started(write_config(tmp_path, upstream, cluster, workers))
    try:
        clients = [f"client-{i}" for i in range(30)]
        masters = {cluster.master_of_slot(slot_of_client(c)).port for c in clients}
        assert len(masters) == 3  # the counters are spread over all three
        for c in clients:
            statuses = [(await raw_request(p.port, "/exact", headers={"X-Client": c})).status for _ in range(7)]
            assert statuses == [200] * 5 + [429] * 2, (c, statuses)
        assert all(n.calls("evalsha") + n.calls("eval") > 0 for n in cluster.nodes[:3])
        state = await p.readyz()
        assert sorted(n["slots"] for n in state["nodes"]) == [5461, 5461, 5462]
        assert {n["breaker"] for n in state["nodes"]} == {"closed"}
    finally:
        p.stop()
    assert "Traceback" not in p.log()


async def test_api_keys_in_every_bucket_and_their_revocation(tmp_path: Path, upstream: Upstream,
                                                            cluster: ClusterSet) -> None:
    cfg = write_config(tmp_path, upstream, cluster)
    loaded = load_file(str(cfg))
    keys = [add(loaded, f"user-{i}", [], None)[0] for i in range(24)]
    assert len({cluster.master_of_slot(key_slot(record_key("failgate:", digest_of(k), True).encode())).port
                for k in keys}) == 3
    p = await started(cfg)
    try:
        for k in keys:
            assert (await raw_request(p.port, "/pay", headers={"Authorization": k})).status == 200
        assert (await raw_request(p.port, "/pay", headers={"Authorization": "no-such-key-0123456789"})).status == 401
        published = await p.metric("failgate_revocations_total", 'source="publish"')
        revoke(loaded, keys[0])
        assert (await raw_request(p.port, "/pay", headers={"Authorization": keys[0]})).status == 401
        # published on one node, it reached the proxy subscribed on another (or the same): the channel works
        await until("the revocation was heard on the channel",
                    lambda: p.metric_above("failgate_revocations_total", 'source="publish"', published))
        assert (await raw_request(p.port, "/pay", headers={"Authorization": keys[1]})).status == 200
    finally:
        p.stop()
    assert "Traceback" not in p.log()


async def test_a_key_in_each_of_the_256_buckets_is_found(tmp_path: Path, upstream: Upstream,
                                                         cluster: ClusterSet) -> None:
    """One key per bucket (records written in the bucketed layout, as `failgate keys add` writes them): every
    bucket's record and marker are read from the master that holds both."""
    import secrets

    from redis.cluster import ClusterNode, RedisCluster

    cfg = write_config(tmp_path, upstream, cluster)
    add(load_file(str(cfg)), "first", [], None)  # (every bucket's marker)
    keys: dict[str, str] = {}
    while len(keys) < 256:
        k = secrets.token_urlsafe(32)
        keys.setdefault(digest_of(k)[:2], k)
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", cluster.nodes[0].port)])
    for bucket, k in keys.items():
        client.set(record_key("failgate:", digest_of(k), True), f'{{"principal":"b-{bucket}","scopes":[]}}')
    client.close()
    p = await started(cfg)
    try:
        for k in keys.values():
            r = await raw_request(p.port, "/pay", headers={"Authorization": k})
            assert (r.status, r.headers.get("failgate-degraded")) == (200, None)
    finally:
        p.stop()


async def test_a_dead_master_fails_only_its_own_slots(tmp_path: Path, upstream: Upstream,
                                                     cluster: ClusterSet) -> None:
    p = await started(write_config(tmp_path, upstream, cluster))
    try:
        clients = [f"load-{i}" for i in range(24)]
        victim = cluster.master_of_slot(slot_of_client(clients[0], "load"))
        on_victim = {c for c in clients if cluster.master_of_slot(slot_of_client(c, "load")) is victim}
        assert on_victim and len(on_victim) < len(clients)
        seen: list[tuple[float, str, int, str]] = []  # (sent, client, status, tag)
        stop = asyncio.Event()

        async def client(name: str) -> None:
            while not stop.is_set():
                sent = time.monotonic()
                # a limit far away: every checked answer is 200, every degraded one the closed mode's 503
                r = await raw_request(p.port, "/load", headers={"X-Client": name})
                seen.append((sent, name, r.status, r.headers.get("failgate-degraded", "")))

        load = [asyncio.create_task(client(c)) for c in clients]
        await until("traffic flows", lambda: len(seen) > 300)
        killed = time.monotonic()
        victim.kill()
        breakers: dict[str, set[str]] = {}

        async def watched() -> bool:  # every node's breaker as /readyz shows it, until a replica took over
            for n in (await p.readyz()).get("nodes", []):
                breakers.setdefault(n["node"], set()).add(n["breaker"])
            return cluster.ok()

        await until("a replica took over its slots", watched, timeout=30)
        victim_breaker_opened = "open" in breakers.get(f"127.0.0.1:{victim.port}", set())
        other_breakers = set().union(*(b for node, b in breakers.items() if node != f"127.0.0.1:{victim.port}"))

        def back() -> bool:
            return any(sent > killed + 0.5 and c in on_victim and not tag for sent, c, _, tag in seen[-200:])

        await until("checked answers for its slots again", back, timeout=30)
        stop.set()
        await asyncio.gather(*load)
        # the dead master's calls are counted as what they were, not hidden in the requests' round trips
        failed = [await p.metric("failgate_store_operations_total", f'result="{r}"')
                  for r in ("timeout", "unavailable", "breaker_open")]
        assert sum(failed) > 0 and await p.metric("failgate_store_operations_total", 'result="ok"') > 0
    finally:
        p.stop()
    assert "Traceback" not in p.log()
    assert victim_breaker_opened and other_breakers == {"closed"}  # only the dead master's breaker opened
    assert {status for _, _, status, _ in seen} <= {200, 429, 503}
    others = [(status, tag) for sent, c, status, tag in seen if c not in on_victim and sent > killed]
    assert others and [tag for _, tag in others if tag] == []  # the other masters' checks never degraded
    degraded = [tag for sent, c, _, tag in seen if c in on_victim and sent > killed and tag]
    assert degraded and all(tag.startswith("rate_limit;mode=closed;reason=") for tag in degraded)


async def test_keys_migrate_moves_records_from_the_single_node_layout(tmp_path: Path, upstream: Upstream,
                                                                     cluster: ClusterSet) -> None:
    """Records copied from a single Redis (`failgate:apikey:<hash>`, one `failgate:epoch`) are moved to the
    bucketed layout; before that, a cluster lookup finds no record (401), after it the key works."""
    from redis.cluster import ClusterNode, RedisCluster

    cfg = write_config(tmp_path, upstream, cluster)
    loaded = load_file(str(cfg))
    old = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", cluster.nodes[0].port)])
    keys = [f"old-key-{i}-0123456789abcdef" for i in range(10)]
    for i, k in enumerate(keys):
        old.set(record_key("failgate:", digest_of(k)), f'{{"principal":"old-{i}","scopes":[]}}')
    old.set("failgate:epoch", "1")
    old.close()
    add(loaded, "new", [], None)  # (writes every bucket's marker)
    p = await started(cfg)
    try:
        assert (await raw_request(p.port, "/pay", headers={"Authorization": keys[0]})).status == 401
        assert migrate(loaded) == 10
        assert migrate(loaded) == 0  # nothing left in the old layout
        for k in keys:
            r = await raw_request(p.port, "/pay", headers={"Authorization": k})
            assert (r.status, r.headers.get("failgate-degraded")) == (200, None)
    finally:
        p.stop()


async def test_a_master_restarted_empty_is_a_store_error_for_its_buckets_not_a_401(
        tmp_path: Path, upstream: Upstream) -> None:
    cluster = ClusterSet(tmp_path / "cluster", failover=False).start()  # its replica must not take over
    try:
        cfg = write_config(tmp_path, upstream, cluster)
        loaded = load_file(str(cfg))
        keys = [add(loaded, f"user-{i}", [], None)[0] for i in range(24)]
        p = await started(cfg)
        try:
            def master(k: str) -> Any:
                return cluster.master_of_slot(key_slot(record_key("failgate:", digest_of(k), True).encode()))

            victim = master(keys[0])
            on_victim = [k for k in keys if master(k) is victim]
            elsewhere = [k for k in keys if master(k) is not victim]
            assert on_victim and elsewhere
            victim.restart()  # no persistence: back with nothing, still the master of its slots
            await until("the cluster is whole again", cluster.ok, timeout=30)
            for k in on_victim:  # its buckets' markers are gone: the store lost data, so the fail mode decides
                r = await raw_request(p.port, "/pay", headers={"Authorization": k})
                assert (r.status, r.headers.get("failgate-degraded", "").split(";")[:2]) == \
                    (503, ["auth", "mode=closed"]), r.headers
            for k in elsewhere:
                r = await raw_request(p.port, "/pay", headers={"Authorization": k})
                assert (r.status, r.headers.get("failgate-degraded")) == (200, None)
        finally:
            p.stop()
    finally:
        cluster.stop()


async def test_resharding_under_load_gives_no_wrong_answer(tmp_path: Path, upstream: Upstream,
                                                          cluster: ClusterSet) -> None:
    import shutil
    import subprocess

    p = await started(write_config(tmp_path, upstream, cluster))
    try:
        source, target = cluster.nodes[0], cluster.nodes[1]
        ids = [n.command("CLUSTER", "MYID").split(b"\r\n")[1].decode() for n in (source, target)]
        sequences: list[list[tuple[int, str]]] = []
        stop = asyncio.Event()

        async def counting(worker: int) -> None:  # 7 requests per fresh client on a limit of 5, over and over
            i = 0
            while not stop.is_set():
                seq = []
                for _ in range(7):
                    r = await raw_request(p.port, "/exact", headers={"X-Client": f"reshard-{worker}-{i}"})
                    seq.append((r.status, r.headers.get("failgate-degraded", "")))
                sequences.append(seq)
                i += 1

        load = [asyncio.create_task(counting(w)) for w in range(8)]
        await until("traffic flows", lambda: len(sequences) > 20)
        before = len(sequences)
        cli = shutil.which("redis-cli")
        assert cli
        done = await asyncio.to_thread(subprocess.run, [
            cli, "--cluster", "reshard", f"127.0.0.1:{source.port}", "--cluster-from", ids[0], "--cluster-to", ids[1],
            "--cluster-slots", "1500", "--cluster-yes"], capture_output=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        during = len(sequences) - before
        await until("traffic after the reshard", lambda: len(sequences) > before + during + 20)
        stop.set()
        await asyncio.gather(*load)
        # The map is read again on a MOVED: requests that reach the slots moved last make the map current.
        await until("the new slot map is read", lambda: _slots_after_traffic(p, [3961, 5461, 6962]))
    finally:
        p.stop()
    assert "Traceback" not in p.log()
    assert during > 0  # requests were checked while slots moved
    for seq in sequences:
        assert {status for status, _ in seq} <= {200, 429, 503}, seq  # never a 500
        assert sum(status == 200 for status, tag in seq if not tag) <= 5, seq  # never a sixth checked admission
        assert all(tag.startswith("rate_limit;mode=closed;") for status, tag in seq if status == 503), seq
    exact = sum(seq == [(200, "")] * 5 + [(429, "")] * 2 for seq in sequences)
    assert exact >= len(sequences) * 0.9, (exact, len(sequences))


async def _slots_after_traffic(p: ProxyProcess, counts: list[int]) -> bool:
    for i in range(50):
        await raw_request(p.port, "/load", headers={"X-Client": f"probe-{time.monotonic()}-{i}"})
    return sorted(n["slots"] for n in (await p.readyz()).get("nodes", [])) == counts


async def test_a_slot_being_migrated_is_followed_with_asking_and_a_split_key_set_is_a_store_error(
        cluster: ClusterSet) -> None:
    """A slot put into migration by hand: a key not yet on the source node answers ASK, which the store follows
    once with ASKING on the node that imports it; an operation whose keys are split between the two (TRYAGAIN)
    is that operation's error, and the source node's breaker stays closed — except a read of several keys (an API
    key's record and its bucket's marker), which is then made key by key, each where it is."""
    from proxy.store.cluster import ClusterStore
    from proxy.store.errors import StoreUnavailable
    from proxy.store.ops import GetOp, LimitsOp, RateOp, RateResult

    store = ClusterStore(cluster.url, timeout=1.0, connect_timeout=1.0, pool_size=2)
    try:
        await store.ready()
        moving = RateOp("fixed_window", "t:{moving}:a", 10, 60_000_000, 10)
        slot = key_slot(moving.key.encode())
        source = cluster.master_of_slot(slot)
        target = next(n for n in cluster.nodes[:3] if n is not source)
        ids = {n: n.command("CLUSTER", "MYID").split(b"\r\n")[1].decode() for n in (source, target)}
        stays, moves = "t:{moving}:s", "t:{moving}:m"  # two plain values, one of which is moved below
        for key, value in ((stays, "0"), (moves, "1")):
            assert source.command("SET", key, value).startswith(b"+OK")
        assert target.command("CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[source]).startswith(b"+OK")
        assert source.command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[target]).startswith(b"+OK")

        [answer] = await store.execute([moving])  # not on the source: ASK, then ASKING + the call on the target
        assert type(answer) is RateResult and answer.allowed and answer.remaining == 9
        assert target.calls("asking") >= 1

        kept = RateOp("fixed_window", "t:{moving}:b", 10, 60_000_000, 10)
        source.command("SET", kept.key, "0")  # one key of the pair still on the source, the other moved
        shape = tuple((o.algorithm, o.limit, o.window, o.burst, o.shadow) for o in (moving, kept))
        [split] = await store.execute([LimitsOp((moving, kept), shape)])
        assert type(split) is StoreUnavailable and split.reason == "error" and "TRYAGAIN" in split.detail
        assert source.command("MIGRATE", "127.0.0.1", str(target.port), moves, "0", "5000").startswith(b"+OK")
        [read] = await store.execute([GetOp(stays, moves)])  # one on the source, one on the target
        assert read == [b"0", b"1"]
        # none on the source: ASK, and then the target has only one of them
        [read] = await store.execute([GetOp("t:{moving}:none", moves)])
        assert read == [None, b"1"]
        assert {n["breaker"] for n in store.describe()["nodes"]} == {"closed"}
    finally:
        await store.close()

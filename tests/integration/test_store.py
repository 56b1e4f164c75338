"""The store boundary against a real redis-server and the embedded store: the same cases run against both."""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import AsyncIterator

import pytest

from benchmarks.faultproxy import FaultProxy
from proxy.checks import algorithms
from proxy.store import GetOp, RateOp, StoreUnavailable, resp
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from tests.helpers import until
from tests.redis_server import RedisServer

S = 1_000_000  # µs
T0 = 1_800_000_000 * S  # an aligned instant (a multiple of every window used below)


def redis_store(url: str, timeout: float = 0.5, pool_size: int = 4) -> RedisStore:
    return RedisStore(url, timeout=timeout, connect_timeout=0.5, pool_size=pool_size)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[MemoryStore | RedisStore]:
    if request.param == "memory":
        s: MemoryStore | RedisStore = MemoryStore()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = redis_store(server.url)
    yield s
    await s.close()


async def admit(store, op: RateOp) -> tuple:  # type: ignore[no-untyped-def,type-arg]
    (r,) = await store.execute([op])
    return r


async def test_fixed_window_admits_exactly_limit_per_aligned_window(store) -> None:  # type: ignore[no-untyped-def]
    op = RateOp("fixed_window", "t:fw", limit=3, window=10 * S, burst=3)
    results = [await admit(store, RateOp(**{**_fields(op), "now": T0 + i * S})) for i in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert [r.remaining for r in results] == [2, 1, 0, 0]
    assert results[3].retry_after == 7.0 and results[3].reset_after == 7.0
    # the last microsecond of the window is still in it; the next window starts fresh
    assert not (await admit(store, RateOp(**{**_fields(op), "now": T0 + 10 * S - 1}))).allowed
    r = await admit(store, RateOp(**{**_fields(op), "now": T0 + 10 * S}))
    assert r.allowed and r.remaining == 2 and r.reset_after == 10.0


async def test_sliding_window_weights_the_previous_window(store) -> None:  # type: ignore[no-untyped-def]
    base = {"algorithm": "sliding_window", "key": "t:sw", "limit": 10, "window": 10 * S, "burst": 10}
    for i in range(10):
        assert (await admit(store, RateOp(**base, now=T0 + i))).allowed
    r = await admit(store, RateOp(**base, now=T0 + 5 * S))
    assert not r.allowed
    # this window alone is full: wait 5 s for it to end, then 1 s more until its 10 weigh at most 9
    assert r.retry_after == 6.0
    expected = algorithms.sliding_window((T0 // (10 * S), 10, 0), T0 + 5 * S, 10, 10 * S)
    assert r.retry_after == expected.retry_after / 1e6
    # half way through the next window, the previous 10 weigh 5: five more fit, the sixth does not
    mid = T0 + 15 * S
    allowed = [(await admit(store, RateOp(**base, now=mid + i))).allowed for i in range(6)]
    assert allowed == [True] * 5 + [False]
    # two windows later nothing of it is left
    r = await admit(store, RateOp(**base, now=T0 + 30 * S))
    assert r.allowed and r.remaining == 9


async def test_gcra_allows_the_burst_then_one_per_interval(store) -> None:  # type: ignore[no-untyped-def]
    base = {"algorithm": "gcra", "key": "t:gcra", "limit": 10, "window": S, "burst": 5}
    rs = [await admit(store, RateOp(**base, now=T0)) for _ in range(6)]
    assert [r.allowed for r in rs] == [True] * 5 + [False]
    assert [r.remaining for r in rs[:5]] == [4, 3, 2, 1, 0]
    assert rs[5].retry_after == 0.1
    assert not (await admit(store, RateOp(**base, now=T0 + 100_000 - 1))).allowed
    r = await admit(store, RateOp(**base, now=T0 + 100_000))
    assert r.allowed and r.remaining == 0


async def test_keys_are_isolated(store) -> None:  # type: ignore[no-untyped-def]
    a = RateOp("fixed_window", "t:a", limit=1, window=10 * S, burst=1, now=T0)
    b = RateOp("fixed_window", "t:b", limit=1, window=10 * S, burst=1, now=T0)
    assert (await admit(store, a)).allowed
    assert not (await admit(store, a)).allowed
    assert (await admit(store, b)).allowed


async def test_a_read_of_several_keys_answers_each_in_order(store) -> None:  # type: ignore[no-untyped-def]
    # (an API key's record and the epoch marker are read in one command)
    (r,) = await store.execute([RateOp("gcra", "t:set", limit=1, window=S, burst=1, now=T0)])
    assert r.allowed  # t:set now holds the limit's state (whatever each store stores)
    many, one = await store.execute([GetOp("t:missing", "t:set", "t:other"), GetOp("t:set")])
    assert many[0] is None and many[1] is not None and many[1] == one and many[2] is None


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window", "gcra"])
async def test_redis_and_memory_give_identical_answers(redis_server: RedisServer, algorithm: str) -> None:
    rnd = random.Random(algorithm)
    mem, red = MemoryStore(), redis_store(redis_server.url)
    # A key's TTL runs in *real* time while this test's clock is pinned: with a 60 s window every TTL is seconds
    # long (gcra's is at least window / limit, 8.6 s), so how long the calls take on a loaded machine cannot
    # expire a key between two of them — except a fixed window's near its end, whose edge is stepped over.
    window = 60 * S
    seen: set[bool] = set()
    try:
        now = T0 + rnd.randrange(10 * window)
        for _ in range(400):
            now += 20 * rnd.choice([0, 1, 997, 50_000, 333_333, 2 * S])
            if algorithm == "fixed_window" and now % window > window - 5 * S:
                now += 10 * S  # (the unit tests cover the window edges of the arithmetic)
            op = RateOp(algorithm, f"t:same:{algorithm}", limit=7, window=window, burst=4, now=now)
            m, r = await admit(mem, op), await admit(red, op)
            assert m == r, (now, m, r)
            seen.add(m.allowed)
        assert seen == {True, False}  # both answers were compared
    finally:
        await red.close()


async def test_one_request_several_operations_one_round_trip(redis_server: RedisServer) -> None:
    redis_server.command("SET", "t:rec", "hello")
    s = redis_store(redis_server.url)
    try:
        got = await s.execute([GetOp("t:rec"), GetOp("t:missing"),
                               RateOp("gcra", "t:g", limit=1, window=S, burst=1, now=T0)])
        assert got[0] == b"hello" and got[1] is None and got[2].allowed
    finally:
        await s.close()


async def test_scripts_are_reloaded_after_script_flush(redis_server: RedisServer) -> None:
    s = redis_store(redis_server.url)
    try:
        op = RateOp("fixed_window", "t:flush", limit=5, window=10 * S, burst=5, now=T0)
        assert (await admit(s, op)).remaining == 4
        assert redis_server.command("SCRIPT", "FLUSH") == b"+OK\r\n"
        assert (await admit(s, op)).remaining == 3  # counted exactly once despite the NOSCRIPT round
        assert (await admit(s, op)).remaining == 2
    finally:
        await s.close()


async def test_script_reload_in_a_mixed_round_trip_puts_every_answer_in_its_place(redis_server: RedisServer) -> None:
    """Only the NOSCRIPT answers are sent again; the retried ones go back to their own positions."""
    redis_server.command("SET", "t:rec2", "record")
    s = redis_store(redis_server.url)
    hour = 3600 * S  # the store's own clock (the packed-once path); windows long enough not to roll over here
    ops = [GetOp("t:rec2"), RateOp("sliding_window", "t:mix:s", limit=5, window=hour, burst=5),
           GetOp("t:none"), RateOp("fixed_window", "t:mix:f", limit=7, window=hour, burst=7)]
    try:
        first = await s.execute(ops)
        assert first[0] == b"record" and first[2] is None
        assert first[1].remaining == 4 and first[3].remaining == 6
        assert redis_server.command("SCRIPT", "FLUSH") == b"+OK\r\n"
        again = await s.execute(ops)
        assert again[0] == b"record" and again[2] is None
        assert again[1].remaining == 3
        assert again[3].remaining == 5  # counted once more, not twice
        assert (await s.execute(ops))[3].remaining == 4
    finally:
        await s.close()


async def test_an_error_reply_is_reason_error_and_not_a_transport_failure(redis_server: RedisServer) -> None:
    redis_server.command("SET", "t:str", "not a hash")
    s = redis_store(redis_server.url)
    try:
        redis_server.command("SET", "t:ok", "fine")
        bad, good = await s.execute([RateOp("fixed_window", "t:str", limit=1, window=S, burst=1), GetOp("t:ok")])
        # the error is this operation's alone; the other operation of the same round trip got its answer
        assert isinstance(bad, StoreUnavailable) and bad.reason == "error" and bad.transport is False
        assert good == b"fine"
    finally:
        await s.close()


async def test_refused_connection_is_unavailable_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import free_port

    s = redis_store(f"redis://127.0.0.1:{free_port()}/0", timeout=5.0)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StoreUnavailable) as exc:
            await s.execute([GetOp("x")])
        assert exc.value.reason == "unavailable"
        assert loop.time() - started < 2.5  # did not wait for the 5 s timeout
    finally:
        await s.close()


async def test_redis_restarted_mid_run_recovers(redis_server: RedisServer) -> None:
    s = redis_store(redis_server.url)
    try:
        redis_server.command("SET", "t:k", "v1")
        assert await s.execute([GetOp("t:k")]) == [b"v1"]
        redis_server.restart()
        redis_server.command("SET", "t:k", "v2")
        outcomes = []
        for _ in range(20):
            try:
                outcomes.append(await s.execute([GetOp("t:k")]))
            except StoreUnavailable as exc:
                outcomes.append(exc.reason)
            if outcomes[-1] == [b"v2"]:
                break
            await asyncio.sleep(0.05)
        assert outcomes[-1] == [b"v2"]
        assert all(o in ("unavailable", [b"v2"]) for o in outcomes)
    finally:
        await s.close()


async def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(redis_server: RedisServer) -> None:
    n = 500
    for i in range(0, n, 100):
        redis_server.command("MSET", *[x for j in range(i, i + 100) for x in (f"t:v{j}", f"value-{j}")])
    s = redis_store(redis_server.url, pool_size=2)
    try:
        await s.execute([GetOp("warm-up")])
        writes = s.client.writes
        results = await asyncio.gather(*(s.execute([GetOp(f"t:v{i}")]) for i in range(n)))
        assert results == [[f"value-{i}".encode()] for i in range(n)]
        assert s.client.writes - writes == 1  # 500 requests in one loop turn: one write
    finally:
        await s.close()


async def test_an_answered_batch_is_not_kept_until_its_deadline(redis_server: RedisServer) -> None:
    s = redis_store(redis_server.url, timeout=30.0)  # a deadline that will not come during this test
    try:
        for i in range(20):  # 20 batches, one per loop turn
            await s.execute([GetOp(f"t:k{i}")])
        gc.collect()
        # Each batch's deadline goes once every reply is in: nothing holds a batch (its requests, its replies).
        assert [o for o in gc.get_objects() if type(o) is resp._Batch] == []
    finally:
        await s.close()


async def test_an_answered_batch_is_freed_without_the_collector(redis_server: RedisServer) -> None:
    # A batch lists its groups and each group pointed back at its batch: a cycle per request, freed only when the
    # collector ran (~7k instructions per rate-limited request in collections). Answered, nothing refers back.
    s = redis_store(redis_server.url, timeout=30.0)
    try:
        await s.execute([GetOp("t:warm-up")])
        gc.collect()
        gc.disable()
        for i in range(20):
            await s.execute([GetOp(f"t:k{i}")])
        left = [o for o in gc.get_objects() if type(o) in (resp._Batch, resp._Group)]
        assert left == []
    finally:
        gc.enable()
        await s.close()


async def test_sigstop_mid_traffic_then_every_later_answer_is_right(redis_server: RedisServer) -> None:
    n = 200
    redis_server.command("MSET", *[x for j in range(n) for x in (f"t:p{j}", f"pv-{j}")])
    s = redis_store(redis_server.url, timeout=0.2, pool_size=2)
    try:
        outcomes: list[tuple[float, str]] = []  # (when the call was made, its outcome)
        resumed: list[float] = []
        done = asyncio.Event()

        async def traffic(worker: int) -> None:
            i = worker
            loop = asyncio.get_running_loop()
            while not done.is_set():
                key = i % n
                sent = loop.time()
                try:
                    got = await s.execute([GetOp(f"t:p{key}"), RateOp("fixed_window", f"t:c{key}", 10**9, 60 * S, 1)])
                    assert got[0] == f"pv-{key}".encode(), (key, got)
                    outcomes.append((sent, "ok"))
                except StoreUnavailable as exc:
                    outcomes.append((sent, exc.reason))
                i += 17
                await asyncio.sleep(0.005)

        async def outage() -> None:
            await until("traffic flows", lambda: len(outcomes) >= 100)
            redis_server.pause()
            await until("the outage is seen", lambda: any(o == "timeout" for _, o in outcomes))
            redis_server.resume()
            resumed.append(asyncio.get_running_loop().time())
            await until("the client answers again", lambda: any(t > resumed[0] and o == "ok" for t, o in outcomes))
            await until("300 calls after it settled", lambda: sum(t > settled() for t, _ in outcomes) >= 300)
            done.set()

        def settled() -> float:
            # Half a second after the first answer following the resume: a Redis woken with a backlog of every
            # connection's commands may still answer one call late on a loaded 2-core machine before that.
            return min(t for t, o in outcomes if t > resumed[0] and o == "ok") + 0.5

        await asyncio.gather(outage(), *(traffic(w) for w in range(20)))
        # Every answer is the right one (a wrong one fails `traffic` itself), and once the client is back, nothing
        # fails any more: no connection failures, no timeouts.
        after = [o for t, o in outcomes if t > settled()]
        assert len(after) >= 300 and set(after) == {"ok"}, [o for o in after if o != "ok"]
        # after recovery: a fresh round, each answer for its own key
        got = await asyncio.gather(*(s.execute([GetOp(f"t:p{i}")]) for i in range(n)))
        assert got == [[f"pv-{i}".encode()] for i in range(n)]
    finally:
        await s.close()


async def test_a_late_reply_is_dropped_and_the_connection_kept(redis_server: RedisServer,
                                                                fault_proxy: FaultProxy) -> None:
    for k in "abc":
        redis_server.command("SET", f"t:{k}", k)
    s = redis_store(fault_proxy.url, timeout=0.4, pool_size=1)
    try:
        await s.execute([GetOp("t:a")])
        conn = s.client._conns[0]
        # Replies are held 0.3 s each, one after the other: A's comes at 0.3 s (in time), B's, sent at 0.15 s,
        # at 0.6 s — after B's deadline (0.55 s). The connection did answer meanwhile, so it is kept.
        fault_proxy.set("delay_replies", 0.3)
        a = asyncio.ensure_future(s.execute([GetOp("t:a")]))
        await asyncio.sleep(0.15)
        b = asyncio.ensure_future(s.execute([GetOp("t:b")]))
        assert await a == [b"a"]
        with pytest.raises(StoreUnavailable) as exc:
            await b
        assert exc.value.reason == "timeout"
        fault_proxy.set("pass")
        await asyncio.sleep(0.1)  # B's late reply arrives and is dropped
        assert await s.execute([GetOp("t:c")]) == [b"c"]  # C gets C's answer, not B's
        assert s.client._conns == [conn] and fault_proxy.connections == 1
    finally:
        await s.close()


async def test_a_connection_silent_for_the_whole_timeout_is_discarded(redis_server: RedisServer,
                                                                       fault_proxy: FaultProxy) -> None:
    redis_server.command("SET", "t:z", "z")
    s = redis_store(fault_proxy.url, timeout=0.15, pool_size=1)
    try:
        assert await s.execute([GetOp("t:z")]) == [b"z"]
        first = s.client._conns[0]
        fault_proxy.set("blackhole")
        results = await asyncio.gather(*(s.execute([GetOp("t:z")]) for _ in range(10)), return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) and r.reason == "timeout" for r in results)
        assert first.closed and first not in s.client._conns
        fault_proxy.set("pass")
        assert await s.execute([GetOp("t:z")]) == [b"z"]
        assert fault_proxy.connections == 2
    finally:
        await s.close()


async def test_slower_than_timeout_is_timeout_and_faster_is_fine(redis_server: RedisServer,
                                                                 fault_proxy: FaultProxy) -> None:
    redis_server.command("SET", "t:s", "s")
    s = redis_store(fault_proxy.url, timeout=0.2, pool_size=1)
    try:
        fault_proxy.set("delay", 0.03)
        assert await s.execute([GetOp("t:s")]) == [b"s"]
        fault_proxy.set("delay", 0.3)
        with pytest.raises(StoreUnavailable) as exc:
            await s.execute([GetOp("t:s")])
        assert exc.value.reason == "timeout"
    finally:
        await s.close()


def _fields(op: RateOp) -> dict:  # type: ignore[type-arg]
    return {f: getattr(op, f) for f in ("algorithm", "key", "limit", "window", "burst")}


async def test_unix_socket_url(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "redis.sock"
    server = RedisServer(tmp_path / "unix", extra=["--unixsocket", str(sock), "--unixsocketperm", "700"]).start()
    s = redis_store(f"unix://{sock}?db=2")
    try:
        server.command("SELECT", "2")
        (r,) = await s.execute([RateOp("fixed_window", "t:unix", limit=2, window=10 * S, burst=2, now=T0)])
        assert r.allowed and r.remaining == 1
        # it went to db 2 over the socket
        import socket as socket_mod

        with socket_mod.socket(socket_mod.AF_UNIX) as c:
            c.connect(str(sock))
            c.sendall(b"*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n*2\r\n$6\r\nEXISTS\r\n$6\r\nt:unix\r\n")
            reply = b""
            while reply.count(b"\r\n") < 2:
                reply += c.recv(100)
        assert reply == b"+OK\r\n:1\r\n"
    finally:
        await s.close()
        server.stop()


async def test_rediss_with_a_verified_certificate_and_a_password(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.certs import CA
    from tests.helpers import free_port

    ca = CA(tmp_path)
    leaf = ca.issue("redis")
    tls_port = free_port()
    server = RedisServer(tmp_path / "tls", extra=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(leaf.cert), "--tls-key-file", str(leaf.key),
        "--tls-ca-cert-file", str(ca.cert), "--tls-auth-clients", "no", "--requirepass", "s3cret"]).start()
    try:
        good = redis_store(f"rediss://:s3cret@127.0.0.1:{tls_port}/0?ssl_ca_certs={ca.cert}")
        (r,) = await good.execute([RateOp("gcra", "t:tls", limit=1, window=S, burst=1, now=T0)])
        assert r.allowed
        await good.close()
        untrusted = redis_store(f"rediss://:s3cret@127.0.0.1:{tls_port}/0")  # the system CAs don't know ours
        with pytest.raises(StoreUnavailable) as exc:
            await untrusted.execute([GetOp("x")])
        assert exc.value.reason == "unavailable"
        await untrusted.close()
        wrong = redis_store(f"rediss://:nope@127.0.0.1:{tls_port}/0?ssl_ca_certs={ca.cert}")
        with pytest.raises(StoreUnavailable) as exc:
            await wrong.execute([GetOp("x")])
        assert exc.value.reason == "unavailable" and "handshake refused" in str(exc.value)
        await wrong.close()
    finally:
        server.stop()

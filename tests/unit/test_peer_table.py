"""The suite's peer table (benchmarks/suite.py): each peer's CPU per request next to Failgate's, and the goals as
ratios computed from the same run's rows."""

from __future__ import annotations

from pathlib import Path

from benchmarks.suite import Row, peer_table


def _row(scenario: str, cpu: dict[str, float], concurrency: int = 64) -> Row:
    return Row(scenario, "http://x", concurrency, {}, cpu)


def test_the_goals_are_ratios_of_the_same_run() -> None:
    rows = [_row("reference proxy (aiohttp)", {"reference": 100.0}),
            _row("nginx + Lua + Redis limiter", {"nginx": 20.0, "redis": 5.0}),
            _row("failgate passthrough", {"failgate": 110.0}),
            _row("failgate passthrough", {"failgate": 300.0}, concurrency=1),  # only 64 connections count
            _row("failgate rate_limit sliding", {"failgate": 130.0, "redis": 9.0}),
            _row("failgate auth + rate_limit", {"failgate": 150.0, "redis": 10.0})]
    table = peer_table(rows)
    assert table[0] == "| | CPU µs/req | |"
    assert "| Failgate passthrough | 110.0 | 1.10x the reference proxy (goal: at most 1x) |" in table
    assert ("| Failgate rate limit (sliding window) | 130.0 (+9.0) | +20.0 over passthrough (goal: +10); 6.5x the "
            "nginx limiter (anchor: 3x) |") in table
    assert "| Failgate auth + rate limit | 150.0 (+10.0) | +40.0 over passthrough (goal: +15) |" in table
    assert "| nginx + Lua + Redis limiter | 20.0 (+5.0) |  |" in table
    assert not any("nginx proxy_pass" in line for line in table)  # a peer the run did not measure is left out


def test_no_table_without_a_passthrough_row() -> None:
    assert peer_table([_row("reference proxy (aiohttp)", {"reference": 100.0})]) == []


def test_with_rounds_each_figure_is_the_median_of_its_rows_and_each_comparison_is_paired_by_round() -> None:
    rows = [_row("reference proxy (aiohttp)", {"reference": r}) for r in (100.0, 140.0, 120.0)]
    rows += [_row("failgate passthrough", {"failgate": f}) for f in (90.0, 60.0, 300.0)]
    rows += [_row("failgate rate_limit sliding", {"failgate": f, "redis": r})
             for f, r in ((100.0, 9.0), (200.0, 7.0), (80.0, 8.0))]
    table = peer_table(rows)
    # rows: medians (passthrough 90, reference 120); ratios per round 0.90 0.43 2.50: their median
    assert "| Failgate passthrough | 90.0 | 0.90x the reference proxy [0.90x 0.43x 2.50x] (goal: at most 1x) |" in table
    assert ("| Failgate rate limit (sliding window) | 100.0 (+8.0) | +10.0 over passthrough [+10.0 +140.0 -220.0] "
            "(goal: +10) |") in table
    assert table[-1].startswith("Each figure is the median of 3 rounds")


def test_a_machine_that_drifts_between_rounds_moves_both_sides_of_a_comparison() -> None:
    # the machine is slower in the second round: every row of it reads higher. The difference of the rows'
    # medians (101 - 100 = 1) would hide what each round says (10, 8, 1): the limit costs 8 more.
    rows = [_row("failgate passthrough", {"failgate": f}) for f in (80.0, 150.0, 100.0)]
    rows += [_row("failgate rate_limit sliding", {"failgate": f}) for f in (90.0, 158.0, 101.0)]
    table = peer_table(rows)
    assert "| Failgate rate limit (sliding window) | 101.0 | +8.0 over passthrough [+10.0 +8.0 +1.0] (goal: +10) |" \
        in table


def _served(scenario: str, rps: float, p99_ms: float) -> Row:
    return Row(scenario, "http://x", 64, {"rps": rps, "latency_us": {"p99": p99_ms * 1000}}, {})


def test_the_outage_goal_pairs_hung_with_healthy_by_round_and_killed_with_the_healthy_median() -> None:
    from benchmarks.suite import outage_table

    rows = [_served("healthy: auth stale + rate_limit open", 1000, 9.0),
            _served("store hung (blackhole): auth stale + rate_limit open", 950, 10.0),
            _served("healthy: auth stale + rate_limit open", 800, 11.0),  # a slower round: both sides slower
            _served("store hung (blackhole): auth stale + rate_limit open", 780, 12.0),
            _served("healthy: auth stale + rate_limit open", 1200, 8.0),
            _served("store hung (blackhole): auth stale + rate_limit open", 1080, 9.0),
            _served("store killed: auth stale + rate_limit open", 500, 30.0)]
    table = outage_table(rows)
    assert ("| auth stale + rate_limit open | 1000 | 950 (0.95x [0.95 0.97 0.90]) | 500 (0.50x) | "
            "9.00 / 10.00 / 30.00 |") in table
    assert not any(line.startswith("| rate_limit open") for line in table)  # not measured: left out
    assert outage_table([_served("failgate passthrough", 1, 1)]) == []


def test_killed_measured_every_round_is_paired_with_its_round_too() -> None:
    from benchmarks.suite import outage_table

    rows = []
    for healthy, killed in ((1000, 990), (700, 700), (1100, 1045)):  # the second round slow on both sides
        rows += [_served("healthy: open route", healthy, 8.0), _served("store killed: open route", killed, 9.0)]
    (line,) = [x for x in outage_table(rows) if x.startswith("| rate_limit open")]
    assert line == "| rate_limit open | 1000 |  | 990 (0.99x [0.99 1.00 0.95]) | 8.00 /  / 9.00 |"


def test_auth_from_memory_is_compared_with_the_api_key_from_cache_for_round_by_round() -> None:
    rows = [_row("failgate passthrough", {"failgate": 80.0}),
            _row("failgate auth from cache_for", {"failgate": 100.0}),
            _row("failgate http authorizer, cache_for", {"failgate": 104.0}),
            _row("failgate jwt, 1,000 tokens", {"failgate": 115.0}),
            _row("failgate passthrough", {"failgate": 90.0}),
            _row("failgate auth from cache_for", {"failgate": 120.0}),  # a slower round: both sides slower
            _row("failgate http authorizer, cache_for", {"failgate": 126.0}),
            _row("failgate jwt, 1,000 tokens", {"failgate": 126.0})]
    table = peer_table(rows)
    assert ("| Failgate authorizer from cache_for | 115.0 | 1.04x the API key from cache_for [1.04x 1.05x] "
            "(goal: at most 1.10x) |") in table
    assert ("| Failgate jwt, 1,000 tokens | 120.5 | 1.10x the API key from cache_for [1.15x 1.05x] "
            "(goal: at most 1.10x) |") in table


def test_the_peer_rows_failgate_talks_to_redis_directly_and_the_outage_rows_one_through_the_fault_proxy(
        tmp_path: Path) -> None:
    """The nginx + Lua limiter talks to redis-server directly, so the Failgate of the peer table must too; only the
    rows where the store fails need the fault proxy in the path."""
    from benchmarks.suite import _OUTAGE_ROUTES, RELAYED, _failgates, _jwt_tokens
    from proxy.config import load_text

    _jwt_tokens(tmp_path / "jwks.json", 1)  # (the jwt route's key set, which the config names)
    made = _failgates(tmp_path, upstream=9001, redis_port=9002, fault_port=9003)
    assert sorted(made) == ["failgate", RELAYED]
    stores = {name: load_text(cfg.read_text(), str(cfg)).config.store.url for name, (cfg, _) in made.items()}
    assert stores == {"failgate": "redis://127.0.0.1:9002/0", RELAYED: "redis://127.0.0.1:9003/0"}
    assert made["failgate"][1] != made[RELAYED][1]
    assert all(servers[0] == RELAYED for *_, servers, _ in _OUTAGE_ROUTES)

"""Rate-limit keys: hashed client input, IPv6 per /64, algorithm and window in the key, a hash tag."""

from __future__ import annotations

from multidict import CIMultiDict

from proxy.checks.ratelimit import LimitGroup, RateLimitCheck, client_subject
from proxy.config.schema import Duration, RateLimit


class Check:
    """A route's one limit and its group, as the pipeline uses them: the full store key of one request."""

    def __init__(self, key: str, algorithm: str, per: float, name: str | None = None,
                 plans: dict[str, int] | None = None) -> None:
        cfg = RateLimit(name=name, limit=10, per=Duration(per), key=key, algorithm=algorithm,  # type: ignore[arg-type]
                        on_store_error="open", plans=plans)  # type: ignore[arg-type]
        self.limit = RateLimitCheck("search", cfg, workers=2, retry_after=2.0)
        self.group = LimitGroup("search", [self.limit], key_prefix="fg:", auth_header=None, auth_scheme=None)

    def key(self, client: str, headers: object, principal: str | None, plan: str | None = None) -> str:
        planned = self.group.plan(self.group.key(client, headers, principal), plan)
        assert planned is not None
        return planned.ops[0].key


def check(key: str, algorithm: str = "sliding_window", per: float = 60.0, name: str | None = None,
          plans: dict[str, int] | None = None) -> Check:
    return Check(key, algorithm, per, name, plans)


def test_ipv6_clients_share_a_bucket_per_64() -> None:
    assert client_subject("2001:db8:1:2:aaaa::1") == client_subject("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_subject("2001:db8:1:3::1") != client_subject("2001:db8:1:2::1")
    assert client_subject("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_subject("192.0.2.7") == "192.0.2.7"


def test_keys_hash_client_input_and_carry_algorithm_window_and_a_hash_tag() -> None:
    c = check("header:X-Api-Client")
    k = c.key("10.0.0.1", CIMultiDict({"X-Api-Client": "alice}{evil"}), None)
    assert k.startswith("fg:rl:{search:h:") and k.endswith("}:sliding_window:60000")
    assert "alice" not in k and "evil" not in k
    assert c.key("10.0.0.1", CIMultiDict(), None) == "fg:rl:{search:anonymous}:sliding_window:60000"
    ip = check("client_ip", "gcra", 1.5)
    assert ip.key("10.0.0.1", CIMultiDict(), None).endswith("}:gcra:1500")
    assert "10.0.0.1" not in ip.key("10.0.0.1", CIMultiDict(), None)
    assert check("route").key("x", CIMultiDict(), None) == "fg:rl:{search:route}:sliding_window:60000"


def test_principal_key_falls_back_to_the_client_address() -> None:
    c = check("principal")
    assert c.key("10.0.0.1", CIMultiDict(), None) == check("client_ip").key("10.0.0.1", CIMultiDict(), None)
    assert ":p:" in c.key("10.0.0.1", CIMultiDict(), "alice")


def test_policy_and_local_share_default() -> None:
    c = check("route").limit
    assert (c.policy, c.check, c.window_s) == ("search", "rate_limit", 60)
    assert c.local_share == 0.5
    named = check("route", name="burst").limit
    assert (named.policy, named.check) == ("search.burst", "rate_limit.burst")


def test_named_limits_and_plans_have_keys_of_their_own() -> None:
    burst = check("route", name="burst")
    assert burst.key("x", CIMultiDict(), None) == "fg:rl:{search:route}:burst:sliding_window:60000"
    daily = check("route", "fixed_window", 86400.0, name="daily", plans={"pro": 1000})
    assert daily.key("x", CIMultiDict(), None, "pro") == "fg:rl:{search:route}:daily@pro:fixed_window:86400000"
    assert daily.key("x", CIMultiDict(), None, "free") == "fg:rl:{search:route}:daily:fixed_window:86400000"


def test_plan_names_from_credentials_cannot_grow_what_a_group_remembers() -> None:
    """A plan comes from a key record or an authorizer's header: a plan no limit names is counted as no plan, and
    what a group of several limits makes once per plan stays bounded by the plans its limits name."""
    limits = [RateLimitCheck("search", RateLimit(name=name, limit=10, per=Duration(per), key="client_ip",  # type: ignore[arg-type]
                                                 on_store_error="open", plans={"pro": 100}), workers=1, retry_after=2.0)
              for name, per in (("burst", 1.0), ("daily", 86400.0))]
    group = LimitGroup("search", limits, key_prefix="fg:", auth_header=None, auth_scheme=None)
    stem = group.key("192.0.2.7", CIMultiDict(), None)
    pro = group.plan(stem, "pro")
    assert pro is not None and [op.limit for op in pro.ops] == [100, 100]
    for i in range(1000):
        planned = group.plan(stem, f"made-up-{i}")
        assert planned is not None
        assert [(op.key, op.limit) for op in planned.ops] == [(op.key.replace("@pro", ""), 10) for op in pro.ops]
    assert len(group._made) <= 2


def test_a_subjects_operation_is_made_once_and_the_memory_of_them_is_bounded() -> None:
    from proxy.checks import ratelimit

    c = check("client_ip")
    g = c.group
    first = g.plan(g.key("192.0.2.1", CIMultiDict(), None), None)
    again = g.plan(g.key("192.0.2.1", CIMultiDict(), None), None)
    other = g.plan(g.key("192.0.2.2", CIMultiDict(), None), None)
    assert first is again and other is not first  # the same client's requests reuse one (read-only) operation
    assert first is not None and other is not None and first.op.key != other.op.key
    for i in range(ratelimit._RECENT + 10):  # a flood of new clients
        g.plan(g.key(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", CIMultiDict(), None), None)
    assert len(g._recent) <= ratelimit._RECENT
    # a request's plan, found by the client's address: the same operation as by its key
    by_request = g.plan_request("192.0.2.9", CIMultiDict(), None, None)
    assert by_request is not None and by_request is g.plan_request("192.0.2.9", CIMultiDict(), None, None)
    assert by_request.op == g.plan(g.key("192.0.2.9", CIMultiDict(), None), None).op  # type: ignore[union-attr]
    assert g.plan_request("192.0.2.10", CIMultiDict(), None, None).op.key != by_request.op.key  # type: ignore[union-attr]
    for i in range(ratelimit._RECENT + 10):
        g.plan_request(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", CIMultiDict(), None, None)
    assert len(g._recent) <= ratelimit._RECENT

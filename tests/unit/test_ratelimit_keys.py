"""Rate-limit keys: hashed client input, IPv6 per /64, algorithm and window in the key, a hash tag."""

from __future__ import annotations

from multidict import CIMultiDict

from proxy.checks.ratelimit import RateLimitCheck, client_subject
from proxy.config.schema import Duration, RateLimit


def check(key: str, algorithm: str = "sliding_window", per: float = 60.0) -> RateLimitCheck:
    cfg = RateLimit(limit=10, per=Duration(per), key=key, algorithm=algorithm, on_store_error="open")  # type: ignore[arg-type]
    return RateLimitCheck("search", cfg, key_prefix="fg:", workers=2, retry_after=2.0)


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
    c = check("route")
    assert c.policy == ("RateLimit-Policy", '"search";q=10;w=60')
    assert c.local_share == 0.5

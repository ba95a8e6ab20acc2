"""Admission limits: token buckets, the per-user rate limiter, connection counts, Origin checks.

Everything is sans-IO: time is a number handed in, so nothing here sleeps or opens a socket.
"""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from trio_gateway.limits import (
    ConnectionCounter,
    OriginPolicy,
    RateLimiter,
    TokenBucket,
    parse_origin_list,
)

# --- TokenBucket -------------------------------------------------------------------------------


def test_bucket_starts_full_and_allows_a_burst_then_refuses() -> None:
    bucket = TokenBucket(rate=1.0, burst=3.0)
    assert [bucket.try_take(100.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_refills_at_rate_over_time() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0)
    for _ in range(4):
        assert bucket.try_take(0.0)
    assert not bucket.try_take(0.0)
    assert bucket.available(0.25) == pytest.approx(0.5)
    assert not bucket.try_take(0.25)
    assert bucket.try_take(0.5)  # 1 token after half a second at 2/s
    assert not bucket.try_take(0.5)
    assert bucket.available(1.5) == pytest.approx(2.0)


def test_bucket_never_refills_beyond_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=2.0)
    bucket.try_take(0.0)
    assert bucket.available(3600.0) == 2.0
    assert [bucket.try_take(3600.0) for _ in range(3)] == [True, True, False]


def test_refused_take_consumes_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0)
    assert bucket.try_take(0.0)
    for t in (0.1, 0.2, 0.3, 0.9):
        assert not bucket.try_take(t)
    assert bucket.try_take(1.0)


def test_retry_after_is_exact() -> None:
    bucket = TokenBucket(rate=2.0, burst=1.0)
    assert bucket.retry_after(0.0) == 0.0
    assert bucket.try_take(0.0)
    assert bucket.retry_after(0.0) == pytest.approx(0.5)
    assert bucket.retry_after(0.2) == pytest.approx(0.3)
    assert not bucket.try_take(0.4999)
    assert bucket.try_take(0.5)


def test_retry_after_scales_with_cost_and_does_not_change_the_bucket() -> None:
    bucket = TokenBucket(rate=4.0, burst=10.0)
    assert bucket.try_take(0.0, cost=10.0)
    assert bucket.retry_after(0.0, cost=3.0) == pytest.approx(0.75)
    assert bucket.retry_after(0.0, cost=3.0) == pytest.approx(0.75)
    assert not bucket.try_take(0.74, cost=3.0)
    assert bucket.try_take(0.75, cost=3.0)


def test_cost_above_burst_is_never_allowed() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0)
    assert not bucket.try_take(1e6, cost=3.0)
    assert bucket.retry_after(1e6, cost=3.0) == math.inf
    assert bucket.try_take(1e6, cost=2.0)  # the refusal took nothing


def test_zero_rate_bucket_never_refills() -> None:
    bucket = TokenBucket(rate=0.0, burst=1.0)
    assert bucket.try_take(0.0)
    assert not bucket.try_take(1e9)
    assert bucket.retry_after(1e9) == math.inf


def test_a_clock_going_backwards_does_not_refill() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0)
    assert bucket.try_take(10.0)
    assert not bucket.try_take(5.0)
    assert not bucket.try_take(10.5)  # still measured from 10.0, not from 5.0
    assert bucket.try_take(11.0)


@pytest.mark.parametrize(
    ("rate", "burst"), [(-1.0, 1.0), (1.0, 0.0), (1.0, -1.0), (math.nan, 1.0), (1.0, math.inf)]
)
def test_bucket_rejects_bad_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


@pytest.mark.parametrize("cost", [-1.0, math.nan, math.inf])
def test_bucket_rejects_bad_costs(cost: float) -> None:
    with pytest.raises(ValueError, match="cost"):
        TokenBucket(1.0, 1.0).try_take(0.0, cost)


rates = st.floats(min_value=0.01, max_value=1e5)
bursts = st.floats(min_value=0.5, max_value=1e5)
starts = st.floats(min_value=0.0, max_value=1e6)
steps = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=10.0), st.floats(min_value=0.0, max_value=5.0)),
    max_size=60,
)


@given(rate=rates, burst=bursts, start=starts, steps=steps)
def test_bucket_never_allows_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: float, start: float, steps: list[tuple[float, float]]
) -> None:
    bucket = TokenBucket(rate, burst)
    now = start
    granted = 0.0
    for dt, cost in steps:
        now += dt
        if bucket.try_take(now, cost):
            granted += cost
    # Tolerance: float rounding plus the bucket's documented one-off slack of 1e-9*(burst+rate).
    assert granted <= burst + rate * (now - start) + 1e-6 * (burst + rate + granted)


# Small buckets and short steps, so that the bucket often runs dry.
small_bursts = st.floats(min_value=0.5, max_value=10.0)
busy_steps = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=0.5), st.floats(min_value=0.0, max_value=5.0)),
    max_size=60,
)


@given(
    rate=st.floats(0.01, 1e3),
    burst=small_bursts,
    start=starts,
    steps=busy_steps,
    cost=st.floats(0.0, 10.0),
)
def test_waiting_retry_after_always_suffices_and_half_of_it_never_does(
    rate: float, burst: float, start: float, steps: list[tuple[float, float]], cost: float
) -> None:
    assume(cost <= burst)
    bucket = TokenBucket(rate, burst)
    now = start
    for dt, step_cost in steps:
        now += dt
        bucket.try_take(now, step_cost)
    wait = bucket.retry_after(now, cost)
    assert wait >= 0.0 and math.isfinite(wait)
    if wait * rate > 1e-6 * (burst + rate):  # clearly short of tokens: half the wait is too soon
        early = copy.copy(bucket)
        assert not early.try_take(now + wait / 2, cost)
    assert bucket.try_take(now + wait, cost)


# --- RateLimiter -------------------------------------------------------------------------------


def test_limiter_reports_allowed_and_the_exact_retry_after() -> None:
    limiter = RateLimiter(rate=1.0, burst=2.0)
    assert limiter.check("alice", 0.0) == (True, 0.0)
    assert limiter.check("alice", 0.0) == (True, 0.0)
    allowed, retry_after = limiter.check("alice", 0.25)
    assert not allowed and retry_after == pytest.approx(0.75)
    assert limiter.check("alice", 1.0) == (True, 0.0)


def test_limiter_keys_are_isolated() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0)
    assert limiter.check("alice", 0.0)[0]
    assert not limiter.check("alice", 0.0)[0]
    assert limiter.check("bob", 0.0) == (True, 0.0)
    assert not limiter.check("bob", 0.0)[0]


def test_limiter_cost_and_impossible_cost() -> None:
    limiter = RateLimiter(rate=1.0, burst=5.0)
    assert limiter.check("alice", 0.0, cost=5.0) == (True, 0.0)
    allowed, retry_after = limiter.check("alice", 0.0, cost=2.0)
    assert not allowed and retry_after == pytest.approx(2.0)
    assert limiter.check("alice", 100.0, cost=6.0) == (False, math.inf)


def test_idle_buckets_are_evicted_after_idle_ttl() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, idle_ttl=60.0)
    limiter.check("alice", 0.0)
    limiter.check("bob", 30.0)
    limiter.check("carol", 60.0)  # alice idle exactly 60 s: not *longer* than the TTL
    assert "alice" in limiter and len(limiter) == 3
    limiter.check("carol", 61.0)
    assert "alice" not in limiter and "bob" in limiter and len(limiter) == 2
    limiter.check("carol", 91.5)
    assert "bob" not in limiter and len(limiter) == 1


def test_use_keeps_a_bucket_alive() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, idle_ttl=10.0)
    for t in range(0, 100, 5):
        limiter.check("alice", float(t))
        limiter.check(f"passer-by-{t}", float(t))
    assert "alice" in limiter
    assert len(limiter) <= 4  # alice plus the passers-by of the last 10 s


def test_even_a_refused_check_counts_as_use() -> None:
    limiter = RateLimiter(rate=0.001, burst=1.0, idle_ttl=10.0)
    limiter.check("alice", 0.0)
    for t in range(1, 30):
        assert not limiter.check("alice", float(t))[0]
    assert "alice" in limiter


def test_an_evicted_key_starts_again_with_a_full_bucket() -> None:
    # Documented trade-off: forgetting a key can only make the limiter more permissive.
    limiter = RateLimiter(rate=0.001, burst=2.0, idle_ttl=60.0)
    assert limiter.check("alice", 0.0)[0] and limiter.check("alice", 0.0)[0]
    assert not limiter.check("alice", 0.0)[0]
    limiter.check("bob", 61.0)
    assert "alice" not in limiter
    assert limiter.check("alice", 61.0) == (True, 0.0)
    assert limiter.check("alice", 61.0) == (True, 0.0)


def test_max_keys_evicts_the_least_recently_used() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, max_keys=2)
    limiter.check("a", 0.0)
    limiter.check("b", 0.0)
    limiter.check("a", 0.0)  # a is now more recent than b
    limiter.check("c", 0.0)
    assert len(limiter) == 2 and "a" in limiter and "c" in limiter and "b" not in limiter


def test_memory_stays_bounded_under_a_million_distinct_keys() -> None:
    limiter = RateLimiter(rate=1.0, burst=5.0, max_keys=1000, idle_ttl=1e9)
    for i in range(1_000_000):
        assert limiter.check(f"user-{i}", i * 1e-6)[0]  # every new key starts with a full bucket
        if i % 1000 == 0:
            assert len(limiter) <= 1000
    assert len(limiter) == 1000
    assert "user-999999" in limiter and "user-0" not in limiter


def test_a_check_after_a_quiet_spell_does_bounded_work_and_sweep_finishes_it() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, max_keys=10_000, idle_ttl=1.0)
    for i in range(1000):
        limiter.check(f"user-{i}", 0.0)
    limiter.check("late", 100.0)
    remaining = len(limiter)
    assert 1 < remaining < 1000  # some idle buckets evicted, not necessarily all at once
    assert limiter.sweep(100.0) == remaining - 1
    assert len(limiter) == 1 and "late" in limiter
    assert limiter.sweep(100.0) == 0


def test_idle_buckets_drain_through_checks_alone() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, idle_ttl=1.0)
    for i in range(1000):
        limiter.check(f"user-{i}", 0.0)
    for _ in range(100):
        limiter.check("late", 100.0)
    assert len(limiter) == 1


@pytest.mark.parametrize(
    "kwargs", [{"max_keys": 0}, {"idle_ttl": -1.0}, {"idle_ttl": math.nan}, {"burst": 0.0}]
)
def test_limiter_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    params: dict[str, float] = {"rate": 1.0, "burst": 1.0, **kwargs}
    with pytest.raises(ValueError):
        RateLimiter(**params)  # type: ignore[arg-type]


# --- ConnectionCounter -------------------------------------------------------------------------


def test_per_user_limit() -> None:
    counter = ConnectionCounter(per_key_limit=2, total_limit=100)
    assert counter.try_acquire("alice") is None
    assert counter.try_acquire("alice") is None
    assert counter.try_acquire("alice") == "per_user"
    assert counter.count("alice") == 2 and counter.total == 2
    assert counter.try_acquire("bob") is None  # another user is unaffected


def test_total_limit() -> None:
    counter = ConnectionCounter(per_key_limit=5, total_limit=3)
    assert [counter.try_acquire(u) for u in ("a", "b", "c")] == [None, None, None]
    assert counter.try_acquire("d") == "total"
    assert counter.count("d") == 0 and counter.total == 3 and len(counter) == 3


def test_per_user_is_reported_when_both_limits_are_hit() -> None:
    counter = ConnectionCounter(per_key_limit=1, total_limit=1)
    assert counter.try_acquire("alice") is None
    assert counter.try_acquire("alice") == "per_user"
    assert counter.try_acquire("bob") == "total"


def test_release_frees_a_slot_and_forgets_empty_keys() -> None:
    counter = ConnectionCounter(per_key_limit=2, total_limit=2)
    counter.try_acquire("alice")
    counter.try_acquire("alice")
    assert counter.try_acquire("bob") == "total"
    counter.release("alice")
    assert counter.count("alice") == 1 and counter.total == 1
    assert counter.try_acquire("bob") is None
    counter.release("alice")
    counter.release("bob")
    assert counter.total == 0 and counter.count("alice") == 0 and len(counter) == 0


def test_release_without_acquire_is_an_error() -> None:
    counter = ConnectionCounter(per_key_limit=1, total_limit=1)
    with pytest.raises(ValueError, match="without a matching"):
        counter.release("alice")
    counter.try_acquire("alice")
    counter.release("alice")
    with pytest.raises(ValueError):
        counter.release("alice")
    assert counter.total == 0


def test_zero_limits_refuse_everything() -> None:
    assert ConnectionCounter(per_key_limit=0, total_limit=10).try_acquire("a") == "per_user"
    assert ConnectionCounter(per_key_limit=10, total_limit=0).try_acquire("a") == "total"


@given(
    st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", "c", "d"])), max_size=200),
    st.integers(0, 4),
    st.integers(0, 8),
)
def test_counter_matches_a_model(ops: list[tuple[bool, str]], per_key: int, total: int) -> None:
    counter = ConnectionCounter(per_key_limit=per_key, total_limit=total)
    model: dict[str, int] = {}
    for acquire, key in ops:
        if acquire:
            if counter.try_acquire(key) is None:
                model[key] = model.get(key, 0) + 1
        elif model.get(key):
            counter.release(key)
            model[key] -= 1
            if not model[key]:
                del model[key]
        assert counter.total == sum(model.values()) <= total
        assert all(counter.count(k) == model.get(k, 0) <= per_key for k in "abcd")
        assert len(counter) == len(model)


# --- OriginPolicy ------------------------------------------------------------------------------

EXAMPLE = OriginPolicy(["https://app.example.com", "http://localhost:3000"])


def test_a_missing_origin_is_allowed_even_by_an_empty_policy() -> None:
    assert EXAMPLE.allows(None)
    assert OriginPolicy([]).allows(None)


def test_an_empty_policy_refuses_every_browser_origin() -> None:
    assert not OriginPolicy([]).allows("https://app.example.com")
    assert not OriginPolicy([]).allows("http://localhost")


def test_exact_origins_are_allowed() -> None:
    assert EXAMPLE.allows("https://app.example.com")
    assert EXAMPLE.allows("http://localhost:3000")


def test_the_null_origin_is_refused_even_with_a_star() -> None:
    assert not EXAMPLE.allows("null")
    assert not OriginPolicy(["*"]).allows("null")


def test_the_star_allows_any_well_formed_origin() -> None:
    policy = OriginPolicy(["*"])
    assert policy.allows("https://anything.example.org")
    assert policy.allows("http://127.0.0.1:8080")
    assert not policy.allows("https://anything.example.org/")
    assert not policy.allows("")


@pytest.mark.parametrize(
    "origin",
    [
        "http://app.example.com",  # scheme mismatch
        "https://app.example.com:8443",  # port mismatch
        "https://example.com",
        "https://app.example.com.evil.io",
        "https://evilapp.example.com",
        "https://app.example.co",
        "http://localhost:3001",
        "http://localhost",
        "https://localhost:3000",
    ],
)
def test_other_origins_are_refused(origin: str) -> None:
    assert not EXAMPLE.allows(origin)


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com:443",
        "HTTPS://APP.EXAMPLE.COM",
        "https://App.Example.Com:443",
        "HTTP://LOCALHOST:3000",
    ],
)
def test_case_and_default_ports_are_normalised(origin: str) -> None:
    assert EXAMPLE.allows(origin)


def test_default_ports_are_normalised_in_entries_too() -> None:
    policy = OriginPolicy(["http://Example.COM:80", "https://secure.example.com:443"])
    assert policy.allows("http://example.com")
    assert policy.allows("https://secure.example.com")
    assert not policy.allows("http://example.com:443")
    assert not policy.allows("https://secure.example.com:80")


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com/",  # trailing slash
        "https://app.example.com/path",
        "https://app.example.com?x=1",
        "https://app.example.com#frag",
        "https://user@app.example.com",
        "https://user:pw@app.example.com",
        "https://evil.io@app.example.com",
        "https://app.example.com@evil.io",
        " https://app.example.com",
        "https://app.example.com ",
        "https://app.example.com\n",
        "https://app.example.com.",
        "https://app..example.com",
        "https://app.example.com:",
        "https://app.example.com:0443",
        "https://app.example.com:99999",
        "https://app.example.com:-1",
        "https:app.example.com",
        "//app.example.com",
        "app.example.com",
        "https://",
        "https://*.example.com",
        "https://app_x.example.com",
        "https://app.ex%61mple.com",
        "https://äpp.example.com",
        "https://app.example.com\\",
        "",
    ],
)
def test_malformed_origin_values_are_refused(origin: str) -> None:
    assert not EXAMPLE.allows(origin)
    assert not OriginPolicy(["*"]).allows(origin)


WILDCARD = OriginPolicy(["https://*.example.com"])


@pytest.mark.parametrize(
    "origin",
    ["https://a.example.com", "https://a.b.example.com", "https://A.Example.com:443"],
)
def test_wildcard_matches_proper_subdomains_at_any_depth(origin: str) -> None:
    assert WILDCARD.allows(origin)


@pytest.mark.parametrize(
    "origin",
    [
        "https://example.com",  # the bare domain is not a subdomain
        "https://evilexample.com",  # look-alike suffix without the dot
        "https://a.evilexample.com",
        "https://example.com.evil.io",  # the domain as a prefix of someone else's
        "https://a.example.com.evil.io",
        "https://example.co",
        "https://a.example.comm",
        "http://a.example.com",  # scheme mismatch
        "https://a.example.com:8443",  # non-default port
        "https://.example.com",
        "https://a.example.com/",
    ],
)
def test_wildcard_refuses_look_alikes(origin: str) -> None:
    assert not WILDCARD.allows(origin)


def test_wildcard_with_a_port() -> None:
    policy = OriginPolicy(["http://*.dev.local:8080"])
    assert policy.allows("http://a.dev.local:8080")
    assert not policy.allows("http://a.dev.local")


def test_ip_and_ipv6_origins() -> None:
    policy = OriginPolicy(["http://127.0.0.1:8080", "http://[::1]:8080"])
    assert policy.allows("http://127.0.0.1:8080")
    assert policy.allows("http://[0:0::1]:8080")  # IPv6 compared in canonical form
    assert not policy.allows("http://127.0.0.2:8080")
    assert not policy.allows("http://127.1:8080")
    assert not policy.allows("http://0x7f.0.0.1:8080")
    assert not policy.allows("http://127.000.0.1:8080")
    assert not policy.allows("http://[::1%25eth0]:8080")


def test_policy_refuses_a_bare_string() -> None:
    with pytest.raises(TypeError, match="parse_origin_list"):
        OriginPolicy("https://app.example.com")


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("null", "null"),
        ("https://app.example.com/", "trailing '/'"),
        ("https://app.example.com/path", "no path"),
        ("https://user@app.example.com", "user info"),
        ("app.example.com", "scheme://host"),
        ("https://*", r"'\*'"),
        ("https://*example.com", r"'\*'"),
        ("https://a.*.example.com", r"'\*'"),
        ("*.example.com", "scheme://host"),
        ("https://*.127.0.0.1", "IP address"),
        ("https://example.com.", "empty label"),
        ("https://example.com:0", "port"),
        ("https://exa mple.com", "whitespace"),
    ],
)
def test_malformed_entries_are_rejected_with_a_reason(entry: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        OriginPolicy([entry])
    with pytest.raises(ValueError, match=reason):
        parse_origin_list(f"https://ok.example.com, {entry}")


# --- parse_origin_list -------------------------------------------------------------------------


def test_parse_origin_list_splits_trims_and_normalises() -> None:
    text = " https://App.Example.com:443 , http://localhost:3000,https://*.Example.org,, "
    assert parse_origin_list(text) == [
        "https://app.example.com",
        "http://localhost:3000",
        "https://*.example.org",
    ]


def test_parse_origin_list_of_nothing_is_empty() -> None:
    assert parse_origin_list("") == []
    assert parse_origin_list("  ") == []


def test_parse_origin_list_accepts_the_star() -> None:
    assert parse_origin_list("*") == ["*"]
    assert OriginPolicy(parse_origin_list("*")).allows("https://x.y")


def test_parse_origin_list_names_the_bad_entry() -> None:
    with pytest.raises(ValueError, match=r"'https://a\.com/x' \(entry 2 of the allow-list\)"):
        parse_origin_list("https://ok.com,https://a.com/x")


@given(st.text(max_size=60))
def test_allows_never_raises(origin: str) -> None:
    policy = OriginPolicy(["*", "https://*.example.com", "http://localhost:3000"])
    assert policy.allows(origin) in (True, False)


labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
domains = st.sampled_from(
    ["example.com", "evilexample.com", "example.com.evil.io", "example.co", "com", "xample.com"]
)


@given(st.lists(labels, max_size=3), domains)
def test_wildcard_matches_exactly_the_proper_subdomains(prefix: list[str], domain: str) -> None:
    host = ".".join([*prefix, domain])
    assert WILDCARD.allows(f"https://{host}") == (bool(prefix) and domain == "example.com")

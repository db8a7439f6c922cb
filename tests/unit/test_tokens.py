"""Lifetime rules, JWT peeking and the token cache (SPEC §4.3), on an injected fake clock."""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import pytest

from tokenferry.oauth import InvalidTokenResponse, OAuthError, TokenResponse
from tokenferry.tokens import (
    CachedToken,
    CacheKey,
    CacheOutcome,
    ExpiredTokenResponse,
    TokenCache,
    peek_jwt_claims,
    token_lifetime,
)

NOW = 1_800_000_000.0  # wall clock for lifetime tests


def make_jwt(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --------------------------------------------------------------------------- peek


def test_peek_returns_claims_without_verifying_signature_or_expiry() -> None:
    token = make_jwt({"sub": "alice", "exp": 1, "aud": "x"})  # long expired, unknown key
    assert peek_jwt_claims(token) == {"sub": "alice", "exp": 1, "aud": "x"}


def test_peek_accepts_unsigned_jwt() -> None:
    token = jwt.encode({"sub": "bob"}, "", algorithm="none")
    assert peek_jwt_claims(token) == {"sub": "bob"}


@pytest.mark.parametrize(
    "token",
    [
        "",
        "opaque-token-value",
        "a.b",
        "a.b.c",
        "###.###.###",
        b64(b'{"alg":"none"}') + "." + b64(b"[1,2,3]") + ".",  # payload not an object
        b64(b'{"alg":"none"}') + "." + b64(b"not json") + ".",
        b64(b"[]") + "." + b64(b'{"sub":"x"}') + ".",  # header not an object
        # Nesting deep enough to exhaust the JSON decoder's recursion limit.
        b64(b'{"alg":"none"}') + "." + b64(b'{"a":' * 100_000 + b"1" + b"}" * 100_000) + ".",
    ],
)
def test_peek_returns_none_for_anything_malformed(token: str) -> None:
    assert peek_jwt_claims(token) is None


# --------------------------------------------------------------------------- lifetime


@pytest.mark.parametrize(("expires_in", "expected"), [(1, 1.0), (120, 120.0), (3600, 3600.0)])
def test_lifetime_uses_positive_integer_expires_in(expires_in: int, expected: float) -> None:
    assert token_lifetime(expires_in, "opaque", now=NOW) == expected


@pytest.mark.parametrize("expires_in", [None, 0, -5, True, False, "600", 600.0, 1.5, [600], {}])
def test_lifetime_defaults_to_300_unless_positive_int(expires_in: object) -> None:
    assert token_lifetime(expires_in, "opaque", now=NOW) == 300.0


def test_lifetime_capped_at_one_hour() -> None:
    assert token_lifetime(86_400, "opaque", now=NOW) == 3600.0


def test_cache_ttl_caps_lifetime() -> None:
    assert token_lifetime(3600, "opaque", cache_ttl_seconds=60, now=NOW) == 60.0


def test_cache_ttl_never_extends_lifetime() -> None:
    assert token_lifetime(60, "opaque", cache_ttl_seconds=1000, now=NOW) == 60.0
    # Nor the default, nor the one-hour cap.
    assert token_lifetime(None, "opaque", cache_ttl_seconds=1000, now=NOW) == 300.0
    assert token_lifetime(7200, "opaque", cache_ttl_seconds=5000, now=NOW) == 3600.0


def test_cache_ttl_zero_means_no_cap() -> None:
    assert token_lifetime(900, "opaque", cache_ttl_seconds=0, now=NOW) == 900.0


def test_jwt_exp_caps_lifetime() -> None:
    token = make_jwt({"exp": int(NOW) + 100})
    assert token_lifetime(3600, token, now=NOW) == 100.0


def test_jwt_exp_later_than_expires_in_does_not_extend() -> None:
    token = make_jwt({"exp": int(NOW) + 10_000})
    assert token_lifetime(600, token, now=NOW) == 600.0


def test_jwt_exp_in_the_past_gives_zero_not_negative() -> None:
    token = make_jwt({"exp": int(NOW) - 100})
    assert token_lifetime(600, token, now=NOW) == 0.0


@pytest.mark.parametrize("exp", ["1800000010", True, None, [1]])
def test_jwt_exp_that_is_not_a_number_is_ignored(exp: object) -> None:
    token = make_jwt({"exp": exp}) if exp is not None else make_jwt({"sub": "x"})
    assert token_lifetime(600, token, now=NOW) == 600.0


def test_not_after_caps_lifetime() -> None:
    assert token_lifetime(3600, "opaque", not_after=NOW + 42, now=NOW) == 42.0


def test_not_after_in_the_past_gives_zero() -> None:
    assert token_lifetime(3600, "opaque", not_after=NOW - 1, now=NOW) == 0.0


def test_not_after_nan_counts_as_over() -> None:
    assert token_lifetime(3600, "opaque", not_after=float("nan"), now=NOW) == 0.0


def test_smallest_cap_wins() -> None:
    token = make_jwt({"exp": int(NOW) + 500})
    kwargs: dict[str, Any] = {"now": NOW}
    assert token_lifetime(3600, token, cache_ttl_seconds=400, not_after=NOW + 450, **kwargs) == 400
    assert token_lifetime(3600, token, cache_ttl_seconds=600, not_after=NOW + 450, **kwargs) == 450
    assert token_lifetime(3600, token, cache_ttl_seconds=600, not_after=NOW + 900, **kwargs) == 500
    assert token_lifetime(200, token, cache_ttl_seconds=600, not_after=NOW + 900, **kwargs) == 200


# --------------------------------------------------------------------------- CachedToken


def test_cached_token_margin_is_30s_for_long_lifetimes() -> None:
    token = CachedToken("v", obtained_at=1000.0, lifetime=300.0)
    assert token.margin == 30.0
    assert token.usable_until == 1270.0
    assert token.refresh_after == 1000.0 + 0.75 * 270.0
    assert token.expires_at == 1300.0


def test_cached_token_margin_is_half_of_short_lifetimes() -> None:
    token = CachedToken("v", obtained_at=0.0, lifetime=20.0)
    assert token.margin == 10.0
    assert token.usable_until == 10.0
    assert token.refresh_after == 7.5


def test_cached_token_usable_strictly_before_usable_until() -> None:
    token = CachedToken("v", obtained_at=0.0, lifetime=100.0)
    assert token.usable_at(69.999)
    assert not token.usable_at(70.0)
    assert not CachedToken("v", obtained_at=5.0, lifetime=0.0).usable_at(5.0)


def test_cached_token_remaining() -> None:
    token = CachedToken("v", obtained_at=10.0, lifetime=100.0)
    assert token.remaining(60.0) == 50.0
    assert token.remaining(500.0) == 0.0


def test_cached_token_repr_hides_value() -> None:
    token = CachedToken("secret-token-value", obtained_at=0.0, lifetime=1.0)
    assert "secret-token-value" not in repr(token)


def test_cached_token_from_response_applies_lifetime_rules() -> None:
    access = make_jwt({"exp": int(NOW) + 120})
    response = TokenResponse(access, token_type="bearer", expires_in=3600)
    token = CachedToken.from_response(response, obtained_at=50.0, now=NOW)
    assert (token.value, token.obtained_at, token.lifetime, token.token_type) == (
        access,
        50.0,
        120.0,
        "Bearer",
    )
    response = TokenResponse("opaque", token_type="N_A", issued_token_type="urn:x")
    token = CachedToken.from_response(response, obtained_at=0.0, now=NOW, cache_ttl_seconds=90)
    assert (token.lifetime, token.token_type, token.issued_token_type) == (90.0, "N_A", "urn:x")


# --------------------------------------------------------------------------- cache helpers


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key(name: str = "access_token", revision: int = 1) -> CacheKey:
    return CacheKey(
        grant_type="client_credentials",
        token_endpoint="https://idp.example.org/realms/r/protocol/openid-connect/token",
        svid_audience="https://idp.example.org/realms/r",
        client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-spiffe",
        audience="orders",
        scopes=("orders.read",),
        requested_token_type="urn:ietf:params:oauth:token-type:access_token",
        provider="orders",
        revision=revision,
        credential=name,
    )


class Fetcher:
    """A fetch callable that counts calls; each call's outcome is decided by the test."""

    def __init__(self, clock: FakeClock, lifetime: float = 300.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.errors: list[Exception] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    def hold(self) -> asyncio.Event:
        """Make the next fetch wait until the returned event is set."""
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        return self.gate

    async def __call__(self) -> CachedToken:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        return CachedToken(f"token-{self.calls}", obtained_at=self.clock(), lifetime=self.lifetime)


def fixed(token: CachedToken) -> Callable[[], Awaitable[CachedToken]]:
    async def fetch() -> CachedToken:
        return token

    return fetch


# --------------------------------------------------------------------------- hits and misses


async def test_miss_then_hit() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock)
    token, outcome = await cache.get(key(), fetch)
    assert (token.value, outcome) == ("token-1", CacheOutcome.MISS)
    clock.now += 100
    token, outcome = await cache.get(key(), fetch)
    assert (token.value, outcome) == ("token-1", CacheOutcome.HIT)
    assert fetch.calls == 1
    assert len(cache) == 1


async def test_token_never_served_at_or_after_usable_until() -> None:
    clock = FakeClock(0.0)
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock, lifetime=100.0)  # usable until 70, refresh after 52.5
    await cache.get(key(), fetch)
    clock.now = 70.0
    token, outcome = await cache.get(key(), fetch)
    assert (token.value, outcome) == ("token-2", CacheOutcome.MISS)


async def test_distinct_keys_do_not_share_tokens() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock)
    a, _ = await cache.get(key(revision=1), fetch)
    b, _ = await cache.get(key(revision=2), fetch)
    assert (a.value, b.value, fetch.calls, len(cache)) == ("token-1", "token-2", 2, 2)


# --------------------------------------------------------------------------- single flight


async def test_fifty_concurrent_gets_on_a_cold_key_share_one_fetch() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock)
    gate = fetch.hold()
    waiters = [asyncio.create_task(cache.get(key(), fetch)) for _ in range(50)]
    await fetch.started.wait()
    assert cache.in_flight() == 1
    gate.set()
    results = await asyncio.gather(*waiters)
    assert fetch.calls == 1
    assert {token.value for token, _ in results} == {"token-1"}
    outcomes = [outcome for _, outcome in results]
    assert outcomes.count(CacheOutcome.MISS) == 1
    assert outcomes.count(CacheOutcome.SHARED) == 49
    assert cache.in_flight() == 0


async def test_concurrent_failure_reaches_every_waiter_with_one_fetch() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock)
    gate = fetch.hold()
    fetch.errors = [OAuthError("idp down")]
    waiters = [asyncio.create_task(cache.get(key(), fetch)) for _ in range(10)]
    await fetch.started.wait()
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert fetch.calls == 1
    assert all(isinstance(r, OAuthError) and str(r) == "idp down" for r in results)


async def test_cancelling_one_waiter_does_not_cancel_the_shared_fetch() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock)
    gate = fetch.hold()
    first = asyncio.create_task(cache.get(key(), fetch))
    second = asyncio.create_task(cache.get(key(), fetch))
    await fetch.started.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert cache.in_flight() == 1
    gate.set()
    token, outcome = await second
    assert (token.value, outcome, fetch.calls) == ("token-1", CacheOutcome.SHARED, 1)


async def test_fetch_completes_and_is_cached_when_every_waiter_gave_up() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock)
    gate = fetch.hold()
    waiter = asyncio.create_task(cache.get(key(), fetch))
    await fetch.started.wait()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.set()
    await cache.drain()
    token, outcome = await cache.get(key(), fetch)
    assert (token.value, outcome, fetch.calls) == ("token-1", CacheOutcome.HIT, 1)


# --------------------------------------------------------------------------- refresh ahead


async def test_refresh_ahead_starts_exactly_one_background_refresh() -> None:
    clock = FakeClock(0.0)
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock, lifetime=300.0)  # usable until 270, refresh after 202.5
    await cache.get(key(), fetch)

    clock.now = 202.4
    assert (await cache.get(key(), fetch))[1] == CacheOutcome.HIT
    assert cache.in_flight() == 0

    gate = fetch.hold()
    clock.now = 202.5
    token, outcome = await cache.get(key(), fetch)
    assert (token.value, outcome) == ("token-1", CacheOutcome.REFRESH)
    assert cache.in_flight() == 1
    # Further hits keep the cached token and start nothing new.
    for _ in range(20):
        token, outcome = await cache.get(key(), fetch)
        assert (token.value, outcome) == ("token-1", CacheOutcome.HIT)
    await fetch.started.wait()
    assert fetch.calls == 2
    gate.set()
    await cache.drain()
    token, outcome = await cache.get(key(), fetch)
    assert (token.value, outcome) == ("token-2", CacheOutcome.HIT)
    assert token.obtained_at == 202.5


async def test_miss_while_refresh_in_flight_waits_for_it() -> None:
    clock = FakeClock(0.0)
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock, lifetime=100.0)  # usable until 70, refresh after 52.5
    await cache.get(key(), fetch)
    gate = fetch.hold()
    clock.now = 60.0
    assert (await cache.get(key(), fetch))[1] == CacheOutcome.REFRESH
    clock.now = 75.0  # the cached token is past its usable life, the refresh still running
    waiter = asyncio.create_task(cache.get(key(), fetch))
    await fetch.started.wait()
    gate.set()
    token, outcome = await waiter
    assert (token.value, outcome, fetch.calls) == ("token-2", CacheOutcome.SHARED, 2)


async def test_failed_refresh_keeps_serving_the_valid_token() -> None:
    clock = FakeClock(0.0)
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock, lifetime=300.0)
    await cache.get(key(), fetch)
    fetch.errors = [OAuthError("refresh failed")]
    clock.now = 210.0
    assert (await cache.get(key(), fetch))[1] == CacheOutcome.REFRESH
    await cache.drain()
    assert fetch.calls == 2
    # Within the 1 s back-off: still served, no new refresh.
    clock.now = 210.9
    token, outcome = await cache.get(key(), fetch)
    assert (token.value, outcome, fetch.calls) == ("token-1", CacheOutcome.HIT, 2)
    # After the back-off the next hit tries again.
    clock.now = 211.0
    token, outcome = await cache.get(key(), fetch)
    assert (token.value, outcome) == ("token-1", CacheOutcome.REFRESH)
    await cache.drain()
    token, outcome = await cache.get(key(), fetch)
    assert (token.value, outcome, fetch.calls) == ("token-3", CacheOutcome.HIT, 3)


async def test_token_expiring_during_refresh_back_off_fails_fast_with_last_error() -> None:
    clock = FakeClock(0.0)
    cache = TokenCache(clock=clock, backoff_initial=10.0)
    fetch = Fetcher(clock, lifetime=100.0)  # usable until 70
    await cache.get(key(), fetch)
    error = OAuthError("refresh failed")
    fetch.errors = [error]
    clock.now = 65.0
    await cache.get(key(), fetch)
    await cache.drain()
    clock.now = 70.0  # token unusable, back-off until 75
    with pytest.raises(OAuthError) as caught:
        await cache.get(key(), fetch)
    assert caught.value is error
    assert fetch.calls == 2
    assert len(cache) == 0


# --------------------------------------------------------------------------- failures


async def test_failure_is_not_cached_and_fails_fast_during_back_off() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock)
    error = OAuthError("idp said no")
    fetch.errors = [error]
    with pytest.raises(OAuthError) as first:
        await cache.get(key(), fetch)
    assert first.value is error
    assert len(cache) == 0
    clock.now += 0.999
    with pytest.raises(OAuthError) as second:
        await cache.get(key(), fetch)
    assert second.value is error
    assert fetch.calls == 1  # failed fast, the IdP was not asked again
    clock.now += 0.001
    token, outcome = await cache.get(key(), fetch)
    assert (token.value, outcome, fetch.calls) == ("token-2", CacheOutcome.MISS, 2)


async def test_back_off_doubles_up_to_the_cap() -> None:
    clock = FakeClock(0.0)
    cache = TokenCache(clock=clock, backoff_initial=1.0, backoff_max=30.0)
    fetch = Fetcher(clock)
    errors = [OAuthError(f"down {i}") for i in range(9)]
    fetch.errors = list(errors)
    with pytest.raises(OAuthError):
        await cache.get(key(), fetch)
    for attempt, expected in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]):
        calls = fetch.calls
        clock.now += expected - 0.25
        with pytest.raises(OAuthError) as fast:
            await cache.get(key(), fetch)
        assert fast.value is errors[attempt]  # the last error, re-raised
        assert fetch.calls == calls  # ... without asking the IdP
        clock.now += 0.25
        with pytest.raises(OAuthError) as fresh:
            await cache.get(key(), fetch)
        assert fresh.value is errors[attempt + 1]
        assert fetch.calls == calls + 1


async def test_success_resets_back_off() -> None:
    clock = FakeClock(0.0)
    cache = TokenCache(clock=clock, backoff_initial=1.0)
    fetch = Fetcher(clock, lifetime=10.0)  # usable until +5
    for delay in (0.0, 1.0, 2.0):  # three failures: back-offs 1, 2, 4
        clock.now += delay
        fetch.errors = [OAuthError("down")]
        with pytest.raises(OAuthError):
            await cache.get(key(), fetch)
    clock.now += 4.0
    await cache.get(key(), fetch)  # success
    clock.now += 5.0  # expired; the next failure must back off 1 s again, not 8
    fetch.errors = [OAuthError("down")]
    with pytest.raises(OAuthError):
        await cache.get(key(), fetch)
    calls = fetch.calls
    clock.now += 1.0
    token, _ = await cache.get(key(), fetch)
    assert fetch.calls == calls + 1
    assert token.usable_at(clock.now)


async def test_back_off_is_per_key() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock)
    fetch.errors = [OAuthError("down")]
    with pytest.raises(OAuthError):
        await cache.get(key("a"), fetch)
    token, outcome = await cache.get(key("b"), fetch)
    assert (token.value, outcome) == ("token-2", CacheOutcome.MISS)


async def test_token_expired_on_arrival_is_a_failure_with_back_off() -> None:
    clock = FakeClock(500.0)
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock, lifetime=0.0)
    with pytest.raises(ExpiredTokenResponse) as caught:
        await cache.get(key(), fetch)
    assert isinstance(caught.value, InvalidTokenResponse)
    assert "token-1" not in str(caught.value)
    assert len(cache) == 0
    with pytest.raises(ExpiredTokenResponse):
        await cache.get(key(), fetch)
    assert fetch.calls == 1


# --------------------------------------------------------------------------- eviction


async def test_full_cache_evicts_entry_nearest_to_expiry() -> None:
    clock = FakeClock(0.0)
    cache = TokenCache(3, clock=clock)
    for name, lifetime in (("a", 100.0), ("b", 1000.0), ("c", 50.0)):
        await cache.get(key(name), fixed(CachedToken(name, obtained_at=0.0, lifetime=lifetime)))
    await cache.get(key("d"), fixed(CachedToken("d", obtained_at=0.0, lifetime=500.0)))
    assert len(cache) == 3
    assert cache.peek(key("c")) is None
    assert [cache.peek(key(n)) is not None for n in "abd"] == [True, True, True]


async def test_full_cache_evicts_expired_entries_first() -> None:
    clock = FakeClock(0.0)
    cache = TokenCache(4, clock=clock)
    # a, b expire (usable until 10 and 20) before c and d (until 970 and 470).
    for name, lifetime in (("a", 20.0), ("c", 1000.0), ("b", 40.0), ("d", 500.0)):
        await cache.get(key(name), fixed(CachedToken(name, obtained_at=0.0, lifetime=lifetime)))
    clock.now = 30.0
    for name in ("e", "f"):
        await cache.get(key(name), fixed(CachedToken(name, obtained_at=30.0, lifetime=60.0)))
    assert len(cache) == 4
    assert {n for n in "abcdef" if cache.peek(key(n)) is not None} == {"c", "d", "e", "f"}
    # Full again with nothing expired: the nearest to expiry (e, f until 75) go first.
    await cache.get(key("g"), fixed(CachedToken("g", obtained_at=30.0, lifetime=2000.0)))
    remaining = {n for n in "abcdefg" if cache.peek(key(n)) is not None}
    assert len(remaining) == 4
    assert {"c", "d", "g"} <= remaining


async def test_eviction_keeps_the_longest_lived_entries_at_scale() -> None:
    clock = FakeClock(0.0)
    cache = TokenCache(200, clock=clock)
    rng = random.Random(7)
    lifetimes = {f"k{i}": float(rng.randint(61, 3600)) for i in range(2000)}
    for name, lifetime in lifetimes.items():
        token = CachedToken(name, obtained_at=0.0, lifetime=lifetime)
        await cache.get(key(name), fixed(token))
    assert len(cache) == 200
    kept = {name for name in lifetimes if cache.peek(key(name)) is not None}
    # The token just fetched is always stored; room is made by evicting the entry nearest
    # to expiry, so what stays is the newest plus the longest-lived of all the others.
    *older, newest = lifetimes
    expected = [*sorted(lifetimes[n] for n in older)[-199:], lifetimes[newest]]
    assert newest in kept
    # Ties on lifetime make the boundary ambiguous; compare lifetimes rather than names.
    assert sorted(lifetimes[n] for n in kept) == sorted(expected)


async def test_replacing_a_key_does_not_evict_others() -> None:
    clock = FakeClock(0.0)
    cache = TokenCache(2, clock=clock)
    fetch = Fetcher(clock, lifetime=100.0)
    await cache.get(key("a"), fetch)
    await cache.get(key("b"), fixed(CachedToken("b", obtained_at=0.0, lifetime=3600.0)))
    for _ in range(50):  # many replacements of one key, each leaving a stale heap item
        clock.now += 60.0  # past refresh_after (52.5), within usable life (70)
        assert (await cache.get(key("a"), fetch))[1] == CacheOutcome.REFRESH
        await cache.drain()
    assert fetch.calls == 51
    assert len(cache) == 2
    assert cache.peek(key("b")) is not None


async def test_evict_drops_the_entry() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock)
    await cache.get(key(), fetch)
    assert cache.evict(key()) is True
    assert cache.evict(key()) is False
    assert len(cache) == 0
    token, outcome = await cache.get(key(), fetch)
    assert (token.value, outcome) == ("token-2", CacheOutcome.MISS)


async def test_evict_token_drops_only_the_same_value() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock)
    await cache.get(key(), fetch)
    assert cache.evict_token(key(), "some-older-token") is False
    assert cache.peek(key()) is not None
    assert cache.evict_token(key("other"), "token-1") is False
    assert cache.evict_token(key(), "token-1") is True
    assert cache.peek(key()) is None
    token, outcome = await cache.get(key(), fetch)
    assert (token.value, outcome) == ("token-2", CacheOutcome.MISS)


# --------------------------------------------------------------------------- lifecycle


async def test_aclose_cancels_in_flight_fetches() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    fetch = Fetcher(clock)
    fetch.hold()  # never set: only aclose ends it
    waiter = asyncio.create_task(cache.get(key(), fetch))
    await fetch.started.wait()
    await cache.aclose()
    assert cache.in_flight() == 0
    with pytest.raises(RuntimeError, match="closed"):
        await waiter
    with pytest.raises(RuntimeError, match="closed"):
        await cache.get(key(), fetch)


def test_constructor_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenCache(0)
    with pytest.raises(ValueError):
        TokenCache(backoff_initial=5.0, backoff_max=1.0)


def test_cache_key_is_a_hashable_value() -> None:
    assert key() == key()
    assert hash(key()) == hash(key())
    assert key(revision=1) != key(revision=2)
    assert len({key(), key(), key("other")}) == 2

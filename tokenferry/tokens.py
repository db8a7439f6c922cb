"""Token lifetime rules and the token cache shared by the supervisor and the gateway.

SPEC §4.3. Lifetimes are computed once, when a token arrives (:func:`token_lifetime`,
wall clock, because JWT ``exp`` is wall-clock time); from then on the cache works on a
monotonic clock so that wall-clock jumps neither resurrect nor kill cached tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import hmac
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, Final

import jwt
from jwt.types import Options

from tokenferry.oauth import InvalidTokenResponse, TokenResponse

__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_LIFETIME",
    "CacheKey",
    "CacheOutcome",
    "CachedToken",
    "ExpiredTokenResponse",
    "TokenCache",
    "peek_jwt_claims",
    "token_lifetime",
]

# Used when the IdP does not say (RFC 6749 makes expires_in only RECOMMENDED).
DEFAULT_LIFETIME: Final = 300.0
# However long the IdP says a token lives, we ask again within the hour: revocation and
# policy changes at the IdP take effect at least that often.
MAX_LIFETIME: Final = 3600.0
# Tokens are retired this long before their end, so one in flight does not expire on the
# way to the upstream; at most half the lifetime, so short-lived tokens stay usable.
MAX_MARGIN: Final = 30.0
REFRESH_FRACTION: Final = 0.75

_PEEK_OPTIONS: Final[Options] = {
    "verify_signature": False,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
}


def peek_jwt_claims(token: str) -> dict[str, Any] | None:
    """The claims of ``token`` if it is a JWT, decoded WITHOUT verification; else None.

    Only for lifetime bookkeeping and display: never base a trust decision on the result.
    """
    try:
        claims = jwt.decode(token, options=_PEEK_OPTIONS)
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def token_lifetime(
    expires_in: object,
    access_token: str,
    *,
    cache_ttl_seconds: int = 0,
    not_after: float | None = None,
    now: float,
) -> float:
    """Seconds a freshly issued token may be cached (SPEC §4.3); never negative.

    ``expires_in`` counts only when it is a positive integer (``True`` is not). Each cap
    can only shorten the lifetime: ``cache_ttl_seconds`` (when > 0), the token's own JWT
    ``exp``, and ``not_after`` (absolute epoch seconds, e.g. the subject token's expiry).
    ``now`` is the wall clock (epoch seconds) the JWT ``exp`` is compared with.
    """
    if isinstance(expires_in, int) and not isinstance(expires_in, bool) and expires_in > 0:
        lifetime = min(float(expires_in), MAX_LIFETIME)
    else:
        lifetime = DEFAULT_LIFETIME
    if cache_ttl_seconds > 0:
        lifetime = min(lifetime, float(cache_ttl_seconds))
    claims = peek_jwt_claims(access_token)
    if claims is not None:
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool) and math.isfinite(exp):
            lifetime = min(lifetime, exp - now)
    if not_after is not None:
        # A NaN cap cannot be compared; treat it as "already over" rather than "no cap".
        lifetime = min(lifetime, not_after - now) if not math.isnan(not_after) else 0.0
    return max(0.0, lifetime)


@dataclass(frozen=True)
class CachedToken:
    """A token with the bookkeeping the cache needs. Times are cache-clock seconds."""

    value: str = field(repr=False)
    obtained_at: float
    lifetime: float
    token_type: str = "Bearer"
    issued_token_type: str | None = None

    @classmethod
    def from_response(
        cls,
        response: TokenResponse,
        *,
        obtained_at: float,
        now: float,
        cache_ttl_seconds: int = 0,
        not_after: float | None = None,
    ) -> CachedToken:
        """Build from an accepted token response; ``obtained_at`` on the cache clock,
        ``now`` on the wall clock (see :func:`token_lifetime`)."""
        token_type = response.token_type
        return cls(
            value=response.access_token,
            obtained_at=obtained_at,
            lifetime=token_lifetime(
                response.expires_in,
                response.access_token,
                cache_ttl_seconds=cache_ttl_seconds,
                not_after=not_after,
                now=now,
            ),
            token_type="Bearer"
            if token_type is None or token_type.lower() == "bearer"
            else token_type,
            issued_token_type=response.issued_token_type,
        )

    @property
    def margin(self) -> float:
        return min(MAX_MARGIN, self.lifetime / 2)

    @property
    def expires_at(self) -> float:
        """When the token itself ends (cache clock)."""
        return self.obtained_at + self.lifetime

    @property
    def usable_until(self) -> float:
        """Served strictly before this instant, never at or after it."""
        return self.obtained_at + self.lifetime - self.margin

    @property
    def refresh_after(self) -> float:
        """A hit at or after this instant starts a background refresh."""
        return self.obtained_at + REFRESH_FRACTION * (self.lifetime - self.margin)

    def usable_at(self, now: float) -> bool:
        return now < self.usable_until

    def remaining(self, now: float) -> float:
        """Seconds of the token's own life left at ``now`` (for ``expires_in`` answers)."""
        return max(0.0, self.expires_at - now)


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes which token an IdP would issue (SPEC §4.3)."""

    grant_type: str
    token_endpoint: str
    svid_audience: str
    client_assertion_type: str
    audience: str | None
    scopes: tuple[str, ...]
    requested_token_type: str
    provider: str
    # Bumped on every provider change, so entries of an older revision are never served.
    revision: int
    credential: str
    # Gateway only: the intermediate token's audience is the supervisor itself.
    supervisor_id: str | None = None


class CacheOutcome(StrEnum):
    HIT = "hit"
    MISS = "miss"
    REFRESH = "refresh"  # a hit that started a background refresh
    SHARED = "shared"  # waited on a fetch another caller started


class ExpiredTokenResponse(InvalidTokenResponse):
    """A freshly fetched token whose usable life was already over (clock skew between us
    and the IdP, or a subject token about to expire). Counted as a failed fetch, so the
    back-off protects the IdP from a request per call."""


@dataclass
class _Failure:
    error: Exception
    traceback: TracebackType | None
    count: int
    retry_at: float


Fetch = Callable[[], Awaitable[CachedToken]]


class TokenCache:
    """Bounded token cache with single flight, refresh ahead and failure back-off.

    ``fetch`` callables passed to :meth:`get` must build their :class:`CachedToken` with
    ``obtained_at`` taken from this cache's clock (:attr:`clock`).

    All methods must be called from one event loop. Call :meth:`aclose` on shutdown to
    cancel background fetches.
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("back-off must satisfy 0 < backoff_initial <= backoff_max")
        self._max_entries = max_entries
        self._clock = clock
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._entries: dict[CacheKey, CachedToken] = {}
        # Min-heap of (usable_until, sequence, key, token): the next eviction candidate is
        # on top, because expired entries are exactly those with the smallest
        # usable_until. Replaced and evicted entries leave stale items behind, skipped
        # when popped (identity check against _entries) and dropped on compaction.
        self._heap: list[tuple[float, int, CacheKey, CachedToken]] = []
        self._sequence = 0
        # One fetch task per key, shared by every caller that needs it (single flight).
        # Holding the tasks here also keeps them referenced until they finish.
        self._fetches: dict[CacheKey, asyncio.Task[CachedToken]] = {}
        # Insertion-ordered, so the oldest records go first when it outgrows max_entries.
        self._failures: dict[CacheKey, _Failure] = {}
        self._closed = False

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def in_flight(self) -> int:
        """Fetches (misses and background refreshes) currently running."""
        return len(self._fetches)

    def peek(self, key: CacheKey) -> CachedToken | None:
        """The cached token for ``key`` if still usable; no fetch, no refresh, no stats."""
        entry = self._entries.get(key)
        return entry if entry is not None and entry.usable_at(self._clock()) else None

    async def get(self, key: CacheKey, fetch: Fetch) -> tuple[CachedToken, CacheOutcome]:
        """A usable token for ``key``, fetching it with ``fetch`` when needed.

        Raises whatever ``fetch`` raised; during a key's back-off, re-raises the key's
        last error without calling ``fetch``.
        """
        if self._closed:
            raise RuntimeError("token cache is closed")
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            if entry.usable_at(now):
                if (
                    now >= entry.refresh_after
                    and key not in self._fetches
                    and not self._backing_off(key, now)
                ):
                    self._start_fetch(key, fetch)
                    return entry, CacheOutcome.REFRESH
                return entry, CacheOutcome.HIT
            # Never served at or after usable_until.
            del self._entries[key]
        task = self._fetches.get(key)
        if task is not None:
            outcome = CacheOutcome.SHARED
        else:
            failure = self._failures.get(key)
            if failure is not None and now < failure.retry_at:
                raise failure.error.with_traceback(failure.traceback)
            task = self._start_fetch(key, fetch)
            outcome = CacheOutcome.MISS
        return await self._wait(task), outcome

    def evict(self, key: CacheKey) -> bool:
        """Drop the entry for ``key``; True if there was one."""
        return self._entries.pop(key, None) is not None

    def evict_token(self, key: CacheKey, value: str) -> bool:
        """Drop the entry for ``key`` only if it still holds ``value``.

        For an upstream 401: if another request already replaced the token, the new one
        stays.
        """
        entry = self._entries.get(key)
        if entry is None or not hmac.compare_digest(
            entry.value.encode("utf-8"), value.encode("utf-8")
        ):
            return False
        del self._entries[key]
        return True

    async def drain(self) -> None:
        """Wait until no fetch is running (results stored, failures recorded).

        Never cancels a fetch, even when the waiting caller is cancelled.
        """
        while self._fetches:
            await asyncio.wait(list(self._fetches.values()))

    async def aclose(self) -> None:
        """Cancel running fetches and wait for them; further gets raise RuntimeError."""
        self._closed = True
        tasks = list(self._fetches.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._fetches.clear()

    async def __aenter__(self) -> TokenCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ internals

    def _backing_off(self, key: CacheKey, now: float) -> bool:
        failure = self._failures.get(key)
        return failure is not None and now < failure.retry_at

    def _start_fetch(self, key: CacheKey, fetch: Fetch) -> asyncio.Task[CachedToken]:
        task = asyncio.get_running_loop().create_task(
            self._run_fetch(key, fetch), name=f"tokenferry-fetch-{key.provider}/{key.credential}"
        )
        # With an eager task factory the fetch may already be over; registering a finished
        # task would make every later caller "share" its stale result.
        if not task.done():
            self._fetches[key] = task
        task.add_done_callback(_consume_exception)
        return task

    async def _run_fetch(self, key: CacheKey, fetch: Fetch) -> CachedToken:
        try:
            token = await fetch()
            if not token.usable_at(self._clock()):
                raise ExpiredTokenResponse(
                    f"the token for {key.provider}/{key.credential} was already at the end of "
                    f"its usable life when it arrived (lifetime {token.lifetime:.0f} s); check "
                    "the clocks of this host and the IdP, and the subject token's expiry"
                )
        except Exception as exc:
            self._record_failure(key, exc)
            raise
        else:
            self._failures.pop(key, None)
            self._store(key, token)
            return token
        finally:
            if self._fetches.get(key) is asyncio.current_task():
                del self._fetches[key]

    async def _wait(self, task: asyncio.Task[CachedToken]) -> CachedToken:
        try:
            # Shielded: one caller giving up must not cancel the fetch others wait for.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or current.cancelling() == 0):
                # The fetch was cancelled by aclose(), not this caller: report that rather
                # than a CancelledError that would look like our own cancellation.
                raise RuntimeError("token cache closed while fetching") from None
            raise

    def _record_failure(self, key: CacheKey, error: Exception) -> None:
        previous = self._failures.pop(key, None)
        count = previous.count + 1 if previous is not None else 1
        delay = min(self._backoff_initial * 2 ** (count - 1), self._backoff_max)
        self._failures[key] = _Failure(
            error=error,
            traceback=error.__traceback__,
            count=count,
            retry_at=self._clock() + delay,
        )
        while len(self._failures) > self._max_entries:
            del self._failures[next(iter(self._failures))]

    def _store(self, key: CacheKey, token: CachedToken) -> None:
        now = self._clock()
        self._drop_expired(now)
        if key not in self._entries and len(self._entries) >= self._max_entries:
            self._evict_nearest()
        self._entries[key] = token
        self._sequence += 1
        heapq.heappush(self._heap, (token.usable_until, self._sequence, key, token))
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._compact()

    def _drop_expired(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, key, token = heapq.heappop(heap)
            if self._entries.get(key) is token:
                del self._entries[key]

    def _evict_nearest(self) -> None:
        heap = self._heap
        while heap:
            _, _, key, token = heapq.heappop(heap)
            if self._entries.get(key) is token:
                del self._entries[key]
                return

    def _compact(self) -> None:
        self._heap = [item for item in self._heap if self._entries.get(item[2]) is item[3]]
        heapq.heapify(self._heap)


def _consume_exception(task: asyncio.Task[CachedToken]) -> None:
    # Failures are recorded by the cache and raised to waiters; a background refresh has
    # no waiter, so mark its exception as retrieved to avoid asyncio's "never retrieved".
    if not task.cancelled():
        with contextlib.suppress(BaseException):
            task.exception()

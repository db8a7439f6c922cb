"""Token endpoint client: the two grants tokenferry performs and their response checks.

SPEC §4.1. One :class:`TokenEndpointClient` per process component (supervisor, gateway);
it owns one aiohttp session, created lazily inside the running event loop.

What the client guarantees:

- requests are form-encoded POSTs with ``Accept: application/json``;
- redirects are never followed (a 3xx is an :class:`InvalidTokenResponse`): a token
  endpoint that redirects would make us re-send the client assertion elsewhere;
- ``HTTP(S)_PROXY`` variables are ignored (``trust_env=False``): the supervisor runs with
  the sandbox's proxy settings nearby, and assertions must go straight to the IdP;
- timeouts and the response size cap come from :class:`TokenClientConfig`; the body is read
  incrementally and abandoned as soon as it exceeds the cap, whatever ``Content-Length``
  claims;
- one retry after 200-500 ms of jitter on connection errors and on 502/503/504 only;
- no exception message ever contains the access token, the client assertion or the
  subject token; non-RFC error bodies are never echoed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import ssl
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from tokenferry.profiles import ACCESS_TOKEN_TYPE, JWT_BEARER_ASSERTION

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "JWT_BEARER_ASSERTION",
    "TOKEN_EXCHANGE_GRANT_TYPE",
    "InvalidTokenResponse",
    "OAuthError",
    "TokenClientConfig",
    "TokenEndpointClient",
    "TokenEndpointError",
    "TokenEndpointUnavailable",
    "TokenResponse",
]

log = logging.getLogger(__name__)

TOKEN_EXCHANGE_GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"

MAX_ACCESS_TOKEN_CHARS: Final = 16 * 1024
MAX_ERROR_FIELD_CHARS: Final = 256

# RFC 6750 b64token: the only shape we will ever put into an Authorization header.
_ACCESS_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*")
# 502/503/504 say "the IdP (or its load balancer) is momentarily unavailable"; every other
# status is an answer, and asking again would only get the same answer.
_RETRY_STATUSES: Final = frozenset({502, 503, 504})
# Unicode categories removed from IdP-supplied text before it reaches logs and API bodies:
# C0/C1 controls (log injection, terminal escapes), format characters such as bidi
# overrides (text that reads differently than it is), and line/paragraph separators.
_STRIPPED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp"})
# Pieces of a secret shorter than this are not worth redacting (and would mangle text).
_MIN_REDACT_CHARS: Final = 16


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class TokenResponse:
    """An accepted token endpoint response (RFC 6749 §5.1, RFC 8693 §2.2.1)."""

    access_token: str = field(repr=False)
    token_type: str | None = None
    issued_token_type: str | None = None
    # Only a positive integer is kept; anything else is None (lifetime rules apply).
    expires_in: int | None = None
    scope: str | None = None


@dataclass(frozen=True)
class TokenClientConfig:
    """Timeouts and limits of the token endpoint client (seconds, bytes)."""

    connect_timeout: float = 5.0
    total_timeout: float = 15.0
    max_body_bytes: int = 64 * 1024
    # Uniform random delay before the single retry.
    retry_delay: tuple[float, float] = (0.2, 0.5)
    # For HTTPS IdPs signed by a private CA; None means the system trust store.
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.connect_timeout <= 0 or self.total_timeout <= 0:
            raise ValueError("token client timeouts must be positive")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        low, high = self.retry_delay
        if low < 0 or high < low:
            raise ValueError("retry_delay must be (low, high) with 0 <= low <= high")


# --------------------------------------------------------------------------- exceptions


class OAuthError(Exception):
    """A token could not be obtained. The message never contains a token or assertion."""

    def __init__(self, message: str, *, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint


class TokenEndpointError(OAuthError):
    """The IdP refused the request with an RFC 6749 §5.2 error body (sanitised)."""

    def __init__(
        self, status: int, error: str, description: str | None, *, endpoint: str | None = None
    ) -> None:
        where = f"token endpoint {endpoint}" if endpoint else "token endpoint"
        message = f"{where} refused the request (HTTP {status}): {error}"
        if description:
            message += f": {description}"
        super().__init__(message, endpoint=endpoint)
        self.status = status
        self.error = error
        self.description = description

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_endpoint_error, (self.status, self.error, self.description, self.endpoint))


def _rebuild_endpoint_error(
    status: int, error: str, description: str | None, endpoint: str | None
) -> TokenEndpointError:
    return TokenEndpointError(status, error, description, endpoint=endpoint)


class TokenEndpointUnavailable(OAuthError):
    """The IdP could not be reached or answered with a non-RFC error (after the retry).

    ``status`` is the HTTP status when there was an answer, None for connection errors and
    timeouts. The response body is never included.
    """

    def __init__(
        self, message: str, *, endpoint: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(message, endpoint=endpoint)
        self.status = status


class InvalidTokenResponse(OAuthError):
    """The IdP answered with something that is not an acceptable token response.

    Non-JSON, missing or ill-formed ``access_token``, body over the size cap, unknown
    ``token_type``, or a redirect (never followed).
    """


# --------------------------------------------------------------------------- sanitising


def sanitise_text(
    text: str, *, secrets: Sequence[str] = (), limit: int = MAX_ERROR_FIELD_CHARS
) -> str:
    """Make IdP-supplied text safe to log and return: no control characters, no secrets,
    at most ``limit`` characters.

    Secrets are redacted after control characters are removed (so a secret split by a
    control character is still found) and before cutting (so a cut cannot leave the
    front part of a secret). JWT-shaped secrets are also redacted segment by segment, for
    IdPs that echo just the header or payload of an assertion they disliked.
    """
    cleaned = "".join(ch for ch in text if unicodedata.category(ch) not in _STRIPPED_CATEGORIES)
    for secret in secrets:
        for piece in _secret_pieces(secret):
            cleaned = cleaned.replace(piece, "[redacted]")
    return cleaned[:limit]


def _secret_pieces(secret: str) -> list[str]:
    pieces = [secret] if secret else []
    pieces += [part for part in secret.split(".") if len(part) >= _MIN_REDACT_CHARS]
    # Longest first, so a whole secret is replaced before its parts.
    return sorted(set(pieces), key=len, reverse=True)


def parse_error_body(
    status: int, body: bytes, *, secrets: Sequence[str] = (), endpoint: str | None = None
) -> TokenEndpointError | None:
    """The RFC 6749 §5.2 error in ``body``, sanitised; None if the body is not one."""
    data = _json_object(body)
    if data is None:
        return None
    error = data.get("error")
    if not isinstance(error, str):
        return None
    error = sanitise_text(error, secrets=secrets)
    if not error:
        return None
    raw_description = data.get("error_description")
    description = (
        sanitise_text(raw_description, secrets=secrets) or None
        if isinstance(raw_description, str)
        else None
    )
    return TokenEndpointError(status, error, description, endpoint=endpoint)


def parse_token_response(body: bytes, *, endpoint: str | None = None) -> TokenResponse:
    """Check a successful response body (SPEC §4.1) and return its fields."""
    where = f"token endpoint {endpoint}" if endpoint else "token endpoint"
    data = _json_object(body)
    if data is None:
        raise InvalidTokenResponse(
            f"{where} answered with a body that is not a JSON object", endpoint=endpoint
        )
    access_token = data.get("access_token")
    if not isinstance(access_token, str):
        raise InvalidTokenResponse(
            f"{where} answered without a string access_token", endpoint=endpoint
        )
    if len(access_token) > MAX_ACCESS_TOKEN_CHARS:
        raise InvalidTokenResponse(
            f"{where} returned an access_token of {len(access_token)} characters "
            f"(limit {MAX_ACCESS_TOKEN_CHARS})",
            endpoint=endpoint,
        )
    if not _ACCESS_TOKEN_RE.fullmatch(access_token):
        # Characters outside the RFC 6750 token68 set could split or forge headers.
        raise InvalidTokenResponse(
            f"{where} returned an access_token with characters not allowed in a bearer token",
            endpoint=endpoint,
        )
    token_type = data.get("token_type")
    if token_type is not None and not (
        isinstance(token_type, str) and (token_type.lower() == "bearer" or token_type == "N_A")
    ):
        shown = sanitise_text(token_type, limit=40) if isinstance(token_type, str) else "non-string"
        raise InvalidTokenResponse(
            f"{where} returned token_type {shown!r}; only Bearer and N_A are supported",
            endpoint=endpoint,
        )
    expires_in = data.get("expires_in")
    issued_token_type = data.get("issued_token_type")
    scope = data.get("scope")
    return TokenResponse(
        access_token=access_token,
        token_type=token_type,
        issued_token_type=issued_token_type if isinstance(issued_token_type, str) else None,
        expires_in=(
            expires_in
            if isinstance(expires_in, int) and not isinstance(expires_in, bool) and expires_in > 0
            else None
        ),
        scope=scope if isinstance(scope, str) else None,
    )


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers bad UTF-8, bad JSON and over-long integers. The decode error
        # carries the whole document, so it is dropped here rather than chained.
        return None
    return data if isinstance(data, dict) else None


def display_endpoint(endpoint: str) -> str:
    """The token endpoint as shown in messages: no user info, query or fragment."""
    try:
        url = URL(endpoint)
        return str(url.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<invalid URL>"


# --------------------------------------------------------------------------- client


class _Retryable(Exception):
    """Internal: this attempt failed in a way worth one more try."""

    def __init__(self, final: OAuthError) -> None:
        super().__init__(str(final))
        self.final = final


class TokenEndpointClient:
    """Async client for OAuth 2.0 token endpoints (client_credentials, token exchange).

    Use as an async context manager or call :meth:`aclose`. Safe to share between tasks
    of one event loop.
    """

    def __init__(self, config: TokenClientConfig | None = None) -> None:
        self._config = config or TokenClientConfig()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def config(self) -> TokenClientConfig:
        return self._config

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def client_credentials(
        self,
        token_endpoint: str,
        *,
        client_assertion: str,
        client_assertion_type: str = JWT_BEARER_ASSERTION,
        audience: str | None = None,
        scopes: Sequence[str] = (),
    ) -> TokenResponse:
        """RFC 6749 §4.4 with an RFC 7523 client assertion (the JWT-SVID)."""
        fields: dict[str, str] = {
            "grant_type": "client_credentials",
            "client_assertion_type": client_assertion_type,
            "client_assertion": client_assertion,
        }
        _add_target(fields, audience, scopes)
        return await self._request(token_endpoint, fields, secrets=(client_assertion,))

    async def token_exchange(
        self,
        token_endpoint: str,
        *,
        client_assertion: str,
        client_assertion_type: str,
        subject_token: str,
        subject_token_type: str = ACCESS_TOKEN_TYPE,
        requested_token_type: str = ACCESS_TOKEN_TYPE,
        audience: str | None = None,
        scopes: Sequence[str] = (),
    ) -> TokenResponse:
        """RFC 8693 token exchange, client authenticated by an RFC 7523 assertion."""
        fields: dict[str, str] = {
            "grant_type": TOKEN_EXCHANGE_GRANT_TYPE,
            "client_assertion_type": client_assertion_type,
            "client_assertion": client_assertion,
            "subject_token": subject_token,
            "subject_token_type": subject_token_type,
            "requested_token_type": requested_token_type,
        }
        _add_target(fields, audience, scopes)
        return await self._request(
            token_endpoint, fields, secrets=(client_assertion, subject_token)
        )

    # ------------------------------------------------------------------ internals

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("TokenEndpointClient is closed")
        if self._session is None:
            cfg = self._config
            # Created here, not in __init__, so it binds to the loop that actually runs it.
            connector = aiohttp.TCPConnector(
                ssl=cfg.ssl_context if cfg.ssl_context is not None else True
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=cfg.total_timeout, connect=cfg.connect_timeout),
                trust_env=False,
                auto_decompress=True,
            )
        return self._session

    async def _request(
        self, token_endpoint: str, fields: Mapping[str, str], *, secrets: Sequence[str]
    ) -> TokenResponse:
        shown = display_endpoint(token_endpoint)
        url = _check_endpoint(token_endpoint, shown)
        session = self._ensure_session()
        body = urlencode(fields).encode("ascii")
        try:
            return await self._attempt(session, url, body, shown, secrets)
        except _Retryable as first:
            low, high = self._config.retry_delay
            # Jitter spreads retries of many supervisors hitting one recovering IdP; it has
            # no security role, so the non-cryptographic generator is fine.
            delay = random.uniform(low, high)  # noqa: S311
            log.info(
                "token request failed, retrying once",
                extra={"token_endpoint": shown, "reason": str(first.final), "delay_s": delay},
            )
            await asyncio.sleep(delay)
        try:
            return await self._attempt(session, url, body, shown, secrets)
        except _Retryable as second:
            final = second.final
        raise final

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        url: URL,
        body: bytes,
        shown: str,
        secrets: Sequence[str],
    ) -> TokenResponse:
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
            # Decompression bombs are capped too, but there is no reason to invite them.
            "Accept-Encoding": "identity",
        }
        cfg = self._config
        # Failures are raised after the try block, so they carry no __context__: aiohttp's
        # parser errors quote raw response bytes, which must not travel with our errors.
        failure: OAuthError | None = None
        retryable = False
        status = 0
        payload: bytes | None = None
        try:
            async with session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                payload = await _read_capped(response, cfg.max_body_bytes)
                if payload is None:
                    response.close()  # abandon the rest of an oversized body
                elif not 200 <= status < 300:
                    response.close()  # error bodies say nothing about the connection's state
        except (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch) as exc:
            # A certificate problem will not go away on retry.
            failure = TokenEndpointUnavailable(
                f"TLS verification of token endpoint {shown} failed: {_describe_tls(exc)}",
                endpoint=shown,
            )
        except aiohttp.ClientConnectionError as exc:
            # Refused, reset, DNS failure, connect timeout, server closed before answering.
            failure = TokenEndpointUnavailable(
                f"token endpoint {shown} is unreachable: {_describe(exc)}", endpoint=shown
            )
            retryable = True
        except TimeoutError:
            # The total budget is spent; a retry would double the caller's wait.
            failure = TokenEndpointUnavailable(
                f"token endpoint {shown} did not answer within {cfg.total_timeout:g} s",
                endpoint=shown,
            )
        except aiohttp.ClientError as exc:
            # Malformed HTTP or a body cut off mid-way: the answer is unusable.
            failure = TokenEndpointUnavailable(
                f"token endpoint {shown} sent a broken HTTP response ({type(exc).__name__})",
                endpoint=shown,
            )
        if failure is not None:
            raise _Retryable(failure) if retryable else failure

        if payload is None:
            raise InvalidTokenResponse(
                f"token endpoint {shown} sent a response body larger than "
                f"{cfg.max_body_bytes} bytes",
                endpoint=shown,
            )
        if 200 <= status < 300:
            return parse_token_response(payload, endpoint=shown)
        if 300 <= status < 400:
            raise InvalidTokenResponse(
                f"token endpoint {shown} answered with a redirect (HTTP {status}); "
                "redirects are not followed: configure the final token endpoint URL",
                endpoint=shown,
            )
        rfc_error = parse_error_body(status, payload, secrets=secrets, endpoint=shown)
        if status in _RETRY_STATUSES:
            raise _Retryable(
                rfc_error
                or TokenEndpointUnavailable(
                    f"token endpoint {shown} answered HTTP {status}", endpoint=shown, status=status
                )
            )
        if rfc_error is not None:
            raise rfc_error
        # Not an RFC 6749 error body: it could be an HTML page echoing the request, so none
        # of it is repeated.
        raise TokenEndpointUnavailable(
            f"token endpoint {shown} answered HTTP {status} without an OAuth error body",
            endpoint=shown,
            status=status,
        )


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to exceed ``limit`` bytes.

    Counts bytes actually received: ``Content-Length`` is only used to give up early.
    """
    declared = response.content_length
    if declared is not None and declared > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


def _add_target(fields: dict[str, str], audience: str | None, scopes: Sequence[str]) -> None:
    if isinstance(scopes, str):
        raise TypeError("scopes must be a sequence of scope strings, not a string")
    for scope in scopes:
        if not scope or any(ch.isspace() for ch in scope):
            raise ValueError(f"invalid scope {scope!r}: scopes are non-empty, without spaces")
    if audience:
        fields["audience"] = audience
    if scopes:
        fields["scope"] = " ".join(scopes)


def _check_endpoint(token_endpoint: str, shown: str) -> URL:
    try:
        url = URL(token_endpoint)
    except (ValueError, TypeError):
        raise ValueError(f"token endpoint {shown} is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"token endpoint {shown} must be an http:// or https:// URL")
    return url


def _describe_tls(exc: BaseException) -> str:
    cert_error = getattr(exc, "certificate_error", None)
    reason = getattr(cert_error, "verify_message", None) or getattr(cert_error, "reason", None)
    return str(reason) if reason else type(exc).__name__


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{type(exc).__name__} ({exc.os_error.strerror or type(exc.os_error).__name__})"
    return type(exc).__name__

"""CLI user login: the OAuth 2.0 device authorization grant and the local token store.

``tokenferry login`` (SPEC §7) asks the gateway which issuer and client id to use
(``GET /v1/auth/config``), discovers the issuer's endpoints, runs the RFC 8628 device flow
and stores the tokens in ``$XDG_CONFIG_HOME/tokenferry/credentials.json`` (default
``~/.config``): the directory is 0700 and the file is created 0600 before a byte is
written, then atomically renamed into place, so no other user can ever read a token from
it, not even while it is being written.

Later commands call :func:`fresh_login`, which refreshes the access token with the
refresh_token grant when it expires within 30 s. Refreshes happen under a lock file:
refresh tokens rotate (each works once), so two CLI processes refreshing at the same
time would otherwise log each other out.

Nothing here puts a token (access, refresh, device code) into an exception message or a
repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from tokenferry.profiles import is_loopback_host

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "DEVICE_CODE_GRANT",
    "REFRESH_MARGIN",
    "DeviceAuthorization",
    "IdpEndpoints",
    "IssuedTokens",
    "LoginError",
    "OidcClient",
    "StoredLogin",
    "TokenStore",
    "config_dir",
    "fresh_login",
    "normalise_gateway",
    "poll_for_tokens",
]

DEVICE_CODE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
# A token that expires within this many seconds is refreshed before it is used or stored
# at the gateway (SPEC §7): it must survive the request that carries it.
REFRESH_MARGIN: Final = 30.0
# RFC 8628 §3.5: "slow_down" adds 5 seconds to the polling interval; absent interval is 5.
SLOW_DOWN_STEP: Final = 5
DEFAULT_INTERVAL: Final = 5
MAX_BODY_BYTES: Final = 64 * 1024
STORE_FILE: Final = "credentials.json"
LOCK_FILE: Final = "credentials.lock"
STORE_VERSION: Final = 1
# A refresh token is opaque, but it goes into a form body and a JSON file: printable
# ASCII only (RFC 6749 §A.17 VSCHAR), bounded.
_REFRESH_TOKEN_RE: Final = re.compile(r"[\x20-\x7e]{1,16384}")


class LoginError(Exception):
    """Logging in or using the stored login failed; the message says what to do."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class IdpEndpoints:
    issuer: str
    device_authorization_endpoint: str
    token_endpoint: str


@dataclass(frozen=True)
class DeviceAuthorization:
    """RFC 8628 §3.2 device authorization response."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


@dataclass(frozen=True)
class IssuedTokens:
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    # Epoch seconds: the access token's JWT ``exp``, else now + ``expires_in``, else None.
    expires_at: float | None
    subject: str | None


@dataclass(frozen=True)
class StoredLogin:
    """One gateway's login as kept in the token store."""

    gateway: str
    issuer: str
    client_id: str
    token_endpoint: str
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: float | None
    subject: str | None = None

    def remaining(self, now: float) -> float:
        """Seconds until the access token expires (infinite when its expiry is unknown)."""
        return float("inf") if self.expires_at is None else self.expires_at - now

    def to_json(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway,
            "issuer": self.issuer,
            "client_id": self.client_id,
            "token_endpoint": self.token_endpoint,
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "expires_at": self.expires_at,
            "subject": self.subject,
        }

    @classmethod
    def from_json(cls, data: object) -> StoredLogin | None:
        """None for an entry that is not what this version writes (treated as logged out)."""
        if not isinstance(data, dict):
            return None
        text = ("gateway", "issuer", "client_id", "token_endpoint", "access_token")
        if not all(isinstance(data.get(k), str) and data.get(k) for k in text):
            return None
        refresh = data.get("refresh_token")
        expires_at = data.get("expires_at")
        subject = data.get("subject")
        return cls(
            gateway=data["gateway"],
            issuer=data["issuer"],
            client_id=data["client_id"],
            token_endpoint=data["token_endpoint"],
            access_token=data["access_token"],
            refresh_token=refresh if isinstance(refresh, str) and refresh else None,
            expires_at=float(expires_at)
            if isinstance(expires_at, int | float) and not isinstance(expires_at, bool)
            else None,
            subject=subject if isinstance(subject, str) else None,
        )


def normalise_gateway(url: str) -> str:
    """The gateway URL as a store key: scheme and host lower-cased, no trailing slash."""
    try:
        parts = urlsplit(url.strip())
        # .hostname and .port validate bracketed IPv6 literals and the port range.
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port
    except ValueError as exc:
        raise LoginError(f"gateway URL {url[:200]!r} is not a valid URL ({exc})") from None
    if not valid:
        raise LoginError(f"gateway URL {url[:200]!r} is not an http:// or https:// URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise LoginError(
            f"gateway URL {url[:200]!r} must not have user info, a query or a fragment"
        )
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc.lower()}{path}"


# --------------------------------------------------------------------------- token store


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/tokenferry``; XDG says a relative value is to be ignored."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "tokenferry"


class TokenStore:
    """The logins of this user, one per gateway, in one JSON file (mode 0600)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else config_dir()

    def __repr__(self) -> str:
        return f"TokenStore({str(self.directory)!r})"

    @property
    def path(self) -> Path:
        return self.directory / STORE_FILE

    def _document(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise LoginError(f"cannot read the token store {self.path}: {exc.strerror}") from None
        try:
            data = json.loads(raw)
        except ValueError:
            # The error text would quote the file (tokens): say only where.
            raise LoginError(
                f"the token store {self.path} is not valid JSON; delete it and log in again"
            ) from None
        return data if isinstance(data, dict) else {}

    def logins(self) -> dict[str, StoredLogin]:
        raw = self._document().get("logins")
        out: dict[str, StoredLogin] = {}
        if isinstance(raw, dict):
            for key, value in raw.items():
                login = StoredLogin.from_json(value)
                if login is not None:
                    out[str(key)] = login
        return out

    def get(self, gateway: str) -> StoredLogin | None:
        return self.logins().get(normalise_gateway(gateway))

    def default_gateway(self) -> str | None:
        value = self._document().get("default_gateway")
        return value if isinstance(value, str) and value else None

    def save(self, login: StoredLogin, *, make_default: bool = True) -> None:
        document = self._document()
        logins = document.get("logins")
        if not isinstance(logins, dict):
            logins = {}
        logins[normalise_gateway(login.gateway)] = login.to_json()
        document = {
            "version": STORE_VERSION,
            "default_gateway": normalise_gateway(login.gateway)
            if make_default
            else document.get("default_gateway"),
            "logins": logins,
        }
        self._write(document)

    def remove(self, gateway: str) -> bool:
        document = self._document()
        logins = document.get("logins")
        key = normalise_gateway(gateway)
        if not isinstance(logins, dict) or key not in logins:
            return False
        del logins[key]
        if document.get("default_gateway") == key:
            document["default_gateway"] = None
        self._write(document)
        return True

    def _ensure_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask and ignored when the directory exists.
            os.chmod(self.directory, 0o700)
        except OSError as exc:
            raise LoginError(
                f"cannot create the token store directory {self.directory}: {exc.strerror}"
            ) from None

    def _write(self, document: dict[str, Any]) -> None:
        self._ensure_directory()
        data = json.dumps(document, indent=2).encode() + b"\n"
        # mkstemp creates the file O_EXCL with mode 0600: the token is never readable by
        # others, not even for the moment between creation and a chmod.
        fd, tmp_name = tempfile.mkstemp(prefix=".credentials-", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise LoginError(f"cannot write the token store {self.path}: {exc.strerror}") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock across CLI processes (held while refreshing)."""
        self._ensure_directory()
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- HTTP to the IdP


def check_idp_url(url: str, what: str) -> str:
    """Device codes and refresh tokens travel to these URLs: https, or http on loopback."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and is_loopback_host(host):
        return url
    raise LoginError(
        f"{what} {url[:200]!r} must be an https:// URL (http:// only for loopback hosts)"
    )


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


class OidcClient:
    """The few OAuth requests the CLI makes: discovery, device authorization, token."""

    def __init__(self, *, timeout: float = 15.0) -> None:
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OidcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            # trust_env=False: refresh tokens go straight to the IdP, never via a proxy
            # named in the environment.
            self._session = aiohttp.ClientSession(
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=self._timeout, connect=5.0),
            )
        return self._session

    async def _call(
        self, method: str, url: str, form: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        import aiohttp

        try:
            async with self._http().request(
                method,
                url,
                data=form,
                headers={"Accept": "application/json"},
                allow_redirects=False,
            ) as response:
                body = await response.content.read(MAX_BODY_BYTES + 1)
                if len(body) > MAX_BODY_BYTES:
                    raise LoginError(f"{url}: answer larger than {MAX_BODY_BYTES} bytes")
                return response.status, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Unavailable(f"cannot reach {url}: {_describe_failure(exc)}") from None

    async def discover(self, issuer: str) -> IdpEndpoints:
        check_idp_url(issuer, "issuer")
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            status, body = await self._call("GET", url)
        except _Unavailable as exc:
            raise LoginError(f"OIDC discovery failed: {exc}") from None
        data = _json_object(body)
        if status != 200 or data is None:
            raise LoginError(f"OIDC discovery at {url} failed (HTTP {status})")
        # OpenID Connect Discovery §4.3: the document must be about the issuer we asked.
        if str(data.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
            raise LoginError(f"OIDC discovery at {url} names a different issuer")
        device = data.get("device_authorization_endpoint")
        token = data.get("token_endpoint")
        if not isinstance(device, str) or not device:
            raise LoginError(
                f"the identity provider {issuer} does not offer the device authorization "
                "grant (no device_authorization_endpoint in its discovery document)"
            )
        if not isinstance(token, str) or not token:
            raise LoginError(f"the discovery document of {issuer} has no token_endpoint")
        return IdpEndpoints(
            issuer=issuer,
            device_authorization_endpoint=check_idp_url(device, "device authorization endpoint"),
            token_endpoint=check_idp_url(token, "token endpoint"),
        )

    async def start_device_authorization(
        self, endpoint: str, client_id: str, scope: str | None = None
    ) -> DeviceAuthorization:
        form = {"client_id": client_id}
        if scope:
            form["scope"] = scope
        try:
            status, body = await self._call("POST", endpoint, form)
        except _Unavailable as exc:
            raise LoginError(f"device authorization failed: {exc}") from None
        if status != 200:
            raise LoginError(f"device authorization refused: {_oauth_error(status, body)}")
        data = _json_object(body)
        if data is None:
            raise LoginError("device authorization answer is not a JSON object")
        device_code = data.get("device_code")
        user_code = data.get("user_code")
        uri = data.get("verification_uri")
        if not (isinstance(device_code, str) and device_code):
            raise LoginError("device authorization answer has no device_code")
        if not (isinstance(user_code, str) and user_code):
            raise LoginError("device authorization answer has no user_code")
        if not (isinstance(uri, str) and uri):
            raise LoginError("device authorization answer has no verification_uri")
        complete = data.get("verification_uri_complete")
        return DeviceAuthorization(
            device_code=device_code,
            user_code=_printable(user_code),
            verification_uri=_printable(uri),
            verification_uri_complete=_printable(complete) if isinstance(complete, str) else None,
            expires_in=_positive_int(data.get("expires_in"), 600),
            interval=_positive_int(data.get("interval"), DEFAULT_INTERVAL, allow_zero=True),
        )

    async def token_request(self, endpoint: str, form: dict[str, str]) -> IssuedTokens:
        """POST the token endpoint; an RFC 6749 §5.2 error raises ``TokenError``."""
        status, body = await self._call("POST", endpoint, form)
        if status != 200:
            error = _oauth_error_fields(body, secrets=list(form.values()))
            if error is not None:
                raise TokenError(status, error[0], error[1])
            raise _Unavailable(f"token endpoint {endpoint} answered HTTP {status}")
        return parse_issued_tokens(body, now=time.time())

    async def device_token(self, endpoint: str, client_id: str, device_code: str) -> IssuedTokens:
        return await self.token_request(
            endpoint,
            {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code, "client_id": client_id},
        )

    async def refresh(self, endpoint: str, client_id: str, refresh_token: str) -> IssuedTokens:
        try:
            return await self.token_request(
                endpoint,
                {
                    "grant_type": "refresh_token",
                    "refresh_token": refresh_token,
                    "client_id": client_id,
                },
            )
        except TokenError as exc:
            if exc.error in ("invalid_grant", "invalid_client", "unauthorized_client"):
                raise LoginError(
                    f"your login has expired (the identity provider refused the refresh "
                    f"token: {exc.describe()}): run tokenferry login"
                ) from None
            raise LoginError(f"refreshing the login failed: {exc.describe()}") from None
        except _Unavailable as exc:
            raise LoginError(f"refreshing the login failed: {exc}") from None


class TokenError(Exception):
    """An RFC 6749 §5.2 error answer of the token endpoint (sanitised)."""

    def __init__(self, status: int, error: str, description: str | None) -> None:
        super().__init__(f"{error} (HTTP {status})")
        self.status = status
        self.error = error
        self.description = description

    def describe(self) -> str:
        return f"{self.error}: {self.description}" if self.description else self.error


class _Unavailable(Exception):
    """No usable answer (connection error, timeout, non-RFC error status)."""


def _printable(text: str) -> str:
    # Shown on the terminal: no escape sequences from a hostile IdP.
    return "".join(ch for ch in text if ch.isprintable())[:2048]


def _positive_int(value: object, default: int, *, allow_zero: bool = False) -> int:
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (value > 0 or (allow_zero and value == 0))
    ):
        return value
    return default


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _oauth_error_fields(body: bytes, *, secrets: list[str]) -> tuple[str, str | None] | None:
    from tokenferry.oauth import sanitise_text

    data = _json_object(body)
    if data is None or not isinstance(data.get("error"), str):
        return None
    error = sanitise_text(data["error"], secrets=secrets)
    if not error:
        return None
    description = data.get("error_description")
    return error, (
        sanitise_text(description, secrets=secrets) or None
        if isinstance(description, str)
        else None
    )


def _oauth_error(status: int, body: bytes) -> str:
    fields = _oauth_error_fields(body, secrets=[])
    if fields is None:
        return f"HTTP {status}"
    error, description = fields
    return f"{error}: {description}" if description else error


def parse_issued_tokens(body: bytes, *, now: float) -> IssuedTokens:
    """A successful token response: access token checked as SPEC §4.1 says, plus refresh."""
    from tokenferry.oauth import InvalidTokenResponse, parse_token_response
    from tokenferry.tokens import peek_jwt_claims

    try:
        response = parse_token_response(body)
    except InvalidTokenResponse as exc:
        raise LoginError(f"unusable answer from the identity provider: {exc}") from None
    data = _json_object(body) or {}
    refresh = data.get("refresh_token")
    if refresh is not None and not (
        isinstance(refresh, str) and _REFRESH_TOKEN_RE.fullmatch(refresh)
    ):
        raise LoginError("the identity provider returned an unusable refresh_token")
    claims = peek_jwt_claims(response.access_token) or {}
    exp = claims.get("exp")
    expires_at: float | None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        expires_at = float(exp)
    elif response.expires_in is not None:
        expires_at = now + response.expires_in
    else:
        expires_at = None
    subject = claims.get("preferred_username") or claims.get("sub")
    return IssuedTokens(
        access_token=response.access_token,
        refresh_token=refresh,
        expires_at=expires_at,
        subject=subject if isinstance(subject, str) else None,
    )


# --------------------------------------------------------------------------- device flow


async def poll_for_tokens(
    attempt: Callable[[], Awaitable[IssuedTokens]],
    *,
    interval: int,
    expires_in: int,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    max_unavailable: int = 3,
) -> IssuedTokens:
    """Poll the token endpoint as RFC 8628 §3.4-3.5 says until the user has decided.

    Waits ``interval`` seconds before each request; ``slow_down`` adds 5 seconds for this
    and all later requests; ``authorization_pending`` keeps polling; the device code's
    ``expires_in`` bounds the whole loop. A failed connection also slows down (§3.5)
    and gives up after ``max_unavailable`` failures in a row.
    """
    deadline = clock() + expires_in
    unavailable = 0
    # Bounded: every round sleeps at least a second (or the clock moves toward the
    # deadline), and the count cap stops a stalled clock.
    for _ in range(max(1, expires_in) + 10):
        if clock() >= deadline:
            break
        await sleep(max(interval, 0))
        try:
            return await attempt()
        except TokenError as exc:
            unavailable = 0
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval += SLOW_DOWN_STEP
                continue
            if exc.error == "expired_token":
                raise LoginError(
                    "the login request expired before it was approved: run tokenferry login again"
                ) from None
            if exc.error == "access_denied":
                raise LoginError("the login request was denied at the identity provider") from None
            raise LoginError(f"the identity provider refused the login: {exc.describe()}") from None
        except _Unavailable as exc:
            unavailable += 1
            if unavailable >= max_unavailable:
                raise LoginError(f"login failed: {exc}") from None
            interval += SLOW_DOWN_STEP
    raise LoginError("the login request expired before it was approved: run tokenferry login again")


# --------------------------------------------------------------------------- use


async def fresh_login(
    store: TokenStore,
    gateway: str,
    *,
    margin: float = REFRESH_MARGIN,
    now: Callable[[], float] = time.time,
) -> StoredLogin:
    """The stored login for ``gateway``, refreshed first when it expires within ``margin``.

    Without a refresh token a still-valid token is returned as it is; an expired one is
    an error telling the user to log in again.
    """
    key = normalise_gateway(gateway)
    login = store.get(key)
    if login is None:
        raise LoginError(f"not logged in to {key}: run tokenferry login --gateway {key}")
    if login.remaining(now()) > margin:
        return login
    if login.refresh_token is None:
        if login.remaining(now()) > 0:
            return login
        raise LoginError(f"your login to {key} has expired: run tokenferry login")
    with store.locked():
        # Another CLI process may have refreshed (and rotated the refresh token) while
        # we waited for the lock: use its result.
        login = store.get(key)
        if login is None:
            raise LoginError(f"not logged in to {key}: run tokenferry login --gateway {key}")
        if login.remaining(now()) > margin or login.refresh_token is None:
            return login
        async with OidcClient() as client:
            issued = await client.refresh(
                login.token_endpoint, login.client_id, login.refresh_token
            )
        login = replace(
            login,
            access_token=issued.access_token,
            # RFC 6749 §6: without a new refresh token the old one stays valid.
            refresh_token=issued.refresh_token or login.refresh_token,
            expires_at=issued.expires_at,
            subject=issued.subject or login.subject,
        )
        store.save(login, make_default=False)
    return login

"""``GatewayClient``: the typed async client of the gateway API (aiohttp).

Usage::

    async with GatewayClient(url, auth=BearerAuth(token)) as gateway:
        provider = await gateway.get_provider("orders")

    async with GatewayClient(url, auth=SvidAuth(svid_source)) as gateway:
        config = await gateway.supervisor_config(etag=None)
        token = await gateway.intermediate_token("orders", "access_token")

Every error answer raises the ``GatewayError`` subclass of its code; a connection
failure or timeout raises ``GatewayUnreachable``. Proxy environment variables are
ignored (``trust_env=False``): the gateway is reached directly, never via the sandbox's
egress proxy.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import ssl
import unicodedata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict

from gateway_client._exceptions import (
    ERRORS_BY_CODE,
    GatewayError,
    GatewayProtocolError,
    GatewayUnreachable,
)
from gateway_client._models import (
    AuthConfig,
    CredentialInput,
    ProfileRecord,
    ProviderRecord,
    SandboxRecord,
    SupervisorConfig,
)
from tokenferry.oauth import TokenResponse
from tokenferry.svid import SvidSource

MAX_RESPONSE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class GatewayTimeout:
    """Seconds: to connect, and for a whole request."""

    connect: float = 5.0
    total: float = 15.0


class GatewayAuth(Protocol):
    """Produces the ``Authorization`` header value for one request."""

    async def authorization(self, client: GatewayClient) -> str: ...


class BearerAuth:
    """A user's OIDC access token (or the dev admin token): fixed, or from a callable.

    A callable (sync or async) is called per request, so a CLI can refresh its token.
    """

    def __init__(self, token: str | Callable[[], str] | Callable[[], Awaitable[str]]) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "BearerAuth(<hidden>)"

    async def authorization(self, client: GatewayClient) -> str:
        token = self._token
        if callable(token):
            produced = token()
            value = await produced if inspect.isawaitable(produced) else produced
        else:
            value = token
        if not isinstance(value, str) or not value:
            raise ValueError("BearerAuth: the token callable returned no token")
        return f"Bearer {value}"


class SvidAuth:
    """A supervisor's JWT-SVID for the gateway audience.

    ``audience`` None: learned once from ``GET /v1/auth/config`` (``supervisor_audience``).
    The SVID is fetched from the source per request (sources reuse SVIDs themselves).
    """

    def __init__(self, svid_source: SvidSource, audience: str | None = None) -> None:
        self._source = svid_source
        self._audience = audience
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SvidAuth(audience={self._audience!r})"

    async def audience(self, client: GatewayClient) -> str:
        if self._audience is None:
            async with self._lock:
                if self._audience is None:
                    self._audience = (await client.auth_config()).supervisor_audience
        return self._audience

    async def authorization(self, client: GatewayClient) -> str:
        svid = await self._source.fetch_jwt_svid(await self.audience(client))
        return f"Bearer {svid.token}"


def _segment(value: str) -> str:
    # Names go into the path: quote everything, so '/' or '..' cannot reach other routes.
    return quote(value, safe="")


class GatewayClient:
    def __init__(
        self,
        base_url: str,
        *,
        auth: GatewayAuth | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: GatewayTimeout | float = GatewayTimeout(),
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = auth
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        limits = timeout if isinstance(timeout, GatewayTimeout) else GatewayTimeout(total=timeout)
        self._timeout = aiohttp.ClientTimeout(total=limits.total, connect=limits.connect)
        self._session = session
        self._own_session = session is None

    def __repr__(self) -> str:
        return f"GatewayClient({self.base_url!r}, auth={self._auth!r})"

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
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False, timeout=self._timeout)
            self._own_session = True
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        authenticated: bool = True,
        headers: Mapping[str, str] | None = None,
        expect: Sequence[int] = (200,),
    ) -> tuple[int, Any, Mapping[str, str]]:
        send_headers = {"Accept": "application/json", **(headers or {})}
        if authenticated:
            if self._auth is None:
                raise ValueError(f"{method} {path} needs authentication; pass auth=")
            send_headers["Authorization"] = await self._auth.authorization(self)
        url = self.base_url + path
        try:
            async with self._http().request(
                method,
                url,
                json=body,
                headers=send_headers,
                ssl=self._ssl,
                allow_redirects=False,
            ) as response:
                raw = await response.content.read(MAX_RESPONSE_BYTES + 1)
                status = response.status
                response_headers = CIMultiDict(response.headers)
        except (aiohttp.ClientConnectionError, aiohttp.InvalidURL, TimeoutError) as exc:
            raise GatewayUnreachable(
                f"cannot reach the gateway at {self.base_url}: {type(exc).__name__}"
                + (f": {exc}" if isinstance(exc, aiohttp.ClientConnectorError) else "")
            ) from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise GatewayProtocolError("protocol_error", "gateway answer too large", status)
        if status in expect:
            if not raw:
                return status, None, response_headers
            try:
                return status, json.loads(raw), response_headers
            except (ValueError, RecursionError):
                # RecursionError: JSON nested deeper than the decoder goes.
                raise GatewayProtocolError(
                    "protocol_error", f"gateway answer to {method} {path} is not JSON", status
                ) from None
        raise _error(status, raw, method, path)

    # --- anyone -------------------------------------------------------------------

    async def auth_config(self) -> AuthConfig:
        _, data, _ = await self._request("GET", "/v1/auth/config", authenticated=False)
        return AuthConfig.from_json(_object(data))

    # --- profiles -----------------------------------------------------------------

    async def create_profile(self, source: str) -> ProfileRecord:
        """Register a profile from its YAML (or JSON) text; 400 lists every problem."""
        _, data, _ = await self._request(
            "POST", "/v1/profiles", body={"source": source}, expect=(201,)
        )
        return ProfileRecord.from_json(data)

    async def list_profiles(self) -> list[ProfileRecord]:
        _, data, _ = await self._request("GET", "/v1/profiles")
        return [ProfileRecord.from_json(p) for p in _items(data, "profiles")]

    async def get_profile(self, profile_id: str) -> ProfileRecord:
        _, data, _ = await self._request("GET", f"/v1/profiles/{_segment(profile_id)}")
        return ProfileRecord.from_json(data)

    async def delete_profile(self, profile_id: str) -> None:
        await self._request("DELETE", f"/v1/profiles/{_segment(profile_id)}", expect=(204,))

    # --- providers ----------------------------------------------------------------

    async def create_provider(
        self,
        name: str,
        profile: str,
        credentials: Mapping[str, CredentialInput | str] | None = None,
        *,
        owner: str | None = None,
    ) -> ProviderRecord:
        body: dict[str, Any] = {
            "name": name,
            "profile": profile,
            "credentials": _credentials_json(credentials or {}),
        }
        if owner is not None:
            body["owner"] = owner
        _, data, _ = await self._request("POST", "/v1/providers", body=body, expect=(201,))
        return ProviderRecord.from_json(data)

    async def list_providers(self) -> list[ProviderRecord]:
        _, data, _ = await self._request("GET", "/v1/providers")
        return [ProviderRecord.from_json(p) for p in _items(data, "providers")]

    async def get_provider(self, name: str) -> ProviderRecord:
        _, data, _ = await self._request("GET", f"/v1/providers/{_segment(name)}")
        return ProviderRecord.from_json(data)

    async def update_provider(
        self,
        name: str,
        *,
        credentials: Mapping[str, CredentialInput | str | None] | None = None,
        profile: str | None = None,
    ) -> ProviderRecord:
        """Set (or, with None, remove) credentials and/or switch the profile; bumps revision."""
        body: dict[str, Any] = {}
        if credentials:
            body["credentials"] = _credentials_json(credentials)
        if profile is not None:
            body["profile"] = profile
        _, data, _ = await self._request("PATCH", f"/v1/providers/{_segment(name)}", body=body)
        return ProviderRecord.from_json(data)

    async def delete_provider(self, name: str) -> None:
        await self._request("DELETE", f"/v1/providers/{_segment(name)}", expect=(204,))

    # --- sandboxes ----------------------------------------------------------------

    async def put_sandbox(
        self, name: str, spiffe_id: str, providers: Sequence[str] | None = None
    ) -> SandboxRecord:
        """Register (or update) a sandbox; ``providers`` given replaces the attached set."""
        body: dict[str, Any] = {"spiffe_id": spiffe_id}
        if providers is not None:
            body["providers"] = list(providers)
        _, data, _ = await self._request(
            "PUT", f"/v1/sandboxes/{_segment(name)}", body=body, expect=(200, 201)
        )
        return SandboxRecord.from_json(data)

    async def list_sandboxes(self) -> list[SandboxRecord]:
        _, data, _ = await self._request("GET", "/v1/sandboxes")
        return [SandboxRecord.from_json(s) for s in _items(data, "sandboxes")]

    async def get_sandbox(self, name: str) -> SandboxRecord:
        _, data, _ = await self._request("GET", f"/v1/sandboxes/{_segment(name)}")
        return SandboxRecord.from_json(data)

    async def delete_sandbox(self, name: str) -> None:
        await self._request("DELETE", f"/v1/sandboxes/{_segment(name)}", expect=(204,))

    async def attach_provider(self, sandbox: str, provider: str) -> SandboxRecord:
        _, data, _ = await self._request(
            "PUT", f"/v1/sandboxes/{_segment(sandbox)}/providers/{_segment(provider)}"
        )
        return SandboxRecord.from_json(data)

    async def detach_provider(self, sandbox: str, provider: str) -> SandboxRecord:
        _, data, _ = await self._request(
            "DELETE", f"/v1/sandboxes/{_segment(sandbox)}/providers/{_segment(provider)}"
        )
        return SandboxRecord.from_json(data)

    # --- supervisor ---------------------------------------------------------------

    async def supervisor_config(self, etag: str | None = None) -> SupervisorConfig | None:
        """The sandbox's configuration; None when it still matches ``etag`` (304)."""
        headers = {"If-None-Match": etag} if etag else None
        status, data, response_headers = await self._request(
            "GET", "/v1/supervisor/config", headers=headers, expect=(200, 304)
        )
        if status == 304:
            return None
        return SupervisorConfig.from_json(data, response_headers.get("ETag"))

    async def intermediate_token(self, provider: str, credential: str) -> TokenResponse:
        """Exchange 1 (SPEC §1 step 2): a token whose ``aud`` is this supervisor's SPIFFE ID."""
        _, data, _ = await self._request(
            "POST",
            "/v1/supervisor/intermediate-token",
            body={"provider": provider, "credential": credential},
        )
        item = _object(data)
        token = item.get("access_token")
        if not isinstance(token, str) or not token:
            raise GatewayProtocolError("protocol_error", "answer has no access_token", 200)
        expires_in = item.get("expires_in")
        token_type = item.get("token_type")
        issued = item.get("issued_token_type")
        return TokenResponse(
            access_token=token,
            token_type=token_type if isinstance(token_type, str) else None,
            issued_token_type=issued if isinstance(issued, str) else None,
            expires_in=expires_in
            if isinstance(expires_in, int) and not isinstance(expires_in, bool) and expires_in > 0
            else None,
        )


def _object(data: object) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise GatewayProtocolError("protocol_error", "gateway answer is not a JSON object", 200)
    return data


def _items(data: object, key: str) -> list[Any]:
    value = _object(data).get(key)
    if not isinstance(value, list):
        raise GatewayProtocolError("protocol_error", f"gateway answer has no {key!r} list", 200)
    return value


def _credentials_json(
    credentials: Mapping[str, CredentialInput | str | None],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in credentials.items():
        if value is None or isinstance(value, str):
            out[name] = value
        else:
            out[name] = value.to_json()
    return out


def _printable(text: str, limit: int = 4000) -> str:
    """Gateway-supplied text as shown on a terminal or in a log line: control and format
    characters (escape sequences, CR/LF, bidi overrides) removed, length capped."""
    return "".join(
        ch for ch in text[: limit * 2] if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp")
    )[:limit]


def _error(status: int, raw: bytes, method: str, path: str) -> GatewayError:
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        code = _printable(data["error"], 100)
        detail = data.get("detail")
        extra = {k: v for k, v in data.items() if k not in ("error", "detail")}
        cls = ERRORS_BY_CODE.get(code, GatewayError)
        return cls(code, _printable(detail) if isinstance(detail, str) else code, status, extra)
    # Not the gateway's error shape (a proxy in between?): never echo the body.
    return GatewayProtocolError(
        "protocol_error", f"{method} {path}: HTTP {status} without a gateway error body", status
    )

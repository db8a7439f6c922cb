"""Request parsing (400s naming the field), bundle caching, and the client's error mapping."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from gateway.api import parse_credential, parse_credentials, parse_expiry, required_text
from gateway.app import StartupError, discover_identity
from gateway.auth import AuthenticationFailed, BundleCache, IdentityUnavailable, bearer_token
from gateway.errors import ApiError
from gateway_client._client import _error
from gateway_client._exceptions import (
    FailedPrecondition,
    GatewayError,
    GatewayProtocolError,
    IdpError,
    InvalidRequest,
)
from tokenferry.svid import JwtSvid, SvidUnavailable


def field_of(exc: pytest.ExceptionInfo[ApiError]) -> Any:
    return exc.value.extra.get("field")


def test_required_text_names_the_field() -> None:
    assert required_text({"name": "x"}, "name") == "x"
    with pytest.raises(ApiError) as caught:
        required_text({}, "name")
    assert (caught.value.status, field_of(caught)) == (400, "name")
    with pytest.raises(ApiError, match="non-empty string, got int"):
        required_text({"name": 3}, "name")


def test_expiry_parsing() -> None:
    assert parse_expiry("2030-01-01T00:00:00Z", "f") == 1893456000.0
    assert parse_expiry("2030-01-01T01:00:00+01:00", "f") == 1893456000.0
    assert parse_expiry(None, "f") is None
    for bad in ("2030-01-01T00:00:00", "soon", 5):
        with pytest.raises(ApiError) as caught:
            parse_expiry(bad, "credentials.t.expires_at")
        assert field_of(caught) == "credentials.t.expires_at"


def test_credential_forms() -> None:
    plain = parse_credential("opaque", "credentials.t", allow_null=False)
    assert plain is not None and (plain.value, plain.expires_at) == ("opaque", None)
    jwt_value = jwt.encode({"exp": 2000000000}, "k" * 32, algorithm="HS256")
    derived = parse_credential(jwt_value, "credentials.t", allow_null=False)
    assert derived is not None and derived.expires_at == 2000000000.0
    explicit = parse_credential(
        {"value": jwt_value, "expires_at": "2030-01-01T00:00:00Z"}, "c", allow_null=False
    )
    assert explicit is not None and explicit.expires_at == 1893456000.0
    assert parse_credential(None, "c", allow_null=True) is None
    with pytest.raises(ApiError, match="only allowed in updates"):
        parse_credential(None, "c", allow_null=False)
    with pytest.raises(ApiError) as caught:
        parse_credential({"value": "x", "expiry": "y"}, "credentials.t", allow_null=False)
    assert field_of(caught) == "credentials.t.expiry"
    with pytest.raises(ApiError, match="longer than"):
        parse_credential("x" * 20000, "c", allow_null=False)
    assert "opaque" not in repr(plain)


def test_credentials_must_be_an_object() -> None:
    assert parse_credentials({}, allow_null=False) == {}
    with pytest.raises(ApiError) as caught:
        parse_credentials({"credentials": ["a"]}, allow_null=False)
    assert field_of(caught) == "credentials"


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer abc") == "abc"
    for bad in (None, "", "Basic abc", "Bearer", "Bearer " + "x" * 20000):
        with pytest.raises(AuthenticationFailed):
            bearer_token(bad)


class FakeSource:
    def __init__(self) -> None:
        self.bundle_calls = 0
        self.svid_calls = 0
        self.fail = False

    async def fetch_jwt_svid(self, audience: str) -> JwtSvid:
        self.svid_calls += 1
        if self.fail:
            raise SvidUnavailable("agent down")
        return JwtSvid("token", "spiffe://example.org/gateway", time.time() + 300)

    async def fetch_jwt_bundles(self) -> dict[str, dict[str, Any]]:
        self.bundle_calls += 1
        if self.fail:
            raise SvidUnavailable("agent down")
        return {"example.org": {"keys": [{"kid": str(self.bundle_calls)}]}}

    async def close(self) -> None:
        return None


async def test_bundle_cache_refetches_rate_limited_and_survives_outages() -> None:
    now = [0.0]
    source = FakeSource()
    cache = BundleCache(source, max_age=60, min_refetch_interval=5, clock=lambda: now[0])
    first = await cache.get()
    assert source.bundle_calls == 1
    assert await cache.get(force=True) is first  # within the rate limit: no refetch
    now[0] = 6
    await cache.get(force=True)
    assert source.bundle_calls == 2
    source.fail = True
    now[0] = 100
    served = await cache.get()  # refresh fails: the last bundles keep serving
    assert served["example.org"]["keys"][0]["kid"] == "2"
    empty = BundleCache(source)
    with pytest.raises(IdentityUnavailable, match="agent down"):
        await empty.get()


async def test_discover_identity() -> None:
    source = FakeSource()
    identity = await discover_identity(source, 1.0)
    assert (identity.spiffe_id, identity.trust_domain) == (
        "spiffe://example.org/gateway",
        "example.org",
    )
    source.fail = True
    with pytest.raises(StartupError, match="agent down"):
        await discover_identity(source, 0.3)
    assert source.svid_calls >= 2


def test_client_maps_codes_to_exceptions() -> None:
    error = _error(409, b'{"error":"failed_precondition","detail":"no value"}', "POST", "/x")
    assert isinstance(error, FailedPrecondition)
    assert (error.code, error.detail, error.status) == ("failed_precondition", "no value", 409)
    assert isinstance(_error(502, b'{"error":"idp_error","detail":"d"}', "POST", "/x"), IdpError)
    invalid = _error(400, b'{"error":"invalid_request","detail":"d","field":"name"}', "P", "/x")
    assert isinstance(invalid, InvalidRequest) and invalid.field == "name"
    unknown = _error(418, b'{"error":"teapot","detail":"d"}', "GET", "/x")
    assert type(unknown) is GatewayError
    html = _error(502, b"<html>secret-ish proxy page</html>", "GET", "/x")
    assert isinstance(html, GatewayProtocolError)
    assert "secret-ish" not in str(html)

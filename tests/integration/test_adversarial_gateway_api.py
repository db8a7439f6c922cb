"""A careless or hostile API client against a real gateway: every body field with the wrong
type or an absurd value, unknown fields, bodies nested too deeply, lone surrogates, odd
path parameters. Each must be answered 4xx with ``{"error", "detail"}`` naming the field,
never 500, and the records read back through the API must be exactly what they were.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.support.e2e_stack import E2EStack
from tests.support.gateway_stack import (
    ADMIN_TOKEN,
    GatewayStack,
    exchange_profile_yaml,
    sandbox_id,
    start_gateway_stack,
)
from tests.support.procs import Service, tokenferry_command

pytestmark = pytest.mark.timeout(90)

# Values stored by this module's set-up: they must never show up anywhere.
SUBJECT_TOKEN = "adversarial-subject-token-5bd1f0c2e7"
leaked = E2EStack.leaked


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    services: list[Service] = []
    try:
        stack = start_gateway_stack(tmp_path_factory.mktemp("adversarial-api"), services)
        _ok(
            call(
                stack,
                "POST",
                "/v1/profiles",
                {"source": exchange_profile_yaml("orders", stack.token_endpoint)},
            ),
            201,
        )
        _ok(
            call(
                stack,
                "POST",
                "/v1/providers",
                {"name": "p1", "profile": "orders", "credentials": {"user_token": SUBJECT_TOKEN}},
            ),
            201,
        )
        _ok(
            call(
                stack,
                "PUT",
                "/v1/sandboxes/s1",
                {"spiffe_id": sandbox_id("s1"), "providers": ["p1"]},
            ),
            201,
        )
        yield stack
    finally:
        for service in reversed(services):
            service.stop()


def call(
    stack: GatewayStack,
    method: str,
    path: str,
    body: object = None,
    *,
    data: bytes | None = None,
) -> requests.Response:
    if data is None and body is not None:
        data = json.dumps(body).encode()
    return requests.request(
        method,
        stack.url + path,
        data=data,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
        timeout=20,
    )


def _ok(response: requests.Response, status: int) -> None:
    assert response.status_code == status, response.text


def snapshot(stack: GatewayStack) -> dict[str, Any]:
    """Everything the API shows (timestamps included): must not move on a refusal."""
    out: dict[str, Any] = {}
    for path in ("/v1/profiles", "/v1/providers", "/v1/sandboxes"):
        response = call(stack, "GET", path)
        assert response.status_code == 200, (path, response.text)
        out[path] = response.json()
    return out


def refused(response: requests.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("error"), str) and isinstance(body.get("detail"), str), body
    assert "Traceback" not in body["detail"]
    return body


def _jwt_with_exp(exp: str) -> str:
    """A JWT-shaped value whose payload carries ``exp`` verbatim (any JSON text)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(b'{"alg":"ES256","typ":"JWT"}')
    payload = b64(b'{"sub":"alice","exp":' + exp.encode() + b"}")
    return f"{header}.{payload}.c2ln"


# (method, path, body, field the answer must name)
BAD_BODIES: list[tuple[str, str, object, str]] = [
    ("POST", "/v1/profiles", {"source": 5}, "source"),
    ("POST", "/v1/profiles", {"source": ""}, "source"),
    ("POST", "/v1/profiles", {"profile": "id: x"}, "profile"),
    ("POST", "/v1/profiles", {"profile": {"id": 5}}, "id"),
    ("POST", "/v1/profiles", {}, "source"),
    ("POST", "/v1/providers", {"name": 1, "profile": "orders"}, "name"),
    ("POST", "/v1/providers", {"name": "p9", "profile": ["orders"]}, "profile"),
    ("POST", "/v1/providers", {"name": "p9", "profile": "orders", "owner": 5}, "owner"),
    (
        "POST",
        "/v1/providers",
        {"name": "p9", "profile": "orders", "credentials": []},
        "credentials",
    ),
    (
        "POST",
        "/v1/providers",
        {"name": "p9", "profile": "orders", "credentials": {"user_token": 5}},
        "credentials.user_token",
    ),
    (
        "POST",
        "/v1/providers",
        {"name": "p9", "profile": "orders", "credentials": {"user_token": {"value": True}}},
        "credentials.user_token.value",
    ),
    (
        "POST",
        "/v1/providers",
        {"name": "p9", "profile": "orders", "credentials": {"user_token": {"v": "x"}}},
        "credentials.user_token.v",
    ),
    (
        "POST",
        "/v1/providers",
        {
            "name": "p9",
            "profile": "orders",
            "credentials": {"user_token": {"value": "x", "expires_at": 1893456000}},
        },
        "credentials.user_token.expires_at",
    ),
    (
        "POST",
        "/v1/providers",
        {
            "name": "p9",
            "profile": "orders",
            "credentials": {"user_token": {"value": "x", "expires_at": "2030-01-01T00:00:00"}},
        },
        "credentials.user_token.expires_at",
    ),
    # Valid ISO 8601 with an offset, but not a moment any clock can represent: year 0 or
    # year 10000 in UTC. Stored, it made every provider listing answer 500.
    (
        "POST",
        "/v1/providers",
        {
            "name": "p9",
            "profile": "orders",
            "credentials": {
                "user_token": {"value": "x", "expires_at": "0001-01-01T00:00:00+14:00"}
            },
        },
        "credentials.user_token.expires_at",
    ),
    (
        "POST",
        "/v1/providers",
        {
            "name": "p9",
            "profile": "orders",
            "credentials": {
                "user_token": {"value": "x", "expires_at": "9999-12-31T23:59:59-14:00"}
            },
        },
        "credentials.user_token.expires_at",
    ),
    # A JWT-shaped value whose own exp is no representable moment (its exp is recorded as
    # the expiry when none is given).
    *[
        (
            "POST",
            "/v1/providers",
            {"name": "p9", "profile": "orders", "credentials": {"user_token": _jwt_with_exp(exp)}},
            "credentials.user_token",
        )
        for exp in ("1e300", "-1e300", "NaN", "Infinity", "99999999999999")
    ],
    # Lone surrogates are valid JSON escapes but no text: they cannot be stored.
    (
        "POST",
        "/v1/providers",
        {"name": "p9", "profile": "orders", "credentials": {"user_token": "\ud800"}},
        "credentials.user_token",
    ),
    ("POST", "/v1/providers", {"name": "p9", "profile": "orders", "owner": "\udfff"}, "owner"),
    ("POST", "/v1/providers", {"name": "p9", "profile": "orders", "ownr": "bob"}, "ownr"),
    ("PATCH", "/v1/providers/p1", {"credentials": {"user_token": 0}}, "credentials.user_token"),
    ("PATCH", "/v1/providers/p1", {"profile": 3}, "profile"),
    ("PATCH", "/v1/providers/p1", {"name": "p2"}, "name"),
    (
        "PATCH",
        "/v1/providers/p1",
        {"credentials": {"user_token": {"value": "x", "expires_at": "0001-01-01T00:00:00+01:00"}}},
        "credentials.user_token.expires_at",
    ),
    # Fails halfway: the first credential is fine, the second is not storable.
    (
        "PATCH",
        "/v1/providers/p1",
        {"credentials": {"user_token": "replacement", "access_token": "x"}},
        "credentials.access_token",
    ),
    ("PUT", "/v1/sandboxes/s9", {"spiffe_id": 5}, "spiffe_id"),
    ("PUT", "/v1/sandboxes/s9", {"spiffe_id": "spiffe://example.org"}, "spiffe_id"),
    ("PUT", "/v1/sandboxes/s9", {"spiffe_id": "spiffe://other.org/sandbox/s9"}, "spiffe_id"),
    (
        "PUT",
        "/v1/sandboxes/s9",
        {"spiffe_id": sandbox_id("s9"), "providers": "p1"},
        "providers",
    ),
    (
        "PUT",
        "/v1/sandboxes/s9",
        {"spiffe_id": sandbox_id("s9"), "providers": [1]},
        "providers",
    ),
    (
        "PUT",
        "/v1/sandboxes/s9",
        {"spiffe_id": sandbox_id("s9"), "provider": ["p1"]},
        "provider",
    ),
    ("POST", "/v1/profiles", {"source": "id: junk-profile", "sorce": "x"}, "sorce"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    BAD_BODIES,
    ids=[f"{m} {p} {f}" for m, p, _b, f in BAD_BODIES],
)
def test_bad_field_is_400_naming_it_and_changes_nothing(
    stack: GatewayStack, method: str, path: str, body: object, field: str
) -> None:
    before = snapshot(stack)
    answer = refused(call(stack, method, path, body))
    assert answer["error"] == "invalid_request"
    assert answer.get("field") == field or field in answer["detail"], answer
    assert snapshot(stack) == before


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe\xfa", "JSON"),
        (b"[]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"", "empty"),
        (b'{"name": "p9", "profile": "orders", "owner": NaN}', "NaN"),
        (b'{"name": "p9", "profile": "orders", "owner": Infinity}', "Infinity"),
        (b"[" * 50_000 + b"]" * 50_000, "nested"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested"),
        (b'{"source": "' + b"a" * (1024 * 1024 + 1) + b'"}', "larger than"),
    ],
    ids=[
        "truncated",
        "not-utf8",
        "array",
        "string",
        "empty",
        "nan",
        "inf",
        "deep-array",
        "deep-object",
        "huge",
    ],
)
def test_malformed_bodies_are_400(stack: GatewayStack, data: bytes, says: str) -> None:
    before = snapshot(stack)
    for path in ("/v1/profiles", "/v1/providers"):
        answer = refused(call(stack, "POST", path, data=data))
        assert answer["error"] == "invalid_request"
        assert says in answer["detail"], answer
    assert snapshot(stack) == before


@pytest.mark.parametrize(
    "segment", ["%00", "..%2F..%2Fetc", "%FF", "a%0Ab", "%E2%80%AE", "x" * 2000, "%20"]
)
def test_odd_path_parameters_are_json_4xx(stack: GatewayStack, segment: str) -> None:
    before = snapshot(stack)
    for method, path, body in (
        ("GET", f"/v1/providers/{segment}", None),
        ("GET", f"/v1/profiles/{segment}", None),
        ("GET", f"/v1/sandboxes/{segment}", None),
        ("DELETE", f"/v1/providers/{segment}", None),
        ("PATCH", f"/v1/providers/{segment}", {"credentials": {"user_token": "x"}}),
        ("PUT", f"/v1/sandboxes/{segment}", {"spiffe_id": sandbox_id("s8")}),
        ("PUT", f"/v1/sandboxes/s1/providers/{segment}", None),
    ):
        response = call(stack, method, path, body)
        assert 400 <= response.status_code < 500, (method, path, response.text)
        refused(response, response.status_code)
    assert snapshot(stack) == before


def test_the_stored_value_never_appears_in_answers_logs_or_metrics(
    stack: GatewayStack,
) -> None:
    texts = [json.dumps(snapshot(stack))]
    texts.append(call(stack, "GET", "/v1/providers/p1").text)
    texts.append(requests.get(stack.admin_url + "/metrics", timeout=10).text)
    texts.append(stack.gateway.log_text())
    assert not any(SUBJECT_TOKEN in text for text in texts)
    found = leaked([SUBJECT_TOKEN], stack.raw_database_bytes().decode("latin-1"))
    assert not found, f"secrets {found} leaked"
    assert "Traceback" not in texts[-1]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


BAD_AUTHORIZATIONS: list[bytes] = [
    b"",
    b"Bearer",
    b"Bearer ",
    b"Basic YWRtaW46YWRtaW4=",
    b"Bearer a.b.c",
    b"Bearer \xe9t\xe9",  # not UTF-8: was a 500 (UnicodeEncodeError)
    b"Bearer \xc3\xa9t\xc3\xa9",  # UTF-8 but not ASCII
    (
        b"Bearer "
        + _b64(b'{"alg":"ES256","kid":"k"}').encode()
        + b"."
        + _b64(b'{"sub":5,"aud":[1],"exp":"soon"}').encode()
        + b".c2ln"
    ),
    b"Bearer " + _b64(b'{"alg":"none"}').encode() + b"." + _b64(b'{"exp":1e400}').encode() + b".",
    b"Bearer " + _b64(b"\xff\xfe").encode() + b".e30.c2ln",
    # Over aiohttp's default 8190-byte header field, which answered a plain-text 400.
    b"Bearer " + _b64(b'{"alg":"ES256","kid":"k"}').encode() + b"." + b"e" * 12_000 + b".c2ln",
    b"Bearer " + b"a" * 16_385,
]


@pytest.mark.parametrize("authorization", BAD_AUTHORIZATIONS)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/providers"),
        ("POST", "/v1/providers"),
        ("GET", "/v1/supervisor/config"),
        ("POST", "/v1/supervisor/intermediate-token"),
    ],
)
def test_garbage_authorization_is_401_json(
    stack: GatewayStack, method: str, path: str, authorization: bytes
) -> None:
    before = snapshot(stack)
    response = requests.request(
        method,
        stack.url + path,
        headers={"Authorization": authorization} if authorization else {},
        json={"provider": "p1", "credential": "access_token", "name": "p8", "profile": "orders"},
        timeout=20,
    )
    answer = refused(response, 401)
    assert answer["error"] == "unauthenticated"
    assert snapshot(stack) == before


@pytest.mark.parametrize(
    "authorization",
    [
        b"Bearer " + ADMIN_TOKEN.encode() + b"\x7f",
        b"Bearer " + ADMIN_TOKEN.encode() + b"a" * 40_000,
    ],
    ids=["control-character", "over-32-KiB"],
)
def test_unparseable_authorization_is_refused_by_the_http_parser(
    stack: GatewayStack, authorization: bytes
) -> None:
    """aiohttp's parser refuses these before any handler (a plain-text 400 that quotes
    the start of the offending line back to its sender); nothing is stored or logged."""
    before = snapshot(stack)
    response = requests.post(
        stack.url + "/v1/providers",
        headers={"Authorization": authorization},
        json={"name": "p7", "profile": "orders"},
        timeout=20,
    )
    assert response.status_code == 400
    assert snapshot(stack) == before
    found = leaked([ADMIN_TOKEN], stack.gateway.log_text())
    assert not found, f"secrets {found} leaked"


def test_profile_source_with_bidi_override_is_shown_escaped(stack: GatewayStack) -> None:
    """Anyone may register a profile and reviewers read its source: a bidi override in a
    comment must not make ``profile show --source`` read differently from what parses."""
    source = (
        exchange_profile_yaml("bidi-api", stack.token_endpoint)
        + "# reviewed \u202eevil.example\u202c\n"
    )
    _ok(call(stack, "POST", "/v1/profiles", {"source": source}), 201)
    result = subprocess.run(
        tokenferry_command("--gateway", stack.url, "profile", "show", "bidi-api", "--source"),
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), "TOKENFERRY_TOKEN": ADMIN_TOKEN},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\u202e" not in result.stdout and "\u202c" not in result.stdout
    assert "# reviewed \\u202eevil.example\\u202c" in result.stdout
    assert "2 invisible or control characters" in result.stderr

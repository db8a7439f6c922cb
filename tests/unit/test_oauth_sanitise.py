"""Pure response checks of the token endpoint client: sanitising, error and token parsing."""

from __future__ import annotations

import json
import pickle

import pytest

from tokenferry.oauth import (
    InvalidTokenResponse,
    TokenClientConfig,
    TokenEndpointError,
    TokenResponse,
    display_endpoint,
    parse_error_body,
    parse_token_response,
    sanitise_text,
)

SECRET_JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZyJ9.c2lnbmF0dXJlLXNlY3JldA"


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text", "plain text"),
        ("a\x00b\x1fc\x7fd", "abcd"),  # C0 and DEL
        ("a\x85b\x9bc", "abc"),  # C1 (NEL, CSI)
        ("line1\r\nline2", "line1line2"),
        ("tab\there", "tabhere"),
        ("rtl\u202eoverride\u200b", "rtloverride"),  # bidi override, zero-width space
        ("sep\u2028arator\u2029", "separator"),
        ("unicode é ü ok", "unicode é ü ok"),
    ],
)
def test_sanitise_removes_control_characters(text: str, expected: str) -> None:
    assert sanitise_text(text) == expected


def test_sanitise_cuts_to_256_after_removing_controls() -> None:
    assert sanitise_text("\x00" * 100 + "x" * 300) == "x" * 256
    assert sanitise_text("y" * 256) == "y" * 256


def test_sanitise_redacts_whole_secrets_and_jwt_segments() -> None:
    header, payload, signature = SECRET_JWT.split(".")
    text = f"got {SECRET_JWT} then {header}, {payload} and {signature}"
    cleaned = sanitise_text(text, secrets=(SECRET_JWT,))
    assert cleaned == "got [redacted] then [redacted], [redacted] and [redacted]"


def test_sanitise_finds_a_secret_split_by_control_characters() -> None:
    text = "x " + SECRET_JWT[:20] + "\x00" + SECRET_JWT[20:]
    assert SECRET_JWT not in sanitise_text(text, secrets=(SECRET_JWT,))


def test_sanitise_redacts_before_cutting() -> None:
    # Cutting first would leave the first 240 characters of the secret in place.
    secret = "s" * 300
    assert sanitise_text("0123456789abcdef" + secret, secrets=(secret,)) == (
        "0123456789abcdef[redacted]"
    )


def test_sanitise_ignores_empty_secrets() -> None:
    assert sanitise_text("unchanged", secrets=("",)) == "unchanged"


def test_parse_error_body_reads_rfc_6749_errors() -> None:
    error = parse_error_body(400, body({"error": "invalid_grant", "error_description": "nope"}))
    assert error is not None
    assert (error.status, error.error, error.description) == (400, "invalid_grant", "nope")


@pytest.mark.parametrize(
    "raw",
    [
        b"<html></html>",
        b"",
        body([{"error": "x"}]),
        body({"message": "x"}),
        body({"error": None}),
        body({"error": 1}),
        body({"error": "\x00\x01"}),
    ],
)
def test_parse_error_body_returns_none_for_other_bodies(raw: bytes) -> None:
    assert parse_error_body(400, raw) is None


def test_parse_error_body_ignores_non_string_description() -> None:
    error = parse_error_body(401, body({"error": "invalid_client", "error_description": 5}))
    assert error is not None and error.description is None


def test_endpoint_error_survives_pickling() -> None:
    error = TokenEndpointError(400, "invalid_grant", "x", endpoint="https://idp/token")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.status, copy.error, copy.description, copy.endpoint, str(copy)) == (
        400,
        "invalid_grant",
        "x",
        "https://idp/token",
        str(error),
    )


def test_parse_token_response_keeps_fields() -> None:
    response = parse_token_response(
        body(
            {
                "access_token": "abc.def",
                "token_type": "Bearer",
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "expires_in": 299,
                "scope": "a b",
                "refresh_token": "ignored",
            }
        )
    )
    assert response == TokenResponse(
        "abc.def", "Bearer", "urn:ietf:params:oauth:token-type:access_token", 299, "a b"
    )


def test_token_type_in_error_message_is_sanitised() -> None:
    with pytest.raises(InvalidTokenResponse) as caught:
        parse_token_response(body({"access_token": "abc", "token_type": "evil\r\nX: y" + "z" * 99}))
    assert "\r" not in str(caught.value) and "\n" not in str(caught.value)
    assert "z" * 50 not in str(caught.value)


def test_invalid_access_token_is_not_quoted() -> None:
    with pytest.raises(InvalidTokenResponse) as caught:
        parse_token_response(body({"access_token": "secret value with spaces"}))
    assert "secret value" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://idp.example.org/realms/r/token", "https://idp.example.org/realms/r/token"),
        ("https://user:pw@idp.example.org/t?client_secret=x#f", "https://idp.example.org/t"),
    ],
)
def test_display_endpoint_drops_credentials_and_query(url: str, shown: str) -> None:
    assert display_endpoint(url) == shown


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenClientConfig(connect_timeout=0)
    with pytest.raises(ValueError):
        TokenClientConfig(max_body_bytes=0)
    with pytest.raises(ValueError):
        TokenClientConfig(retry_delay=(0.5, 0.2))

"""Argument rules of ``tokenferry provider``, subject-credential choice, error messages."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway_client import (
    Conflict,
    FailedPrecondition,
    Forbidden,
    GatewayProtocolError,
    GatewayUnreachable,
    InvalidRequest,
    NotFound,
    Unauthenticated,
)
from tokenferry.cli.common import describe_gateway_error, format_time, gateway_url, to_json
from tokenferry.cli.main import UserError, build_parser
from tokenferry.cli.provider import (
    CredentialArgumentError,
    choose_subject_credential,
    parse_credential_args,
    subject_credentials,
)
from tokenferry.profiles import load_profile_text


def _no_stdin() -> str:
    raise AssertionError("stdin must not be read")


def test_values_inline_from_file_and_from_stdin(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("file-secret\n")
    parsed = parse_credential_args(
        ["a=inline", f"b=@{secret}", "c=-"],
        ["a=2026-12-31T23:00:00Z"],
        from_oidc_token=False,
        read_stdin=lambda: "stdin-secret\n",
    )
    assert parsed.values == {"a": "inline", "b": "file-secret", "c": "stdin-secret"}
    assert parsed.expires_at == {"a": datetime(2026, 12, 31, 23, 0, tzinfo=UTC)}
    assert parsed.target is None
    assert "file-secret" not in repr(parsed)


def test_value_may_contain_equals_signs() -> None:
    parsed = parse_credential_args(["k=a=b=="], [], from_oidc_token=False, read_stdin=_no_stdin)
    assert parsed.values == {"k": "a=b=="}


def test_bare_key_names_the_oidc_target() -> None:
    parsed = parse_credential_args(["user_token"], [], from_oidc_token=True, read_stdin=_no_stdin)
    assert parsed.target == "user_token"
    assert parsed.values == {}


@pytest.mark.parametrize(
    ("credentials", "expires", "from_oidc", "message"),
    [
        (["k"], [], False, "expected KEY=VALUE"),
        (["=v"], [], False, "the KEY is missing"),
        (["k="], [], False, "the value is empty"),
        (["k=1", "k=2"], [], False, "given more than once"),
        (["a", "b"], [], True, "name only one"),
        (["a=-", "b=-"], [], False, "only one credential can be read from stdin"),
        (["k=@"], [], False, "a file name must follow '@'"),
        (["k=v"], ["k"], False, "expected KEY=ISO8601"),
        (["k=v"], ["k=tomorrow"], False, "is not an ISO 8601 date-time"),
        (["k=v"], ["k=2026-12-31T23:00:00"], False, "has no time zone"),
        (["k=v"], ["other=2026-12-31T23:00:00Z"], False, "no --credential other=VALUE"),
        (["t"], ["t=2026-12-31T23:00:00Z"], True, "the expiry is the token's own"),
        (["t", "t=v"], [], True, "given more than once"),
    ],
)
def test_bad_credential_arguments(
    credentials: list[str], expires: list[str], from_oidc: bool, message: str
) -> None:
    with pytest.raises(CredentialArgumentError, match=message):
        parse_credential_args(
            credentials, expires, from_oidc_token=from_oidc, read_stdin=lambda: "x"
        )


def test_unreadable_or_empty_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        parse_credential_args(
            [f"k=@{tmp_path / 'missing'}"], [], from_oidc_token=False, read_stdin=_no_stdin
        )
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        parse_credential_args([f"k=@{empty}"], [], from_oidc_token=False, read_stdin=_no_stdin)


# --------------------------------------------------------------------------- subject credential

TWO_SUBJECTS = """\
id: two
credentials:
  - name: user_a
  - name: user_b
  - name: token_a
    token_grant:
      grant_type: token_exchange
      token_endpoint: http://127.0.0.1:1/realms/r/protocol/openid-connect/token
      subject_token: {source: provider_credential, credential: user_a}
  - name: token_b
    token_grant:
      grant_type: token_exchange
      token_endpoint: http://127.0.0.1:1/realms/r/protocol/openid-connect/token
      subject_token: {source: provider_credential, credential: user_b}
endpoints:
  - {host: a.example.org}
"""

NO_SUBJECT = """\
id: cc
credentials:
  - name: service_token
    token_grant:
      grant_type: client_credentials
      token_endpoint: http://127.0.0.1:1/realms/r/protocol/openid-connect/token
endpoints:
  - {host: a.example.org}
"""


def test_subject_credential_choice() -> None:
    two, _ = load_profile_text(TWO_SUBJECTS, "two.yaml")
    assert subject_credentials(two) == ["user_a", "user_b"]
    with pytest.raises(UserError, match=r"several subject credentials \(user_a, user_b\)"):
        choose_subject_credential(two, None)
    assert choose_subject_credential(two, "user_b") == "user_b"
    with pytest.raises(UserError, match=r"not a subject credential .* \(candidates: user_a"):
        choose_subject_credential(two, "token_a")
    none, _ = load_profile_text(NO_SUBJECT, "cc.yaml")
    with pytest.raises(UserError, match="has no subject credential"):
        choose_subject_credential(none, None)


# --------------------------------------------------------------------------- errors and options

GW = "http://127.0.0.1:8443"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            GatewayUnreachable("cannot reach the gateway at http://127.0.0.1:8443: refused"),
            "cannot reach the gateway at http://127.0.0.1:8443: refused; is it running? "
            "set --gateway or TOKENFERRY_GATEWAY",
        ),
        (
            Unauthenticated("unauthenticated", "token expired", 401),
            "not logged in or token expired: run tokenferry login (gateway "
            "http://127.0.0.1:8443: token expired)",
        ),
        (Forbidden("forbidden", "belongs to bob", 403), "forbidden: belongs to bob"),
        (NotFound("not_found", "provider 'x' does not exist", 404), "not found: provider 'x'"),
        (Conflict("conflict", "provider 'x' exists", 409), "already exists: provider 'x' exists"),
        (FailedPrecondition("failed_precondition", "no token", 409), "not possible now: no token"),
        (
            InvalidRequest("invalid_request", "bad value", 400, {"field": "spiffe_id"}),
            "invalid request: bad value (field 'spiffe_id')",
        ),
        (
            InvalidRequest("invalid_request", "field 'name' is required", 400, {"field": "name"}),
            "invalid request: field 'name' is required",
        ),
        (GatewayProtocolError("protocol_error", "not JSON", 200), "unexpected answer"),
    ],
)
def test_gateway_errors_become_one_helpful_line(
    exc: Exception, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENFERRY_TOKEN", raising=False)
    assert describe_gateway_error(exc, GW).startswith(expected)


def test_refused_env_token_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENFERRY_TOKEN", "x")
    message = describe_gateway_error(Unauthenticated("unauthenticated", "bad", 401), GW)
    assert message.startswith("the token in TOKENFERRY_TOKEN was refused")


def test_gateway_url_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("TOKENFERRY_GATEWAY", raising=False)
    parser = build_parser()
    assert gateway_url(parser.parse_args(["provider", "list"])) == "http://127.0.0.1:8443"
    monkeypatch.setenv("TOKENFERRY_GATEWAY", "http://gw.example.org:1/")
    assert gateway_url(parser.parse_args(["provider", "list"])) == "http://gw.example.org:1"
    args = parser.parse_args(["provider", "list", "--gateway", "https://other.example.org"])
    assert gateway_url(args) == "https://other.example.org"
    with pytest.raises(UserError, match="is not an http:// or https:// URL"):
        gateway_url(parser.parse_args(["provider", "list", "--gateway", "gw:8443"]))


def test_options_work_on_the_group_and_on_the_command() -> None:
    parser = build_parser()
    args = parser.parse_args(["provider", "--output", "json", "--gateway", "http://a", "list"])
    assert (args.output, args.gateway) == ("json", "http://a")
    args = parser.parse_args(["sandbox", "list", "-o", "json"])
    assert args.output == "json"
    args = parser.parse_args(["profile", "lint", "x.yaml"])
    assert not hasattr(args, "output")


def test_to_json_converts_records() -> None:
    from gateway_client import CredentialInfo, ProviderRecord

    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    record = ProviderRecord(
        "p", "prof", "alice", 3, (CredentialInfo("c", True, moment),), None, None
    )
    assert to_json(record) == {
        "name": "p",
        "profile": "prof",
        "owner": "alice",
        "revision": 3,
        "credentials": [{"name": "c", "has_value": True, "expires_at": "2026-01-02T03:04:05Z"}],
        "created_at": None,
        "updated_at": None,
    }
    assert format_time(1_767_323_045) == "2026-01-02T03:04:05Z"

"""Provider profile validation (SPEC §2): every rule with a bad example, exact messages."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tokenferry.profiles import (
    ACCESS_TOKEN_TYPE,
    JWT_BEARER_ASSERTION,
    AudienceOverride,
    Credential,
    Endpoint,
    Problem,
    Profile,
    ProfileError,
    SubjectTokenSource,
    TokenGrant,
    load_profile_dir,
    load_profile_file,
    load_profile_text,
    parse_profile,
    profile_to_dict,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "profiles"
SRC = "test.yaml"


def base() -> dict[str, Any]:
    """A valid token_exchange profile (the SPEC §2 example); tests break one thing."""
    return {
        "id": "orders-api",
        "display_name": "Orders API",
        "credentials": [
            {"name": "user_token", "description": "user token", "required": True},
            {
                "name": "access_token",
                "auth_style": "bearer",
                "header_name": "Authorization",
                "token_grant": {
                    "grant_type": "token_exchange",
                    "token_endpoint": "https://idp.example.org/realms/r1/protocol/openid-connect/token",
                    "audience": "orders",
                    "scopes": ["orders.read"],
                    "subject_token": {
                        "source": "provider_credential",
                        "credential": "user_token",
                    },
                    "audience_overrides": [
                        {
                            "host": "reports.example.org",
                            "port": 443,
                            "path": "/v2/**",
                            "audience": "reports",
                            "scopes": ["reports.read"],
                        }
                    ],
                },
            },
        ],
        "endpoints": [
            {"host": "api.example.org", "port": 443, "path": "/orders/**", "protocol": "rest"},
            {"host": "*.svc.example.org", "port": 8080, "tls": "none"},
        ],
    }


def grant(data: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = data["credentials"][1]["token_grant"]
    return result


def errors(data: object) -> list[Problem]:
    with pytest.raises(ProfileError) as info:
        parse_profile(data, SRC)
    assert all(p.severity == "error" for p in info.value.problems)
    assert all(p.source == SRC for p in info.value.problems)
    return list(info.value.problems)


def only_error(data: object) -> Problem:
    found = errors(data)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


def warnings(data: object) -> list[Problem]:
    _, found = parse_profile(data, SRC)
    assert all(p.severity == "warning" for p in found)
    return list(found)


# --------------------------------------------------------------------------- valid input


def test_spec_example_parses_with_defaults() -> None:
    profile, found = parse_profile(base(), SRC)
    assert found == ()
    assert profile.id == "orders-api"
    assert profile.display_name == "Orders API"
    assert profile.description is None and profile.category is None
    user, access = profile.credentials
    assert user == Credential(
        name="user_token", description="user token", required=True, broker_only=True
    )
    assert access.broker_only is False
    assert access.required is False
    assert access.auth_style == "bearer" and access.header_name == "Authorization"
    assert access.token_grant == TokenGrant(
        grant_type="token_exchange",
        token_endpoint="https://idp.example.org/realms/r1/protocol/openid-connect/token",
        audience="orders",
        scopes=("orders.read",),
        jwt_svid_audience=None,
        client_assertion_type=JWT_BEARER_ASSERTION,
        requested_token_type=ACCESS_TOKEN_TYPE,
        cache_ttl_seconds=0,
        subject_token=SubjectTokenSource("provider_credential", "user_token", ACCESS_TOKEN_TYPE),
        audience_overrides=(
            AudienceOverride("reports.example.org", 443, "/v2/**", "reports", ("reports.read",)),
        ),
    )
    assert profile.endpoints == (
        Endpoint("api.example.org", 443, "/orders/**", "terminate", "rest"),
        Endpoint("*.svc.example.org", 8080, None, "none", None),
    )
    assert profile.credential("user_token") is user
    assert profile.credential("nope") is None
    assert profile.broker_only_credentials() == frozenset({"user_token"})
    assert profile.token_grant_credentials() == (access,)


def test_client_credentials_is_the_default_grant_and_subject_source_defaults() -> None:
    data = base()
    del grant(data)["grant_type"]
    del grant(data)["subject_token"]
    data["credentials"].pop(0)
    profile, _ = parse_profile(data, SRC)
    token_grant = profile.credentials[0].token_grant
    assert token_grant is not None and token_grant.grant_type == "client_credentials"
    data = base()
    del grant(data)["subject_token"]["source"]
    profile, _ = parse_profile(data, SRC)
    token_grant = profile.credentials[1].token_grant
    assert token_grant is not None and token_grant.subject_token is not None
    assert token_grant.subject_token.source == "provider_credential"


def test_broker_only_is_derived_by_profile_however_it_is_built() -> None:
    grant_ = TokenGrant(
        "token_exchange", "https://idp/t", subject_token=SubjectTokenSource("p", "user")
    )
    profile = Profile(
        id="x",
        credentials=(Credential("user", broker_only=False), Credential("t", token_grant=grant_)),
    )
    assert [c.broker_only for c in profile.credentials] == [True, False]


@pytest.mark.parametrize(
    ("endpoint", "svid_audience", "expected"),
    [
        ("https://idp.example.org/realms/r1/protocol/openid-connect/token", None,
         "https://idp.example.org/realms/r1"),
        ("https://idp.example.org:8443/auth/realms/dev/protocol/openid-connect/token", None,
         "https://idp.example.org:8443/auth/realms/dev"),
        ("https://login.example.org/oauth2/token", None, "https://login.example.org/oauth2/token"),
        ("https://idp.example.org/realms/r1/protocol/openid-connect/token", "spiffe-idp",
         "spiffe-idp"),
    ],
)  # fmt: skip
def test_svid_audience_derivation(endpoint: str, svid_audience: str | None, expected: str) -> None:
    token_grant = TokenGrant("client_credentials", endpoint, jwt_svid_audience=svid_audience)
    assert token_grant.svid_audience() == expected


@pytest.mark.parametrize(
    "name", ["client-credentials", "orders-token-exchange", "openshell-github"]
)
def test_examples_load_and_round_trip(name: str) -> None:
    profile, _ = load_profile_file(EXAMPLES / f"{name}.yaml")
    as_json = json.loads(json.dumps(profile_to_dict(profile)))
    again, found = parse_profile(as_json, "dict")
    assert again == profile
    assert all("OpenShell" not in p.message for p in found)


def test_profile_to_dict_spells_out_defaults_and_omits_broker_only_injection_fields() -> None:
    profile, _ = parse_profile(base(), SRC)
    data = profile_to_dict(profile)
    assert data["credentials"][0] == {
        "name": "user_token",
        "description": "user token",
        "required": True,
    }
    assert data["credentials"][1]["token_grant"]["client_assertion_type"] == JWT_BEARER_ASSERTION
    assert data["endpoints"][1] == {
        "host": "*.svc.example.org",
        "port": 8080,
        "tls": "none",
    }


# --------------------------------------------------------------------------- document shape


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "the profile is empty; expected a mapping with 'id', 'credentials', …"),
        (["id", "x"], "a profile must be a mapping, got a list ['id', 'x']"),
        ("orders", "a profile must be a mapping, got a string 'orders'"),
    ],
)
def test_document_must_be_a_mapping(data: object, message: str) -> None:
    assert only_error(data) == Problem(SRC, "", message)
    assert str(only_error(data)) == f"{SRC}: {message}"


@pytest.mark.parametrize(
    ("mutate", "path", "message"),
    [
        (lambda d: d.update(credentails=[]), "credentails",
         "unknown key 'credentails'; did you mean 'credentials'?"),
        (lambda d: d["credentials"][1].update(headr_name="X"), "credentials[1].headr_name",
         "unknown key 'headr_name'; did you mean 'header_name'?"),
        (lambda d: grant(d).update(grant_tpye="x"), "credentials[1].token_grant.grant_tpye",
         "unknown key 'grant_tpye'; did you mean 'grant_type'?"),
        (lambda d: grant(d)["subject_token"].update(credentail="x"),
         "credentials[1].token_grant.subject_token.credentail",
         "unknown key 'credentail'; did you mean 'credential'?"),
        (lambda d: grant(d)["audience_overrides"][0].update(scope=["a"]),
         "credentials[1].token_grant.audience_overrides[0].scope",
         "unknown key 'scope'; did you mean 'scopes'?"),
        (lambda d: d["endpoints"][0].update(ports=[443]), "endpoints[0].ports",
         "unknown key 'ports'; did you mean 'port'?"),
        (lambda d: d.update(colour="red"), "colour", "unknown key 'colour'"),
        (lambda d: d.update({1: "x"}), "", "keys must be strings, got an integer 1"),
    ],
)  # fmt: skip
def test_unknown_keys_are_errors_with_suggestions(mutate: Any, path: str, message: str) -> None:
    data = base()
    mutate(data)
    assert only_error(data) == Problem(SRC, path, message)


@pytest.mark.parametrize(
    ("mutate", "path", "key", "value"),
    [
        (lambda d: d.update(binaries=["/usr/bin/gh"]), "binaries", "binaries", "['/usr/bin/gh']"),
        (lambda d: d.update(inference_capable=True), "inference_capable", "inference_capable",
         "True"),
        (lambda d: d["credentials"][1].update(refresh={"strategy": "static"}),
         "credentials[1].refresh", "refresh", "{'strategy': 'static'}"),
        (lambda d: d["credentials"][1].update(query_param="key"), "credentials[1].query_param",
         "query_param", "'key'"),
        (lambda d: d["endpoints"][0].update(path_template="/x"), "endpoints[0].path_template",
         "path_template", "'/x'"),
        (lambda d: d["endpoints"][0].update(allowed_ips=["10.0.0.0/8"]),
         "endpoints[0].allowed_ips", "allowed_ips", "['10.0.0.0/8']"),
        (lambda d: d["endpoints"][0].update(access="read-write"), "endpoints[0].access", "access",
         "'read-write'"),
        (lambda d: d["endpoints"][0].update(enforcement="enforce"), "endpoints[0].enforcement",
         "enforcement", "'enforce'"),
        (lambda d: d.update(protocol="rest"), "protocol", "protocol", "'rest'"),
    ],
)  # fmt: skip
def test_openshell_keys_are_accepted_with_a_warning(
    mutate: Any, path: str, key: str, value: str
) -> None:
    data = base()
    mutate(data)
    message = f"OpenShell key {key!r} is accepted but tokenferry does not act on it (value {value})"
    assert warnings(data) == [Problem(SRC, path, message, "warning")]


def test_protocol_on_an_endpoint_is_a_field_not_a_warning() -> None:
    profile, found = parse_profile(base(), SRC)
    assert found == ()
    assert profile.endpoints[0].protocol == "rest"


# --------------------------------------------------------------------------- top level


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("Orders_API", "must match [a-z0-9][a-z0-9-]{0,62} (lower-case letters, digits, '-'), "
         "got 'Orders_API'"),
        ("-orders", "must match [a-z0-9][a-z0-9-]{0,62} (lower-case letters, digits, '-'), "
         "got '-orders'"),
        ("a" * 64, "must match [a-z0-9][a-z0-9-]{0,62} (lower-case letters, digits, '-'), "
         "got '" + "a" * 64 + "'"),
        (42, "must be a string, got an integer 42"),
        (None, "is required"),
        ("", "must not be empty, got ''"),
    ],
)  # fmt: skip
def test_profile_id(value: object, message: str) -> None:
    data = base()
    data["id"] = value
    assert only_error(data) == Problem(SRC, "id", message)


def test_missing_id_is_required() -> None:
    data = base()
    del data["id"]
    assert only_error(data) == Problem(SRC, "id", "is required")


def test_id_of_63_characters_is_valid() -> None:
    data = base()
    data["id"] = "a" + "-" * 61 + "b"
    assert parse_profile(data, SRC)[0].id == data["id"]


@pytest.mark.parametrize("key", ["display_name", "description", "category"])
def test_free_text_fields_must_be_strings(key: str) -> None:
    data = base()
    data[key] = ["x"]
    assert only_error(data) == Problem(SRC, key, "must be a string, got a list ['x']")


@pytest.mark.parametrize("key", ["credentials", "endpoints"])
def test_lists_must_be_lists(key: str) -> None:
    data = base()
    data[key] = {"name": "x"}
    found = errors(data)
    assert Problem(SRC, key, "must be a list of mappings, got a mapping {'name': 'x'}") in found


def test_list_items_must_be_mappings() -> None:
    data = base()
    data["endpoints"].append("api.example.org")
    assert only_error(data) == Problem(
        SRC, "endpoints[2]", "must be a mapping, got a string 'api.example.org'"
    )


# --------------------------------------------------------------------------- credentials


def test_duplicate_credential_names() -> None:
    data = base()
    data["credentials"].append({"name": "access_token"})
    assert only_error(data) == Problem(
        SRC,
        "credentials[2].name",
        "duplicate credential name 'access_token' (first defined at credentials[1])",
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("has space", "must match [A-Za-z_][A-Za-z0-9_.-]{0,63}, got 'has space'"),
        ("a=b", "must match [A-Za-z_][A-Za-z0-9_.-]{0,63}, got 'a=b'"),
        (None, "is required"),
        (7, "must be a string, got an integer 7"),
    ],
)
def test_credential_name(value: object, message: str) -> None:
    data = base()
    data["credentials"].append({"name": value})
    assert only_error(data) == Problem(SRC, "credentials[2].name", message)


def test_required_must_be_boolean() -> None:
    data = base()
    data["credentials"][1]["required"] = "yes please"
    assert only_error(data) == Problem(
        SRC, "credentials[1].required", "must be true or false, got a string 'yes please'"
    )


@pytest.mark.parametrize(
    ("value", "path", "message"),
    [
        ("GITHUB_TOKEN", "credentials[2].env_vars",
         "must be a list of environment variable names, got a string 'GITHUB_TOKEN'"),
        (["OK", "1BAD"], "credentials[2].env_vars[1]",
         "must be an environment variable name, got '1BAD'"),
        ([3], "credentials[2].env_vars[0]", "must be a string, got an integer 3"),
    ],
)  # fmt: skip
def test_env_vars(value: object, path: str, message: str) -> None:
    data = base()
    data["credentials"].append({"name": "static", "env_vars": value})
    assert only_error(data) == Problem(SRC, path, message)


def test_auth_style_of_a_token_grant_credential() -> None:
    data = base()
    data["credentials"][1]["auth_style"] = "Bearer"
    assert only_error(data) == Problem(
        SRC,
        "credentials[1].auth_style",
        "must be one of 'bearer', 'header', got 'Bearer'; did you mean 'bearer'?",
    )


def test_header_style_requires_header_name() -> None:
    data = base()
    data["credentials"][1]["auth_style"] = "header"
    del data["credentials"][1]["header_name"]
    assert only_error(data) == Problem(
        SRC, "credentials[1].header_name", "is required when auth_style is 'header'"
    )
    data["credentials"][1]["header_name"] = "X-Api-Key"
    profile, _ = parse_profile(data, SRC)
    assert profile.credentials[1].auth_style == "header"
    assert profile.credentials[1].header_name == "X-Api-Key"


def test_static_credential_with_other_auth_style_is_a_warning() -> None:
    data = base()
    data["credentials"].append({"name": "key", "auth_style": "query"})
    assert warnings(data) == [
        Problem(
            SRC,
            "credentials[2].auth_style",
            "'query' is kept but not acted on: tokenferry injects only token_grant "
            "credentials, with auth_style 'bearer' or 'header'",
            "warning",
        )
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("X Api Key",
         "must be a valid HTTP field name (RFC 9110 token characters), got 'X Api Key'"),
        ("X-Key:", "must be a valid HTTP field name (RFC 9110 token characters), got 'X-Key:'"),
        ("Host", "must not be a message framing or hop-by-hop header, got 'Host'"),
        ("content-length", "must not be a message framing or hop-by-hop header, "
         "got 'content-length'"),
        ("TRANSFER-ENCODING", "must not be a message framing or hop-by-hop header, "
         "got 'TRANSFER-ENCODING'"),
        ("Connection", "must not be a message framing or hop-by-hop header, got 'Connection'"),
        (["Authorization"], "must be a string, got a list ['Authorization']"),
    ],
)  # fmt: skip
def test_header_name(value: object, message: str) -> None:
    data = base()
    data["credentials"][1]["header_name"] = value
    assert only_error(data) == Problem(SRC, "credentials[1].header_name", message)


def test_header_name_keeps_its_case() -> None:
    data = base()
    data["credentials"][1]["header_name"] = "x-api-key"
    assert parse_profile(data, SRC)[0].credentials[1].header_name == "x-api-key"


# --------------------------------------------------------------------------- token grant


def test_grant_type() -> None:
    data = base()
    grant(data)["grant_type"] = "token-exchange"
    assert only_error(data) == Problem(
        SRC,
        "credentials[1].token_grant.grant_type",
        "must be one of 'client_credentials', 'token_exchange', got 'token-exchange'; "
        "did you mean 'token_exchange'?",
    )


def test_grant_type_urn_gets_a_precise_hint() -> None:
    data = base()
    grant(data)["grant_type"] = "urn:ietf:params:oauth:grant-type:token-exchange"
    assert only_error(data) == Problem(
        SRC,
        "credentials[1].token_grant.grant_type",
        "write 'token_exchange' instead of 'urn:ietf:params:oauth:grant-type:token-exchange'",
    )


def test_token_grant_must_be_a_mapping() -> None:
    data = base()
    data["credentials"][1]["token_grant"] = "client_credentials"
    found = errors(data)
    assert (
        Problem(
            SRC,
            "credentials[1].token_grant",
            "must be a mapping, got a string 'client_credentials'",
        )
        in found
    )


def test_subject_token_required_for_token_exchange() -> None:
    data = base()
    del grant(data)["subject_token"]
    data["credentials"].pop(0)
    assert only_error(data) == Problem(
        SRC,
        "credentials[0].token_grant.subject_token",
        "is required when grant_type is 'token_exchange'",
    )


def test_subject_token_forbidden_for_client_credentials() -> None:
    data = base()
    grant(data)["grant_type"] = "client_credentials"
    assert only_error(data) == Problem(
        SRC,
        "credentials[1].token_grant.subject_token",
        "is only allowed with grant_type 'token_exchange' (grant_type is 'client_credentials')",
    )


def test_subject_credential_must_exist() -> None:
    data = base()
    grant(data)["subject_token"]["credential"] = "user_tokn"
    assert only_error(data) == Problem(
        SRC,
        "credentials[1].token_grant.subject_token.credential",
        "names no credential of this profile: 'user_tokn'; did you mean 'user_token'? "
        "(credentials: 'user_token')",
    )


def test_subject_credential_must_be_another_credential() -> None:
    data = base()
    grant(data)["subject_token"]["credential"] = "access_token"
    assert only_error(data) == Problem(
        SRC,
        "credentials[1].token_grant.subject_token.credential",
        "must name another credential, not this one ('access_token')",
    )


def test_subject_token_fields() -> None:
    data = base()
    grant(data)["subject_token"] = {"source": "env", "subject_token_type": "access token"}
    assert errors(data) == [
        Problem(
            SRC,
            "credentials[1].token_grant.subject_token.source",
            "must be one of 'provider_credential', got 'env'",
        ),
        Problem(SRC, "credentials[1].token_grant.subject_token.credential", "is required"),
        Problem(
            SRC,
            "credentials[1].token_grant.subject_token.subject_token_type",
            "must not contain spaces, got 'access token'",
        ),
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("env_vars", ["USER_TOKEN"]),
        ("auth_style", "bearer"),
        ("header_name", "Authorization"),
        ("token_grant", {"token_endpoint": "https://idp.example.org/token"}),
        ("query_param", "token"),
    ],
)
def test_subject_credential_is_broker_only(key: str, value: object) -> None:
    data = base()
    data["credentials"][0][key] = value
    found = errors(data)
    assert found[-1] == Problem(
        SRC,
        f"credentials[0].{key}",
        f"credential 'user_token' is broker-only (the subject token of 'access_token') and "
        f"may not declare {key!r}; it never leaves the gateway",
    )


def test_broker_only_credential_may_carry_empty_openshell_defaults() -> None:
    data = base()
    data["credentials"][0]["env_vars"] = []
    data["credentials"][0]["query_param"] = ""
    profile, _ = parse_profile(data, SRC)
    assert profile.credentials[0].broker_only


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://idp.example.org/token",
         "must use https:// (http:// is allowed only for loopback hosts and Kubernetes service "
         "names such as name.ns.svc), got 'http://idp.example.org/token'"),
        ("http://idp.svc/token",
         "must use https:// (http:// is allowed only for loopback hosts and Kubernetes service "
         "names such as name.ns.svc), got 'http://idp.svc/token'"),
        ("http://idp.ns.svc.example.org/token",
         "must use https:// (http:// is allowed only for loopback hosts and Kubernetes service "
         "names such as name.ns.svc), got 'http://idp.ns.svc.example.org/token'"),
        ("http://128.0.0.1/token",
         "must use https:// (http:// is allowed only for loopback hosts and Kubernetes service "
         "names such as name.ns.svc), got 'http://128.0.0.1/token'"),
        ("ftp://idp.example.org/token",
         "must be an https:// URL with a host, got 'ftp://idp.example.org/token'"),
        ("idp.example.org/token",
         "must be an https:// URL with a host, got 'idp.example.org/token'"),
        ("https:///token", "must be an https:// URL with a host, got 'https:///token'"),
        ("https://user:pw@idp.example.org/token",
         "must not contain user information, got 'https://user:pw@idp.example.org/token'"),
        ("https://idp.example.org:99999/token",
         "must be a valid URL (Port out of range 0-65535), got 'https://idp.example.org:99999/token'"),
        ("https://idp.example.org/to ken",
         "must be a URL without spaces, got 'https://idp.example.org/to ken'"),
        (None, "is required"),
    ],
)  # fmt: skip
def test_token_endpoint_rules(url: object, message: str) -> None:
    data = base()
    grant(data)["token_endpoint"] = url
    assert only_error(data) == Problem(SRC, "credentials[1].token_grant.token_endpoint", message)


@pytest.mark.parametrize(
    "url",
    [
        "https://idp.example.org/realms/r1/protocol/openid-connect/token",
        "http://localhost:8080/realms/dev/protocol/openid-connect/token",
        "http://127.0.0.1:41234/token",
        "http://127.9.8.7/token",
        "http://[::1]:8080/token",
        "http://keycloak.identity.svc/realms/r1/protocol/openid-connect/token",
        "http://keycloak.identity.svc.cluster.local:8080/token",
        "HTTPS://IDP.EXAMPLE.ORG/token",
    ],
)
def test_token_endpoint_allowed(url: str) -> None:
    data = base()
    grant(data)["token_endpoint"] = url
    profile, _ = parse_profile(data, SRC)
    token_grant = profile.credentials[1].token_grant
    assert token_grant is not None and token_grant.token_endpoint == url


@pytest.mark.parametrize(
    ("value", "path", "message"),
    [
        ("orders.read", "credentials[1].token_grant.scopes",
         "must be a list of scopes, got a string 'orders.read'"),
        (["orders read"], "credentials[1].token_grant.scopes[0]",
         "must be a non-empty scope token without spaces, quotes or backslashes (RFC 6749 §3.3), "
         "got 'orders read'"),
        (["ok", ""], "credentials[1].token_grant.scopes[1]",
         "must be a non-empty scope token without spaces, quotes or backslashes (RFC 6749 §3.3), "
         "got ''"),
        ([None], "credentials[1].token_grant.scopes[0]", "must be a string, got null None"),
    ],
)  # fmt: skip
def test_scopes(value: object, path: str, message: str) -> None:
    data = base()
    grant(data)["scopes"] = value
    assert only_error(data) == Problem(SRC, path, message)


def test_duplicate_scope_is_a_warning_and_dropped() -> None:
    data = base()
    grant(data)["scopes"] = ["a", "b", "a"]
    assert warnings(data) == [
        Problem(SRC, "credentials[1].token_grant.scopes[2]", "duplicate 'a' ignored", "warning")
    ]
    token_grant = parse_profile(data, SRC)[0].credentials[1].token_grant
    assert token_grant is not None and token_grant.scopes == ("a", "b")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "must be >= 0, got -1"),
        (True, "must be an integer, got a boolean True"),
        ("60", "must be an integer, got a string '60'"),
        (1.5, "must be an integer, got a number 1.5"),
    ],
)
def test_cache_ttl_seconds(value: object, message: str) -> None:
    data = base()
    grant(data)["cache_ttl_seconds"] = value
    assert only_error(data) == Problem(SRC, "credentials[1].token_grant.cache_ttl_seconds", message)


def test_cache_ttl_above_the_lifetime_cap_is_a_warning() -> None:
    data = base()
    grant(data)["cache_ttl_seconds"] = 7200
    assert warnings(data) == [
        Problem(
            SRC,
            "credentials[1].token_grant.cache_ttl_seconds",
            "7200 has no effect: token lifetimes are capped at 3600 s anyway",
            "warning",
        )
    ]


def test_unknown_token_types_are_warnings_with_suggestions() -> None:
    data = base()
    grant(data)["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-spife"
    grant(data)["requested_token_type"] = "urn:ietf:params:oauth:token-type:acess_token"
    found = warnings(data)
    assert [p.path for p in found] == [
        "credentials[1].token_grant.client_assertion_type",
        "credentials[1].token_grant.requested_token_type",
    ]
    assert found[0].message.endswith(
        "did you mean 'urn:ietf:params:oauth:client-assertion-type:jwt-spiffe'?"
    )
    assert found[1].message.endswith(
        "did you mean 'urn:ietf:params:oauth:token-type:access_token'?"
    )


# --------------------------------------------------------------------------- audience overrides


@pytest.mark.parametrize(
    ("override", "path", "message"),
    [
        ({"host": "reports.*", "audience": "r"}, "host",
         "the rightmost label must not be a wildcard, got 'reports.*'"),
        ({"host": "reports.example.org", "port": 0, "audience": "r"}, "port",
         "must be between 1 and 65535, got 0"),
        ({"host": "reports.example.org", "path": "v2/**", "audience": "r"}, "path",
         "must be a path glob starting with '/', got 'v2/**'"),
        ({"port": 443, "audience": "r"}, "host", "is required"),
        ({"host": "reports.example.org", "scopes": "reports.read"}, "scopes",
         "must be a list of scopes, got a string 'reports.read'"),
    ],
)  # fmt: skip
def test_audience_override_follows_endpoint_rules(
    override: dict[str, Any], path: str, message: str
) -> None:
    data = base()
    grant(data)["audience_overrides"] = [override]
    assert only_error(data) == Problem(
        SRC, f"credentials[1].token_grant.audience_overrides[0].{path}", message
    )


def test_audience_override_needs_audience_or_scopes() -> None:
    data = base()
    grant(data)["audience_overrides"] = [{"host": "reports.example.org"}]
    assert only_error(data) == Problem(
        SRC,
        "credentials[1].token_grant.audience_overrides[0]",
        "an audience override must set 'audience' or 'scopes' (without either it is just "
        "another endpoint; list it under 'endpoints')",
    )


def test_audience_override_defaults() -> None:
    data = base()
    grant(data)["audience_overrides"] = [{"host": "Reports.Example.org", "scopes": ["r"]}]
    token_grant = parse_profile(data, SRC)[0].credentials[1].token_grant
    assert token_grant is not None
    assert token_grant.audience_overrides == (
        AudienceOverride("reports.example.org", 443, None, None, ("r",)),
    )


def test_audience_overrides_must_be_a_list() -> None:
    data = base()
    grant(data)["audience_overrides"] = {"host": "x.example.org"}
    assert only_error(data) == Problem(
        SRC,
        "credentials[1].token_grant.audience_overrides",
        "must be a list of mappings, got a mapping {'host': 'x.example.org'}",
    )


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("API.Example.org", "api.example.org"),
        ("api.example.org.", "api.example.org"),
        ("*.example.org", "*.example.org"),
        ("**.example.org", "**.example.org"),
        ("api.*.example.org", "api.*.example.org"),
        ("localhost", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_endpoint_host_valid(host: str, expected: str) -> None:
    data = base()
    data["endpoints"] = [{"host": host}]
    assert parse_profile(data, SRC)[0].endpoints[0].host == expected


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("api*.example.org", "wildcards must be whole labels ('*' or '**'), not 'api*'"),
        ("example.*", "the rightmost label must not be a wildcard"),
        ("**", "the rightmost label must not be a wildcard"),
        ("api..example.org", "label '' is not a valid DNS label"),
        ("my_host.example.org", "label 'my_host' is not a valid DNS label"),
        ("-api.example.org", "label '-api' is not a valid DNS label"),
        ("a" * 64 + ".example.org", "label '" + "a" * 64 + "' is not a valid DNS label"),
        ("bücher.example", "must be ASCII (write internationalised names in punycode, xn--…)"),
        ("api.example.org:443", "label 'org:443' is not a valid DNS label"),
        ("https://api.example.org", "label 'https://api' is not a valid DNS label"),
    ],
)
def test_endpoint_host_invalid(host: str, message: str) -> None:
    data = base()
    data["endpoints"] = [{"host": host}]
    assert only_error(data) == Problem(SRC, "endpoints[0].host", f"{message}, got {host!r}")


def test_endpoint_host_is_required() -> None:
    data = base()
    data["endpoints"] = [{"port": 443}]
    assert only_error(data) == Problem(SRC, "endpoints[0].host", "is required")


@pytest.mark.parametrize(
    ("endpoint", "port"),
    [
        ({"host": "a.example.org"}, 443),
        ({"host": "a.example.org", "tls": "terminate"}, 443),
        ({"host": "a.example.org", "tls": "none"}, 80),
        ({"host": "a.example.org", "tls": "skip"}, 443),
        ({"host": "a.example.org", "tls": "none", "port": 8080}, 8080),
        ({"host": "a.example.org", "port": 65535}, 65535),
    ],
)
def test_endpoint_port_defaults(endpoint: dict[str, Any], port: int) -> None:
    data = base()
    data["endpoints"] = [endpoint]
    assert parse_profile(data, SRC)[0].endpoints[0].port == port


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be between 1 and 65535, got 0"),
        (65536, "must be between 1 and 65535, got 65536"),
        ("443", "must be an integer, got a string '443'"),
        (True, "must be an integer, got a boolean True"),
    ],
)
def test_endpoint_port_invalid(value: object, message: str) -> None:
    data = base()
    data["endpoints"][0]["port"] = value
    assert only_error(data) == Problem(SRC, "endpoints[0].port", message)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("orders/**", "must be a path glob starting with '/', got 'orders/**'"),
        ("/orders /x", "must not contain whitespace or control characters, got '/orders /x'"),
        ("/orders?x=1",
         "must not contain '?' or '#' (paths are matched without query or fragment), "
         "got '/orders?x=1'"),
    ],
)  # fmt: skip
def test_endpoint_path_invalid(value: str, message: str) -> None:
    data = base()
    data["endpoints"][0]["path"] = value
    assert only_error(data) == Problem(SRC, "endpoints[0].path", message)


def test_endpoint_tls() -> None:
    data = base()
    data["endpoints"][0]["tls"] = "terminat"
    assert only_error(data) == Problem(
        SRC,
        "endpoints[0].tls",
        "must be one of 'terminate', 'none', 'skip', got 'terminat'; did you mean 'terminate'?",
    )


def test_duplicate_endpoint_is_a_warning() -> None:
    data = base()
    data["endpoints"].append({"host": "API.example.org", "path": "/orders/**"})
    assert warnings(data) == [Problem(SRC, "endpoints[2]", "duplicates endpoints[0]", "warning")]


def test_profiles_that_inject_nothing_or_collide_get_warnings() -> None:
    data = base()
    data["credentials"] = [{"name": "static", "env_vars": ["TOKEN"]}]
    assert warnings(data) == [
        Problem(
            SRC,
            "credentials",
            "no credential has a token_grant: tokenferry injects nothing for this profile",
            "warning",
        )
    ]
    data = base()
    data["credentials"].append(
        {"name": "another", "token_grant": {"token_endpoint": "https://idp.example.org/t"}}
    )
    assert warnings(data) == [
        Problem(
            SRC,
            "credentials",
            "2 credentials have a token_grant: each gets routes for every endpoint and only one "
            "is injected per request (ties go to 'access_token')",
            "warning",
        )
    ]


# --------------------------------------------------------------------------- collecting


def test_all_errors_are_collected_in_document_order_per_field() -> None:
    data = base()
    data["id"] = "Bad Id"
    grant(data)["grant_type"] = "exchange"
    grant(data)["cache_ttl_seconds"] = -5
    data["endpoints"][1]["tls"] = "tls"
    data["endpoints"][0]["port"] = 70000
    found = errors(data)
    assert [p.path for p in found] == [
        "id",
        "credentials[1].token_grant.grant_type",
        "credentials[1].token_grant.cache_ttl_seconds",
        "endpoints[0].port",
        "endpoints[1].tls",
    ]


def test_long_values_are_truncated_in_messages() -> None:
    data = base()
    data["id"] = "x" * 500
    problem = only_error(data)
    shown = problem.message.split("got ", 1)[1]
    assert len(shown) <= 80
    assert shown.startswith("'xxxx")


def test_profile_error_lists_every_problem() -> None:
    data = base()
    data["id"] = 1
    data["endpoints"][0]["port"] = 0
    with pytest.raises(ProfileError) as info:
        parse_profile(data, SRC)
    assert str(info.value).splitlines() == [
        "test.yaml: id: must be a string, got an integer 1",
        "test.yaml: endpoints[0].port: must be between 1 and 65535, got 0",
    ]


def test_problem_str_and_dict() -> None:
    problem = Problem("f.yaml", "endpoints[0].tls", "bad", "warning")
    assert str(problem) == "f.yaml: endpoints[0].tls: bad"
    assert problem.to_dict() == {
        "severity": "warning",
        "source": "f.yaml",
        "path": "endpoints[0].tls",
        "message": "bad",
    }


# --------------------------------------------------------------------------- text and files


def test_yaml_syntax_error_names_line_and_column() -> None:
    text = "id: orders\ncredentials:\n  - name: a\n   bad: [\n"
    with pytest.raises(ProfileError) as info:
        load_profile_text(text, "p.yaml")
    (problem,) = info.value.problems
    assert problem.source == "p.yaml"
    assert problem.path.startswith("line 4, column ")
    assert problem.message.startswith("invalid YAML: ")


def test_yaml_duplicate_key_is_an_error_with_its_line() -> None:
    text = "id: orders\nid: other\n"
    with pytest.raises(ProfileError) as info:
        load_profile_text(text, "p.yaml")
    assert info.value.problems == (
        Problem(
            "p.yaml",
            "line 2, column 1",
            "invalid YAML: found duplicate key 'id' (while constructing a mapping)",
        ),
    )


def test_yaml_merge_keys_may_be_overridden() -> None:
    text = (
        "id: orders\n"
        "endpoints:\n"
        "  - &base {host: api.example.org, port: 443}\n"
        "  - {<<: *base, port: 8443}\n"
    )
    profile, _ = load_profile_text(text, "p.yaml")
    assert [e.port for e in profile.endpoints] == [443, 8443]


def test_json_text_and_json_errors() -> None:
    profile, _ = load_profile_text(json.dumps(base()), "p.json")
    assert profile.id == "orders-api"
    with pytest.raises(ProfileError) as info:
        load_profile_text('{\n  "id": "x",\n  "credentials": [,]\n}', "p.json")
    assert info.value.problems == (
        Problem("p.json", "line 3, column 19", "invalid JSON: Expecting value"),
    )
    with pytest.raises(ProfileError) as info:
        load_profile_text('{"id": "x", "id": "y"}', "p.json")
    assert info.value.problems == (Problem("p.json", "", "invalid JSON: duplicate key 'id'"),)


def test_yaml_alias_bomb_gives_a_bounded_message() -> None:
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 9)}]")
    lines.append("id: *i")
    with pytest.raises(ProfileError) as info:
        load_profile_text("\n".join(lines), "bomb.yaml")
    assert all(len(str(p)) < 400 for p in info.value.problems)
    assert any(p.path == "id" for p in info.value.problems)


def test_load_profile_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ProfileError) as info:
        load_profile_file(missing)
    assert info.value.problems == (Problem(str(missing), "", "no such file"),)

    with pytest.raises(ProfileError) as info:
        load_profile_file(tmp_path)
    assert info.value.problems == (
        Problem(str(tmp_path), "", "is a directory, not a profile file"),
    )

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"id: \xff\xfe\n")
    with pytest.raises(ProfileError) as info:
        load_profile_file(binary)
    assert info.value.problems == (
        Problem(str(binary), "", "not UTF-8 text (byte 4: invalid start byte)"),
    )

    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(ProfileError) as info:
        load_profile_file(big)
    assert info.value.problems == (Problem(str(big), "", "larger than 1048576 bytes"),)


def test_load_profile_dir(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("id: one\n")
    (tmp_path / "b.yml").write_text("id: two\n")
    (tmp_path / "c.json").write_text('{"id": "three"}')
    (tmp_path / "README.md").write_text("not a profile")
    (tmp_path / ".backup.yaml").write_text("id: [hidden files are skipped")
    assert [p.id for p in load_profile_dir(tmp_path)] == ["one", "two", "three"]

    (tmp_path / "d.yaml").write_text("id: one\n")
    (tmp_path / "e.yaml").write_text("id: BAD\n")
    with pytest.raises(ProfileError) as info:
        load_profile_dir(tmp_path)
    assert [str(p) for p in info.value.problems] == [
        f"{tmp_path / 'd.yaml'}: id: duplicate profile id 'one' (also in {tmp_path / 'a.yaml'})",
        f"{tmp_path / 'e.yaml'}: id: must match [a-z0-9][a-z0-9-]{{0,62}} (lower-case letters, "
        "digits, '-'), got 'BAD'",
    ]

    with pytest.raises(ProfileError) as info:
        load_profile_dir(tmp_path / "a.yaml")
    assert info.value.problems == (Problem(str(tmp_path / "a.yaml"), "", "not a directory"),)


def test_parse_does_not_mutate_its_input() -> None:
    data = base()
    before = copy.deepcopy(data)
    parse_profile(data, SRC)
    assert data == before


@pytest.mark.parametrize(
    ("mutate", "path", "message"),
    [
        (lambda d: grant(d).update(grant_tpye=grant(d).pop("grant_type")),
         "credentials[1].token_grant.grant_tpye",
         "unknown key 'grant_tpye'; did you mean 'grant_type'?"),
        (lambda d: grant(d).update(token_endpiont=grant(d).pop("token_endpoint")),
         "credentials[1].token_grant.token_endpiont",
         "unknown key 'token_endpiont'; did you mean 'token_endpoint'?"),
        (lambda d: grant(d).update(subject_tokens=grant(d).pop("subject_token")),
         "credentials[1].token_grant.subject_tokens",
         "unknown key 'subject_tokens'; did you mean 'subject_token'?"),
        (lambda d: d["endpoints"][0].update(hots=d["endpoints"][0].pop("host")),
         "endpoints[0].hots", "unknown key 'hots'; did you mean 'host'?"),
        (lambda d: d["credentials"][1].update(auth_style="header", header_nmae="X-Key"),
         "credentials[1].header_nmae", "unknown key 'header_nmae'; did you mean 'header_name'?"),
    ],
)  # fmt: skip
def test_a_misspelt_key_is_one_error_not_a_cascade(mutate: Any, path: str, message: str) -> None:
    data = base()
    mutate(data)
    assert only_error(data) == Problem(SRC, path, message)

"""JWT-SVID verification: every refusal of SPEC §6 / §9, each with a message saying why."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tokenferry.svid_verify import (
    ALLOWED_ALGORITHMS,
    SvidVerificationError,
    UnknownKeyError,
    VerifiedSvid,
    parse_spiffe_id,
    verify_jwt_svid,
)

TD = "example.org"
OTHER_TD = "other.org"
SUB = "spiffe://example.org/sandbox/s1"
AUD = "https://idp.example.org/realms/dev"
NOW = 1_800_000_000.0

EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC384_KEY = ec.generate_private_key(ec.SECP384R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    public = key.public_key()
    algo = ECAlgorithm if isinstance(public, ec.EllipticCurvePublicKey) else RSAAlgorithm
    jwk: dict[str, Any] = algo.to_jwk(public, as_dict=True)
    jwk["kid"] = kid
    jwk["use"] = "jwt-svid"
    return jwk


BUNDLES: dict[str, dict[str, Any]] = {
    TD: {"keys": [_jwk(EC_KEY, "ec1"), _jwk(EC384_KEY, "ec384"), _jwk(RSA_KEY, "rsa1")]},
    OTHER_TD: {"keys": [_jwk(OTHER_EC_KEY, "other1")]},
}


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": SUB, "aud": [AUD], "exp": int(NOW) + 300, "iat": int(NOW)}
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _sign(
    claims: dict[str, Any], key: Any = EC_KEY, alg: str = "ES256", kid: str | None = "ec1"
) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        (_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature))
    )


def _verify(token: str, **kwargs: Any) -> VerifiedSvid:
    options: dict[str, Any] = {
        "bundles": BUNDLES,
        "audience": AUD,
        "trust_domains": [TD, OTHER_TD],
        "now": NOW,
    }
    options.update(kwargs)
    return verify_jwt_svid(token, **options)


def _refused(token: str, match: str, **kwargs: Any) -> SvidVerificationError:
    with pytest.raises(SvidVerificationError, match=match) as info:
        _verify(token, **kwargs)
    # The message must never carry the token or its signature.
    assert token not in str(info.value)
    for part in token.split("."):
        assert len(part) < 8 or part not in str(info.value)
    return info.value


def test_valid_es256_svid_returns_identity_and_claims() -> None:
    result = _verify(_sign(_claims()))
    assert result.spiffe_id == SUB
    assert result.trust_domain == TD
    assert result.claims["aud"] == [AUD]
    assert AUD not in repr(result)


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_valid_rsa_family_svids(alg: str) -> None:
    assert _verify(_sign(_claims(), RSA_KEY, alg, "rsa1")).spiffe_id == SUB


def test_valid_es384_and_string_audience_and_any_of_several_audiences() -> None:
    token = _sign(_claims(aud=AUD), EC384_KEY, "ES384", "ec384")
    assert _verify(token, audience=["https://other", AUD]).spiffe_id == SUB


def test_allowed_algorithms_are_exactly_the_asymmetric_set() -> None:
    assert set(ALLOWED_ALGORITHMS) == {
        "RS256",
        "RS384",
        "RS512",
        "ES256",
        "ES384",
        "PS256",
        "PS384",
        "PS512",
    }


def test_alg_none_is_refused() -> None:
    token = _unsigned({"alg": "none", "typ": "JWT", "kid": "ec1"}, _claims())
    _refused(token, "algorithm 'none' is not allowed")


def test_hs256_signed_with_public_key_pem_is_refused() -> None:
    # The classic confusion attack: HMAC keyed with the verifier's public key.
    pem = EC_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": "ec1"}
    signing_input = (
        _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(_claims()).encode())
    ).encode()
    import hashlib
    import hmac

    signature = hmac.new(pem, signing_input, hashlib.sha256).digest()
    token = signing_input.decode() + "." + _b64(signature)
    _refused(token, "algorithm 'HS256' is not allowed")


def test_hmac_with_any_secret_is_refused() -> None:
    token = jwt.encode(_claims(), "secret" * 11, algorithm="HS512", headers={"kid": "ec1"})
    _refused(token, "algorithm 'HS512' is not allowed")


def test_unknown_kid_is_refused_with_its_own_type() -> None:
    token = _sign(_claims(), OTHER_EC_KEY, kid="nope")
    error = _refused(token, "key id 'nope' is not in the JWT bundle of trust domain 'example.org'")
    assert isinstance(error, UnknownKeyError)


def test_missing_kid_is_refused() -> None:
    _refused(_sign(_claims(), kid=None), "no key id")


def test_signature_by_another_key_with_a_known_kid_is_refused() -> None:
    _refused(_sign(_claims(), OTHER_EC_KEY, kid="ec1"), "signature does not verify")


def test_tampered_payload_is_refused() -> None:
    header, _payload, signature = _sign(_claims()).split(".")
    forged = _b64(json.dumps(_claims(sub="spiffe://example.org/gateway")).encode())
    _refused(f"{header}.{forged}.{signature}", "signature does not verify")


def test_key_from_another_trust_domains_bundle_is_refused() -> None:
    # Signed by other.org's key, claiming an example.org identity.
    token = _sign(_claims(), OTHER_EC_KEY, kid="other1")
    _refused(token, "'other1' is not in the JWT bundle of trust domain 'example.org'")


def test_trust_domain_not_allowed() -> None:
    token = _sign(_claims(sub="spiffe://other.org/w"), OTHER_EC_KEY, kid="other1")
    assert _verify(token).trust_domain == OTHER_TD
    _refused(token, "trust domain 'other.org' is not allowed", trust_domains=[TD])


def test_trust_domain_allowed_but_without_bundle() -> None:
    token = _sign(_claims(sub="spiffe://third.org/w"))
    _refused(token, "no JWT bundle for trust domain 'third.org'", trust_domains=["third.org"])


def test_wrong_audience_is_refused() -> None:
    _refused(_sign(_claims(aud=["https://elsewhere"])), "audience .* does not include")


def test_missing_audience_is_refused() -> None:
    _refused(_sign(_claims(aud=None)), "aud claim .* missing or invalid")


def test_expired_beyond_leeway_is_refused_but_within_leeway_accepted() -> None:
    _refused(_sign(_claims(exp=int(NOW) - 6)), "expired 6 s ago")
    assert _verify(_sign(_claims(exp=int(NOW) - 4))).spiffe_id == SUB
    _refused(_sign(_claims(exp=int(NOW) - 4)), "expired", leeway=0.0)


def test_missing_exp_is_refused() -> None:
    _refused(_sign(_claims(exp=None)), "no exp claim")


def test_non_numeric_exp_is_refused() -> None:
    _refused(_sign(_claims(exp="later")), "exp claim 'later' is not a number")


def test_not_yet_valid_is_refused() -> None:
    _refused(_sign(_claims(nbf=int(NOW) + 60)), "not valid yet")


@pytest.mark.parametrize(
    ("sub", "why"),
    [
        ("alice", "does not start with 'spiffe://'"),
        ("spiffe://example.org", "no workload path"),
        ("spiffe://example.org/", "no workload path"),
        ("spiffe://Example.org/w", "trust domain"),
        ("spiffe://example.org/a//b", "empty segment"),
        ("spiffe://example.org/a/../b", "'..' segment"),
        ("spiffe://example.org/a b", "characters other than"),
        ("https://example.org/w", "does not start with"),
    ],
)
def test_subject_must_be_a_spiffe_id(sub: str, why: str) -> None:
    _refused(_sign(_claims(sub=sub)), f"is not a SPIFFE ID: .*{why}")


def test_missing_subject_is_refused() -> None:
    _refused(_sign(_claims(sub=None)), "subject null is not a SPIFFE ID: not a string")


def test_algorithm_must_match_key_type() -> None:
    # An RS256 header pointing at an EC key is refused before any verification.
    token = _sign(_claims(), RSA_KEY, "RS256", "ec1")
    _refused(token, "algorithm RS256 does not match the type of key 'ec1'")
    # ES384 header pointing at a P-256 key.
    token = _sign(_claims(), EC384_KEY, "ES384", "ec1")
    _refused(token, "ES384 does not match")


def test_garbage_tokens_are_refused() -> None:
    for token in ("", "abc", "a.b.c", "x" * 20000):
        with pytest.raises(SvidVerificationError):
            _verify(token)


def test_header_typ_other_than_jwt_is_refused() -> None:
    token = jwt.encode(
        _claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec1", "typ": "at+jwt"}
    )
    _refused(token, "typ 'at\\+jwt' is not JWT or JOSE")


def test_default_now_is_wall_clock() -> None:
    claims = _claims(exp=int(time.time()) + 60)
    result = verify_jwt_svid(_sign(claims), bundles=BUNDLES, audience=AUD, trust_domains=[TD])
    assert result.claims["exp"] == claims["exp"]


def test_parse_spiffe_id_splits_trust_domain_and_path() -> None:
    assert parse_spiffe_id("spiffe://example.org/sandbox/a_b-1.c") == (
        "example.org",
        "/sandbox/a_b-1.c",
    )

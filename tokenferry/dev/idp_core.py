"""The dev IdP's decisions, free of HTTP: settings, signing, and the exchange policies.

SPEC §8. Kept apart from the aiohttp handlers so each rule reads as one function.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.exceptions import ExpiredSignatureError, InvalidIssuerError, PyJWTError

from tokenferry.svid_verify import is_spiffe_id

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_CREDENTIALS_GRANT = "client_credentials"
REFRESH_TOKEN_GRANT = "refresh_token"
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_SPIFFE_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCEPTED_TOKEN_TYPES = (ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE)

POLICY_INTERMEDIATE = "intermediate"
POLICY_FINAL = "final"

# RFC 6749 §3.3 scope-token: printable ASCII without space, '"' and '\'.
_SCOPE_TOKEN_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")


class OAuthProblem(Exception):
    """An RFC 6749 §5.2 error response: ``error`` code, description, HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def invalid_client(description: str) -> OAuthProblem:
    # RFC 6749 §5.2: failed client authentication is 401.
    return OAuthProblem("invalid_client", description, 401)


@dataclass(frozen=True)
class IdpSettings:
    trust_domain: str = "example.org"
    gateway_ids: frozenset[str] = frozenset({"spiffe://example.org/gateway"})
    sandbox_prefix: str = "spiffe://example.org/sandbox/"
    dev_user: str = "alice"
    user_audience: str = "tokenferry"
    cli_client_id: str = "tokenferry-cli"
    default_audience: str = "account"
    token_ttl: int = 300
    refresh_ttl: int = 8 * 3600
    device_interval: int = 5
    device_slow_down: int = 5
    device_code_ttl: int = 600
    alg: str = "ES256"


@dataclass(frozen=True)
class Issuer:
    """The IdP's URLs, known once the listening port is."""

    issuer: str

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/token"

    @property
    def device_authorization_endpoint(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/auth/device"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/certs"

    @property
    def verification_uri(self) -> str:
        return f"{self.issuer}/device"

    def discovery(self, alg: str, assertion_algs: Sequence[str]) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "token_endpoint": self.token_endpoint,
            "jwks_uri": self.jwks_uri,
            "device_authorization_endpoint": self.device_authorization_endpoint,
            "grant_types_supported": [
                CLIENT_CREDENTIALS_GRANT,
                TOKEN_EXCHANGE_GRANT,
                DEVICE_CODE_GRANT,
                REFRESH_TOKEN_GRANT,
            ],
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
            "token_endpoint_auth_signing_alg_values_supported": list(assertion_algs),
            "id_token_signing_alg_values_supported": [alg],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
        }


@dataclass(frozen=True)
class SigningKey:
    """The IdP's own token-signing key (in memory: tokens die with the process)."""

    alg: str
    kid: str
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = field(repr=False)

    @classmethod
    def generate(cls, alg: str) -> SigningKey:
        private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if alg == "ES256":
            private_key = ec.generate_private_key(ec.SECP256R1())
        elif alg == "RS256":
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            raise ValueError(f"unsupported IdP signing algorithm {alg!r} (ES256 or RS256)")
        der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        kid = base64.urlsafe_b64encode(hashlib.sha256(der).digest()[:12]).decode().rstrip("=")
        return cls(alg=alg, kid=kid, private_key=private_key)

    def jwk(self) -> dict[str, Any]:
        public = self.private_key.public_key()
        jwk: dict[str, Any]
        if isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(
            claims, self.private_key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT"}
        )

    def verify(self, token: str, issuer: str, *, now: float | None = None) -> dict[str, Any]:
        """Claims of a token this IdP issued; OAuthProblem(invalid_grant) otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise OAuthProblem("invalid_grant", "subject token is not a JWT") from None
        if header.get("alg") != self.alg or header.get("kid") != self.kid:
            raise OAuthProblem(
                "invalid_grant", "subject token was not signed by this IdP's key"
            ) from None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.private_key.public_key(),
                algorithms=[self.alg],
                issuer=issuer,
                options={"require": ["exp", "iss", "sub"], "verify_aud": False},
            )
        except ExpiredSignatureError:
            raise OAuthProblem("invalid_grant", "subject token has expired") from None
        except InvalidIssuerError:
            raise OAuthProblem(
                "invalid_grant", "subject token was issued by another issuer"
            ) from None
        except PyJWTError as exc:
            raise OAuthProblem(
                "invalid_grant", f"subject token is invalid ({type(exc).__name__})"
            ) from None
        current = time.time() if now is None else now
        if claims["exp"] <= current:
            raise OAuthProblem("invalid_grant", "subject token has expired")
        return claims


def parse_scope(value: str | None) -> tuple[str, ...]:
    if value is None or not value.strip():
        return ()
    tokens = tuple(value.split())
    for token in tokens:
        if not _SCOPE_TOKEN_RE.match(token):
            raise OAuthProblem("invalid_scope", f"scope {token!r} has characters RFC 6749 forbids")
    return tokens


def audience_list(claims: dict[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list):
        return [a for a in aud if isinstance(a, str)]
    return []


def base_claims(
    issuer: str,
    *,
    sub: str,
    aud: list[str],
    azp: str,
    ttl: int,
    now: int,
    not_after: float | None = None,
    scopes: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Claims every issued token carries; ``exp`` never passes ``not_after``."""
    exp = now + ttl
    if not_after is not None:
        exp = min(exp, int(not_after))
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": sub,
        "aud": aud,
        "azp": azp,
        "client_id": azp,
        "exp": exp,
        "iat": now,
        "jti": secrets.token_urlsafe(16),
    }
    if scopes:
        claims["scope"] = " ".join(scopes)
    return claims


def check_resource_audiences(audiences: Sequence[str], settings: IdpSettings) -> None:
    """Audiences a workload may ask for (client_credentials and final exchange)."""
    for audience in audiences:
        if not audience or len(audience) > 512:
            raise OAuthProblem("invalid_target", "audience is empty or longer than 512 characters")
        if audience.startswith("spiffe://"):
            # SPIFFE-ID audiences are how intermediate tokens are addressed; only the
            # intermediate policy (gateways) may mint them.
            raise OAuthProblem(
                "invalid_target",
                f"audience {audience!r} is a SPIFFE ID; only gateways may request those "
                "(intermediate policy)",
            )
        if audience == settings.user_audience:
            # A token for the user audience would let a workload act as the user at
            # the gateway API.
            raise OAuthProblem(
                "invalid_target",
                f"audience {audience!r} is the user-login audience and is not issued to workloads",
            )


def is_user_token(claims: dict[str, Any], settings: IdpSettings) -> bool:
    """A token from a user login (device flow or /dev/user-token), not an exchanged one."""
    return "act" not in claims and claims.get("azp") == settings.cli_client_id


def intermediate_claims(
    issuer: str,
    settings: IdpSettings,
    *,
    caller: str,
    subject: dict[str, Any],
    audiences: Sequence[str],
    scopes: tuple[str, ...],
    now: int,
) -> dict[str, Any]:
    """Exchange 1 (SPEC §1 step 2): gateway trades a user token for the supervisor."""
    if caller not in settings.gateway_ids:
        raise OAuthProblem(
            "unauthorized_client",
            f"client {caller!r} is not an allowed gateway; only gateways may exchange user tokens",
        )
    if not audiences:
        raise OAuthProblem("invalid_request", "audience is required: the supervisor's SPIFFE ID")
    if len(audiences) != 1:
        raise OAuthProblem(
            "invalid_target", "intermediate tokens are issued for exactly one audience"
        )
    audience = audiences[0]
    if not audience.startswith(settings.sandbox_prefix) or not is_spiffe_id(audience):
        raise OAuthProblem(
            "invalid_target",
            f"audience {audience!r} is not a SPIFFE ID under {settings.sandbox_prefix!r}",
        )
    claims = base_claims(
        issuer,
        sub=str(subject["sub"]),
        aud=[audience],
        azp=caller,
        ttl=settings.token_ttl,
        now=now,
        not_after=float(subject["exp"]),
        scopes=scopes,
    )
    claims["act"] = {"sub": caller}
    return claims


def final_claims(
    issuer: str,
    settings: IdpSettings,
    *,
    caller: str,
    subject: dict[str, Any],
    audiences: Sequence[str],
    scopes: tuple[str, ...],
    now: int,
) -> dict[str, Any]:
    """Exchange 2 (SPEC §1 step 3): the supervisor trades its intermediate token."""
    subject_azp = subject.get("azp")
    act = subject.get("act")
    if subject_azp not in settings.gateway_ids or not isinstance(act, dict):
        raise OAuthProblem(
            "invalid_grant", "subject token is not an intermediate token from an allowed gateway"
        )
    if caller not in audience_list(subject):
        # This is what keeps one sandbox from using another sandbox's intermediate token.
        raise OAuthProblem(
            "invalid_grant", f"subject token's audience does not include client {caller!r}"
        )
    wanted = list(audiences) or [settings.default_audience]
    check_resource_audiences(wanted, settings)
    claims = base_claims(
        issuer,
        sub=str(subject["sub"]),
        aud=wanted,
        azp=caller,
        ttl=settings.token_ttl,
        now=now,
        not_after=float(subject["exp"]),
        scopes=scopes,
    )
    claims["act"] = {"sub": caller, "act": act}
    return claims

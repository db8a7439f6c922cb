"""Verify JWT-SVIDs against JWT bundles (SPIFFE JWT-SVID spec, SPEC §6 authentication).

Shared by the gateway (supervisor authentication) and the dev IdP (client assertions).
Every check that can refuse a token runs before its claims are trusted, and the key is
looked up in the bundle of the trust domain *named by the token's subject*, so a key of
one trust domain can never vouch for an identity of another.

Error messages say what was wrong; they never contain the token or any part of it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from jwt.exceptions import InvalidSignatureError, PyJWKError, PyJWTError

# Asymmetric algorithms only: HMAC would let anyone holding the (public) bundle forge
# tokens, and "none" carries no signature at all.
ALLOWED_ALGORITHMS: tuple[str, ...] = (
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "PS256",
    "PS384",
    "PS512",
)

# The key type (and curve) each algorithm needs; a JWK of another type is refused
# instead of letting the library reinterpret it.
_KEY_REQUIREMENTS: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
}

# SPIFFE ID grammar (SPIFFE-ID spec §2): lower-case trust domain, path segments of
# letters, digits, '.', '-', '_', no empty, '.' or '..' segments, no trailing slash.
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")
_PATH_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_SPIFFE_ID_LENGTH = 2048
_MAX_TOKEN_LENGTH = 16 * 1024


class SvidVerificationError(Exception):
    """The JWT-SVID was refused; the message says why and never contains the token."""


class UnknownKeyError(SvidVerificationError):
    """The token's ``kid`` is not in the trust domain's bundle (a re-fetch may help)."""


@dataclass(frozen=True)
class VerifiedSvid:
    spiffe_id: str
    trust_domain: str
    claims: dict[str, Any] = field(repr=False)


def parse_spiffe_id(value: object) -> tuple[str, str]:
    """Split a workload SPIFFE ID into (trust domain, path); ValueError if it is not one."""
    if not isinstance(value, str) or not value:
        raise ValueError("not a string")
    if len(value) > _MAX_SPIFFE_ID_LENGTH:
        raise ValueError("longer than 2048 characters")
    prefix = "spiffe://"
    if not value.startswith(prefix):
        raise ValueError("does not start with 'spiffe://'")
    rest = value[len(prefix) :]
    trust_domain, slash, path = rest.partition("/")
    if not trust_domain or not _TRUST_DOMAIN_RE.match(trust_domain):
        raise ValueError("trust domain is empty or has characters other than [a-z0-9._-]")
    if not slash or not path:
        raise ValueError("has no workload path")
    for segment in path.split("/"):
        if not segment:
            raise ValueError("path has an empty segment")
        if segment in (".", ".."):
            raise ValueError("path has a '.' or '..' segment")
        if not _PATH_SEGMENT_RE.match(segment):
            raise ValueError("path has characters other than [A-Za-z0-9._-]")
    return trust_domain, "/" + path


def is_spiffe_id(value: object) -> bool:
    try:
        parse_spiffe_id(value)
    except ValueError:
        return False
    return True


def _describe(value: object) -> str:
    """Quote a claim value for an error message, bounded (claims are not secret)."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _find_key(bundle: Mapping[str, Any], kid: str) -> Mapping[str, Any] | None:
    keys = bundle.get("keys")
    if not isinstance(keys, list):
        return None
    for key in keys:
        if isinstance(key, Mapping) and key.get("kid") == kid:
            return key
    return None


def verify_jwt_svid(
    token: str,
    *,
    bundles: Mapping[str, Mapping[str, Any]],
    audience: str | Collection[str],
    trust_domains: Collection[str],
    leeway: float = 5.0,
    now: float | None = None,
) -> VerifiedSvid:
    """Verify a JWT-SVID and return its SPIFFE ID and claims.

    ``bundles`` maps trust domain names to JWKS documents; ``audience`` is the audience
    (or any of the audiences) the token's ``aud`` must contain.
    """
    if not isinstance(token, str) or not token:
        raise SvidVerificationError("JWT-SVID is empty")
    if len(token) > _MAX_TOKEN_LENGTH:
        raise SvidVerificationError("JWT-SVID is longer than 16 KiB")
    try:
        header = jwt.get_unverified_header(token)
    except PyJWTError:
        raise SvidVerificationError("JWT-SVID is not a well-formed JWS compact token") from None

    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise SvidVerificationError(
            f"JWT-SVID algorithm {_describe(alg)} is not allowed "
            f"(allowed: {', '.join(ALLOWED_ALGORITHMS)})"
        )
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise SvidVerificationError(f"JWT-SVID header typ {_describe(typ)} is not JWT or JOSE")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise SvidVerificationError("JWT-SVID header has no key id (kid)")

    # The subject decides which bundle may vouch for the token, so read it (unverified)
    # first; nothing else from the payload is trusted until the signature checks out.
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except PyJWTError:
        raise SvidVerificationError("JWT-SVID payload is not a JSON object") from None
    subject = unverified.get("sub")
    try:
        trust_domain, _path = parse_spiffe_id(subject)
    except ValueError as exc:
        raise SvidVerificationError(
            f"JWT-SVID subject {_describe(subject)} is not a SPIFFE ID: {exc}"
        ) from None
    if trust_domain not in trust_domains:
        raise SvidVerificationError(
            f"JWT-SVID trust domain {trust_domain!r} is not allowed "
            f"(allowed: {', '.join(sorted(trust_domains)) or 'none'})"
        )
    bundle = bundles.get(trust_domain)
    if bundle is None:
        raise SvidVerificationError(f"no JWT bundle for trust domain {trust_domain!r}")
    jwk = _find_key(bundle, kid)
    if jwk is None:
        raise UnknownKeyError(
            f"JWT-SVID key id {kid!r} is not in the JWT bundle of trust domain {trust_domain!r}"
        )
    want_kty, want_crv = _KEY_REQUIREMENTS[alg]
    if jwk.get("kty") != want_kty or (want_crv is not None and jwk.get("crv") != want_crv):
        raise SvidVerificationError(
            f"JWT-SVID algorithm {alg} does not match the type of key {kid!r} "
            f"({jwk.get('kty')!s}{' ' + str(jwk.get('crv')) if jwk.get('crv') else ''})"
        )
    jwk_alg = jwk.get("alg")
    if jwk_alg is not None and jwk_alg != alg:
        raise SvidVerificationError(
            f"JWT-SVID algorithm {alg} differs from the algorithm {jwk_alg!r} of key {kid!r}"
        )
    use = jwk.get("use")
    if use is not None and use not in ("jwt-svid", "sig"):
        raise SvidVerificationError(f"key {kid!r} is not for JWT-SVIDs (use {use!r})")
    try:
        key = jwt.PyJWK(dict(jwk), algorithm=alg)
    except PyJWKError:
        raise SvidVerificationError(f"key {kid!r} of the JWT bundle is not usable") from None

    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            # Time and audience are checked below, against ``now`` and with clear messages.
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except InvalidSignatureError:
        raise SvidVerificationError(
            f"JWT-SVID signature does not verify with key {kid!r}"
        ) from None
    except PyJWTError as exc:
        raise SvidVerificationError(
            f"JWT-SVID refused: {type(exc).__name__} while checking the signature"
        ) from None

    current = time.time() if now is None else now
    exp = claims.get("exp")
    if exp is None:
        raise SvidVerificationError("JWT-SVID has no exp claim")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise SvidVerificationError(f"JWT-SVID exp claim {_describe(exp)} is not a number")
    if exp + leeway <= current:
        raise SvidVerificationError(
            f"JWT-SVID expired {int(current - exp)} s ago (leeway {leeway:g} s)"
        )
    nbf = claims.get("nbf")
    if nbf is not None:
        if isinstance(nbf, bool) or not isinstance(nbf, int | float):
            raise SvidVerificationError(f"JWT-SVID nbf claim {_describe(nbf)} is not a number")
        if nbf - leeway > current:
            raise SvidVerificationError("JWT-SVID is not valid yet (nbf in the future)")

    wanted = {audience} if isinstance(audience, str) else set(audience)
    aud = claims.get("aud")
    if isinstance(aud, str):
        token_audiences = {aud}
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        token_audiences = set(aud)
    else:
        raise SvidVerificationError(f"JWT-SVID aud claim {_describe(aud)} is missing or invalid")
    if not token_audiences & wanted:
        raise SvidVerificationError(
            f"JWT-SVID audience {_describe(sorted(token_audiences))} does not include "
            f"{' or '.join(repr(a) for a in sorted(wanted))}"
        )
    return VerifiedSvid(spiffe_id=str(subject), trust_domain=trust_domain, claims=claims)

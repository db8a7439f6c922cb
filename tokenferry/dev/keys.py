"""Signing keys for the development stand-ins: load or create a PEM key, render JWKs.

Several dev processes share one key file on purpose: two dev SPIFFE agents (one per
identity, e.g. the gateway's and a sandbox's) started with the same ``--key-file`` sign
with the same key and therefore form one trust domain with one JWT bundle. Creation is
race-safe so that agents started at the same moment still end up with the same key.

The key id (``kid``) is the RFC 7638 JWK thumbprint of the public key: every process that
loads the same key computes the same ``kid`` without having to store it anywhere.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

_log = logging.getLogger(__name__)

SUPPORTED_ALGORITHMS = ("ES256", "RS256")
DEFAULT_ALGORITHM = "ES256"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# A PEM key file is a few KiB at most; refuse to read anything much larger.
_MAX_KEY_FILE_BYTES = 64 * 1024


class KeyFileError(ValueError):
    """The key file is unreadable, not a supported private key, or conflicts with --alg."""


@dataclass(frozen=True)
class SigningKey:
    """A private signing key with the JWS algorithm it signs with and its key id."""

    private_key: PrivateKey = field(repr=False)
    alg: str
    kid: str

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    def public_jwk(self, use: str | None = None) -> dict[str, Any]:
        return jwk_from_key(self.private_key, kid=self.kid, alg=self.alg, use=use)


def generate_private_key(alg: str = DEFAULT_ALGORITHM) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise KeyFileError(f"unsupported signing algorithm {alg!r}; use one of {SUPPORTED_ALGORITHMS}")


def algorithm_for_key(key: PrivateKey | PublicKey) -> str:
    """The JWS algorithm a key of this type signs with (P-256 → ES256, RSA → RS256)."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyFileError(f"EC keys must use curve P-256 (ES256), not {key.curve.name}")
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise KeyFileError(f"RSA keys must be at least 2048 bits, not {key.key_size}")
        return "RS256"
    raise KeyFileError(f"unsupported key type {type(key).__name__}; use an EC P-256 or RSA key")


def _public(key: PrivateKey | PublicKey) -> PublicKey:
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return key.public_key()
    return key


def jwk_thumbprint(key: PrivateKey | PublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url without padding) of the public key."""
    public = _public(key)
    full = _raw_public_jwk(public)
    # RFC 7638 §3.2: only the required members, lexicographic order, no whitespace.
    required = ("crv", "kty", "x", "y") if full["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: full[k] for k in required}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _raw_public_jwk(public: PublicKey) -> dict[str, Any]:
    if isinstance(public, ec.EllipticCurvePublicKey):
        return dict(ECAlgorithm.to_jwk(public, as_dict=True))
    return dict(RSAAlgorithm.to_jwk(public, as_dict=True))


def jwk_from_key(
    key: PrivateKey | PublicKey,
    kid: str | None = None,
    *,
    alg: str | None = None,
    use: str | None = None,
) -> dict[str, Any]:
    """The public JWK of ``key`` (a private key is reduced to its public part first).

    ``kid`` defaults to the RFC 7638 thumbprint; ``use`` is ``"jwt-svid"`` in SPIFFE JWT
    bundles and ``"sig"`` in an OIDC provider's JWKS.
    """
    public = _public(key)
    jwk = _raw_public_jwk(public)
    jwk["kid"] = kid if kid is not None else jwk_thumbprint(public)
    if alg is not None:
        jwk["alg"] = alg
    if use is not None:
        jwk["use"] = use
    return jwk


def jwks_document(*jwks: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(jwks)}


def signing_key_from_private(private_key: PrivateKey, alg: str | None = None) -> SigningKey:
    key_alg = algorithm_for_key(private_key)
    if alg is not None and alg != key_alg:
        raise KeyFileError(f"the key is for {key_alg}, but {alg} was requested")
    return SigningKey(private_key=private_key, alg=key_alg, kid=jwk_thumbprint(private_key))


def _pem(private_key: PrivateKey) -> bytes:
    return private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _read_key_file(path: Path) -> PrivateKey:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
            mode = os.fstat(handle.fileno()).st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path} is too large to be a PEM private key")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warning(
            "signing key file is readable by other users; chmod 600 it",
            extra={"key_file": str(path), "mode": oct(stat.S_IMODE(mode))},
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # The parser's message can quote key material; say only what is wrong.
        raise KeyFileError(
            f"key file {path} is not an unencrypted PEM private key (PKCS#8 or traditional)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise KeyFileError(
            f"key file {path} holds a {type(key).__name__}; use an EC P-256 or RSA key"
        )
    return key


def _create_exclusively(path: Path, pem: bytes) -> bool:
    """Publish ``pem`` at ``path`` only if nothing is there yet; True if we created it.

    The key is written to a private temporary file first and then hard-linked into place:
    ``link`` fails if the name exists (like ``O_EXCL``) and the file is complete the
    moment it becomes visible, so a racing agent never reads a half-written key.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # Filesystems without hard links: fall back to O_EXCL on the final name.
            return _create_with_o_excl(path, pem)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _create_with_o_excl(path: Path, pem: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def load_or_create_signing_key(path: str | Path | None, alg: str | None = None) -> SigningKey:
    """Load the PEM private key at ``path``, or create it (mode 0600) when it is missing.

    ``alg`` (``ES256``/``RS256``) picks the type of a new key and, for an existing key,
    must match it (``None`` accepts whatever the file holds). ``path=None`` gives an
    in-memory key. Whatever happens, the key returned is the one in the file afterwards,
    so concurrent callers agree on one key.
    """
    if alg is not None and alg not in SUPPORTED_ALGORITHMS:
        raise KeyFileError(
            f"unsupported signing algorithm {alg!r}; use one of {SUPPORTED_ALGORITHMS}"
        )
    if path is None:
        return signing_key_from_private(generate_private_key(alg or DEFAULT_ALGORITHM))
    key_path = Path(path)
    if not key_path.exists():
        if not key_path.parent.is_dir():
            raise KeyFileError(f"cannot create key file {key_path}: directory does not exist")
        try:
            created = _create_exclusively(
                key_path, _pem(generate_private_key(alg or DEFAULT_ALGORITHM))
            )
        except OSError as exc:
            raise KeyFileError(f"cannot create key file {key_path}: {exc.strerror}") from None
        if created:
            _log.info("created signing key file", extra={"key_file": str(key_path)})
    # Always re-read: if another process won the race, its key is the one to use.
    private_key = _read_key_file(key_path)
    try:
        return signing_key_from_private(private_key, alg)
    except KeyFileError as exc:
        raise KeyFileError(f"key file {key_path}: {exc}") from None

"""Encryption at rest for stored credential values (AES-256-GCM).

Every value gets a fresh random 96-bit nonce, and the associated data binds the
ciphertext to its provider and credential name: a ciphertext copied into another row
(another provider, another credential) fails to decrypt instead of being served as that
other credential.

Keys are 32 random bytes written as URL-safe base64 on one line. A key file may hold
several keys, one per line: the first encrypts, all of them decrypt (rotation: put the
new key first, start the gateway, which re-encrypts every value with it, then drop the
old line).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
_AD_PREFIX = b"tokenferry-gateway/credential/v1\x00"


class KeyConfigError(ValueError):
    """The encryption key is missing, malformed, or does not match the database."""


class DecryptionError(Exception):
    """A stored value could not be decrypted (wrong key or tampered row)."""


@dataclass(frozen=True)
class SealedValue:
    key_id: str
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)


def _key_id(key: bytes) -> str:
    # A short public fingerprint so rows say which key sealed them (needed for rotation).
    return hashlib.sha256(b"tokenferry-key-id\x00" + key).hexdigest()[:16]


def associated_data(provider: str, credential: str) -> bytes:
    return _AD_PREFIX + provider.encode() + b"\x00" + credential.encode()


class Keyring:
    """The current key (encrypts) plus older keys (decrypt only)."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise KeyConfigError("no encryption key given")
        for key in keys:
            if len(key) != KEY_BYTES:
                raise KeyConfigError(f"an encryption key must be {KEY_BYTES} bytes, got {len(key)}")
        self._keys = {_key_id(k): AESGCM(k) for k in keys}
        self.current_id = _key_id(keys[0])

    def __repr__(self) -> str:
        return f"Keyring(current_id={self.current_id!r}, keys={len(self._keys)})"

    def seal(self, plaintext: str, ad: bytes) -> SealedValue:
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._keys[self.current_id].encrypt(nonce, plaintext.encode(), ad)
        return SealedValue(self.current_id, nonce, ciphertext)

    def open(self, sealed: SealedValue, ad: bytes) -> str:
        aead = self._keys.get(sealed.key_id)
        if aead is None:
            raise DecryptionError(f"value sealed with unknown key {sealed.key_id}")
        try:
            return aead.decrypt(sealed.nonce, sealed.ciphertext, ad).decode()
        except (InvalidTag, UnicodeDecodeError) as exc:
            raise DecryptionError("stored value failed authentication") from exc

    def knows(self, key_id: str) -> bool:
        return key_id in self._keys


def parse_keys(text: str, source: str) -> list[bytes]:
    keys: list[bytes] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            # Accept both alphabets: `base64` and `openssl rand -base64 32` write +/.
            padded = line.replace("+", "-").replace("/", "_").rstrip("=")
            padded += "=" * (-len(padded) % 4)
            key = base64.b64decode(padded, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyConfigError(f"{source}: line {lineno}: not base64") from exc
        if len(key) != KEY_BYTES:
            raise KeyConfigError(
                f"{source}: line {lineno}: key must decode to {KEY_BYTES} bytes, got {len(key)}"
            )
        keys.append(key)
    if not keys:
        raise KeyConfigError(f"{source}: no key found")
    return keys


def new_key_text() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode().rstrip("=") + "\n"


def load_keyring(
    *, key_file: str | None, key_env: str | None, dev_key_path: Path | None
) -> tuple[Keyring, str]:
    """Load the keyring; returns it with a description of where it came from.

    ``dev_key_path`` is set only in development mode: the key is created there (mode
    0600) when no key is configured.
    """
    if key_file:
        path = Path(key_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise KeyConfigError(f"cannot read key file {path}: {exc.strerror}") from exc
        return Keyring(parse_keys(text, str(path))), f"file {path}"
    if key_env:
        return Keyring(parse_keys(key_env, "TOKENFERRY_GATEWAY_KEY")), "TOKENFERRY_GATEWAY_KEY"
    if dev_key_path is None:
        raise KeyConfigError(
            "no encryption key: pass --key-file FILE or set TOKENFERRY_GATEWAY_KEY "
            "(generate one with: python -c 'import base64,os;"
            "print(base64.urlsafe_b64encode(os.urandom(32)).decode())')"
        )
    if not dev_key_path.exists():
        try:
            fd = os.open(dev_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first; read theirs
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(new_key_text())
    text = dev_key_path.read_text()
    return Keyring(parse_keys(text, str(dev_key_path))), f"dev key file {dev_key_path}"

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from gateway.crypto import (
    DecryptionError,
    KeyConfigError,
    Keyring,
    SealedValue,
    associated_data,
    load_keyring,
    new_key_text,
    parse_keys,
)


def keyring(*seeds: int) -> Keyring:
    return Keyring([bytes([seed]) * 32 for seed in seeds])


def test_seal_open_round_trip_and_fresh_nonces() -> None:
    ring = keyring(1)
    ad = associated_data("orders", "user_token")
    first = ring.seal("secret-value", ad)
    second = ring.seal("secret-value", ad)
    assert first.nonce != second.nonce and len(first.nonce) == 12
    assert first.ciphertext != second.ciphertext
    assert b"secret-value" not in first.ciphertext
    assert ring.open(first, ad) == "secret-value"


@pytest.mark.parametrize(
    ("provider", "credential"), [("other", "user_token"), ("orders", "other_token")]
)
def test_associated_data_binds_provider_and_credential(provider: str, credential: str) -> None:
    ring = keyring(1)
    sealed = ring.seal("secret-value", associated_data("orders", "user_token"))
    with pytest.raises(DecryptionError):
        ring.open(sealed, associated_data(provider, credential))


def test_tampered_ciphertext_and_unknown_key_are_refused() -> None:
    ring = keyring(1)
    ad = associated_data("p", "c")
    sealed = ring.seal("v", ad)
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(DecryptionError):
        ring.open(SealedValue(sealed.key_id, sealed.nonce, flipped), ad)
    with pytest.raises(DecryptionError, match="unknown key"):
        keyring(2).open(sealed, ad)


def test_old_keys_decrypt_new_key_encrypts() -> None:
    old = keyring(1)
    sealed = old.seal("v", b"ad")
    rotated = keyring(2, 1)
    assert rotated.open(sealed, b"ad") == "v"
    assert rotated.seal("v", b"ad").key_id == rotated.current_id != old.current_id


def test_repr_and_sealed_repr_hide_material() -> None:
    ring = keyring(1)
    sealed = ring.seal("v", b"ad")
    assert "ciphertext" not in repr(sealed) and "nonce" not in repr(sealed)
    assert "\\x01" not in repr(ring)


def test_parse_keys() -> None:
    text = "# current\n" + new_key_text() + "\n" + new_key_text()
    assert len(parse_keys(text, "f")) == 2
    with pytest.raises(KeyConfigError, match="f: line 1: key must decode to 32 bytes"):
        parse_keys(base64.urlsafe_b64encode(b"x" * 16).decode(), "f")
    with pytest.raises(KeyConfigError, match="not base64"):
        parse_keys("!!!!", "f")
    with pytest.raises(KeyConfigError, match="no key"):
        parse_keys("# nothing\n", "f")


def test_load_keyring_sources(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match="no encryption key"):
        load_keyring(key_file=None, key_env=None, dev_key_path=None)
    with pytest.raises(KeyConfigError, match="cannot read key file"):
        load_keyring(key_file=str(tmp_path / "missing"), key_env=None, dev_key_path=None)
    env_ring, origin = load_keyring(key_file=None, key_env=new_key_text(), dev_key_path=None)
    assert origin == "TOKENFERRY_GATEWAY_KEY"
    dev_path = tmp_path / "g.db.key"
    dev_ring, _ = load_keyring(key_file=None, key_env=None, dev_key_path=dev_path)
    assert stat.S_IMODE(dev_path.stat().st_mode) == 0o600
    again, _ = load_keyring(key_file=None, key_env=None, dev_key_path=dev_path)
    assert again.current_id == dev_ring.current_id != env_ring.current_id


def test_both_base64_alphabets_are_accepted() -> None:
    raw = bytes(range(200, 232))
    assert parse_keys(base64.b64encode(raw).decode(), "f") == [raw]
    assert parse_keys(base64.urlsafe_b64encode(raw).decode().rstrip("="), "f") == [raw]

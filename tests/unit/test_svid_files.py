"""FileSvidSource (spiffe-helper's files), bundle file forms, and the dev signing-key helpers."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from tokenferry.dev.keys import (
    KeyFileError,
    SigningKey,
    jwk_from_key,
    load_or_create_signing_key,
)
from tokenferry.svid import (
    FileSvidSource,
    JwtSvid,
    SvidUnavailable,
    WorkloadApiSvidSource,
    parse_bundle_document,
    parse_jwt_svid_unverified,
    socket_address,
    svid_source_from_options,
)

SPIFFE_ID = "spiffe://example.org/sandbox/a"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return load_or_create_signing_key(None, "ES256")


def mint(
    key: SigningKey,
    aud: str | list[str],
    *,
    exp_in: float = 300,
    sub: str = SPIFFE_ID,
    extra: dict[str, Any] | None = None,
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "aud": aud, "iat": now, "exp": int(now + exp_in)}
    claims.update(extra or {})
    return jwt.encode(
        claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"}
    )


def jwks_of(key: SigningKey) -> dict[str, Any]:
    return {"keys": [jwk_from_key(key.private_key, key.kid, use="jwt-svid")]}


def helper_bundle(key: SigningKey, trust_domain: str = "example.org") -> bytes:
    """The JWT bundle file exactly as spiffe-helper writes it (pkg/disk/json.go)."""
    encoded = base64.b64encode(json.dumps(jwks_of(key)).encode()).decode()
    return json.dumps({trust_domain: encoded}).encode()


@pytest.fixture
def layout(tmp_path: Path, key: SigningKey) -> tuple[Path, Path]:
    svid_dir = tmp_path / "svids"
    svid_dir.mkdir()
    bundle = svid_dir / "jwt_bundle.json"  # spiffe-helper puts it in the same cert_dir
    bundle.write_bytes(helper_bundle(key))
    return svid_dir, bundle


async def test_picks_the_file_whose_audience_matches(
    layout: tuple[Path, Path], key: SigningKey
) -> None:
    svid_dir, bundle = layout
    idp_token = mint(key, "https://idp.example/realms/r1")
    gw_token = mint(key, ["spiffe://example.org/gateway", "other"])
    (svid_dir / "idp.token").write_text(idp_token)
    (svid_dir / "gateway.token").write_text(gw_token + "\n")  # trailing newline tolerated
    source = FileSvidSource(svid_dir, bundle)

    idp = await source.fetch_jwt_svid("https://idp.example/realms/r1")
    gateway = await source.fetch_jwt_svid("spiffe://example.org/gateway")

    assert idp.token == idp_token
    assert gateway.token == gw_token
    assert gateway.spiffe_id == SPIFFE_ID
    assert gateway.expiry == jwt.decode(gw_token, options={"verify_signature": False})["exp"]
    with pytest.raises(SvidUnavailable) as caught:
        await source.fetch_jwt_svid("unknown-audience")
    message = str(caught.value)
    assert "unknown-audience" in message and str(svid_dir) in message
    assert "idp.token" in message and "gateway.token" in message
    assert idp_token not in message and gw_token not in message


async def test_prefers_the_longest_lived_and_skips_expired(
    layout: tuple[Path, Path], key: SigningKey
) -> None:
    svid_dir, bundle = layout
    (svid_dir / "a.token").write_text(mint(key, "aud", exp_in=-60))
    short = mint(key, "aud", exp_in=100)
    long = mint(key, "aud", exp_in=200)
    (svid_dir / "b.token").write_text(short)
    (svid_dir / "c.token").write_text(long)

    assert (await FileSvidSource(svid_dir, bundle).fetch_jwt_svid("aud")).token == long


async def test_expired_file_is_reported_as_expired(
    layout: tuple[Path, Path], key: SigningKey
) -> None:
    svid_dir, bundle = layout
    token = mint(key, "aud", exp_in=-30)
    (svid_dir / "old.token").write_text(token)

    with pytest.raises(SvidUnavailable, match=r"has expired \(old\.token, exp ") as caught:
        await FileSvidSource(svid_dir, bundle).fetch_jwt_svid("aud")
    assert token not in str(caught.value)


async def test_rereads_a_file_when_it_changes(layout: tuple[Path, Path], key: SigningKey) -> None:
    svid_dir, bundle = layout
    path = svid_dir / "svid.token"
    first = mint(key, "aud")
    path.write_text(first)
    source = FileSvidSource(svid_dir, bundle)
    assert (await source.fetch_jwt_svid("aud")).token == first

    # spiffe-helper rewrites in place (os.WriteFile): same inode, new content.
    second = mint(key, "aud", extra={"n": 2})
    path.write_text(second)
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    assert (await source.fetch_jwt_svid("aud")).token == second

    # An atomic replace (new inode, e.g. a Kubernetes projected volume) is seen as well.
    third = mint(key, "aud2")
    tmp = svid_dir / ".svid.token.tmp"
    tmp.write_text(third)
    tmp.replace(path)
    assert (await source.fetch_jwt_svid("aud2")).token == third
    with pytest.raises(SvidUnavailable, match="has audience 'aud'"):
        await source.fetch_jwt_svid("aud")


async def test_garbled_and_foreign_files_are_named_with_the_reason(
    layout: tuple[Path, Path], key: SigningKey
) -> None:
    svid_dir, bundle = layout
    (svid_dir / "garbled.token").write_text("this.is-not.a-jwt")
    (svid_dir / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\nabc\n")
    (svid_dir / "empty.token").write_text("")
    unsigned = jwt.encode({"sub": SPIFFE_ID, "aud": "aud", "exp": time.time() + 60}, key="k" * 32)
    (svid_dir / "hmac.token").write_text(unsigned)

    with pytest.raises(SvidUnavailable) as caught:
        await FileSvidSource(svid_dir, bundle).fetch_jwt_svid("aud")
    message = str(caught.value)
    assert "garbled.token: not a JWT-SVID (not a JWT)" in message
    assert "tls.crt: not a JWT-SVID" in message
    assert "empty.token: empty" in message
    assert "hmac.token: not a JWT-SVID (alg 'HS256'" in message
    assert unsigned not in message
    assert "jwt_bundle.json" not in message  # the bundle file is never a candidate


async def test_missing_and_empty_directory(tmp_path: Path, key: SigningKey) -> None:
    bundle = tmp_path / "bundle.json"
    bundle.write_bytes(helper_bundle(key))
    with pytest.raises(SvidUnavailable, match=r"JWT-SVID directory .*/nope does not exist"):
        await FileSvidSource(tmp_path / "nope", bundle).fetch_jwt_svid("aud")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SvidUnavailable, match="the directory is empty"):
        await FileSvidSource(empty, bundle).fetch_jwt_svid("aud")


async def test_bundle_in_spiffe_helper_form(layout: tuple[Path, Path], key: SigningKey) -> None:
    svid_dir, bundle = layout
    token = mint(key, "aud")
    (svid_dir / "svid.token").write_text(token)
    source = FileSvidSource(svid_dir, bundle)

    bundles = await source.fetch_jwt_bundles()

    assert list(bundles) == ["example.org"]
    signing_key = jwt.PyJWKSet.from_dict(bundles["example.org"])[key.kid].key
    claims = jwt.decode(token, signing_key, algorithms=["ES256"], audience="aud")
    assert claims["sub"] == SPIFFE_ID


async def test_plain_jwks_bundle_takes_trust_domain_from_svids_or_option(
    tmp_path: Path, key: SigningKey
) -> None:
    svid_dir = tmp_path / "svids"
    svid_dir.mkdir()
    bundle = tmp_path / "bundle.jwks"
    bundle.write_text(json.dumps(jwks_of(key)))

    with pytest.raises(SvidUnavailable, match="a plain JWKS, so its trust domain must be given"):
        await FileSvidSource(svid_dir, bundle).fetch_jwt_bundles()

    explicit = FileSvidSource(svid_dir, bundle, trust_domain="spiffe://Other.org")
    assert list(await explicit.fetch_jwt_bundles()) == ["other.org"]

    (svid_dir / "svid.token").write_text(mint(key, "aud"))
    from_svids = await FileSvidSource(svid_dir, bundle).fetch_jwt_bundles()
    assert from_svids == {"example.org": jwks_of(key)}


async def test_bundle_file_is_reread_when_it_changes(
    layout: tuple[Path, Path], key: SigningKey
) -> None:
    svid_dir, bundle = layout
    source = FileSvidSource(svid_dir, bundle)
    assert list(await source.fetch_jwt_bundles()) == ["example.org"]

    other = load_or_create_signing_key(None, "RS256")
    tmp = bundle.with_name("new-bundle.tmp")
    tmp.write_bytes(helper_bundle(other, "other.org"))
    tmp.replace(bundle)

    bundles = await source.fetch_jwt_bundles()
    assert list(bundles) == ["other.org"]
    assert bundles["other.org"]["keys"][0]["kid"] == other.kid


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"{}", "no bundles in it"),
        (b'{"example.org": "%%%"}', "bundle of 'example.org' is not base64"),
        (b'{"keys": [{"x": 1}]}', r"keys\[0\] is not a JWK"),
        (b'{"example.org": {"no": "keys"}}', "bundle of 'example.org': not a JWKS document"),
    ],
)
async def test_garbled_bundle_file_is_refused(
    tmp_path: Path, key: SigningKey, content: bytes, reason: str
) -> None:
    bundle = tmp_path / "bundle.json"
    bundle.write_bytes(content)
    source = FileSvidSource(tmp_path, bundle, trust_domain="example.org")
    with pytest.raises(SvidUnavailable, match=f"JWT bundle file {bundle}: {reason}"):
        await source.fetch_jwt_bundles()


async def test_missing_bundle_file(tmp_path: Path) -> None:
    with pytest.raises(SvidUnavailable, match=r"JWT bundle file .*/none\.json does not exist"):
        await FileSvidSource(tmp_path, tmp_path / "none.json").fetch_jwt_bundles()


def test_bundle_map_with_objects_and_spiffe_ids(key: SigningKey) -> None:
    document = json.dumps({"spiffe://example.org": jwks_of(key)}).encode()
    assert parse_bundle_document(document, default_trust_domain=None) == {
        "example.org": jwks_of(key)
    }


def test_unverified_parse_requires_svid_claims(key: SigningKey) -> None:
    svid, audiences = parse_jwt_svid_unverified(mint(key, ["a", "b"]))
    assert audiences == ("a", "b") and svid.spiffe_id == SPIFFE_ID
    with pytest.raises(ValueError, match="sub is not a SPIFFE ID"):
        parse_jwt_svid_unverified(mint(key, "a", sub="alice"))
    no_alg = jwt.encode({"sub": SPIFFE_ID, "aud": "a", "exp": 1}, key="", algorithm="none")
    with pytest.raises(ValueError, match="alg 'none'"):
        parse_jwt_svid_unverified(no_alg)
    no_exp = jwt.encode({"sub": SPIFFE_ID, "aud": "a"}, key.private_key, algorithm="ES256")
    with pytest.raises(ValueError, match="exp claim"):
        parse_jwt_svid_unverified(no_exp)


def test_jwt_svid_repr_hides_the_token(key: SigningKey) -> None:
    token = mint(key, "aud")
    svid = JwtSvid(token=token, spiffe_id=SPIFFE_ID, expiry=1.0)
    assert token not in repr(svid) and SPIFFE_ID in repr(svid)


def test_socket_address_forms() -> None:
    assert socket_address("unix:///run/a.sock") == ("unix:/run/a.sock", "/run/a.sock")
    assert socket_address("unix:/run/a.sock") == ("unix:/run/a.sock", "/run/a.sock")
    assert socket_address("/run/a.sock") == ("unix:/run/a.sock", "/run/a.sock")
    with pytest.raises(ValueError, match="only Unix domain sockets"):
        socket_address("tcp://127.0.0.1:8081")
    with pytest.raises(ValueError, match="absolute path"):
        socket_address("unix:relative.sock")


def test_source_from_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = svid_source_from_options(None, str(tmp_path), str(tmp_path / "b.json"))
    assert isinstance(files, FileSvidSource)
    api = svid_source_from_options("/run/a.sock", None, None, reuse_svids=False)
    assert isinstance(api, WorkloadApiSvidSource) and api.socket == "unix:/run/a.sock"
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///run/env.sock")
    from_env = svid_source_from_options(None, None, None)
    assert isinstance(from_env, WorkloadApiSvidSource) and from_env.socket == "unix:/run/env.sock"
    with pytest.raises(ValueError, match="not both"):
        svid_source_from_options("/run/a.sock", str(tmp_path), str(tmp_path / "b.json"))
    with pytest.raises(ValueError, match="without the JWT bundle file"):
        svid_source_from_options(None, str(tmp_path), None)
    with pytest.raises(ValueError, match="without the JWT-SVID directory"):
        svid_source_from_options(None, None, str(tmp_path / "b.json"))
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET")
    with pytest.raises(ValueError, match="set SPIFFE_ENDPOINT_SOCKET"):
        svid_source_from_options(None, None, None)


# --- dev signing keys ---------------------------------------------------------------------


def test_key_file_is_created_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    created = load_or_create_signing_key(path, "RS256")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert created.alg == "RS256"
    again = load_or_create_signing_key(path)
    assert again.kid == created.kid and again.alg == "RS256"
    assert "PRIVATE" not in repr(again) and "private_key" not in repr(again)
    jwk = jwk_from_key(again.private_key, use="sig")
    assert jwk["kid"] == created.kid and "d" not in jwk and jwk["use"] == "sig"
    with pytest.raises(KeyFileError, match="the key is for RS256, but ES256 was requested"):
        load_or_create_signing_key(path, "ES256")


def test_racing_creators_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "shared.pem"
    results: list[SigningKey] = []
    barrier = threading.Barrier(4)

    def create() -> None:
        barrier.wait()
        results.append(load_or_create_signing_key(path, "ES256"))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 4
    assert {r.kid for r in results} == {load_or_create_signing_key(path).kid}
    assert [p.name for p in tmp_path.iterdir()] == ["shared.pem"]  # no temp files left


def test_garbage_key_file_is_refused_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.pem"
    path.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXN0dWZm\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError) as caught:
        load_or_create_signing_key(path)
    assert "not an unencrypted PEM private key" in str(caught.value)
    assert "c2VjcmV0" not in str(caught.value)

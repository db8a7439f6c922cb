"""The dev SPIFFE agent as a real process, spoken to by real Workload API clients."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
from spiffe import SpiffeId, TrustDomain, WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.svid.jwt_svid import JwtSvid as SpiffeJwtSvid
from spiffe.workloadapi.errors import FetchJwtSvidError, ValidateJwtSvidError

from tests.support.procs import Service, start_service, tokenferry_command
from tokenferry.cli.main import main
from tokenferry.dev.keys import load_or_create_signing_key

GATEWAY_ID = "spiffe://example.org/gateway"
SANDBOX_ID = "spiffe://example.org/sandbox/alpha"
HEADER = (("workload.spiffe.io", "true"),)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths must stay short (108 bytes); pytest's tmp_path can be too long.
    path = Path(tempfile.mkdtemp(prefix="tf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_agent(
    services: list[Service],
    log_dir: Path,
    socket_path: Path,
    spiffe_id: str,
    *extra: str,
    name: str = "spiffe",
) -> Service:
    service = start_service(
        name,
        ["dev", "spiffe", "--socket", str(socket_path), "--spiffe-id", spiffe_id, *extra],
        log_dir,
    )
    services.append(service)
    return service


def raw_stub(socket_path: Path) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    return channel, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]


def verify(token: str, jwks: dict[str, Any], audience: str) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["ES256", "RS256"], audience=audience
    )
    return claims


def test_py_spiffe_client_gets_a_verifiable_svid_and_bundles(
    services: list[Service], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "agent.sock"
    agent = start_agent(services, tmp_path, sock, GATEWAY_ID, "--jwks-listen", "127.0.0.1:0")
    assert agent.ready["socket"] == str(sock)
    assert agent.ready["spiffe_id"] == GATEWAY_ID
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600

    with WorkloadApiClient(f"unix:{sock}") as client:
        svid = client.fetch_jwt_svid(audience={"https://idp.example/realms/r1", "other"})
        bundles = client.fetch_jwt_bundles()
    assert str(svid.spiffe_id) == GATEWAY_ID
    assert svid.audience == {"https://idp.example/realms/r1", "other"}

    header = jwt.get_unverified_header(svid.token)
    assert header == {"alg": "ES256", "kid": agent.ready["kid"], "typ": "JWT"}
    claims = jwt.decode(svid.token, options={"verify_signature": False})
    assert set(claims) == {"sub", "aud", "exp", "iat"}  # SPIRE's shape: no iss by default
    assert claims["exp"] - claims["iat"] == 300

    # py-spiffe's own verification against the bundle it fetched over gRPC.
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
    assert bundle is not None
    checked = SpiffeJwtSvid.parse_and_validate(svid.token, bundle, {"other"})
    assert str(checked.spiffe_id) == GATEWAY_ID

    # The raw gRPC bundle: a JWKS keyed by the trust domain's SPIFFE ID, as SPIRE sends.
    channel, stub = raw_stub(sock)
    with channel:
        stream = stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER)
        first = next(stream)
        stream.cancel()
    assert list(first.bundles) == ["spiffe://example.org"]
    grpc_jwks = json.loads(first.bundles["spiffe://example.org"])
    assert [k["use"] for k in grpc_jwks["keys"]] == ["jwt-svid"]
    assert verify(svid.token, grpc_jwks, "other")["sub"] == GATEWAY_ID

    # The same bundle over HTTP, with OIDC discovery pointing at it.
    jwks_url = agent.ready["jwks_url"]
    http_jwks = httpx.get(jwks_url).json()
    assert http_jwks == grpc_jwks
    assert verify(svid.token, http_jwks, "https://idp.example/realms/r1")["sub"] == GATEWAY_ID
    base = jwks_url.removesuffix("/keys")
    discovery = httpx.get(base + "/.well-known/openid-configuration").json()
    assert discovery["jwks_uri"] == jwks_url
    assert discovery["issuer"] == base


def test_calls_without_the_security_header_are_refused(
    services: list[Service], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "agent.sock"
    start_agent(services, tmp_path, sock, GATEWAY_ID)
    channel, stub = raw_stub(sock)
    with channel:
        request = workload_pb2.JWTSVIDRequest(audience=["aud"])
        with pytest.raises(grpc.RpcError) as refused:
            stub.FetchJWTSVID(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "security header missing from request"

        with pytest.raises(grpc.RpcError) as refused_stream:
            next(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest()))
        assert refused_stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        wrong_value = (("workload.spiffe.io", "false"),)
        with pytest.raises(grpc.RpcError) as refused_value:
            stub.FetchJWTSVID(request, metadata=wrong_value)
        assert refused_value.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # The same request with the header is served.
        response = stub.FetchJWTSVID(request, metadata=HEADER)
        assert response.svids[0].spiffe_id == GATEWAY_ID

        with pytest.raises(grpc.RpcError) as empty_audience:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(), metadata=HEADER)
        assert empty_audience.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        with pytest.raises(grpc.RpcError) as x509:
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
        assert x509.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_bundle_stream_stays_open_until_cancelled(
    services: list[Service], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "agent.sock"
    agent = start_agent(services, tmp_path, sock, GATEWAY_ID)
    channel, stub = raw_stub(sock)
    with channel:
        stream = stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER)
        assert "spiffe://example.org" in next(stream).bundles
        # A full round trip on the same connection after the first message: had the
        # server ended the stream, its status would have arrived by now.
        stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
        assert not stream.done()
        stream.cancel()
        assert stream.code() == grpc.StatusCode.CANCELLED

        # A stream still open when the agent is told to stop does not keep it alive.
        open_stream = stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER)
        next(open_stream)
        agent.stop()
    assert agent.proc.returncode == 0
    assert not sock.exists()


def test_svid_for_another_spiffe_id_is_refused(
    services: list[Service], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "agent.sock"
    start_agent(services, tmp_path, sock, SANDBOX_ID)
    with WorkloadApiClient(f"unix:{sock}") as client:
        own = client.fetch_jwt_svid(audience={"aud"}, subject=SpiffeId(SANDBOX_ID))
        assert str(own.spiffe_id) == SANDBOX_ID
        with pytest.raises(FetchJwtSvidError, match="PERMISSION_DENIED"):
            client.fetch_jwt_svid(audience={"aud"}, subject=SpiffeId(GATEWAY_ID))


def test_validate_jwt_svid(services: list[Service], tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "agent.sock"
    start_agent(services, tmp_path, sock, SANDBOX_ID, "--alg", "RS256")
    with WorkloadApiClient(f"unix:{sock}") as client:
        svid = client.fetch_jwt_svid(audience={"gateway"})
        assert jwt.get_unverified_header(svid.token)["alg"] == "RS256"
        assert str(client.validate_jwt_svid(svid.token, "gateway").spiffe_id) == SANDBOX_ID
        with pytest.raises(ValidateJwtSvidError, match="audience 'elsewhere' is not in"):
            client.validate_jwt_svid(svid.token, "elsewhere")
        head, _, signature = svid.token.split(".")
        claims = jwt.decode(svid.token, options={"verify_signature": False})
        claims["sub"] = GATEWAY_ID  # claim another identity, keep the old signature
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        forged = f"{head}.{body}.{signature}"
        with pytest.raises(ValidateJwtSvidError, match="signature does not verify"):
            client.validate_jwt_svid(forged, "gateway")
        unsigned = jwt.encode({"sub": SANDBOX_ID, "aud": "gateway", "exp": 2**31}, "", "none")
        with pytest.raises(ValidateJwtSvidError, match="algorithm 'none' is not allowed"):
            client.validate_jwt_svid(unsigned, "gateway")


def test_agents_sharing_a_key_file_share_one_bundle(
    services: list[Service], tmp_path: Path, sock_dir: Path
) -> None:
    key_file = tmp_path / "trust-domain.pem"
    started: dict[str, Service] = {}
    errors: list[BaseException] = []

    def start(name: str, spiffe_id: str, *extra: str) -> None:
        try:
            started[name] = start_service(
                name,
                [
                    "dev",
                    "spiffe",
                    "--socket",
                    str(sock_dir / f"{name}.sock"),
                    "--spiffe-id",
                    spiffe_id,
                    "--key-file",
                    str(key_file),
                    *extra,
                ],
                tmp_path,
            )
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    # Both start at the same moment with no key file yet: creation must not race.
    threads = [
        threading.Thread(
            target=start, args=("gateway", GATEWAY_ID, "--jwks-listen", "127.0.0.1:0")
        ),
        threading.Thread(target=start, args=("sandbox", SANDBOX_ID)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    services.extend(started.values())
    assert not errors, errors
    assert started["gateway"].ready["kid"] == started["sandbox"].ready["kid"]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    jwks = httpx.get(started["gateway"].ready["jwks_url"]).json()
    for name, spiffe_id in (("gateway", GATEWAY_ID), ("sandbox", SANDBOX_ID)):
        with WorkloadApiClient(f"unix:{sock_dir / name}.sock") as client:
            token = client.fetch_jwt_svid(audience={"idp"}).token
        assert verify(token, jwks, "idp")["sub"] == spiffe_id


def test_socket_in_use_is_refused_and_stale_socket_replaced(
    services: list[Service], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "agent.sock"
    agent = start_agent(services, tmp_path, sock, GATEWAY_ID)
    second = subprocess.run(
        tokenferry_command("dev", "spiffe", "--socket", str(sock), "--spiffe-id", SANDBOX_ID),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert "another process is already serving on this socket" in second.stderr
    assert "Traceback" not in second.stderr
    agent.stop()
    assert not sock.exists()

    # A socket file left behind by a crashed agent (nobody listening) is taken over.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    assert sock.exists()
    start_agent(services, tmp_path, sock, SANDBOX_ID, name="spiffe-2")
    with WorkloadApiClient(f"unix:{sock}") as client:
        assert str(client.fetch_jwt_svid(audience={"a"}).spiffe_id) == SANDBOX_ID


@pytest.fixture
def keep_root_logging() -> Iterator[None]:
    # run() configures JSON logging on the root logger; give pytest its handlers back.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_startup_errors_are_clear(
    tmp_path: Path, sock_dir: Path, capsys: pytest.CaptureFixture[str], keep_root_logging: None
) -> None:
    # In-process through the console script's main(): errors are raised before anything
    # listens, and main() is what turns them into "error: ..." and the exit code.
    def run(*args: str) -> tuple[int, str]:
        try:
            code = main(["dev", "spiffe", *args])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return code, err

    sock = str(sock_dir / "a.sock")
    code, err = run("--socket", sock, "--spiffe-id", "https://example.org/x")
    assert code == 1 and "is not a valid SPIFFE ID" in err
    code, err = run("--socket", sock, "--spiffe-id", "spiffe://example.org")
    assert code == 1 and "names a trust domain, not a workload" in err

    key_file = tmp_path / "k.pem"
    key_file.write_text("not a key")
    os.chmod(key_file, 0o600)
    code, err = run("--socket", sock, "--spiffe-id", GATEWAY_ID, "--key-file", str(key_file))
    assert code == 1 and "not an unencrypted PEM private key" in err

    ec_key = tmp_path / "ec.pem"
    load_or_create_signing_key(ec_key, "ES256")
    code, err = run(
        "--socket", sock, "--spiffe-id", GATEWAY_ID, "--key-file", str(ec_key), "--alg", "RS256"
    )
    assert code == 1 and "the key is for ES256, but RS256 was requested" in err

    regular = sock_dir / "regular-file"
    regular.write_text("keep me")
    code, err = run("--socket", str(regular), "--spiffe-id", GATEWAY_ID)
    assert code == 1 and "is not a socket" in err
    assert regular.read_text() == "keep me"

    code, err = run("--socket", "/tmp/" + "x" * 120 + ".sock", "--spiffe-id", GATEWAY_ID)
    assert code == 1 and "longer than 107 bytes" in err

    code, err = run("--socket", sock, "--spiffe-id", GATEWAY_ID, "--svid-ttl", "0")
    assert code == 2 and "--svid-ttl" in err
    assert not Path(sock).exists()


def test_svid_ttl_and_issuer_options(
    services: list[Service], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "agent.sock"
    start_agent(
        services,
        tmp_path,
        sock,
        GATEWAY_ID,
        "--svid-ttl",
        "60",
        "--jwt-issuer",
        "https://oidc.example.org",
    )
    with WorkloadApiClient(f"unix:{sock}") as client:
        token = client.fetch_jwt_svid(audience={"a"}).token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 60
    assert claims["iss"] == "https://oidc.example.org"

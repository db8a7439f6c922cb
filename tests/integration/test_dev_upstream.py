"""The dev upstream over real HTTP(S): token checks, echo, SSE, WebSocket, bytes, stats."""

from __future__ import annotations

import hashlib
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets.exceptions
import websockets.sync.client
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.jwks_server import JwksServer, TrustDomainKeys
from tests.support.procs import Service, start_service


class Stand:
    def __init__(self, idp: Service, upstream: Service) -> None:
        self.idp = idp
        self.upstream = upstream
        self.issuer: str = idp.ready["issuer"]
        self.url: str = upstream.ready["url"]
        self.http = httpx.Client(trust_env=False, timeout=10)

    def token(self, **body: Any) -> str:
        body.setdefault("aud", "orders")
        body.setdefault("scope", "orders.read")
        response = self.http.post(f"{self.issuer}/dev/user-token", json=body)
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    def get(self, path: str, token: str | None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.get(f"{self.url}{path}", headers=headers, **kwargs)

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = self.http.get(f"{self.url}/dev/stats").json()["by_status"]
        return result


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    logs = tmp_path_factory.mktemp("upstream-logs")
    jwks = JwksServer(TrustDomainKeys()).start()
    idp = start_service(
        "dev-idp", ["dev", "idp", "--listen", "127.0.0.1:0", "--spiffe-jwks", jwks.url], logs
    )
    upstream = start_service(
        "dev-upstream",
        [
            "dev",
            "upstream",
            "--listen",
            "127.0.0.1:0",
            "--issuer",
            idp.ready["issuer"],
            "--audience",
            "orders",
            "--scope",
            "orders.read",
        ],
        logs,
    )
    result = Stand(idp, upstream)
    yield result
    result.http.close()
    upstream.stop()
    idp.stop()
    jwks.close()


def test_valid_token_gets_claims_method_path_and_header_names(stand: Stand) -> None:
    token = stand.token(sub="alice", scope="orders.read orders.write")
    response = stand.get("/orders/42?x=1", token, headers={"X-Trace": "secret-value-123"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["claims"]["sub"] == "alice"
    assert body["claims"]["aud"] == ["orders"]
    assert body["claims"]["iss"] == stand.issuer
    assert body["method"] == "GET"
    assert body["path"] == "/orders/42"
    assert body["query"] == "x=1"
    assert "authorization" in body["header_names"]
    assert "x-trace" in body["header_names"]
    # Header names only: neither the token nor other header values come back.
    assert "secret-value-123" not in response.text
    assert token not in response.text


def test_upload_is_counted_and_digested(stand: Stand) -> None:
    payload = bytes(range(256)) * 1000
    response = stand.http.put(
        f"{stand.url}/upload",
        content=payload,
        headers={"Authorization": f"Bearer {stand.token()}"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "PUT"
    assert body["body_bytes"] == len(payload)
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()


def _refused(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    assert reason in response.json()["reason"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer error=")


def test_missing_and_malformed_authorization(stand: Stand) -> None:
    _refused(stand.get("/", None), 401, "missing Authorization")
    _refused(stand.get("/", None, headers={"Authorization": "Basic abc"}), 401, "not a Bearer")
    _refused(stand.get("/", "not-a-jwt"), 401, "not a JWT")


def test_wrong_audience_is_401(stand: Stand) -> None:
    _refused(stand.get("/", stand.token(aud="billing")), 401, "audience does not include 'orders'")


def test_missing_scope_is_403_insufficient_scope(stand: Stand) -> None:
    response = stand.get("/", stand.token(scope="orders.write"))
    _refused(response, 403, "lacks scope 'orders.read'")
    assert response.json()["error"] == "insufficient_scope"


def test_expired_token_is_401_without_leeway(stand: Stand) -> None:
    _refused(stand.get("/", stand.token(ttl=-1)), 401, "expired")


def test_foreign_and_unsigned_tokens_are_401(stand: Stand) -> None:
    claims = {
        "iss": stand.issuer,
        "sub": "mallory",
        "aud": ["orders"],
        "scope": "orders.read",
        "exp": int(time.time()) + 60,
    }
    foreign = jwt.encode(
        claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "x"}
    )
    _refused(stand.get("/", foreign), 401, "not in the issuer's JWKS")
    real_kid = jwt.get_unverified_header(stand.token())["kid"]
    forged = jwt.encode(
        claims,
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": real_kid},
    )
    _refused(stand.get("/", forged), 401, "signature does not verify")
    unsigned = jwt.encode(claims, "", algorithm="none")
    _refused(stand.get("/", unsigned), 401, "algorithm 'none' is not allowed")


def test_sse_events(stand: Stand) -> None:
    headers = {"Authorization": f"Bearer {stand.token(sub='bob')}"}
    events: list[dict[str, Any]] = []
    with stand.http.stream(
        "GET", f"{stand.url}/events?n=4&interval=0.05", headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    assert [e["seq"] for e in events] == [0, 1, 2, 3]
    assert all(e["sub"] == "bob" for e in events)
    assert events[0]["time"] <= events[-1]["time"]
    _refused(stand.get("/events", None), 401, "missing Authorization")


def test_websocket_echo_requires_token_on_upgrade(stand: Stand) -> None:
    ws_url = stand.url.replace("http://", "ws://") + "/ws"
    headers = {"Authorization": f"Bearer {stand.token()}"}
    with websockets.sync.client.connect(ws_url, additional_headers=headers) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=5) == b"\x00\x01binary"
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        websockets.sync.client.connect(ws_url)
    assert info.value.response.status_code == 401


def test_bytes_streams_exactly_n_bytes(stand: Stand) -> None:
    size = 1_000_003
    headers = {"Authorization": f"Bearer {stand.token()}"}
    received = bytearray()
    with stand.http.stream("GET", f"{stand.url}/bytes/{size}", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers.get("Transfer-Encoding") == "chunked"
        for chunk in response.iter_bytes():
            received.extend(chunk)
    assert len(received) == size
    assert received[:512] == bytes(range(256)) * 2
    assert stand.get("/bytes/-1", stand.token()).status_code in (400, 404)


def test_stats_count_requests_by_status(stand: Stand) -> None:
    before = stand.stats()
    token = stand.token()
    for _ in range(3):
        assert stand.get("/counted", token).status_code == 200
    for _ in range(2):
        assert stand.get("/counted", stand.token(ttl=-5)).status_code == 401
    after = stand.stats()
    assert after.get("200", 0) - before.get("200", 0) == 3
    assert after.get("401", 0) - before.get("401", 0) == 2
    log = stand.upstream.log_text()
    assert token not in log


def test_tls_self_signed(stand: Stand, tmp_path: Path, services: list[Service]) -> None:
    cert_dir = tmp_path / "tls"
    args = ["dev", "upstream", "--listen", "127.0.0.1:0", "--issuer", stand.issuer]
    args += ["--audience", "orders", "--tls-self-signed", str(cert_dir)]
    first = start_service("tls-upstream-1", args, tmp_path / "logs")
    services.append(first)
    ca_file = first.ready["ca_file"]
    assert Path(ca_file) == (cert_dir / "ca.pem").resolve()
    assert first.ready["url"].startswith("https://127.0.0.1:")
    assert (cert_dir / "server-key.pem").stat().st_mode & 0o077 == 0
    token = stand.token()
    with httpx.Client(
        trust_env=False, verify=ssl.create_default_context(cafile=ca_file), timeout=10
    ) as client:
        response = client.get(
            first.ready["url"] + "/x", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200, response.text
        port = first.ready["url"].rsplit(":", 1)[1]
        response = client.get(
            f"https://localhost:{port}/y", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.json()["path"] == "/y"
    with httpx.Client(trust_env=False, timeout=10) as untrusting, pytest.raises(httpx.ConnectError):
        untrusting.get(first.ready["url"])
    # A second upstream with the same directory reuses the CA, so one trust anchor serves all.
    ca_before = Path(ca_file).read_bytes()
    second = start_service("tls-upstream-2", args, tmp_path / "logs")
    services.append(second)
    assert Path(second.ready["ca_file"]).read_bytes() == ca_before
    with httpx.Client(
        trust_env=False, verify=ssl.create_default_context(cafile=ca_file), timeout=10
    ) as client:
        response = client.get(second.ready["url"], headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200


def test_user_errors_exit_1_without_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            *(sys.executable, "-m", "tokenferry", "dev", "upstream", "--listen", "nonsense"),
            *("--issuer", "http://127.0.0.1:1/realms/dev", "--audience", "a"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "--listen" in result.stderr
    assert "Traceback" not in result.stderr

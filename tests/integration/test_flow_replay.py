"""Replay the recorded sandbox traffic (``tests/flows/*.mitm``) through ``tokenferry proxy``.

A fresh stack (new ports) is started; each recorded request is re-addressed to the current
dev upstream and sent through the proxy with a real client (httpx for HTTP, a streaming
read for SSE, websockets for the WebSocket session). Between the proxy and the dev
upstream sits a header tap (``tests.support.flows.HeaderTap``) that sees the raw header
fields the proxy forwards, so a duplicated ``Authorization`` would show. Each flow file is
its own test. Re-record with ``.venv/bin/python tests/flows/record.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPSConnection
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from mitmproxy import http
from mitmproxy.test import tflow

from tests.support.flows import (
    REDACTED,
    HeaderTap,
    TappedRequest,
    credential_findings,
    parse_sse,
    read_flows,
    scrub_flow,
    write_flows,
)
from tests.support.procs import Service
from tests.support.stack import JWT_RE, SPIFFE_ID, Stack

pytestmark = pytest.mark.timeout(90)

FLOWS_DIR = Path(__file__).resolve().parents[1] / "flows"
FLOW_FILES = sorted(FLOWS_DIR.glob("*.mitm"))
# The scenarios record.py produces; a missing file is a lost recording, not a pass.
EXPECTED_SCENARIOS = {"curl", "httpx", "requests", "sse", "websocket"}
NO_FILES = pytest.param(None, id="no-flow-files")

AUDIENCE = "orders"
SCOPE = "orders.read"

# Not forwarded as recorded: the client library or the proxy owns them.
HOP_HEADERS = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
    "cookie",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
}


def _flow_param(path: Path | None) -> Any:
    return NO_FILES if path is None else pytest.param(path, id=path.stem)


FLOW_PARAMS = [_flow_param(p) for p in FLOW_FILES] or [NO_FILES]


def _require(flow_file: Path | None) -> Path:
    assert flow_file is not None, (
        f"{FLOWS_DIR} holds no *.mitm flow files; record them with "
        ".venv/bin/python tests/flows/record.py"
    )
    return flow_file


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Replay:
    stack: Stack
    proxy: Service
    tap: HeaderTap
    jwks: jwt.PyJWKClient
    issuer: str

    @property
    def proxy_url(self) -> str:
        return str(self.proxy.ready["proxy_url"])

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.proxy.ready["ca_file"]))

    def url(self, scheme: str, path: str) -> str:
        return f"{scheme}://127.0.0.1:{self.tap.port}{path}"

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, verified with the IdP's keys, audience and issuer."""
        key = self.jwks.get_signing_key_from_jwt(token)
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=["ES256", "RS256"], audience=AUDIENCE, issuer=self.issuer
        )
        return claims


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replay]:
    root = tmp_path_factory.mktemp("flow-replay")
    stack = Stack.start(root, upstreams={"orders": (AUDIENCE, [SCOPE])})
    tap: HeaderTap | None = None
    try:
        tap = HeaderTap(
            "127.0.0.1",
            stack.upstream_port("orders"),
            cert=stack.tls_dir / "server.pem",
            key=stack.tls_dir / "server-key.pem",
            ca=stack.upstream_ca,
        ).start()
        stack.write_profile(
            {
                "id": "orders-api",
                "credentials": [
                    {
                        "name": "access_token",
                        "token_grant": {
                            "grant_type": "client_credentials",
                            "token_endpoint": stack.token_endpoint,
                            "audience": AUDIENCE,
                            "scopes": [SCOPE],
                        },
                    }
                ],
                # The route targets the tap; the tap forwards to the dev upstream.
                "endpoints": [{"host": "127.0.0.1", "port": tap.port, "tls": "terminate"}],
            }
        )
        stack.write_providers([{"name": "orders", "profile": "orders-api"}])
        proxy = stack.start_proxy()
        issuer = str(stack.idp.ready["issuer"])
        with urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration") as response:
            jwks_uri = json.loads(response.read())["jwks_uri"]
        yield Replay(stack, proxy, tap, jwt.PyJWKClient(jwks_uri), issuer)
    finally:
        if tap is not None:
            tap.stop()
        stack.stop()


# --- replaying one request ------------------------------------------------------------------


@dataclass
class Sent:
    """What the replay sent beside the recording: the sandbox's stand-in credential."""

    sandbox_authorization: str | None


def _request_headers(flow: http.HTTPFlow) -> tuple[list[tuple[str, str]], Sent]:
    headers: list[tuple[str, str]] = []
    sandbox_authorization: str | None = None
    fields: Any = flow.request.headers.fields  # (bytes, bytes) pairs, repeats kept
    for raw_name, raw_value in fields:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        lower = name.lower()
        if lower in HOP_HEADERS:
            continue
        if lower == "authorization":
            assert value == REDACTED, f"recorded Authorization is not redacted: {name}"
            # The recording says the sandbox sent a credential of its own; send a fresh
            # stand-in so the test can tell it apart from the injected token.
            sandbox_authorization = f"Bearer sandbox-replayed-{uuid.uuid4().hex}"
            value = sandbox_authorization
        headers.append((name, value))
    return headers, Sent(sandbox_authorization)


def _media_type(headers: http.Headers | httpx.Headers) -> str:
    return str(headers.get("content-type", "")).split(";")[0].strip().lower()


def _replay_http(replay: Replay, flow: http.HTTPFlow) -> tuple[httpx.Response, bytes, Sent]:
    headers, sent = _request_headers(flow)
    with httpx.Client(
        proxy=replay.proxy_url, verify=replay.ssl_context(), trust_env=False, timeout=30
    ) as client:
        request = client.build_request(
            flow.request.method,
            replay.url(flow.request.scheme, flow.request.path),
            headers=headers,
            content=flow.request.raw_content or None,
        )
        response = client.send(request, stream=True)
        try:
            body = b"".join(response.iter_bytes())  # streamed, as a sandbox reads SSE
        finally:
            response.close()
    return response, body, sent


async def _replay_websocket(replay: Replay, flow: http.HTTPFlow) -> tuple[list[Any], Sent]:
    assert flow.websocket is not None
    headers, sent = _request_headers(flow)
    user_agent = next((v for k, v in headers if k.lower() == "user-agent"), None)
    extra = [(k, v) for k, v in headers if k.lower() != "user-agent"]
    received: list[Any] = []
    async with websockets.connect(
        replay.url("wss", flow.request.path),
        proxy=replay.proxy_url,
        ssl=replay.ssl_context(),
        additional_headers=extra,
        user_agent_header=user_agent,
    ) as ws:
        for message in flow.websocket.messages:
            if message.from_client:
                await ws.send(message.text if message.is_text else message.content)
            else:
                received.append(await asyncio.wait_for(ws.recv(), 10))
    return received, sent


# --- checks ---------------------------------------------------------------------------------


def _check_forwarded(
    replay: Replay, tapped: list[TappedRequest], flow: http.HTTPFlow, sent: Sent
) -> dict[str, Any]:
    """Exactly this request reached the upstream, with exactly one, injected, Authorization."""
    assert [(t.method, t.target) for t in tapped] == [(flow.request.method, flow.request.path)]
    values = tapped[0].values("Authorization")
    count = len(values)  # not the values: a failure report must not print a token
    assert count == 1, f"{count} Authorization fields reached the upstream"
    scheme, _, token = values[0].partition(" ")
    is_bearer_jwt = scheme == "Bearer" and JWT_RE.fullmatch(token) is not None
    assert is_bearer_jwt, "the forwarded Authorization is not a Bearer JWT"
    if sent.sandbox_authorization is not None:
        replaced = values[0] != sent.sandbox_authorization
        assert replaced, "the sandbox's own Authorization reached the upstream"
    claims = replay.verify(token)
    assert claims["aud"] == [AUDIENCE]
    assert SCOPE in claims["scope"].split()
    assert claims["azp"] == SPIFFE_ID
    return claims


def _check_echo(
    recorded: dict[str, Any], replayed: dict[str, Any], token_claims: dict[str, Any]
) -> None:
    assert replayed.keys() == recorded.keys()
    assert replayed["claims"].keys() == recorded["claims"].keys()
    # The upstream verified the very token the tap saw forwarded.
    assert replayed["claims"]["jti"] == token_claims["jti"]
    assert replayed["claims"]["aud"] == [AUDIENCE]
    assert replayed["claims"]["scope"] == recorded["claims"]["scope"]
    for key in ("method", "path", "query", "body_bytes", "body_sha256"):
        assert replayed[key] == recorded[key], key
    # Every header the recorded request carried reached the upstream again (the set of
    # names: the dev upstream cannot show duplicates; the tap checks those).
    assert set(recorded["header_names"]) <= set(replayed["header_names"])
    assert "authorization" in replayed["header_names"]


def _check_response(
    flow: http.HTTPFlow, response: httpx.Response, body: bytes, token_claims: dict[str, Any]
) -> None:
    recorded = flow.response
    assert recorded is not None
    assert response.status_code == recorded.status_code
    media_type = _media_type(recorded.headers)
    assert _media_type(response.headers) == media_type
    recorded_body = recorded.get_content(strict=False) or b""
    if media_type == "application/json":
        _check_echo(json.loads(recorded_body), json.loads(body), token_claims)
    elif media_type == "text/event-stream":
        old, new = parse_sse(recorded_body.decode()), parse_sse(body.decode())
        assert len(new) == len(old) > 0
        for before, after in zip(old, new, strict=True):
            assert after.fields.keys() == before.fields.keys()
            assert after.fields.get("id") == before.fields.get("id")
            assert (
                json.loads(after.fields["data"]).keys() == json.loads(before.fields["data"]).keys()
            )
            assert json.loads(after.fields["data"])["sub"] == token_claims["sub"]
    else:
        assert len(body) == len(recorded_body)
        assert hashlib.sha256(body).digest() == hashlib.sha256(recorded_body).digest()


def _check_logs(replay: Replay, tapped: list[TappedRequest], sent: list[Sent]) -> None:
    logs = replay.stack.log_text()
    secrets = {
        token for t in tapped for v in t.values("Authorization") for token in JWT_RE.findall(v)
    }
    secrets |= {s.sandbox_authorization.split(" ", 1)[1] for s in sent if s.sandbox_authorization}
    assert secrets, "no token was forwarded"
    leaked = sum(1 for secret in secrets if secret in logs)  # a count: never print one
    assert leaked == 0, f"{leaked} credential value(s) appear in the stack's logs"


def _refused(replay: Replay) -> int:
    by_status: dict[str, int] = replay.stack.upstream_stats("orders")["by_status"]
    return sum(n for status, n in by_status.items() if status in ("401", "403"))


# --- tests ----------------------------------------------------------------------------------


def test_every_scenario_has_a_recording() -> None:
    assert {p.stem for p in FLOW_FILES} >= EXPECTED_SCENARIOS, (
        f"missing flow files in {FLOWS_DIR}; re-record with .venv/bin/python tests/flows/record.py"
    )


@pytest.mark.parametrize("flow_file", FLOW_PARAMS)
def test_committed_flow_file_holds_no_credentials(flow_file: Path | None) -> None:
    path = _require(flow_file)
    assert credential_findings(path.read_bytes()) == []
    for flow in read_flows(path):
        assert flow.request.headers.get_all("Authorization") in ([], [REDACTED])
        assert "cookie" not in flow.request.headers or flow.request.headers["cookie"] == REDACTED


def test_header_tap_sees_duplicate_fields(replay: Replay) -> None:
    # The instrument the replay relies on: duplicates and spelling survive, and several
    # requests on one connection are told apart.
    capture = replay.stack.capture(tls=True)
    tap = HeaderTap(
        "127.0.0.1",
        capture.port,
        cert=replay.stack.tls_dir / "server.pem",
        key=replay.stack.tls_dir / "server-key.pem",
        ca=replay.stack.upstream_ca,
    ).start()
    try:
        context = ssl.create_default_context(cafile=str(replay.stack.upstream_ca))
        conn = HTTPSConnection("127.0.0.1", tap.port, context=context, timeout=10)
        conn.putrequest("GET", "/dup?x=1")
        conn.putheader("Authorization", "Bearer first")
        conn.putheader("AUTHORIZATION", "Bearer second")
        conn.endheaders()
        assert conn.getresponse().read() == b'{"captured": true}'
        conn.request("PUT", "/next", body=b"0123456789")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        tap.stop()
    assert [(t.method, t.target) for t in tap.requests] == [("GET", "/dup?x=1"), ("PUT", "/next")]
    assert tap.requests[0].values("authorization") == ["Bearer first", "Bearer second"]
    assert tap.requests[1].values("Authorization") == []
    assert tap.parse_errors == []
    # The capture server behind the tap got both requests unchanged.
    assert capture.requests[0].values("Authorization") == ["Bearer first", "Bearer second"]


def test_scrubbing_removes_credentials_the_check_would_find(tmp_path: Path) -> None:
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXZhbHVl"
    flow = tflow.twebsocketflow()
    flow.request.headers["Authorization"] = f"Bearer {token}"
    flow.request.headers["Cookie"] = "session=abc"
    flow.request.headers.add("X-Forwarded-Token", token)
    flow.request.headers.add("X-Forwarded-Token", "plain")
    flow.request.path = f"/cb?code={token}"
    flow.request.content = json.dumps({"access_token": token}).encode()
    assert flow.response is not None and flow.websocket is not None
    flow.response.content = f"token: {token}".encode()
    flow.websocket.messages[0].content = token.encode()
    raw = tmp_path / "raw.mitm"
    write_flows(raw, [flow])
    assert len(credential_findings(raw.read_bytes())) >= 6  # the check can fail

    scrub_flow(flow)
    clean = tmp_path / "clean.mitm"
    write_flows(clean, [flow])
    assert credential_findings(clean.read_bytes()) == []
    headers = read_flows(clean)[0].request.headers
    assert headers["Authorization"] == REDACTED
    assert headers["Cookie"] == REDACTED
    assert headers.get_all("X-Forwarded-Token") == ["[redacted jwt]", "plain"]


@pytest.mark.parametrize("flow_file", FLOW_PARAMS)
def test_replay_through_proxy(replay: Replay, flow_file: Path | None) -> None:
    flows = read_flows(_require(flow_file))
    refused_before = _refused(replay)
    assert flows, f"{flow_file} holds no flows"
    all_tapped: list[TappedRequest] = []
    all_sent: list[Sent] = []
    for flow in flows:
        assert flow.response is not None, f"{flow_file}: recorded flow without a response"
        mark = replay.tap.snapshot()
        if flow.websocket is not None:
            received, sent = asyncio.run(_replay_websocket(replay, flow))
            expected = [
                m.text if m.is_text else m.content
                for m in flow.websocket.messages
                if not m.from_client
            ]
            assert received == expected
            assert flow.response.status_code == 101
            tapped = replay.tap.since(mark)
            _check_forwarded(replay, tapped, flow, sent)
        else:
            response, body, sent = _replay_http(replay, flow)
            tapped = replay.tap.since(mark)
            claims = _check_forwarded(replay, tapped, flow, sent)
            _check_response(flow, response, body, claims)
        all_tapped += tapped
        all_sent.append(sent)
    assert replay.tap.parse_errors == []
    assert _refused(replay) == refused_before, "the upstream refused a replayed request"
    _check_logs(replay, all_tapped, all_sent)


def test_a_recorded_sandbox_authorization_is_replayed() -> None:
    # The replay checks replacement only where the recording holds a sandbox-supplied
    # Authorization: make sure at least one recording does.
    recorded = [
        flow
        for path in FLOW_FILES
        for flow in read_flows(path)
        if "Authorization" in flow.request.headers
    ]
    assert recorded, "no recorded request carries a sandbox-supplied Authorization header"

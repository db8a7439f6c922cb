"""The supervisor proxy end to end (client_credentials, local files): real processes, real
clients (curl, httpx, requests, websockets) through ``tokenferry proxy``.

One stack is shared by the tests of this module. Tests that need a cold cache use their
own provider (its own cache key), so they do not depend on test order.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import websockets
from mitmproxy import io as mitm_io
from mitmproxy.http import HTTPFlow

from tests.support.procs import Service, start_service
from tests.support.stack import SPIFFE_ID, CaptureServer, Stack, curl, metrics

pytestmark = pytest.mark.timeout(120)


class Env:
    def __init__(self, stack: Stack, proxy: Service, captures: dict[str, CaptureServer]):
        self.stack = stack
        self.proxy = proxy
        self.captures = captures

    @property
    def proxy_url(self) -> str:
        return str(self.proxy.ready["proxy_url"])

    @property
    def ca_file(self) -> str:
        return str(self.proxy.ready["ca_file"])

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def url(self, upstream: str, path: str = "/") -> str:
        return self.stack.upstream_url(upstream) + path


def _profile(
    pid: str, token_endpoint: str, endpoints: list[dict[str, Any]], **grant: Any
) -> dict[str, Any]:
    return {
        "id": pid,
        "credentials": [
            {
                "name": "access_token",
                "token_grant": {
                    "grant_type": "client_credentials",
                    "token_endpoint": token_endpoint,
                    **grant,
                },
            }
        ],
        "endpoints": endpoints,
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("inject")
    stack = Stack.start(
        root,
        upstreams={
            "orders": ("orders", ["orders.read"]),
            "reports": ("reports", ["reports.read"]),
            "plain": ("orders", ["orders.read"]),
        },
        plain_upstreams=["plain"],
    )
    try:
        captures = {
            "tls": stack.capture(tls=True),  # terminate route
            "plain": stack.capture(),  # tls: none route
            "outside": stack.capture(tls=True),  # no route at all
        }
        orders_port = stack.upstream_port("orders")
        te = stack.token_endpoint
        stack.write_profile(
            _profile(
                "orders-api",
                te,
                [
                    {"host": "127.0.0.1", "port": orders_port, "tls": "terminate"},
                    {"host": "127.0.0.1", "port": stack.upstream_port("plain"), "tls": "terminate"},
                    {"host": "127.0.0.1", "port": captures["tls"].port, "tls": "terminate"},
                    {"host": "127.0.0.1", "port": captures["plain"].port, "tls": "none"},
                ],
                audience="orders",
                scopes=["orders.read"],
                audience_overrides=[
                    {
                        "host": "127.0.0.1",
                        "port": stack.upstream_port("reports"),
                        "audience": "reports",
                        "scopes": ["reports.read"],
                    }
                ],
            )
        )
        # Providers with their own cache keys, on paths of the orders upstream.
        for pid, path, audience in (
            ("burst-api", "/burst/**", "orders"),
            ("metered-api", "/metered/**", "orders"),
            ("wrong-api", "/wrong/**", "not-orders"),
        ):
            stack.write_profile(
                _profile(
                    pid,
                    te,
                    [{"host": "127.0.0.1", "port": orders_port, "path": path}],
                    audience=audience,
                    scopes=["orders.read"],
                )
            )
        stack.write_providers(
            [
                {"name": "orders", "profile": "orders-api"},
                {"name": "burst", "profile": "burst-api"},
                {"name": "metered", "profile": "metered-api", "revision": 4},
                {"name": "wrong", "profile": "wrong-api"},
            ]
        )
        proxy = stack.start_proxy()
        yield Env(stack, proxy, captures)
    finally:
        stack.stop()


def _claims(body: str) -> dict[str, Any]:
    claims: dict[str, Any] = json.loads(body)["claims"]
    return claims


# --- reaching protected upstreams ------------------------------------------------------------


def test_curl_reaches_protected_upstream_with_right_audience(env: Env) -> None:
    status, body = curl(env.proxy, env.url("orders", "/v1/items?x=secret-query"))
    assert status == 200, body
    claims = _claims(body)
    assert claims["aud"] == ["orders"]
    assert claims["scope"].split() == ["orders.read"]
    assert claims["azp"] == SPIFFE_ID
    assert json.loads(body)["query"] == "x=secret-query"  # the query is forwarded untouched


def test_httpx_and_requests_reach_protected_upstream(env: Env) -> None:
    with httpx.Client(proxy=env.proxy_url, verify=env.ssl_context(), trust_env=False) as client:
        response = client.get(env.url("orders", "/httpx"))
    assert response.status_code == 200, response.text
    assert response.json()["claims"]["aud"] == ["orders"]

    session = requests.Session()
    session.trust_env = False
    r = session.get(
        env.url("orders", "/requests"),
        proxies={"https": env.proxy_url},
        verify=env.ca_file,
        timeout=20,
    )
    assert r.status_code == 200, r.text
    assert r.json()["claims"]["scope"] == "orders.read"


def test_audience_override_route_gets_its_own_audience(env: Env) -> None:
    status, body = curl(env.proxy, env.url("reports", "/summary"))
    assert status == 200, body
    claims = _claims(body)
    assert claims["aud"] == ["reports"]
    assert claims["scope"] == "reports.read"


# --- passthrough and header hygiene -----------------------------------------------------------


def test_host_without_route_is_tunnelled_untouched(env: Env) -> None:
    outside = env.captures["outside"]
    before = len(outside.requests)
    # Trusting *only* the upstream's own test CA: this handshake can only succeed when the
    # proxy does not intercept (its certificate would come from the proxy CA).
    status, body = curl(
        env.proxy,
        outside.url + "/raw?q=1",
        "-H",
        "Authorization: Bearer sandbox-own-value",
        "-H",
        "X-Trace: abc",
        cacert=env.stack.upstream_ca,
    )
    assert status == 200, body
    request = outside.requests[before]
    assert request.values("Authorization") == ["Bearer sandbox-own-value"]
    assert request.values("X-Trace") == ["abc"]
    assert request.path == "/raw?q=1"

    # And the proxy CA alone is *not* enough for that host: it is not intercepted.
    status, _ = curl(env.proxy, outside.url + "/raw")
    assert status == 0


def test_intercepted_route_presents_proxy_certificate(env: Env) -> None:
    # The same test CA does not verify a terminate route: the proxy intercepts it.
    status, _ = curl(env.proxy, env.url("orders", "/"), cacert=env.stack.upstream_ca)
    assert status == 0


def test_sandbox_authorization_is_replaced_not_duplicated(env: Env) -> None:
    for name, base in (("tls", env.captures["tls"].url), ("plain", env.captures["plain"].url)):
        capture = env.captures[name]
        before = len(capture.requests)
        status, body = curl(
            env.proxy,
            base + "/dup",
            "-H",
            "Authorization: Bearer sandbox-supplied",
            "-H",
            "AUTHORIZATION: Basic c2FuZGJveDpzZWNyZXQ=",
        )
        assert status == 200, (name, body)
        values = capture.requests[before].values("Authorization")
        assert len(values) == 1, (name, len(values))
        assert values[0].startswith("Bearer eyJ")
        assert "sandbox-supplied" not in values[0]


def test_plain_http_to_terminate_route_gets_no_token(env: Env) -> None:
    before = env.stack.upstream_stats("plain")["by_status"].get("401", 0)
    status, body = curl(env.proxy, env.url("plain", "/no-token"))
    assert env.url("plain").startswith("http://")
    assert status == 401, body  # the upstream saw no token
    assert env.stack.upstream_stats("plain")["by_status"].get("401", 0) == before + 1
    decision = _decisions(env.proxy, path="/no-token")[-1]
    assert decision["outcome"] == "not_injected"


def test_host_header_mismatch_gets_421_and_nothing_is_forwarded(env: Env) -> None:
    # CONNECT target (the actual destination, mitmproxy's request.host/port) differs from
    # the Host header inside the tunnel (request.host_header).
    capture = env.captures["tls"]
    before = len(capture.requests)
    status, body = curl(env.proxy, capture.url + "/x", "-H", "Host: evil.example.org")
    assert status == 421, body
    doc = json.loads(body)
    assert doc["error"] == "misdirected_request"
    assert (doc["provider"], doc["credential"]) == ("orders", "access_token")
    # Absolute-form plain HTTP: the URL authority is the destination, the Host header lies.
    plain = env.captures["plain"]
    status, body = curl(env.proxy, plain.url + "/y", "-H", "Host: 127.0.0.2")
    assert status == 421, body
    status, body = curl(env.proxy, plain.url + "/y", "-H", f"Host: 127.0.0.1:{plain.port + 1}")
    assert status == 421, body
    assert len(capture.requests) == before
    # A Host naming the destination (any case, with its port) is fine.
    status, body = curl(env.proxy, plain.url + "/z", "-H", f"Host: 127.0.0.1:{plain.port}")
    assert status == 200, body


def test_deny_unmatched_refuses_other_destinations(env: Env, services: list[Service]) -> None:
    deny = env.stack.start_proxy(name="proxy-deny", extra=["--deny-unmatched"])
    services.append(deny)
    # CONNECT to a host:port no endpoint names: 403 with a JSON body.
    host, port = deny.ready["proxy_url"].removeprefix("http://").rsplit(":", 1)
    target = f"127.0.0.1:{env.captures['outside'].port}"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        response = b""
        while b"}" not in response:
            chunk = sock.recv(4096)
            if not chunk:
                break
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403"), head
    assert b"application/json" in head.lower()
    assert json.loads(body)["error"] == "destination_not_allowed"
    # Plain HTTP to an unmatched destination: 403 JSON too.
    status, text = curl(deny, f"http://127.0.0.1:{env.captures['outside'].port}/x")
    assert status == 403 and json.loads(text)["error"] == "destination_not_allowed"
    # Matched routes keep working.
    status, text = curl(deny, env.url("orders", "/allowed"))
    assert status == 200, text


# --- the cache --------------------------------------------------------------------------------


async def test_fifty_concurrent_requests_on_cold_cache_make_one_token_request(env: Env) -> None:
    before = env.stack.idp_token_requests()
    async with httpx.AsyncClient(
        proxy=env.proxy_url,
        verify=env.ssl_context(),
        trust_env=False,
        limits=httpx.Limits(max_connections=50),
        timeout=30,
    ) as client:
        responses = await asyncio.gather(
            *(client.get(env.url("orders", f"/burst/{i}")) for i in range(50))
        )
    assert [r.status_code for r in responses] == [200] * 50
    assert env.stack.idp_token_requests() - before == 1


def test_upstream_401_evicts_the_cached_token(env: Env) -> None:
    # The "wrong" provider asks for an audience the upstream refuses: 401 every time.
    before = env.stack.idp_token_requests()
    evictions = metrics(env.proxy).get("tokenferry_proxy_token_evictions_total", 0)
    for _ in range(2):
        status, _ = curl(env.proxy, env.url("orders", "/wrong/x"))
        assert status == 401
    # Without eviction the second request would have been a cache hit.
    assert env.stack.idp_token_requests() - before == 2
    assert metrics(env.proxy)["tokenferry_proxy_token_evictions_total"] - evictions == 2
    assert '"outcome": "token_evicted"' in env.proxy.log_text()


def test_metrics_match_the_traffic(env: Env) -> None:
    before = metrics(env.proxy)
    for i in range(5):
        status, _ = curl(env.proxy, env.url("orders", f"/metered/{i}"))
        assert status == 200
    after = metrics(env.proxy)

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta('tokenferry_proxy_token_cache_total{outcome="miss"}') == 1
    assert delta('tokenferry_proxy_token_cache_total{outcome="hit"}') == 4
    assert delta('tokenferry_proxy_exchanges_total{leg="client_credentials",result="ok"}') == 1
    assert delta('tokenferry_proxy_exchange_seconds_count{leg="client_credentials"}') == 1
    key = (
        "tokenferry_proxy_grants_total"
        '{credential="access_token",outcome="injected",provider="metered"}'
    )
    assert after[key] == 5
    assert after["tokenferry_proxy_exchanges_in_flight"] == 0
    with httpx.Client(trust_env=False) as client:
        health = client.get(f"{env.proxy.ready['admin_url']}/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"


# --- streaming, websockets --------------------------------------------------------------------


def test_sse_events_arrive_one_by_one(env: Env) -> None:
    received: list[tuple[float, dict[str, Any]]] = []
    with (
        httpx.Client(proxy=env.proxy_url, verify=env.ssl_context(), trust_env=False) as client,
        client.stream("GET", env.url("orders", "/events?n=4&interval=0.3")) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                received.append((time.time(), json.loads(line[6:])))
    assert [event["seq"] for _, event in received] == [0, 1, 2, 3]
    # Causality, not a timing threshold: the first event reached us before the upstream
    # had even produced the last one, so nothing buffered the stream.
    first_arrival = received[0][0]
    last_sent = received[-1][1]["time"]
    assert first_arrival < last_sent


def test_large_bodies_stream_both_ways(env: Env) -> None:
    upload = os.urandom(6 * 1024 * 1024)
    with httpx.Client(
        proxy=env.proxy_url, verify=env.ssl_context(), trust_env=False, timeout=60
    ) as client:

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(upload), 256 * 1024):
                yield upload[i : i + 256 * 1024]

        response = client.post(env.url("orders", "/upload"), content=chunks())
        assert response.status_code == 200, response.text
        assert response.json()["body_bytes"] == len(upload)
        assert response.json()["body_sha256"] == hashlib.sha256(upload).hexdigest()

        size = 0
        with client.stream("GET", env.url("orders", f"/bytes/{24 * 1024 * 1024}")) as download:
            assert download.status_code == 200
            for chunk in download.iter_bytes():
                size += len(chunk)
        assert size == 24 * 1024 * 1024


async def test_websocket_upgrade_carries_the_token(env: Env) -> None:
    uri = env.url("orders", "/ws").replace("https://", "wss://")
    async with websockets.connect(uri, proxy=env.proxy_url, ssl=env.ssl_context()) as ws:
        await ws.send("hello through the proxy")
        assert await asyncio.wait_for(ws.recv(), 10) == "hello through the proxy"
    decision = _decisions(env.proxy, path="/ws")[-1]
    assert decision["outcome"] == "injected"


# --- saved flows, standalone mitmdump ---------------------------------------------------------


def test_saved_flows_have_the_credential_redacted(env: Env, services: list[Service]) -> None:
    flows_file = env.stack.root / "saved.mitm"
    saver = env.stack.start_proxy(
        name="proxy-saving", extra=["--set", f"save_stream_file={flows_file}"]
    )
    services.append(saver)
    status, body = curl(saver, env.url("orders", "/saved"), "-H", "Authorization: Bearer mine")
    assert status == 200, body
    capture = env.captures["tls"]
    status, _ = curl(saver, capture.url + "/saved-capture")
    assert status == 200
    token = capture.requests[-1].values("Authorization")[0].removeprefix("Bearer ")
    saver.stop()
    with flows_file.open("rb") as f:
        flows = list(mitm_io.FlowReader(f).stream())
    assert len(flows) == 2
    for flow in flows:
        assert isinstance(flow, HTTPFlow)
        assert flow.request.headers.get_all("Authorization") == ["[redacted by tokenferry]"]
    assert token.encode() not in flows_file.read_bytes()


def test_addons_run_under_mitmdump(env: Env, services: list[Service]) -> None:
    mitmdump = Path(sys.executable).parent / "mitmdump"
    addon = Path(__file__).resolve().parents[2] / "addons" / "inject.py"
    stack = env.stack
    proxy = start_service(
        "mitmdump",
        [],
        stack.root / "logs",
        command=[
            str(mitmdump),
            "-q",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            "0",
            "--set",
            f"confdir={stack.root / 'confdir'}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={stack.upstream_ca}",
            "-s",
            str(addon),
            "--set",
            f"tokenferry_profiles={stack.root / 'profiles'}",
            "--set",
            f"tokenferry_providers={stack.root / 'providers.yaml'}",
            "--set",
            f"tokenferry_spiffe_socket={stack.root / 'agent.sock'}",
            "--set",
            "tokenferry_ready_line=true",
        ],
    )
    services.append(proxy)
    status, body = curl(proxy, env.url("orders", "/from-mitmdump"))
    assert status == 200, body
    assert _claims(body)["aud"] == ["orders"]


# --- last: nothing secret in any log ----------------------------------------------------------


def test_zz_logs_contain_no_token_and_no_query(env: Env) -> None:
    # Make sure the orders token was captured at least once (same cache key as upstream).
    status, _ = curl(env.proxy, env.captures["plain"].url + "/collect")
    assert status == 200
    tokens = env.stack.tokens_seen()
    assert tokens, "no token captured"
    logs = env.stack.log_text()
    assert '"logger": "tokenferry.decision"' in logs
    for token in tokens:
        assert token not in logs
        # Not even the signature part alone.
        assert token.rsplit(".", 1)[1] not in logs
    assert "secret-query" not in logs
    assert "sandbox-supplied" not in logs


def _decisions(proxy: Service, *, path: str) -> list[dict[str, Any]]:
    found = []
    for line in proxy.log_text().splitlines():
        if '"tokenferry.decision"' in line:
            entry = json.loads(line)
            if entry.get("path") == path:
                found.append(entry)
    assert found, f"no decision logged for {path}"
    return found

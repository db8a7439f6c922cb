"""End to end: the gateway goes away and comes back; the proxies are never restarted.

While the gateway is down, requests whose final token is cached still succeed, requests
that need leg 1 get a 502 naming the gateway, a proxy started meanwhile answers 502
until its first configuration arrives, and the configured proxy keeps its last good
configuration. The gateway is restarted with the same database, key and port (the
proxies know it by URL); both proxies recover by themselves.

Its own stack: stopping the gateway would disturb the other end-to-end tests.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tests.support.e2e_stack import E2EStack, exchange_profile, start_e2e_stack, wait_until
from tests.support.gateway_stack import sandbox_id
from tests.support.procs import Service
from tests.support.stack import JWT_RE, curl


@pytest.fixture
def stack(tmp_path: Path) -> E2EStack:
    s = start_e2e_stack(tmp_path, {"orders": ("orders", ["orders.read"])})
    try:
        te = s.token_endpoint
        s.add_profile(
            exchange_profile(
                "orders-api",
                te,
                audience="orders",
                scopes=["orders.read"],
                endpoints=[{"host": "127.0.0.1", "port": s.upstream_port("orders")}],
            )
        )
        s.add_profile(
            exchange_profile(
                "ledger-api",
                te,
                audience="ledger",
                scopes=[],
                endpoints=[{"host": "127.0.0.1", "port": s.capture.port, "path": "/ledger/**"}],
            )
        )
        alice = s.user_token("alice")
        s.add_provider("orders", "orders-api", alice)
        s.add_provider("ledger", "ledger-api", alice)
        s.add_sandbox("alpha", ["orders", "ledger"])
    except BaseException:
        s.stop()
        raise
    return s


def connect(proxy: Service, port: int) -> tuple[int, str]:
    """A raw CONNECT to 127.0.0.1:port through the proxy: (status, body of the answer)."""
    proxy_port = int(str(proxy.ready["proxy_url"]).rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as conn:
        target = f"127.0.0.1:{port}"
        conn.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = conn.recv(4096)
            if not chunk:
                break
            body += chunk
    status = int(head.split(b" ", 2)[1])
    return status, body.decode()


def retry_until_ok(proxy: Service, url: str, *, limit: float = 30.0) -> list[int]:
    """curl until 200 (bounded); the failed key's back-off makes early tries fail fast."""
    statuses: list[int] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and len(statuses) < 200:
        status, body = curl(proxy, url)
        statuses.append(status)
        if status == 200:
            break
        assert status == 502, body
        time.sleep(0.2)
    return statuses


@pytest.mark.timeout(120)
def test_gateway_outage_and_recovery_without_restarting_the_proxy(stack: E2EStack) -> None:
    try:
        _outage_and_recovery(stack)
    finally:
        stack.stop()


def _outage_and_recovery(stack: E2EStack) -> None:
    proxy = stack.start_proxy("alpha", poll_interval=1.0)
    orders = stack.upstream_url("orders") + "/orders/1"
    status, body = curl(proxy, orders)
    assert status == 200, body
    assert json.loads(body)["claims"]["azp"] == sandbox_id("alpha")
    gateway_url = stack.gw.url

    stack.gw.gateway.stop()

    # The final token for orders is cached: served without the gateway.
    status, body = curl(proxy, orders)
    assert status == 200, body
    # ledger needs leg 1: closed, naming the gateway; nothing reaches the upstream.
    status, body = curl(proxy, f"{stack.capture.url}/ledger/a")
    assert status == 502
    answer = json.loads(body)
    assert (answer["error"], answer["provider"]) == ("credential_unavailable", "ledger")
    assert answer["detail"].startswith("gateway (leg 1): gateway unreachable")
    assert gateway_url in answer["detail"]
    assert stack.capture.requests == []

    # Failed polls keep the last good configuration (and say so in the log).
    assert wait_until(lambda: "keeping the last good configuration" in proxy.log_text())
    status, health = stack.health(proxy)
    assert status == 200 and set(health["providers"]) == {"orders", "ledger"}

    # A proxy started while the gateway is down comes up, unconfigured: every request
    # is answered 502 naming the gateway, and its health says why.
    late = stack.start_proxy("alpha", name="proxy-late", poll_interval=1.0)
    assert late.ready["configured"] is False
    status, body = connect(late, stack.upstream_port("orders"))
    assert status == 502, body  # the CONNECT itself is refused, with the same JSON
    assert json.loads(body)["error"] == "configuration_unavailable"
    status, body = curl(late, "http://127.0.0.1:9/plain")
    assert status == 502
    answer = json.loads(body)
    assert answer["error"] == "configuration_unavailable"
    assert f"no configuration from the gateway at {gateway_url} yet" in answer["detail"]
    assert "gateway unreachable" in answer["detail"]
    status, health = stack.health(late)
    assert status == 503 and health["status"] == "waiting_for_configuration"

    stack.restart_gateway_on_same_port()
    assert stack.gw.url == gateway_url

    # Both proxies recover on their own: leg 1 works again after the back-off, and the
    # late proxy applies its first configuration at its next poll.
    statuses = retry_until_ok(proxy, f"{stack.capture.url}/ledger/b")
    assert statuses[-1] == 200, statuses
    assert wait_until(lambda: stack.health(late)[0] == 200)
    status, body = curl(late, orders)
    assert status == 200, body
    assert json.loads(body)["claims"]["sub"] == "alice"
    assert proxy.alive() and late.alive()

    logs = proxy.log_text() + late.log_text()
    token_shaped = len(JWT_RE.findall(logs))  # a count: never print a token
    assert token_shaped == 0
    leaked = stack.leaked(
        set(stack.user_tokens) | stack.capture.tokens(), logs
    )  # indexes, never token values
    assert leaked == []

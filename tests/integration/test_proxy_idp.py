"""The proxy when the IdP goes away and comes back, and with short-lived tokens.

Each test has its own stack: one stops its IdP, the other needs an IdP issuing ~8 s
tokens, so neither can share the stack of the other proxy tests.
"""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.stack import Stack, curl, metrics, stopping


def _setup(root: Path, *, token_ttl: int | None = None) -> Stack:
    stack = Stack.start(
        root, upstreams={"orders": ("orders", ["orders.read"])}, token_ttl=token_ttl
    )
    capture = stack.capture()
    stack.write_profile(
        {
            "id": "orders-api",
            "credentials": [
                {
                    "name": "access_token",
                    "token_grant": {
                        "grant_type": "client_credentials",
                        "token_endpoint": stack.token_endpoint,
                        "audience": "orders",
                        "scopes": ["orders.read"],
                    },
                }
            ],
            "endpoints": [
                {"host": "127.0.0.1", "port": stack.upstream_port("orders")},
                {"host": "127.0.0.1", "port": capture.port, "tls": "none"},
            ],
        }
    )
    stack.write_providers([{"name": "orders", "profile": "orders-api"}])
    return stack


@pytest.mark.timeout(90)
def test_idp_down_fails_closed_and_recovers(tmp_path: Path) -> None:
    with stopping(_setup(tmp_path)) as stack:
        proxy = stack.start_proxy()
        stack.idp.stop()
        status, body = curl(proxy, stack.upstream_url("orders") + "/while-down")
        assert status == 502, body
        doc: dict[str, Any] = json.loads(body)
        assert doc["error"] == "credential_unavailable"
        assert (doc["provider"], doc["credential"]) == ("orders", "access_token")
        assert "token endpoint unavailable" in doc["detail"]
        # Nothing reached the upstream.
        assert stack.upstream_stats("orders")["total"] == 0

        stack.restart_idp()
        # The failed key is in back-off (1 s, doubling): requests fail fast until it
        # ends; the first one after it succeeds. Bounded in count and time.
        statuses: list[int] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(statuses) < 100:
            status, body = curl(proxy, stack.upstream_url("orders") + "/after")
            statuses.append(status)
            if status == 200:
                break
            assert status == 502, body
            time.sleep(0.2)
        assert statuses[-1] == 200, statuses
        assert stack.upstream_stats("orders")["by_status"] == {"200": 1}

        status, _ = curl(proxy, stack.captures[0].url + "/collect")
        assert status == 200
        tokens = stack.tokens_seen()
        assert tokens
        logs = stack.log_text()
        assert all(token not in logs for token in tokens)


@pytest.mark.timeout(90)
def test_short_lived_tokens_are_refreshed_ahead_of_expiry(tmp_path: Path) -> None:
    ttl = 8
    with stopping(_setup(tmp_path, token_ttl=ttl)) as stack:
        proxy = stack.start_proxy()
        url = stack.upstream_url("orders") + "/steady"
        statuses: list[int] = []
        context = ssl.create_default_context(cafile=str(proxy.ready["ca_file"]))
        with httpx.Client(
            proxy=str(proxy.ready["proxy_url"]), verify=context, trust_env=False
        ) as client:
            end = time.monotonic() + 3 * ttl
            while time.monotonic() < end and len(statuses) < 1000:
                statuses.append(client.get(url).status_code)
                time.sleep(0.1)  # steady traffic, ~10 requests a second
        upstream = stack.upstream_stats("orders")
        # No request was answered with an expired token: the upstream refused none.
        assert upstream["by_status"] == {"200": len(statuses)}
        assert set(statuses) == {200}
        samples = metrics(proxy)
        # Only the very first request waited for a token; every later fetch was a
        # background refresh started ahead of expiry.
        assert samples['tokenferry_proxy_token_cache_total{outcome="miss"}'] == 1
        refreshes = samples['tokenferry_proxy_token_cache_total{outcome="refresh"}']
        assert refreshes >= 3
        idp_requests = stack.idp_token_requests()
        assert idp_requests == 1 + refreshes
        assert (
            samples['tokenferry_proxy_exchanges_total{leg="client_credentials",result="ok"}']
            == idp_requests
        )
        # The latest token, seen by the capture endpoint (same cache key), is in no log.
        status, _ = curl(proxy, stack.captures[0].url + "/collect")
        assert status == 200
        tokens = stack.tokens_seen()
        assert tokens
        logs = stack.log_text()
        assert all(token not in logs for token in tokens)

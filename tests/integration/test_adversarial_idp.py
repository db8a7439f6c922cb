"""A broken or hostile token endpoint behind the supervisor proxy.

A tiny in-test HTTP server plays the IdP, one misbehaviour per path. Sandbox requests
through the real proxy must get a 502 JSON body naming provider and credential with a
clear detail, nothing forwarded upstream, and neither the answer nor any log may hold
what the proxy sent the IdP (its JWT-SVID) or what the IdP answered (an echo of it, a
token it should not have accepted), nor a traceback.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from tests.support.e2e_stack import E2EStack
from tests.support.stack import Stack, curl

pytestmark = pytest.mark.timeout(120)

# A token the IdP hands out that the proxy must never accept, inject or log.
CANARY = "canary-token-9f3e2d1c0b"
leaked = E2EStack.leaked


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    extra_headers: tuple[tuple[str, str], ...] = ()


def _json(data: object) -> bytes:
    return json.dumps(data).encode()


# path -> (how to answer, given the secrets received (client assertion, subject token);
# words the failure's detail must hold). The broker tests reuse these.
MODES: dict[str, tuple[Callable[[str], Answer], str]] = {
    "html": (
        lambda a: Answer(
            200, f"<html><body>hello {a} {CANARY}</body></html>".encode(), "text/html"
        ),
        "not a JSON object",
    ),
    "html-500": (
        lambda a: Answer(
            500, f"<html>stack trace: client_assertion={a}</html>".encode(), "text/html"
        ),
        "HTTP 500 without an OAuth error body",
    ),
    "error-in-200": (
        lambda a: Answer(200, _json({"error": "invalid_grant", "error_description": "nope"})),
        "without a string access_token",
    ),
    "garbage": (lambda a: Answer(200, b"\x00\xff\xfe garbage " + a.encode()), "not a JSON object"),
    "giant": (
        lambda a: Answer(200, _json({"access_token": CANARY, "pad": "x" * 200_000})),
        "larger than",
    ),
    "control-chars": (
        lambda a: Answer(200, _json({"access_token": CANARY + "\r\nX-Evil: 1"})),
        "characters not allowed",
    ),
    "token-type": (
        lambda a: Answer(200, _json({"access_token": CANARY, "token_type": "mac\x1b[31m"})),
        "only Bearer and N_A",
    ),
    "number-token": (lambda a: Answer(200, _json({"access_token": 12345})), "access_token"),
    "rfc-echo": (
        lambda a: Answer(
            400,
            _json({"error": "invalid_client", "error_description": f"bad assertion {a}\u202e"}),
        ),
        "invalid_client",
    ),
    "redirect": (
        lambda a: Answer(302, b"", extra_headers=(("Location", "http://127.0.0.1:9/steal"),)),
        "redirect",
    ),
}


class FakeIdp:
    """Threaded HTTP server answering per path; records every secret it was sent."""

    def __init__(self) -> None:
        self.secrets: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                sent = [v for k in ("client_assertion", "subject_token") for v in form.get(k, [])]
                owner.secrets.extend(sent)
                mode = self.path.strip("/").split("/")[0]
                answer = MODES[mode][0](" ".join(sent))
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                for name, value in answer.extra_headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Env:
    stack: Stack
    idp: FakeIdp
    proxy: Any

    def url(self, mode: str) -> str:
        return f"{self.stack.upstream_url('orders')}/{mode}/item?q=1"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root: Path = tmp_path_factory.mktemp("adversarial-idp")
    idp = FakeIdp()
    stack = Stack.start(root, upstreams={"orders": ("orders", ["orders.read"])})
    try:
        port = stack.upstream_port("orders")
        providers = []
        for mode in MODES:
            stack.write_profile(
                {
                    "id": f"{mode}-api",
                    "credentials": [
                        {
                            "name": "access_token",
                            "token_grant": {
                                "grant_type": "client_credentials",
                                "token_endpoint": f"{idp.url}/{mode}/token",
                                "audience": "orders",
                            },
                        }
                    ],
                    "endpoints": [{"host": "127.0.0.1", "port": port, "path": f"/{mode}/**"}],
                }
            )
            providers.append({"name": mode, "profile": f"{mode}-api"})
        stack.write_providers(providers)
        proxy = stack.start_proxy()
        yield Env(stack, idp, proxy)
    finally:
        stack.stop()
        idp.stop()


@pytest.mark.parametrize("mode", list(MODES))
def test_bad_idp_answer_is_a_clear_502_with_nothing_leaked(env: Env, mode: str) -> None:
    before = env.stack.upstream_stats("orders")
    status, body = curl(env.proxy, env.url(mode))
    assert status == 502, body
    answer = json.loads(body)
    assert answer["error"] == "credential_unavailable"
    assert answer["provider"] == mode
    assert answer["credential"] == "access_token"
    assert MODES[mode][1] in answer["detail"], answer
    assert "\x1b" not in answer["detail"] and "\u202e" not in answer["detail"]
    assert env.idp.secrets and all(env.idp.secrets)
    # Failures name indexes, never values: test output must not hold a secret either.
    found = leaked([CANARY, *env.idp.secrets], body)
    assert not found, f"secrets {found} leaked"
    # Nothing was forwarded to the protected upstream.
    assert env.stack.upstream_stats("orders") == before


def test_logs_hold_no_assertion_no_idp_token_and_no_traceback(env: Env) -> None:
    for mode in MODES:
        curl(env.proxy, env.url(mode))
    logs = env.stack.log_text()
    assert env.idp.secrets
    found = leaked([CANARY, *env.idp.secrets], logs)
    assert not found, f"secrets {found} leaked"
    assert "Traceback" not in logs
    assert "\x1b" not in logs

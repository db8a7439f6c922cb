"""The CLI in the hands of a careless operator, and against a gateway that misbehaves.

Usage mistakes exit 2 with a usage line; an unreachable, broken or impostor gateway (an
in-test HTTP server answering HTML, bare 500s, JSON of the wrong shape) exits 1 with one
clear ``error:`` line; never a traceback, never the token the CLI sent.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e_stack import E2EStack
from tests.support.procs import tokenferry_command

pytestmark = pytest.mark.timeout(120)

CLI_TOKEN = "cli-bearer-token-3c9a7e51d2"
leaked = E2EStack.leaked

# mode -> (status, content type, body)
ANSWERS: dict[str, tuple[int, str, bytes]] = {
    "html": (200, "text/html", b"<html><body>Sign in to continue</body></html>"),
    "html-500": (500, "text/html", b"<html>Internal Server Error</html>"),
    "json-500": (500, "application/json", b'{"error": "internal", "detail": "internal error"}'),
    "wrong-shape": (200, "application/json", b'{"issuer": 5, "providers": "x", "profiles": [1]}'),
    "list": (200, "application/json", b"[]"),
    "odd-error": (400, "application/json", b'{"error": 5, "detail": ["x"]}'),
    "echo": (502, "text/plain", b"upstream said: Authorization: Bearer " + CLI_TOKEN.encode()),
    # JSON nested past the decoder's recursion limit, as an answer and as an error.
    "deep": (200, "application/json", b"[" * 100_000 + b"]" * 100_000),
    "deep-error": (400, "application/json", b'{"error": ' + b"[" * 100_000 + b"]" * 100_000),
    # Terminal escapes and a bidi override in the detail the CLI prints.
    "escapes": (
        400,
        "application/json",
        rb'{"error": "invalid_request", "detail": "\u001b[2J\u001b[31mred\u202e\r\nforged"}',
    ),
}


class FakeGateway:
    """Answers every request with ANSWERS[mode], mode being the first path segment."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                mode = self.path.strip("/").split("/")[0]
                status, content_type, body = ANSWERS[mode]
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gateway() -> Iterator[FakeGateway]:
    server = FakeGateway()
    yield server
    server.stop()


def run_all(
    commands: Sequence[Sequence[str]], home: Path
) -> list[subprocess.CompletedProcess[str]]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "TOKENFERRY_TOKEN": CLI_TOKEN,
    }

    def one(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            tokenferry_command(*args),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, commands))


USAGE_ERRORS: list[list[str]] = [
    [],
    ["nosuch"],
    ["profile"],
    ["profile", "lint"],
    ["provider", "create", "x"],
    ["provider", "update", "x"],
    ["provider", "get"],
    ["sandbox", "register", "x"],
    ["sandbox", "attach", "x"],
    ["proxy", "--listen", "nope"],
    ["proxy", "--listen", "127.0.0.1:99999"],
    ["--output", "xml", "provider", "list"],
    ["dev", "spiffe"],
    ["login", "--gateway"],
]


def test_usage_errors_exit_2_with_usage_and_no_traceback(tmp_path: Path) -> None:
    for args, result in zip(USAGE_ERRORS, run_all(USAGE_ERRORS, tmp_path), strict=True):
        assert result.returncode == 2, (args, result.stderr)
        assert "usage:" in result.stderr, (args, result.stderr)
        assert "error:" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout, args


BAD_URLS = [
    "not a url",
    "ftp://gateway.example",
    "http://[::1",  # was a ValueError traceback
    "http://[zz]:80",  # likewise
    "http://127.0.0.1:99999",
    "http://127.0.0.1:abc",
    "http://user:pw@127.0.0.1:1",
]


def test_bad_gateway_url_is_one_clear_line(tmp_path: Path) -> None:
    commands = [["--gateway", url, "provider", "list"] for url in BAD_URLS]
    for url, result in zip(BAD_URLS, run_all(commands, tmp_path), strict=True):
        assert result.returncode == 1, (url, result.stderr)
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("error: gateway URL "), (url, result.stderr)


# Every bad answer is tried with a write carrying a secret, and with one of the others (a
# read, a write without a body, a record fetch) in turn.
SECRET_COMMAND = [
    "provider",
    "create",
    "a",
    "--profile",
    "p1",
    "--credential",
    "k=secret-value-7d2e",
]
OTHER_COMMANDS: list[list[str]] = [
    ["provider", "list"],
    ["sandbox", "attach", "s", "a"],
    ["profile", "show", "p1"],
]


def _gateway_commands(url: str) -> list[list[str]]:
    commands = []
    for i, mode in enumerate(ANSWERS):
        for args in (SECRET_COMMAND, OTHER_COMMANDS[i % len(OTHER_COMMANDS)]):
            commands.append(["--gateway", f"{url}/{mode}", *args])
    return commands


def test_misbehaving_gateway_is_exit_1_with_a_clear_line(
    gateway: FakeGateway, tmp_path: Path
) -> None:
    commands = _gateway_commands(gateway.url)
    for args, result in zip(commands, run_all(commands, tmp_path), strict=True):
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        if "/escapes" not in args[1]:  # that one is a well-formed gateway error
            assert gateway.url in lines[0], (args, lines)
        output = result.stdout + result.stderr
        assert "Traceback" not in output
        found = leaked([CLI_TOKEN, "secret-value-7d2e"], output)
        assert not found, (f"secrets {found} leaked", args)
        assert "<html" not in output  # an impostor's page is never echoed
        assert "\x1b" not in output and "\u202e" not in output and "\r" not in output


def test_unreachable_gateway_is_exit_1_with_a_hint(tmp_path: Path) -> None:
    [result] = run_all([["--gateway", "http://127.0.0.1:1", "sandbox", "list"]], tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach the gateway at http://127.0.0.1:1")
    assert "Traceback" not in result.stderr


def test_profile_lint_of_a_nested_bomb_is_exit_1(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("[" * 3_000 + "]" * 3_000)
    [result] = run_all([["profile", "lint", str(bomb)]], tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"{bomb}: nested too deeply" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr

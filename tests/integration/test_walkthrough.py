"""docs/demo.md's by-hand walkthrough, run for real, so the docs cannot drift from the product.

Every ``sh`` block of the section "Doing it by hand" runs, in page order, in one bash
(``set -euo pipefail``: a failing command fails the test) with ``.venv/bin`` on ``PATH``
and free ports substituted for the page's fixed ones. Each ``json`` block the page shows
must be contained in the output of the block before it, and each line of a ``text``
block must be one of its lines. On top of that the test checks what the page promises
in words: the tokens carry the user and the sandbox, nothing prints a token, and the
page's own clean-up stops every process it started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.walkthrough import (
    ALLOWED_COMMANDS,
    Block,
    BlockRun,
    WalkthroughShell,
    command_names,
    contains,
    free_ports,
    json_values,
    parse_blocks,
    ports_in,
    substitute_ports,
)

DEMO_PAGE = Path(__file__).resolve().parents[2] / "docs" / "demo.md"
SECTION = "Doing it by hand"
TEMP_TEMPLATE = "mktemp -d /tmp/tf-demo-XXXX"
ADMIN_TOKEN = "dev-admin-token-demo"  # the page's dev admin token
STALE_VALUE = "stale-token-of-alice"  # the page's expired subject credential
USER = "alice"
SANDBOX_ID = "spiffe://example.org/sandbox/demo"
GATEWAY_ID = "spiffe://example.org/gateway"
# A JWT (header.payload.signature, base64url): no output may contain one.
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")


def shell_env(home: Path) -> dict[str, str]:
    """A clean environment: the venv first on PATH, none of the caller's settings."""
    # PYTHON*: as in a person's shell (PYTHONUNBUFFERED, for one, changes how a service's
    # ready line reaches the terminal).
    dropped = ("TOKENFERRY_", "SPIFFE_", "XDG_", "PYTHON")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(dropped)
        and not k.lower().endswith("_proxy")
        and k not in {"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "BASH_ENV", "ENV"}
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(home)  # the page's `cd` (clean-up) and any ~ default land here
    return env


@pytest.fixture
def blocks() -> list[Block]:
    return parse_blocks(DEMO_PAGE.read_text(), SECTION)


@pytest.fixture
def demo_root() -> Iterator[Path]:
    """Where the page's ``mktemp -d /tmp/tf-demo-XXXX`` goes in the test: a directory of
    the test's own (short: Unix socket paths are limited), removed whatever happens."""
    root = Path(tempfile.mkdtemp(prefix="tf-wt-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[WalkthroughShell]:
    home = tmp_path / "home"
    home.mkdir()
    started = WalkthroughShell(tmp_path, shell_env(home))
    yield started
    # Whatever happened (a failed block included), nothing the walkthrough started may
    # outlive the test: the whole process group is ended and must be empty.
    assert started.stop() == []


def stored_login_tokens(config_home: Path) -> list[str]:
    """Every token value of the CLI's stored logins (the test's own look, never printed)."""
    store = config_home / "tokenferry" / "credentials.json"
    data = json.loads(store.read_text())
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in {"access_token", "refresh_token"} and isinstance(item, str):
                    found.append(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(data)
    assert found, f"no token in {store}: nothing to look for"
    return found


def claims_echoed(runs: list[BlockRun], path: str) -> dict[str, Any]:
    """The claims the upstream echoed to the one block that printed its answer for ``path``."""
    echoes = [
        value
        for run in runs
        for value in json_values(run.output)
        if isinstance(value, dict) and "claims" in value and value.get("path") == path
    ]
    assert len(echoes) == 1, f"expected one printed answer for {path}, got {len(echoes)}"
    claims = echoes[0]["claims"]
    assert isinstance(claims, dict)
    return claims


def test_walkthrough_uses_only_documented_commands(blocks: list[Block]) -> None:
    """The page asks for the product, curl and shell basics: nothing else to install."""
    for block in blocks:
        extra = command_names(block.text) - ALLOWED_COMMANDS
        assert not extra, f"{block.where()} runs {sorted(extra)}: not a tokenferry command"


def test_walkthrough_by_hand(blocks: list[Block], shell: WalkthroughShell, demo_root: Path) -> None:
    doc_ports = sorted(ports_in(blocks))
    assert doc_ports, "the walkthrough names no ports"
    mapping = dict(zip(doc_ports, free_ports(len(doc_ports)), strict=True))
    assert TEMP_TEMPLATE in blocks[0].text, f"block 1 should create $DEMO with {TEMP_TEMPLATE}"

    def as_run(block: Block) -> str:
        return substitute_ports(block.text, mapping).replace(
            TEMP_TEMPLATE, f"mktemp -d {demo_root}/tf-demo-XXXX"
        )

    runs: list[BlockRun] = []

    def run_and_compare(block: Block) -> None:
        run = shell.run(block, as_run(block))
        runs.append(run)
        for shown in block.expected:
            assert any(contains(actual, shown) for actual in json_values(run.output)), (
                f"{block.where()}: the page shows {json.dumps(shown)}, "
                f"but the command printed:\n{run.output}"
            )
        printed = {line.strip() for line in run.output.splitlines()}
        for shown_line in block.expected_lines:
            assert shown_line in printed, (
                f"{block.where()}: the page shows the line {shown_line!r}, "
                f"but the command printed:\n{run.output}"
            )

    *steps, cleanup = blocks
    run_and_compare(steps[0])
    demo_dir = Path(shell.value('"${DEMO:-}"'))
    assert demo_dir.parent == demo_root and demo_dir.is_dir(), f"block 1 made no $DEMO: {demo_dir}"
    for block in steps[1:]:
        run_and_compare(block)

    # Before the page's clean-up removes them: the stored login's tokens, and the logs in
    # $DEMO (the proxy's), which the secret scan below also reads.
    secrets = [
        ADMIN_TOKEN,
        STALE_VALUE,
        *stored_login_tokens(Path(shell.value('"$XDG_CONFIG_HOME"'))),
    ]
    logs = [p.read_text(errors="replace") for p in sorted(demo_dir.rglob("*.log"))]
    assert logs, "no log in $DEMO (the page sends the proxy's to proxy.log)"
    running = [pid for pid in shell.group_members() if pid != shell.proc.pid]
    run_and_compare(cleanup)

    # One ready line per service started with `&`, and every service the page lists.
    started = [ready["service"] for ready in shell.ready]
    assert sorted(started) == sorted(
        ["dev-spiffe", "dev-spiffe", "dev-idp", "gateway", "dev-upstream", "dev-upstream", "proxy"]
    ), started
    assert len(running) >= len(started), f"services running before the clean-up: {running}"

    # The token the orders upstream verified: the user as subject, the sandbox as the
    # authorised party and current actor, the gateway as the actor before it.
    claims = claims_echoed(runs, "/orders/42")
    assert claims["sub"] == USER
    assert claims["azp"] == SANDBOX_ID
    assert claims["aud"] == ["orders"]
    assert claims["scope"] == "orders.read"
    assert claims["act"] == {"sub": SANDBOX_ID, "act": {"sub": GATEWAY_ID}}
    reports = claims_echoed(runs, "/reports/weekly")
    assert (reports["sub"], reports["azp"], reports["aud"]) == (USER, SANDBOX_ID, ["reports"])
    assert reports["act"] == {"sub": SANDBOX_ID, "act": {"sub": GATEWAY_ID}}

    # The page's clean-up stopped every service (only the shell itself is left) and
    # removed the directory.
    left = shell.wait_group_empty(exclude=[shell.proc.pid])
    assert left == [], f"still running after the page's clean-up: {left}"
    assert not demo_dir.exists(), "the clean-up left $DEMO behind"

    # No token in anything printed: the shell's stdout and stderr (every service's log
    # but the proxy's) and the proxy's log.
    outputs = ["".join(shell.stdout_seen), shell.stderr_path.read_text(errors="replace"), *logs]
    for text in outputs:
        assert JWT.search(text) is None, "a JWT appears in the walkthrough's output"
        for secret in secrets:
            assert secret not in text, "a token value appears in the walkthrough's output"


def test_page_conventions_are_read_as_documented() -> None:
    """The helpers the walkthrough test relies on, on a small page of their own."""
    page = "\n".join(
        [
            "## Doing it by hand",
            "```sh",
            "tokenferry dev idp --listen 127.0.0.1:8180 \\",
            "    --device-interval 1 &   # a service",
            "cat > p.yaml <<'YAML'",
            "  - {host: 127.0.0.1, port: 9002, path: /x/**}",
            "jq is not a command here &",
            "YAML",
            "curl -s https://localhost:9001/x | grep -c 8180; echo && true",
            "```",
            "```json",
            '{"a": {"b": [1, 2]}}',
            "```",
            "```text",
            "line one",
            "```",
            "```console",
            "$ not run",
            "```",
            "## Next",
            "```sh",
            "not in the section",
            "```",
        ]
    )
    (block,) = parse_blocks(page, SECTION)
    assert block.services == 1
    assert block.expected == ({"a": {"b": [1, 2]}},)
    assert block.expected_lines == ("line one",)
    assert command_names(block.text) == {"tokenferry", "cat", "curl", "grep", "echo", "true"}
    assert ports_in([block]) == {8180, 9002, 9001}
    rewritten = substitute_ports(block.text, {8180: 1, 9002: 2, 9001: 3})
    assert "127.0.0.1:1 " in rewritten and "port: 2," in rewritten
    assert "localhost:3/x" in rewritten and "grep -c 8180" in rewritten
    assert contains({"a": {"b": [1, 2], "c": 3}, "d": 4}, {"a": {"b": [1, 2]}})
    assert not contains({"a": {"b": [1, 2, 3]}}, {"a": {"b": [1, 2]}})
    assert not contains({"a": 1}, {"a": True})
    assert json_values('x {"event": "ready"}{"event": "ready"} y [1]') == [
        {"event": "ready"},
        {"event": "ready"},
        [1],
    ]

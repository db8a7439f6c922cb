"""``tokenferry demo`` end to end: the real command as a subprocess, its output, its clean-up.

The demo starts every service itself (dev SPIFFE agents, dev IdP, gateway, two HTTPS
upstreams, the proxy in gateway mode); these tests only read what it prints, run the
``curl`` line it offers in ``--serve`` mode, and check that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tokenferry.dev.demo import (
    GATEWAY_ID,
    SANDBOX_ID,
    Counters,
    DemoError,
    Exchange,
    Outcome,
    ServiceProcess,
    check_outcome,
    describe_cache,
)

USER = "alice"
ACT = {"sub": SANDBOX_ID, "act": {"sub": GATEWAY_ID}}
DEMO_TIMEOUT = 90.0
TEMP_DIR = re.compile(r"in (/tmp/tf-demo-[A-Za-z0-9_]+)")
REQUEST_HEADING = re.compile(r"^ (\d+)\. (.+)$", re.MULTILINE)


def demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "100"  # as in a narrow terminal: long lines must still stay whole
    return env


def request_blocks(stdout: str) -> dict[int, str]:
    """Each numbered request's block of output, by number."""
    marks = list(REQUEST_HEADING.finditer(stdout))
    blocks: dict[int, str] = {}
    for mark, following in zip(marks, [*marks[1:], None], strict=True):
        end = following.start() if following else len(stdout)
        blocks[int(mark.group(1))] = stdout[mark.start() : end]
    return blocks


def claim(block: str, name: str) -> str:
    found = re.search(rf"^\s+{name}\s+(.+?)(?:\s{{3}}\(.*\))?$", block, re.MULTILINE)
    assert found, f"no {name} line in:\n{block}"
    return found.group(1)


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found.update(int(p) for p in text.split())
    return found


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- the whole demo -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenferry", "demo"],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        env=demo_env(),
        stdin=subprocess.DEVNULL,
    )


def test_demo_succeeds_and_cleans_up(demo_run: subprocess.CompletedProcess[str]) -> None:
    assert demo_run.returncode == 0, demo_run.stdout + demo_run.stderr
    assert "All 6 requests behaved as shown" in demo_run.stdout
    temp_dir = TEMP_DIR.search(demo_run.stdout)
    assert temp_dir, demo_run.stdout
    assert not Path(temp_dir.group(1)).exists()


def test_both_upstreams_see_user_and_sandbox(demo_run: subprocess.CompletedProcess[str]) -> None:
    blocks = request_blocks(demo_run.stdout)
    assert sorted(blocks) == [1, 2, 3, 4, 5, 6]
    expected = {1: "orders", 2: "orders", 3: "reports", 4: "reports"}
    for number, audience in expected.items():
        block = blocks[number]
        assert "→ 200" in block, block
        assert claim(block, "sub") == USER
        assert claim(block, "azp") == SANDBOX_ID
        assert json.loads(claim(block, "aud")) == [audience]
        assert claim(block, "scope") == f"{audience}.read"
        assert json.loads(claim(block, "act")) == ACT
        assert claim(block, "chain") == f"{USER} ← {SANDBOX_ID} ← {GATEWAY_ID}"
    # Two different upstreams, on two different ports.
    urls = [re.findall(r"https://127\.0\.0\.1:(\d+)/", blocks[n]) for n in (1, 3)]
    assert urls[0] and urls[1] and urls[0][0] != urls[1][0], urls


def test_cache_miss_then_hit(demo_run: subprocess.CompletedProcess[str]) -> None:
    blocks = request_blocks(demo_run.stdout)
    first_orders = claim(blocks[1], "cache")
    assert first_orders.startswith("miss → exchanged")
    assert "leg 1 via the gateway" in first_orders
    assert "leg 2 at the IdP" in first_orders
    assert claim(blocks[3], "cache").startswith("miss → exchanged")
    assert "leg 2 at the IdP" in claim(blocks[3], "cache")
    for repeat in (2, 4):
        assert claim(blocks[repeat], "cache").startswith("hit:"), blocks[repeat]


def test_passthrough_and_failure(demo_run: subprocess.CompletedProcess[str]) -> None:
    blocks = request_blocks(demo_run.stdout)
    assert "https://localhost:" in blocks[5]
    assert "→ 401" in blocks[5]
    assert "tunnelled the TLS connection untouched" in blocks[5]
    assert "→ 502" in blocks[6]
    body_line = [line for line in blocks[6].splitlines() if line.strip().startswith("{")]
    assert len(body_line) == 1, blocks[6]
    body = json.loads(body_line[0])
    assert body["error"] == "credential_unavailable"
    assert body["provider"] == "billing"
    assert "expired" in body["detail"]


def test_no_token_anywhere_in_the_output(demo_run: subprocess.CompletedProcess[str]) -> None:
    assert "eyJ" not in demo_run.stdout
    assert "eyJ" not in demo_run.stderr


# --- --serve --------------------------------------------------------------------------------


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.fixture
def serving() -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str | None]]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenferry", "demo", "--serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=demo_env(),
    )
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_serve_offers_a_working_curl_line_and_stops_on_sigterm(
    serving: tuple[subprocess.Popen[str], queue.Queue[str | None]],
) -> None:
    proc, lines = serving
    seen: list[str] = []
    curl_line: str | None = None
    while curl_line is None:
        line = lines.get(timeout=DEMO_TIMEOUT)
        assert line is not None, "demo --serve ended early:\n" + "".join(seen)
        seen.append(line)
        if line.startswith("curl "):
            curl_line = line.strip()
    temp_dir = TEMP_DIR.search("".join(seen))
    assert temp_dir, "".join(seen)
    services = children_of(proc.pid)
    assert len(services) == 7, services  # 2 SPIFFE agents, IdP, gateway, 2 upstreams, proxy

    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    result = subprocess.run(
        [*shlex.split(curl_line), "--silent", "--show-error", "--max-time", "30"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    claims = answer["claims"]
    assert claims["sub"] == USER
    assert claims["azp"] == SANDBOX_ID
    assert claims["aud"] == ["orders"]
    assert claims["act"] == ACT
    assert "authorization" in answer["header_names"]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    rest: list[str] = []
    while (line := lines.get(timeout=30)) is not None:
        rest.append(line)
    output = "".join(seen + rest)
    assert "eyJ" not in output
    assert all(gone(pid) for pid in services), services
    assert not Path(temp_dir.group(1)).exists()


# --- the demo's own checks can fail -------------------------------------------------------


def _outcome(exchange: Exchange, claims: dict[str, Any], cache: str) -> Outcome:
    return Outcome(exchange, 200, {"claims": claims}, {"cache": cache}, Counters())


def test_checks_catch_a_wrong_identity_or_cache_outcome() -> None:
    exchange = Exchange("orders", "https://x/orders", "token", "orders", "orders.read", "hit")
    good = {"sub": USER, "azp": SANDBOX_ID, "aud": ["orders"], "scope": "orders.read", "act": ACT}
    assert check_outcome(_outcome(exchange, good, "hit"), USER) == []
    wrong_azp = check_outcome(_outcome(exchange, {**good, "azp": "someone"}, "hit"), USER)
    assert wrong_azp == [f"claim azp is 'someone', expected {SANDBOX_ID}"]
    assert check_outcome(_outcome(exchange, good, "miss"), USER) == [
        "proxy cache outcome 'miss', expected 'hit'"
    ]
    no_act = check_outcome(_outcome(exchange, {**good, "act": None}, "hit"), USER)
    assert len(no_act) == 1 and no_act[0].startswith("claim act is None")
    failure = Exchange("billing", "https://x/billing", "failure")
    refused = Outcome(failure, 200, {"claims": good}, None, Counters())
    assert check_outcome(refused, USER)[0].startswith("expected 502 credential_unavailable")


def test_cache_description_names_the_legs_that_ran() -> None:
    both = Counters(idp_intermediate=1, idp_final=1, broker_ok=1)
    assert describe_cache({"cache": "miss"}, both) == (
        "miss → exchanged: leg 1 via the gateway (intermediate token exchanged at the IdP "
        "by the gateway) + leg 2 at the IdP (final token)"
    )
    gateway_cached = Counters(idp_final=1, broker_ok=1)
    assert "intermediate token from the gateway's cache" in describe_cache(
        {"cache": "miss"}, gateway_cached
    )
    assert describe_cache({"cache": "hit"}, Counters()).startswith("hit: served from")
    assert describe_cache(None, Counters()) == "no decision logged"


def test_a_service_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    service = ServiceProcess(
        "upstream-bad",
        [
            "dev",
            "upstream",
            "--listen",
            "not-an-address",
            "--issuer",
            "http://x",
            "--audience",
            "a",
        ],
        log_dir=tmp_path,
        cwd=tmp_path,
    )
    try:
        with pytest.raises(DemoError) as caught:
            service.wait_ready(timeout=30)
    finally:
        service.stop()
    assert caught.value.service == "upstream-bad"
    assert "exited with status 1 before it was ready" in str(caught.value)
    assert any("--listen" in line for line in service.log_tail())


def test_a_failing_step_exits_1_with_the_service_log_and_cleans_up() -> None:
    # The dev IdP refuses to mint a token for a user name longer than 255 characters:
    # a real failure, halfway through (after every service has started).
    result = subprocess.run(
        [sys.executable, "-m", "tokenferry", "demo", "--user", "x" * 300],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        env=demo_env(),
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    assert "the dev IdP refused to mint a user token" in error_lines[0]
    assert "invalid_request: sub must be a non-empty string" in error_lines[0]
    assert "last lines of the idp log:" in result.stderr
    assert '"service": "dev-idp"' in result.stderr  # the log tail itself
    assert "Traceback" not in result.stderr
    temp_dir = TEMP_DIR.search(result.stdout)
    assert temp_dir, result.stdout
    assert not Path(temp_dir.group(1)).exists()

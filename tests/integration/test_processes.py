"""``tokenferry.dev.processes``: the launcher shared by the demo, the bench and the tests.

Real child processes (small Python scripts), so the ready line, the log file, the
failure reports and the process group are checked as they happen.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenferry.dev.processes import (
    PROXY_VARIABLES,
    ServiceProcess,
    StartFailed,
    clean_environment,
    json_ready,
    start_service,
)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def listening(line: str) -> dict[str, Any] | None:
    word, _, port = line.strip().partition(" ")
    return {"port": int(port)} if word == "LISTENING" else None


def test_ready_line_is_returned_and_everything_is_logged(tmp_path: Path) -> None:
    service = start_service(
        "child",
        python(
            "import sys, time\n"
            "print('before', flush=True)\n"
            "print('to stderr', file=sys.stderr, flush=True)\n"
            # One write: "after" is in the pipe before the ready line is seen, so it is
            # logged even though the test stops the child right after.
            "sys.stdout.write('LISTENING 4242\\nafter\\n'); sys.stdout.flush()\n"
            "time.sleep(60)\n"
        ),
        tmp_path / "logs",
        ready=listening,
    )
    try:
        assert service.ready == {"port": 4242}
        assert service.alive()
    finally:
        service.stop()
    assert not service.alive()
    assert service.proc.returncode is not None
    assert service.log_path == tmp_path / "logs" / "child.log"
    lines = service.log_lines()
    for expected in ("before", "to stderr", "LISTENING 4242", "after"):
        assert expected in lines
    assert service.log_tail(1) == lines[-1:]


def test_json_ready_line() -> None:
    assert json_ready('{"event": "ready", "url": "http://127.0.0.1:1"}') == {
        "event": "ready",
        "url": "http://127.0.0.1:1",
    }
    assert json_ready('{"event": "started"}') is None
    assert json_ready("not json") is None
    assert json_ready('["event", "ready"]') is None


def test_exit_before_ready_names_status_command_and_log(tmp_path: Path) -> None:
    with pytest.raises(StartFailed) as caught:
        start_service(
            "quitter",
            python("import sys; print('bad flag', file=sys.stderr); sys.exit(3)"),
            tmp_path,
        )
    message = str(caught.value)
    assert caught.value.service == "quitter"
    assert message.startswith("quitter exited with status 3 before it was ready")
    assert sys.executable in message
    assert "bad flag" in message


def test_no_ready_line_in_time_kills_the_child(tmp_path: Path) -> None:
    child = ServiceProcess("sleeper", python("import time; time.sleep(60)"), log_dir=tmp_path)
    try:
        with pytest.raises(StartFailed, match="sleeper did not become ready within 1 s"):
            child.wait_ready(timeout=1.0)
        assert child.alive()  # wait_ready leaves it running: the caller decides
    finally:
        child.stop()
    assert not child.alive()

    pid_file = tmp_path / "pid"
    with pytest.raises(StartFailed, match="sleeper2 did not become ready within 5 s"):
        start_service(
            "sleeper2",
            python(
                "import os, sys, time\n"
                f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                "time.sleep(60)\n"
            ),
            tmp_path,
            timeout=5.0,
        )
    # start_service killed and reaped it: the process is gone.
    assert not Path(f"/proc/{pid_file.read_text()}").exists()


def test_process_group_and_working_directory(tmp_path: Path) -> None:
    service = ServiceProcess(
        "grouped",
        python(
            "import json, os, time\n"
            "print(json.dumps({'event': 'ready', 'pgid': os.getpgid(0), 'pid': os.getpid(),"
            " 'cwd': os.getcwd()}), flush=True)\n"
            "time.sleep(60)\n"
        ),
        log_dir=tmp_path / "logs",
        cwd=tmp_path,
        process_group=True,
    )
    try:
        ready = service.wait_ready(timeout=30)
    finally:
        service.stop()
    assert ready["pgid"] == ready["pid"] == service.proc.pid
    assert ready["pgid"] != os.getpgid(0)
    assert ready["cwd"] == str(tmp_path)


def test_clean_environment_drops_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.setenv("TOKENFERRY_GATEWAY", "http://127.0.0.1:8443")
    env = clean_environment({"EXTRA": "1", "NO_PROXY": "localhost"})
    assert {"HTTP_PROXY", "https_proxy", "ALL_PROXY", "no_proxy"}.isdisjoint(env)
    assert env["NO_PROXY"] == "localhost"  # what the caller asks for explicitly stays
    assert env["EXTRA"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["TOKENFERRY_GATEWAY"] == "http://127.0.0.1:8443"
    scrubbed = clean_environment(remove_prefixes=("TOKENFERRY_",))
    assert "TOKENFERRY_GATEWAY" not in scrubbed
    assert "HTTP_PROXY" not in scrubbed

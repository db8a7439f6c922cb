"""Start tokenferry services as real subprocesses and wait for their ready line.

Every service prints one JSON line ``{"event": "ready", ...}`` on stdout once it listens
(see ``tokenferry.service``). Everything else a service writes (stdout after the ready
line, and stderr) goes to a log file, so tests can search the logs for secrets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ServiceFailed(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    ready: dict[str, Any]
    log_path: Path
    _pump: threading.Thread | None = field(default=None, repr=False)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._pump is not None:
            self._pump.join(timeout)


def tokenferry_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenferry", *args]


def start_service(
    name: str,
    args: Sequence[str],
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    command: Sequence[str] | None = None,
) -> Service:
    """Run ``tokenferry ARGS`` (or ``command``) and return once it printed its ready line."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child and the pump thread
    full_env = dict(os.environ)
    # Services must never pick up a proxy from the test environment.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        full_env.pop(var, None)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    proc = subprocess.Popen(
        list(command) if command is not None else tokenferry_command(*args),
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        env=full_env,
    )
    assert proc.stdout is not None
    ready: dict[str, Any] | None = None
    deadline = time.monotonic() + timeout
    lines: Iterator[bytes] = iter(proc.stdout.readline, b"")
    result: list[dict[str, Any]] = []

    def wait_ready() -> None:
        for raw in lines:
            log.write(raw)
            log.flush()
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("event") == "ready":
                result.append(obj)
                return

    waiter = threading.Thread(target=wait_ready, daemon=True)
    waiter.start()
    waiter.join(max(0.0, deadline - time.monotonic()))
    if result:
        ready = result[0]
    if ready is None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        log.flush()
        raise ServiceFailed(
            f"{name} did not become ready (exit {proc.returncode}); log:\n"
            + log_path.read_text(errors="replace")[-4000:]
        )

    def pump() -> None:
        for raw in lines:
            log.write(raw)
            log.flush()
        log.close()

    pump_thread = threading.Thread(target=pump, daemon=True)
    pump_thread.start()
    return Service(name=name, proc=proc, ready=ready, log_path=log_path, _pump=pump_thread)

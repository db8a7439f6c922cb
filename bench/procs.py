"""Start the bench's processes and wait until they listen; stop every one of them.

A small copy of ``tests/support/procs.py`` adapted for the bench: the readiness test is a
function of one output line, because bare ``mitmdump`` prints no JSON ready line (only
``HTTP(S) proxy listening at 127.0.0.1:PORT.``), and every process goes into a
``ProcessSet`` whose ``stop_all()`` runs on exit, error or Ctrl-C. Children run in their
own session so a terminal Ctrl-C reaches only the bench, which then stops them in order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Ready = Callable[[str], dict[str, Any] | None]

_MITM_LISTENING = re.compile(r"proxy listening at (?P<host>[0-9.]+):(?P<port>\d+)")


class StartFailed(RuntimeError):
    pass


def json_ready(line: str) -> dict[str, Any] | None:
    """The ``{"event": "ready", ...}`` line every tokenferry service prints."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if isinstance(obj, dict) and obj.get("event") == "ready":
        return obj
    return None


def mitmdump_ready(line: str) -> dict[str, Any] | None:
    match = _MITM_LISTENING.search(line)
    if match is None:
        return None
    return {"proxy_url": f"http://{match['host']}:{match['port']}"}


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The processes under test must never route through a proxy from the environment.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        env.pop(var, None)
        env.pop(var.lower(), None)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    ready: dict[str, Any]
    log_path: Path
    _pump: threading.Thread | None = field(default=None, repr=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-chars:]

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._pump is not None:
            self._pump.join(timeout)


@dataclass
class ProcessSet:
    log_dir: Path
    processes: list[Process] = field(default_factory=list)

    def start(
        self,
        name: str,
        command: Sequence[str],
        *,
        ready: Ready = json_ready,
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> Process:
        process = start(name, command, self.log_dir, ready=ready, env=env, timeout=timeout)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        # Reverse start order: the proxies go before the IdP and agent they depend on.
        while self.processes:
            process = self.processes.pop()
            try:
                process.stop()
            except Exception as exc:  # keep stopping the others whatever happens
                print(f"warning: could not stop {process.name}: {exc}", file=sys.stderr)


def start(
    name: str,
    command: Sequence[str],
    log_dir: Path,
    *,
    ready: Ready = json_ready,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Process:
    """Run ``command``; return once one line of its stdout satisfies ``ready``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - shared by the child and the pump thread
    proc = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        env=clean_env(env),
        start_new_session=True,
    )
    assert proc.stdout is not None
    stdout = proc.stdout
    found: list[dict[str, Any]] = []

    def wait_ready() -> None:
        for raw in iter(stdout.readline, b""):
            log.write(raw)
            log.flush()
            result = ready(raw.decode(errors="replace"))
            if result is not None:
                found.append(result)
                return

    waiter = threading.Thread(target=wait_ready, daemon=True)
    waiter.start()
    deadline = time.monotonic() + timeout
    try:
        while waiter.is_alive() and time.monotonic() < deadline:
            waiter.join(0.1)
    except BaseException:
        # Ctrl-C while waiting: this child is not in any ProcessSet yet, so end it here.
        proc.kill()
        proc.wait(5)
        raise
    if not found:
        timed_out = proc.poll() is None
        if timed_out:
            proc.kill()
        proc.wait(5)
        log.flush()
        tail = log_path.read_text(errors="replace")[-3000:]
        why = (
            f"exited with code {proc.returncode} before its ready line"
            if not timed_out
            else f"did not become ready within {timeout:.0f}s"
        )
        raise StartFailed(f"{name} {why}; command: {' '.join(command)}\n--- log tail ---\n{tail}")

    def pump() -> None:
        for raw in iter(stdout.readline, b""):
            log.write(raw)
            log.flush()
        log.close()

    pump_thread = threading.Thread(target=pump, daemon=True)
    pump_thread.start()
    return Process(name=name, proc=proc, ready=found[0], log_path=log_path, _pump=pump_thread)

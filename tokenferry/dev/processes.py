"""Run services as child processes, wait for their ready line, log their output, stop them.

Every tokenferry service prints one JSON line ``{"event": "ready", ...}`` on stdout once
it listens (see ``tokenferry.service``). A ``ServiceProcess`` reads the child's stdout on
a thread until that line appears and copies everything (stdout, and stderr directly) into
a log file, so its log can be shown when something fails and searched for secrets.

Used by ``tokenferry demo``, by the benchmark (``bench/``) and by the tests
(``tests/support/procs.py``); it lives in the package because the demo needs it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 25
LOG_TAIL_CHARS = 4000

# A service must never route its own traffic through a proxy from the environment of
# whoever started it.
PROXY_VARIABLES: tuple[str, ...] = tuple(
    name
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
    for name in (var, var.lower())
)

Ready = Callable[[str], dict[str, Any] | None]
"""Tells whether one line of a child's stdout is its ready line, and what it says."""


class StartFailed(RuntimeError):
    """A child exited, or did not print its ready line in time."""

    def __init__(self, message: str, service: str) -> None:
        super().__init__(message)
        self.service = service


def json_ready(line: str) -> dict[str, Any] | None:
    """The ``{"event": "ready", ...}`` line every tokenferry service prints."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if isinstance(obj, dict) and obj.get("event") == "ready":
        return obj
    return None


def tokenferry_command(*args: str) -> list[str]:
    """``python -m tokenferry ARGS`` with the running interpreter."""
    return [sys.executable, "-m", "tokenferry", *args]


def clean_environment(
    extra: Mapping[str, str] | None = None,
    *,
    remove: Collection[str] = PROXY_VARIABLES,
    remove_prefixes: tuple[str, ...] = (),
) -> dict[str, str]:
    """This process's environment without ``remove`` (and ``remove_prefixes``), plus
    unbuffered Python output (the ready line must arrive when printed), plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in remove and not key.startswith(remove_prefixes)
    }
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class ServiceProcess:
    """``command`` as a child process, with its ready line and log file ``<log_dir>/<name>.log``.

    Starts at once; ``wait_ready()`` waits for the ready line. With ``process_group``
    the child gets its own process group, so a Ctrl-C in the terminal reaches only the
    parent, which can then stop its children in order instead of all dying at once.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ready: Ready = json_ready,
        process_group: bool = False,
    ) -> None:
        self.name = name
        self.command = tuple(command)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.ready: dict[str, Any] = {}
        self._is_ready = ready
        self._settled = threading.Event()  # ready line seen, or stdout closed
        # Shared by the child (stderr) and the stdout pump, which closes it at EOF.
        self._log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.command,
                stdout=subprocess.PIPE,
                stderr=self._log,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=dict(env) if env is not None else clean_environment(),
                process_group=0 if process_group else None,
            )
        except OSError:
            self._log.close()
            raise
        self._pump = threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True)
        self._pump.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        with self._log:
            for raw in iter(self.proc.stdout.readline, b""):
                self._log.write(raw)
                self._log.flush()
                if not self.ready:
                    found = self._is_ready(raw.decode(errors="replace"))
                    if found is not None:
                        self.ready = found
                        self._settled.set()
        self._settled.set()

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """The ready line; ``StartFailed`` if the child exits or times out first (the
        child is left running: ``stop()`` it)."""
        eof = self._settled.wait(timeout)
        if self.ready:
            return self.ready
        code = self.proc.poll()
        if eof and code is None:
            # stdout closes a moment before the process can be reaped.
            try:
                code = self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = None
        if code is None:
            raise StartFailed(f"{self.name} did not become ready within {timeout:.0f} s", self.name)
        raise StartFailed(f"{self.name} exited with status {code} before it was ready", self.name)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._pump.join(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)
        self._pump.join(STOP_TIMEOUT)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        return self.log_lines()[-lines:]


def start_service(
    name: str,
    command: Sequence[str],
    log_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    ready: Ready = json_ready,
    process_group: bool = False,
) -> ServiceProcess:
    """Start ``command`` and return once it printed its ready line.

    Otherwise (exit, timeout, Ctrl-C) the child is killed, and ``StartFailed`` names the
    command and quotes the end of its log.
    """
    service = ServiceProcess(
        name, command, log_dir=log_dir, env=env, ready=ready, process_group=process_group
    )
    try:
        service.wait_ready(timeout)
    except StartFailed as exc:
        service.kill()
        tail = service.log_text()[-LOG_TAIL_CHARS:]
        raise StartFailed(
            f"{exc}; command: {shlex.join(service.command)}\n--- log tail ---\n{tail}", name
        ) from None
    except BaseException:
        service.kill()
        raise
    return service

"""Start tokenferry services as real subprocesses and wait for their ready line.

Every service prints one JSON line ``{"event": "ready", ...}`` on stdout once it listens
(see ``tokenferry.service``). Everything else a service writes (stdout after the ready
line, and stderr) goes to a log file, so tests can search the logs for secrets.

The machinery is ``tokenferry.dev.processes`` (shared with the demo and the bench); this
module keeps the names the tests use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenferry.dev import processes
from tokenferry.dev.processes import ServiceProcess as Service
from tokenferry.dev.processes import StartFailed as ServiceFailed
from tokenferry.dev.processes import tokenferry_command

__all__ = ["Service", "ServiceFailed", "start_service", "tokenferry_command"]


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
    return processes.start_service(
        name,
        command if command is not None else tokenferry_command(*args),
        log_dir,
        env=processes.clean_environment(env),
        timeout=timeout,
    )

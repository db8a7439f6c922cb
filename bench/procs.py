"""Start the bench's processes and wait until they listen; stop every one of them.

Starting, ready lines, logs and stopping come from ``tokenferry.dev.processes`` (shared
with the demo and the tests). What is the bench's own: bare ``mitmdump`` prints no JSON
ready line (only ``HTTP(S) proxy listening at 127.0.0.1:PORT.``), hence
``mitmdump_ready``; and every process goes into a ``ProcessSet`` whose ``stop_all()``
runs on exit, error or Ctrl-C. Children run in their own process group so a terminal
Ctrl-C reaches only the bench, which then stops them in order.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenferry.dev.processes import (
    Ready,
    ServiceProcess,
    StartFailed,
    clean_environment,
    json_ready,
    start_service,
)

__all__ = ["ProcessSet", "StartFailed", "mitmdump_ready"]

_MITM_LISTENING = re.compile(r"proxy listening at (?P<host>[0-9.]+):(?P<port>\d+)")


def mitmdump_ready(line: str) -> dict[str, Any] | None:
    match = _MITM_LISTENING.search(line)
    if match is None:
        return None
    return {"proxy_url": f"http://{match['host']}:{match['port']}"}


@dataclass
class ProcessSet:
    log_dir: Path
    processes: list[ServiceProcess] = field(default_factory=list)

    def start(
        self,
        name: str,
        command: Sequence[str],
        *,
        ready: Ready = json_ready,
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> ServiceProcess:
        """Run ``command``; return once one line of its stdout satisfies ``ready``."""
        process = start_service(
            name,
            command,
            self.log_dir,
            env=clean_environment(env),
            timeout=timeout,
            ready=ready,
            process_group=True,
        )
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

"""What every long-running tokenferry process shares: JSON logs and the ready line.

Services print exactly one JSON object with ``"event": "ready"`` on stdout once they
listen, naming the addresses they bound (ports may be 0 on the command line). Tests and
``tokenferry demo`` start services as subprocesses and wait for that line instead of
polling ports. Logs go to stderr as one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else passed via ``extra=`` becomes a JSON field.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)


# One encoder for every line: json.dumps(..., default=str) would build a new one per call.
_ENCODER = json.JSONEncoder(default=str)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; fields given with ``extra=`` are kept as fields."""

    def __init__(self) -> None:
        super().__init__()
        # (whole second, its "YYYY-MM-DDTHH:MM:SS" text): the proxy writes a line per
        # request, and formatting the same second again for each one is measurable.
        self._second: tuple[int, str] = (-1, "")

    def _timestamp(self, record: logging.LogRecord) -> str:
        whole = int(record.created)
        second, text = self._second
        if whole != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            self._second = (whole, text)
        return f"{text}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.levelno >= logging.ERROR:
            # Exception text can carry request data; keep only the type, never the message.
            entry["exception"] = record.exc_info[0].__name__ if record.exc_info[0] else None
        return _ENCODER.encode(entry)


def configure_logging(level: str = "info") -> None:
    """Send JSON log lines to stderr; safe to call more than once."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def announce_ready(service: str, **addresses: Any) -> None:
    """Print the single ready line on stdout and flush it."""
    print(json.dumps({"event": "ready", "service": service, **addresses}), flush=True)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:0`` for IPv6) -> (host, port); ValueError says what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host, port


def url_host(host: str) -> str:
    """The host as it appears in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host

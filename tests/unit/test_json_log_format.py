"""The JSON log line format (tokenferry.service.JsonFormatter): one object per record,
``extra=`` fields kept, exception text never written."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from tokenferry.service import JsonFormatter


def record(created: float, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("tokenferry.decision", logging.INFO, __file__, 1, "decision", (), None)
    rec.created = created
    rec.msecs = (created - int(created)) * 1000
    rec.__dict__.update(extra)
    return rec


def test_line_has_time_level_logger_message_and_extra_fields_in_order() -> None:
    line = JsonFormatter().format(
        record(1_700_000_000.25, provider="orders", port=443, cache="hit", _private="x")
    )
    assert line == (
        '{"time": "2023-11-14T22:13:20.250Z", "level": "info", "logger": "tokenferry.decision",'
        ' "message": "decision", "provider": "orders", "port": 443, "cache": "hit"}'
    )


def test_each_second_gets_its_own_timestamp() -> None:
    formatter = JsonFormatter()
    times = [
        json.loads(formatter.format(record(t)))["time"]
        for t in (1_700_000_000.999, 1_700_000_001.0, 1_700_000_001.5, 1_700_000_000.5)
    ]
    assert times == [
        "2023-11-14T22:13:20.999Z",
        "2023-11-14T22:13:21.000Z",
        "2023-11-14T22:13:21.500Z",
        "2023-11-14T22:13:20.500Z",
    ]


def test_values_json_cannot_encode_are_written_as_text() -> None:
    line = JsonFormatter().format(record(0.0, where=Path("/etc/x"), names=("a", "b")))
    assert json.loads(line)["where"] == "/etc/x"
    assert json.loads(line)["names"] == ["a", "b"]


def test_exception_type_only_never_its_message() -> None:
    try:
        raise ValueError("Bearer secret-token")
    except ValueError:
        rec = logging.LogRecord(
            "tokenferry.proxy", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = JsonFormatter().format(rec)
    assert json.loads(line)["exception"] == "ValueError"
    assert "secret-token" not in line

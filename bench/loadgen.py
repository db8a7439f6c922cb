"""Drive load through a proxy with ``hey`` (or the Python fallback) and read the result.

Both generators print hey's CSV (``hey -o csv``): one row per completed request,
``response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset``
with times in seconds. The CSV is parsed rather than hey's human summary because it is
a stable machine format and it lets the bench pool every request of every round before
taking percentiles. hey's CSV leaves out transport errors, so the bench compares the
rows with the upstream's own request count instead (see ``run.py``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


class LoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoadResult:
    """One load run: completed requests and their latencies (milliseconds)."""

    ok: int
    non_2xx: int
    errors: int | None  # None when the generator does not report transport errors (hey)
    duration_s: float
    latencies_ms: tuple[float, ...] = field(repr=False)

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0


def percentile(sorted_values: list[float] | tuple[float, ...], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def parse_hey_csv(text: str, *, errors: int | None = None) -> LoadResult:
    """Parse ``hey -o csv`` output; columns are looked up by name, not position."""
    rows = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    latencies: list[float] = []
    ok = non_2xx = 0
    end = 0.0
    start = math.inf
    for row in rows:
        if not row:
            continue
        if header is None:
            if "response-time" in row:
                header = [column.strip() for column in row]
            continue  # anything before the header (warnings) is not data
        try:
            values = dict(zip(header, row, strict=True))
            response_time = float(values["response-time"])
            offset = float(values["offset"])
            status = int(values["status-code"])
        except (ValueError, KeyError):
            continue
        start = min(start, offset)
        end = max(end, offset + response_time)
        if 200 <= status < 300:
            ok += 1
            latencies.append(response_time * 1000.0)
        else:
            non_2xx += 1
    if header is None:
        raise LoadError("load generator printed no CSV header; output was:\n" + text[-2000:])
    duration = end - start if latencies or non_2xx else 0.0
    latencies.sort()
    return LoadResult(
        ok=ok,
        non_2xx=non_2xx,
        errors=errors,
        duration_s=duration,
        latencies_ms=tuple(latencies),
    )


def hey_path() -> str | None:
    return shutil.which("hey")


def run_load(
    generator: str,
    *,
    proxy_url: str,
    url: str,
    concurrency: int,
    duration_s: float | None = None,
    requests: int | None = None,
    timeout_s: int = 10,
) -> LoadResult:
    """Run ``generator`` ("hey" or "python") once through ``proxy_url`` against ``url``."""
    if (duration_s is None) == (requests is None):
        raise ValueError("give exactly one of duration_s and requests")
    if generator == "hey":
        hey = hey_path()
        if hey is None:
            raise LoadError("hey is not installed")
        command = [hey, "-x", proxy_url, "-c", str(concurrency), "-t", str(timeout_s)]
        command += ["-o", "csv", "-disable-compression"]
    elif generator == "python":
        command = [sys.executable, str(BENCH_DIR / "pyload.py"), "-x", proxy_url]
        command += ["-c", str(concurrency), "-t", str(timeout_s)]
    else:
        raise ValueError(f"unknown load generator {generator!r}")
    if duration_s is not None:
        command += ["-z", f"{duration_s:g}s"]
    else:
        command += ["-n", str(max(requests or 0, concurrency))]
    command.append(url)
    budget = (duration_s or 30.0) + timeout_s + 30.0
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=budget, check=False)
    except subprocess.TimeoutExpired:
        raise LoadError(f"{generator} did not finish within {budget:.0f}s") from None
    if proc.returncode != 0:
        raise LoadError(f"{generator} exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    errors: int | None = None
    if generator == "python":
        # pyload reports transport errors as one JSON line on stderr (hey's CSV cannot).
        for line in proc.stderr.splitlines():
            try:
                errors = int(json.loads(line)["errors"])
            except (ValueError, KeyError, TypeError):
                continue
    return parse_hey_csv(proc.stdout, errors=errors)

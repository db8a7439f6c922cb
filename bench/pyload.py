"""Fallback load generator for when ``hey`` is unavailable: a subset of hey in asyncio.

``python bench/pyload.py -x http://PROXY -c C (-z 5s | -n N) [-t SECONDS] https://HOST:PORT/PATH``

Like hey it opens C keep-alive connections through the proxy (CONNECT, then TLS without
certificate verification), sends GETs back to back on each, and prints hey's CSV
(``-o csv``) on stdout, so the bench parses both the same way. Unlike hey it also
prints ``{"errors": N}`` on stderr (transport errors; a failed connection is reopened).
Being single-threaded Python it saturates sooner than hey, so its absolute figures are
lower; it is only meant to keep ``make bench`` usable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Tally:
    rows: list[tuple[float, int, float]] = field(default_factory=list)  # latency, status, offset
    errors: int = 0


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for suffix in ("ms", "s", "m"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def open_tunnel(
    proxy_host: str, proxy_port: int, host: str, port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(proxy_host, proxy_port)
    writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    status, _ = await read_head(reader)
    if status != 200:
        writer.close()
        raise ConnectionError(f"CONNECT answered {status}")
    await writer.start_tls(context, server_hostname=host)
    return reader, writer


async def worker(
    args: argparse.Namespace,
    target: tuple[str, int, str],
    context: ssl.SSLContext,
    tally: Tally,
    start: float,
    deadline: float,
    budget: list[int],
) -> None:
    proxy = urlsplit(args.proxy)
    host, port, path = target
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: tokenferry-bench\r\n\r\n"
    ).encode()
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    while time.monotonic() < deadline and budget[0] != 0:
        budget[0] -= 1
        began = time.monotonic()
        try:
            async with asyncio.timeout(args.timeout):
                if writer is None or reader is None:
                    reader, writer = await open_tunnel(
                        proxy.hostname or "127.0.0.1", proxy.port or 80, host, port, context
                    )
                writer.write(request)
                status, headers = await read_head(reader)
                await reader.readexactly(int(headers.get("content-length", "0")))
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    writer = reader = None
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
            tally.errors += 1
            if writer is not None:
                writer.close()
            writer = reader = None
            continue
        tally.rows.append((time.monotonic() - began, status, began - start))
    if writer is not None:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def main_async(args: argparse.Namespace) -> Tally:
    url = urlsplit(args.url)
    if url.scheme != "https" or url.hostname is None:
        raise SystemExit("pyload: only https://HOST[:PORT]/PATH URLs are supported")
    target = (url.hostname, url.port or 443, url.path or "/")
    # Like hey: the bench measures the proxy, not certificate checks in the client.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tally = Tally()
    start = time.monotonic()
    duration = parse_duration(args.duration) if args.duration else 3600.0
    budget = [args.requests if not args.duration else -1]
    await asyncio.gather(
        *(
            worker(args, target, context, tally, start, start + duration, budget)
            for _ in range(args.concurrency)
        )
    )
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description="hey-compatible HTTPS load through a proxy")
    parser.add_argument("-x", dest="proxy", required=True, help="http://HOST:PORT")
    parser.add_argument("-c", dest="concurrency", type=int, default=8)
    parser.add_argument("-n", dest="requests", type=int, default=200)
    parser.add_argument("-z", dest="duration", default=None, help="e.g. 5s")
    parser.add_argument("-t", dest="timeout", type=float, default=10.0)
    parser.add_argument("url")
    args = parser.parse_args()
    tally = asyncio.run(main_async(args))
    out = sys.stdout
    out.write(
        "response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,"
        "status-code,offset\n"
    )
    for latency, status, offset in tally.rows:
        out.write(f"{latency:.6f},0,0,0,{latency:.6f},0,{status},{offset:.6f}\n")
    print(json.dumps({"errors": tally.errors}), file=sys.stderr)


if __name__ == "__main__":
    main()

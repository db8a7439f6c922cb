"""A minimal, fast HTTPS/1.1 upstream for the bench: answers every request with 200.

It accepts any request, with or without a token, so the same server can sit behind bare
mitmdump, the injecting proxy and the passthrough tunnel. It listens on several ports
(one process, same code) so a route can target one port while another is reached
through the raw tunnel. ``GET /_stats`` (sent directly, not through a proxy) returns
per-port counts of requests and of requests that carried ``Authorization: Bearer``,
which is how the bench proves that (b) injected on every request and (a)/(c) never did.

Run: ``python bench/upstream.py --cert F --key F [--listeners N]``; prints one JSON
ready line ``{"event": "ready", "service": "bench-upstream", "ports": [...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import ssl
from dataclasses import dataclass

MAX_HEAD = 65536


@dataclass
class PortStats:
    requests: int = 0
    bearer: int = 0


class Http11(asyncio.Protocol):
    """Keep-alive HTTP/1.1: parse request heads, skip bodies, answer a small JSON body."""

    def __init__(self, stats: dict[int, PortStats]) -> None:
        self._stats = stats
        self._port = 0
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # Count per listening port: the local port of the accepted connection.
        self._port = int(transport.get_extra_info("sockname")[1])

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while self._transport is not None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    self._transport.close()
                return
            head = bytes(self._buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            request_line = lines[0].split(" ")
            path = request_line[1] if len(request_line) > 1 else "/"
            length = 0
            bearer = False
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip() or 0)
                elif name == "authorization":
                    bearer = value.strip().lower().startswith("bearer ")
                elif name == "connection":
                    close = value.strip().lower() == "close"
            total = end + 4 + length
            if len(self._buf) < total:
                return
            del self._buf[:total]
            self._respond(path, bearer, close)

    def _respond(self, path: str, bearer: bool, close: bool) -> None:
        assert self._transport is not None
        if path == "/_stats":
            body = json.dumps(
                {str(port): vars(stats) for port, stats in self._stats.items()}
            ).encode()
        else:
            stats = self._stats[self._port]
            stats.requests += 1
            stats.bearer += bearer
            body = b'{"ok":true,"bearer":true}' if bearer else b'{"ok":true,"bearer":false}'
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
        )
        self._transport.write(head.encode() + body)
        if close:
            self._transport.close()
            self._transport = None


async def serve(cert: str, key: str, listeners: int) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    loop = asyncio.get_running_loop()
    stats: dict[int, PortStats] = {}
    servers: list[asyncio.Server] = []
    for _ in range(listeners):
        server = await loop.create_server(
            lambda: Http11(stats),
            "127.0.0.1",
            0,
            ssl=context,
            backlog=1024,
        )
        port = int(server.sockets[0].getsockname()[1])
        stats[port] = PortStats()
        servers.append(server)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        json.dumps({"event": "ready", "service": "bench-upstream", "ports": list(stats)}),
        flush=True,
    )
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--listeners", type=int, default=2)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.cert, args.key, args.listeners))


if __name__ == "__main__":
    main()

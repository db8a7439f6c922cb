"""Run an aiohttp app for a dev stand-in: bind, announce the ready line, stop on a signal."""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:0`` for IPv6) → (host, port); ValueError with the reason."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"listen address {value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"listen address {value!r} has a non-numeric port") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"listen address {value!r} has a port outside 0-65535")
    return host, port


def url_host(host: str) -> str:
    """The host as it appears in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    on_bound: Callable[[int], Awaitable[None] | None],
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; ``on_bound(actual_port)`` runs once listening."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_port = int(runner.addresses[0][1])
        result = on_bound(bound_port)
        if result is not None:
            await result
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()

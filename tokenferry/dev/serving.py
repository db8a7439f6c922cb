"""Run an aiohttp app for a dev stand-in: bind, announce the ready line, stop on a signal."""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from tokenferry.service import parse_listen, url_host

__all__ = ["parse_listen", "serve", "url_host"]


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

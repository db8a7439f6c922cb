"""Helpers for the captured flows in ``tests/flows``: recording, scrubbing, replaying.

- ``RecordingProxy``: an in-process mitmproxy in *upstream* mode in front of
  ``tokenferry proxy``. It sits where the sandbox's egress is and records what the
  sandbox actually sends (its own ``Authorization`` header included) and what comes back.
- ``scrub_flow`` / ``credential_findings``: recorded files must hold no credential value.
- ``HeaderTap``: a TLS byte pump in front of a dev upstream that records the raw header
  fields of every request the proxy forwards, duplicates and spelling kept (the dev
  upstream only echoes a *set* of header names, which cannot show a duplicate).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
from mitmproxy import addons as mitm_addons
from mitmproxy import ctx, http, io, master, options

# Values the recorder puts where a credential was. Neither contains "Bearer", so a
# committed file holding "Bearer <anything>" is a leak, whatever follows.
REDACTED = "[redacted by tokenferry recorder]"
REDACTED_JWT = b"[redacted jwt]"

# Headers whose values are credentials whoever set them.
CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key")

_JWT_BYTES = re.compile(rb"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_JWT_PREFIX = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}")
_BEARER = re.compile(rb"bearer\s+\S", re.IGNORECASE)


# --- scrubbing ----------------------------------------------------------------------------------


def _scrub_headers(headers: http.Headers) -> None:
    for name in CREDENTIAL_HEADERS:
        if name in headers:
            # Keep the field (replay must know the sandbox sent one), never its value.
            headers[name] = REDACTED
    # Field by field, so repeated fields stay separate and in order.
    fields: Any = headers.fields
    headers.fields = tuple((name, _JWT_BYTES.sub(REDACTED_JWT, value)) for name, value in fields)


def _scrub_message(message: http.Message) -> None:
    _scrub_headers(message.headers)
    content = message.get_content(strict=False)
    if content:
        cleaned = _JWT_BYTES.sub(REDACTED_JWT, content)
        if cleaned != content:
            message.content = cleaned


def scrub_flow(flow: http.HTTPFlow) -> None:
    """Remove every credential value from a recorded flow, in place.

    The recorder sits in front of the proxy, so the injected token never reaches it; this
    is defence in depth against a sandbox-supplied credential, an upstream echoing a
    token, or a later change of the recording set-up.
    """
    request = flow.request
    request.path = _JWT_BYTES.sub(REDACTED_JWT, request.path.encode()).decode()
    _scrub_message(request)
    if flow.response is not None:
        _scrub_message(flow.response)
    if flow.websocket is not None:
        for message in flow.websocket.messages:
            message.content = _JWT_BYTES.sub(REDACTED_JWT, message.content)
    flow.metadata.clear()
    flow.comment = ""


def credential_findings(data: bytes) -> list[str]:
    """What in a flow file looks like a credential (empty list: nothing)."""
    findings = [f"JWT-looking value at byte {m.start()}" for m in _JWT_PREFIX.finditer(data)]
    findings += [f"Bearer value at byte {m.start()}" for m in _BEARER.finditer(data)]
    return findings


# --- reading flow files -------------------------------------------------------------------------


def read_flows(path: Path) -> list[http.HTTPFlow]:
    with path.open("rb") as f:
        flows = list(io.FlowReader(f).stream())
    http_flows = [flow for flow in flows if isinstance(flow, http.HTTPFlow)]
    if len(http_flows) != len(flows):
        raise ValueError(f"{path}: holds flows that are not HTTP flows")
    return http_flows


def write_flows(path: Path, flows: Iterable[http.HTTPFlow]) -> None:
    with path.open("wb") as f:
        make_writer: Any = io.FlowWriter  # untyped in mitmproxy
        writer = make_writer(f)
        for flow in flows:
            writer.add(flow)


@dataclass(frozen=True)
class SseEvent:
    fields: dict[str, str]


def parse_sse(body: str) -> list[SseEvent]:
    """Events of a ``text/event-stream`` body (field name -> value; comments ignored)."""
    events: list[SseEvent] = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if fields:
            events.append(SseEvent(fields))
    return events


# --- the recording proxy ------------------------------------------------------------------------


class _Collector:
    """Keeps finished flows (the ``save`` addon's timing: WebSockets when they end)."""

    def __init__(self) -> None:
        self.flows: list[http.HTTPFlow] = []
        self.port = 0
        self.listening = threading.Event()
        self._changed = threading.Condition()

    def running(self) -> None:
        manager: Any = ctx.master.addons
        addrs = manager.get("proxyserver").listen_addrs()
        if addrs:
            self.port = int(addrs[0][1])
        self.listening.set()

    def _add(self, flow: http.HTTPFlow) -> None:
        with self._changed:
            self.flows.append(flow)
            self._changed.notify_all()

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self._add(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._add(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self._add(flow)

    def take(self, count: int, timeout: float) -> list[http.HTTPFlow]:
        """Wait until ``count`` flows finished, then hand them over (and forget them)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.flows) >= count, timeout):
                raise TimeoutError(f"expected {count} finished flows, have {len(self.flows)}")
            taken, self.flows = self.flows, []
        return taken


class RecordingProxy:
    """mitmproxy (in this process, own thread) chained in front of ``tokenferry proxy``."""

    def __init__(self, confdir: Path, upstream_proxy_url: str, upstream_proxy_ca: Path) -> None:
        self.confdir = confdir
        self.upstream_proxy_url = upstream_proxy_url
        self.upstream_proxy_ca = upstream_proxy_ca
        self.collector = _Collector()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._master: master.Master | None = None
        self._thread = threading.Thread(target=self._run, name="recording-proxy", daemon=True)
        self._failure: BaseException | None = None

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.collector.port}"

    @property
    def ca_file(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def _run(self) -> None:
        async def main() -> None:
            opts = options.Options(
                mode=[f"upstream:{self.upstream_proxy_url}"],
                listen_host="127.0.0.1",
                listen_port=0,
                confdir=str(self.confdir),
            )
            m = master.Master(opts)
            self._loop = asyncio.get_running_loop()
            self._master = m
            manager: Any = m.addons
            default_addons: Any = mitm_addons.default_addons
            manager.add(*default_addons())
            manager.add(self.collector)
            option_manager: Any = opts
            # The recorder talks TLS to tokenferry's interception: trust tokenferry's CA.
            option_manager.update(ssl_verify_upstream_trusted_ca=str(self.upstream_proxy_ca))
            await m.run()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by start()/stop(), never swallowed
            self._failure = exc
            self.collector.listening.set()

    def start(self, timeout: float = 30.0) -> RecordingProxy:
        self._thread.start()
        if not self.collector.listening.wait(timeout) or self._failure or not self.collector.port:
            raise RuntimeError(f"recording proxy did not start: {self._failure!r}")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self._loop is not None and self._master is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._master.shutdown)
        self._thread.join(timeout)


# --- the header tap -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TappedRequest:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _RequestObserver:
    """Parses the proxy->upstream byte stream just enough to see each request's headers."""

    def __init__(self, tap: HeaderTap) -> None:
        self.tap = tap
        self.conn = h11.Connection(h11.SERVER)
        self.active = True

    def feed(self, data: bytes) -> None:
        if not self.active:
            return
        try:
            self.conn.receive_data(data)
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    if event is h11.PAUSED:
                        self.active = False
                    return
                if isinstance(event, h11.Request):
                    headers = tuple(
                        (k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in event.headers.raw_items()
                    )
                    self.tap.record(
                        TappedRequest(
                            event.method.decode(), event.target.decode("latin-1"), headers
                        )
                    )
                    if any(k.lower() == b"upgrade" for k, _ in event.headers.raw_items()):
                        # Bytes after an upgrade are WebSocket frames, not HTTP.
                        self.active = False
                        return
                elif isinstance(event, h11.EndOfMessage):
                    # h11 only parses the next request once "we" answered this one; the
                    # real answer comes from the upstream, so answer h11 with a stand-in.
                    self.conn.send(h11.Response(status_code=204, headers=[]))
                    self.conn.send(h11.EndOfMessage())
                    self.conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    self.active = False
                    return
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
            self.active = False
            self.tap.parse_errors.append(str(exc))


class HeaderTap:
    """TLS in (the loopback server certificate of the dev stack), TLS out to the upstream."""

    def __init__(
        self, upstream_host: str, upstream_port: int, *, cert: Path, key: Path, ca: Path
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_context.load_cert_chain(str(cert), str(key))
        self.server_context.set_alpn_protocols(["http/1.1"])
        self.client_context = ssl.create_default_context(cafile=str(ca))
        self.client_context.set_alpn_protocols(["http/1.1"])
        self.requests: list[TappedRequest] = []
        self.parse_errors: list[str] = []
        self.port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="header-tap", daemon=True)

    def record(self, request: TappedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def snapshot(self) -> int:
        with self._lock:
            return len(self.requests)

    def since(self, mark: int) -> list[TappedRequest]:
        with self._lock:
            return self.requests[mark:]

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        observer: _RequestObserver | None,
    ) -> None:
        while data := await reader.read(65536):
            if observer is not None:
                observer.feed(data)  # recorded before the upstream can see it
            writer.write(data)
            await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                *self.upstream, ssl=self.client_context, server_hostname=self.upstream[0]
            )
        except OSError:
            writer.close()
            return
        tasks = [
            asyncio.create_task(self._pump(reader, up_writer, _RequestObserver(self))),
            asyncio.create_task(self._pump(up_reader, writer, None)),
        ]
        # TLS cannot half-close: when either side is done, the connection is.
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (writer, up_writer):
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            server = await asyncio.start_server(
                self._handle, "127.0.0.1", 0, ssl=self.server_context
            )
            self.port = int(server.sockets[0].getsockname()[1])
            self._listening.set()
            async with server:
                await self._stopping.wait()

        try:
            asyncio.run(main())
        finally:
            self._listening.set()

    def start(self, timeout: float = 10.0) -> HeaderTap:
        self._thread.start()
        if not self._listening.wait(timeout) or not self.port:
            raise RuntimeError("header tap did not start")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout)

"""Match, obtain, inject; fail closed.

For a request whose actual destination matches a route (``proxy.routes``): refuse a
``Host`` header naming another host (421), obtain the route's token (``proxy.grants``),
remove every header with the credential's name (any case) and set it. When no token can
be obtained the request is not forwarded: 502 with a JSON body naming provider and
credential. Bodies are streamed both ways. An upstream 401 to a request that carried a
cached token drops that token from the cache.

Runs inside ``tokenferry proxy``, or standalone::

    mitmdump -s addons/inject.py --set tokenferry_profiles=DIR \\
        --set tokenferry_providers=FILE --set tokenferry_spiffe_socket=/run/spire.sock
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

from addons.audit import DECISION_KEY, Audit
from addons.passthrough import Passthrough
from proxy.config import ConfigError, load_file_config
from proxy.grants import GrantBroker, GrantError, GrantResult, IdentityOptions, open_broker
from proxy.routes import Route, strip_query
from proxy.supervisor import (
    Supervisor,
    error_body,
    host_header_mismatch,
    server_name_mismatch,
)
from tokenferry.service import announce_ready
from tokenferry.tokens import CacheKey

# mitmproxy's exception classes are untyped; this is the one we raise from configure().
OptionsError: Any = exceptions.OptionsError

logger = logging.getLogger("tokenferry.proxy")

REDACTED = "[redacted by tokenferry]"
_REDACTED_RAW = REDACTED.encode()


class _Injected:
    """What we need after the response: never stored in flow.metadata (that is saved).

    A plain class, not a dataclass: mitmproxy loads this file as a script without
    registering it in ``sys.modules``, which dataclasses need.
    """

    __slots__ = ("header_name", "key", "value")

    def __init__(self, key: CacheKey, value: str, header_name: str) -> None:
        self.key = key
        self.value = value
        self.header_name = header_name

    def __repr__(self) -> str:
        return f"_Injected(header_name={self.header_name!r})"


# Attribute on the flow object itself: not part of the flow's serialised state, so it
# never reaches a saved flow file, and it goes away with the flow (no registry to leak).
_INJECTED_ATTR = "_tokenferry_injected"


def _respond(flow: http.HTTPFlow, status: int, body: bytes) -> None:
    flow.response = http.Response.make(status, body, {"Content-Type": "application/json"})


def _replace_header(headers: http.Headers, name: str, value: str) -> None:
    # Every field with this name, in any spelling, goes, so a sandbox-supplied value is
    # never forwarded beside ours; ours is appended. One pass over the raw fields (what
    # ``del headers[name]; headers[name] = value`` does in four).
    raw_name = name.encode("utf-8", "surrogateescape")
    lowered = raw_name.lower()
    kept = tuple(field for field in headers.fields if field[0].lower() != lowered)
    headers.fields = (*kept, (raw_name, value.encode("utf-8", "surrogateescape")))


def _redact_header(headers: http.Headers, name: str) -> None:
    # What ``headers[name] = REDACTED`` does when the header is present (the first field
    # of that name, any spelling, gets the placeholder; any others go), in one pass
    # over the raw fields instead of four.
    lowered = name.encode("utf-8", "surrogateescape").lower()
    fields: list[tuple[bytes, bytes]] = []
    redacted = False
    for field in headers.fields:
        if field[0].lower() != lowered:
            fields.append(field)
        elif not redacted:
            fields.append((field[0], _REDACTED_RAW))
            redacted = True
    if redacted:
        headers.fields = tuple(fields)


def _fail_internal(flow: http.HTTPFlow) -> None:
    # A bug must not turn into forwarding (possibly with the sandbox's own header on a
    # protected route): answer 502 like any other failure.
    logger.exception("injection failed unexpectedly")
    if hasattr(flow, _INJECTED_ATTR):
        delattr(flow, _INJECTED_ATTR)
    _respond(
        flow,
        502,
        error_body("credential_unavailable", None, None, "internal error in the proxy"),
    )


class Inject:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Decide and inject. Synchronous when the route's token is cached and needs no
        refresh (every request but the first and a refresh's): only when the token has
        to be fetched does this return a coroutine, which mitmproxy awaits (its addon
        manager awaits whatever awaitable a hook returns)."""
        if flow.response or flow.error or not flow.live:
            return None
        try:
            return self._decide(flow)
        except Exception:
            _fail_internal(flow)
            return None

    def _decide(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        request = flow.request
        path = strip_query(request.path)
        route = self.supervisor.table.lookup(request.host, request.port, path)
        decision: dict[str, Any] | None = None
        if route is not None:
            decision = {
                "provider": route.provider,
                "credential": route.credential,
                "host": request.host,
                "port": request.port,
                "method": request.method,
                "path": path,
                "cache": None,
                "grant_latency_ms": None,
            }
            flow.metadata[DECISION_KEY] = decision
        if route is None or not route.injects_for(request.scheme):
            if decision is not None:
                decision["outcome"] = "not_injected"
                decision["reason"] = (
                    f"{request.scheme} request on a tls: {route.tls} route" if route else None
                )
            request.stream = True
            return None
        assert decision is not None
        if (
            host_header_mismatch(request.host_header, request.host, request.port)
            or (
                # An absolute-form request line inside a CONNECT tunnel names a host too, and
                # the upstream must prefer it to Host (RFC 9112 §3.2.2): a token minted for
                # the destination would serve another virtual host.
                request.authority
                and host_header_mismatch(request.authority, request.host, request.port)
            )
            or server_name_mismatch(flow.client_conn.sni, request.host)
        ):
            decision["outcome"] = "misdirected"
            _respond(
                flow,
                421,
                error_body(
                    "misdirected_request",
                    route.provider,
                    route.credential,
                    "the Host header, request target or TLS server name does not name "
                    "the destination "
                    f"{request.host}:{request.port}; no credential was injected",
                ),
            )
            return None
        broker = self.supervisor.broker
        if broker is None:
            self._unavailable(
                flow, decision, route.provider, route.credential, "supervisor is starting"
            )
            return None
        result = broker.cached(route)
        if result is None:
            return self._obtain(flow, route, decision, broker)
        self._inject(flow, route, decision, result)
        return None

    async def _obtain(
        self, flow: http.HTTPFlow, route: Route, decision: dict[str, Any], broker: GrantBroker
    ) -> None:
        try:
            try:
                result = await broker.obtain(route)
            except GrantError as exc:
                self._unavailable(flow, decision, exc.provider, exc.credential, exc.detail)
                return
            self._inject(flow, route, decision, result)
        except Exception:
            _fail_internal(flow)

    @staticmethod
    def _unavailable(
        flow: http.HTTPFlow,
        decision: dict[str, Any],
        provider: str,
        credential: str,
        detail: str,
    ) -> None:
        decision["outcome"] = "credential_unavailable"
        decision["detail"] = detail
        _respond(flow, 502, error_body("credential_unavailable", provider, credential, detail))

    @staticmethod
    def _inject(
        flow: http.HTTPFlow, route: Route, decision: dict[str, Any], result: GrantResult
    ) -> None:
        request = flow.request
        decision["cache"] = str(result.outcome)
        decision["grant_latency_ms"] = round(result.latency * 1000, 3)
        decision["outcome"] = "injected"
        _replace_header(request.headers, route.header_name, route.header_value(result.token.value))
        setattr(flow, _INJECTED_ATTR, _Injected(result.key, result.token.value, route.header_name))
        request.stream = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        # Stream every response: SSE and large downloads must not wait for the end.
        flow.response.stream = True
        injected = self._finish(flow)
        if injected is not None and flow.response.status_code == 401:
            broker = self.supervisor.broker
            evicted = broker is not None and broker.evict_token(injected.key, injected.value)
            decision = flow.metadata.get(DECISION_KEY)
            if isinstance(decision, dict):
                decision["evicted"] = evicted

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        # mitmproxy appends every message to the flow; on a long-lived connection that
        # is unbounded memory. Keep only the current one (hooks after ours may read
        # messages[-1]) unless the user asked mitmproxy to save flows.
        saving = "save_stream_file" in ctx.options and ctx.options.save_stream_file
        if flow.websocket is not None and not saving:
            del flow.websocket.messages[:-1]

    def _finish(self, flow: http.HTTPFlow) -> _Injected | None:
        """The request has left: redact our header so a saved flow never holds it."""
        injected: _Injected | None = getattr(flow, _INJECTED_ATTR, None)
        if injected is None:
            return None
        delattr(flow, _INJECTED_ATTR)
        _redact_header(flow.request.headers, injected.header_name)
        return injected


def _announce_ready(confdir: str) -> None:
    addon_manager: Any = ctx.master.addons
    addrs = addon_manager.get("proxyserver").listen_addrs()
    if addrs:
        host, port = addrs[0][0], addrs[0][1]
        ca_file = os.path.join(os.path.expanduser(confdir), "mitmproxy-ca-cert.pem")
        announce_ready("proxy", proxy_url=f"http://{host}:{port}", ca_file=ca_file)


class LocalConfig:
    """Options for running the addons under ``mitmdump -s`` with local files.

    ``tokenferry proxy`` does the same from its command line (and validates first).
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def load(self, loader: Any) -> None:
        loader.add_option("tokenferry_profiles", str, "", "Directory of provider profiles.")
        loader.add_option("tokenferry_providers", str, "", "Providers file (YAML).")
        loader.add_option("tokenferry_sandbox", str, "", "Sandbox name for log lines.")
        loader.add_option(
            "tokenferry_spiffe_socket", str, "", "SPIFFE Workload API socket (unix:/path)."
        )
        loader.add_option("tokenferry_svid_dir", str, "", "Directory of JWT-SVID files.")
        loader.add_option("tokenferry_bundle_file", str, "", "JWT bundle (JWKS) file.")
        loader.add_option(
            "tokenferry_svid_reuse", bool, True, "Reuse a JWT-SVID until half its life."
        )
        loader.add_option(
            "tokenferry_ready_line",
            bool,
            False,
            'Print {"event": "ready", ...} with the proxy URL on stdout once listening.',
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "tokenferry_sandbox" in updated:
            self.supervisor.sandbox_override = opts.tokenferry_sandbox or None
        if {"tokenferry_profiles", "tokenferry_providers"} & updated:
            if bool(opts.tokenferry_profiles) != bool(opts.tokenferry_providers):
                raise OptionsError(
                    "tokenferry_profiles and tokenferry_providers must be set together"
                )
            if opts.tokenferry_profiles:
                try:
                    config = load_file_config(
                        Path(opts.tokenferry_profiles), Path(opts.tokenferry_providers)
                    )
                except ConfigError as exc:
                    raise OptionsError(str(exc)) from None
                self.supervisor.apply(config)

    async def running(self) -> None:
        if self.supervisor.broker is not None:
            return
        opts = ctx.options
        try:
            self.supervisor.broker = open_broker(
                IdentityOptions(
                    spiffe_socket=opts.tokenferry_spiffe_socket or None,
                    svid_dir=opts.tokenferry_svid_dir or None,
                    bundle_file=opts.tokenferry_bundle_file or None,
                    reuse_svids=opts.tokenferry_svid_reuse,
                ),
                self.supervisor.metrics,
            )
        except ValueError as exc:
            logger.error("cannot set up the SVID source: %s", exc)
        if opts.tokenferry_ready_line:
            _announce_ready(opts.confdir)

    async def done(self) -> None:
        await self.supervisor.aclose()


def standalone_addons() -> list[object]:
    """The addon chain for ``mitmdump -s addons/inject.py``, in hook order."""
    supervisor = Supervisor()
    return [LocalConfig(supervisor), Passthrough(supervisor), Inject(supervisor), Audit(supervisor)]


addons = standalone_addons()

"""No interception for hosts no credential targets; deny mode.

A TLS connection is intercepted only when its CONNECT target (the actual destination)
is targeted by some ``tls: terminate`` route; every other connection is tunnelled
untouched, so the client sees the upstream's own certificate. With
``tokenferry_deny_unmatched`` every request (and CONNECT) whose destination matches no
endpoint of any configured provider gets 403 with a JSON body instead.

In gateway mode, until the first configuration has arrived, every CONNECT and request is
answered 502 naming the gateway: without routes the proxy cannot tell a protected
destination from any other, and forwarding would send protected requests without their
token (fail closed).
"""

from __future__ import annotations

from typing import Any

from mitmproxy import ctx, http, tls

from addons.audit import DECISION_KEY
from proxy.routes import strip_query
from proxy.supervisor import Supervisor, error_body


def _deny(flow: http.HTTPFlow, host: str, port: int, path: str | None) -> None:
    flow.metadata[DECISION_KEY] = {
        "provider": None,
        "credential": None,
        "host": host,
        "port": port,
        "method": flow.request.method,
        "path": path,
        "cache": None,
        "grant_latency_ms": None,
        "outcome": "denied",
    }
    flow.response = http.Response.make(
        403,
        error_body(
            "destination_not_allowed",
            None,
            None,
            f"{host}:{port} matches no endpoint of this sandbox's providers "
            "(the proxy runs with --deny-unmatched)",
        ),
        {"Content-Type": "application/json"},
    )


def _unconfigured(flow: http.HTTPFlow, host: str, port: int, path: str | None, why: str) -> None:
    flow.metadata[DECISION_KEY] = {
        "provider": None,
        "credential": None,
        "host": host,
        "port": port,
        "method": flow.request.method,
        "path": path,
        "cache": None,
        "grant_latency_ms": None,
        "outcome": "unconfigured",
    }
    flow.response = http.Response.make(
        502,
        error_body("configuration_unavailable", None, None, why),
        {"Content-Type": "application/json"},
    )


class Passthrough:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.deny_unmatched = False

    def load(self, loader: Any) -> None:
        loader.add_option(
            "tokenferry_deny_unmatched",
            bool,
            False,
            "Refuse (403) requests whose destination matches no provider endpoint.",
        )

    def configure(self, updated: set[str]) -> None:
        if "tokenferry_deny_unmatched" in updated:
            self.deny_unmatched = ctx.options.tokenferry_deny_unmatched

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        address = data.context.server.address
        # Without a known destination there is nothing a route could match: tunnel.
        if address is None or not self.supervisor.table.terminates(address[0], address[1]):
            data.ignore_connection = True

    def http_connect(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        why = self.supervisor.unconfigured
        if why is not None:
            _unconfigured(flow, request.host, request.port, None, why)
            return
        if self.deny_unmatched and not self.supervisor.table.any_endpoint(
            request.host, request.port
        ):
            _deny(flow, request.host, request.port, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        request = flow.request
        why = self.supervisor.unconfigured
        if why is not None:
            _unconfigured(flow, request.host, request.port, strip_query(request.path), why)
            return
        if not self.deny_unmatched:
            return
        path = strip_query(request.path)
        if not self.supervisor.table.any_endpoint(request.host, request.port, path):
            _deny(flow, request.host, request.port, path)

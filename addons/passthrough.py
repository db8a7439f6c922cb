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


def _refuse(
    flow: http.HTTPFlow,
    status: int,
    error: str,
    outcome: str,
    path: str | None,
    detail: str,
) -> None:
    """Answer instead of forwarding, and record the decision for the audit line."""
    request = flow.request
    flow.metadata[DECISION_KEY] = {
        "provider": None,
        "credential": None,
        "host": request.host,
        "port": request.port,
        "method": request.method,
        "path": path,
        "cache": None,
        "grant_latency_ms": None,
        "outcome": outcome,
    }
    flow.response = http.Response.make(
        status, error_body(error, None, None, detail), {"Content-Type": "application/json"}
    )


def _deny(flow: http.HTTPFlow, path: str | None) -> None:
    request = flow.request
    _refuse(
        flow,
        403,
        "destination_not_allowed",
        "denied",
        path,
        f"{request.host}:{request.port} matches no endpoint of this sandbox's providers "
        "(the proxy runs with --deny-unmatched)",
    )


def _unconfigured(flow: http.HTTPFlow, path: str | None, why: str) -> None:
    _refuse(flow, 502, "configuration_unavailable", "unconfigured", path, why)


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
            _unconfigured(flow, None, why)
            return
        if self.deny_unmatched and not self.supervisor.table.any_endpoint(
            request.host, request.port
        ):
            _deny(flow, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        request = flow.request
        why = self.supervisor.unconfigured
        if why is not None:
            _unconfigured(flow, strip_query(request.path), why)
            return
        if not self.deny_unmatched:
            return
        path = strip_query(request.path)
        if not self.supervisor.table.any_endpoint(request.host, request.port, path):
            _deny(flow, path)

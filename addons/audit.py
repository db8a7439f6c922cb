"""Decision log lines and metrics.

One JSON line per request on a matched route (and per refused request in deny mode):
time, sandbox, provider, credential, host, port, method, path without query, cache
outcome, grant latency, outcome. The decision record is built by the other addons in
``flow.metadata`` and holds no secret: no token, no header value, no query string.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import http

from proxy.supervisor import Supervisor

DECISION_KEY = "tokenferry"
decision_logger = logging.getLogger("tokenferry.decision")


class Audit:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def _log(self, flow: http.HTTPFlow) -> None:
        decision: dict[str, Any] | None = flow.metadata.get(DECISION_KEY)
        if decision is None or decision.get("logged"):
            return
        decision["logged"] = True
        fields = {k: v for k, v in decision.items() if k not in ("logged", "evicted")}
        fields["sandbox"] = self.supervisor.sandbox
        outcome = str(decision.get("outcome"))
        if decision.get("provider") is not None:
            self.supervisor.metrics.grants.labels(
                decision["provider"], decision["credential"], outcome
            ).inc()
        level = logging.INFO if outcome in ("injected", "not_injected") else logging.WARNING
        decision_logger.log(level, "decision", extra=fields)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        decision: dict[str, Any] | None = flow.metadata.get(DECISION_KEY)
        if decision is not None and "evicted" in decision and flow.response is not None:
            decision_logger.warning(
                "upstream rejected the injected token",
                extra={
                    "sandbox": self.supervisor.sandbox,
                    "provider": decision.get("provider"),
                    "credential": decision.get("credential"),
                    "host": decision.get("host"),
                    "port": decision.get("port"),
                    "path": decision.get("path"),
                    "status": flow.response.status_code,
                    "outcome": "token_evicted" if decision["evicted"] else "token_rejected",
                },
            )

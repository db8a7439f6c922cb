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
from mitmproxy import log as mitmproxy_log

from proxy.supervisor import Supervisor

DECISION_KEY = "tokenferry"
decision_logger = logging.getLogger("tokenferry.decision")


def _not_a_decision(record: logging.LogRecord) -> bool:
    return record.name != decision_logger.name


def keep_decisions_out_of_add_log() -> None:
    """Decision lines bypass mitmproxy's deprecated ``add_log`` hook.

    mitmproxy's master puts a ``LegacyLogEvents`` handler on the root logger that turns
    every record into an ``add_log`` event: formatted once more, scheduled on the event
    loop (waking it through its self-pipe) and dispatched to every addon of the chain.
    For one line per request that was the largest part of what tokenferry added to a
    request (profiled: about 0.3 ms CPU of 0.5 ms). The lines still reach every other
    handler (the JSON lines on stderr, mitmdump's terminal log); only addons still using
    the deprecated hook (none of ours or mitmproxy's defaults) no longer see them.
    """
    for handler in logging.getLogger().handlers:
        if isinstance(handler, mitmproxy_log.LegacyLogEvents):
            handler.addFilter(_not_a_decision)  # no-op when already there


class Audit:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def load(self, loader: Any) -> None:
        # The master installs its handler before any addon is added.
        keep_decisions_out_of_add_log()

    def _log(self, flow: http.HTTPFlow) -> None:
        decision: dict[str, Any] | None = flow.metadata.get(DECISION_KEY)
        if decision is None or decision.get("logged"):
            return
        decision["logged"] = True
        fields = {k: v for k, v in decision.items() if k not in ("logged", "evicted")}
        fields["sandbox"] = self.supervisor.sandbox
        outcome = str(decision.get("outcome"))
        if decision.get("provider") is not None:
            self.supervisor.metrics.grant_decision(
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

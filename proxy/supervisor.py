"""The state the addons share: current route table, grant broker, metrics, sandbox name.

Built by ``proxy.runner`` (``tokenferry proxy``) or by the options addon when the addons
run under ``mitmdump -s``. A new ``SupervisorConfig`` is applied by building a fresh route
table and swapping the reference, so a request always sees one consistent table.
"""

from __future__ import annotations

import json
import logging

from mitmproxy.net.http import url

from proxy.config import SupervisorConfig
from proxy.grants import GrantBroker
from proxy.metrics import ProxyMetrics
from proxy.routes import RouteTable, RouteTableRef, build_routes, normalise_host

logger = logging.getLogger("tokenferry.proxy")


class Supervisor:
    def __init__(self, metrics: ProxyMetrics | None = None) -> None:
        self.metrics = metrics or ProxyMetrics()
        self.routes = RouteTableRef()
        self.broker: GrantBroker | None = None
        self.sandbox: str | None = None
        self.sandbox_override: str | None = None  # --sandbox beats the config's name
        self.config: SupervisorConfig | None = None
        # Gateway mode before the first configuration arrived: why there is none yet.
        # While set, every request is answered 502 (we cannot tell protected
        # destinations from others, so nothing is forwarded).
        self.unconfigured: str | None = None

    @property
    def table(self) -> RouteTable:
        return self.routes.current

    def apply(self, config: SupervisorConfig) -> None:
        table = build_routes(p.as_route_source() for p in config.providers)
        self.config = config
        self.sandbox = self.sandbox_override or config.sandbox
        self.routes.swap(table)
        self.unconfigured = None
        self.metrics.routes.set(len(table))
        logger.info(
            "configuration applied",
            extra={
                "sandbox": self.sandbox,
                "spiffe_id": config.spiffe_id,
                "providers": [f"{p.name}@{p.revision}" for p in config.providers],
                "routes": len(table),
            },
        )

    def health(self) -> tuple[int, dict[str, object]]:
        """``/healthz``: 200 once configured, 503 while waiting for the first config."""
        if self.unconfigured is not None:
            return 503, {"status": "waiting_for_configuration", "detail": self.unconfigured}
        config = self.config
        return 200, {
            "status": "ok",
            "routes": len(self.table),
            "sandbox": self.sandbox,
            "providers": {p.name: p.revision for p in config.providers} if config else {},
        }

    async def aclose(self) -> None:
        if self.broker is not None:
            await self.broker.aclose()


# --- pure decisions the addons apply ---------------------------------------------------------


def host_header_mismatch(host_header: str | None, dest_host: str, dest_port: int) -> bool:
    """Does the Host header name another host than the actual destination?

    The destination (CONNECT target or absolute-form authority) decides which route and
    which token apply; a Host header naming another host could make a virtual-hosting
    upstream route our token to a service it was not minted for. A Host port, when
    given, must equal the destination port; an absent Host header names nothing.
    """
    if not host_header:
        return False
    # The usual case, a client naming exactly the host (and port) it connected to,
    # needs no parsing: parse_authority validates the host and costs several
    # microseconds per request. IPv6 literals take the full path.
    if ":" not in dest_host and (
        host_header == dest_host or host_header == f"{dest_host}:{dest_port}"
    ):
        return False
    try:
        host, port = url.parse_authority(host_header, check=False)
    except ValueError:
        return True
    if normalise_host(host) != normalise_host(dest_host):
        return True
    return port is not None and port != dest_port


def server_name_mismatch(sni: str | None, dest_host: str) -> bool:
    """Does the TLS server name (SNI) the sandbox sent name another host than the
    destination? mitmproxy passes it on to the upstream, and a front end that routes on
    SNI would hand our token to that name's service. No SNI (an IP literal) names nothing.
    """
    if not sni or sni == dest_host:
        return False
    return normalise_host(sni) != normalise_host(dest_host)


def error_body(error: str, provider: str | None, credential: str | None, detail: str) -> bytes:
    """The JSON body of every response the proxy makes up (502, 421, 403)."""
    return json.dumps(
        {"error": error, "provider": provider, "credential": credential, "detail": detail}
    ).encode()

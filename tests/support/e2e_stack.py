"""The whole system as real processes, for the end-to-end tests (``tests/integration/test_e2e_*``).

``start_e2e_stack(root)`` starts, on loopback with ephemeral ports:
- the gateway stack of ``tests.support.gateway_stack`` (dev SPIFFE agent for the gateway
  identity, dev IdP trusting its JWKS, the gateway on SQLite in dev mode),
- dev SPIFFE agents for sandbox identities (same key file, hence the same trust domain),
- dev upstreams over HTTPS (their own test CA) that verify IdP tokens and echo the claims,
- a TLS capture server (in the test process) that records what the proxy forwarded,
and starts ``tokenferry proxy --gateway URL`` subprocesses on demand.

Gateway records are created through the typed client as the dev admin. Helpers read the
gateway's and IdP's counters, the JSON the gateway serves a supervisor, and wait (bounded)
for the proxy to apply a configuration.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from gateway_client import CredentialInput, GatewayClient
from tests.support.gateway_stack import GatewayStack, sandbox_id, start_gateway_stack
from tests.support.procs import Service, start_service
from tests.support.stack import CaptureServer, metrics, port_of, prometheus
from tokenferry.svid import WorkloadApiSvidSource

EXCHANGE_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"


def run[R](coro: Coroutine[Any, Any, R]) -> R:
    return asyncio.run(coro)


def exchange_profile(
    profile_id: str,
    token_endpoint: str,
    *,
    audience: str,
    scopes: Sequence[str],
    endpoints: Sequence[Mapping[str, Any]],
    overrides: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A token_exchange profile: broker-only ``user_token`` feeds ``access_token``."""
    grant: dict[str, Any] = {
        "grant_type": "token_exchange",
        "token_endpoint": token_endpoint,
        "audience": audience,
        "scopes": list(scopes),
        "client_assertion_type": EXCHANGE_ASSERTION,
        "subject_token": {"source": "provider_credential", "credential": "user_token"},
    }
    if overrides:
        grant["audience_overrides"] = [dict(o) for o in overrides]
    return {
        "id": profile_id,
        "credentials": [
            {"name": "user_token", "description": "user token, gateway-only"},
            {"name": "access_token", "auth_style": "bearer", "token_grant": grant},
        ],
        "endpoints": [dict(e) for e in endpoints],
    }


def _get_json(url: str, *, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_until(predicate: Callable[[], bool], *, timeout: float = 15.0, step: float = 0.1) -> bool:
    """Poll ``predicate`` (bounded in time and count); True once it holds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 1):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(step)
    return predicate()


@dataclass
class E2EStack:
    root: Path
    gw: GatewayStack
    services: list[Service]
    upstreams: dict[str, Service]
    tls_dir: Path
    capture: CaptureServer
    proxies: dict[str, Service] = field(default_factory=dict)
    # Never in a repr: a failing assertion must not print a token.
    user_tokens: list[str] = field(default_factory=list, repr=False)

    # --- addresses ----------------------------------------------------------------

    @property
    def upstream_ca(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def token_endpoint(self) -> str:
        return self.gw.token_endpoint

    def upstream_port(self, name: str) -> int:
        return port_of(self.upstreams[name].ready["url"])

    def upstream_url(self, name: str) -> str:
        return str(self.upstreams[name].ready["url"]).rstrip("/")

    # --- gateway records (as the dev admin) ------------------------------------------

    def user_token(self, sub: str = "alice", *, ttl: int = 600) -> str:
        token = self.gw.user_token(sub, ttl=ttl)
        self.user_tokens.append(token)
        return token

    def admin_call[R](self, action: Callable[[GatewayClient], Coroutine[Any, Any, R]]) -> R:
        async def go() -> R:
            async with self.gw.admin() as admin:
                return await action(admin)

        return run(go())

    def add_profile(self, profile: Mapping[str, Any]) -> None:
        self.admin_call(lambda a: a.create_profile(yaml.safe_dump(dict(profile))))

    def add_provider(self, name: str, profile: str, user_token: str) -> int:
        record = self.admin_call(
            lambda a: a.create_provider(name, profile, {"user_token": user_token})
        )
        return record.revision

    def set_subject_token(self, provider: str, value: str | CredentialInput) -> int:
        """Store a new subject token (bumps the provider's revision); the new revision."""
        record = self.admin_call(
            lambda a: a.update_provider(provider, credentials={"user_token": value})
        )
        return record.revision

    def add_sandbox(self, name: str, providers: Sequence[str]) -> None:
        self.gw.sandbox_agent(name)
        self.admin_call(lambda a: a.put_sandbox(name, sandbox_id(name), list(providers)))

    # --- the proxy ------------------------------------------------------------------

    def start_proxy(
        self, sandbox: str, *, name: str | None = None, poll_interval: float = 1.0
    ) -> Service:
        name = name or f"proxy-{sandbox}"
        agent = self.gw.sandbox_agent(sandbox)
        proxy = start_service(
            name,
            [
                "proxy",
                "--gateway",
                self.gw.url,
                "--config-poll-interval",
                str(poll_interval),
                "--spiffe-socket",
                str(agent.ready["socket"]),
                "--upstream-ca",
                str(self.upstream_ca),
                "--confdir",
                str(self.root / f"confdir-{name}"),
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            self.root / "logs",
        )
        self.services.append(proxy)
        self.proxies[name] = proxy
        return proxy

    @staticmethod
    def health(proxy: Service) -> tuple[int, Any]:
        return _get_json(f"{proxy.ready['admin_url']}/healthz")

    def wait_for_revision(self, proxy: Service, provider: str, revision: int) -> bool:
        """Until the proxy reports ``provider`` at ``revision`` (its /healthz)."""

        def applied() -> bool:
            status, body = self.health(proxy)
            return status == 200 and body["providers"].get(provider) == revision

        return wait_until(applied, timeout=15.0)

    @staticmethod
    def proxy_metrics(proxy: Service) -> dict[str, float]:
        return metrics(proxy)

    # --- observations -----------------------------------------------------------------

    def served_config_text(self, sandbox: str) -> str:
        """The raw JSON the gateway serves ``sandbox``'s supervisor."""
        agent = self.gw.sandbox_agent(sandbox)

        async def svid() -> str:
            source = WorkloadApiSvidSource(str(agent.ready["socket"]))
            try:
                async with GatewayClient(self.gw.url) as anonymous:
                    audience = (await anonymous.auth_config()).supervisor_audience
                return (await source.fetch_jwt_svid(audience)).token
            finally:
                await source.close()

        response = requests.get(
            f"{self.gw.url}/v1/supervisor/config",
            headers={"Authorization": f"Bearer {run(svid())}"},
            timeout=10,
        )
        response.raise_for_status()
        return response.text

    def broker_requests(self, outcome: str = "ok") -> float:
        samples = prometheus(f"{self.gw.admin_url}/metrics")
        return samples.get(f'tokenferry_gateway_broker_requests_total{{outcome="{outcome}"}}', 0.0)

    def idp_exchanges(self, policy: str) -> int:
        """Successful exchanges of ``policy`` (intermediate = leg 1, final = leg 2)."""
        return int(self.gw.idp_stats().get("by_policy", {}).get(policy, {}).get("ok", 0))

    def upstream_total(self, name: str) -> int:
        context = ssl.create_default_context(cafile=str(self.upstream_ca))
        _, body = _get_json(f"{self.upstream_url(name)}/dev/stats", context=context)
        return int(body["total"])

    def log_text(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted((self.root / "logs").glob("*.log"))
        )

    @staticmethod
    def leaked(tokens: Iterable[str], text: str) -> list[int]:
        """Indexes (never values) of the ``tokens`` that occur in ``text``."""
        return [i for i, token in enumerate(sorted(tokens)) if token in text]

    def restart_gateway_on_same_port(self) -> Service:
        """Stop the gateway and start it again: same database, key and port."""
        port = port_of(self.gw.url)
        self.gw.gateway.stop()
        self.gw.gateway = self.gw.start_gateway(
            self.gw.db_path, "gateway-again", "--listen", f"127.0.0.1:{port}"
        )
        return self.gw.gateway

    def stop(self) -> None:
        self.capture.stop()
        for service in reversed(self.services):
            service.stop()


def _start_upstreams(
    issuer: str, specs: Mapping[str, tuple[str, Sequence[str]]], tls_dir: Path, logs: Path
) -> dict[str, Service]:
    def launch(name: str) -> Service:
        audience, scopes = specs[name]
        args = ["dev", "upstream", "--listen", "127.0.0.1:0", "--issuer", issuer]
        args += ["--audience", audience, "--tls-self-signed", str(tls_dir)]
        for scope in scopes:
            args += ["--scope", scope]
        return start_service(f"upstream-{name}", args, logs)

    names = list(specs)
    # The first creates the shared test CA; the others start in parallel.
    started = {names[0]: launch(names[0])}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(launch, name) for name in names[1:]}
        for name, future in futures.items():
            started[name] = future.result()
    return started


def start_e2e_stack(root: Path, upstreams: Mapping[str, tuple[str, Sequence[str]]]) -> E2EStack:
    services: list[Service] = []
    try:
        gw = start_gateway_stack(root, services)
        tls_dir = root / "upstream-tls"
        ups = _start_upstreams(gw.issuer, upstreams, tls_dir, root / "logs")
        services.extend(ups.values())
        capture = CaptureServer((tls_dir / "server.pem", tls_dir / "server-key.pem"))
    except BaseException:
        for service in reversed(services):
            service.stop()
        raise
    return E2EStack(root, gw, services, ups, tls_dir, capture)

"""``tokenferry demo``: the whole system on this machine, with no set-up (SPEC §7).

Starts every piece as a real subprocess in a fresh temporary directory — two dev SPIFFE
agents sharing one trust domain (the gateway's and the sandbox supervisor's identity),
the dev IdP, the gateway on a SQLite file, two protected HTTPS dev upstreams and the
proxy in gateway mode — registers profiles, providers and the sandbox through the real
gateway API, then sends requests through the proxy as a sandbox would and prints what
each upstream verified: the user (``sub``), the sandbox (``azp``, ``act``), the audience
and scope, and how the proxy's token cache answered.

Every check the demo makes is also a pass/fail condition: any surprise exits non-zero
with the tail of the log of the service at fault. No token value is ever printed (the
upstreams echo *claims*; logs carry no tokens by design).

Processes are started with ``tokenferry.dev.processes`` (as the tests and the bench do):
``python -m tokenferry ARGS``, stdout read until the service's ready line, everything
else into a log file in the temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import ssl
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from rich.console import Console
from rich.text import Text

from tokenferry.dev import processes

TRUST_DOMAIN = "example.org"
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/gateway"
SANDBOX_NAME = "demo"
SANDBOX_ID = f"spiffe://{TRUST_DOMAIN}/sandbox/{SANDBOX_NAME}"
USER_AUDIENCE = "tokenferry"  # the dev IdP's default audience for user tokens
LOOPBACK = "127.0.0.1"

READY_TIMEOUT = 30.0  # per service; the slowest (the proxy) starts in a few seconds
DECISION_WAIT = 5.0  # the proxy logs a decision before forwarding; this is slack only

# Environment a service must not inherit from the person running the demo: their own
# proxy settings, gateway settings (every gateway flag has a TOKENFERRY_GATEWAY_*
# variable) or Workload API socket would change what the demo shows.
_SCRUBBED_PREFIXES = ("TOKENFERRY_",)
_SCRUBBED_NAMES = frozenset({*processes.PROXY_VARIABLES, "SPIFFE_ENDPOINT_SOCKET"})


class DemoError(Exception):
    """A step of the demo failed; ``service`` names the process whose log explains it."""

    def __init__(self, message: str, service: str | None = None) -> None:
        super().__init__(message)
        self.service = service


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop everything and clean up."""


# --- processes ------------------------------------------------------------------------


def service_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return processes.clean_environment(
        extra, remove=_SCRUBBED_NAMES, remove_prefixes=_SCRUBBED_PREFIXES
    )


class ServiceProcess(processes.ServiceProcess):
    """``python -m tokenferry ARGS`` as a child process of the demo, in its own process
    group (see ``tokenferry.dev.processes``), with failures reported as ``DemoError``."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        log_dir: Path,
        cwd: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        try:
            super().__init__(
                name,
                processes.tokenferry_command(*args),
                log_dir=log_dir,
                cwd=cwd,
                env=service_environment(env),
                process_group=True,
            )
        except OSError as exc:
            raise DemoError(f"cannot start {name}: {exc}") from None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        try:
            return super().wait_ready(timeout)
        except processes.StartFailed as exc:
            raise DemoError(str(exc), exc.service) from None


# --- what the demo shows -------------------------------------------------------------


@dataclass(frozen=True)
class Counters:
    """Exchange counters outside the proxy: the IdP's by policy, the gateway's broker."""

    idp_intermediate: int = 0
    idp_final: int = 0
    broker_ok: int = 0
    gateway_cache: Mapping[str, float] = field(default_factory=dict)

    def minus(self, before: Counters) -> Counters:
        return Counters(
            idp_intermediate=self.idp_intermediate - before.idp_intermediate,
            idp_final=self.idp_final - before.idp_final,
            broker_ok=self.broker_ok - before.broker_ok,
            gateway_cache={
                k: v - before.gateway_cache.get(k, 0.0)
                for k, v in self.gateway_cache.items()
                if v - before.gateway_cache.get(k, 0.0) > 0
            },
        )


@dataclass(frozen=True)
class Exchange:
    """One request the sandbox sends, and what the demo expects of it."""

    title: str
    url: str
    kind: str  # "token" | "passthrough" | "failure"
    audience: str | None = None
    scope: str | None = None
    cache: str | None = None  # expected proxy cache outcome


@dataclass(frozen=True)
class Outcome:
    exchange: Exchange
    status: int
    body: Any
    decision: Mapping[str, Any] | None
    counters: Counters

    @property
    def claims(self) -> Mapping[str, Any]:
        if isinstance(self.body, dict) and isinstance(self.body.get("claims"), dict):
            claims: dict[str, Any] = self.body["claims"]
            return claims
        return {}


def describe_cache(decision: Mapping[str, Any] | None, delta: Counters) -> str:
    """How the token was obtained, in words: the proxy's cache outcome and the legs run."""
    if decision is None:
        return "no decision logged"
    cache = decision.get("cache")
    if cache in ("hit", "refresh"):
        text = "hit: served from the proxy's token cache, no exchange"
        if cache == "refresh":
            text = "refresh: " + text.split(": ", 1)[1] + " (refresh started in the background)"
        return text
    if cache in ("miss", "shared"):
        legs: list[str] = []
        if delta.broker_ok:
            how = (
                "exchanged at the IdP by the gateway"
                if delta.idp_intermediate
                else "from the gateway's cache"
            )
            legs.append(f"leg 1 via the gateway (intermediate token {how})")
        else:
            legs.append("leg 1 not needed (intermediate token still held by the proxy)")
        if delta.idp_final:
            legs.append("leg 2 at the IdP (final token)")
        return f"{cache} → exchanged: " + " + ".join(legs)
    return str(cache)


def act_chain(act: object) -> str:
    """``act`` as the delegation chain it encodes: who acts, on whose behalf, via whom."""
    names: list[str] = []
    while isinstance(act, dict) and isinstance(act.get("sub"), str):
        names.append(act["sub"])
        act = act.get("act")
    return " ← ".join(names)


def check_outcome(outcome: Outcome, user: str) -> list[str]:
    """Everything that is not as the demo promises, in words (empty: all good)."""
    ex = outcome.exchange
    problems: list[str] = []
    if ex.kind == "token":
        if outcome.status != 200:
            return [f"expected 200 from the upstream, got {outcome.status}: {outcome.body}"]
        claims = outcome.claims
        want_act = {"sub": SANDBOX_ID, "act": {"sub": GATEWAY_ID}}
        checks = (
            ("sub", claims.get("sub") == user, user),
            ("azp", claims.get("azp") == SANDBOX_ID, SANDBOX_ID),
            ("aud", ex.audience in (claims.get("aud") or ()), ex.audience),
            ("scope", ex.scope in str(claims.get("scope", "")).split(), ex.scope),
            ("act", claims.get("act") == want_act, json.dumps(want_act)),
        )
        for name, ok, want in checks:
            if not ok:
                problems.append(f"claim {name} is {claims.get(name)!r}, expected {want}")
        got_cache = (outcome.decision or {}).get("cache")
        if ex.cache is not None and got_cache != ex.cache:
            problems.append(f"proxy cache outcome {got_cache!r}, expected {ex.cache!r}")
    elif ex.kind == "passthrough":
        body = outcome.body if isinstance(outcome.body, dict) else {}
        if outcome.status != 401 or body.get("error") != "invalid_token":
            problems.append(
                f"expected the upstream's own 401 invalid_token (no token added), got "
                f"{outcome.status}: {outcome.body}"
            )
    elif ex.kind == "failure":
        body = outcome.body if isinstance(outcome.body, dict) else {}
        if outcome.status != 502 or body.get("error") != "credential_unavailable":
            problems.append(
                f"expected 502 credential_unavailable from the proxy, got "
                f"{outcome.status}: {outcome.body}"
            )
    return problems


# --- profiles ---------------------------------------------------------------------------


def orders_profile_yaml(token_endpoint: str, orders_port: int, reports_port: int) -> str:
    return f"""\
# Written by `tokenferry demo`: alice's orders service, and (through an audience
# override of the same profile) the reports service, each with its own audience.
id: demo-orders
display_name: Demo orders and reports
description: token_exchange on behalf of the user who owns the sandbox
credentials:
  - name: user_token
    description: the user's access token; only the gateway ever holds it
    required: true
  - name: access_token
    description: final token, injected into requests to the endpoints below
    auth_style: bearer
    token_grant:
      grant_type: token_exchange
      token_endpoint: {token_endpoint}
      audience: orders
      scopes: [orders.read]
      client_assertion_type: urn:ietf:params:oauth:client-assertion-type:jwt-spiffe
      subject_token:
        source: provider_credential
        credential: user_token
      audience_overrides:
        - {{host: {LOOPBACK}, port: {reports_port}, path: /reports/**,
           audience: reports, scopes: [reports.read]}}
endpoints:
  - {{host: {LOOPBACK}, port: {orders_port}, path: /orders/**, tls: terminate}}
"""


def billing_profile_yaml(token_endpoint: str, reports_port: int) -> str:
    return f"""\
# Written by `tokenferry demo`: a second profile, whose provider holds a user token
# that has already expired, to show how a request fails when no token can be had.
id: demo-billing
display_name: Demo billing
credentials:
  - name: user_token
    required: true
  - name: access_token
    token_grant:
      grant_type: token_exchange
      token_endpoint: {token_endpoint}
      audience: billing
      scopes: [billing.read]
      client_assertion_type: urn:ietf:params:oauth:client-assertion-type:jwt-spiffe
      subject_token:
        source: provider_credential
        credential: user_token
endpoints:
  - {{host: {LOOPBACK}, port: {reports_port}, path: /billing/**, tls: terminate}}
"""


# --- the demo ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    serve: bool = False
    keep_dir: bool = False
    user: str = "alice"


def _port(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def _claim_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class Demo:
    def __init__(self, options: DemoOptions, console: Console, err: Console) -> None:
        self.options = options
        self.console = console
        self.err = err
        # Unix socket paths are limited to ~107 bytes: keep the directory short.
        self.root = Path(tempfile.mkdtemp(prefix="tf-demo-", dir="/tmp"))
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.services: dict[str, ServiceProcess] = {}
        self.admin_token = secrets.token_urlsafe(24)
        self.started = time.monotonic()
        self.outcomes: list[Outcome] = []

    # --- output ---------------------------------------------------------------------

    def say(self, *parts: str | tuple[str, str]) -> None:
        self.console.print(Text.assemble(*parts))

    def step(self, what: str, detail: str = "") -> None:
        self.say(("  ✓ ", "green"), (what, "bold"), ("  " + detail if detail else "", "dim"))

    def heading(self, text: str) -> None:
        self.console.print()
        self.console.print(Text(text, style="bold underline"))

    # --- processes --------------------------------------------------------------------

    def _service(
        self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> ServiceProcess:
        service = ServiceProcess(name, args, log_dir=self.logs, cwd=self.root, env=env)
        self.services[name] = service
        return service

    def _start_parallel(
        self, *specs: tuple[str, Sequence[str], Mapping[str, str] | None]
    ) -> list[dict[str, Any]]:
        """Start these services at once, then wait for each ready line (they start
        concurrently, so waiting in turn costs only as long as the slowest)."""
        started = [self._service(name, args, env) for name, args, env in specs]
        return [service.wait_ready() for service in started]

    def start_services(self) -> None:
        self.heading("Starting the services (each a subprocess; logs in the demo directory)")
        key_file = self.root / "trust-domain-key.pem"
        gateway_sock = self.root / "gateway.sock"
        sandbox_sock = self.root / "sandbox.sock"
        spiffe_gw, spiffe_sb = self._start_parallel(
            (
                "spiffe-gateway",
                [
                    "dev",
                    "spiffe",
                    "--socket",
                    str(gateway_sock),
                    "--spiffe-id",
                    GATEWAY_ID,
                    "--key-file",
                    str(key_file),
                    "--jwks-listen",
                    f"{LOOPBACK}:0",
                ],
                None,
            ),
            (
                "spiffe-sandbox",
                [
                    "dev",
                    "spiffe",
                    "--socket",
                    str(sandbox_sock),
                    "--spiffe-id",
                    SANDBOX_ID,
                    "--key-file",
                    str(key_file),
                ],
                None,
            ),
        )
        self.gateway_socket = str(spiffe_gw["socket"])
        self.sandbox_socket = str(spiffe_sb["socket"])
        self.step("dev SPIFFE agent (gateway)", f"{GATEWAY_ID}  unix:{self.gateway_socket}")
        self.step("dev SPIFFE agent (sandbox)", f"{SANDBOX_ID}  unix:{self.sandbox_socket}")

        (idp,) = self._start_parallel(
            (
                "idp",
                [
                    "dev",
                    "idp",
                    "--listen",
                    f"{LOOPBACK}:0",
                    "--spiffe-jwks",
                    str(spiffe_gw["jwks_url"]),
                    "--gateway-id",
                    GATEWAY_ID,
                    "--dev-user",
                    self.options.user,
                ],
                None,
            )
        )
        self.issuer = str(idp["issuer"])
        self.token_endpoint = str(idp["token_endpoint"])
        self.step("dev IdP", f"issuer {self.issuer}")

        tls_dir = self.root / "upstream-tls"
        upstream = [
            "dev",
            "upstream",
            "--listen",
            f"{LOOPBACK}:0",
            "--issuer",
            self.issuer,
            "--tls-self-signed",
            str(tls_dir),
        ]
        self.db_path = self.root / "gateway.db"
        gateway, orders, reports = self._start_parallel(
            (
                "gateway",
                [
                    "gateway",
                    "--listen",
                    f"{LOOPBACK}:0",
                    "--admin-listen",
                    f"{LOOPBACK}:0",
                    "--db",
                    str(self.db_path),
                    "--spiffe-socket",
                    self.gateway_socket,
                    "--oidc-issuer",
                    self.issuer,
                    "--oidc-audience",
                    USER_AUDIENCE,
                ],
                # An environment variable, not a flag: command lines are visible in ps.
                {"TOKENFERRY_GATEWAY_DEV_ADMIN_TOKEN": self.admin_token},
            ),
            (
                "upstream-orders",
                [*upstream, "--audience", "orders", "--scope", "orders.read"],
                None,
            ),
            (
                "upstream-reports",
                [*upstream, "--audience", "reports", "--scope", "reports.read"],
                None,
            ),
        )
        self.gateway_url = str(gateway["url"])
        self.gateway_admin_url = str(gateway["admin_url"])
        self.orders_url = str(orders["url"])
        self.reports_url = str(reports["url"])
        self.upstream_ca = Path(str(orders["ca_file"]))
        self.step("gateway", f"{self.gateway_url}  (dev mode, SQLite {self.db_path})")
        self.step(
            "protected service 'orders'",
            f"{self.orders_url}  requires aud orders, scope orders.read",
        )
        self.step(
            "protected service 'reports'",
            f"{self.reports_url}  requires aud reports, scope reports.read",
        )

    def start_proxy(self) -> None:
        self.confdir = self.root / "proxy"
        (proxy,) = self._start_parallel(
            (
                "proxy",
                [
                    "proxy",
                    "--gateway",
                    self.gateway_url,
                    "--spiffe-socket",
                    self.sandbox_socket,
                    "--listen",
                    f"{LOOPBACK}:0",
                    "--admin-listen",
                    f"{LOOPBACK}:0",
                    "--confdir",
                    str(self.confdir),
                    "--upstream-ca",
                    str(self.upstream_ca),
                ],
                None,
            )
        )
        self.proxy_url = str(proxy["proxy_url"])
        self.proxy_admin_url = str(proxy["admin_url"])
        self.proxy_ca = Path(str(proxy.get("ca_file") or self.confdir / "mitmproxy-ca-cert.pem"))
        self.step(
            "proxy (the sandbox's supervisor, fed by the gateway)",
            f"{self.proxy_url}  CA {self.proxy_ca}",
        )

    # --- registration through the gateway API -----------------------------------------

    def mint_user_token(self, ttl: int) -> str:
        with httpx.Client(trust_env=False, timeout=10) as client:
            response = client.post(
                f"{self.issuer}/dev/user-token",
                json={"sub": self.options.user, "ttl": ttl, "aud": USER_AUDIENCE},
            )
        if response.status_code != 200:
            try:
                problem = response.json()
                reason = f": {problem['error']}: {problem.get('error_description', '')}"
            except (ValueError, KeyError, TypeError):
                reason = ""
            raise DemoError(
                f"the dev IdP refused to mint a user token for {self.options.user!r} "
                f"({response.status_code}{reason})",
                "idp",
            )
        token = response.json().get("access_token")
        if not isinstance(token, str):
            raise DemoError("the dev IdP's /dev/user-token answer has no access_token", "idp")
        return token

    async def register(self) -> None:
        from gateway_client import BearerAuth, GatewayClient, GatewayClientError

        self.heading("Registering, as an operator and the user would (gateway API)")
        profiles_dir = self.root / "profiles"
        profiles_dir.mkdir()
        orders_port, reports_port = _port(self.orders_url), _port(self.reports_url)
        sources = {
            "demo-orders": orders_profile_yaml(self.token_endpoint, orders_port, reports_port),
            "demo-billing": billing_profile_yaml(self.token_endpoint, reports_port),
        }
        user = self.options.user
        # The user's token, as `tokenferry login` would hold it; one that expired a
        # minute ago for the provider that shows a failure.
        user_token = self.mint_user_token(600)
        expired_token = self.mint_user_token(-60)
        step = "connecting to the gateway"
        try:
            async with GatewayClient(
                self.gateway_url, auth=BearerAuth(self.admin_token)
            ) as operator:
                for profile_id, source in sources.items():
                    step = f"importing profile {profile_id}"
                    path = profiles_dir / f"{profile_id}.yaml"
                    path.write_text(source)
                    await operator.create_profile(source)
                    self.step(f"profile {profile_id}", f"imported by the operator from {path}")
            async with GatewayClient(self.gateway_url, auth=BearerAuth(user_token)) as alice:
                step = "creating provider orders"
                orders = await alice.create_provider(
                    "orders", "demo-orders", {"user_token": user_token}
                )
                stored = orders.credential("user_token")
                expiry = stored.expires_at if stored is not None else None
                until = (
                    f"expires {expiry.astimezone(UTC):%H:%M:%S} UTC"
                    if expiry
                    else "no expiry recorded"
                )
                self.step(
                    "provider orders",
                    f"profile demo-orders, owner {orders.owner}; {user}'s token stored "
                    f"(encrypted, write-only; {until})",
                )
                step = "creating provider billing"
                await alice.create_provider(
                    "billing", "demo-billing", {"user_token": expired_token}
                )
                self.step(
                    "provider billing",
                    f"profile demo-billing; {user}'s token stored, but it has already expired",
                )
                step = f"registering sandbox {SANDBOX_NAME}"
                sandbox = await alice.put_sandbox(SANDBOX_NAME, SANDBOX_ID, ["orders", "billing"])
                self.step(
                    f"sandbox {sandbox.name}",
                    f"{sandbox.spiffe_id}, providers: {', '.join(sandbox.providers)}",
                )
        except GatewayClientError as exc:
            raise DemoError(f"gateway API: {step}: {exc}", "gateway") from None

    # --- observing ----------------------------------------------------------------------

    def counters(self) -> Counters:
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with httpx.Client(trust_env=False, timeout=10) as client:
                stats = client.get(f"{self.issuer}/dev/stats").json()
                metrics = client.get(f"{self.gateway_admin_url}/metrics").text
        except (httpx.HTTPError, ValueError) as exc:
            raise DemoError(f"cannot read the IdP's or the gateway's counters: {exc!r}") from None
        by_policy = stats.get("by_policy", {}) if isinstance(stats, dict) else {}
        broker_ok = 0.0
        cache: dict[str, float] = {}
        for family in text_string_to_metric_families(metrics):
            for sample in family.samples:
                if sample.name == "tokenferry_gateway_broker_requests_total":
                    if sample.labels.get("outcome") == "ok":
                        broker_ok += sample.value
                elif sample.name == "tokenferry_gateway_intermediate_cache_total":
                    result = sample.labels.get("result", "?")
                    cache[result] = cache.get(result, 0.0) + sample.value
        return Counters(
            idp_intermediate=int(by_policy.get("intermediate", {}).get("ok", 0)),
            idp_final=int(by_policy.get("final", {}).get("ok", 0)),
            broker_ok=int(broker_ok),
            gateway_cache=cache,
        )

    def decisions(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for line in self.services["proxy"].log_lines():
            if '"tokenferry.decision"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("logger") == "tokenferry.decision":
                found.append(entry)
        return found

    def wait_decision(self, seen: int) -> dict[str, Any] | None:
        """The proxy's decision line for the request just answered (logged before
        forwarding; the short wait only covers the log file catching up)."""
        deadline = time.monotonic() + DECISION_WAIT
        while True:
            found = self.decisions()
            if len(found) > seen:
                return found[-1]
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    # --- the sandbox's requests -------------------------------------------------------

    def exchanges(self) -> list[Exchange]:
        orders = f"{self.orders_url}/orders/42"
        reports = f"{self.reports_url}/reports/weekly"
        return [
            Exchange("orders", orders, "token", "orders", "orders.read", "miss"),
            Exchange("orders, again", orders, "token", "orders", "orders.read", "hit"),
            Exchange(
                "reports (audience override)", reports, "token", "reports", "reports.read", "miss"
            ),
            Exchange("reports, again", reports, "token", "reports", "reports.read", "hit"),
            Exchange(
                "a host no route targets",
                f"https://localhost:{_port(self.orders_url)}/orders/42",
                "passthrough",
            ),
            Exchange(
                "billing (its stored user token expired)",
                f"{self.reports_url}/billing/invoices",
                "failure",
            ),
        ]

    def send(self, exchange: Exchange, client: httpx.Client) -> Outcome:
        seen = len(self.decisions())
        before = self.counters()
        try:
            response = client.get(exchange.url)
        except httpx.HTTPError as exc:
            raise DemoError(
                f"request to {exchange.url} through the proxy failed: {exc!r}", "proxy"
            ) from None
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text[:300]
        decision = self.wait_decision(seen) if exchange.kind != "passthrough" else None
        delta = self.counters().minus(before)
        return Outcome(exchange, response.status_code, body, decision, delta)

    def show(self, number: int, outcome: Outcome) -> None:
        ex = outcome.exchange
        ok = outcome.status < 400
        self.console.print()
        self.say(
            (f" {number}. ", "bold"),
            (ex.title, "bold"),
            ("\n    GET ", ""),
            (ex.url, "cyan"),
            ("  → ", ""),
            (str(outcome.status), "bold green" if ok else "bold yellow"),
        )
        if ex.kind == "token":
            claims = outcome.claims
            self.say(
                ("    cache  ", "dim"),
                (describe_cache(outcome.decision, outcome.counters), "magenta"),
            )
            self.say(("    the upstream verified a token with:", "dim"))
            notes = {
                "sub": "the user",
                "azp": "the sandbox's supervisor, by its SPIFFE ID",
                "aud": "this service only",
                "act": "who acted for the user: the sandbox, via the gateway",
            }
            for name in ("sub", "azp", "aud", "scope", "act"):
                value = claims.get(name)
                self.say(
                    (f"      {name:<7}", "bold"),
                    (_claim_text(value) if value is not None else "(absent)", ""),
                    (f"   ({notes[name]})" if name in notes else "", "dim"),
                )
            if isinstance(claims.get("act"), dict):
                self.say(
                    ("      chain  ", "dim"),
                    (f"{claims.get('sub')} ← {act_chain(claims['act'])}", ""),
                    ("   (the user ← the actor now ← the actor before it)", "dim"),
                )
        elif ex.kind == "passthrough":
            reason = outcome.body.get("reason") if isinstance(outcome.body, dict) else None
            self.say(
                ("    expected: ", "dim"),
                (
                    "no route targets localhost, so the proxy tunnelled the TLS connection "
                    "untouched (the client verified the service's own certificate, not the "
                    "proxy's) and added no token; the service itself answered 401",
                    "",
                ),
                (f" ({reason})" if reason else "", "dim"),
            )
        else:
            self.say(
                ("    expected: ", "dim"),
                (
                    "the proxy could not obtain a token, so it did not forward the request "
                    "(fail closed) and answered the sandbox with:",
                    "",
                ),
            )
            self.say(("      ", ""), (json.dumps(outcome.body), "yellow"))

    def send_requests(self) -> None:
        self.heading("Requests from the sandbox through the proxy (httpx, HTTPS_PROXY-style)")
        self.say(
            (
                "  The sandbox trusts the proxy's CA and holds no secret; every token below was "
                f"minted for this request's audience, for user {self.options.user!r} and sandbox "
                f"{SANDBOX_ID}.",
                "dim",
            ),
        )
        sandbox_tls = ssl.create_default_context(cafile=str(self.proxy_ca))
        upstream_tls = ssl.create_default_context(cafile=str(self.upstream_ca))
        options: dict[str, Any] = {"proxy": self.proxy_url, "trust_env": False, "timeout": 30.0}
        with (
            httpx.Client(verify=sandbox_tls, **options) as sandbox,
            httpx.Client(verify=upstream_tls, **options) as tunnel,
        ):
            for number, exchange in enumerate(self.exchanges(), 1):
                client = tunnel if exchange.kind == "passthrough" else sandbox
                outcome = self.send(exchange, client)
                self.outcomes.append(outcome)
                self.show(number, outcome)
                problems = check_outcome(outcome, self.options.user)
                if problems:
                    raise DemoError(
                        f"request {number} ({exchange.title}): " + "; ".join(problems), "proxy"
                    )

    def summary(self) -> None:
        elapsed = time.monotonic() - self.started
        self.console.print()
        self.say(
            ("✓ ", "bold green"),
            (f"All {len(self.outcomes)} requests behaved as shown ", "bold"),
            (f"({elapsed:.1f} s). ", ""),
            (
                f"Two identities in every token: the user ({self.options.user}) as sub, the "
                f"sandbox ({SANDBOX_ID}) as azp and act; no token ever reached the sandbox's "
                "code or this output.",
                "",
            ),
        )

    # --- serve mode ---------------------------------------------------------------------

    def curl_command(self, url: str | None = None) -> str:
        target = url or f"{self.orders_url}/orders/42"
        return f"curl --proxy {self.proxy_url} --cacert {self.proxy_ca} {target}"

    def serve(self, stop: threading.Event) -> None:
        token_file = self.root / "admin-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.admin_token + "\n")
        self.heading("Everything keeps running; try it (Ctrl-C stops it all)")
        self.say(("  As the sandbox (the orders service echoes the token's claims):", "dim"))
        # Plain print: one line, never wrapped or styled, so it can be copied (and parsed).
        print(self.curl_command(), flush=True)
        print(self.curl_command(f"{self.reports_url}/reports/weekly"), flush=True)
        self.say(("  Or point any client at it:", "dim"))
        print(f"export HTTPS_PROXY={self.proxy_url} SSL_CERT_FILE={self.proxy_ca}", flush=True)
        self.say(("  As the operator (the gateway's dev admin token is in a 0600 file):", "dim"))
        print(
            f"TOKENFERRY_TOKEN=$(cat {token_file}) tokenferry --gateway {self.gateway_url} "
            "sandbox list",
            flush=True,
        )
        self.say(
            ("  Proxy metrics: ", "dim"),
            (f"{self.proxy_admin_url}/metrics", ""),
            ("   logs: ", "dim"),
            (str(self.logs), ""),
        )
        while not stop.wait(0.5):
            for service in self.services.values():
                if not service.alive():
                    raise DemoError(
                        f"{service.name} exited (status {service.proc.returncode})", service.name
                    )

    # --- everything ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self.say(
            ("tokenferry demo", "bold"),
            (" — the whole system on this machine, in ", ""),
            (str(self.root), "cyan"),
        )
        self.start_services()
        asyncio.run(self.register())
        self.start_proxy()
        self.send_requests()
        self.summary()
        if self.options.serve:
            self.serve(stop)

    def close(self) -> None:
        # The proxy first (it depends on everything), then in reverse start order.
        for service in reversed(list(self.services.values())):
            service.stop()
        if self.options.keep_dir:
            self.err.print(Text(f"kept {self.root} (logs in {self.logs})", style="dim"))
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def report_failure(self, exc: DemoError) -> None:
        self.err.print(Text.assemble(("error: ", "bold red"), str(exc)))
        service = self.services.get(exc.service) if exc.service else None
        if service is not None:
            self.err.print(Text(f"last lines of the {service.name} log:", style="bold"))
            for line in service.log_tail():
                self.err.print(Text("  " + line), soft_wrap=True)
        if not self.options.keep_dir:
            self.err.print(Text("(run with --keep-dir to keep every service's log)", style="dim"))


@dataclass
class _Signals:
    """SIGTERM behaves like Ctrl-C: both end the demo through the same clean-up path."""

    stop: threading.Event = field(default_factory=threading.Event)
    previous: dict[int, Any] = field(default_factory=dict)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()
        raise Interrupted(signal.Signals(signum).name)

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handler)

    def ignore(self) -> None:
        # While cleaning up, a second Ctrl-C must not leave processes behind.
        for signum in self.previous:
            signal.signal(signum, signal.SIG_IGN)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def run_demo(options: DemoOptions, console: Console | None = None) -> int:
    """Run the demo; 0 when every request behaved as shown, 1 on any failure, 130 when
    interrupted (in ``--serve`` mode, Ctrl-C/SIGTERM is the normal end: 0)."""
    # soft_wrap: long lines (SPIFFE IDs, URLs) stay whole for copying and for grep.
    console = console or Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    signals = _Signals()
    signals.install()
    demo: Demo | None = None
    code = 1
    try:
        demo = Demo(options, console, err)
        demo.run(signals.stop)
        code = 0
    except Interrupted:
        if demo is not None and options.serve and demo.outcomes:
            console.print()
            console.print(Text("stopping ...", style="dim"))
            code = 0
        else:
            err.print(Text("interrupted; stopping ...", style="yellow"))
            code = 130
    except DemoError as exc:
        if demo is not None:
            demo.report_failure(exc)
        else:
            err.print(Text.assemble(("error: ", "bold red"), str(exc)))
        code = 1
    except Exception as exc:  # a bug: still one clear line, and still clean up
        err.print(Text.assemble(("error: the demo itself failed: ", "bold red"), repr(exc)))
        code = 1
    finally:
        signals.ignore()
        try:
            if demo is not None:
                demo.close()
        finally:
            signals.restore()
    return code

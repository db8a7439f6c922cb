"""Assembles the supervisor: mitmproxy (regular mode) + tokenferry addons + admin listener.

mitmproxy runs in-process: a plain ``Master`` with tokenferry's addons *first* (so their
hooks run before mitmproxy's own, e.g. the credential header is redacted before the
``save`` addon writes a flow) followed by mitmproxy's default addons. No ``view`` addon is
loaded, so flows are not retained in memory. The admin listener (aiohttp) serves
``/healthz`` and ``/metrics`` from the supervisor's own Prometheus registry.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import certifi
from aiohttp import web
from mitmproxy import addons as mitm_addons
from mitmproxy import ctx, master, options
from mitmproxy.addons import errorcheck

from addons.audit import Audit
from addons.inject import Inject
from addons.passthrough import Passthrough
from gateway_client import GatewayClient, SvidAuth
from proxy.config import Address, ConfigSource, SupervisorConfig
from proxy.gateway_config import DEFAULT_POLL_INTERVAL, GatewayConfigSource
from proxy.grants import GrantBroker, IdentityOptions, open_broker
from proxy.metrics import CONTENT_TYPE_LATEST
from proxy.supervisor import Supervisor
from tokenferry.service import announce_ready
from tokenferry.svid import svid_source_from_options

logger = logging.getLogger("tokenferry.proxy")

CA_CERT_FILE = "mitmproxy-ca-cert.pem"
UPSTREAM_TRUST_FILE = "tokenferry-upstream-trust.pem"


class StartupError(Exception):
    """The supervisor cannot start; the message says why (no traceback for users)."""


@dataclass(frozen=True)
class ProxySettings:
    listen: Address
    admin_listen: Address
    confdir: Path
    identity: IdentityOptions
    deny_unmatched: bool = False
    sandbox: str | None = None
    upstream_ca: Path | None = None
    mitm_options: tuple[str, ...] = ()  # "name=value", as mitmdump's --set


def upstream_trust_file(confdir: Path, extra_ca: Path) -> Path:
    """The public roots plus the extra CA: mitmproxy's option *replaces* its trust store,
    but ``--upstream-ca`` should *add* a CA (internal services and public APIs alike)."""
    try:
        extra = extra_ca.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"--upstream-ca {extra_ca}: cannot read PEM file ({exc})") from None
    if "-----BEGIN CERTIFICATE-----" not in extra:
        raise StartupError(f"--upstream-ca {extra_ca}: no PEM certificate in the file")
    confdir.mkdir(parents=True, exist_ok=True)
    target = confdir / UPSTREAM_TRUST_FILE
    target.write_text(Path(certifi.where()).read_text(encoding="ascii") + "\n" + extra)
    return target


def token_endpoint_ssl_context(extra_ca: Path | None) -> ssl.SSLContext | None:
    """Token endpoints trust the system roots plus ``--upstream-ca`` (a private IdP CA)."""
    if extra_ca is None:
        return None
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=str(extra_ca))
    return context


class _Ready:
    """Announces the ready line once mitmproxy's listeners are up."""

    def __init__(self, admin_url: str, ca_file: Path, supervisor: Supervisor) -> None:
        self.admin_url = admin_url
        self.ca_file = ca_file
        self.supervisor = supervisor

    def running(self) -> None:
        addon_manager: Any = ctx.master.addons
        proxyserver: Any = addon_manager.get("proxyserver")
        addrs = proxyserver.listen_addrs()
        if not addrs:
            return  # setup failed; errorcheck reports it and exits
        host, port = addrs[0][0], addrs[0][1]
        shown = f"[{host}]" if ":" in host else host
        announce_ready(
            "proxy",
            proxy_url=f"http://{shown}:{port}",
            admin_url=self.admin_url,
            ca_file=str(self.ca_file),
            # False in gateway mode when the gateway gave no configuration yet (requests
            # are answered 502 until it does).
            configured=self.supervisor.unconfigured is None,
        )


class TokenferryAddons:
    """tokenferry's addons as one entry of mitmproxy's addon chain, in hook order.

    mitmproxy dispatches every event (four per request, each followed by an ``update``
    event) to every entry of its chain, paying a context manager and a coroutine per
    entry whether or not the entry has a hook for it. Children listed in ``addons`` are
    visited inside their parent's dispatch, so three addons cost one entry instead of
    three (measured: about 10 us per event on the bench machine).
    """

    name = "tokenferry"

    def __init__(self, supervisor: Supervisor) -> None:
        self.addons = [Passthrough(supervisor), Inject(supervisor), Audit(supervisor)]


async def _start_admin(supervisor: Supervisor, address: Address) -> tuple[web.AppRunner, str]:
    async def healthz(_request: web.Request) -> web.Response:
        status, body = supervisor.health()
        return web.json_response(body, status=status)

    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=supervisor.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"--admin-listen {address.host}:{address.port}: cannot listen ({exc.strerror})"
        ) from None
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{port}"


async def _follow(source: ConfigSource, supervisor: Supervisor) -> None:
    """Apply later configurations (gateway mode); a bad one keeps the current table."""
    async for config in source.updates():
        try:
            supervisor.apply(config)
        except Exception:
            logger.exception("new configuration rejected; keeping the current routes")


async def serve(
    settings: ProxySettings,
    source: ConfigSource,
    initial: SupervisorConfig | None,
    *,
    supervisor: Supervisor | None = None,
    broker: GrantBroker | None = None,
    unconfigured: str | None = None,
) -> int:
    """Run until SIGTERM/SIGINT. ``initial`` None (gateway mode, gateway not answering):
    start anyway, answer every request 502 with ``unconfigured`` as the reason, and
    apply the first configuration ``source.updates()`` yields."""
    supervisor = supervisor or Supervisor()
    supervisor.sandbox_override = settings.sandbox
    if initial is not None:
        supervisor.apply(initial)
    else:
        supervisor.unconfigured = unconfigured or "no configuration yet"
    if broker is None:
        try:
            broker = open_broker(settings.identity, supervisor.metrics)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
    supervisor.broker = broker

    try:
        admin_runner, admin_url = await _start_admin(supervisor, settings.admin_listen)
    except BaseException:
        await supervisor.aclose()
        raise
    follower: asyncio.Task[None] | None = None
    try:
        opts = options.Options(
            mode=["regular"],
            listen_host=settings.listen.host,
            listen_port=settings.listen.port,
            confdir=str(settings.confdir),
        )
        m = master.Master(opts, with_termlog=False)
        # mitmproxy's addon manager and options are untyped.
        addon_manager: Any = m.addons
        default_addons: Any = mitm_addons.default_addons
        option_manager: Any = opts
        addon_manager.add(TokenferryAddons(supervisor))
        addon_manager.add(*default_addons())
        addon_manager.add(
            errorcheck.ErrorCheck(),
            _Ready(admin_url, settings.confdir.expanduser() / CA_CERT_FILE, supervisor),
        )
        updates: dict[str, Any] = {"tokenferry_deny_unmatched": settings.deny_unmatched}
        if settings.upstream_ca is not None:
            updates["ssl_verify_upstream_trusted_ca"] = str(
                upstream_trust_file(settings.confdir.expanduser(), settings.upstream_ca)
            )
        option_manager.update(**updates)
        if settings.mitm_options:
            try:
                option_manager.set(*settings.mitm_options)
            except Exception as exc:  # mitmproxy's OptionsError and friends (untyped)
                raise StartupError(f"--set: {exc}") from None

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, m.shutdown)
        follower = asyncio.create_task(_follow(source, supervisor))
        await m.run()
    finally:
        if follower is not None:
            follower.cancel()
        await admin_runner.cleanup()
        await supervisor.aclose()
    return 0


@dataclass(frozen=True)
class GatewayMode:
    """``--gateway URL``: configuration and leg 1 of token_exchange from the gateway."""

    url: str
    poll_interval: float = DEFAULT_POLL_INTERVAL


def waiting_detail(url: str, reason: str | None) -> str:
    """The 502 detail while no configuration has arrived (names the gateway)."""
    text = f"no configuration from the gateway at {url} yet"
    return f"{text}: {reason}" if reason else text


async def serve_gateway(settings: ProxySettings, mode: GatewayMode) -> int:
    """Gateway mode: one SVID source for both audiences (the gateway's, via ``SvidAuth``;
    the IdP's, for leg 2 and client_credentials), one gateway client for the config
    polls and leg 1. Starts even when the gateway does not answer yet (see docs)."""
    identity = settings.identity
    try:
        svids = svid_source_from_options(
            identity.spiffe_socket,
            identity.svid_dir,
            identity.bundle_file,
            reuse_svids=identity.reuse_svids,
        )
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    client = GatewayClient(mode.url, auth=SvidAuth(svids), ssl_context=identity.ssl_context)
    supervisor = Supervisor()
    source = GatewayConfigSource(
        client, poll_interval=mode.poll_interval, metrics=supervisor.metrics
    )
    broker = open_broker(identity, supervisor.metrics, svids=svids, gateway=client)
    initial = await source.try_load()

    def on_failure(reason: str) -> None:
        if supervisor.unconfigured is not None:
            supervisor.unconfigured = waiting_detail(mode.url, reason)

    source.on_failure = on_failure
    return await serve(
        settings,
        source,
        initial,
        supervisor=supervisor,
        broker=broker,
        unconfigured=waiting_detail(mode.url, source.last_failure),
    )

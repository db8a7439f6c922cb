"""Assemble and run the gateway: store, identity, broker, API app and admin app.

Start-up order matters: the database (migrated, key checked) and the gateway's own
SPIFFE identity must be in place before the listener opens, so the ready line is only
printed once the gateway can actually serve. Everything started here is closed again
by the apps' cleanup contexts, in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import api
from gateway.auth import BundleCache, OidcVerifier, SupervisorAuthenticator, UserAuthenticator
from gateway.broker import Broker
from gateway.config import GatewayConfig
from gateway.crypto import KeyConfigError, load_keyring
from gateway.metrics import GatewayMetrics
from gateway.store import DatabaseError, Store, parse_database_option
from gateway.trust import EndpointTrust
from tokenferry.oauth import TokenEndpointClient
from tokenferry.service import announce_ready, configure_logging
from tokenferry.svid import JwtSvid, SvidSource, SvidUnavailable, svid_source_from_options
from tokenferry.svid_verify import parse_spiffe_id
from tokenferry.tokens import TokenCache

log = logging.getLogger("tokenferry.gateway")

# Audience of the SVID fetched once at start-up only to learn the gateway's own SPIFFE
# ID; that SVID is never sent anywhere.
IDENTITY_PROBE_AUDIENCE = "tokenferry-gateway-identity-probe"
IDENTITY_WAIT_SECONDS = 15.0


class StartupError(Exception):
    """The gateway cannot start; the message says what to fix."""


@dataclass(frozen=True)
class GatewayIdentity:
    spiffe_id: str
    trust_domain: str


async def discover_identity(source: SvidSource, wait_seconds: float) -> GatewayIdentity:
    """The gateway's own SPIFFE ID, waiting a bounded time for the Workload API."""
    deadline = time.monotonic() + wait_seconds
    delay = 0.1
    while True:
        try:
            svid: JwtSvid = await source.fetch_jwt_svid(IDENTITY_PROBE_AUDIENCE)
            break
        except SvidUnavailable as exc:
            if time.monotonic() + delay > deadline:
                raise StartupError(f"cannot obtain the gateway's own JWT-SVID: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
    trust_domain, _ = parse_spiffe_id(svid.spiffe_id)
    return GatewayIdentity(svid.spiffe_id, trust_domain)


@dataclass(frozen=True)
class ApiSettings:
    """Everything the API app needs that is decided before it starts."""

    config: GatewayConfig
    identity: GatewayIdentity
    trust_domains: frozenset[str]
    supervisor_audience: str


# aiohttp refuses header fields over 8190 bytes with a plain-text 400 before any handler
# runs; OIDC access tokens carrying many groups or roles get that large. Up to this size
# a bearer token reaches authentication (which caps tokens at 16 KiB with a JSON 401).
MAX_HEADER_FIELD_BYTES = 32 * 1024


def build_api_app(
    settings: ApiSettings, *, store: Store, svid_source: SvidSource, metrics: GatewayMetrics
) -> web.Application:
    config = settings.config
    app = web.Application(middlewares=[api.error_middleware], client_max_size=api.MAX_BODY_BYTES)
    app[api.STORE] = store
    app[api.METRICS] = metrics
    app[api.TRUST_DOMAINS] = settings.trust_domains
    app[api.PROFILES_ADMIN_ONLY] = config.profiles_admin_only
    app[api.AUTH_SETTINGS] = api.AuthSettings(
        issuer=config.oidc_issuer,
        client_id=config.cli_client_id,
        audience=config.oidc_audience,
        supervisor_audience=settings.supervisor_audience,
    )
    app[api.SUPERVISORS] = SupervisorAuthenticator(
        BundleCache(svid_source),
        audience=settings.supervisor_audience,
        trust_domains=settings.trust_domains,
    )

    async def outbound_clients(app: web.Application) -> AsyncIterator[None]:
        # HTTP clients live exactly as long as the app: created at start-up, closed
        # (with the cache's background refreshes) at clean-up.
        session = aiohttp.ClientSession(
            trust_env=False, timeout=aiohttp.ClientTimeout(total=10, connect=5)
        )
        token_client = TokenEndpointClient()
        cache = TokenCache()
        oidc = OidcVerifier(config.oidc_issuer, config.oidc_audience, http=lambda: session)
        app[api.USERS] = UserAuthenticator(
            oidc, dev_admin_token=config.dev_admin_token, admin_subjects=config.admin_subjects
        )
        # Without configured endpoints, the issuer's discovery document names the one
        # trusted endpoint: fetched on first use (not at start-up, so the gateway starts
        # while the IdP is still coming up) and then kept.
        trust = EndpointTrust(
            issuer=config.oidc_issuer,
            endpoints=config.trusted_token_endpoints,
            svid_audiences=config.trusted_svid_audiences,
            discovery=oidc.discovery,
        )
        app[api.TRUST] = trust
        app[api.BROKER] = Broker(
            store=store,
            svid_source=svid_source,
            token_client=token_client,
            cache=cache,
            metrics=metrics,
            trust=trust,
        )
        try:
            yield
        finally:
            await cache.aclose()
            await token_client.aclose()
            await session.close()

    app.cleanup_ctx.append(outbound_clients)
    api.add_routes(app)
    return app


METRICS_KEY = web.AppKey("metrics", GatewayMetrics)
STORE_KEY = web.AppKey("store", Store)
HEALTH_TIMEOUT_SECONDS = 2.0


async def healthz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS):
            await request.app[STORE_KEY].ping()
    except Exception as exc:
        log.warning("health check failed", extra={"error_type": type(exc).__name__})
        return web.json_response({"status": "unavailable", "database": "error"}, status=503)
    return web.json_response({"status": "ok"})


async def metrics_handler(request: web.Request) -> web.Response:
    payload = generate_latest(request.app[METRICS_KEY].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_admin_app(metrics: GatewayMetrics, store: Store) -> web.Application:
    app = web.Application()
    app[METRICS_KEY] = metrics
    app[STORE_KEY] = store
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    return app


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def serve(
    config: GatewayConfig,
    *,
    stop: asyncio.Event | None = None,
    identity_wait: float = IDENTITY_WAIT_SECONDS,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT); StartupError if it cannot start."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    try:
        database = parse_database_option(config.db)
        # Dev mode keeps a generated key next to a SQLite file. Replicas on PostgreSQL
        # must all hold the same key, so there it is always given explicitly.
        dev_key_path = (
            Path(database.location + ".key")
            if config.dev_mode and database.kind == "sqlite"
            else None
        )
        keyring, key_origin = load_keyring(
            key_file=config.key_file, key_env=config.key_env, dev_key_path=dev_key_path
        )
    except (DatabaseError, KeyConfigError) as exc:
        raise StartupError(str(exc)) from None
    try:
        store = await Store.open(database, keyring)
    except DatabaseError as exc:
        raise StartupError(str(exc)) from None

    runners: list[web.AppRunner] = []
    svid_source: SvidSource | None = None
    try:
        try:
            svid_source = svid_source_from_options(
                config.spiffe_socket, config.svid_dir, config.bundle_file
            )
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        identity = await discover_identity(svid_source, identity_wait)
        settings = ApiSettings(
            config=config,
            identity=identity,
            trust_domains=frozenset(config.trust_domains or (identity.trust_domain,)),
            supervisor_audience=config.supervisor_audience or identity.spiffe_id,
        )
        metrics = GatewayMetrics()
        app = build_api_app(settings, store=store, svid_source=svid_source, metrics=metrics)
        addresses = []
        for application, host, port in (
            (app, config.listen_host, config.listen_port),
            (build_admin_app(metrics, store), config.admin_host, config.admin_port),
        ):
            runner = web.AppRunner(
                application,
                access_log=None,
                handle_signals=False,
                max_field_size=MAX_HEADER_FIELD_BYTES,
            )
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, host, port)
            try:
                await site.start()
            except OSError as exc:
                raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            # Port 0 binds any free port: report the one actually bound.
            bound_port = int(runner.addresses[0][1]) if runner.addresses else port
            addresses.append(_url(host, bound_port))

        log.info(
            "gateway started",
            extra={
                "spiffe_id": identity.spiffe_id,
                "supervisor_audience": settings.supervisor_audience,
                "trust_domains": sorted(settings.trust_domains),
                "database": database.display,
                "key": key_origin,
                "dev_mode": config.dev_mode,
                "trusted_token_endpoints": list(config.trusted_token_endpoints)
                or "from the OIDC issuer's discovery document",
                "admin_subjects": len(config.admin_subjects),
                "profiles_admin_only": config.profiles_admin_only,
            },
        )
        announce_ready(
            "gateway", url=addresses[0], admin_url=addresses[1], spiffe_id=identity.spiffe_id
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("gateway stopping")
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        if svid_source is not None:
            await svid_source.close()
        await store.close()


def run(config: GatewayConfig) -> int:
    configure_logging(config.log_level)
    asyncio.run(serve(config))
    return 0

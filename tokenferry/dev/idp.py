"""``tokenferry dev idp``: a small OAuth 2.0 authorization server for development (SPEC §8).

RFC 6749/7523/8693/8628: client_credentials and token exchange for workloads that
authenticate with a JWT-SVID client assertion, and the device authorization grant plus
refresh tokens for the CLI's user login. Keycloak-shaped URLs, so the SPEC §4.2 audience
derivation of a token endpoint yields this issuer.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from tokenferry.cli.main import UserError
from tokenferry.dev.idp_core import (
    ACCEPTED_TOKEN_TYPES,
    ACCESS_TOKEN_TYPE,
    CLIENT_CREDENTIALS_GRANT,
    DEVICE_CODE_GRANT,
    JWT_BEARER_ASSERTION,
    JWT_SPIFFE_ASSERTION,
    POLICY_FINAL,
    POLICY_INTERMEDIATE,
    REFRESH_TOKEN_GRANT,
    TOKEN_EXCHANGE_GRANT,
    IdpSettings,
    Issuer,
    OAuthProblem,
    SigningKey,
    audience_list,
    base_claims,
    check_resource_audiences,
    final_claims,
    intermediate_claims,
    invalid_client,
    is_user_token,
    parse_scope,
)
from tokenferry.dev.serving import parse_listen, serve, url_host
from tokenferry.jwks import JwksMalformed, JwksUnavailable, RemoteJwks
from tokenferry.service import announce_ready, configure_logging
from tokenferry.svid_verify import (
    ALLOWED_ALGORITHMS,
    SvidVerificationError,
    UnknownKeyError,
    is_spiffe_id,
    verify_jwt_svid,
)

DESCRIPTION = "dev OAuth IdP: SVID client assertions, token exchange, device flow"

log = logging.getLogger("tokenferry.dev.idp")

_GRANT_NAMES = {
    CLIENT_CREDENTIALS_GRANT: "client_credentials",
    TOKEN_EXCHANGE_GRANT: "token_exchange",
    DEVICE_CODE_GRANT: "device_code",
    REFRESH_TOKEN_GRANT: "refresh_token",
}
# Parameters that RFC 6749 §3.2 forbids repeating (audience/resource may repeat, RFC 8693).
_SINGLE_PARAMS = (
    "grant_type",
    "client_id",
    "client_assertion",
    "client_assertion_type",
    "scope",
    "subject_token",
    "subject_token_type",
    "requested_token_type",
    "device_code",
    "refresh_token",
)
_MAX_FORM_BYTES = 64 * 1024
# No vowels, so user codes never spell words.
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"


class SpiffeBundles:
    """The SPIFFE trust domain's JWKS, fetched over HTTP, cached, re-fetched on unknown kid."""

    def __init__(
        self,
        url: str,
        trust_domain: str,
        *,
        max_age: float = 300.0,
        min_refetch_interval: float = 1.0,
    ) -> None:
        self._url = url
        self._trust_domain = trust_domain
        # Re-fetch on an unknown kid (key rotation) but not more than once a second,
        # so a stream of junk assertions cannot turn into a stream of JWKS fetches.
        self._jwks = RemoteJwks(url, max_age=max_age, min_refetch_interval=min_refetch_interval)

    async def close(self) -> None:
        await self._jwks.close()

    async def get(self, *, refresh: bool = False) -> dict[str, dict[str, Any]]:
        try:
            jwks = await self._jwks.jwks(refresh=refresh)
        except JwksUnavailable as exc:
            if exc.status is not None:
                detail = f"SPIFFE JWKS at {self._url} answered HTTP {exc.status}"
            else:
                detail = f"SPIFFE JWKS at {self._url} unavailable ({exc.cause})"
            raise OAuthProblem("temporarily_unavailable", detail, 503) from None
        except JwksMalformed:
            raise OAuthProblem(
                "temporarily_unavailable", f"SPIFFE JWKS at {self._url} is not a JWKS", 503
            ) from None
        return {self._trust_domain: jwks}


@dataclass
class DeviceAuthorization:
    device_code: str = field(repr=False)
    user_code: str
    client_id: str
    scopes: tuple[str, ...]
    expires_at: float
    interval: int
    last_poll: float | None = None
    approved: bool = False


@dataclass(frozen=True)
class RefreshGrant:
    sub: str
    client_id: str
    scopes: tuple[str, ...]
    expires_at: float


@dataclass
class Stats:
    counts: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)

    def record(self, grant: str, policy: str | None, outcome: str) -> None:
        self.counts[(grant, policy or "", outcome)] += 1

    def as_json(self) -> dict[str, Any]:
        by_grant: dict[str, dict[str, int]] = {}
        by_policy: dict[str, dict[str, int]] = {}
        rows = []
        for (grant, policy, outcome), count in sorted(self.counts.items()):
            rows.append(
                {"grant": grant, "policy": policy or None, "outcome": outcome, "count": count}
            )
            slot = by_grant.setdefault(grant, {})
            slot[outcome] = slot.get(outcome, 0) + count
            if policy:
                pslot = by_policy.setdefault(policy, {})
                pslot[outcome] = pslot.get(outcome, 0) + count
        return {
            "total": sum(self.counts.values()),
            "by_grant": by_grant,
            "by_policy": by_policy,
            "requests": rows,
        }


@dataclass
class IdpState:
    settings: IdpSettings
    key: SigningKey
    bundles: SpiffeBundles
    issuer: Issuer | None = None
    devices: dict[str, DeviceAuthorization] = field(default_factory=dict)
    refresh_grants: dict[str, RefreshGrant] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)

    @property
    def urls(self) -> Issuer:
        assert self.issuer is not None, "issuer is set once the port is bound"
        return self.issuer


@dataclass
class RequestRecord:
    """What one token request was about, for the log line and the stats."""

    grant: str
    client: str | None = None
    policy: str | None = None


STATE = web.AppKey("idp_state", IdpState)


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    # Token responses must not be cached (RFC 6749 §5.1).
    return web.json_response(
        body, status=status, headers={"Cache-Control": "no-store", "Pragma": "no-cache"}
    )


async def _read_form(request: web.Request) -> MultiDictProxy[str]:
    if request.content_type != "application/x-www-form-urlencoded":
        raise OAuthProblem(
            "invalid_request", "the request body must be application/x-www-form-urlencoded"
        )
    if request.content_length is not None and request.content_length > _MAX_FORM_BYTES:
        raise OAuthProblem("invalid_request", "the request body is larger than 64 KiB")
    form = await request.post()
    for name in _SINGLE_PARAMS:
        if len(form.getall(name, [])) > 1:
            raise OAuthProblem("invalid_request", f"parameter {name!r} is repeated")
    fields: list[tuple[str, str]] = []
    for name, value in form.items():
        if not isinstance(value, str):
            raise OAuthProblem("invalid_request", f"parameter {name!r} is not a form field")
        fields.append((name, value))
    return MultiDictProxy(MultiDict(fields))


async def _authenticate_client(state: IdpState, form: MultiDictProxy[str]) -> str:
    """The caller's SPIFFE ID, from its JWT-SVID client assertion (RFC 7523 §2.2)."""
    assertion_type = form.get("client_assertion_type")
    assertion = form.get("client_assertion")
    if not assertion or not assertion_type:
        raise invalid_client(
            "client authentication required: client_assertion and client_assertion_type"
        )
    if assertion_type not in (JWT_BEARER_ASSERTION, JWT_SPIFFE_ASSERTION):
        raise invalid_client(f"client_assertion_type {assertion_type!r} is not supported")
    urls = state.urls
    trust_domains = [state.settings.trust_domain]
    audiences = [urls.issuer, urls.token_endpoint]
    bundles = await state.bundles.get()
    try:
        try:
            verified = verify_jwt_svid(
                assertion, bundles=bundles, audience=audiences, trust_domains=trust_domains
            )
        except UnknownKeyError:
            bundles = await state.bundles.get(refresh=True)
            verified = verify_jwt_svid(
                assertion, bundles=bundles, audience=audiences, trust_domains=trust_domains
            )
    except SvidVerificationError as exc:
        raise invalid_client(f"client assertion refused: {exc}") from None
    client_id = form.get("client_id")
    if client_id is not None and client_id != verified.spiffe_id:
        raise invalid_client("client_id does not match the client assertion's subject")
    return verified.spiffe_id


def _token_response(
    token: str, claims: dict[str, Any], now: int, *, issued_token_type: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": max(0, int(claims["exp"]) - now),
    }
    if issued_token_type is not None:
        body["issued_token_type"] = issued_token_type
    if "scope" in claims:
        body["scope"] = claims["scope"]
    return body


def _requested_audiences(form: MultiDictProxy[str]) -> list[str]:
    # RFC 8693 §2.1: audience (logical names) and resource (URIs) both name the target.
    return [*form.getall("audience", []), *form.getall("resource", [])]


async def _client_credentials(
    state: IdpState, form: MultiDictProxy[str], record: RequestRecord
) -> dict[str, Any]:
    client = await _authenticate_client(state, form)
    record.client = client
    scopes = parse_scope(form.get("scope"))
    audiences = _requested_audiences(form) or [state.settings.default_audience]
    check_resource_audiences(audiences, state.settings)
    now = int(time.time())
    claims = base_claims(
        state.urls.issuer,
        sub=client,
        aud=audiences,
        azp=client,
        ttl=state.settings.token_ttl,
        now=now,
        scopes=scopes,
    )
    return _token_response(state.key.sign(claims), claims, now)


async def _token_exchange(
    state: IdpState, form: MultiDictProxy[str], record: RequestRecord
) -> dict[str, Any]:
    client = await _authenticate_client(state, form)
    record.client = client
    subject_token = form.get("subject_token")
    subject_token_type = form.get("subject_token_type")
    if not subject_token or not subject_token_type:
        raise OAuthProblem("invalid_request", "subject_token and subject_token_type are required")
    if subject_token_type not in ACCEPTED_TOKEN_TYPES:
        raise OAuthProblem(
            "invalid_request", f"subject_token_type {subject_token_type!r} is not supported"
        )
    requested_type = form.get("requested_token_type") or ACCESS_TOKEN_TYPE
    if requested_type not in ACCEPTED_TOKEN_TYPES:
        raise OAuthProblem(
            "invalid_request", f"requested_token_type {requested_type!r} is not supported"
        )
    if form.get("actor_token") is not None:
        raise OAuthProblem("invalid_request", "actor_token is not supported")
    scopes = parse_scope(form.get("scope"))
    audiences = _requested_audiences(form)
    subject = state.key.verify(subject_token, state.urls.issuer)
    now = int(time.time())
    if is_user_token(subject, state.settings):
        record.policy = POLICY_INTERMEDIATE
        claims = intermediate_claims(
            state.urls.issuer,
            state.settings,
            caller=client,
            subject=subject,
            audiences=audiences,
            scopes=scopes,
            now=now,
        )
    elif "act" in subject and is_spiffe_id(subject.get("azp")) and audience_list(subject):
        record.policy = POLICY_FINAL
        claims = final_claims(
            state.urls.issuer,
            state.settings,
            caller=client,
            subject=subject,
            audiences=audiences,
            scopes=scopes,
            now=now,
        )
    else:
        raise OAuthProblem(
            "invalid_grant", "subject token is neither a user token nor an intermediate token"
        )
    return _token_response(state.key.sign(claims), claims, now, issued_token_type=requested_type)


def _user_access_claims(
    state: IdpState, sub: str, scopes: tuple[str, ...], now: int, ttl: int, aud: list[str]
) -> dict[str, Any]:
    claims = base_claims(
        state.urls.issuer,
        sub=sub,
        aud=aud,
        azp=state.settings.cli_client_id,
        ttl=ttl,
        now=now,
        scopes=scopes,
    )
    claims["preferred_username"] = sub
    return claims


def _issue_user_tokens(state: IdpState, sub: str, scopes: tuple[str, ...]) -> dict[str, Any]:
    now = int(time.time())
    settings = state.settings
    claims = _user_access_claims(
        state, sub, scopes, now, settings.token_ttl, [settings.user_audience]
    )
    refresh_token = secrets.token_urlsafe(32)
    state.refresh_grants[refresh_token] = RefreshGrant(
        sub=sub,
        client_id=settings.cli_client_id,
        scopes=scopes,
        expires_at=time.time() + settings.refresh_ttl,
    )
    body = _token_response(state.key.sign(claims), claims, now)
    body["refresh_token"] = refresh_token
    body["refresh_expires_in"] = settings.refresh_ttl
    return body


def _public_client(state: IdpState, form: MultiDictProxy[str]) -> str:
    client_id = form.get("client_id")
    if client_id != state.settings.cli_client_id:
        raise invalid_client(f"unknown public client {client_id!r}")
    return client_id


async def _device_code(
    state: IdpState, form: MultiDictProxy[str], record: RequestRecord
) -> dict[str, Any]:
    record.client = _public_client(state, form)
    device_code = form.get("device_code")
    if not device_code:
        raise OAuthProblem("invalid_request", "device_code is required")
    device = state.devices.get(device_code)
    if device is None or device.client_id != record.client:
        raise OAuthProblem("invalid_grant", "unknown or already used device_code")
    now = time.monotonic()
    if now >= device.expires_at:
        del state.devices[device_code]
        raise OAuthProblem("expired_token", "the device_code has expired; start again")
    # RFC 8628 §3.5: polling faster than the interval earns slow_down and a longer interval.
    if device.last_poll is not None and now - device.last_poll < device.interval:
        device.interval += state.settings.device_slow_down
        device.last_poll = now
        raise OAuthProblem(
            "slow_down", f"polling too fast; wait at least {device.interval} s between requests"
        )
    device.last_poll = now
    if not device.approved:
        # The dev user "approves" after the first poll, so clients exercise polling.
        device.approved = True
        raise OAuthProblem("authorization_pending", "the user has not yet approved the request")
    del state.devices[device_code]
    return _issue_user_tokens(state, state.settings.dev_user, device.scopes)


async def _refresh_token(
    state: IdpState, form: MultiDictProxy[str], record: RequestRecord
) -> dict[str, Any]:
    record.client = _public_client(state, form)
    refresh_token = form.get("refresh_token")
    if not refresh_token:
        raise OAuthProblem("invalid_request", "refresh_token is required")
    grant = state.refresh_grants.get(refresh_token)
    if grant is None or grant.client_id != record.client:
        raise OAuthProblem("invalid_grant", "unknown or already used refresh token")
    if time.time() >= grant.expires_at:
        del state.refresh_grants[refresh_token]
        raise OAuthProblem("invalid_grant", "the refresh token has expired")
    scopes = grant.scopes
    requested = parse_scope(form.get("scope"))
    if requested:
        if not set(requested) <= set(grant.scopes):
            raise OAuthProblem("invalid_scope", "refresh may not widen the granted scope")
        scopes = requested
    # Rotation: a refresh token works once (RFC 6749 §10.4 / OAuth 2.0 Security BCP).
    del state.refresh_grants[refresh_token]
    return _issue_user_tokens(state, grant.sub, scopes)


async def token_endpoint(request: web.Request) -> web.Response:
    state = request.app[STATE]
    record = RequestRecord(grant="unknown")
    try:
        form = await _read_form(request)
        grant_type = form.get("grant_type")
        record.grant = _GRANT_NAMES.get(grant_type or "", "unsupported")
        if grant_type == CLIENT_CREDENTIALS_GRANT:
            body = await _client_credentials(state, form, record)
        elif grant_type == TOKEN_EXCHANGE_GRANT:
            body = await _token_exchange(state, form, record)
        elif grant_type == DEVICE_CODE_GRANT:
            body = await _device_code(state, form, record)
        elif grant_type == REFRESH_TOKEN_GRANT:
            body = await _refresh_token(state, form, record)
        elif not grant_type:
            record.grant = "missing"
            raise OAuthProblem("invalid_request", "grant_type is required")
        else:
            raise OAuthProblem(
                "unsupported_grant_type", f"grant_type {grant_type[:100]!r} is not supported"
            )
    except OAuthProblem as problem:
        state.stats.record(record.grant, record.policy, problem.error)
        log.info(
            "token request refused",
            extra={
                "grant": record.grant,
                "client": record.client,
                "policy": record.policy,
                "outcome": problem.error,
                "status": problem.status,
                "detail": problem.description,
            },
        )
        return _json(problem.body(), problem.status)
    state.stats.record(record.grant, record.policy, "ok")
    log.info(
        "token issued",
        extra={
            "grant": record.grant,
            "client": record.client,
            "policy": record.policy,
            "outcome": "ok",
            "status": 200,
        },
    )
    return _json(body)


async def device_authorization(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        form = await _read_form(request)
        client_id = _public_client(state, form)
        scopes = parse_scope(form.get("scope"))
    except OAuthProblem as problem:
        log.info(
            "device authorization refused",
            extra={"outcome": problem.error, "status": problem.status},
        )
        return _json(problem.body(), problem.status)
    device_code = secrets.token_urlsafe(32)
    user_code = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(8))
    user_code = f"{user_code[:4]}-{user_code[4:]}"
    settings = state.settings
    state.devices[device_code] = DeviceAuthorization(
        device_code=device_code,
        user_code=user_code,
        client_id=client_id,
        scopes=scopes,
        expires_at=time.monotonic() + settings.device_code_ttl,
        interval=settings.device_interval,
    )
    urls = state.urls
    log.info("device authorization started", extra={"client": client_id, "outcome": "ok"})
    return _json(
        {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": urls.verification_uri,
            "verification_uri_complete": f"{urls.verification_uri}?user_code={user_code}",
            "expires_in": settings.device_code_ttl,
            "interval": settings.device_interval,
        }
    )


async def device_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(
        text=f"tokenferry dev IdP: device logins are approved automatically "
        f"as {state.settings.dev_user!r}.\n"
    )


async def discovery(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(state.urls.discovery(state.key.alg, ALLOWED_ALGORITHMS))


async def jwks(request: web.Request) -> web.Response:
    return web.json_response({"keys": [request.app[STATE].key.jwk()]})


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise OAuthProblem("invalid_request", "body is not JSON") from None
    if not isinstance(body, dict):
        raise OAuthProblem("invalid_request", "body is not a JSON object")
    return body


async def dev_user_token(request: web.Request) -> web.Response:
    """Mint a user subject token, as a user login would (tests and demo only)."""
    state = request.app[STATE]
    settings = state.settings
    try:
        body = _json_object(await request.read())
        unknown = set(body) - {"sub", "ttl", "aud", "scope"}
        if unknown:
            raise OAuthProblem("invalid_request", f"unknown fields: {', '.join(sorted(unknown))}")
        sub = body.get("sub", settings.dev_user)
        if not isinstance(sub, str) or not sub or len(sub) > 255:
            raise OAuthProblem("invalid_request", "sub must be a non-empty string")
        ttl = body.get("ttl", settings.token_ttl)
        # Negative lifetimes mint already-expired tokens, for tests of expiry handling.
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not -86400 <= ttl <= 86400:
            raise OAuthProblem("invalid_request", "ttl must be an integer in -86400..86400")
        aud = body.get("aud", settings.user_audience)
        audiences = [aud] if isinstance(aud, str) else aud
        if (
            not isinstance(audiences, list)
            or not audiences
            or not all(isinstance(a, str) and a for a in audiences)
        ):
            raise OAuthProblem("invalid_request", "aud must be a string or a list of strings")
        scope = body.get("scope")
        if scope is not None and not isinstance(scope, str):
            raise OAuthProblem("invalid_request", "scope must be a space-separated string")
        scopes = parse_scope(scope)
    except OAuthProblem as problem:
        return _json(problem.body(), 400)
    now = int(time.time())
    claims = _user_access_claims(state, sub, scopes, now, ttl, list(audiences))
    log.info("dev user token minted", extra={"sub": sub, "outcome": "ok"})
    return _json({"access_token": state.key.sign(claims), "expires_in": ttl})


async def dev_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].stats.as_json())


def build_app(state: IdpState) -> web.Application:
    app = web.Application(client_max_size=_MAX_FORM_BYTES)
    app[STATE] = state

    async def bundles_context(app: web.Application) -> AsyncIterator[None]:
        yield
        await app[STATE].bundles.close()

    app.cleanup_ctx.append(bundles_context)
    prefix = "/realms/dev"
    app.router.add_get(f"{prefix}/.well-known/openid-configuration", discovery)
    app.router.add_get(f"{prefix}/protocol/openid-connect/certs", jwks)
    app.router.add_post(f"{prefix}/protocol/openid-connect/token", token_endpoint)
    app.router.add_post(f"{prefix}/protocol/openid-connect/auth/device", device_authorization)
    app.router.add_get(f"{prefix}/device", device_page)
    app.router.add_post(f"{prefix}/dev/user-token", dev_user_token)
    app.router.add_get(f"{prefix}/dev/stats", dev_stats)
    return app


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="e.g. 127.0.0.1:0")
    parser.add_argument(
        "--spiffe-jwks", required=True, metavar="URL", help="JWKS of the SPIFFE trust domain"
    )
    parser.add_argument("--trust-domain", default="example.org")
    parser.add_argument(
        "--gateway-id",
        action="append",
        default=[],
        metavar="SPIFFE_ID",
        help="SPIFFE ID allowed the intermediate exchange (repeatable; "
        "default spiffe://<trust-domain>/gateway)",
    )
    parser.add_argument(
        "--sandbox-prefix",
        default=None,
        metavar="PREFIX",
        help="intermediate audiences must start with this (default spiffe://<trust-domain>/sandbox/)",
    )
    parser.add_argument("--dev-user", default="alice", help="the user device logins approve")
    parser.add_argument("--user-audience", default="tokenferry", help="aud of user tokens")
    parser.add_argument("--cli-client-id", default="tokenferry-cli", help="device-flow client")
    parser.add_argument(
        "--default-audience",
        default="account",
        help="aud of workload tokens when the request names none",
    )
    parser.add_argument("--token-ttl", type=int, default=300, metavar="SECONDS")
    parser.add_argument("--refresh-ttl", type=int, default=8 * 3600, metavar="SECONDS")
    parser.add_argument("--device-interval", type=int, default=5, metavar="SECONDS")
    parser.add_argument(
        "--device-slow-down",
        type=int,
        default=5,
        metavar="SECONDS",
        help="added to the polling interval on each slow_down (RFC 8628: 5)",
    )
    parser.add_argument("--alg", choices=("ES256", "RS256"), default="ES256")
    parser.add_argument("--log-level", default="info")


def settings_from_args(args: argparse.Namespace) -> IdpSettings:
    td: str = args.trust_domain
    gateway_ids = frozenset(args.gateway_id or [f"spiffe://{td}/gateway"])
    for gateway_id in gateway_ids:
        if not is_spiffe_id(gateway_id):
            raise UserError(f"--gateway-id {gateway_id!r} is not a SPIFFE ID")
    prefix: str = args.sandbox_prefix or f"spiffe://{td}/sandbox/"
    if not prefix.startswith("spiffe://"):
        raise UserError(f"--sandbox-prefix {prefix!r} must start with spiffe://")
    # Without the trailing slash, "sandbox/" would also admit "sandboxes-of-others/...".
    if not prefix.endswith("/"):
        prefix += "/"
    for name in ("token_ttl", "refresh_ttl"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.device_interval < 0 or args.device_slow_down < 0:
        raise UserError("--device-interval and --device-slow-down must not be negative")
    return IdpSettings(
        trust_domain=td,
        gateway_ids=gateway_ids,
        sandbox_prefix=prefix,
        dev_user=args.dev_user,
        user_audience=args.user_audience,
        cli_client_id=args.cli_client_id,
        default_audience=args.default_audience,
        token_ttl=args.token_ttl,
        refresh_ttl=args.refresh_ttl,
        device_interval=args.device_interval,
        device_slow_down=args.device_slow_down,
        alg=args.alg,
    )


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        raise UserError(f"--listen: {exc}") from None
    spiffe_jwks: str = args.spiffe_jwks
    if not spiffe_jwks.startswith(("http://", "https://")):
        raise UserError(f"--spiffe-jwks {spiffe_jwks!r} is not an http(s) URL")
    settings = settings_from_args(args)
    state = IdpState(
        settings=settings,
        key=SigningKey.generate(settings.alg),
        bundles=SpiffeBundles(spiffe_jwks, settings.trust_domain),
    )

    def on_bound(bound_port: int) -> None:
        state.issuer = Issuer(f"http://{url_host(host)}:{bound_port}/realms/dev")
        announce_ready(
            "dev-idp",
            issuer=state.issuer.issuer,
            token_endpoint=state.issuer.token_endpoint,
            url=f"http://{url_host(host)}:{bound_port}",
            jwks_uri=state.issuer.jwks_uri,
            device_authorization_endpoint=state.issuer.device_authorization_endpoint,
        )

    try:
        asyncio.run(serve(build_app(state), host, port, on_bound=on_bound))
    except OSError as exc:
        raise UserError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    return 0

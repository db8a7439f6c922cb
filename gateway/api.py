"""HTTP handlers of the gateway API (SPEC §6): parse, delegate, answer.

Parsing lives here (every malformed body is a 400 naming the field); the rules live in
``gateway.records`` and ``gateway.broker``; authentication in ``gateway.auth``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway import records
from gateway.auth import (
    AuthenticationFailed,
    IdentityUnavailable,
    SupervisorAuthenticator,
    User,
    UserAuthenticator,
)
from gateway.broker import Broker
from gateway.errors import (
    ApiError,
    forbidden,
    identity_unavailable,
    invalid_request,
    unauthenticated,
)
from gateway.metrics import GatewayMetrics
from gateway.store import CredentialWrite, Store
from gateway.trust import EndpointTrust, TrustedEndpoints, TrustUnavailable
from tokenferry.profiles import Problem, Profile, ProfileError, load_profile_text, parse_profile
from tokenferry.svid_verify import VerifiedSvid, parse_spiffe_id
from tokenferry.tokens import peek_jwt_claims

log = logging.getLogger("tokenferry.gateway.api")

MAX_BODY_BYTES = 1024 * 1024
MAX_CREDENTIAL_BYTES = 16 * 1024


class AuthSettings:
    """What ``GET /v1/auth/config`` answers (fixed at startup)."""

    def __init__(
        self, *, issuer: str, client_id: str, audience: str, supervisor_audience: str
    ) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self.audience = audience
        self.supervisor_audience = supervisor_audience

    def body(self) -> dict[str, str]:
        return {
            "issuer": self.issuer,
            "client_id": self.client_id,
            "audience": self.audience,
            "supervisor_audience": self.supervisor_audience,
        }


STORE = web.AppKey("store", Store)
BROKER = web.AppKey("broker", Broker)
USERS = web.AppKey("users", UserAuthenticator)
SUPERVISORS = web.AppKey("supervisors", SupervisorAuthenticator)
METRICS = web.AppKey("metrics", GatewayMetrics)
AUTH_SETTINGS = web.AppKey("auth_settings", AuthSettings)
TRUST_DOMAINS = web.AppKey("trust_domains", frozenset)
TRUST = web.AppKey("trust", EndpointTrust)
PROFILES_ADMIN_ONLY = web.AppKey("profiles_admin_only", bool)


# --- parsing helpers --------------------------------------------------------------


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise invalid_request(f"request body is larger than {MAX_BODY_BYTES} bytes") from None
    if not raw:
        raise invalid_request("request body is empty; expected a JSON object")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise invalid_request("request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise invalid_request(
            f"request body is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except _NotJson as exc:
        raise invalid_request(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        # The decoder recurses per nesting level; a body of brackets must not be a 500.
        raise invalid_request("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise invalid_request("request body must be a JSON object")
    where = _lone_surrogate_path(data)
    if where is not None:
        # "\ud800" is a valid JSON escape but no text: it cannot be stored or logged.
        raise invalid_request(
            f"field {where!r} holds a lone UTF-16 surrogate escape, which is not text",
            field=where,
        )
    return data


class _NotJson(ValueError):
    pass


def _refuse_constant(name: str) -> object:
    # Python's decoder accepts NaN and Infinity; JSON (RFC 8259) does not.
    raise _NotJson(f"{name} is not a JSON value")


def _lone_surrogate_path(data: object) -> str | None:
    """The dotted path of the first string (key or value) that cannot be UTF-8 encoded."""
    stack: list[tuple[str, object]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "(body)"
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return path or "(body)"
                stack.append((child, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def reject_unknown_fields(data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """A misspelt optional field would otherwise be silently ignored."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise invalid_request(
            f"unknown field {unknown[0]!r} (allowed: {', '.join(allowed)})", field=unknown[0]
        )


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


def required_text(data: Mapping[str, Any], field: str) -> str:
    value = data.get(field)
    if value is None:
        raise invalid_request(f"field {field!r} is required", field=field)
    if not isinstance(value, str) or not value:
        raise invalid_request(
            f"field {field!r} must be a non-empty string, got {_type(value)}", field=field
        )
    return value


def optional_text(data: Mapping[str, Any], field: str) -> str | None:
    if data.get(field) is None:
        return None
    return required_text(data, field)


def parse_expiry(value: object, field: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid_request(
            f"field {field!r} must be an ISO 8601 date-time string, got {_type(value)}",
            field=field,
        )
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise invalid_request(
            f"field {field!r}: {value[:60]!r} is not an ISO 8601 date-time", field=field
        ) from None
    if moment.tzinfo is None:
        raise invalid_request(
            f"field {field!r}: {value[:60]!r} has no time zone (add 'Z' or an offset)",
            field=field,
        )
    epoch = moment.timestamp()
    if not representable(epoch):
        raise invalid_request(
            f"field {field!r}: {value[:60]!r} is outside the years 1-9999 in UTC", field=field
        )
    return epoch


def representable(epoch: float) -> bool:
    """Whether an expiry can be shown back as an ISO 8601 UTC date-time (year 1-9999).

    Stored, an expiry that cannot be would make every read of its provider fail.
    """
    if not math.isfinite(epoch):
        return False
    try:
        datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, OSError, ValueError):
        return False
    return True


def parse_credential(value: object, field: str, *, allow_null: bool) -> CredentialWrite | None:
    """``"token"``, ``{"value": ..., "expires_at": ...}`` or (PATCH only) null = remove."""
    if value is None:
        if allow_null:
            return None
        raise invalid_request(f"field {field!r}: null is only allowed in updates", field=field)
    expires_at: float | None = None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"value", "expires_at"})
        if unknown:
            raise invalid_request(
                f"field {field!r}: unknown key {unknown[0]!r} (expected value, expires_at)",
                field=f"{field}.{unknown[0]}",
            )
        if "value" not in value:
            # Without this, {"expires_at": ...} alone would read as "change the expiry" but
            # would drop the stored value: make the caller say which it means.
            raise invalid_request(
                f"field {field!r}: 'value' is required (a string, or null to record the "
                "credential without a value)",
                field=f"{field}.value",
            )
        expires_at = parse_expiry(value.get("expires_at"), f"{field}.expires_at")
        secret = value.get("value")
        secret_field = f"{field}.value"
    else:
        secret, secret_field = value, field
    if secret is not None:
        if not isinstance(secret, str) or not secret:
            raise invalid_request(
                f"field {secret_field!r} must be a non-empty string, got {_type(secret)}",
                field=secret_field,
            )
        if len(secret.encode()) > MAX_CREDENTIAL_BYTES:
            raise invalid_request(
                f"field {secret_field!r} is longer than {MAX_CREDENTIAL_BYTES} bytes",
                field=secret_field,
            )
        if expires_at is None:
            # A JWT subject token carries its own expiry: record it so the broker can
            # refuse an expired token with a clear 409 instead of an IdP error.
            claims = peek_jwt_claims(secret)
            exp = claims.get("exp") if claims else None
            if isinstance(exp, int | float) and not isinstance(exp, bool):
                expires_at = float(exp)
                if not representable(expires_at):
                    raise invalid_request(
                        f"field {secret_field!r}: the value is a JWT whose 'exp' claim is not "
                        "a usable time; give 'expires_at' explicitly",
                        field=secret_field,
                    )
    return CredentialWrite(secret, expires_at)


def parse_credentials(
    data: Mapping[str, Any], *, allow_null: bool
) -> dict[str, CredentialWrite | None]:
    raw = data.get("credentials")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise invalid_request(
            f"field 'credentials' must be an object of name -> value, got {_type(raw)}",
            field="credentials",
        )
    return {
        str(name): parse_credential(value, f"credentials.{name}", allow_null=allow_null)
        for name, value in raw.items()
    }


def parse_spiffe(value: str, field: str, trust_domains: frozenset[str]) -> str:
    try:
        trust_domain, _path = parse_spiffe_id(value)
    except ValueError as exc:
        raise invalid_request(
            f"field {field!r}: {value[:80]!r} is not a SPIFFE ID ({exc})", field=field
        ) from None
    if trust_domain not in trust_domains:
        raise invalid_request(
            f"field {field!r}: trust domain {trust_domain!r} is not allowed "
            f"(allowed: {', '.join(sorted(trust_domains))})",
            field=field,
        )
    return value


def parse_provider_list(data: Mapping[str, Any]) -> list[str] | None:
    raw = data.get("providers")
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        raise invalid_request(
            "field 'providers' must be a list of provider names", field="providers"
        )
    return list(dict.fromkeys(raw))


def answer(
    body: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    response = web.json_response(body, status=status, headers=headers)
    response.headers["Cache-Control"] = "no-store"
    return response


# --- authentication ---------------------------------------------------------------


async def user_of(request: web.Request) -> User:
    try:
        return await request.app[USERS].authenticate(request.headers.get("Authorization"))
    except AuthenticationFailed as exc:
        raise unauthenticated(str(exc)) from None
    except IdentityUnavailable as exc:
        raise identity_unavailable(str(exc)) from None


async def supervisor_of(request: web.Request) -> VerifiedSvid:
    try:
        return await request.app[SUPERVISORS].authenticate(request.headers.get("Authorization"))
    except AuthenticationFailed as exc:
        raise unauthenticated(str(exc)) from None
    except IdentityUnavailable as exc:
        raise identity_unavailable(str(exc)) from None


# --- handlers ---------------------------------------------------------------------


async def auth_config(request: web.Request) -> web.Response:
    return answer(request.app[AUTH_SETTINGS].body())


def _profile_problems(exc: ProfileError, fallback_field: str) -> ApiError:
    problems = exc.problems
    first = problems[0] if problems else None
    return invalid_request(
        "invalid profile: "
        + ("; ".join(f"{p.path or '(profile)'}: {p.message}" for p in problems) or str(exc)),
        field=(first.path if first and first.path else fallback_field),
        problems=[p.to_dict() for p in problems],
    )


def parse_profile_body(body: Mapping[str, Any]) -> tuple[Profile, tuple[Problem, ...], str]:
    """``{"source": "<YAML or JSON text>"}`` or ``{"profile": {...}}``."""
    reject_unknown_fields(body, ("source", "profile"))
    if "source" in body:
        source = required_text(body, "source")
        try:
            profile, warnings = load_profile_text(source, "profile")
        except ProfileError as exc:
            raise _profile_problems(exc, "source") from None
        return profile, warnings, source
    if "profile" in body:
        data = body["profile"]
        if not isinstance(data, dict):
            raise invalid_request(
                f"field 'profile' must be an object, got {_type(data)}", field="profile"
            )
        try:
            profile, warnings = parse_profile(data, source="profile")
        except ProfileError as exc:
            raise _profile_problems(exc, "profile") from None
        return profile, warnings, json.dumps(data, indent=2, sort_keys=True)
    raise invalid_request(
        "field 'source' (profile YAML/JSON text) or 'profile' (object) is required",
        field="source",
    )


async def trusted_endpoints(request: web.Request) -> TrustedEndpoints:
    try:
        return await request.app[TRUST].resolve()
    except TrustUnavailable as exc:
        raise identity_unavailable(str(exc)) from None


def untrusted_profile(problems: list[tuple[str, str]]) -> ApiError:
    found = [Problem("profile", path, message) for path, message in problems]
    return invalid_request(
        "untrusted profile: " + "; ".join(f"{p.path}: {p.message}" for p in found),
        field=found[0].path,
        problems=[p.to_dict() for p in found],
    )


async def create_profile(request: web.Request) -> web.Response:
    user = await user_of(request)
    if request.app[PROFILES_ADMIN_ONLY] and not user.admin:
        raise forbidden("only an admin may register profiles on this gateway")
    profile, warnings, source = parse_profile_body(await json_body(request))
    # Where the gateway and supervisors will send SVIDs and subject tokens: only to
    # endpoints the operator trusts (gateway.trust), checked before anything is stored.
    problems = (await trusted_endpoints(request)).profile_problems(profile)
    if problems:
        raise untrusted_profile(problems)
    view = await records.create_profile(request.app[STORE], profile, source)
    log.info("profile registered", extra={"profile": profile.id})
    return answer({**view, "warnings": [w.to_dict() for w in warnings]}, status=201)


async def list_profiles(request: web.Request) -> web.Response:
    await user_of(request)
    return answer({"profiles": await records.list_profiles(request.app[STORE])})


async def get_profile(request: web.Request) -> web.Response:
    await user_of(request)
    return answer(await records.get_profile(request.app[STORE], request.match_info["id"]))


async def delete_profile(request: web.Request) -> web.Response:
    user = await user_of(request)
    if not user.admin:
        # Profiles are shared by every provider; only an admin may remove one.
        raise forbidden("only an admin may delete profiles")
    await records.delete_profile(request.app[STORE], request.match_info["id"])
    return web.Response(status=204)


async def create_provider(request: web.Request) -> web.Response:
    user = await user_of(request)
    body = await json_body(request)
    reject_unknown_fields(body, ("name", "profile", "credentials", "owner"))
    name = required_text(body, "name")
    profile_id = required_text(body, "profile")
    credentials = parse_credentials(body, allow_null=False)
    writes = {k: v for k, v in credentials.items() if v is not None}
    view = await records.create_provider(
        request.app[STORE],
        user,
        name=name,
        profile_id=profile_id,
        credentials=writes,
        owner=optional_text(body, "owner"),
    )
    log.info(
        "provider created",
        extra={"provider": name, "owner": view["owner"], "revision": view["revision"]},
    )
    return answer(view, status=201)


async def list_providers(request: web.Request) -> web.Response:
    await user_of(request)
    return answer({"providers": await records.list_providers(request.app[STORE])})


async def get_provider(request: web.Request) -> web.Response:
    await user_of(request)
    return answer(await records.get_provider(request.app[STORE], request.match_info["name"]))


async def update_provider(request: web.Request) -> web.Response:
    user = await user_of(request)
    body = await json_body(request)
    unknown = sorted(set(body) - {"credentials", "profile"})
    if unknown:
        raise invalid_request(
            f"field {unknown[0]!r} cannot be changed (allowed: credentials, profile)",
            field=unknown[0],
        )
    profile_id = optional_text(body, "profile")
    credentials = parse_credentials(body, allow_null=True)
    if profile_id is None and not credentials:
        raise invalid_request("nothing to change: give 'credentials' and/or 'profile'")
    name = request.match_info["name"]
    view = await records.update_provider(
        request.app[STORE], user, name, profile_id=profile_id, credentials=credentials
    )
    log.info("provider updated", extra={"provider": name, "revision": view["revision"]})
    return answer(view)


async def delete_provider(request: web.Request) -> web.Response:
    user = await user_of(request)
    name = request.match_info["name"]
    await records.delete_provider(request.app[STORE], user, name)
    log.info("provider deleted", extra={"provider": name})
    return web.Response(status=204)


async def put_sandbox(request: web.Request) -> web.Response:
    user = await user_of(request)
    body = await json_body(request)
    reject_unknown_fields(body, ("spiffe_id", "providers"))
    spiffe_id = parse_spiffe(
        required_text(body, "spiffe_id"), "spiffe_id", request.app[TRUST_DOMAINS]
    )
    providers = parse_provider_list(body)
    view, created = await records.put_sandbox(
        request.app[STORE],
        user,
        request.match_info["name"],
        spiffe_id=spiffe_id,
        providers=providers,
    )
    log.info("sandbox registered", extra={"sandbox": view["name"], "spiffe_id": spiffe_id})
    return answer(view, status=201 if created else 200)


async def list_sandboxes(request: web.Request) -> web.Response:
    await user_of(request)
    return answer({"sandboxes": await records.list_sandboxes(request.app[STORE])})


async def get_sandbox(request: web.Request) -> web.Response:
    await user_of(request)
    return answer(await records.get_sandbox(request.app[STORE], request.match_info["name"]))


async def delete_sandbox(request: web.Request) -> web.Response:
    user = await user_of(request)
    await records.delete_sandbox(request.app[STORE], user, request.match_info["name"])
    return web.Response(status=204)


async def attach_provider(request: web.Request) -> web.Response:
    user = await user_of(request)
    view = await records.attach(
        request.app[STORE], user, request.match_info["name"], request.match_info["provider"]
    )
    return answer(view)


async def detach_provider(request: web.Request) -> web.Response:
    user = await user_of(request)
    view = await records.detach(
        request.app[STORE], user, request.match_info["name"], request.match_info["provider"]
    )
    return answer(view)


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    candidates = [c.strip().removeprefix("W/") for c in header.split(",")]
    return "*" in candidates or etag in candidates


async def supervisor_config(request: web.Request) -> web.Response:
    svid = await supervisor_of(request)
    body, etag = await records.supervisor_config(
        request.app[STORE], svid.spiffe_id, await trusted_endpoints(request)
    )
    if _etag_matches(request.headers.get("If-None-Match"), etag):
        return web.Response(status=304, headers={"ETag": etag, "Cache-Control": "no-store"})
    return answer(body, headers={"ETag": etag})


async def intermediate_token(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    outcome = "internal"
    try:
        # SPEC §6 order: body fields first, then the SVID, then the broker's checks.
        body = await json_body(request)
        provider = required_text(body, "provider")
        credential = required_text(body, "credential")
        svid = await supervisor_of(request)
        token = await request.app[BROKER].intermediate_token(svid.spiffe_id, provider, credential)
        outcome = "ok"
    except ApiError as exc:
        outcome = exc.code
        # Refusals are logged too (code and detail never hold a token); details can quote
        # caller-supplied names, so they are cut short.
        log.info(
            "intermediate token refused",
            extra={"error": exc.code, "status": exc.status, "detail": exc.detail[:300]},
        )
        raise
    finally:
        metrics.broker_requests.labels(outcome).inc()
    log.info(
        "intermediate token issued",
        extra={
            "supervisor": svid.spiffe_id,
            "provider": provider,
            "credential": credential,
            "cache": token.cache,
            "expires_in": token.expires_in,
        },
    )
    return answer(token.body())


# --- app plumbing -----------------------------------------------------------------


def _route_name(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    canonical = getattr(resource, "canonical", None)
    return canonical if isinstance(canonical, str) else "unmatched"


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as exc:
        status = exc.status
        return answer(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        status = exc.status
        code = {404: "not_found", 405: "method_not_allowed", 413: "invalid_request"}.get(
            exc.status, "invalid_request" if exc.status < 500 else "internal"
        )
        detail = exc.reason if exc.status != 404 else f"no such endpoint: {request.path[:200]}"
        return answer({"error": code, "detail": detail}, status=exc.status)
    except Exception as exc:
        # Exception text may hold request data; log the type only.
        log.error("unhandled error", extra={"error_type": type(exc).__name__})
        status = 500
        return answer({"error": "internal", "detail": "internal error"}, status=500)
    finally:
        route = _route_name(request)
        request.app[METRICS].api_requests.labels(request.method, route, str(status)).inc()
        log.debug(
            "request",
            extra={
                "method": request.method,
                "route": route,
                "status": status,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/auth/config", auth_config)
    app.router.add_post("/v1/profiles", create_profile)
    app.router.add_get("/v1/profiles", list_profiles)
    app.router.add_get("/v1/profiles/{id}", get_profile)
    app.router.add_delete("/v1/profiles/{id}", delete_profile)
    app.router.add_post("/v1/providers", create_provider)
    app.router.add_get("/v1/providers", list_providers)
    app.router.add_get("/v1/providers/{name}", get_provider)
    app.router.add_patch("/v1/providers/{name}", update_provider)
    app.router.add_delete("/v1/providers/{name}", delete_provider)
    app.router.add_put("/v1/sandboxes/{name}", put_sandbox)
    app.router.add_get("/v1/sandboxes", list_sandboxes)
    app.router.add_get("/v1/sandboxes/{name}", get_sandbox)
    app.router.add_delete("/v1/sandboxes/{name}", delete_sandbox)
    app.router.add_put("/v1/sandboxes/{name}/providers/{provider}", attach_provider)
    app.router.add_delete("/v1/sandboxes/{name}/providers/{provider}", detach_provider)
    app.router.add_get("/v1/supervisor/config", supervisor_config)
    app.router.add_post("/v1/supervisor/intermediate-token", intermediate_token)

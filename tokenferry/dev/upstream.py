"""``tokenferry dev upstream``: a protected API that checks IdP tokens and echoes them.

SPEC §8. Every path except ``/dev/stats`` requires ``Authorization: Bearer <JWT>``
signed by the IdP (discovery → JWKS), with the configured audience, not expired (no
leeway: tests count the 401s an expired cached token earns) and, when configured, the
scopes. The answer shows the verified claims and what arrived (method, path, header
*names*, body size and digest), never a header value. Streaming endpoints exercise the
proxy: ``/events`` (SSE), ``/ws`` (WebSocket echo), ``/bytes/N``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWKError,
    PyJWTError,
)

from tokenferry.cli.main import UserError
from tokenferry.dev.certs import ensure_self_signed
from tokenferry.dev.serving import parse_listen, serve, url_host
from tokenferry.jwks import IssuerDiscovery, JwksMalformed, JwksUnavailable, RemoteJwks
from tokenferry.service import announce_ready, configure_logging
from tokenferry.svid_verify import ALLOWED_ALGORITHMS

DESCRIPTION = "dev protected API: checks IdP bearer tokens, echoes claims, SSE/WebSocket/bytes"

log = logging.getLogger("tokenferry.dev.upstream")

MAX_BYTES = 1 << 30
_CHUNK = 64 * 1024
_MAX_EVENTS = 10_000
_MAX_INTERVAL = 60.0


class TokenRefused(Exception):
    """The bearer token was refused; ``reason`` is safe to show (never the token)."""

    def __init__(self, reason: str, *, status: int = 401, error: str = "invalid_token") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.error = error


class IssuerKeys:
    """The issuer's JWKS via OIDC discovery; cached, re-fetched on an unknown kid."""

    def __init__(self, issuer: str, *, min_refetch_interval: float = 1.0) -> None:
        self.issuer = issuer.rstrip("/")
        # No max age: only a token naming a key we do not know (rotation) re-fetches.
        self._jwks = RemoteJwks(
            IssuerDiscovery(self.issuer, check_issuer=False),
            max_age=math.inf,
            min_refetch_interval=min_refetch_interval,
        )

    async def close(self) -> None:
        await self._jwks.close()

    async def key(self, kid: str) -> dict[str, Any] | None:
        try:
            return await self._jwks.key(kid)
        except JwksUnavailable as exc:
            if exc.status is not None:
                reason = f"issuer metadata at {exc.url} answered HTTP {exc.status}"
            else:
                reason = f"issuer metadata at {exc.url} unavailable ({exc.cause})"
            raise TokenRefused(reason, status=503, error="temporarily_unavailable") from None
        except JwksMalformed as exc:
            if exc.document == "discovery":
                reason = "issuer discovery has no jwks_uri"
            else:
                reason = "issuer JWKS has no keys"
            raise TokenRefused(reason, status=503, error="server_error") from None


@dataclass
class UpstreamState:
    keys: IssuerKeys
    audience: str
    scopes: tuple[str, ...]
    counts: collections.Counter[int] = field(default_factory=collections.Counter)


STATE = web.AppKey("upstream_state", UpstreamState)
CLAIMS_KEY = "tokenferry.claims"


async def verify_bearer(state: UpstreamState, authorization: str | None) -> dict[str, Any]:
    if not authorization:
        raise TokenRefused("missing Authorization header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenRefused("Authorization is not a Bearer token")
    token = token.strip()
    try:
        header = jwt.get_unverified_header(token)
    except PyJWTError:
        raise TokenRefused("bearer token is not a JWT") from None
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise TokenRefused(f"token algorithm {alg!r} is not allowed")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise TokenRefused("token header has no kid")
    jwk = await state.keys.key(kid)
    if jwk is None:
        raise TokenRefused(f"token key id {kid!r} is not in the issuer's JWKS")
    try:
        key = jwt.PyJWK(jwk, algorithm=alg)
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=state.audience,
            issuer=state.keys.issuer,
            leeway=0,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
    except ExpiredSignatureError:
        raise TokenRefused("token has expired") from None
    except InvalidAudienceError:
        raise TokenRefused(f"token audience does not include {state.audience!r}") from None
    except InvalidIssuerError:
        raise TokenRefused(f"token issuer is not {state.keys.issuer!r}") from None
    except InvalidSignatureError:
        raise TokenRefused("token signature does not verify") from None
    except MissingRequiredClaimError as exc:
        raise TokenRefused(f"token has no {exc.claim} claim") from None
    except ImmatureSignatureError:
        raise TokenRefused("token is not valid yet") from None
    except (PyJWTError, PyJWKError) as exc:
        raise TokenRefused(f"token is invalid ({type(exc).__name__})") from None
    granted = str(claims.get("scope", "")).split()
    missing = [s for s in state.scopes if s not in granted]
    if missing:
        # RFC 6750 §3.1: a valid token without the needed scope is 403 insufficient_scope.
        raise TokenRefused(
            f"token lacks scope {' '.join(missing)!r}", status=403, error="insufficient_scope"
        )
    return claims


def _refusal(refused: TokenRefused) -> web.Response:
    headers = {}
    if refused.status in (401, 403):
        headers["WWW-Authenticate"] = f'Bearer error="{refused.error}"'
    return web.json_response(
        {"error": refused.error, "reason": refused.reason},
        status=refused.status,
        headers=headers,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def auth_and_count(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    status = 500
    try:
        if request.path != "/dev/stats":
            try:
                request[CLAIMS_KEY] = await verify_bearer(
                    state, request.headers.get("Authorization")
                )
            except TokenRefused as refused:
                status = refused.status
                log.info(
                    "request refused",
                    extra={"path": request.path, "status": status, "reason": refused.reason},
                )
                return _refusal(refused)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            status = exc.status
            raise
        status = response.status
        return response
    finally:
        if request.path != "/dev/stats":
            state.counts[status] += 1


async def echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return web.json_response(
        {
            "claims": request[CLAIMS_KEY],
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "header_names": sorted({name.lower() for name in request.headers}),
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
        }
    )


def _query_number(request: web.Request, name: str, default: float, maximum: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number") from None
    if not 0 <= value <= maximum:
        raise web.HTTPBadRequest(text=f"{name} must be between 0 and {maximum:g}")
    return value


async def events(request: web.Request) -> web.StreamResponse:
    count = int(_query_number(request, "n", 5, _MAX_EVENTS))
    interval = _query_number(request, "interval", 0.2, _MAX_INTERVAL)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    sub = request[CLAIMS_KEY].get("sub")
    for seq in range(count):
        if seq:
            await asyncio.sleep(interval)
        data = json.dumps({"seq": seq, "sub": sub, "time": time.time()})
        await response.write(f"id: {seq}\nevent: tick\ndata: {data}\n\n".encode())
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def stream_bytes(request: web.Request) -> web.StreamResponse:
    try:
        total = int(request.match_info["count"])
    except ValueError:
        raise web.HTTPBadRequest(text="N must be an integer") from None
    if not 0 <= total <= MAX_BYTES:
        raise web.HTTPBadRequest(text=f"N must be between 0 and {MAX_BYTES}")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    # Chunked on purpose: the proxy must stream bodies of unknown length.
    response.enable_chunked_encoding()
    await response.prepare(request)
    pattern = bytes(range(256)) * (_CHUNK // 256)
    remaining = total
    while remaining > 0:
        piece = pattern[: min(_CHUNK, remaining)]
        await response.write(piece)
        remaining -= len(piece)
    await response.write_eof()
    return response


async def stats(request: web.Request) -> web.Response:
    counts = request.app[STATE].counts
    return web.json_response(
        {
            "total": sum(counts.values()),
            "by_status": {str(status): n for status, n in sorted(counts.items())},
        }
    )


def build_app(state: UpstreamState) -> web.Application:
    app = web.Application(middlewares=[auth_and_count], client_max_size=MAX_BYTES)
    app[STATE] = state

    async def keys_context(app: web.Application) -> AsyncIterator[None]:
        yield
        await app[STATE].keys.close()

    app.cleanup_ctx.append(keys_context)
    app.router.add_get("/dev/stats", stats)
    app.router.add_get("/events", events)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/bytes/{count}", stream_bytes)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="e.g. 127.0.0.1:0")
    parser.add_argument("--issuer", required=True, metavar="URL", help="the IdP's issuer URL")
    parser.add_argument("--audience", required=True, metavar="AUD", help="required token aud")
    parser.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="S",
        help="scope the token must carry (repeatable)",
    )
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--tls-cert", metavar="FILE", help="server certificate chain (PEM)")
    tls.add_argument(
        "--tls-self-signed",
        metavar="DIR",
        help="create (once) a test CA and loopback server certificate in DIR and use them",
    )
    parser.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    parser.add_argument("--log-level", default="info")


def _ssl_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot load TLS certificate {cert!r} / key {key!r}: {exc}") from None
    return context


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        raise UserError(f"--listen: {exc}") from None
    issuer: str = args.issuer
    if not issuer.startswith(("http://", "https://")):
        raise UserError(f"--issuer {issuer!r} is not an http(s) URL")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    for scope in args.scope:
        if not scope or " " in scope:
            raise UserError(f"--scope {scope!r} must be one non-empty scope without spaces")
    ssl_context: ssl.SSLContext | None = None
    ready_extra: dict[str, str] = {}
    if args.tls_self_signed:
        try:
            files = ensure_self_signed(Path(args.tls_self_signed))
        except OSError as exc:
            raise UserError(f"--tls-self-signed {args.tls_self_signed!r}: {exc}") from None
        ssl_context = _ssl_context(str(files.cert_file), str(files.key_file))
        ready_extra["ca_file"] = str(files.ca_file.resolve())
    elif args.tls_cert:
        ssl_context = _ssl_context(args.tls_cert, args.tls_key)
    state = UpstreamState(keys=IssuerKeys(issuer), audience=args.audience, scopes=tuple(args.scope))
    scheme = "https" if ssl_context is not None else "http"

    def on_bound(bound_port: int) -> None:
        announce_ready(
            "dev-upstream",
            url=f"{scheme}://{url_host(host)}:{bound_port}",
            audience=state.audience,
            **ready_extra,
        )

    try:
        asyncio.run(serve(build_app(state), host, port, ssl_context=ssl_context, on_bound=on_bound))
    except OSError as exc:
        raise UserError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    return 0

"""``tokenferry dev spiffe``: a development SPIFFE Workload API agent (SPEC §8).

A real gRPC server on a Unix socket speaking the SPIFFE Workload API's JWT profile
(``FetchJWTSVID``, ``FetchJWTBundles``, ``ValidateJWTSVID``), so tokenferry talks to it
with the same client code it uses against a SPIRE agent. One agent serves one SPIFFE ID;
run one agent per identity. Agents started with the same ``--key-file`` share one signing
key, hence one trust domain bundle, like workloads attested by one SPIRE server.

Behaviour copied from SPIRE because clients depend on it:
- calls without the ``workload.spiffe.io: true`` metadata are refused with
  ``InvalidArgument: security header missing from request`` (the header proves the call
  came from a Workload API client, not a browser or a confused proxy);
- JWT-SVIDs carry ``typ: JWT``, ``alg`` and ``kid`` in the header and ``sub``, ``aud``,
  ``exp``, ``iat`` claims; ``iss`` only when ``--jwt-issuer`` is given (SPIRE's default
  omits it; see docs/svid-sources.md);
- bundles are JWKS documents keyed by the trust domain's SPIFFE ID
  (``spiffe://example.org``) with ``use: jwt-svid`` on every key;
- with ``--jwks-listen`` the bundle is also served over HTTP at ``/keys`` with an OIDC
  discovery document, as SPIRE's OIDC discovery provider does, so IdPs can fetch it.

X.509-SVIDs are not served (those methods answer ``UNIMPLEMENTED``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import jwt
from aiohttp import web
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.spiffe_id.spiffe_id import SpiffeId

from tokenferry.cli.main import UserError
from tokenferry.dev.keys import (
    SUPPORTED_ALGORITHMS,
    KeyFileError,
    SigningKey,
    jwk_from_key,
    jwks_document,
    load_or_create_signing_key,
)
from tokenferry.service import announce_ready, configure_logging, parse_listen, url_host

DESCRIPTION = "development SPIFFE Workload API agent: JWT-SVIDs and bundles on a Unix socket"

_log = logging.getLogger("tokenferry.dev.spiffe")

SECURITY_HEADER = "workload.spiffe.io"
SECURITY_HEADER_MISSING = "security header missing from request"
DEFAULT_SVID_TTL = 300
# Longest path a Unix socket address can hold on Linux (sun_path is 108 bytes with NUL).
_MAX_SOCKET_PATH = 107
# Signature algorithms a JWT-SVID may use (SPIFFE JWT-SVID §3); never "none" or HMAC.
_VALIDATE_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512")
_VALIDATE_LEEWAY = 5.0

ServicerContext = grpc.aio.ServicerContext[Any, Any]


class InvalidSvid(Exception):
    """ValidateJWTSVID refused a token; the message says why and never quotes it."""


class JwtAuthority:
    """Mints and validates JWT-SVIDs for one SPIFFE ID with one signing key."""

    def __init__(
        self,
        spiffe_id: str,
        key: SigningKey,
        *,
        svid_ttl: int = DEFAULT_SVID_TTL,
        issuer: str | None = None,
    ) -> None:
        parsed = SpiffeId(spiffe_id)
        self.spiffe_id = str(parsed)
        self.trust_domain = parsed.trust_domain.name
        self.key = key
        self.svid_ttl = svid_ttl
        self.issuer = issuer

    @property
    def trust_domain_id(self) -> str:
        return f"spiffe://{self.trust_domain}"

    def mint(self, audiences: Sequence[str], *, now: float | None = None) -> tuple[str, int]:
        """A signed JWT-SVID for ``audiences`` and its ``exp``."""
        issued_at = int(time.time() if now is None else now)
        expires = issued_at + self.svid_ttl
        claims: dict[str, Any] = {
            "sub": self.spiffe_id,
            "aud": list(audiences),
            "exp": expires,
            "iat": issued_at,
        }
        if self.issuer is not None:
            claims["iss"] = self.issuer
        token = jwt.encode(
            claims,
            self.key.private_key,
            algorithm=self.key.alg,
            headers={"kid": self.key.kid, "typ": "JWT"},
        )
        return token, expires

    def bundle(self) -> dict[str, Any]:
        """The trust domain's JWT bundle: a JWKS with ``use: jwt-svid`` keys."""
        # Like SPIRE: no "alg" member; verifiers take the algorithm from the key type.
        return jwks_document(jwk_from_key(self.key.private_key, self.key.kid, use="jwt-svid"))

    def validate(self, token: str, audience: str) -> dict[str, Any]:
        """Claims of ``token`` if it is a valid JWT-SVID of this trust domain for ``audience``."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidSvid("not a JWS compact serialization") from None
        alg = header.get("alg")
        if alg not in _VALIDATE_ALGORITHMS:
            raise InvalidSvid(f"algorithm {alg!r} is not allowed for JWT-SVIDs")
        if header.get("kid") != self.key.kid:
            raise InvalidSvid("signed by a key that is not in the trust domain's bundle")
        if alg != self.key.alg:
            raise InvalidSvid(f"algorithm {alg!r} does not match the key's {self.key.alg!r}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.key.public_key,
                algorithms=[self.key.alg],
                audience=audience,
                leeway=_VALIDATE_LEEWAY,
                options={"require": ["sub", "aud", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidSvid("token has expired") from None
        except jwt.InvalidAudienceError:
            raise InvalidSvid(f"audience {audience!r} is not in the token's aud claim") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidSvid(f"token has no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise InvalidSvid("signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise InvalidSvid(f"token is invalid ({type(exc).__name__})") from None
        subject = claims.get("sub")
        try:
            subject_id = SpiffeId(str(subject))
        except Exception:
            raise InvalidSvid("sub claim is not a SPIFFE ID") from None
        if subject_id.trust_domain.name != self.trust_domain:
            raise InvalidSvid(
                f"subject belongs to trust domain {subject_id.trust_domain.name!r}, "
                f"not {self.trust_domain!r}"
            )
        return claims


def _has_security_header(context: ServicerContext) -> bool:
    metadata = context.invocation_metadata() or ()
    return any(key == SECURITY_HEADER and value == "true" for key, value in metadata)


class WorkloadApiServicer:
    """The SpiffeWorkloadAPI gRPC service (method names are fixed by the protocol)."""

    def __init__(self, authority: JwtAuthority) -> None:
        self.authority = authority
        self._shutdown = asyncio.Event()

    def shut_down(self) -> None:
        """End open bundle streams so the server can stop without waiting for clients."""
        self._shutdown.set()

    async def _require_security_header(self, context: ServicerContext) -> None:
        if not _has_security_header(context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, SECURITY_HEADER_MISSING)

    async def FetchJWTSVID(
        self, request: workload_pb2.JWTSVIDRequest, context: ServicerContext
    ) -> workload_pb2.JWTSVIDResponse:
        await self._require_security_header(context)
        audiences = [aud for aud in request.audience if aud]
        if not audiences:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if request.spiffe_id and request.spiffe_id != self.authority.spiffe_id:
            _log.warning(
                "refused JWT-SVID for another SPIFFE ID",
                extra={"requested_spiffe_id": request.spiffe_id},
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"no identity issued for {request.spiffe_id}",
            )
        token, expires = self.authority.mint(audiences)
        _log.info(
            "issued JWT-SVID",
            extra={
                "spiffe_id": self.authority.spiffe_id,
                "audience": audiences,
                "expires_at": expires,
            },
        )
        return workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id=self.authority.spiffe_id, svid=token)]
        )

    def _bundles_response(self) -> workload_pb2.JWTBundlesResponse:
        document = json.dumps(self.authority.bundle(), separators=(",", ":")).encode()
        return workload_pb2.JWTBundlesResponse(bundles={self.authority.trust_domain_id: document})

    async def FetchJWTBundles(
        self, request: workload_pb2.JWTBundlesRequest, context: ServicerContext
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        await self._require_security_header(context)
        yield self._bundles_response()
        # The Workload API streams bundle updates: keep the stream open (the key never
        # rotates here) until the client cancels or the agent shuts down.
        await self._shutdown.wait()

    async def ValidateJWTSVID(
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: ServicerContext
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        await self._require_security_header(context)
        if not request.audience:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        try:
            claims = self.authority.validate(request.svid, request.audience)
        except InvalidSvid as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid JWT-SVID: {exc}")
            raise  # unreachable: abort raises
        response = workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(claims["sub"]))
        response.claims.update(claims)
        return response

    async def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: ServicerContext
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        await self._require_security_header(context)
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "the dev agent serves JWT-SVIDs only, no X.509-SVIDs"
        )
        yield workload_pb2.X509SVIDResponse()  # unreachable: makes this a stream handler

    async def FetchX509Bundles(
        self, request: workload_pb2.X509BundlesRequest, context: ServicerContext
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        await self._require_security_header(context)
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "the dev agent serves JWT bundles only, no X.509"
        )
        yield workload_pb2.X509BundlesResponse()  # unreachable: makes this a stream handler


# --- HTTP JWKS (OIDC discovery provider shape) -------------------------------------------

_AUTHORITY: web.AppKey[JwtAuthority] = web.AppKey("authority", JwtAuthority)
_ISSUER: web.AppKey[str] = web.AppKey("issuer", str)
_BASE_URL: web.AppKey[str] = web.AppKey("base_url", str)


async def _keys(request: web.Request) -> web.Response:
    return web.json_response(
        request.app[_AUTHORITY].bundle(), headers={"Cache-Control": "max-age=60"}
    )


async def _discovery(request: web.Request) -> web.Response:
    authority = request.app[_AUTHORITY]
    return web.json_response(
        {
            "issuer": request.app[_ISSUER],
            "jwks_uri": request.app[_BASE_URL] + "/keys",
            "authorization_endpoint": "",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [authority.key.alg],
        },
        headers={"Cache-Control": "max-age=60"},
    )


async def _start_jwks_server(
    authority: JwtAuthority, host: str, port: int
) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app[_AUTHORITY] = authority
    app.router.add_get("/keys", _keys)
    app.router.add_get("/.well-known/openid-configuration", _discovery)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise UserError(f"--jwks-listen {host}:{port}: cannot listen: {exc.strerror}") from None
    bound_port = int(runner.addresses[0][1])
    base_url = f"http://{url_host(host)}:{bound_port}"
    app[_BASE_URL] = base_url
    app[_ISSUER] = authority.issuer or base_url
    return runner, base_url


# --- socket handling ----------------------------------------------------------------------


def _socket_is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        # Permission denied, timeout, ...: someone owns it; do not take it over.
        return True
    finally:
        probe.close()
    return True


def prepare_socket_path(path: Path) -> None:
    """Refuse unusable or live socket paths; remove a stale socket left by a crash."""
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise UserError(
            f"--socket {path}: path is longer than {_MAX_SOCKET_PATH} bytes, "
            "which a Unix socket address cannot hold; use a shorter directory"
        )
    if not path.parent.is_dir():
        raise UserError(f"--socket {path}: directory {path.parent} does not exist")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise UserError(f"--socket {path}: file exists and is not a socket; not replacing it")
    if _socket_is_live(path):
        raise UserError(f"--socket {path}: another process is already serving on this socket")
    path.unlink()
    _log.info("removed stale socket", extra={"socket": str(path)})


def _bind_workload_api(server: grpc.aio.Server, path: Path) -> int:
    # The socket is created by bind(); a umask makes it owner-only from the first moment
    # instead of briefly world-connectable until a chmod.
    old_umask = os.umask(0o177)
    try:
        bound = server.add_insecure_port(f"unix:{path}")
    except RuntimeError:
        bound = 0
    finally:
        os.umask(old_umask)
    if not bound:
        raise UserError(f"--socket {path}: cannot listen on this path")
    os.chmod(path, 0o600)
    return os.stat(path).st_ino


async def serve(args: argparse.Namespace, key: SigningKey, socket_path: Path) -> int:
    authority = JwtAuthority(args.spiffe_id, key, svid_ttl=args.svid_ttl, issuer=args.jwt_issuer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    server = grpc.aio.server()
    servicer = WorkloadApiServicer(authority)
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(  # type: ignore[no-untyped-call]
        servicer, server
    )
    inode = _bind_workload_api(server, socket_path)
    runner: web.AppRunner | None = None
    try:
        await server.start()
        ready: dict[str, Any] = {
            "socket": str(socket_path),
            "spiffe_id": authority.spiffe_id,
            "trust_domain": authority.trust_domain,
            "alg": key.alg,
            "kid": key.kid,
        }
        if args.jwks_listen is not None:
            host, port = args.jwks_listen
            runner, base_url = await _start_jwks_server(authority, host, port)
            ready["jwks_url"] = base_url + "/keys"
        _log.info("dev SPIFFE agent serving", extra=ready)
        announce_ready("dev-spiffe", **ready)
        await stop.wait()
        _log.info("shutting down")
    finally:
        servicer.shut_down()
        await server.stop(grace=1.0)
        if runner is not None:
            await runner.cleanup()
        # grpc usually removes the socket itself; make sure, but never remove a socket
        # that another agent has since bound at the same path.
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(socket_path).st_ino == inode:
                os.unlink(socket_path)
    return 0


# --- CLI --------------------------------------------------------------------------------


def _listen_arg(value: str) -> tuple[str, int]:
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be greater than 0")
    return number


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", required=True, type=Path, help="Unix socket path of the Workload API"
    )
    parser.add_argument(
        "--spiffe-id", required=True, help="the SPIFFE ID this agent issues SVIDs for"
    )
    parser.add_argument(
        "--jwks-listen",
        type=_listen_arg,
        metavar="HOST:PORT",
        help="also serve the JWT bundle as JWKS at http://HOST:PORT/keys (port 0: any)",
    )
    parser.add_argument(
        "--key-file",
        type=Path,
        help="PEM private key; created (mode 0600) when missing. Agents sharing one "
        "key file share one trust domain bundle. Default: an in-memory key",
    )
    parser.add_argument(
        "--alg",
        choices=SUPPORTED_ALGORITHMS,
        default=None,
        help="signing algorithm of a new key (default ES256; an existing key decides)",
    )
    parser.add_argument(
        "--svid-ttl",
        type=_positive_int,
        default=DEFAULT_SVID_TTL,
        metavar="SECONDS",
        help=f"JWT-SVID lifetime (default {DEFAULT_SVID_TTL})",
    )
    parser.add_argument(
        "--jwt-issuer",
        default=None,
        metavar="URL",
        help="put this iss claim into JWT-SVIDs (SPIRE's jwt_issuer); default: no iss",
    )
    parser.add_argument("--log-level", default="info", help="log level (default info)")


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        workload_id = SpiffeId(args.spiffe_id)
    except Exception as exc:
        raise UserError(f"--spiffe-id {args.spiffe_id!r} is not a valid SPIFFE ID: {exc}") from None
    if not workload_id.path:
        # A bare trust domain ID names the trust domain, never a workload (SPIFFE-ID §2.3).
        raise UserError(
            f"--spiffe-id {args.spiffe_id!r} names a trust domain, not a workload; "
            "add a path, e.g. spiffe://example.org/gateway"
        )
    socket_path = Path(os.path.abspath(args.socket))
    try:
        key = load_or_create_signing_key(args.key_file, args.alg)
    except KeyFileError as exc:
        raise UserError(f"--key-file: {exc}") from None
    prepare_socket_path(socket_path)
    return asyncio.run(serve(args, key, socket_path))

"""Where tokenferry gets its own JWT-SVIDs and the JWT bundles to verify others' (SPEC §4.4).

Two sources behind one interface, :class:`SvidSource`:

- :class:`WorkloadApiSvidSource` (default): the SPIFFE Workload API over a Unix socket,
  through py-spiffe's ``WorkloadApiClient``. Its calls block, so they run in a worker
  thread. SVIDs are reused per audience until half their life has passed, as SPIRE's own
  agent does; ``reuse_svids=False`` fetches a fresh one every time, for IdPs that refuse
  an assertion they have seen before.
- :class:`FileSvidSource`: a directory of JWT-SVID files kept fresh by spiffe-helper (or
  anything else), plus a JWT bundle file. Files are re-read when their size, mtime or
  inode changes, so an updated SVID is picked up without a restart.

Errors are :class:`SvidUnavailable` with a message that says which source failed and
why, and never contains a token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from spiffe import WorkloadApiClient

_log = logging.getLogger(__name__)

SPIFFE_ENDPOINT_SOCKET = "SPIFFE_ENDPOINT_SOCKET"
JWT_SVID_KEY_USE = "jwt-svid"

# Anything that looks like a compact JWS: scrubbed from error texts we pass along.
_JWS_RE = re.compile(r"[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
# A JWT-SVID (or a JWKS bundle) is far smaller; larger files are not what we look for.
_MAX_FILE_BYTES = 64 * 1024
# An SVID file is only handed out while it has at least this long to live, so the IdP
# does not receive an assertion that expires on the way.
_FILE_SVID_MIN_REMAINING = 5.0
# How many files an error message lists before summarising.
_MAX_LISTED_FILES = 8


class SvidUnavailable(Exception):
    """No usable JWT-SVID or bundle: Workload API unreachable or refusing, no file, ...

    The message names the source and the reason and never contains a token.
    """


@dataclass(frozen=True)
class JwtSvid:
    """A JWT-SVID: the compact token, the SPIFFE ID it asserts, its ``exp`` (epoch s)."""

    token: str = field(repr=False)
    spiffe_id: str
    expiry: float


class SvidSource(Protocol):
    async def fetch_jwt_svid(self, audience: str) -> JwtSvid:
        """An unexpired JWT-SVID whose ``aud`` contains ``audience``."""
        ...

    async def fetch_jwt_bundles(self) -> dict[str, dict[str, Any]]:
        """Trust domain name (``example.org``) → JWKS ``{"keys": [...]}``."""
        ...

    async def close(self) -> None: ...


def _scrub(text: str) -> str:
    return _JWS_RE.sub("<redacted>", text)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def trust_domain_name(value: str) -> str:
    """``spiffe://example.org`` or ``example.org`` (or a SPIFFE ID) → ``example.org``."""
    name = value.removeprefix("spiffe://").split("/", 1)[0]
    return name.lower()


def socket_address(socket: str) -> tuple[str, str]:
    """Normalise ``unix:/path``, ``unix:///path`` or ``/path`` → (``unix:/path``, ``/path``)."""
    value = socket.strip()
    if value.startswith("unix:"):
        path = value[len("unix:") :]
    elif value.startswith("/"):
        path = value
    else:
        raise ValueError(
            f"SPIFFE Workload API socket {socket!r} must be unix:/absolute/path "
            "or an absolute path (only Unix domain sockets are supported)"
        )
    if not path.startswith("/"):
        raise ValueError(f"SPIFFE Workload API socket {socket!r} must be an absolute path")
    path = "/" + path.lstrip("/")
    return f"unix:{path}", path


def _public_jwk(kid: str, key: object) -> dict[str, Any] | None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        jwk = dict(ECAlgorithm.to_jwk(key, as_dict=True))
    elif isinstance(key, rsa.RSAPublicKey):
        jwk = dict(RSAAlgorithm.to_jwk(key, as_dict=True))
    else:
        return None
    jwk["kid"] = kid
    jwk["use"] = JWT_SVID_KEY_USE
    return jwk


# --- Workload API ---------------------------------------------------------------------


@dataclass(frozen=True)
class _ReusableSvid:
    svid: JwtSvid
    reuse_until: float


class WorkloadApiSvidSource:
    """JWT-SVIDs and bundles from the SPIFFE Workload API (SPIRE agent, dev agent)."""

    def __init__(
        self,
        socket: str | None = None,
        *,
        reuse_svids: bool = True,
        timeout: float = 10.0,
        bundle_max_age: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``socket``: ``unix:/path`` or ``/path``; default ``$SPIFFE_ENDPOINT_SOCKET``.

        ``bundle_max_age``: fetched bundles are served from memory for this many seconds
        (0 = always ask), so a verifier checking every request does not open a Workload
        API stream per request. SPIRE publishes new JWT keys in the bundle well before
        signing with them, so a few seconds of staleness never rejects a valid SVID.
        """
        raw = socket or os.environ.get(SPIFFE_ENDPOINT_SOCKET)
        if not raw:
            raise ValueError(
                "no SPIFFE Workload API socket: pass one (e.g. --spiffe-socket "
                f"unix:/run/spire/agent.sock) or set {SPIFFE_ENDPOINT_SOCKET}"
            )
        self._address, self._path = socket_address(raw)
        self._reuse = reuse_svids
        self._timeout = timeout
        self._bundle_max_age = bundle_max_age
        self._clock = clock
        self._client: WorkloadApiClient | None = None  # created on first use
        self._client_lock = threading.Lock()
        self._svids: dict[str, _ReusableSvid] = {}
        self._svid_locks: dict[str, asyncio.Lock] = {}
        self._bundles: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._bundle_lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"WorkloadApiSvidSource(socket={self._address!r}, reuse_svids={self._reuse})"

    @property
    def socket(self) -> str:
        return self._address

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _client_or_raise(self) -> WorkloadApiClient:
        """The py-spiffe client (runs in a worker thread; creation checks the socket)."""
        with self._client_lock:
            if self._closed:
                raise SvidUnavailable(f"the SVID source for {self._address} is closed")
            if self._client is None:
                if not os.path.exists(self._path):
                    raise SvidUnavailable(
                        f"SPIFFE Workload API socket {self._path} does not exist "
                        "(is the SPIFFE agent running, and is the socket mounted here?)"
                    )
                self._client = WorkloadApiClient(self._address, default_timeout=self._timeout)
            return self._client

    async def _discard_client(self) -> None:
        """Drop the client after a failure so the next call dials afresh.

        A gRPC channel that lost its agent reconnects with exponential back-off (up to
        minutes) and fails calls fast meanwhile; a new channel to a restarted agent's
        socket connects at once.
        """
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    def _unavailable(self, what: str, exc: BaseException) -> SvidUnavailable:
        detail = _scrub(str(exc)) or type(exc).__name__
        return SvidUnavailable(f"{what} from the SPIFFE Workload API at {self._path}: {detail}")

    def _fetch_svid_blocking(self, audience: str) -> JwtSvid:
        client = self._client_or_raise()
        svid = client.fetch_jwt_svid(audience={audience})
        return JwtSvid(token=svid.token, spiffe_id=str(svid.spiffe_id), expiry=float(svid.expiry))

    def _reuse_until(self, svid: JwtSvid, now: float) -> float:
        # Half-life from the SVID's own iat when it has one: a SPIRE agent may hand us an
        # SVID from its cache that is already part-way through its life.
        start = now
        try:
            iat = jwt.decode(svid.token, options={"verify_signature": False}).get("iat")
        except jwt.PyJWTError:
            iat = None
        if isinstance(iat, int | float) and iat <= now:
            start = float(iat)
        return start + (svid.expiry - start) / 2

    async def fetch_jwt_svid(self, audience: str) -> JwtSvid:
        if not audience:
            raise SvidUnavailable("cannot fetch a JWT-SVID for an empty audience")
        lock = self._svid_locks.setdefault(audience, asyncio.Lock())
        # One fetch per audience at a time: concurrent callers share its result.
        async with lock:
            now = self._clock()
            cached = self._svids.get(audience)
            if self._reuse and cached is not None and now < cached.reuse_until:
                return cached.svid
            try:
                svid = await asyncio.to_thread(self._fetch_svid_blocking, audience)
            except SvidUnavailable:
                raise
            except Exception as exc:
                await self._discard_client()
                raise self._unavailable(
                    f"cannot fetch a JWT-SVID for audience {audience!r}", exc
                ) from None
            now = self._clock()
            if svid.expiry <= now:
                raise SvidUnavailable(
                    f"the SPIFFE Workload API at {self._path} returned a JWT-SVID for "
                    f"audience {audience!r} that expired at {_iso(svid.expiry)}; "
                    "check the clocks of this host and the agent"
                )
            if self._reuse:
                self._svids[audience] = _ReusableSvid(svid, self._reuse_until(svid, now))
            return svid

    def _fetch_bundles_blocking(self) -> dict[str, dict[str, Any]]:
        client = self._client_or_raise()
        bundle_set = client.fetch_jwt_bundles()
        result: dict[str, dict[str, Any]] = {}
        for bundle in bundle_set.bundles:
            keys: list[dict[str, Any]] = []
            for kid, key in bundle.jwt_authorities.items():
                jwk = _public_jwk(kid, key)
                if jwk is None:
                    _log.warning(
                        "skipping JWT authority of unsupported key type",
                        extra={"trust_domain": bundle.trust_domain.name, "kid": kid},
                    )
                    continue
                keys.append(jwk)
            result[trust_domain_name(bundle.trust_domain.name)] = {"keys": keys}
        return result

    async def fetch_jwt_bundles(self) -> dict[str, dict[str, Any]]:
        async with self._bundle_lock:
            now = time.monotonic()
            if self._bundles is not None and now - self._bundles[0] < self._bundle_max_age:
                return json.loads(json.dumps(self._bundles[1]))  # type: ignore[no-any-return]
            try:
                bundles = await asyncio.to_thread(self._fetch_bundles_blocking)
            except SvidUnavailable:
                raise
            except Exception as exc:
                await self._discard_client()
                raise self._unavailable("cannot fetch the JWT bundles", exc) from None
            self._bundles = (time.monotonic(), bundles)
            return json.loads(json.dumps(bundles))  # type: ignore[no-any-return]

    async def close(self) -> None:
        with self._client_lock:
            self._closed = True
            client, self._client = self._client, None
        self._svids.clear()
        if client is not None:
            await asyncio.to_thread(client.close)


# --- files (spiffe-helper) -----------------------------------------------------------


@dataclass(frozen=True)
class _SvidFile:
    name: str
    svid: JwtSvid
    audiences: tuple[str, ...]


@dataclass(frozen=True)
class _BadFile:
    name: str
    reason: str


_FileSignature = tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size


def parse_jwt_svid_unverified(token: str) -> tuple[JwtSvid, tuple[str, ...]]:
    """Read a JWT-SVID's subject, audiences and expiry without checking its signature.

    Only for choosing among our *own* SVIDs; whoever receives one verifies it. Raises
    ValueError saying what is missing (never quoting the token).
    """
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise ValueError("not a JWT") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg == "none" or alg.startswith("HS"):
        raise ValueError(f"alg {alg!r} is not a JWT-SVID signature algorithm")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.startswith("spiffe://") or len(sub) <= 9:
        raise ValueError("sub is not a SPIFFE ID")
    aud = claims.get("aud")
    audiences = (aud,) if isinstance(aud, str) else aud
    if (
        not isinstance(audiences, list | tuple)
        or not audiences
        or not all(isinstance(a, str) for a in audiences)
    ):
        raise ValueError("aud claim is missing or not a string list")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise ValueError("exp claim is missing or not a number")
    return JwtSvid(token=token, spiffe_id=sub, expiry=float(exp)), tuple(audiences)


def _jwks_or_raise(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("keys"), list):
        raise ValueError(f'{where}not a JWKS document (no "keys" list)')
    keys = value["keys"]
    for index, key in enumerate(keys):
        if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
            raise ValueError(f'{where}keys[{index}] is not a JWK (no "kty")')
    return {"keys": keys}


def parse_bundle_document(
    data: bytes, *, default_trust_domain: str | None
) -> dict[str, dict[str, Any]]:
    """Parse a JWT bundle file in one of the supported forms (see docs/svid-sources.md).

    - a JWKS ``{"keys": [...]}`` for ``default_trust_domain``;
    - spiffe-helper's ``jwt_bundle_file_name`` form: ``{"<trust domain>": "<base64 of
      the JWKS>", ...}``; the same map with JWKS objects as values is also accepted, and
      keys may be trust domain names or their ``spiffe://`` IDs.

    Raises ValueError describing the problem.
    """
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not JSON") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    if "keys" in document:
        jwks = _jwks_or_raise(document, "")
        if default_trust_domain is None:
            raise ValueError(
                "a plain JWKS, so its trust domain must be given (no trust domain option "
                "and no JWT-SVID file to take it from)"
            )
        return {trust_domain_name(default_trust_domain): jwks}
    if not document:
        raise ValueError("no bundles in it")
    result: dict[str, dict[str, Any]] = {}
    for key, value in document.items():
        name = trust_domain_name(str(key))
        if not name:
            raise ValueError(f"empty trust domain name {key!r}")
        if isinstance(value, str):
            try:
                decoded = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"bundle of {name!r} is not base64") from None
            try:
                value = json.loads(decoded)
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise ValueError(f"bundle of {name!r} does not decode to JSON") from None
        result[name] = _jwks_or_raise(value, f"bundle of {name!r}: ")
    return result


class FileSvidSource:
    """JWT-SVIDs from files in a directory (spiffe-helper's ``jwt_svids``) and a bundle file.

    Every regular file in ``svid_dir`` except dot-files and the bundle file is a candidate;
    the SVID chosen for an audience is one whose (unverified) ``aud`` contains it and which
    has not expired, preferring the one that lives longest.
    """

    def __init__(
        self,
        svid_dir: Path,
        bundle_file: Path,
        *,
        trust_domain: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._dir = Path(svid_dir)
        self._bundle_file = Path(bundle_file)
        self._trust_domain = trust_domain
        self._clock = clock
        self._files: dict[str, tuple[_FileSignature, _SvidFile | _BadFile]] = {}
        self._bundle: tuple[_FileSignature, dict[str, dict[str, Any]]] | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"FileSvidSource(svid_dir={str(self._dir)!r}, bundle_file={str(self._bundle_file)!r})"
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @staticmethod
    def _signature(info: os.stat_result) -> _FileSignature:
        return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)

    def _read_small(self, path: Path) -> bytes:
        with path.open("rb") as handle:
            data = handle.read(_MAX_FILE_BYTES + 1)
        if len(data) > _MAX_FILE_BYTES:
            raise ValueError(f"larger than {_MAX_FILE_BYTES} bytes")
        return data

    def _parse_file(self, name: str, path: Path) -> _SvidFile | _BadFile:
        try:
            data = self._read_small(path)
        except ValueError as exc:
            return _BadFile(name, f"not a JWT-SVID ({exc})")
        except OSError as exc:
            return _BadFile(name, f"unreadable ({exc.strerror})")
        try:
            token = data.decode("ascii").strip()
        except UnicodeDecodeError:
            return _BadFile(name, "not a JWT-SVID (not ASCII text)")
        if not token:
            return _BadFile(name, "empty")
        try:
            svid, audiences = parse_jwt_svid_unverified(token)
        except ValueError as exc:
            return _BadFile(name, f"not a JWT-SVID ({exc})")
        return _SvidFile(name, svid, audiences)

    def _bundle_identity(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self._bundle_file)
        except OSError:
            return None
        return (info.st_dev, info.st_ino)

    def _scan_blocking(self) -> list[_SvidFile | _BadFile]:
        """Refresh the view of the directory, re-reading only files that changed."""
        try:
            entries = list(os.scandir(self._dir))
        except FileNotFoundError:
            raise SvidUnavailable(f"JWT-SVID directory {self._dir} does not exist") from None
        except NotADirectoryError:
            raise SvidUnavailable(f"JWT-SVID directory {self._dir} is not a directory") from None
        except OSError as exc:
            raise SvidUnavailable(
                f"cannot list JWT-SVID directory {self._dir}: {exc.strerror}"
            ) from None
        bundle_identity = self._bundle_identity()
        fresh: dict[str, tuple[_FileSignature, _SvidFile | _BadFile]] = {}
        for entry in sorted(entries, key=lambda e: e.name):
            # Dot-files are editors' and Kubernetes' (..data) bookkeeping, not SVIDs.
            if entry.name.startswith("."):
                continue
            try:
                info = entry.stat()  # follows symlinks, as projected volumes use them
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            if (info.st_dev, info.st_ino) == bundle_identity:
                continue
            signature = self._signature(info)
            known = self._files.get(entry.name)
            if known is not None and known[0] == signature:
                fresh[entry.name] = known
            else:
                fresh[entry.name] = (signature, self._parse_file(entry.name, Path(entry.path)))
        self._files = fresh
        return [parsed for _, parsed in fresh.values()]

    def _choose(self, audience: str, files: list[_SvidFile | _BadFile]) -> JwtSvid:
        now = self._clock()
        svids = [f for f in files if isinstance(f, _SvidFile)]
        matching = [f for f in svids if audience in f.audiences]
        usable = [f for f in matching if f.svid.expiry - now > _FILE_SVID_MIN_REMAINING]
        if usable:
            return max(usable, key=lambda f: f.svid.expiry).svid
        if matching:
            newest = max(matching, key=lambda f: f.svid.expiry)
            raise SvidUnavailable(
                f"the JWT-SVID file for audience {audience!r} in {self._dir} has expired "
                f"({newest.name}, exp {_iso(newest.svid.expiry)}); is spiffe-helper still "
                "refreshing it?"
            )
        if not files:
            raise SvidUnavailable(
                f"no JWT-SVID file in {self._dir} (the directory is empty); "
                f"configure a JWT-SVID with audience {audience!r} in spiffe-helper"
            )
        listed = []
        for f in files[:_MAX_LISTED_FILES]:
            if isinstance(f, _SvidFile):
                listed.append(f"{f.name}: aud {list(f.audiences)}")
            else:
                listed.append(f"{f.name}: {f.reason}")
        if len(files) > _MAX_LISTED_FILES:
            listed.append(f"and {len(files) - _MAX_LISTED_FILES} more")
        raise SvidUnavailable(
            f"no JWT-SVID file in {self._dir} has audience {audience!r} (found "
            + "; ".join(listed)
            + ")"
        )

    async def fetch_jwt_svid(self, audience: str) -> JwtSvid:
        if not audience:
            raise SvidUnavailable("cannot look up a JWT-SVID for an empty audience")
        if self._closed:
            raise SvidUnavailable(f"the SVID source for {self._dir} is closed")
        async with self._lock:
            files = await asyncio.to_thread(self._scan_blocking)
        return self._choose(audience, files)

    def _trust_domain_from_svids(self) -> str | None:
        domains = {
            trust_domain_name(parsed.svid.spiffe_id)
            for _, parsed in self._files.values()
            if isinstance(parsed, _SvidFile)
        }
        return domains.pop() if len(domains) == 1 else None

    def _read_bundles_blocking(self) -> dict[str, dict[str, Any]]:
        try:
            info = os.stat(self._bundle_file)
        except FileNotFoundError:
            raise SvidUnavailable(f"JWT bundle file {self._bundle_file} does not exist") from None
        except OSError as exc:
            raise SvidUnavailable(
                f"cannot read JWT bundle file {self._bundle_file}: {exc.strerror}"
            ) from None
        signature = self._signature(info)
        if self._bundle is not None and self._bundle[0] == signature:
            return self._bundle[1]
        trust_domain = self._trust_domain
        if trust_domain is None:
            with contextlib.suppress(SvidUnavailable):
                self._scan_blocking()
            trust_domain = self._trust_domain_from_svids()
        try:
            data = self._read_small(self._bundle_file)
            bundles = parse_bundle_document(data, default_trust_domain=trust_domain)
        except OSError as exc:
            raise SvidUnavailable(
                f"cannot read JWT bundle file {self._bundle_file}: {exc.strerror}"
            ) from None
        except ValueError as exc:
            raise SvidUnavailable(f"JWT bundle file {self._bundle_file}: {exc}") from None
        self._bundle = (signature, bundles)
        return bundles

    async def fetch_jwt_bundles(self) -> dict[str, dict[str, Any]]:
        if self._closed:
            raise SvidUnavailable(f"the SVID source for {self._dir} is closed")
        async with self._lock:
            bundles = await asyncio.to_thread(self._read_bundles_blocking)
        return json.loads(json.dumps(bundles))  # type: ignore[no-any-return]

    async def close(self) -> None:
        self._closed = True
        self._files.clear()
        self._bundle = None


def svid_source_from_options(
    spiffe_socket: str | None,
    svid_dir: str | None,
    bundle_file: str | None,
    *,
    reuse_svids: bool = True,
) -> SvidSource:
    """The SVID source a command's options ask for (raises ValueError saying what is wrong).

    ``--svid-dir`` with ``--svid-bundle-file`` → files; otherwise the Workload API at
    ``spiffe_socket`` or ``$SPIFFE_ENDPOINT_SOCKET``.
    """
    if svid_dir or bundle_file:
        if spiffe_socket:
            raise ValueError(
                "choose one SVID source: a SPIFFE Workload API socket, or an SVID "
                "directory with a bundle file, not both"
            )
        if not svid_dir:
            raise ValueError("a JWT bundle file was given without the JWT-SVID directory")
        if not bundle_file:
            raise ValueError("a JWT-SVID directory was given without the JWT bundle file")
        return FileSvidSource(Path(svid_dir), Path(bundle_file))
    return WorkloadApiSvidSource(spiffe_socket, reuse_svids=reuse_svids)

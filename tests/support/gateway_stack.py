"""A real gateway with its dependencies, as subprocesses: reusable by every test suite.

``start_gateway_stack(tmp, services)`` starts:
- the gateway's dev SPIFFE agent (``spiffe://example.org/gateway``, JWKS over HTTP),
- the dev IdP trusting that JWKS,
- the gateway itself (SQLite in ``tmp``, or the ``database`` URL given; dev mode with a
  static admin token).
Sandbox identities are more dev SPIFFE agents sharing the same ``--key-file``, hence the
same trust domain bundle (``stack.sandbox_agent(...)``).

Helpers mint user tokens at the dev IdP, read its exchange statistics, and sign JWT-SVIDs
directly with the trust domain's key (``stack.sign_svid``) for negative tests.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives import serialization

from gateway_client import BearerAuth, GatewayClient, SvidAuth
from tests.support.procs import Service, start_service
from tokenferry.svid import WorkloadApiSvidSource

TRUST_DOMAIN = "example.org"
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/gateway"
ADMIN_TOKEN = "dev-admin-token-for-tests"
USER_AUDIENCE = "tokenferry"


def sandbox_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/sandbox/{name}"


def exchange_profile_yaml(
    profile_id: str, token_endpoint: str, *, cache_ttl_seconds: int = 0
) -> str:
    """A token_exchange profile: ``user_token`` (broker-only) feeds ``access_token``."""
    return f"""\
id: {profile_id}
display_name: Orders API
credentials:
  - name: user_token
    description: user OIDC access token, gateway-only
    required: true
  - name: access_token
    auth_style: bearer
    token_grant:
      grant_type: token_exchange
      token_endpoint: {token_endpoint}
      audience: orders
      scopes: [orders.read]
      client_assertion_type: urn:ietf:params:oauth:client-assertion-type:jwt-spiffe
      cache_ttl_seconds: {cache_ttl_seconds}
      subject_token:
        source: provider_credential
        credential: user_token
endpoints:
  - {{host: api.example.org, port: 443, path: /orders/**}}
"""


def client_credentials_profile_yaml(profile_id: str, token_endpoint: str) -> str:
    return f"""\
id: {profile_id}
credentials:
  - name: service_token
    token_grant:
      grant_type: client_credentials
      token_endpoint: {token_endpoint}
      audience: reports
endpoints:
  - {{host: reports.example.org}}
"""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class GatewayStack:
    tmp: Path
    services: list[Service]
    key_file: Path
    spiffe: Service
    idp: Service
    gateway: Service
    db_path: Path
    extra_args: tuple[str, ...] = ()
    # What --db says: the SQLite file ``db_path``, or a PostgreSQL URL.
    database: str = ""
    agents: dict[str, Service] = field(default_factory=dict)
    # Values a test module's set-up wants to hand to its tests (e.g. a user token).
    notes: dict[str, str] = field(default_factory=dict)

    # --- addresses ----------------------------------------------------------------

    @property
    def url(self) -> str:
        return str(self.gateway.ready["url"])

    @property
    def admin_url(self) -> str:
        return str(self.gateway.ready["admin_url"])

    @property
    def issuer(self) -> str:
        return str(self.idp.ready["issuer"])

    @property
    def token_endpoint(self) -> str:
        return str(self.idp.ready["token_endpoint"])

    @property
    def gateway_socket(self) -> str:
        return str(self.spiffe.ready["socket"])

    @property
    def kid(self) -> str:
        return str(self.spiffe.ready["kid"])

    # --- processes ----------------------------------------------------------------

    def gateway_args(self, db_path: Path | str, *extra: str) -> list[str]:
        return [
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--db",
            str(db_path),
            "--spiffe-socket",
            self.gateway_socket,
            "--oidc-issuer",
            self.issuer,
            "--oidc-audience",
            USER_AUDIENCE,
            "--dev-admin-token",
            ADMIN_TOKEN,
            *self.extra_args,
            *extra,
        ]

    def start_gateway(self, db_path: Path | str, name: str = "gateway", *extra: str) -> Service:
        service = start_service(name, self.gateway_args(db_path, *extra), self.tmp / "logs")
        self.services.append(service)
        return service

    def restart_gateway(self) -> None:
        self.gateway.stop()
        self.gateway = self.start_gateway(self.database or self.db_path, "gateway-restarted")

    def sandbox_agent(self, name: str, spiffe_id: str | None = None) -> Service:
        """A dev SPIFFE agent serving ``spiffe_id`` (default: the sandbox ID of ``name``)."""
        if name not in self.agents:
            socket = self.tmp / f"{name}.sock"
            agent = start_service(
                f"spiffe-{name}",
                [
                    "dev",
                    "spiffe",
                    "--socket",
                    str(socket),
                    "--spiffe-id",
                    spiffe_id or sandbox_id(name),
                    "--key-file",
                    str(self.key_file),
                ],
                self.tmp / "logs",
            )
            self.services.append(agent)
            self.agents[name] = agent
        return self.agents[name]

    # --- clients ------------------------------------------------------------------

    def admin(self) -> GatewayClient:
        return GatewayClient(self.url, auth=BearerAuth(ADMIN_TOKEN))

    def user(self, token: str) -> GatewayClient:
        return GatewayClient(self.url, auth=BearerAuth(token))

    def supervisor(self, name: str) -> tuple[GatewayClient, WorkloadApiSvidSource]:
        """A client authenticating with sandbox ``name``'s SVIDs (close the source too)."""
        agent = self.sandbox_agent(name)
        source = WorkloadApiSvidSource(str(agent.ready["socket"]))
        return GatewayClient(self.url, auth=SvidAuth(source)), source

    # --- dev IdP ------------------------------------------------------------------

    def user_token(self, sub: str = "alice", *, ttl: int = 600, aud: str = USER_AUDIENCE) -> str:
        response = requests.post(
            f"{self.issuer}/dev/user-token", json={"sub": sub, "ttl": ttl, "aud": aud}, timeout=10
        )
        response.raise_for_status()
        return str(response.json()["access_token"])

    def idp_stats(self) -> dict[str, Any]:
        response = requests.get(f"{self.issuer}/dev/stats", timeout=10)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def intermediate_exchanges(self) -> int:
        """Successful intermediate-policy exchanges the IdP has performed so far."""
        return int(self.idp_stats().get("by_policy", {}).get("intermediate", {}).get("ok", 0))

    # --- hand-made SVIDs ----------------------------------------------------------

    def trust_domain_key(self) -> Any:
        return serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)

    def sign_svid(
        self,
        *,
        sub: str,
        aud: str | list[str] = GATEWAY_ID,
        ttl: int = 300,
        key: Any = None,
        kid: str | None = None,
        alg: str = "ES256",
    ) -> str:
        """A JWT-SVID signed with the trust domain key (or ``key``/``kid`` given)."""
        now = int(time.time())
        claims = {"sub": sub, "aud": aud, "iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex}
        return jwt.encode(
            claims,
            key if key is not None else self.trust_domain_key(),
            algorithm=alg,
            headers={"kid": kid or self.kid, "typ": "JWT"},
        )

    def unsigned_svid(self, *, sub: str, aud: str = GATEWAY_ID) -> str:
        """``alg: none``: no signature at all."""
        now = int(time.time())
        header = _b64(json.dumps({"alg": "none", "kid": self.kid, "typ": "JWT"}).encode())
        payload = _b64(json.dumps({"sub": sub, "aud": aud, "exp": now + 300}).encode())
        return f"{header}.{payload}."

    def hmac_svid_with_public_key(self, *, sub: str, aud: str = GATEWAY_ID) -> str:
        """HS256 keyed with the bundle's public key PEM: the classic key-confusion attack."""
        import hashlib
        import hmac

        public_pem = (
            self.trust_domain_key()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        now = int(time.time())
        header = _b64(json.dumps({"alg": "HS256", "kid": self.kid, "typ": "JWT"}).encode())
        payload = _b64(json.dumps({"sub": sub, "aud": aud, "exp": now + 300}).encode())
        signing_input = f"{header}.{payload}".encode()
        signature = _b64(hmac.new(public_pem, signing_input, hashlib.sha256).digest())
        return f"{header}.{payload}.{signature}"

    def raw_database_bytes(self) -> bytes:
        """The database file and its WAL/SHM companions, as stored on disk."""
        data = b""
        for suffix in ("", "-wal", "-shm", "-journal"):
            path = Path(str(self.db_path) + suffix)
            if path.exists():
                data += path.read_bytes()
        return data


def start_gateway_stack(
    tmp: Path,
    services: list[Service],
    *,
    extra_gateway_args: tuple[str, ...] = (),
    extra_idp_args: tuple[str, ...] = (),
    database: str | None = None,
) -> GatewayStack:
    tmp.mkdir(parents=True, exist_ok=True)
    key_file = tmp / "trust-domain.pem"
    logs = tmp / "logs"
    spiffe = start_service(
        "spiffe-gateway",
        [
            "dev",
            "spiffe",
            "--socket",
            str(tmp / "gateway.sock"),
            "--spiffe-id",
            GATEWAY_ID,
            "--key-file",
            str(key_file),
            "--jwks-listen",
            "127.0.0.1:0",
        ],
        logs,
    )
    services.append(spiffe)
    idp = start_service(
        "idp",
        [
            "dev",
            "idp",
            "--listen",
            "127.0.0.1:0",
            "--spiffe-jwks",
            str(spiffe.ready["jwks_url"]),
            "--gateway-id",
            GATEWAY_ID,
            *extra_idp_args,
        ],
        logs,
    )
    services.append(idp)
    db_path = tmp / "gateway.db"
    stack = GatewayStack(
        tmp=tmp,
        services=services,
        key_file=key_file,
        spiffe=spiffe,
        idp=idp,
        gateway=spiffe,  # replaced just below
        db_path=db_path,
        extra_args=extra_gateway_args,
        database=database or str(db_path),
    )
    stack.gateway = stack.start_gateway(stack.database)
    return stack

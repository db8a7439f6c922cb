"""Typed async client of the tokenferry gateway API (SPEC §6).

Used by the CLI (users, ``BearerAuth``) and the supervisor proxy (``SvidAuth``)::

    from gateway_client import BearerAuth, GatewayClient, NotFound

    async with GatewayClient("http://127.0.0.1:8443", auth=BearerAuth(token)) as gateway:
        try:
            provider = await gateway.get_provider("orders")
        except NotFound:
            ...

Each error code of the API has its own exception (all subclasses of ``GatewayError``);
``GatewayUnreachable`` means the gateway gave no answer at all.
"""

from gateway_client._client import (
    BearerAuth,
    GatewayAuth,
    GatewayClient,
    GatewayTimeout,
    SvidAuth,
)
from gateway_client._exceptions import (
    Conflict,
    FailedPrecondition,
    Forbidden,
    GatewayClientError,
    GatewayError,
    GatewayProtocolError,
    GatewayUnreachable,
    IdentityUnavailable,
    IdpError,
    InvalidRequest,
    NotFound,
    Unauthenticated,
)
from gateway_client._models import (
    AuthConfig,
    CredentialInfo,
    CredentialInput,
    ProfileRecord,
    ProviderRecord,
    SandboxRecord,
    SupervisorConfig,
    SupervisorProvider,
)

__all__ = [
    "AuthConfig",
    "BearerAuth",
    "Conflict",
    "CredentialInfo",
    "CredentialInput",
    "FailedPrecondition",
    "Forbidden",
    "GatewayAuth",
    "GatewayClient",
    "GatewayClientError",
    "GatewayError",
    "GatewayProtocolError",
    "GatewayTimeout",
    "GatewayUnreachable",
    "IdentityUnavailable",
    "IdpError",
    "InvalidRequest",
    "NotFound",
    "ProfileRecord",
    "ProviderRecord",
    "SandboxRecord",
    "SupervisorConfig",
    "SupervisorProvider",
    "SvidAuth",
    "Unauthenticated",
]

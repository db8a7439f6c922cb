"""One exception per gateway error code, so callers can tell failures apart by type.

``GatewayError`` carries the server's ``code``, ``detail`` and HTTP ``status``; the detail
is the gateway's own sanitised text (it never contains a token). ``GatewayUnreachable``
means no answer at all (connection refused, DNS, TLS, timeout).
"""

from __future__ import annotations

from typing import Any


class GatewayClientError(Exception):
    """Base of everything this package raises."""


class GatewayUnreachable(GatewayClientError):
    """The gateway could not be reached or did not answer in time."""


class GatewayError(GatewayClientError):
    """The gateway answered with an error (``{"error": code, "detail": text}``)."""

    code = "error"

    def __init__(
        self, code: str, detail: str, status: int, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{detail} ({code}, HTTP {status})")
        self.code = code
        self.detail = detail
        self.status = status
        self.extra: dict[str, Any] = dict(extra or {})

    @property
    def field(self) -> str | None:
        """The request field the gateway named as wrong, when it named one (400s)."""
        value = self.extra.get("field")
        return value if isinstance(value, str) else None


class InvalidRequest(GatewayError):
    code = "invalid_request"


class Unauthenticated(GatewayError):
    code = "unauthenticated"


class Forbidden(GatewayError):
    code = "forbidden"


class NotFound(GatewayError):
    code = "not_found"


class Conflict(GatewayError):
    """A create named something that already exists."""

    code = "conflict"


class FailedPrecondition(GatewayError):
    """The request is well-formed but the stored state does not allow it (e.g. no subject token)."""

    code = "failed_precondition"


class IdpError(GatewayError):
    """The identity provider refused (or could not be reached for) the token exchange."""

    code = "idp_error"


class IdentityUnavailable(GatewayError):
    """The gateway cannot obtain its own SPIFFE identity (or the bundles to verify yours)."""

    code = "identity_unavailable"


class GatewayProtocolError(GatewayError):
    """The answer was not what the gateway API promises (not JSON, missing fields)."""

    code = "protocol_error"


ERRORS_BY_CODE: dict[str, type[GatewayError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        Unauthenticated,
        Forbidden,
        NotFound,
        Conflict,
        FailedPrecondition,
        IdpError,
        IdentityUnavailable,
    )
}

"""The API's error answers: ``{"error": <code>, "detail": <text>}`` with a fixed status per code."""

from __future__ import annotations

from typing import Any

STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "failed_precondition": 409,
    "internal": 500,
    "idp_error": 502,
    "identity_unavailable": 503,
}


class ApiError(Exception):
    """An answer other than success; ``detail`` is shown to the caller (never a secret)."""

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.status = STATUS_BY_CODE[code]
        self.detail = detail
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}


def invalid_request(detail: str, **extra: Any) -> ApiError:
    return ApiError("invalid_request", detail, **extra)


def unauthenticated(detail: str) -> ApiError:
    return ApiError("unauthenticated", detail)


def forbidden(detail: str) -> ApiError:
    return ApiError("forbidden", detail)


def not_found(detail: str) -> ApiError:
    return ApiError("not_found", detail)


def conflict(detail: str) -> ApiError:
    return ApiError("conflict", detail)


def failed_precondition(detail: str) -> ApiError:
    return ApiError("failed_precondition", detail)


def idp_error(detail: str) -> ApiError:
    return ApiError("idp_error", detail)


def identity_unavailable(detail: str) -> ApiError:
    return ApiError("identity_unavailable", detail)

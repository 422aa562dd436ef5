"""Errors in TGI's shape: ``{"error": "<message>", "error_type": "<type>"}``."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException


class APIError(Exception):
    """An error answered with ``status`` and TGI's error body."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


def validation_error(message: str) -> APIError:
    """TGI's 422: ``Input validation error: <message>``."""
    return APIError(422, f"Input validation error: {message}", "validation")


def overloaded() -> APIError:
    return APIError(429, "Model is overloaded", "overloaded")


def generation_error(message: str) -> APIError:
    return APIError(424, f"Request failed during generation: {message}", "generation")


def _api_error(_: Request[Any, Any, Any], exc: APIError) -> Response[dict[str, str]]:
    return Response(exc.body(), status_code=exc.status)


def _request_validation(
    _: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, str]]:
    """Malformed JSON, wrong types, missing fields: 422 in TGI's shape, not a traceback."""
    detail = exc.detail
    extra = exc.extra if isinstance(exc.extra, list) else []
    if extra:
        first = extra[0]
        where = first.get("key") or ""
        detail = f"{first.get('message', detail)}{f' ({where})' if where else ''}"
    return Response(validation_error(str(detail)).body(), status_code=422)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, str]]:
    if exc.status_code == 400:  # a body that is not JSON at all
        return Response(validation_error(str(exc.detail)).body(), status_code=400)
    error_type = {
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
        415: "unsupported_media_type",
        401: "unauthorized",
    }.get(exc.status_code, "http")
    return Response(
        {"error": str(exc.detail), "error_type": error_type}, status_code=exc.status_code
    )


EXCEPTION_HANDLERS: dict[Any, Any] = {
    APIError: _api_error,
    ValidationException: _request_validation,
    HTTPException: _http_error,
}

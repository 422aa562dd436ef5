"""API errors, and the two wire shapes they take.

TGI's routes answer ``{"error": "<message>", "error_type": "<type>"}``; the OpenAI
routes answer ``{"error": {"message", "type", "param", "code"}}`` so the ``openai`` SDK
shows the message. Both come from one :class:`APIError`; each route picks its shape with
the exception handlers from :func:`exception_handlers`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

#: OpenAI's error ``type`` for each of our error types (anything else: invalid_request_error)
_OPENAI_TYPES = {
    "overloaded": "rate_limit_error",
    "unauthorized": "authentication_error",
    "not_found": "not_found_error",
    "generation": "server_error",
    "healthcheck": "server_error",
}

_HTTP_TYPES = {
    400: "validation",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


class APIError(Exception):
    """An error answered with ``status``; ``param`` names the field at fault, if one is."""

    def __init__(
        self, status: int, message: str, error_type: str, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param = (
            status,
            message,
            error_type,
            param,
        )

    def body(self) -> dict[str, Any]:
        """TGI's shape."""
        return {"error": self.message, "error_type": self.error_type}

    def openai_body(self) -> dict[str, Any]:
        """OpenAI's shape."""
        return {
            "error": {
                "message": self.message,
                "type": _OPENAI_TYPES.get(self.error_type, "invalid_request_error"),
                "param": self.param,
                "code": self.error_type,
            }
        }


class ClientDisconnected(Exception):
    """The client went away before its response was ready (answered 499, to nobody)."""


def validation_error(message: str, param: str | None = None) -> APIError:
    """TGI's 422: ``Input validation error: <message>``."""
    return APIError(422, f"Input validation error: {message}", "validation", param)


def overloaded() -> APIError:
    return APIError(429, "Model is overloaded", "overloaded")


def generation_error(message: str) -> APIError:
    return APIError(424, f"Request failed during generation: {message}", "generation")


def template_error(message: str) -> APIError:
    return APIError(422, f"Template error: {message}", "template_error")


def unsupported(message: str, param: str) -> APIError:
    """A field the server understands but cannot honour yet: 422 naming it."""
    return APIError(422, message, "not_supported", param)


def as_api_error(exc: Exception) -> APIError:
    """Any exception a request can raise, as an APIError (a 500 only for our own bugs)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ClientDisconnected):
        return APIError(499, "the client closed the request", "dropped")
    if isinstance(exc, ValidationException):
        # malformed fields and wrong types: 422 that says which field
        detail = str(exc.detail)
        extra = exc.extra if isinstance(exc.extra, list) else []
        param = None
        if extra:
            first = extra[0]
            param = first.get("key") or None
            detail = f"{first.get('message', detail)}{f' ({param})' if param else ''}"
        return validation_error(detail, param)
    if isinstance(exc, HTTPException):
        if exc.status_code == 400:  # a body that is not JSON at all
            error = validation_error(str(exc.detail))
            error.status = 400
            return error
        error_type = _HTTP_TYPES.get(exc.status_code, "http")
        return APIError(exc.status_code, str(exc.detail), error_type)
    return APIError(500, "Internal server error", "internal")


Render = Callable[[APIError], dict[str, Any]]


def exception_handlers(render: Render) -> dict[Any, Any]:
    """Litestar exception handlers that answer every error with ``render``'s shape."""

    def handle(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
        error = as_api_error(exc)
        headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
        return Response(render(error), status_code=error.status, headers=headers)

    return {
        APIError: handle,
        ClientDisconnected: handle,
        ValidationException: handle,
        HTTPException: handle,
    }


def _tgi_body(error: APIError) -> dict[str, Any]:
    return error.body()


def _openai_body(error: APIError) -> dict[str, Any]:
    return error.openai_body()


#: TGI's shape, for the app and the TGI frontend
EXCEPTION_HANDLERS = exception_handlers(_tgi_body)
#: OpenAI's shape, for the OpenAI frontend's routes
OPENAI_EXCEPTION_HANDLERS = exception_handlers(_openai_body)

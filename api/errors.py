"""One error body for every failure, the exception → status map, request ids and body limits.

Every error answer is `{"error": {"type", "message", "field"}}`: `type` is the exception's class
name (or an HTTP reason for auth and routing errors), `message` the flow's own message, `field`
the input it names when there is one.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from tasks.ab import ABTestNotFoundError, ABTestStateError, StoreError
from tasks.errors import (ConfigurationError, DataError, InvalidModelNameError, MlopsError,
                          ModelNotFoundError, RegistryError, VersionNotFoundError)
from tasks.log_fields import request_id_var
from tasks.retraining import RetrainingInProgressError

logger = logging.getLogger("api")
access_logger = logging.getLogger("api.access")
REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


class APIError(Exception):
    """An error the service itself answers (auth, scope, missing resources of the API)."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type_, message, field


# Most specific first: the first class an exception is an instance of decides its status.
STATUS_BY_TYPE: list[tuple[type[BaseException], int]] = [
    (ModelNotFoundError, 404),
    (VersionNotFoundError, 404),
    (ABTestNotFoundError, 404),
    (RetrainingInProgressError, 409),
    (StoreError, 503),
    (ABTestStateError, 409),  # closed, an active test exists, not ready to conclude
    (RegistryError, 422),  # a source, stage or rollback target the registry cannot use
    (InvalidModelNameError, 422),
    (DataError, 422),
    (ConfigurationError, 422),
    (LookupError, 404),  # other "no such ..." errors of the flows (profiles, exports)
    (MlopsError, 422),
]
FIELD_OF_TYPE = {InvalidModelNameError: "model_name", DataError: "data"}

# The error answers every route documents in its OpenAPI responses
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in {
        401: "No key or a wrong key", 403: "The key lacks the scope",
        404: "Unknown model, version, test, run or file", 409: "Conflict with the current state",
        413: "Request too large", 422: "Bad input (`field` names it)",
        503: "A backend (MLflow, Prefect, the database) does not answer"}.items()}


def error_response(status: int, type_: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(type=type_, message=message, field=field))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _field_named_in(message: str, request: Request) -> str | None:
    """The request input a flow's message starts with ("traffic_split must be ..."), if any."""
    head = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)", message)
    if head is None:
        return None
    names = set(request.query_params) | set(request.path_params)
    names |= getattr(request.app.state, "body_fields", set())
    return head.group(1) if head.group(1) in names else None


def backend_error(exc: BaseException) -> tuple[str, str] | None:
    """(type, message) when `exc` says a backend does not answer: MLflow, Prefect, the database."""
    import httpx
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    text = str(exc)
    if isinstance(exc, requests.exceptions.ConnectionError) or (
            isinstance(exc, MlflowException)
            and re.search(r"Max retries exceeded|Connection refused|Failed to establish", text)):
        return "MLflowUnavailable", f"MLflow does not answer: {text[:300]}"
    if isinstance(exc, (httpx.TransportError,)) or "Cannot connect to Prefect" in text:
        return "PrefectUnavailable", f"the Prefect API does not answer: {text[:300]}"
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        return "DatabaseUnavailable", f"the database does not answer: {text[:300]}"
    return None


def status_of(exc: BaseException) -> int | None:
    for cls, status in STATUS_BY_TYPE:
        if isinstance(exc, cls):
            return status
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.type, exc.message, exc.field, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or None
        message = first.get("msg", "invalid input")
        if field:
            message = f"{field}: {message}"
        return error_response(422, "ValidationError", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # a body that is not JSON (or not UTF-8): bad input
            return error_response(422, "ValidationError", f"the request body is not valid JSON "
                                  f"({exc.detail})")
        kind = {404: "NotFound", 405: "MethodNotAllowed", 413: "RequestTooLarge"}.get(
            exc.status_code, "HTTPError")
        return error_response(exc.status_code, kind, str(exc.detail))



def answer_exception(request: Request, exc: BaseException) -> JSONResponse:
    backend = backend_error(exc)
    if backend is not None:
        logger.warning("%s: %s", backend[0], backend[1])
        return error_response(503, backend[0], backend[1])
    status = status_of(exc)
    if status is None:
        from mlflow.exceptions import MlflowException
        from pydantic import ValidationError

        if isinstance(exc, MlflowException):  # MLflow refusing an input the flows passed on
            code = str(getattr(exc, "error_code", ""))
            status = 404 if "RESOURCE_DOES_NOT_EXIST" in code else \
                422 if code.endswith(("INVALID_PARAMETER_VALUE", "BAD_REQUEST")) else None
            if status is not None:
                return error_response(status, "MlflowException", exc.message)

        if isinstance(exc, ValidationError):  # a flow's own parameter validation
            err = exc.errors()[0] if exc.errors() else {}
            field = ".".join(str(p) for p in err.get("loc", ())) or None
            return error_response(422, "ValidationError", str(err.get("msg", exc)), field)
        logger.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, "InternalError",
                              f"unexpected {type(exc).__name__}; request id "
                              f"{request_id_var.get()} names it in the service log")
    message = str(exc)
    field = None
    if status == 422:
        field = next((f for cls, f in FIELD_OF_TYPE.items() if isinstance(exc, cls)), None) \
            or _field_named_in(message, request)
    return error_response(status, type(exc).__name__, message, field)


class RequestContextMiddleware:
    """Pure ASGI middleware: a request id on every answer (the caller's `X-Request-ID` when it
    is a sane token, else a new one), a limit on the request body (413 above it) and, with
    `access_log`, one `api.access` line per request."""

    def __init__(self, app, max_body_bytes: int = 1_048_576, access_log: bool = False):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"]
                      if k == b"x-request-id"), None)
        rid = given if given and _SAFE_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        header = (REQUEST_ID_HEADER.lower().encode(), rid.encode())

        started = False
        status = 500
        began = time.perf_counter()

        async def send_with_id(message):
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            length = next((int(v) for k, v in scope["headers"] if k == b"content-length"
                           and v.isdigit()), None)
            if length is not None and length > self.max_body_bytes:
                response = error_response(
                    413, "RequestTooLarge", f"the request body has {length} bytes; the limit is "
                    f"{self.max_body_bytes} (pass large data by reference: a path or s3:// URI)")
                await response(scope, receive, send_with_id)
                return
            try:
                await self.app(scope, self._limited(receive), send_with_id)
            except Exception as exc:  # what the app's handlers left: the one error body too
                if started:
                    raise
                from starlette.requests import Request

                response = answer_exception(Request(scope), exc)
                await response(scope, receive, send_with_id)
        finally:
            if self.access_log:
                access_logger.info("%s %s %d %.1f ms", scope["method"], scope["path"], status,
                                   (time.perf_counter() - began) * 1000)
            request_id_var.reset(token)

    def _limited(self, receive):
        seen = 0
        limit = self.max_body_bytes

        async def wrapped():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, f"the request body exceeds {limit} bytes")
            return message
        return wrapped

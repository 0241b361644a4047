"""One error shape for every client-facing failure: ``{"error": {"code", "message"[, "field"]}}``.

``ServiceError`` is what crosses process boundaries: the FaceAnalyzer and Generator convert library errors
into it before raising, because it pickles faithfully (the library's ``NoFaceError(source)`` and
``InvalidParameterError(field, msg)`` take constructor arguments that ``Exception.__reduce__`` does not
replay). The Ingress unwraps ``RayTaskError`` and maps everything else with ``from_exception``; anything
unexpected becomes a generic 500 whose message carries the request id and never a traceback.

Status codes:
    400 invalid_json, invalid_base64, invalid_image, invalid_request,
        bad_request (a malformed multipart body or Content-Length)
    401 unauthorized                     404 not_found (identity or route)
    405 method_not_allowed               408 timeout (the body did not arrive in time)
    413 body_too_large, image_too_large  415 unsupported_media_type (neither JSON nor multipart)
    422 invalid_parameter (``field``), no_face (``field`` names the image)
        too_costly (width x height x steps x num_images cannot finish before the deadline; ``details`` names them)
        unsafe_output (the safety checker flagged every image, ``safety.action: refuse``)
    429 rate_limited (Retry-After)       500 internal
    503 queue_full (Retry-After), unavailable (a backend down or its replica died mid-request),
        model_unavailable, storage_unavailable (S3 or the identity directory failing)
    504 timeout
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from instantid.errors import InstantIDError, InvalidImageError, InvalidParameterError, NoFaceError, WeightsError

log = logging.getLogger("instantid.serve")

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    429: "rate_limited",
    500: "internal",
    503: "unavailable",
    504: "timeout",
}


class ServiceError(Exception):
    """A failure with an HTTP status, a stable code and a one-line message safe to show to the client."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None, details: list[dict] | None = None):
        super().__init__(status, code, message, field, headers, details)
        self.status = int(status)
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})
        self.details = details

    def __reduce__(self):
        return (type(self), (self.status, self.code, self.message, self.field, self.headers, self.details))

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        if self.details:
            error["details"] = self.details
        return {"error": error}


def code_for_status(status: int) -> str:
    return _STATUS_CODES.get(status, "bad_request" if status < 500 else "internal")


def _one_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:500] if lines else ""


def unwrap(exc: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's ``RayTaskError`` wrapper(s)."""
    from ray.exceptions import RayTaskError

    seen = 0
    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None and seen < 5:
        exc = exc.cause
        seen += 1
    return exc


def from_exception(exc: BaseException, *, request_id: str | None = None) -> ServiceError:
    """Map any exception to a ServiceError; unknown ones become a 500 without internals."""
    exc = unwrap(exc)
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, NoFaceError):
        return ServiceError(422, NoFaceError.code, f"no face found in {exc.source}", field=exc.source)
    if isinstance(exc, InvalidParameterError):
        return ServiceError(422, InvalidParameterError.code, _one_line(str(exc)), field=exc.field)
    if isinstance(exc, InvalidImageError):
        return ServiceError(400, InvalidImageError.code, _one_line(str(exc)))
    if isinstance(exc, WeightsError):
        log.error("model weights unavailable: %s", exc)
        return ServiceError(503, "model_unavailable", "the requested model could not be loaded; try again later",
                            headers={"Retry-After": "30"})
    if isinstance(exc, InstantIDError):
        return ServiceError(400, getattr(exc, "code", "invalid_request"), _one_line(str(exc)))
    try:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
    except ImportError:  # pragma: no cover - ray is a dependency of the serve extra
        BackPressureError = DeploymentUnavailableError = RequestCancelledError = ()  # type: ignore
    if BackPressureError and isinstance(exc, BackPressureError):
        retry = getattr(exc, "retry_after_s", None) or 1
        return ServiceError(503, "queue_full", "the generator queue is full; retry later",
                            headers={"Retry-After": str(max(1, int(round(float(retry)))))})
    if DeploymentUnavailableError and isinstance(exc, DeploymentUnavailableError):
        return ServiceError(503, "unavailable", "a backend deployment is unavailable; retry later",
                            headers={"Retry-After": "5"})
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover
        RayActorError = ()  # type: ignore
    if RayActorError and isinstance(exc, RayActorError):  # a replica died or is unreachable mid-request
        log.warning("backend replica unavailable: %s", type(exc).__name__)
        return ServiceError(503, "unavailable", "a backend replica failed during the request; retry later",
                            headers={"Retry-After": "5"})
    if _is_storage_error(exc):
        log.error("identity/output storage unavailable: %s", type(exc).__name__)
        return storage_unavailable()
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or (
            RequestCancelledError and isinstance(exc, RequestCancelledError)):
        return ServiceError(504, "timeout", "the request did not finish within its timeout")
    suffix = f" (request id {request_id})" if request_id else ""
    log.error("unexpected error%s: %s: %s", suffix, type(exc).__name__, exc, exc_info=exc)
    return ServiceError(500, "internal", f"internal error{suffix}")


def _is_storage_error(exc: BaseException) -> bool:
    """S3 unreachable or failing server-side (the directory store's OSErrors are mapped by the Ingress)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout")
    return isinstance(exc, BotoCoreError)


def storage_unavailable() -> ServiceError:
    return ServiceError(503, "storage_unavailable", "the storage backend is unavailable; retry later",
                        headers={"Retry-After": "5"})


def to_service_error(exc: BaseException) -> ServiceError:
    """For replicas: convert before raising across a process boundary."""
    return from_exception(exc)


def validation_error(exc, *, prefix: tuple = ()) -> ServiceError:
    """A pydantic ValidationError (or FastAPI's RequestValidationError) as a 422 naming the first field."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    details = []
    for err in errors:
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        loc = list(prefix) + loc
        details.append({"field": field_name(loc), "message": _one_line(err.get("msg", "invalid value"))})
    if not details:
        return ServiceError(422, "invalid_parameter", "invalid request")
    first = details[0]
    where = first["field"] or "request"
    return ServiceError(422, "invalid_parameter", f"{where}: {first['message']}", field=first["field"] or None,
                        details=details)


def field_name(loc) -> str:
    """('face_images', 1) -> 'face_images[1]'; ('loras', 'x') -> 'loras.x'. A part that came from the client (a
    dict key) is cut to 64 characters: input is never echoed at length."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            out += ("." if out else "") + (text if len(text) <= 64 else text[:61] + "...")
    return out


def json_response(err: ServiceError):
    from starlette.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


def install_handlers(app) -> None:
    """Every error FastAPI/Starlette can produce, in the same JSON shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def service_error(_request, exc: ServiceError):
        return json_response(exc)

    async def http_error(_request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else code_for_status(exc.status_code)
        return json_response(ServiceError(exc.status_code, code_for_status(exc.status_code), message,
                                          headers=getattr(exc, "headers", None)))

    async def request_validation(_request, exc: RequestValidationError):
        return json_response(validation_error(exc))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, request_validation)

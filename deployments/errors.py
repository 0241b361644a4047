"""One error shape for every client-facing failure: ``{"error": {"code", "message"[, "field"]}}``.

``ServiceError`` is what crosses process boundaries: the FaceAnalyzer and Generator convert library errors
into it before raising, because it pickles faithfully (the library's ``NoFaceError(source)`` and
``InvalidParameterError(field, msg)`` take constructor arguments that ``Exception.__reduce__`` does not
replay). The Ingress unwraps ``RayTaskError`` and maps everything else with ``from_exception``; anything
unexpected becomes a generic 500 whose message carries the request id and never a traceback.

The errors there are: ``ERRORS`` below (status, code, retryable), the one table; docs/api.md's error table
and the tests read it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from instantid.errors import InstantIDError, InvalidImageError, InvalidParameterError, NoFaceError, WeightsError

log = logging.getLogger("instantid.serve")

RETRY_AFTER_S = 5  # what a retryable answer asks the client to wait, unless it knows better (a queue's own)
RETRY_LATER = {"Retry-After": str(RETRY_AFTER_S)}


@dataclass(frozen=True)
class ErrorKind:
    """One row of the error table: the HTTP status, the stable code clients match on, and whether the same
    request may succeed if sent again later (those answers carry ``Retry-After``)."""

    status: int
    code: str
    retryable: bool = False
    meaning: str = ""

    def __call__(self, message: str, field: str | None = None, headers: dict[str, str] | None = None,
                 details: list[dict] | None = None) -> "ServiceError":
        return ServiceError(self.status, self.code, message, field=field, headers=headers, details=details)


INVALID_JSON = ErrorKind(400, "invalid_json", meaning="the body is not JSON, or nested too deeply")
INVALID_BASE64 = ErrorKind(400, "invalid_base64", meaning="an image field is not base64 or a data URL")
INVALID_IMAGE = ErrorKind(400, "invalid_image", meaning="an image that cannot be read, or hostile framing")
INVALID_REQUEST = ErrorKind(400, "invalid_request", meaning="a library error without a code of its own")
BAD_REQUEST = ErrorKind(400, "bad_request", meaning="a malformed multipart body or Content-Length")
UNAUTHORIZED = ErrorKind(401, "unauthorized", meaning="no API key, or an unknown one")
NOT_FOUND = ErrorKind(404, "not_found", meaning="an identity, job or route that is absent (or another key's)")
METHOD_NOT_ALLOWED = ErrorKind(405, "method_not_allowed", meaning="a route that exists, another method")
BODY_TIMEOUT = ErrorKind(408, "timeout", meaning="the body did not arrive in time")
BODY_TOO_LARGE = ErrorKind(413, "body_too_large", meaning="the body is over limits.max_body_bytes")
IMAGE_TOO_LARGE = ErrorKind(413, "image_too_large", meaning="an image over limits.max_image_pixels")
UNSUPPORTED_MEDIA_TYPE = ErrorKind(415, "unsupported_media_type", meaning="neither JSON nor multipart")
INVALID_PARAMETER = ErrorKind(422, "invalid_parameter", meaning="a field out of range or inconsistent (field)")
NO_FACE = ErrorKind(422, "no_face", meaning="no face in a photo (field names the image)")
TOO_COSTLY = ErrorKind(422, "too_costly", meaning="width x height x steps x num_images cannot finish in time")
UNSAFE_OUTPUT = ErrorKind(422, "unsafe_output", meaning="the safety checker flagged every image (refuse)")
RESULT_TOO_LARGE = ErrorKind(422, "result_too_large",
                             meaning="a job's inline result could be over jobs.max_result_bytes (use delivery s3)")
RATE_LIMITED = ErrorKind(429, "rate_limited", retryable=True, meaning="over the key's or address's rate")
TOO_MANY_IN_FLIGHT = ErrorKind(429, "too_many_in_flight", retryable=True,
                               meaning="the key has auth.max_in_flight calls in flight on this replica")
TOO_MANY_JOBS = ErrorKind(429, "too_many_jobs", retryable=True,
                          meaning="the key has jobs.max_active_per_key jobs in flight or max_jobs_per_key stored")
INTERNAL = ErrorKind(500, "internal", meaning="anything unexpected: the message carries the request id")
QUEUE_FULL = ErrorKind(503, "queue_full", retryable=True, meaning="the Generator's or the job queue is full")
UNAVAILABLE = ErrorKind(503, "unavailable", retryable=True,
                        meaning="a backend down, or its replica died mid-request")
MODEL_UNAVAILABLE = ErrorKind(503, "model_unavailable", retryable=True, meaning="a model's weights failed to load")
STORAGE_UNAVAILABLE = ErrorKind(503, "storage_unavailable", retryable=True,
                                meaning="S3, the identity directory or the job store failing")
TIMEOUT = ErrorKind(504, "timeout", meaning="the request did not finish within its timeout")

ERRORS: tuple[ErrorKind, ...] = tuple(v for v in list(globals().values()) if isinstance(v, ErrorKind))

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
        return MODEL_UNAVAILABLE("the requested model could not be loaded; try again later",
                            headers={"Retry-After": "30"})
    if isinstance(exc, InstantIDError):
        return ServiceError(400, getattr(exc, "code", "invalid_request"), _one_line(str(exc)))
    try:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
    except ImportError:  # pragma: no cover - ray is a dependency of the serve extra
        BackPressureError = DeploymentUnavailableError = RequestCancelledError = ()  # type: ignore
    if BackPressureError and isinstance(exc, BackPressureError):
        retry = getattr(exc, "retry_after_s", None) or 1
        return QUEUE_FULL("the generator queue is full; retry later",
                            headers={"Retry-After": str(max(1, int(round(float(retry)))))})
    if DeploymentUnavailableError and isinstance(exc, DeploymentUnavailableError):
        return UNAVAILABLE("a backend deployment is unavailable; retry later",
                            headers=RETRY_LATER)
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover
        RayActorError = ()  # type: ignore
    if RayActorError and isinstance(exc, RayActorError):  # a replica died or is unreachable mid-request
        log.warning("backend replica unavailable: %s", type(exc).__name__)
        return UNAVAILABLE("a backend replica failed during the request; retry later",
                            headers=RETRY_LATER)
    if _is_storage_error(exc):
        log.error("identity/output storage unavailable: %s", type(exc).__name__)
        return storage_unavailable()
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or (
            RequestCancelledError and isinstance(exc, RequestCancelledError)):
        return TIMEOUT("the request did not finish within its timeout")
    suffix = f" (request id {request_id})" if request_id else ""
    log.error("unexpected error%s: %s: %s", suffix, type(exc).__name__, exc, exc_info=exc)
    return INTERNAL(f"internal error{suffix}")


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
    return STORAGE_UNAVAILABLE("the storage backend is unavailable; retry later",
                        headers=RETRY_LATER)


def validation_error(exc, *, prefix: tuple = ()) -> ServiceError:
    """A pydantic ValidationError (or FastAPI's RequestValidationError) as a 422 naming the first field."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    details = []
    for err in errors:
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        loc = list(prefix) + loc
        details.append({"field": field_name(loc), "message": _one_line(err.get("msg", "invalid value"))})
    if not details:
        return INVALID_PARAMETER("invalid request")
    first = details[0]
    where = first["field"] or "request"
    return INVALID_PARAMETER(f"{where}: {first['message']}", field=first["field"] or None,
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

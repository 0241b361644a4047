"""Reading client input at the HTTP edge: the body (bounded in size and time), JSON and multipart forms. The
checks of the fields themselves (base64, image headers) are the request core's (deployments/ingress/inputs.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from typing import Any

from fastapi import Request

from deployments.errors import (BAD_REQUEST, BODY_TIMEOUT, BODY_TOO_LARGE, INVALID_JSON, INVALID_PARAMETER,
                                RATE_LIMITED, UNSUPPORTED_MEDIA_TYPE, ServiceError)
from deployments.ingress.inputs import decode_base64


# A JSON integer literal longer than this can be no valid value of the API (seeds are < 2**32; the largest
# count is a few digits): it parses as infinity, so validation names the field and says it is out of range,
# instead of Python's int-string limit (4300 digits) failing the whole body.
MAX_INT_DIGITS = 40


def _bounded_int(text: str) -> int | float:
    return int(text) if len(text) <= MAX_INT_DIGITS else math.inf


def loads_json(text: str | bytes):
    """``json.loads`` for client input: deep nesting (RecursionError) and huge integers are a 400/422, never a
    500 with a traceback."""
    try:
        return json.loads(text, parse_int=_bounded_int)
    except RecursionError:
        raise INVALID_JSON("the JSON is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "msg", None) or type(exc).__name__
        raise INVALID_JSON(f"the body is not valid JSON: {reason}") from None
    except ValueError:
        raise INVALID_JSON("the body is not valid JSON") from None


def parse_json(body: bytes) -> dict:
    data = loads_json(body)
    if not isinstance(data, dict):
        raise INVALID_PARAMETER("the body must be a JSON object")
    return data


# Request bodies received at once per client (its API key, else its address): a slow uploader holds its own
# slots, not the replica's (64 requests in progress per Ingress replica).
MAX_UPLOADS_PER_CLIENT = 4


class UploadSlots:
    def __init__(self, per_client: int = MAX_UPLOADS_PER_CLIENT):
        self.per_client = per_client
        self.active: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, who: str | None):
        if who is None:  # an unknown client (see client_address): nothing to hold it to
            yield
            return
        if self.active.get(who, 0) >= self.per_client:
            raise RATE_LIMITED(f"more than {self.per_client} uploads in progress from this "
                               "client", headers={"Retry-After": "1"})
        self.active[who] = self.active.get(who, 0) + 1
        try:
            yield
        finally:
            self.active[who] -= 1
            if not self.active[who]:
                del self.active[who]


async def read_body(request, limit: int, deadline: float | None = None) -> bytes:
    """The body, at most ``limit`` bytes, received by ``deadline`` (``time.perf_counter()``; the request's own
    deadline: the time a client takes to send it counts) or a 408."""
    try:
        async with asyncio.timeout(None if deadline is None else max(0.0, deadline - time.perf_counter())):
            return await _read_body(request, limit)
    except TimeoutError:
        raise BODY_TIMEOUT("the request body was not received in time") from None


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise BODY_TOO_LARGE(f"the body is larger than {limit} bytes")
        except ValueError:
            raise BAD_REQUEST("malformed Content-Length") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BODY_TOO_LARGE(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request, body: bytes, max_files: int, limit: int,
                    file_fields: tuple[str, ...] = ("face_images", "pose_image")) -> tuple[dict, dict]:
    """multipart/form-data: file fields (raw bytes; only ``file_fields``, any other file part is refused) and the
    other fields (JSON-decoded where they are JSON)."""
    from starlette.datastructures import UploadFile

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=64, max_part_size=limit)
    except Exception as exc:
        detail = getattr(exc, "detail", None) or str(exc)
        raise BAD_REQUEST(f"malformed multipart body: {detail}".splitlines()[0]) from None
    files: dict[str, list[bytes] | bytes] = {}
    data: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in file_fields:
                raise INVALID_PARAMETER(f"{key[:64]}: unexpected file field", field=key[:64])
            content = await value.read()
            if key in ("pose_image", "init_image"):
                files[key] = content
            else:  # face_images, or a surface's own file fields (the OpenAI surface's image / image[])
                files.setdefault(key, []).append(content)
        elif key == "face_images":
            files.setdefault("face_images", []).append(decode_base64(value, "face_images"))
        elif key == "loras":
            try:
                data["loras"] = loads_json(value) if value.strip() else {}
            except ServiceError:
                raise INVALID_PARAMETER("loras: must be a JSON object", field="loras") from None
        elif value == "" and key not in ("prompt", "negative_prompt"):
            continue  # an empty form field means "not given"
        else:
            data[key] = value
    await form.close()
    return data, files


async def read_request(request, uploads: UploadSlots, who: str | None, limit: int, deadline: float | None,
                       max_files: int, file_fields: tuple[str, ...] = ("face_images", "pose_image")
                       ) -> tuple[dict, dict | None]:
    """A JSON or multipart request: (fields, files) — files None for JSON, whose images are base64 fields.
    The body is received within one of ``who``'s upload slots, by ``deadline`` (``time.perf_counter()``)."""
    with uploads.hold(who):
        body = await read_body(request, limit, deadline)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await read_form(request, body, max_files, limit, file_fields)
    if ctype not in ("", "application/json") and not ctype.endswith("+json"):
        raise UNSUPPORTED_MEDIA_TYPE("send application/json or multipart/form-data")
    return parse_json(body), None

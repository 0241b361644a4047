"""Reading client input at the HTTP edge: the body (bounded in size and time), JSON and multipart forms. The
checks of the fields themselves (base64, image headers) are the request core's (deployments/ingress/inputs.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from dataclasses import dataclass, field
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


# Containers and values a request's JSON may hold ('{', '[' and ',' counted before parsing, in C): a request has a
# few hundred (4 people's 512-float embeddings: ~2100); 20 MB of '[{},{},...]' were 6.7M dicts and +410 MB of RSS.
MAX_JSON_ITEMS = 100_000


def _count_items(text: str | bytes) -> int:
    if isinstance(text, str):
        return text.count("{") + text.count("[") + text.count(",")
    return text.count(b"{") + text.count(b"[") + text.count(b",")


def loads_json(text: str | bytes):
    """``json.loads`` for client input: deep nesting (RecursionError) and huge integers are a 400/422, never a
    500 with a traceback."""
    if _count_items(text) > MAX_JSON_ITEMS:
        raise INVALID_JSON(f"the JSON holds more than {MAX_JSON_ITEMS} values")
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
# ... but only while nobody else needs them: when a client's slots are full, a new upload takes the slot of its
# slowest body if that one has been arriving for GRACE_S at under MIN_BODY_RATE (that body gets 408). With auth off
# every client behind one address shares the slots: 4 trickling bodies held them all for the whole request timeout
# and every other upload from the address got 429 (issue 30). A real upload of 12 MB at 16 KiB/s takes 13 minutes.
MIN_BODY_RATE = 16 * 1024  # bytes/s
GRACE_S = 2.0


@dataclass(eq=False)
class Upload:
    """One body being received: how much of it has arrived, and whether a newer upload took its slot."""

    started: float = field(default_factory=time.monotonic)
    received: int = 0
    evicted: asyncio.Event = field(default_factory=asyncio.Event)

    def rate(self, now: float) -> float:
        return self.received / max(now - self.started, 1e-9)


class UploadSlots:
    def __init__(self, per_client: int = MAX_UPLOADS_PER_CLIENT):
        self.per_client = per_client
        self.active: dict[str, list[Upload]] = {}

    def _slowest_evictable(self, uploads: list[Upload]) -> Upload | None:
        now = time.monotonic()
        slow = [u for u in uploads if not u.evicted.is_set() and now - u.started >= GRACE_S
                and u.rate(now) < MIN_BODY_RATE]
        return min(slow, key=lambda u: u.rate(now)) if slow else None

    @contextlib.contextmanager
    def hold(self, who: str | None):
        upload = Upload()
        if who is None:  # an unknown client (see client_address): nothing to hold it to
            yield upload
            return
        held = self.active.setdefault(who, [])
        if sum(not u.evicted.is_set() for u in held) >= self.per_client:
            victim = self._slowest_evictable(held)
            if victim is None:
                raise RATE_LIMITED(f"more than {self.per_client} uploads in progress from this "
                                   "client", headers={"Retry-After": "1"})
            victim.evicted.set()
        held.append(upload)
        try:
            yield upload
        finally:
            held.remove(upload)
            if not held:
                del self.active[who]


async def read_body(request, limit: int, deadline: float | None = None, upload: Upload | None = None) -> bytes:
    """The body, at most ``limit`` bytes, received by ``deadline`` (``time.perf_counter()``; the request's own
    deadline: the time a client takes to send it counts) or a 408; also a 408 when a faster upload of the same
    client took ``upload``'s slot."""
    upload = upload or Upload()
    reader = asyncio.ensure_future(_read_body(request, limit, upload))
    evicted = asyncio.ensure_future(upload.evicted.wait())
    try:
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        done, _ = await asyncio.wait({reader, evicted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if reader in done:
            return reader.result()
        if evicted in done:
            raise BODY_TIMEOUT("the request body arrives too slowly: its upload slot went to another upload of "
                               "this client")
        raise BODY_TIMEOUT("the request body was not received in time")
    finally:
        for task in (reader, evicted):
            task.cancel()


async def _read_body(request, limit: int, upload: Upload) -> bytes:
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
        upload.received = size
        if size > limit:
            raise BODY_TOO_LARGE(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)


def _check_complete_multipart(content_type: str, body: bytes) -> None:
    """A multipart body must end with its closing delimiter ('--boundary--'): Starlette's parser takes a truncated
    one for a complete form without the parts that were cut, so a cut upload read as "face_images required"."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise BAD_REQUEST("malformed multipart body: no boundary in Content-Type")
    if b"--" + found.group(1).encode("latin-1") + b"--" not in body[-len(found.group(1)) - 256:]:
        raise BAD_REQUEST("malformed multipart body: it is truncated (no closing boundary)")


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
    with uploads.hold(who) as upload:
        body = await read_body(request, limit, deadline, upload)
    content_type = request.headers.get("content-type", "")
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        _check_complete_multipart(content_type, body)
        return await read_form(request, body, max_files, limit, file_fields)
    if ctype not in ("", "application/json") and not ctype.endswith("+json"):
        raise UNSUPPORTED_MEDIA_TYPE("send application/json or multipart/form-data")
    # off the event loop: a large body of many small values takes a while to parse (bounded: MAX_JSON_ITEMS)
    return await asyncio.to_thread(parse_json, body), None

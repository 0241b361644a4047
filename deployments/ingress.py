"""Ingress deployment: the HTTP API (FastAPI through ``serve.ingress``) and the handle API, composing the
FaceAnalyzer and the Generator through DeploymentHandles.

setup            validate AppArgs, build request models bound to its limits, open the identity store
decode_request   bounded body read, JSON or multipart, base64 -> raw bytes, image header checks
                 (format, pixel count) before anything is decoded in full
predict          FaceAnalyzer (or the identity store) -> Generator, under the request's deadline
encode_response  one image encoding (png/jpeg/webp) of the Generator's arrays, base64 or S3 + presigned URL

The Ingress imports no torch. Auth (API keys) and per-key rate limiting are a FastAPI dependency on the
/v1 router (``AppArgs.auth``); the handle API is for trusted in-cluster callers and skips them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import json
import logging
import math
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.config import BackpressureConfig

from . import metrics
from .api_keys import KeyHashSource
from .config import AppArgs
from .errors import (ServiceError, from_exception, install_handlers, json_response, storage_unavailable,
                     validation_error)
from .identity_score import score_outputs
from .identities import (decode_embedding, make_record, make_store, new_identity_id, valid_identity_id,
                         visible_to)
from .models import (
    DELIVERIES,
    MAX_SEED,
    OUTPUT_FORMATS,
    SCHEDULERS,
    ErrorBody,
    GenerateResponse,
    Health,
    IdentityList,
    IdentityResponse,
    ModelList,
    Readiness,
    build_models,
    default_size,
)

log = logging.getLogger("instantid.serve")

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
READY_STATES = {"HEALTHY", "UPSCALING", "DOWNSCALING"}
DOWN_STATES = {"UNHEALTHY", "DEPLOY_FAILED"}
BACKENDS = ("FaceAnalyzer", "Generator")
# A backend call whose request or response carries more than this goes by reference (an actor call; large
# arguments and results through Ray's object store) instead of by value over Serve's gRPC data plane, which
# refuses messages over 4 MiB (Ray's replica gRPC max message length) and is slower from ~1 MB on: 15 MB by
# value 104 ms, by reference 19 ms; 48 MB 313 vs 19 ms (bench/data_plane.py, docs/reliability.md).
BY_VALUE_MAX_BYTES = 1024 * 1024


@dataclass
class Ctx:
    """Per-request state: id, route, start time, per-stage timings and in-flight handle calls."""

    route: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, Any] = field(default_factory=dict)
    pending: list = field(default_factory=list)
    api_key: str | None = None  # the caller's key name: the owner of identities it creates
    scope: str | None = None  # whose identities it may see (None: all; auth off, admin keys, handle API)
    deadline: float | None = None  # time.time() when the request times out (504); backends stop work past it


# -- auth --------------------------------------------------------------------------------------------
class Authenticator:
    """Bearer API keys, checked against sha256 hashes ('name:sha256hex,...') from an env var or the file that
    <env var>_FILE names, re-read so that a rotated Secret reaches running replicas (deployments/api_keys.py)."""

    def __init__(self, env_var: str):
        self.source = KeyHashSource(env_var)

    @property
    def hashes(self) -> dict[str, str]:
        return self.source.current()

    def check(self, authorization: str | None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        found = None
        for known, name in self.hashes.items():  # compare against all, in constant time each
            if hmac.compare_digest(known, digest):
                found = name
        if found is None:
            raise ServiceError(401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        return found


class RateLimiter:
    """A token bucket per API key (per Ingress replica); also one per client address for failed logins."""

    def __init__(self, rate_per_s: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = float(rate_per_s), float(burst), clock
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> None:
        now = self.clock()
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            retry = max(1, math.ceil((1.0 - tokens) / self.rate))
            raise ServiceError(429, "rate_limited", "too many requests for this API key",
                               headers={"Retry-After": str(retry)})
        self.buckets[key] = (tokens - 1.0, now)

    def spend(self, key: str) -> None:
        """Take a token if one is left, never raising: the next ``take`` refuses once they are gone."""
        with contextlib.suppress(ServiceError):
            self.take(key)
        if len(self.buckets) > 100_000:  # many addresses: forget the ones that have refilled
            now = self.clock()
            self.buckets = {k: (t, last) for k, (t, last) in self.buckets.items()
                            if t + (now - last) * self.rate < self.burst}

    def exhausted(self, key: str) -> float | None:
        """Seconds until ``key`` has a token again; None when it has one now."""
        tokens, last = self.buckets.get(key, (self.burst, self.clock()))
        tokens = min(self.burst, tokens + (self.clock() - last) * self.rate)
        return None if tokens >= 1.0 else (1.0 - tokens) / self.rate


# Failed API key checks per client address: a burst, then one a second. Past it every /v1 call of that address,
# with a right key or a wrong one, is a 429 until the bucket refills, so keys cannot be guessed faster than
# this (~600 guesses a second before). Clients behind one NAT address share the bucket.
AUTH_FAILURE_BURST = 20
AUTH_FAILURES_PER_S = 1.0


def client_address(request) -> str | None:
    """The client's address: the last X-Forwarded-For entry, the one our HAProxy appends
    (deployments/haproxy_guard.py). None without one: behind a proxy that does not add it (Serve's Python
    proxy, ``serve.httpIngress: proxy``) the peer is the proxy, shared by every client, and limiting it would let one client lock out all."""
    forwarded = request.headers.getlist("x-forwarded-for")
    if forwarded:
        return forwarded[-1].split(",")[-1].strip()[:64] or None
    return None


def _reason(message: str) -> str:
    """Why a deployment is not ready, from Serve's status message: the replica's own one-line reason
    ('model not loaded: ...', raised by check_health) when present, never a traceback."""
    import re

    # the last one: Serve's message holds the replica's traceback, whose source lines come before the error
    found = [m for m in re.findall(r"(?:face )?model not loaded: [^\n]*", message or "") if "{" not in m]
    if found:
        return found[-1][:300]
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[0][:200] if lines and "Traceback" not in lines[0] else ""


# -- decoding helpers --------------------------------------------------------------------------------
def decode_base64(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise ServiceError(400, "invalid_base64", f"{where} must be a base64 string", field=where)
    text = text.strip()
    if text.startswith("data:"):
        _, comma, text = text.partition(",")
        if not comma:
            raise ServiceError(400, "invalid_base64", f"{where} is a malformed data URL", field=where)
    text = "".join(text.split())
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(400, "invalid_base64", f"{where} is not valid base64", field=where) from None
    if not data:
        raise ServiceError(400, "invalid_image", f"{where} is empty", field=where)
    return data


def check_image(data: bytes, where: str, max_pixels: int) -> None:
    """Format and size from the header only: refuse non-images, oversized images and hostile framing (bounded
    work, ``instantid.image_limits``) before decoding. Blocking: callers run it off the event loop."""
    from PIL import Image

    from instantid.errors import InvalidImageError
    from instantid.image_limits import ACCEPTED_FORMATS, check_structure

    try:
        check_structure(data, where)
    except InvalidImageError as exc:
        raise ServiceError(400, "invalid_image", str(exc), field=where) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        raise ServiceError(413, "image_too_large", f"{where} has too many pixels", field=where) from None
    except Exception:
        raise ServiceError(400, "invalid_image", f"{where} is not a readable image (JPEG, PNG or WebP expected)",
                           field=where) from None
    if width < 1 or height < 1:
        raise ServiceError(400, "invalid_image", f"{where} claims a {width}x{height} size", field=where)
    if fmt not in ACCEPTED_FORMATS:
        raise ServiceError(400, "invalid_image", f"{where} is a {fmt} image; only JPEG, PNG and WebP are accepted",
                           field=where)
    if width * height > max_pixels:
        raise ServiceError(413, "image_too_large",
                           f"{where} is {width}x{height}, more than {max_pixels} pixels", field=where)


def encode_image(array, fmt: str) -> bytes:
    from PIL import Image

    image = Image.fromarray(array)
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, format="PNG", compress_level=4)
    elif fmt == "jpeg":
        image.save(out, format="JPEG", quality=95)
    else:
        image.save(out, format="WEBP", quality=95, method=4)
    return out.getvalue()


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
        raise ServiceError(400, "invalid_json", "the JSON is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "msg", None) or type(exc).__name__
        raise ServiceError(400, "invalid_json", f"the body is not valid JSON: {reason}") from None
    except ValueError:
        raise ServiceError(400, "invalid_json", "the body is not valid JSON") from None


def _parse_json(body: bytes) -> dict:
    data = loads_json(body)
    if not isinstance(data, dict):
        raise ServiceError(422, "invalid_parameter", "the body must be a JSON object")
    return data


def _validate(model: type[BaseModel], data: dict, strict: bool = True) -> BaseModel:
    """Strict types (``"seed": "12"``, ``"width": "64"``, ``"steps": true`` are refused) except for multipart
    forms, whose fields are text by nature."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except RecursionError:
        raise ServiceError(422, "invalid_parameter", "a field is nested too deeply") from None


COST_FIELDS = ("width", "height", "steps", "num_images")


def check_cost(spec, req, deadline: float | None, size: tuple[int, int] | None = None) -> None:
    """Refuse up front a generation that cannot finish before its deadline: its cost, width x height x steps x
    num_images in megapixel-steps, over the model's measured ``megapixel_steps_per_s`` (``ModelSpec``), plus
    the model's fixed ``overhead_s``, must fit in the time left. 422 naming the four fields. ``size`` is the
    output size when the request leaves it to the photo (known only after face analysis)."""
    width, height = size or (req.width, req.height)
    if spec.megapixel_steps_per_s is None or deadline is None or not width or not height:
        return
    cost = width * height * req.steps * req.num_images / 1e6
    needed = spec.overhead_s + cost / spec.megapixel_steps_per_s
    left = deadline - time.time()
    if needed > left:
        raise ServiceError(
            422, "too_costly",
            f"width x height x steps x num_images = {cost:.1f} megapixel-steps needs about {needed:.0f}s on model "
            f"{spec.name!r}, more than the {max(left, 0):.0f}s left before this request's deadline; lower width, "
            f"height, steps or num_images", field="steps", details=[{"field": f} for f in COST_FIELDS])


# -- the service ---------------------------------------------------------------------------------------
class IngressCore:
    """Everything the Ingress does, callable from HTTP routes and from DeploymentHandles."""

    def __init__(self, args: dict | AppArgs, face_analyzer, generator, *, status_fn=None, app_name: str | None = None):
        self.args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
        self.models = build_models(self.args)
        self.face = face_analyzer
        self.generator = generator
        self._generators: dict[tuple[str, bool], Any] = {}
        self._face_large = None
        self.store = make_store(self.args.identity_store)
        self.auth = Authenticator(self.args.auth.key_hashes_env) if self.args.auth.enabled else None
        self.limiter = RateLimiter(self.args.auth.rate_per_s, self.args.auth.burst) if self.args.auth.enabled else None
        self.auth_failures = RateLimiter(AUTH_FAILURES_PER_S, AUTH_FAILURE_BURST)
        self.uploads = UploadSlots()
        self._status_fn = status_fn
        self._app_name = app_name
        self._ready_cache: tuple[float, dict] | None = None
        self._probe_cache: tuple[float, dict] | None = None
        self._refresh: asyncio.Future | None = None
        self._status_messages: dict[str, str] = {}
        self._running: dict[str, int] = {}  # RUNNING replicas per deployment, from the last status read
        self._s3 = None
        from .jobs import JobService  # the job core under /v1/jobs and the Replicate surface

        self.jobs = JobService(self, self.args.jobs)

    # -- plumbing --------------------------------------------------------------------------------------
    def _generator_for(self, model: str, message_bytes: int = 0):
        """The Generator's handle for ``model``, by reference when a message is over BY_VALUE_MAX_BYTES."""
        large = message_bytes > BY_VALUE_MAX_BYTES
        handle = self._generators.get((model, large))
        if handle is None:
            options = {"multiplexed_model_id": model, **({"_by_reference": True} if large else {})}
            handle = self._generators[(model, large)] = self.generator.options(**options)
        return handle

    def _face_for(self, message_bytes: int):
        """The FaceAnalyzer's handle, by reference when the photos are over BY_VALUE_MAX_BYTES."""
        if message_bytes <= BY_VALUE_MAX_BYTES:
            return self.face
        if self._face_large is None:
            self._face_large = self.face.options(_by_reference=True)
        return self._face_large

    @staticmethod
    async def _call(ctx: Ctx, response):
        ctx.pending.append(response)
        try:
            return await response
        finally:
            with contextlib.suppress(ValueError):
                ctx.pending.remove(response)

    async def _deadline(self, ctx: Ctx, coro, timeout_s: float | None = None):
        """Run ``coro`` within the request's deadline; past it, cancel in-flight calls and answer 504."""
        timeout = min(timeout_s or self.args.request_timeout_s, self.args.request_timeout_s)
        left = timeout - (time.perf_counter() - ctx.started)  # receiving the body counted against it
        if left <= 0:
            coro.close()
            raise ServiceError(504, "timeout", f"the request did not finish within {timeout:g}s")
        ctx.deadline = time.time() + left
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({task}, timeout=left)
        except asyncio.CancelledError:  # the client went away: stop the work too
            task.cancel()
            self._cancel_pending(ctx)
            raise
        if task in done:
            return task.result()
        task.cancel()
        self._cancel_pending(ctx)
        raise ServiceError(504, "timeout", f"the request did not finish within {timeout:g}s")

    @staticmethod
    def _cancel_pending(ctx: Ctx) -> None:
        for response in list(ctx.pending):
            with contextlib.suppress(Exception):
                response.cancel()

    def _fail(self, ctx: Ctx, exc: BaseException) -> ServiceError:
        err = from_exception(exc, request_id=ctx.request_id)
        if err.code == "no_face":
            metrics.face_not_found(ctx.route)
        return err

    async def _store(self, method: str, *a):
        """An identity-store call in a worker thread; a failing backend (S3 down, disk full or read-only) is a
        503 storage_unavailable, never a 500 or a hang (S3 calls have connect/read timeouts)."""
        try:
            return await asyncio.to_thread(getattr(self.store, method), *a)
        except ServiceError:
            raise
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise
            log.error("identity store %s failed: %s", method, type(exc).__name__)
            raise storage_unavailable() from None

    async def _backend_down(self, names: tuple[str, ...]) -> None:
        """Fail fast with 503 when a backend this request needs has no healthy replica (it died and is being
        replaced, or its model failed to load), instead of queueing until the deadline."""
        down = self._down(self._known_readiness() or await self.readiness(), names)
        if down:  # the cached view may predate a replacement replica: look again before refusing
            down = self._down(await self.readiness(fresh=True), names)
        if down:
            raise ServiceError(503, "unavailable", f"{', '.join(down)} is unavailable; retry later",
                               headers={"Retry-After": "5"})

    def _down(self, state: dict, names: tuple[str, ...]) -> list[str]:
        """Backends with no running replica whose status says they failed. Serve's status lags: a replacement
        replica serves a moment before its deployment is HEALTHY again, so a running replica counts."""
        statuses = state.get("deployments", {})
        return [n for n in names if not self._running.get(n) and (statuses.get(n) in DOWN_STATES or (
            statuses.get(n) not in READY_STATES and "not loaded" in _reason(self._status_messages.get(n, ""))))]

    def _known_readiness(self) -> dict | None:
        """The last status read, without waiting: a stale one starts a single background refresh, so reading
        Serve's status (a controller round trip) never sits on a request's path after the first one."""
        stale = self._ready_cache is None or time.monotonic() - self._ready_cache[0] >= 1.0
        if stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.ensure_future(self.readiness())
        return self._ready_cache[1] if self._ready_cache else None

    def scope_of(self, api_key: str | None) -> str | None:
        """The identity scope of a key: its own identities, or all of them for ``auth.admin_keys``."""
        if self.auth is None or api_key is None or api_key in self.args.auth.admin_keys:
            return None
        return api_key

    def authenticate(self, authorization: str | None, client: str | None = None) -> str | None:
        """The key's name; failed checks are throttled per client address when it is known."""
        if self.auth is None:
            return None
        wait = self.auth_failures.exhausted(client) if client else None
        if wait is not None:
            raise ServiceError(429, "rate_limited", "too many failed API key checks from this address",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
        try:
            name = self.auth.check(authorization)
        except ServiceError:
            if client:
                self.auth_failures.spend(client)
            raise
        self.limiter.take(name)
        return name

    # -- generate ----------------------------------------------------------------------------------------
    def decode_generate(self, data: dict, files: dict[str, Any] | None = None):
        """A request dict (+ multipart files) -> (validated request, face image bytes | None, pose bytes | None)."""
        started = time.perf_counter()
        req = _validate(self.models.GenerateRequest, data, strict=files is None)
        limits = self.args.limits
        faces: list[bytes] | None = None
        pose: bytes | None = None
        files = files or {}
        if req.face_images is not None:
            faces = [decode_base64(s, f"face_images[{i}]") for i, s in enumerate(req.face_images)]
        elif files.get("face_images"):
            faces = list(files["face_images"])
        if req.pose_image is not None:
            pose = decode_base64(req.pose_image, "pose_image")
        elif files.get("pose_image") is not None:
            pose = files["pose_image"]
        if faces is not None and req.identity_id is not None:
            raise ServiceError(422, "invalid_parameter", "give face_images or identity_id, not both",
                               field="face_images")
        if faces is None and req.identity_id is None:
            raise ServiceError(422, "invalid_parameter", "face_images or identity_id is required",
                               field="face_images")
        if faces is not None and not 1 <= len(faces) <= limits.max_faces:
            raise ServiceError(422, "invalid_parameter", f"face_images: give 1 to {limits.max_faces} images",
                               field="face_images")
        for i, data_ in enumerate(faces or []):
            check_image(data_, f"face_images[{i}]", limits.max_image_pixels)
        if pose is not None:
            check_image(pose, "pose_image", limits.max_image_pixels)
        return req, faces, pose, time.perf_counter() - started

    def decode_init_image(self, req, files: dict | None) -> bytes | None:
        """img2img's init image (base64 field or multipart file), header-checked as the photos are."""
        data = (decode_base64(req.init_image, "init_image") if req.init_image is not None
                else (files or {}).get("init_image"))
        if data is not None:
            check_image(data, "init_image", self.args.limits.max_image_pixels)
        return data

    def output_size(self, req, canvas, kps, bbox, init_image: bytes | None) -> tuple[int, int]:
        """The request's size, or the pose canvas's (the init image's after the demo's resize, for img2img);
        422 naming width/height when the face cannot fit that canvas."""
        from instantid.face import analysis_size
        from instantid.keypoints import fit_canvas
        from PIL import Image

        source = tuple(canvas)
        if init_image is not None:
            with Image.open(io.BytesIO(init_image)) as image:
                source = analysis_size(*image.size)
        default = default_size(source, self.args.limits)
        width, height = req.width or default[0], req.height or default[1]
        fit_canvas(tuple(canvas), (width, height), kps, bbox)  # raises InvalidParameterError (422) if no fit
        return width, height

    async def run_generate(self, ctx: Ctx, req, faces: list[bytes] | None, pose: bytes | None,
                           init_image: bytes | None = None) -> dict:
        prepared = await self.prepare_generation(ctx, req, faces, pose, init_image)
        job = prepared["job"]
        # the response is the raw RGB arrays: their size is known before the call
        result_bytes = req.num_images * job["width"] * job["height"] * 3  # the resolved size
        result = await self._call(ctx, self._generator_for(job["model"], result_bytes).generate.remote(job))
        return await self.complete_generation(ctx, req, prepared, result)

    async def prepare_generation(self, ctx: Ctx, req, faces: list[bytes] | None, pose: bytes | None,
                                 init_image: bytes | None = None) -> dict:
        """Everything before the Generator: checks, the identity or face analysis, the output size. Returns
        the Generator's job and what ``complete_generation`` needs (plain data: a job keeps it in its record)."""
        from instantid.styles import apply_style

        args = self.args
        spec = args.model(req.base_model)
        unknown = sorted(set(req.loras) - set(spec.loras))
        if unknown:
            raise ServiceError(422, "invalid_parameter",
                               f"loras: unknown LoRA {unknown} for model {spec.name!r}; "
                               f"available: {sorted(spec.loras)}",
                               field="loras")
        if req.delivery == "s3" and not args.output_bucket:
            raise ServiceError(422, "invalid_parameter", "delivery: S3 delivery is not configured on this service",
                               field="delivery")
        check_cost(spec, req, ctx.deadline)
        await self._backend_down(BACKENDS if req.identity_id is None or pose is not None else ("Generator",))
        prompt, negative = apply_style(req.style, req.prompt, req.negative_prompt)
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)

        if req.identity_id is not None:
            t0 = time.perf_counter()
            record = await self._store("get", req.identity_id)
            ctx.timings["identity_load_s"] = time.perf_counter() - t0
            metrics.stage("identity_load", ctx.timings["identity_load_s"])
            if record is None or not visible_to(record, ctx.scope):  # another key's: 404, as if absent
                raise ServiceError(404, "not_found", f"identity {req.identity_id} not found", field="identity_id")
            embedding = decode_embedding(record["embedding"])
            face = {**record["faces"][0], "source": f"identity:{req.identity_id}"}
            kps, canvas = record["pose"]["kps"], record["pose"]["canvas"]
            if pose is not None:
                analysis = await self._call(ctx, self._face_for(len(pose)).analyze.remote([], ("pose_image", pose)))
                self._face_timings(ctx, analysis)
                kps, canvas, face = analysis["pose"]["kps"], analysis["pose"]["canvas"], analysis["pose"]["face"]
        else:
            photos = [(f"face_images[{i}]", data) for i, data in enumerate(faces)]
            analysis = await self._call(ctx, self._face_for(sum(map(len, faces)) + len(pose or b"")).analyze.remote(
                photos, ("pose_image", pose) if pose is not None else None))
            self._face_timings(ctx, analysis)
            embedding = analysis["embedding"]
            kps, canvas, face = analysis["pose"]["kps"], analysis["pose"]["canvas"], analysis["pose"]["face"]

        bbox = _canvas_bbox(face, canvas)
        if req.enhance_face_region and bbox is None:
            raise ServiceError(422, "invalid_parameter", "enhance_face_region: no face box is known",
                               field="enhance_face_region")
        width, height = self.output_size(req, canvas, kps, bbox, init_image)
        check_cost(spec, req, ctx.deadline, (width, height))  # again at the photo's size when none was given
        job = {
            "model": spec.name, "embedding": embedding, "kps": kps, "canvas": canvas, "bbox": bbox,
            "enhance_face_region": req.enhance_face_region is not False and bbox is not None,
            "prompt_weighting": req.prompt_weighting, "init_image": init_image, "strength": req.strength,
            "return_pose_image": req.return_pose_image,
            "width": width, "height": height, "steps": req.steps, "scheduler": req.scheduler,
            "prompt": prompt, "negative_prompt": negative, "num_images": req.num_images, "seed": seed,
            "guidance_scale": req.guidance_scale, "ip_adapter_scale": req.ip_adapter_scale,
            "controlnet_conditioning_scale": req.controlnet_conditioning_scale, "loras": dict(req.loras),
            "deadline": ctx.deadline,
        }
        # per photo embeddings for the identity score: only photos sent with this request have them
        references = analysis.get("embeddings") if req.identity_id is None else None
        return {"job": job, "face": face, "embedding": embedding, "references": references}

    async def complete_generation(self, ctx: Ctx, req, prepared: dict, result: dict) -> dict:
        """Everything after the Generator: identity score, encoding, delivery; the /v1/generate response."""
        job, face = prepared["job"], prepared["face"]
        spec = self.args.model(job["model"])
        width, height, seed = job["width"], job["height"], job["seed"]
        ctx.timings.update(result["timings"])
        arrays, identity = result["images"], None
        if req.identity_score:
            arrays, identity = await score_outputs(self, ctx, req, spec, job, arrays, prepared["embedding"],
                                                   prepared["references"])

        t0 = time.perf_counter()
        pose_array = result.get("pose_image")
        encoded, pose_png = await asyncio.to_thread(lambda: (
            [encode_image(a, req.output_format) for a in arrays],
            encode_image(pose_array, "png") if pose_array is not None else None))
        ctx.timings["encode_s"] = time.perf_counter() - t0
        metrics.stage("encode", ctx.timings["encode_s"])
        images = urls = None
        if req.delivery == "s3":
            t0 = time.perf_counter()
            urls = await asyncio.to_thread(self._upload, encoded, req.output_format, ctx.request_id)
            ctx.timings["upload_s"] = time.perf_counter() - t0
            metrics.stage("upload", ctx.timings["upload_s"])
        else:
            images = [base64.b64encode(b).decode("ascii") for b in encoded]
        ctx.timings["total_s"] = time.perf_counter() - ctx.started
        response = {
            "request_id": ctx.request_id, "images": images, "urls": urls, "format": req.output_format,
            "width": width, "height": height, "seed": seed, "model": result["model"],
            "loras": dict(req.loras), "face": face,
            "pose_image": base64.b64encode(pose_png).decode("ascii") if pose_png is not None else None,
            "identity": identity,
            "timings": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in ctx.timings.items()},
        }
        return {k: v for k, v in response.items() if v is not None}

    @staticmethod
    def _face_timings(ctx: Ctx, analysis: dict) -> None:
        ctx.timings["image_decode_s"] = analysis["timings"]["decode_s"]
        ctx.timings["face_analysis_s"] = analysis["timings"]["face_analysis_s"]

    def _upload(self, encoded: list[bytes], fmt: str, request_id: str) -> list[str]:
        from instantid.weights import split_s3

        if self._s3 is None:
            import boto3

            self._s3 = boto3.client("s3")
        bucket, prefix = split_s3(self.args.output_bucket)
        day = time.strftime("%Y/%m/%d", time.gmtime())
        urls = []
        for i, data in enumerate(encoded):
            key = "/".join(p for p in (prefix, day, f"{request_id}-{i}.{fmt}") if p)
            self._s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType=CONTENT_TYPES[fmt])
            urls.append(self._s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                        ExpiresIn=self.args.presign_expiry_s))
        return urls

    async def serve_generate(self, ctx: Ctx, data: dict, files: dict | None = None) -> dict:
        """Decode, run under the deadline, map errors: the one path for HTTP (JSON, multipart) and handles."""
        try:
            # base64, validation and image header checks are CPU work on client bytes: off the event loop
            req, faces, pose, decode_s = await asyncio.to_thread(self.decode_generate, data, files)
            init_image = await asyncio.to_thread(self.decode_init_image, req, files)
            ctx.timings["decode_s"] = decode_s
            metrics.stage("decode", decode_s)
            return await self._deadline(ctx, self.run_generate(ctx, req, faces, pose, init_image), req.timeout_s)
        except Exception as exc:
            raise self._fail(ctx, exc) from None

    # -- identities --------------------------------------------------------------------------------------
    def decode_identity(self, data: dict, files: dict | None = None) -> list[bytes]:
        limits = self.args.limits
        if files and files.get("face_images"):
            if data:
                raise ServiceError(422, "invalid_parameter",
                                   f"unexpected fields {[k[:64] for k in sorted(data)[:8]]}")
            faces = list(files["face_images"])
            if not 1 <= len(faces) <= limits.max_faces:
                raise ServiceError(422, "invalid_parameter", f"face_images: give 1 to {limits.max_faces} images",
                                   field="face_images")
        else:
            req = _validate(self.models.IdentityCreateRequest, data, strict=files is None)
            faces = [decode_base64(s, f"face_images[{i}]") for i, s in enumerate(req.face_images)]
        for i, image in enumerate(faces):
            check_image(image, f"face_images[{i}]", limits.max_image_pixels)
        return faces

    async def run_create_identity(self, ctx: Ctx, faces: list[bytes]) -> dict:
        await self._backend_down(("FaceAnalyzer",))
        photos = [(f"face_images[{i}]", data) for i, data in enumerate(faces)]
        analysis = await self._call(ctx, self._face_for(sum(map(len, faces))).analyze.remote(photos, None, True))
        record = make_record(new_identity_id(), embedding=analysis["embedding"], pose_kps=analysis["pose"]["kps"],
                             pose_canvas=analysis["pose"]["canvas"], faces=analysis["faces"],
                             thumbnail=analysis.get("thumbnail"), owner=ctx.api_key)
        await self._store("put", record)
        return self.identity_view(record)

    async def serve_create_identity(self, ctx: Ctx, data: dict, files: dict | None = None) -> dict:
        try:
            faces = await asyncio.to_thread(self.decode_identity, data, files)
            return await self._deadline(ctx, self.run_create_identity(ctx, faces))
        except Exception as exc:
            raise self._fail(ctx, exc) from None

    @staticmethod
    def identity_view(record: dict) -> dict:
        return {
            "identity_id": record["identity_id"], "created_at": record["created_at"],
            "num_photos": record["num_photos"], "faces": record["faces"],
            "embedding_dim": record.get("embedding_dim", 512), "thumbnail": record.get("thumbnail"),
        }

    async def serve_get_identity(self, ctx: Ctx, identity_id: str) -> dict:
        try:
            record = await self._store("get", identity_id) if valid_identity_id(identity_id) else None
        except Exception as exc:
            raise self._fail(ctx, exc) from None
        if record is None or not visible_to(record, ctx.scope):  # another key's: 404, as if absent
            raise ServiceError(404, "not_found", "identity not found")  # never echo the input
        return self.identity_view(record)

    async def serve_delete_identity(self, ctx: Ctx, identity_id: str) -> None:
        try:
            deleted = valid_identity_id(identity_id)
            if deleted and ctx.scope is not None:  # another key's identity is left alone and reported absent
                record = await self._store("get", identity_id)
                deleted = record is not None and visible_to(record, ctx.scope)
            deleted = deleted and await self._store("delete", identity_id)
        except Exception as exc:
            raise self._fail(ctx, exc) from None
        if not deleted:
            raise ServiceError(404, "not_found", "identity not found")  # never echo the input

    async def serve_list_identities(self, ctx: Ctx, limit: int) -> dict:
        try:
            return {"identities": await self._store("list", limit, ctx.scope)}
        except Exception as exc:
            raise self._fail(ctx, exc) from None

    # -- info and readiness ------------------------------------------------------------------------------
    def model_list(self) -> dict:
        from instantid.styles import presets

        return {
            "models": [{"name": m.name, "loras": sorted(m.loras), "default": m.name == self.args.default_model}
                       for m in self.args.models],
            "schedulers": list(SCHEDULERS), "styles": sorted(presets()),
            "output_formats": list(OUTPUT_FORMATS),
            "delivery": [d for d in DELIVERIES if d != "s3" or self.args.output_bucket],
            "profile": self.args.profile,
        }

    async def readiness(self, fresh: bool = False) -> dict:
        """Serve's view of the backends, read at most once a second (four times when ``fresh``: a backend that
        looks down is looked at again, but a flood of refused requests never floods the controller)."""
        now = time.monotonic()
        if self._ready_cache and now - self._ready_cache[0] < (0.25 if fresh else 1.0):
            return self._ready_cache[1]
        try:
            statuses = await asyncio.to_thread(self._status_fn or self._serve_status)
            ready = all(statuses.get(name) in READY_STATES for name in BACKENDS)
            result = {"ready": ready, "deployments": statuses}
            if not ready:
                waiting = [n for n in BACKENDS if statuses.get(n) not in READY_STATES]
                reasons = [f"{n}: {_reason(self._status_messages.get(n, ''))}" for n in waiting
                           if _reason(self._status_messages.get(n, ""))]
                result["message"] = (f"not ready: {', '.join(waiting)} (model not loaded or replicas starting)"
                                     + (f"; {'; '.join(reasons)}" if reasons else ""))
        except Exception as exc:
            result = {"ready": False, "deployments": {}, "message": f"cannot read Serve status: {type(exc).__name__}"}
        self._ready_cache = (now, result)
        return result

    async def live_readiness(self, timeout_s: float = 2.0) -> dict:
        """/readyz: Serve's view (``readiness``) and, when that says ready, each backend asked directly: a backend
        whose queue is full, that does not answer within ``timeout_s``, or whose replica says it is not ready
        (a Generator stuck on abandoned work) makes the service not ready. At most one probe a second."""
        state = await self.readiness()
        if not state["ready"]:
            return state
        now = time.monotonic()
        if self._probe_cache and now - self._probe_cache[0] < 1.0:
            return self._probe_cache[1]

        async def ask(name: str, handle) -> str | None:
            if name == "Generator" and self._running.get(name) == 0:
                return None  # scaled to zero: asking would start a replica; Serve's view suffices
            response = handle.ready.remote()
            try:
                answer = await asyncio.wait_for(asyncio.ensure_future(response), timeout_s)
            except asyncio.TimeoutError:
                with contextlib.suppress(Exception):
                    response.cancel()
                return f"{name}: no answer within {timeout_s:g}s (busy or queue full)"
            except Exception as exc:
                return f"{name}: {from_exception(exc).message}"
            return None if answer.get("ready") else f"{name}: {answer.get('error') or 'not ready'}"

        problems = [p for p in await asyncio.gather(ask("FaceAnalyzer", self.face), ask("Generator", self.generator))
                    if p]
        result = state if not problems else {**state, "ready": False, "message": "not ready: " + "; ".join(problems)}
        self._probe_cache = (now, result)
        return result

    def _serve_status(self) -> dict[str, str]:
        from ray import serve

        app_name = self._app_name or serve.get_replica_context().app_name
        app = serve.status().applications[app_name]
        self._status_messages = {name: str(d.message or "") for name, d in app.deployments.items()}
        self._running = {name: sum(n for state, n in d.replica_states.items()
                                   if str(getattr(state, "value", state)) == "RUNNING")
                         for name, d in app.deployments.items()}
        return {name: str(getattr(d.status, "value", d.status)) for name, d in app.deployments.items()}

    # -- handle API (trusted, in-cluster callers; see deployments/client.py) -----------------------------
    async def _handle(self, route: str, fn, *a):
        ctx = Ctx(route=f"handle.{route}")
        status = 200
        try:
            return await fn(ctx, *a)
        except ServiceError as err:
            status = err.status
            raise
        except Exception as exc:
            err = self._fail(ctx, exc)
            status = err.status
            raise err from None
        finally:
            metrics.request_done(ctx.route, "HANDLE", status, time.perf_counter() - ctx.started)

    async def generate(self, request: dict) -> dict:
        """Handle API: the /v1/generate JSON body as a dict -> the response dict."""
        return await self._handle("generate", self.serve_generate, dict(request))

    async def create_identity(self, request: dict) -> dict:
        return await self._handle("create_identity", self.serve_create_identity, dict(request))

    async def get_identity(self, identity_id: str) -> dict:
        return await self._handle("get_identity", self.serve_get_identity, identity_id)

    async def delete_identity(self, identity_id: str) -> None:
        return await self._handle("delete_identity", self.serve_delete_identity, identity_id)

    async def list_identities(self, limit: int = 100) -> dict:
        return await self._handle("list_identities", self.serve_list_identities, int(limit))

    async def list_models(self) -> dict:
        return self.model_list()

    async def submit_job(self, request: dict) -> dict:
        """Handle API: the POST /v1/jobs JSON body -> the job (deployments/http/surfaces/jobs.py's view)."""
        from .http.surfaces.jobs import SURFACE, job_view

        async def submit(ctx, data):
            webhook = data.pop("webhook", None)
            return job_view(*await self.jobs.submit(ctx, data, webhook=webhook, meta={"surface": SURFACE}))

        return await self._handle("submit_job", submit, dict(request))

    async def job(self, job_id: str, wait_s: float = 0.0) -> dict:
        """Handle API: the job, once it ends or after ``wait_s`` seconds."""
        from .http.surfaces.jobs import job_view

        async def get(ctx, job_id):
            return job_view(job_id, await self.jobs.wait(ctx, job_id, min(float(wait_s), 60.0)))

        return await self._handle("job", get, job_id)

    async def cancel_job(self, job_id: str) -> dict:
        from .http.surfaces.jobs import job_view

        async def cancel(ctx, job_id):
            return job_view(job_id, await self.jobs.cancel(ctx, job_id))

        return await self._handle("cancel_job", cancel, job_id)

    async def check_health(self) -> None:
        self.jobs.start()  # a replica runs queued jobs even before its first request


# -- HTTP --------------------------------------------------------------------------------------------------
class Observe:
    """ASGI middleware: per-route request metrics, and a JSON 500 (never a traceback) for anything unhandled."""

    def __init__(self, app, router=None):
        self.app = app
        self.router = router

    def _route(self, scope) -> str:
        """The matched route's template (/v1/identities/{identity_id}); 'other' for unmatched paths."""
        route = scope.get("route")  # set by the router on the (shared) scope once a route matched
        if route is not None and isinstance(getattr(route, "path", None), str):
            return route.path
        from starlette.routing import Match

        for candidate in getattr(self.router, "routes", []):
            path = getattr(candidate, "path", None)
            if not isinstance(path, str):
                continue
            try:
                if candidate.matches(scope)[0] == Match.FULL:
                    return path
            except Exception:
                continue
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        state = {"status": 500, "sent": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                state["status"], state["sent"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if state["sent"]:
                log.error("error after the response started: %s", exc)
            else:
                await json_response(from_exception(exc, request_id=uuid.uuid4().hex))(scope, receive, send_wrapper)
        finally:
            metrics.request_done(self._route(scope), scope.get("method", ""), state["status"],
                                 time.perf_counter() - started)


def _canvas_bbox(face: dict, canvas) -> list[float] | None:
    """The face box on the analysed canvas (FaceInfo reports it on the photo as uploaded)."""
    if not face.get("bbox") or not face.get("image_size"):
        return None
    sx, sy = canvas[0] / face["image_size"][0], canvas[1] / face["image_size"][1]
    x1, y1, x2, y2 = face["bbox"]
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


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
            raise ServiceError(429, "rate_limited", f"more than {self.per_client} uploads in progress from this "
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
        raise ServiceError(408, "timeout", "the request body was not received in time") from None


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ServiceError(413, "body_too_large", f"the body is larger than {limit} bytes")
        except ValueError:
            raise ServiceError(400, "bad_request", "malformed Content-Length") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, "body_too_large", f"the body is larger than {limit} bytes")
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
        raise ServiceError(400, "bad_request", f"malformed multipart body: {detail}".splitlines()[0]) from None
    files: dict[str, list[bytes] | bytes] = {}
    data: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in file_fields:
                raise ServiceError(422, "invalid_parameter", f"{key[:64]}: unexpected file field", field=key[:64])
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
                raise ServiceError(422, "invalid_parameter", "loras: must be a JSON object", field="loras") from None
        elif value == "" and key not in ("prompt", "negative_prompt"):
            continue  # an empty form field means "not given"
        else:
            data[key] = value
    await form.close()
    return data, files


def _body_doc(name: str, multipart: dict) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}},
        "multipart/form-data": {"schema": multipart},
    }}}


def _multipart_schema(model: type[BaseModel], max_faces: int) -> dict:
    props = {k: v for k, v in model.model_json_schema()["properties"].items()}
    props["face_images"] = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                            "maxItems": max_faces, "description": "Photo files (repeat the field)."}
    if "pose_image" in props:
        props["pose_image"] = {"type": "string", "format": "binary", "description": "Pose photo file."}
    if "init_image" in props:
        props["init_image"] = {"type": "string", "format": "binary", "description": "img2img init image file."}
    if "loras" in props:
        props["loras"] = {"type": "string", "description": 'JSON object, e.g. {"name": 0.8}.'}
    return {"type": "object", "properties": props}


def build_http_app(core: IngressCore):
    """The FastAPI app of one Ingress replica (bounds in its OpenAPI schema come from ``core.args``)."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    args = core.args
    limits = args.limits
    app = FastAPI(
        title="InstantID Serve",
        version="0.1.0",
        description="Identity-preserving image generation (InstantID on SDXL). Errors are "
                    '`{"error": {"code", "message", "field"?}}`. Limits of this deployment are in the schemas.',
    )
    install_handlers(app)
    app.add_middleware(Observe, router=app.router)
    errors = {s: {"model": ErrorBody} for s in (400, 401, 404, 413, 422, 429, 500, 503, 504)}

    if args.auth.enabled:
        bearer = HTTPBearer(auto_error=False, description="API key")

        async def auth(request: Request, _creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
            request.state.api_key = core.authenticate(request.headers.get("authorization"), client_address(request))
    else:
        async def auth(request: Request):
            request.state.api_key = None

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    def caller(route: str, request: Request) -> Ctx:
        """A request's context with the caller's key name and identity scope (set by ``auth``)."""
        api_key = getattr(request.state, "api_key", None)
        return Ctx(route=route, api_key=api_key, scope=core.scope_of(api_key))

    async def parse(request: Request, ctx: Ctx, max_files: int,
                    file_fields: tuple[str, ...] = ("face_images", "pose_image")) -> tuple[dict, dict | None]:
        with core.uploads.hold(getattr(request.state, "api_key", None) or client_address(request)):
            body = await read_body(request, limits.max_body_bytes, ctx.started + args.request_timeout_s)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            return await read_form(request, body, max_files, limits.max_body_bytes, file_fields)
        if ctype not in ("", "application/json") and not ctype.endswith("+json"):
            raise ServiceError(415, "unsupported_media_type", "send application/json or multipart/form-data")
        return _parse_json(body), None

    @v1.post("/generate", response_model=GenerateResponse, responses=errors, summary="Generate images",
             openapi_extra=_body_doc("GenerateRequest",
                                     _multipart_schema(core.models.GenerateRequest, limits.max_faces)))
    async def generate(request: Request):
        ctx = caller("/v1/generate", request)
        try:
            data, files = await parse(request, ctx, limits.max_faces + 2,
                                      ("face_images", "pose_image", "init_image"))
        except Exception as exc:
            raise core._fail(ctx, exc) from None
        return JSONResponse(await core.serve_generate(ctx, data, files))

    @v1.post("/identities", response_model=IdentityResponse, status_code=201, responses=errors,
             summary="Store an identity",
             openapi_extra=_body_doc("IdentityCreateRequest",
                                     _multipart_schema(core.models.IdentityCreateRequest, limits.max_faces)))
    async def create_identity(request: Request):
        ctx = caller("/v1/identities", request)
        try:
            data, files = await parse(request, ctx, limits.max_faces, ("face_images",))
        except Exception as exc:
            raise core._fail(ctx, exc) from None
        return JSONResponse(await core.serve_create_identity(ctx, data, files), status_code=201)

    @v1.get("/identities", response_model=IdentityList, responses=errors, summary="List identities")
    async def list_identities(request: Request, limit: int = Query(100, ge=1, le=1000)):
        return await core.serve_list_identities(caller("/v1/identities", request), limit)

    @v1.get("/identities/{identity_id}", response_model=IdentityResponse, responses=errors,
            summary="Get an identity")
    async def get_identity(request: Request, identity_id: str):
        return JSONResponse(await core.serve_get_identity(caller("/v1/identities/{identity_id}", request),
                                                          identity_id))

    @v1.delete("/identities/{identity_id}", status_code=204, responses=errors, summary="Delete an identity")
    async def delete_identity(request: Request, identity_id: str):
        await core.serve_delete_identity(caller("/v1/identities/{identity_id}", request), identity_id)
        return Response(status_code=204)

    @v1.get("/models", response_model=ModelList, responses=errors, summary="Models, LoRAs, styles, schedulers")
    async def models():
        return core.model_list()

    from .playground import add_routes as add_playground  # POST /v1/faces:analyze, and the page at /

    add_playground(app, v1, core, parse)  # before the catch-all below: routes match in order
    from .http.surfaces import jobs as jobs_surface

    jobs_surface.add_routes(v1, core, caller, parse)

    @v1.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                  include_in_schema=False)
    async def unknown(request: Request, path: str):
        """Any other /v1 path: after auth (no route discovery without a key); 405 where the path exists."""
        from starlette.routing import Match

        allowed = sorted({m for r in v1.routes if r.endpoint is not unknown and getattr(r, "methods", None)
                          and r.matches({**request.scope, "method": "__none__"})[0] == Match.PARTIAL
                          for m in r.methods})
        if allowed:
            raise ServiceError(405, "method_not_allowed", "method not allowed", headers={"Allow": ", ".join(allowed)})
        raise ServiceError(404, "not_found", "no such route")

    app.include_router(v1)
    from .http.surfaces import openai_images, replicate  # each only translates shapes to and from the core

    openai_images.add_routes(app, core, parse, client_address)
    replicate.add_routes(app, core, client_address)

    @app.get("/healthz", response_model=Health, summary="Liveness: the Ingress answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}},
             summary="Readiness: FaceAnalyzer and Generator have replicas with their models loaded")
    async def readyz():
        state = await core.live_readiness()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema(
            [(core.models.GenerateRequest, "validation"), (core.models.IdentityCreateRequest, "validation")],
            ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    return app


def _fast_handle(handle):
    """A handle for calls from this replica's event loop, the cheapest way Serve offers (docs/benchmarks.md):
    its router runs on the calling loop, not on a thread of its own (two thread hand-offs less per call, ~0.45 ms
    measured), and arguments go by value over Serve's gRPC data plane straight to the chosen replica instead of
    as a Ray actor call and, above 100 KiB, through the object store (3.8 -> 2.3 ms per call; 5.0 -> 2.6 ms with
    a 128 KB photo). Calls with messages over BY_VALUE_MAX_BYTES switch back to by reference (``_face_for``,
    ``_generator_for``)."""
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=False)
    return handle.options(_by_reference=False)


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=64,
    max_queued_requests=256,
    # Beyond its own queue Serve answers before any app code runs (503, a plain-text body); at least the
    # client is told when to come back, as with every other 503 of this API.
    backpressure_config=BackpressureConfig(retry_after_s=1),
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=10,
    health_check_timeout_s=30,
)
@serve.ingress()
class Ingress(IngressCore):
    """HTTP via the FastAPI app built per replica (its schema carries this deployment's limits), and the
    handle API (generate, create_identity, get_identity, delete_identity, list_identities, list_models)."""

    def __init__(self, args: dict, face_analyzer, generator):
        IngressCore.__init__(self, args, _fast_handle(face_analyzer), _fast_handle(generator))

    def __serve_build_asgi_app__(self):
        return build_http_app(self)

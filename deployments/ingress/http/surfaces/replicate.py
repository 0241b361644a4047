"""Replicate-compatible predictions under /replicate/v1, for the ``replicate`` client, over the job core.

POST /replicate/v1/models/{owner}/{name}/predictions   ``{input, webhook?, webhook_events_filter?}``; the model
                                                       reference is ``instantid/<configured model name>``
POST /replicate/v1/predictions                         the same with ``version`` = a model reference or name
GET  /replicate/v1/predictions                         the caller's predictions, newest first, Replicate's page
                                                       shape ``{previous, next, results}`` (no ``output``: GET
                                                       one for it)
GET  /replicate/v1/predictions/{id}                    the prediction
POST /replicate/v1/predictions/{id}/cancel             cancel it

``Prefer: wait`` (or ``wait=N`` seconds, at most 60) holds the create call until the prediction ends; past it
the prediction comes back ``starting``, as Replicate's does, so the client goes on polling. ``input`` takes our
field names (``face_images`` as data URLs, or ``image`` for one photo). Status: queued -> starting,
running -> processing. ``output`` is the images as data URLs (S3 URLs with ``delivery: s3``); ``logs`` has a
tqdm-style line of the denoising progress, which the client parses into ``prediction.progress``. Errors are
problem details (``{title, detail, status}``), which the client raises as ``ReplicateError``.
"""

from __future__ import annotations

import asyncio
import json
import re

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from deployments.errors import INVALID_PARAMETER, NOT_FOUND, ServiceError
from deployments.ingress.http.readers import loads_json, read_body
from deployments.ingress.http.surfaces.common import authenticate
from deployments.ingress.jobs.service import iso

PREFIX = "/replicate/v1"
OWNER = "instantid"
SURFACE = "replicate"
STATUSES = {"queued": "starting", "running": "processing"}
MAX_WAIT_S = 60.0
WAIT = re.compile(r"(?:^|[,;\s])wait(?:=(\d+))?(?:$|[,;\s])")
IMAGE_FIELDS = ("face_images", "pose_image", "init_image", "image")
NESTED_IMAGE_FIELDS = (*IMAGE_FIELDS, "map")  # in people[i], controls[i]: a ready control map is an image too


class ReplicateProblem(ServiceError):
    """A ServiceError as problem details (RFC 7807), the shape Replicate answers errors in."""

    @classmethod
    def of(cls, err: ServiceError) -> "ReplicateProblem":
        return cls(err.status, err.code, err.message, err.field, err.headers, err.details)

    def body(self) -> dict:
        out = {"type": self.code, "title": self.code.replace("_", " "), "status": self.status, "detail": self.message}
        if self.field:
            out["field"] = self.field
        return out


def progress_line(progress: dict | None) -> str:
    """A tqdm-style line (``' 40%|████      | 12/30'``) the replicate client parses into ``Progress``."""
    if not progress or not progress.get("total"):
        return ""
    step, total = int(progress["step"]), int(progress["total"])
    done = step * 10 // total
    return f"{step * 100 // total:3d}%|{'█' * done}{' ' * (10 - done)}| {step}/{total}\n"


def summarize_input(data: dict, fields: tuple[str, ...] = IMAGE_FIELDS) -> dict:
    """The input as echoed back: photos replaced by their count (never kilobytes of base64 in every poll), those of
    nested objects too (``people[i].face_images``, ``controls[i].image`` / ``map``...)."""
    out = {}
    for key, value in data.items():
        if key in fields and value is not None:
            count = len(value) if isinstance(value, list) else 1
            out[key] = f"<{count} image{'s' if count != 1 else ''}>"
        elif isinstance(value, dict):
            out[key] = summarize_input(value, NESTED_IMAGE_FIELDS)
        elif isinstance(value, list):
            out[key] = [summarize_input(item, NESTED_IMAGE_FIELDS) if isinstance(item, dict) else item
                        for item in value]
        else:
            out[key] = value
    return out


def prediction_view(job_id: str, record: dict, base: str = "") -> dict:
    """A job as a Replicate prediction. A stored result is parsed here (its images become data URLs): call it
    in a thread when the record has one (``view_off_loop``)."""
    meta = record.get("meta") or {}
    url = f"{base.rstrip('/')}{PREFIX}/predictions/{job_id}"
    result, error = record.get("result"), record.get("error")
    if isinstance(result, str):
        result = json.loads(result)
    output = None
    if result is not None:
        fmt = result.get("format", "png")
        output = ([f"data:image/{fmt};base64,{image}" for image in result["images"]] if result.get("images")
                  is not None else list(result.get("urls", [])))
    started, completed = record.get("started_at"), record.get("completed_at")
    logs = progress_line(record.get("progress"))
    if result is not None:
        logs = f"Using seed: {result.get('seed')}\n" + (logs or progress_line({"step": 1, "total": 1}))
    metrics = {}
    if started is not None and completed is not None:
        metrics["predict_time"] = round(completed - started, 3)
    if completed is not None:
        metrics["total_time"] = round(completed - record["created_at"], 3)
    return {
        "id": job_id, "model": f"{OWNER}/{meta.get('model')}", "version": meta.get("model"),
        "status": STATUSES.get(record["status"], record["status"]), "input": meta.get("input", {}),
        "output": output, "logs": logs, "error": error.get("message") if error else None,
        "metrics": metrics, "created_at": iso(record.get("created_at")), "started_at": iso(started),
        "completed_at": iso(completed), "data_removed": False,
        "urls": {"get": url, "cancel": f"{url}/cancel"},
    }


async def view_off_loop(job_id: str, record: dict, base: str) -> JSONResponse:
    """The prediction's response; with a result, built and serialised in a thread (it can be megabytes)."""
    if record.get("result") is None:
        return JSONResponse(prediction_view(job_id, record, base))
    body = await asyncio.to_thread(lambda: json.dumps(prediction_view(job_id, record, base), separators=(",", ":")))
    return Response(body, media_type="application/json")


def wait_seconds(prefer: str | None) -> float | None:
    """``Prefer: wait`` -> the most seconds to hold the request (None: answer at once)."""
    match = WAIT.search(prefer or "")
    if match is None:
        return None
    return min(float(match.group(1)), MAX_WAIT_S) if match.group(1) else MAX_WAIT_S - 5  # the client reads 60 s


def add_routes(app, edge) -> None:
    """Add /replicate/v1 to ``app`` (``edge``: deployments.ingress.http.app.Edge)."""
    core = edge.service
    jobs = core.jobs
    jobs.views[SURFACE] = prediction_view

    async def auth(request: Request):
        try:
            authenticate(edge, request)
        except ServiceError as err:
            raise ReplicateProblem.of(err) from None

    router = APIRouter(prefix=PREFIX, dependencies=[Depends(auth)], tags=["Replicate"],
                       include_in_schema=False)  # their schema is Replicate's own: docs/api.md

    def caller(route: str, request: Request):
        return edge.caller(PREFIX + route, request)

    def model_name(reference) -> str:
        """'instantid/sdxl', 'sdxl' or None -> a configured model name; 404 for any other."""
        if reference is None:
            return core.args.default_model
        owner, _, name = str(reference).rpartition("/")
        name = name.split(":")[0]
        if owner not in ("", OWNER) or name not in {m.name for m in core.args.models}:
            raise NOT_FOUND(f"model {str(reference)[:100]!r} not found; models here are "
                               f"{[f'{OWNER}/{m.name}' for m in core.args.models]}")
        return name

    async def create(request: Request, ctx, reference) -> JSONResponse:
        try:
            with edge.uploads.hold(ctx.api_key or edge.access.client(request)) as upload:
                body = await read_body(request, core.args.limits.max_body_bytes,
                                       ctx.started + core.args.request_timeout_s, upload)
            payload = await asyncio.to_thread(loads_json, body)  # off the event loop, as read_request does
            if not isinstance(payload, dict) or not isinstance(payload.get("input", {}), dict):
                raise INVALID_PARAMETER("the body must be {\"input\": {...}}", field="input")
            name = model_name(reference if reference is not None else payload.get("version"))
            data = dict(payload.get("input") or {})
            if "image" in data:
                data.setdefault("face_images", [data.pop("image")])
            data.setdefault("base_model", name)
            if data["base_model"] != name:
                raise INVALID_PARAMETER("input.base_model: differs from the model called",
                                   field="base_model")
            meta = {"surface": SURFACE, "input": summarize_input(payload.get("input") or {}),
                    "base_url": str(request.base_url)}
        except Exception as exc:
            raise ReplicateProblem.of(core.fail(ctx, exc)) from None
        try:
            job_id, record = await jobs.submit(ctx, data, None, webhook=payload.get("webhook"), meta=meta)
            wait = wait_seconds(request.headers.get("prefer"))
            if wait:
                record = await jobs.wait(ctx, job_id, wait)
        except ServiceError as err:
            raise ReplicateProblem.of(err) from None
        view = await asyncio.to_thread(prediction_view, job_id, record, str(request.base_url))
        if wait and view["status"] == "processing":
            view["status"] = "starting"  # Replicate's blocking API: not ended in time -> keep polling
        return JSONResponse(view, status_code=201, headers={"Location": view["urls"]["get"]})

    @router.post("/models/{owner}/{name}/predictions", status_code=201, summary="Create a prediction of a model")
    async def create_for_model(request: Request, owner: str, name: str):
        return await create(request, caller("/models/{owner}/{name}/predictions", request), f"{owner}/{name}")

    @router.post("/predictions", status_code=201, summary="Create a prediction (version = a model reference)")
    async def create_prediction(request: Request):
        return await create(request, caller("/predictions", request), None)

    async def existing(request: Request, route: str, action, prediction_id: str) -> JSONResponse:
        """A prediction looked up (``jobs.get``) or cancelled (``jobs.cancel``), in Replicate's shape."""
        try:
            record = await action(caller(route, request), prediction_id)
        except ServiceError as err:
            raise ReplicateProblem.of(err) from None
        return await view_off_loop(prediction_id, record, str(request.base_url))

    @router.get("/predictions", summary="List predictions (newest first)")
    async def list_predictions(request: Request, cursor: str | None = Query(None, max_length=200)):
        try:
            records, next_cursor = await jobs.list(caller("/predictions", request), 20, cursor)
        except ServiceError as err:
            raise ReplicateProblem.of(err) from None
        base = str(request.base_url)
        # Replicate's page: ``next`` is the URL of the next page (the client requests it as is)
        return JSONResponse({"previous": None,
                             "next": f"{base.rstrip('/')}{PREFIX}/predictions?cursor={next_cursor}" if next_cursor
                             else None,
                             "results": [prediction_view(r["id"], r, base) for r in records]})

    @router.get("/predictions/{prediction_id}", summary="Get a prediction")
    async def get_prediction(request: Request, prediction_id: str):
        return await existing(request, "/predictions/{prediction_id}", jobs.get, prediction_id)

    @router.post("/predictions/{prediction_id}/cancel", summary="Cancel a prediction")
    async def cancel_prediction(request: Request, prediction_id: str):
        return await existing(request, "/predictions/{prediction_id}/cancel", jobs.cancel, prediction_id)

    app.include_router(router)

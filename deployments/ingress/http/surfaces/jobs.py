"""/v1/jobs: the native job API over the job core (deployments/ingress/jobs/service.py).

POST /v1/jobs                 the /v1/generate body (JSON or multipart) plus optional ``webhook`` -> 202 job
GET  /v1/jobs                 the caller's own jobs, newest first, without results: ``?limit=&cursor=``
GET  /v1/jobs/{id}            the job: status, progress {step, total}, timestamps, result | error
POST /v1/jobs/{id}/cancel     cancel; the job as it ends
GET  /v1/jobs/{id}/events     Server-Sent Events: ``progress`` while it runs, then ``done`` with the final job

A stored result is embedded in responses as the JSON text it was stored as (``dumps_with_raw``): a GET or the
``done`` event never parses or re-serialises it on the event loop.
"""

from __future__ import annotations

from fastapi import Query, Request
from fastapi.responses import Response, StreamingResponse

from deployments.errors import ServiceError
from deployments.ingress.jobs.fair_use import dumps_with_raw
from deployments.ingress.jobs.service import iso
from deployments.ingress.http.openapi import body_doc, multipart_schema

SURFACE = "jobs"


def job_view(job_id: str, record: dict, base: str = "") -> dict:
    """A job as /v1/jobs shows it (and its webhooks send it)."""
    url = f"{base.rstrip('/')}/v1/jobs/{job_id}"
    out = {
        "id": job_id, "status": record["status"], "model": (record.get("meta") or {}).get("model"),
        "created_at": iso(record.get("created_at")), "started_at": iso(record.get("started_at")),
        "completed_at": iso(record.get("completed_at")),
        "progress": record.get("progress") or ({"step": 0, "total": None} if record["status"] != "succeeded" else None),
        "urls": {"get": url, "cancel": f"{url}/cancel", "events": f"{url}/events"},
    }
    for key in ("result", "error"):
        if record.get(key) is not None:
            out[key] = record[key]
    return {k: v for k, v in out.items() if v is not None}


def json_response(view: dict, status_code: int = 200, headers: dict | None = None) -> Response:
    """A view with a stored result in it, the result copied in as stored."""
    return Response(dumps_with_raw(view), status_code=status_code, headers=headers, media_type="application/json")


def add_routes(v1, edge) -> None:
    """Add the job routes to ``v1`` (``edge``: deployments.ingress.http.app.Edge). The body of POST /v1/jobs is
    documented as GenerateRequest's; ``webhook`` comes on top of it (docs/api.md)."""
    service = edge.service
    jobs = service.jobs
    jobs.views[SURFACE] = job_view
    caller = edge.caller

    @v1.post("/jobs", status_code=202, responses=edge.errors, summary="Submit a generation job",
             openapi_extra=body_doc("GenerateRequest",
                                    multipart_schema(service.schemas.GenerateRequest, service.args.limits.max_faces)),
             description="The body of POST /v1/generate (JSON or multipart) plus an optional `webhook` URL. "
                         "Answers once the photos are checked and analysed.")
    async def submit_job(request: Request):
        ctx = caller("/v1/jobs", request)
        data, files = await edge.read(request, ctx, service.args.limits.max_faces + 2,
                                      ("face_images", "pose_image", "init_image"))
        webhook = data.pop("webhook", None)
        job_id, record = await jobs.submit(ctx, data, files, webhook=webhook,
                                           meta={"surface": SURFACE, "base_url": str(request.base_url)})
        view = job_view(job_id, record, str(request.base_url))
        return json_response(view, status_code=202, headers={"Location": view["urls"]["get"]})

    @v1.get("/jobs", responses=edge.errors, summary="The caller's jobs, newest first (without results)",
            description="Pages of `limit` jobs; `next_cursor` (absent on the last page) gives the next one. A job "
                        "is listed until it expires (`jobs.result_ttl_s` after it ended); GET it for its result.")
    async def list_jobs(request: Request, limit: int = Query(20, ge=1, le=100),
                        cursor: str | None = Query(None, max_length=200)):
        records, next_cursor = await jobs.list(caller("/v1/jobs", request), limit, cursor)
        base = str(request.base_url)
        out = {"jobs": [job_view(r["id"], r, base) for r in records]}
        if next_cursor:
            out["next_cursor"] = next_cursor
        return json_response(out)

    @v1.get("/jobs/{job_id}", responses=edge.errors, summary="A job: status, progress, result or error")
    async def get_job(request: Request, job_id: str):
        record = await jobs.get(caller("/v1/jobs/{job_id}", request), job_id)
        return json_response(job_view(job_id, record, str(request.base_url)))

    @v1.post("/jobs/{job_id}/cancel", responses=edge.errors, summary="Cancel a job")
    async def cancel_job(request: Request, job_id: str):
        record = await jobs.cancel(caller("/v1/jobs/{job_id}/cancel", request), job_id)
        return json_response(job_view(job_id, record, str(request.base_url)))

    @v1.get("/jobs/{job_id}/events", summary="Server-Sent Events of a job's progress and its end",
            response_class=StreamingResponse,
            responses={**edge.errors, 200: {"content": {"text/event-stream": {}},
                                            "description": "`progress` events, then `done` with the final job"}})
    async def job_events(request: Request, job_id: str):
        ctx = caller("/v1/jobs/{job_id}/events", request)
        await jobs.get(ctx, job_id, result=False)  # 404 before the stream starts
        base = str(request.base_url)

        async def stream():
            try:
                async for record in jobs.events(ctx, job_id):
                    view = job_view(job_id, record, base)
                    event = "done" if "completed_at" in view else "progress"
                    yield f"event: {event}\ndata: {dumps_with_raw(view)}\n\n"
            except ServiceError as err:  # expired or gone meanwhile
                yield f"event: error\ndata: {dumps_with_raw(err.body())}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

"""The web playground at ``/`` and the face-analysis route it draws boxes and keypoints from.

``add_routes(app, v1, edge)`` is called by ``deployments.ingress.http.app.build_http_app``:

- ``POST /v1/faces:analyze`` (on the ``/v1`` router, so behind the same API keys, rate limit and body limits):
  1 to ``max_faces`` photos in -> the face each one would contribute (the largest: box, score, five keypoints
  in the photo's own pixels), nothing stored and no embedding served. The playground calls it as a photo is
  picked, so a photo without a face is flagged at once, beside that photo.
- ``GET /`` and ``GET /playground/{file}``: the page, its stylesheet and script, shipped as package data
  (``static/``; no CDN, no build step), open like ``/docs``: the page holds no data, every call it makes
  carries the user's key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from deployments.errors import NOT_FOUND
from deployments.ingress.context import RequestContext
from deployments.ingress.http.openapi import body_doc, multipart_schema
from deployments.ingress.schemas import FaceInfo

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# The page runs only its own script and style, and talks only to this origin: an injected script could not
# load, and the key a user types cannot be sent elsewhere. Images are data:/blob: URLs, or S3 presigned URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data: blob: https: http:; form-action 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class FaceAnalysisTimings(BaseModel):
    decode_s: float = Field(description="Base64 decoding and image header checks (Ingress).")
    image_decode_s: float = Field(description="Full decoding of the photos (FaceAnalyzer).")
    face_analysis_s: float = Field(description="Face detection + embedding (FaceAnalyzer).")
    total_s: float


class FaceAnalysis(BaseModel):
    """The face each photo contributes, as /v1/generate and /v1/identities would use it."""

    faces: list[FaceInfo] = Field(description="One per photo, in order: its largest face.")
    timings: FaceAnalysisTimings


def add_routes(app: FastAPI, v1: APIRouter, edge) -> None:
    """Add the analysis route to ``v1`` (before it is included in ``app``) and the page to ``app``."""
    service = edge.service

    @v1.post("/faces:analyze", response_model=FaceAnalysis, responses=edge.errors, summary="Find the face in photos",
             description="Each photo's largest face (box, score, five keypoints, in the photo's pixels): what "
                         "generate and identities would use. Nothing is stored; no embedding is returned.",
             openapi_extra=body_doc("IdentityCreateRequest", multipart_schema(service.schemas.IdentityCreateRequest,
                                                                              service.args.limits.max_faces)))
    async def analyze(request: Request):
        ctx = RequestContext(route="/v1/faces:analyze")
        data, files = await edge.read(request, ctx, service.args.limits.max_faces, ("face_images",))
        return JSONResponse(await service.analyze_faces(ctx, data, files))

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @app.get("/playground/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in STATIC_FILES:  # a fixed list: no path from the URL ever reaches the filesystem
            raise NOT_FOUND("not found")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

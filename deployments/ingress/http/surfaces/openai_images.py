"""The OpenAI Images API under /openai/v1, for the ``openai`` SDK and what is built on it (Open WebUI, LiteLLM).

POST /openai/v1/images/edits        multipart: ``image`` or repeated ``image[]`` = the face photos, ``prompt``,
                                    ``n``, ``size`` ('WxH' or 'auto' = the photo's), ``model``,
                                    ``response_format`` (b64_json | url = S3 delivery), ``output_format``
POST /openai/v1/images/generations  JSON: the same fields, for a stored identity (``identity_id``)

Our other fields ride along with our names (``negative_prompt``, ``seed``, ``steps`` or ``num_inference_steps``,
``guidance_scale``, ``style``, ``pose_image``, ``identity_id``...; the SDK's ``extra_body``). The call is
/v1/generate's (synchronous; the same validation, limits and deadline). Answers ``{created, data: [{b64_json} |
{url}], ...}`` plus ``seed``, ``model``, ``width``, ``height``, ``request_id``, ``timings``; errors
``{"error": {message, type, param, code}}``, with ``x-should-retry: false`` on 500 and 504 so the SDK's automatic
retries never run a generation twice (503 and 429 carry Retry-After as everywhere).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from deployments.errors import INVALID_PARAMETER, ServiceError
from deployments.ingress.http.surfaces.common import authenticate, parse_size

PREFIX = "/openai/v1"
# OpenAI parameters with no meaning here, accepted and ignored so stock clients work unchanged
IGNORED = {"user", "quality", "background", "moderation", "output_compression", "input_fidelity", "style_preset"}
# our field -> the OpenAI parameter it came from, for ``param`` in errors
PARAMS = {"num_images": "n", "base_model": "model", "delivery": "response_format", "width": "size",
          "height": "size", "face_images": "image"}
# OpenAI parameters its API documents as nullable (the SDK sends an explicit None as null): null = the default
NULLABLE = {"n", "size", "model", "response_format", "stream", "output_format", "prompt_cache_key"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error"}


class OpenAIError(ServiceError):
    """A ServiceError in OpenAI's error shape (the app's ServiceError handler writes ``body()``)."""

    @classmethod
    def of(cls, err: ServiceError) -> "OpenAIError":
        headers = dict(err.headers)
        if err.status in (500, 504):  # a generation may have run: never let the SDK retry it on its own
            headers["x-should-retry"] = "false"
        return cls(err.status, err.code, err.message, err.field, headers, err.details)

    def body(self) -> dict:
        param = self.field
        if param:
            base = param.split("[")[0].split(".")[0]
            param = PARAMS.get(base, param)
        kind = ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": param, "code": self.code}}


def translate(data: dict, files: dict | None) -> tuple[dict, dict | None]:
    """OpenAI's parameters -> the /v1/generate request (data, multipart files)."""
    out: dict = {}
    photos_as_text: list = []
    for key, value in data.items():
        if key in IGNORED or (value is None and key in NULLABLE):
            continue
        if key == "n":
            out["num_images"] = value
        elif key == "size":
            size = parse_size(value)
            if size is not None:
                out["width"], out["height"] = size
        elif key == "model":
            out["base_model"] = value
        elif key == "response_format":
            if value not in ("b64_json", "url"):
                raise INVALID_PARAMETER("response_format: b64_json or url", field="delivery")
            out["delivery"] = "s3" if value == "url" else "inline"
        elif key == "num_inference_steps":
            out["steps"] = value
        elif key == "stream":
            if str(value).lower() not in ("false", "0"):
                raise INVALID_PARAMETER("stream: streaming is not supported", field="stream")
        elif key == "mask":
            raise INVALID_PARAMETER("mask: inpainting masks are not supported", field="mask")
        elif key in ("image", "image[]"):  # a photo sent as text: base64 or a data URL
            photos_as_text.extend(value if isinstance(value, list) else [value])
        else:
            out[key] = value
    if photos_as_text:
        given = out.get("face_images", [])
        if not isinstance(given, list):
            raise INVALID_PARAMETER("face_images: a list of photos (base64 or data URLs)",
                               field="face_images")
        out["face_images"] = [*given, *photos_as_text]
    if files is None:
        return out, None
    photos = [*files.pop("image", []), *files.pop("image[]", []), *files.pop("face_images", [])]
    if "mask" in files:
        raise INVALID_PARAMETER("mask: inpainting masks are not supported", field="mask")
    if photos:
        files["face_images"] = photos
    return out, files


def images_response(result: dict) -> dict:
    data = ([{"b64_json": image} for image in result["images"]] if result.get("images") is not None
            else [{"url": url} for url in result.get("urls", [])])
    out = {"created": int(time.time()), "data": data, "output_format": result["format"],
           "size": f"{result['width']}x{result['height']}"}
    for key in ("seed", "model", "width", "height", "request_id", "timings", "identity"):
        if key in result:
            out[key] = result[key]
    return out


def add_routes(app, edge) -> None:
    """Add /openai/v1 to ``app`` (``edge``: deployments.ingress.http.app.Edge)."""
    service = edge.service

    async def auth(request: Request):
        try:
            authenticate(edge, request)
        except ServiceError as err:
            raise OpenAIError.of(err) from None

    router = APIRouter(prefix=PREFIX, dependencies=[Depends(auth)], tags=["OpenAI Images"],
                       include_in_schema=False)  # the schema is OpenAI's Images API: docs/api.md
    limits = service.args.limits

    async def generate(request: Request, route: str, file_fields: tuple[str, ...]) -> JSONResponse:
        ctx = edge.caller(route, request)
        try:
            data, files = await edge.read(request, ctx, limits.max_faces + 2, file_fields)
            data, files = translate(data, files)
        except Exception as exc:
            raise OpenAIError.of(service.fail(ctx, exc)) from None
        try:
            result = await service.generate(ctx, data, files)
        except ServiceError as err:
            raise OpenAIError.of(err) from None
        return JSONResponse(images_response(result))

    @router.post("/images/edits", summary="OpenAI images.edit: the face photos as `image` / `image[]`")
    async def edits(request: Request):
        return await generate(request, PREFIX + "/images/edits", ("image", "image[]", "pose_image", "init_image"))

    @router.post("/images/generations", summary="OpenAI images.generate, for a stored identity (`identity_id`)")
    async def generations(request: Request):
        return await generate(request, PREFIX + "/images/generations", ())

    @router.get("/models", summary="OpenAI models.list: the configured base models")
    async def models():
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "instantid"}
                                           for m in service.args.models]}

    app.include_router(router)

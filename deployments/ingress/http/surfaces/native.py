"""The native /v1 API: generate, identities, models. Routes translate HTTP shapes (JSON or multipart bodies,
path and query parameters, status codes) to and from ``GenerationService``; they hold no logic of their own."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from deployments.ingress.schemas import MAX_LIST_LIMIT, GenerateResponse, IdentityList, IdentityResponse, ModelList
from deployments.ingress.http.openapi import body_doc, multipart_schema


def add_routes(v1: APIRouter, edge) -> None:
    """Add the native routes to ``v1`` (``edge``: deployments.ingress.http.app.Edge)."""
    service = edge.service
    limits = service.args.limits
    errors = edge.errors

    @v1.post("/generate", response_model=GenerateResponse, responses=errors, summary="Generate images",
             openapi_extra=body_doc("GenerateRequest",
                                    multipart_schema(service.schemas.GenerateRequest, limits.max_faces)))
    async def post_generate(request: Request):
        ctx = edge.caller("/v1/generate", request)
        data, files = await edge.read(request, ctx, limits.max_faces + 2, ("face_images", "pose_image", "init_image"))
        return JSONResponse(await service.generate(ctx, data, files))

    @v1.post("/identities", response_model=IdentityResponse, status_code=201, responses=errors,
             summary="Store an identity",
             openapi_extra=body_doc("IdentityCreateRequest",
                                    multipart_schema(service.schemas.IdentityCreateRequest, limits.max_faces)))
    async def create_identity(request: Request):
        ctx = edge.caller("/v1/identities", request)
        data, files = await edge.read(request, ctx, limits.max_faces, ("face_images",))
        return JSONResponse(await service.create_identity(ctx, data, files), status_code=201)

    @v1.get("/identities", response_model=IdentityList, responses=errors, summary="List identities")
    async def list_identities(request: Request, limit: int = Query(100, ge=1, le=MAX_LIST_LIMIT)):
        return await service.list_identities(edge.caller("/v1/identities", request), limit)

    @v1.get("/identities/{identity_id}", response_model=IdentityResponse, responses=errors,
            summary="Get an identity")
    async def get_identity(request: Request, identity_id: str):
        return JSONResponse(await service.get_identity(edge.caller("/v1/identities/{identity_id}", request),
                                                             identity_id))

    @v1.delete("/identities/{identity_id}", status_code=204, responses=errors, summary="Delete an identity")
    async def delete_identity(request: Request, identity_id: str):
        await service.delete_identity(edge.caller("/v1/identities/{identity_id}", request), identity_id)
        return Response(status_code=204)

    @v1.get("/models", response_model=ModelList, responses=errors, summary="Models, LoRAs, styles, schedulers")
    async def models():
        return service.model_list()

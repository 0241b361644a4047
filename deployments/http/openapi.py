"""The OpenAPI document: routes whose body is JSON or multipart say both, and the request schemas (bound to this
deployment's limits) are published as components."""

from __future__ import annotations

import json

from pydantic import BaseModel


def body_doc(name: str, multipart: dict) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}},
        "multipart/form-data": {"schema": multipart},
    }}}


def multipart_schema(model: type[BaseModel], max_faces: int) -> dict:
    # nested objects (people, controls: a $ref to a sub-schema) are for JSON bodies only: a form carries flat fields
    props = {k: v for k, v in model.model_json_schema()["properties"].items() if "$ref" not in json.dumps(v)}
    props["face_images"] = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                            "maxItems": max_faces, "description": "Photo files (repeat the field)."}
    if "pose_image" in props:
        props["pose_image"] = {"type": "string", "format": "binary", "description": "Pose photo file."}
    if "init_image" in props:
        props["init_image"] = {"type": "string", "format": "binary", "description": "img2img init image file."}
    if "loras" in props:
        props["loras"] = {"type": "string", "description": 'JSON object, e.g. {"name": 0.8}.'}
    return {"type": "object", "properties": props}


def install_openapi(app, schemas) -> None:
    """Serve ``app``'s OpenAPI document with the request models of ``schemas`` (``build_models``) as components."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema(
            [(schemas.GenerateRequest, "validation"), (schemas.IdentityCreateRequest, "validation")],
            ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi

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


def form_field_schema(schema: dict) -> dict:
    """A JSON body property's schema as a multipart/form-data text field: a form cannot send ``null`` (an
    absent or empty field is "not given"), so the ``null`` alternative goes."""
    options = schema.get("anyOf")
    if not options:
        return schema
    kept = [option for option in options if option.get("type") != "null"]
    rest = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
    if len(kept) == 1:
        return {**rest, **kept[0]}
    return {**rest, "anyOf": kept}


def multipart_schema(model: type[BaseModel], max_faces: int) -> dict:
    """The multipart form of ``model``'s body: files for the images, text fields for the rest, and nothing the
    API refuses allowed (no null, no unknown field, no empty file)."""
    schema = model.model_json_schema()
    # fields of nested objects (people, controls) are JSON-only: a form carries flat fields, and their schemas'
    # "#/$defs/..." references would not resolve in this document
    props = {k: form_field_schema(v) for k, v in schema["properties"].items() if "$ref" not in json.dumps(v)}
    # an empty text field is "not given" (the reader drops it): a constrained one may be empty too
    props = {k: ({"anyOf": [v, {"type": "string", "maxLength": 0}]}
                 if v.get("type") == "string" and {"pattern", "minLength", "enum"} & set(v) else v)
             for k, v in props.items()}
    file = {"type": "string", "format": "binary", "minLength": 1}  # an empty file is refused (400)
    props["face_images"] = {"type": "array", "items": file, "minItems": 1,
                            "maxItems": max_faces, "description": "Photo files (repeat the field)."}
    if "pose_image" in props:
        props["pose_image"] = {**file, "description": "Pose photo file."}
    if "init_image" in props:
        props["init_image"] = {**file, "description": "img2img init image file."}
    if "loras" in props:
        props["loras"] = {"type": "string", "description": 'JSON object, e.g. {"name": 0.8}.'}
    # the JSON body's rules across fields; its if/then ones stay out (schemathesis 4.32's coverage phase cannot
    # judge file parts against conditionals, and the API enforces them the same)
    rules = {k: schema[k] for k in ("required",) if k in schema}
    if "oneOf" in schema:  # the sources a form can carry (people are JSON only)
        rules["oneOf"] = [rule for rule in schema["oneOf"] if set(rule["required"]) <= set(props)]
    return {"type": "object", "properties": props, "additionalProperties": False, **rules}


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

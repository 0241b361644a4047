"""The OpenAPI schema says what the API enforces (in process, fake backends): 405s name every documented method;
form bodies allow no property or value the API refuses; the base64 image pattern is the decoder's rule."""

from __future__ import annotations

import re

import jsonschema
import pytest

from deployments.errors import ServiceError
from deployments.ingress.inputs import decode_base64
from deployments.ingress.schemas import BASE64_IMAGE_PATTERN, GENERATE_RULES
from fakes import make_client

ID = "id_" + "0" * 32


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    return make_client(tmp_path_factory.mktemp("contract"))


@pytest.fixture(scope="module")
def schema(client):
    return client.get("/openapi.json").json()


def test_405_allow_header_names_every_documented_method(client, schema):
    checked = 0
    for template, operations in schema["paths"].items():
        path = template.replace("{identity_id}", ID)
        documented = {m.upper() for m in operations}
        for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "QUERY", "PURGE"}
                             - documented):
            resp = client.request(method, path)
            assert resp.status_code == 405, (method, path, resp.status_code)
            assert set(resp.headers["allow"].split(", ")) == documented, (method, path, resp.headers["allow"])
            assert resp.json()["error"]["code"] == "method_not_allowed"
            checked += 1
    assert checked > 50


def _bodies(schema, path):
    return schema["paths"][path]["post"]["requestBody"]["content"]


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/identities", "/v1/faces:analyze"])
def test_form_bodies_allow_nothing_the_api_refuses(schema, path):
    form = _bodies(schema, path)["multipart/form-data"]["schema"]
    assert form["additionalProperties"] is False  # unknown fields: 422
    for name, prop in form["properties"].items():
        options = prop.get("anyOf", [prop])
        assert all(o.get("type") != "null" for o in options), name  # a form field cannot be null
        assert prop.get("default", "absent") is not None, name
    files = [form["properties"]["face_images"]["items"]] + [form["properties"][k] for k in ("pose_image", "init_image")
                                                             if k in form["properties"]]
    assert all(f["format"] == "binary" and f["minLength"] == 1 for f in files)  # an empty file: 400
    if path == "/v1/generate":
        assert form["oneOf"] == GENERATE_RULES["oneOf"][:2]  # people: JSON only
    else:
        assert form["required"] == ["face_images"]


def test_generate_rules_in_the_json_schema(schema):
    ref = _bodies(schema, "/v1/generate")["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    body = {**schema["components"]["schemas"][ref], "components": schema["components"]}
    valid = jsonschema.Draft202012Validator(body).is_valid
    assert valid({"identity_id": ID})
    assert valid({"face_images": ["AAAA"], "identity_id": None})
    assert not valid({"face_images": ["AAAA"], "identity_id": ID})  # 422 "not both"
    assert not valid({"prompt": "x"})  # 422 "face_images or identity_id is required"
    assert not valid({"identity_id": ID, "retry_below_threshold": 1})  # needs min_similarity
    assert not valid({"identity_id": ID, "min_similarity": 0.3, "identity_score": False})
    assert not valid({"face_images": [""]})  # empty image: 400
    people = [{"identity_id": ID, "box": [0, 0, 32, 32]}]
    assert not valid({"people": people, "identity_id": ID})
    assert not valid({"people": people, "min_similarity": 0.2})
    assert not valid({"identity_id": ID, "pose_image": "00"})  # not base64: 400


@pytest.mark.parametrize("text", ["", "  ", "AAAA", "AA==", "AAA=", "A===", "AA", "=AAA", "AA=A", "data:,",
                                  "data:image/png;base64,iVBORw0KGgo=", "data:x", " QUJD\nRA==\t", "\u2003AAAA",
                                  "AAAA\x1c", "AAAA AAA", "not base64!", "Zm9v" * 100])
def test_base64_pattern_is_the_decoders_rule(text):
    try:
        decode_base64(text, "x")
        accepted = True
    except ServiceError:
        accepted = False
    assert bool(re.search(BASE64_IMAGE_PATTERN, text)) == accepted

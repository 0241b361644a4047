"""HTTP end to end on the local cluster: generate (JSON and multipart), health, OpenAPI, S3 delivery."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.serve


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_http_enters_through_haproxy(serve_env, http):
    """The tests run the ingress the app ships with (deployments/ray_env.py): HAProxy, not Serve's Python proxy,
    listens on the HTTP port and forwards to the Ingress replica's own server."""
    configs = list(serve_env.haproxy_dir.rglob("haproxy.cfg"))
    assert configs, f"no HAProxy config under {serve_env.haproxy_dir}"
    port = serve_env.base_url.rsplit(":", 1)[1]
    assert any(f":{port}" in c.read_text() for c in configs)
    assert http.get("/healthz").status_code == 200


def test_healthz_and_readyz(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    resp = http.get("/readyz")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["ready"] is True
    assert body["deployments"]["Generator"] == "HEALTHY"
    assert body["deployments"]["FaceAnalyzer"] == "HEALTHY"


def test_generate_json_end_to_end(http, face_b64, tiny_request):
    resp = http.post("/v1/generate", json=tiny_request(face_images=[face_b64], prompt="a portrait", num_images=2,
                                                       seed=123, output_format="png"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["seed"] == 123 and body["model"] == "tiny" and body["format"] == "png"
    assert len(body["images"]) == 2 and "urls" not in body
    for b in body["images"]:
        image = _image(b)
        assert image.format == "PNG" and image.size == (64, 64)
    face = body["face"]
    assert face["source"] == "face_images[0]"
    assert len(face["bbox"]) == 4 and len(face["kps"]) == 5 and face["image_size"][0] > 64
    timings = body["timings"]
    for stage in ("decode_s", "face_analysis_s", "queue_s", "denoise_s", "vae_decode_s", "encode_s", "total_s"):
        assert timings[stage] >= 0, stage
    assert timings["batch_size"] >= 1 and timings["batch_images"] >= 2
    assert timings["total_s"] >= timings["face_analysis_s"] + timings["denoise_s"]


def test_same_seed_same_images_and_random_seed_is_returned(http, identity_id, tiny_request):
    first = http.post("/v1/generate", json=tiny_request(identity_id=identity_id, seed=5)).json()
    again = http.post("/v1/generate", json=tiny_request(identity_id=identity_id, seed=5)).json()
    assert first["images"] == again["images"]
    unseeded = http.post("/v1/generate", json={k: v for k, v in tiny_request(identity_id=identity_id).items()
                                                if k != "seed"})
    assert unseeded.status_code == 200
    assert isinstance(unseeded.json()["seed"], int)
    assert first["face"]["source"] == f"identity:{identity_id}"


def test_generate_multipart_upload(http, face_photo, tiny_request):
    fields = {k: str(v) for k, v in tiny_request(prompt="multipart", output_format="jpeg").items()}
    fields["loras"] = json.dumps({"tiny-lora": 0.5})
    files = [("face_images", ("t1.jpg", face_photo.read_bytes(), "image/jpeg")),
             ("pose_image", ("pose.jpg", face_photo.read_bytes(), "image/jpeg"))]
    resp = http.post("/v1/generate", data=fields, files=files)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert _image(body["images"][0]).format == "JPEG"
    assert body["face"]["source"] == "pose_image"
    assert body["loras"] == {"tiny-lora": 0.5}


@pytest.mark.parametrize("fmt,pil", [("webp", "WEBP"), ("jpeg", "JPEG")])
def test_output_formats(http, identity_id, tiny_request, fmt, pil):
    body = http.post("/v1/generate", json=tiny_request(identity_id=identity_id, output_format=fmt)).json()
    assert _image(body["images"][0]).format == pil


def test_style_and_scheduler(http, identity_id, tiny_request):
    styles = http.get("/v1/models").json()["styles"]
    resp = http.post("/v1/generate", json=tiny_request(identity_id=identity_id, style=styles[0], scheduler="euler_a"))
    assert resp.status_code == 200, resp.text


def test_s3_delivery_returns_presigned_urls(http, identity_id, tiny_request):
    resp = http.post("/v1/generate", json=tiny_request(identity_id=identity_id, delivery="s3", num_images=2))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "images" not in body and len(body["urls"]) == 2
    assert body["timings"]["upload_s"] >= 0
    for url in body["urls"]:
        assert url.startswith("http://127.0.0.1:")
        assert "Signature=" in url
        fetched = httpx.get(url, timeout=30)
        assert fetched.status_code == 200
        assert fetched.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert fetched.headers["content-type"] == "image/png"


def test_models_endpoint(http):
    body = http.get("/v1/models").json()
    assert [m["name"] for m in body["models"]] == ["tiny", "tiny-b"]
    assert body["models"][0] == {"name": "tiny", "loras": ["tiny-lora"], "default": True,
                                 "controls": ["canny", "depth", "extra", "pose"]}
    assert body["models"][1]["controls"] == []
    assert "s3" in body["delivery"] and "euler" in body["schedulers"]


def test_openapi_publishes_limits(http, serve_env):
    assert http.get("/docs").status_code == 200
    schema = http.get("/openapi.json").json()
    for path in ("/v1/generate", "/v1/identities", "/v1/identities/{identity_id}", "/healthz", "/readyz"):
        assert path in schema["paths"], path
    body = schema["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    limits = serve_env.args["limits"]
    assert props["steps"]["maximum"] == limits["max_steps"]
    width = next(s for s in props["width"]["anyOf"] if s.get("type") == "integer")  # optional: the pose canvas
    assert width["maximum"] == limits["max_side"] and width["minimum"] == limits["min_side"]
    assert width["multipleOf"] == 8
    face_images = next(s for s in props["face_images"]["anyOf"] if s.get("type") == "array")
    assert face_images["maxItems"] == 4 and face_images["minItems"] == 1
    model_enum = next(s for s in props["base_model"]["anyOf"] if s.get("type") != "null")
    assert set(model_enum.get("enum", [model_enum.get("const")])) == {"tiny", "tiny-b"}
    for code in ("400", "404", "422", "503", "504"):
        assert code in schema["paths"]["/v1/generate"]["post"]["responses"], code

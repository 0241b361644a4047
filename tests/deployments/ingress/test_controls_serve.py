"""``controls`` and the safety checker end to end on the cluster (HTTP and the handle client): the image changes
with controls and equals the in-process request path's (itself held equal to the library in test_service_controls.py)."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from deployments.client import InstantIDClient
from deployments.ingress.context import RequestContext
from deployments.ingress.service import GenerationService
from deployments.tiny_profile import resolve_args
from serve_helpers import b64, png_bytes
from fakes import LocalFace, LocalGenerator


@pytest.fixture(scope="module")
def mirrored(face_photo) -> bytes:
    out = io.BytesIO()
    ImageOps.mirror(Image.open(face_photo).convert("RGB")).save(out, "JPEG", quality=90)  # under the body limit
    return out.getvalue()


@pytest.fixture(scope="module")
def in_process(serve_env):
    args = resolve_args(serve_env.args)
    core = GenerationService(args, LocalFace(args), LocalGenerator(args))
    core.backends.require = lambda names: asyncio.sleep(0)
    return core


def image(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))).convert("RGB"))


def same_image(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float rounding: the replica runs torch on its num_cpus threads, this process on its own, and
    a reduction split otherwise can move a pixel by one 8-bit level (the in-process path is exact:
    test_service_controls.py)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001, (diff.max(), (diff > 0).mean())


def test_http_and_handle_controls_equal_the_in_process_path(http, in_process, face_b64, mirrored, tiny_request):
    controls = [{"type": "pose"}, {"type": "canny"}, {"type": "depth", "image": b64(mirrored)},
                {"type": "extra", "map": b64(png_bytes((48, 32), (200, 30, 90))), "scale": 0.6}]
    base = tiny_request(face_images=[face_b64], identity_score=False)
    plain = http.post("/v1/generate", json=base)
    controlled = http.post("/v1/generate", json={**base, "controls": controls[:3]})
    assert plain.status_code == 200 and controlled.status_code == 200, controlled.text
    assert not np.array_equal(image(plain.json()["images"][0]), image(controlled.json()["images"][0]))
    body = controlled.json()
    assert body["nsfw"] == [False] and body["timings"]["control_maps_s"] > 0 and "safety_check_s" in body["timings"]
    local = asyncio.run(in_process.generate(RequestContext(route="/v1/generate"), {**base, "controls": controls[:3]}))
    same_image(image(body["images"][0]), image(local["images"][0]))
    # the handle client, with a ready map among them, as the in-process path
    mixed = [controls[0], controls[2], controls[3]]
    handle = InstantIDClient("instantid", timeout_s=120).generate(**base, controls=mixed)
    local = asyncio.run(in_process.generate(RequestContext(route="/v1/generate"), {**base, "controls": mixed}))
    same_image(np.asarray(Image.open(io.BytesIO(handle.image_bytes()[0])).convert("RGB")), image(local["images"][0]))
    assert handle.nsfw == [False]


def test_bad_controls_over_http(http, face_b64, tiny_request, check_error):
    base = tiny_request(face_images=[face_b64])
    check_error(http.post("/v1/generate", json={**base, "controls": [{"type": "canny", "image": b64(b"nope")}]}),
                400, "invalid_image", "controls[0].image")
    check_error(http.post("/v1/generate", json={**base, "controls": [{"type": "segmentation"}]}),
                422, "invalid_parameter", "controls[0].type")
    check_error(http.post("/v1/generate", json={**base, "base_model": "tiny-b", "controls": [{"type": "pose"}]}),
                422, "invalid_parameter", "controls[0].type")
    resp = http.post("/v1/generate", json={**base, "controls": [{"type": "canny"}] * 4})
    assert resp.status_code == 422 and "controls" in resp.text
    check_error(http.post("/v1/generate", json={**base, "safety_checker": False}), 422, "invalid_parameter",
                "safety_checker")


def test_openapi_documents_controls(http):
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    controls = schemas["GenerateRequest"]["properties"]["controls"]
    assert controls["maxItems"] == 3 and "description" in controls
    control = schemas["ControlRequest"]["properties"]
    assert set(control) == {"type", "image", "map", "scale", "start", "end"}
    assert all("description" in field for field in control.values())
    assert control["start"]["minimum"] == 0 and control["end"]["maximum"] == 1

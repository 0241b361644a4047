"""``people`` end to end through the local Ray cluster (tiny profile): HTTP at 1024x1024, the handle client, and a
bad request's 422. The tiny detector finds two faces in t1.jpg: a small one top left (face 0) and the main one."""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from PIL import Image, ImageOps

from deployments.client import InstantIDClient, ServiceError

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def mirrored_b64(face_photo) -> str:
    out = io.BytesIO()
    ImageOps.mirror(Image.open(face_photo).convert("RGB")).save(out, format="JPEG", quality=90)
    return base64.b64encode(out.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def full_size_url(serve_env, tmp_path_factory):
    """An application with the documented default limits (the shared one caps sides at 512)."""
    from ray import serve

    from deployments.app import bind
    from deployments.config import Limits
    from deployments.tiny_profile import resolve_args
    from serve_helpers import app_args

    args = app_args(serve_env.tiny, identity_store=str(serve_env.identity_dir), request_timeout_s=600,
                    limits=Limits().model_dump())
    app = bind(resolve_args(args), {"Ingress": {"ray_actor_options": {"num_cpus": 0.1}},
                                    "FaceAnalyzer": {"ray_actor_options": {"num_cpus": 0.25}},
                                    "Generator": {"ray_actor_options": {"num_cpus": 1}}})
    serve.run(app, name="people", route_prefix="/people")
    try:
        yield f"{serve_env.base_url}/people"
    finally:
        serve.delete("people")


def test_four_people_at_1024(full_size_url, serve_env, face_b64, mirrored_b64, identity_id):
    """The most people a request may have, at 1024x1024: two faces of the group photo and two boxes in the free
    left column (the main face's region covers x >= 244, y 64-909 of this canvas)."""
    resp = httpx.post(f"{full_size_url}/v1/generate", timeout=600, json={
        "people": [{"face_images": [face_b64], "face_index": 1}, {"face_images": [mirrored_b64], "face_index": 0},
                   {"identity_id": identity_id, "box": [20, 300, 180, 460]},
                   {"identity_id": identity_id, "box": [20, 620, 180, 780]}],
        "pose_image": face_b64, "width": 1024, "height": 1024, "steps": 1, "seed": 5, "return_pose_image": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    with Image.open(io.BytesIO(base64.b64decode(body["images"][0]))) as image:
        assert image.size == (1024, 1024)
    main, small = body["people"][:2]
    assert main["face"]["bbox"][0] > small["face"]["bbox"][0]  # face 1 is right of face 0
    assert main["region"][0] >= small["region"][2]  # the regions do not overlap
    assert body["people"][2]["region"] == [0, 260, 220, 500]  # the box grown by 25% per side
    assert body["timings"]["identities"] == 4 and "face" not in body and "identity" not in body
    pose = Image.open(io.BytesIO(base64.b64decode(body["pose_image"])))
    for person in body["people"]:
        x1, y1, x2, y2 = person["region"]
        assert pose.crop((x1, y1, x2, y2)).getbbox() is not None  # each person's keypoints are drawn
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline and "ray_instantid_request_identities_bucket" not in text:
        text = httpx.get(serve_env.metrics_url, timeout=10).text
        time.sleep(1)
    assert "ray_instantid_request_identities_bucket" in text


def test_handle_client_people_and_a_refusal(serve_env, face_photo, identity_id):
    client = InstantIDClient("instantid", timeout_s=120)
    out = client.generate(people=[{"identity_id": identity_id, "face_index": 0},
                                  {"face_images": [face_photo], "face_index": 1}],  # a Path, encoded by the client
                          pose_image=face_photo, width=96, height=64, steps=1)
    assert [len(p.region) for p in out.people] == [4, 4] and out.timings.identities == 2
    with pytest.raises(ServiceError) as err:
        client.generate(people=[{"face_images": [face_photo], "face_index": 2}], pose_image=face_photo,
                        width=96, height=64, steps=1)
    assert (err.value.status, err.value.field) == (422, "people[0].face_index")

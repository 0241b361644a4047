"""The documented limits end to end on the tiny model (not 64x64): a ~20 MB body carrying a phone-size JPEG on
/v1/identities and /v1/generate, 1024x1024 and 2048x2048 results with the most images a request may ask for.

Before the fix each of these was a 500: the Ingress called its backends by value over Serve's gRPC data plane,
which refuses messages over 4 MiB (``RESOURCE_EXHAUSTED ... Received message larger than max``).

These run on their own application (``limits`` at /limits, the default ``Limits``), deleted afterwards. They are
kept few and cheap (1 denoising step): the tiny model proves the plumbing, not image quality.
"""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest

from deployments.config import Limits
from serve_helpers import app_args, b64

pytestmark = pytest.mark.serve

LIMITS = Limits()  # the documented defaults: 20 MiB body, 2048 px sides, 4 images
# unguided (half the denoising batch): the message sizes under test do not depend on guidance
CHEAP = {"guidance_scale": 1.0}


def phone_jpeg(face_photo, max_bytes: int, size=(4000, 2769)) -> bytes:
    """A phone-size JPEG (4000x2769, like the issue's 6.3 MB photo) as close under ``max_bytes`` as JPEG quality
    allows: the face photo scaled up, with seeded noise so it does not compress away."""
    from PIL import Image

    base = np.asarray(Image.open(face_photo).convert("RGB").resize(size, Image.BICUBIC), dtype=np.int16)
    noise = np.random.default_rng(0).integers(-60, 61, size=base.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))

    def encode(quality: int) -> bytes:
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
        return out.getvalue()

    low, high, best = 50, 100, None  # the largest quality whose file fits
    while low <= high:
        mid = (low + high) // 2
        data = encode(mid)
        if len(data) <= max_bytes:
            best, low = data, mid + 1
        else:
            high = mid - 1
    assert best is not None
    return best


@pytest.fixture(scope="module")
def limits_url(serve_env, tmp_path_factory):
    from ray import serve

    from deployments.app import bind
    from deployments.tiny_profile import resolve_args

    args = app_args(serve_env.tiny, identity_store=str(tmp_path_factory.mktemp("limits-ids")),
                    request_timeout_s=900, limits=LIMITS.model_dump())
    app = bind(resolve_args(args), {
        "Ingress": {"ray_actor_options": {"num_cpus": 0.1}},
        "FaceAnalyzer": {"ray_actor_options": {"num_cpus": 0.25}},
        "Generator": {"ray_actor_options": {"num_cpus": 1}},
    })
    serve.run(app, name="limits", route_prefix="/limits")
    try:
        yield f"{serve_env.base_url}/limits"
    finally:
        serve.delete("limits")


@pytest.fixture(scope="module")
def big_body_photo(face_photo) -> bytes:
    """The largest photo a JSON body within max_body_bytes can carry (base64 is 4/3 of it)."""
    return phone_jpeg(face_photo, (LIMITS.max_body_bytes - 4096) * 3 // 4)


def _post(url: str, path: str, body: dict) -> httpx.Response:
    data = json.dumps(body).encode()
    assert len(data) <= LIMITS.max_body_bytes
    started = time.perf_counter()
    with httpx.Client(timeout=900) as client:
        resp = client.post(f"{url}{path}", content=data, headers={"Content-Type": "application/json"})
    print(f"\n{path}: {len(data) / 1e6:.1f} MB in, {len(resp.content) / 1e6:.1f} MB out, {resp.status_code} in "
          f"{time.perf_counter() - started:.1f}s")
    return resp


def _images(resp: httpx.Response, count: int, side: int) -> None:
    from PIL import Image

    assert resp.status_code == 200, resp.text[:500]
    images = resp.json()["images"]
    assert len(images) == count
    for text in images:
        with Image.open(io.BytesIO(base64.b64decode(text))) as image:
            assert image.size == (side, side)


def test_largest_body_with_a_phone_photo(limits_url, big_body_photo):
    """A ~20 MB body (a 4000x2769 JPEG of ~15 MB) creates an identity and generates 4 images at 1024x1024
    (4 x 3 MiB of arrays back from the Generator)."""
    body = {"face_images": [b64(big_body_photo)]}
    assert len(json.dumps(body)) > 0.95 * LIMITS.max_body_bytes  # really the largest body, not a small one
    created = _post(limits_url, "/v1/identities", body)
    assert created.status_code == 201, created.text[:500]
    assert created.json()["faces"][0]["image_size"] == [4000, 2769]
    generated = _post(limits_url, "/v1/generate", {**body, "width": 1024, "height": 1024, "steps": 1, **CHEAP,
                                                   "num_images": LIMITS.max_num_images, "seed": 1})
    _images(generated, LIMITS.max_num_images, 1024)


def test_largest_size_with_the_most_images(limits_url, face_photo):
    """2048x2048 x 4 images (48 MiB of arrays back from the Generator) from a stored identity."""
    created = _post(limits_url, "/v1/identities", {"face_images": [b64(face_photo.read_bytes())]})
    assert created.status_code == 201, created.text[:500]
    generated = _post(limits_url, "/v1/generate", {
        "identity_id": created.json()["identity_id"], "width": LIMITS.max_side, "height": LIMITS.max_side,
        "steps": 1, **CHEAP, "num_images": LIMITS.max_num_images, "seed": 2})  # PNG: the largest response
    _images(generated, LIMITS.max_num_images, LIMITS.max_side)


def test_img2img_with_a_phone_photo_and_a_small_result(limits_url, face_photo):
    """A ~8 MB img2img photo with a 256x256 result: the task carries the upload to the Generator, so its size,
    not only the result's, decides by reference (the task went by value: over gRPC's 4 MiB cap, a 500)."""
    created = _post(limits_url, "/v1/identities", {"face_images": [b64(face_photo.read_bytes())]})
    assert created.status_code == 201, created.text[:500]
    init = phone_jpeg(face_photo, 8_000_000)
    assert len(init) > 6_000_000
    generated = _post(limits_url, "/v1/generate", {
        "identity_id": created.json()["identity_id"], "init_image": b64(init), "strength": 0.5,
        "width": 256, "height": 256, "steps": 2, **CHEAP, "seed": 3})
    _images(generated, 1, 256)

"""``controls`` through the service's request path in one process: the Ingress core with the real FaceAnalyzer,
control-map and Generator cores behind handle-shaped adapters (the Ray cluster tests cover the handles)."""

from __future__ import annotations

import asyncio
import base64
import copy
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from deployments.errors import ServiceError
from deployments.generator.deployment import accept_task
from deployments.ingress.context import RequestContext
from deployments.ingress.service import GenerationService
from deployments.tiny_profile import resolve_args
from instantid.controls import CONTROL_TYPES, DEFAULT_SCALES, ControlSpec, Preprocessors, prepare_controls
from instantid.face import load_image
from serve_helpers import app_args, b64, png_bytes
from fakes import LocalFace, LocalGenerator


@pytest.fixture(scope="module")
def service(tiny_bundle):
    limits = {**app_args(tiny_bundle)["limits"], "max_controls": 4}
    args = resolve_args(app_args(tiny_bundle, limits=limits, models=[{"name": "tiny", "base_model": str(tiny_bundle / "sdxl"),
                                                       "controlnets": {k: str(tiny_bundle / f"controlnet-{k}")
                                                                       for k in (*CONTROL_TYPES, "extra")}}]))
    core = GenerationService(args, LocalFace(args), LocalGenerator(args))
    core.backends.require = lambda names: asyncio.sleep(0)
    return core


@pytest.fixture(scope="module")
def photos(face_photo):
    face = face_photo.read_bytes()
    mirrored = io.BytesIO()
    ImageOps.mirror(Image.open(face_photo).convert("RGB")).save(mirrored, "PNG")
    return {"face": face, "other": mirrored.getvalue()}


def generate(service, **fields):
    data = {"width": 64, "height": 64, "steps": 2, "seed": 11, "identity_score": False, **fields}
    return asyncio.run(service.generate(RequestContext(route="/v1/generate"), data))


def decoded(response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response["images"][0]))).convert("RGB"))


def test_controls_change_the_image_and_equal_the_library(service, photos, tiny_bundle):
    plain = generate(service, face_images=[b64(photos["face"])])
    ready = png_bytes((40, 30), (250, 10, 90))
    controls = [{"type": "pose"}, {"type": "canny"}, {"type": "depth", "image": b64(photos["other"])},
                {"type": "extra", "map": b64(ready), "scale": 0.7, "start": 0.1, "end": 0.9}]
    response = generate(service, face_images=[b64(photos["face"])], controls=controls)
    assert not np.array_equal(decoded(plain), decoded(response))
    assert response["timings"]["control_maps_s"] > 0
    # one call derived the three maps, concurrently with the face analysis
    assert [(field, kind) for field, kind, _ in service.backends.face.calls[-1]] == [
        ("controls[0].image", "pose"), ("controls[1].image", "canny"), ("controls[2].image", "depth")]
    # what the Generator applied is what the library builds from the same inputs
    library = prepare_controls(
        Preprocessors(depth=str(tiny_bundle / "dpt"), pose=str(tiny_bundle / "dwpose")),
        [ControlSpec("pose", photo=load_image(photos["face"])), ControlSpec("canny", photo=load_image(photos["face"])),
         ControlSpec("depth", photo=load_image(photos["other"])),
         ControlSpec("extra", map=load_image(ready), scale=0.7, start=0.1, end=0.9)], (64, 64))
    job = accept_task(copy.deepcopy(service.backends.generator.jobs[-1]))
    assert [(c["name"], c["scale"], c["start"], c["end"]) for c in job.controls] == [
        (c.name, c.scale, c.start, c.end) for c in library]
    for ours, theirs in zip(job.controls, library):
        np.testing.assert_array_equal(ours["map"], np.asarray(theirs.image))
    # and the image is the Generator's for exactly those library maps
    job.controls = [{**c, "map": np.asarray(l.image)} for c, l in zip(job.controls, library)]
    again = service.backends.generator.core.predict(service.backends.generator.model, [job])[0].images[0]
    np.testing.assert_array_equal(decoded(response), again)


def test_default_photo_is_the_pose_photo(service, photos):
    generate(service, face_images=[b64(photos["face"])], pose_image=b64(photos["other"]), controls=[{"type": "canny"}])
    assert service.backends.face.calls[-1][0][2] == photos["other"]


@pytest.mark.parametrize("control, status, code, field", [
    ({"type": "segmentation"}, 422, "invalid_parameter", "controls[0].type"),
    ({"type": "canny", "image": b64(b"not an image at all")}, 400, "invalid_image", "controls[0].image"),
    ({"type": "canny", "image": "%%%"}, 400, "invalid_base64", "controls[0].image"),
    ({"type": "canny", "map": b64(b"GIF89a....")}, 400, "invalid_image", "controls[0].map"),
    ({"type": "extra"}, 422, "invalid_parameter", "controls[0].map"),
    ({"type": "canny", "image": b64(png_bytes()), "map": b64(png_bytes())}, 422, "invalid_parameter", "controls[0]"),
])
def test_bad_controls_are_named(service, photos, control, status, code, field):
    with pytest.raises(ServiceError) as caught:
        generate(service, face_images=[b64(photos["face"])], controls=[control])
    assert (caught.value.status, caught.value.code, caught.value.field) == (status, code, field)


def test_bounds_and_identity_without_photo(service, photos):
    with pytest.raises(ServiceError) as caught:
        generate(service, face_images=[b64(photos["face"])], controls=[{"type": "canny"}] * 5)
    assert caught.value.status == 422
    with pytest.raises(ServiceError) as caught:
        generate(service, face_images=[b64(photos["face"])], controls=[{"type": "canny", "scale": 3}])
    assert caught.value.status == 422


def test_models_list_control_types(service):
    assert service.model_list()["models"][0]["controls"] == ["canny", "depth", "extra", "pose"]


def service_with(tiny_bundle, **overrides) -> GenerationService:
    args = resolve_args(app_args(tiny_bundle, models=[{"name": "tiny", "base_model": str(tiny_bundle / "sdxl"),
                                                       "controlnets": {k: str(tiny_bundle / f"controlnet-{k}")
                                                                       for k in CONTROL_TYPES}}], **overrides))
    core = GenerationService(args, LocalFace(args), LocalGenerator(args))
    core.backends.require = lambda names: asyncio.sleep(0)
    return core


@pytest.mark.parametrize("action", ["blur", "refuse"])
def test_flagged_outputs_through_the_service(tiny_bundle, photos, action):
    from instantid.safety import blur

    safety = {"enabled": True, "model": str(tiny_bundle / "safety-flag-all"), "action": action}
    core = service_with(tiny_bundle, safety=safety)
    if action == "refuse":
        with pytest.raises(ServiceError) as caught:
            generate(core, face_images=[b64(photos["face"])], num_images=2)
        assert (caught.value.status, caught.value.code) == (422, "unsafe_output")
        return
    response = generate(core, face_images=[b64(photos["face"])], num_images=2)
    assert response["nsfw"] == [True, True] and response["timings"]["safety_check_s"] > 0
    task = accept_task(copy.deepcopy(core.backends.generator.jobs[-1]))
    raw = core.backends.generator.core.predict(core.backends.generator.model, [task])[0].images[0]
    np.testing.assert_array_equal(decoded(response), np.asarray(blur(Image.fromarray(raw))))


def test_largest_request_with_controls_at_full_size(tiny_bundle, face_photo):
    """Default limits: three controls, each from its own photo at the pixel limit (4096x4096), at 1024x1024."""
    from deployments.config import Limits

    side = int(Limits().max_image_pixels ** 0.5)
    big = Image.open(face_photo).convert("RGB").resize((side, side))
    photos = []
    for k in range(3):
        out = io.BytesIO()
        (big if k == 0 else ImageOps.mirror(big) if k == 1 else ImageOps.flip(big)).save(out, "JPEG", quality=80)
        photos.append(out.getvalue())
    limits = {"max_body_bytes": 20 * 1024 * 1024}  # the defaults otherwise: 4096x4096 photos, sides to 2048
    core = service_with(tiny_bundle, limits=limits, safety={"enabled": True}, request_timeout_s=900)
    controls = [{"type": kind, "image": b64(data)} for kind, data in zip(CONTROL_TYPES, photos)]
    response = generate(core, face_images=[b64(photos[0])], controls=controls, width=1024, height=1024,
                        num_images=2)
    assert response["width"] == 1024 and response["nsfw"] == [False, False]
    assert decoded(response).shape == (1024, 1024, 3)
    job = accept_task(copy.deepcopy(core.backends.generator.jobs[-1]))
    assert [c["map"].shape for c in job.controls] == [(1024, 1024, 3)] * 3

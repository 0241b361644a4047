"""HTTP fields of the demo's features (issue 11), without a Ray cluster: photo-shaped default size, cover-fit
refusals, enhance_face_region, prompt_weighting, img2img's init_image/strength, return_pose_image; and the
Generator's side (job decoding, batch key, the requests it builds) on the tiny bundle."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from serve_helpers import assert_error, b64, png_bytes
from fakes import RecordingGenerator, make_client

from deployments.config import Limits
from deployments.generator.deployment import GeneratorCore, LoadedModel, accept_task
from deployments.messages import GenerationTask
from deployments.ingress.schemas import default_size


def request(**fields):
    return {"face_images": [b64(png_bytes())], "steps": 2, **fields}


def test_default_size_is_the_pose_canvas_with_face_region_and_lpw(tmp_path):
    gen = RecordingGenerator()
    resp = make_client(tmp_path, generator=gen).post("/v1/generate", json=request())
    assert resp.status_code == 200, resp.text
    job = gen.jobs[-1]
    assert (job.width, job.height) == (1024, 1024)  # the fake analyser's canvas
    assert (resp.json()["width"], resp.json()["height"]) == (1024, 1024)
    assert job.prompt_weighting == "lpw" and job.enhance_face_region is True
    assert job.bbox == [4.0, 8.0, 12.0, 16.0]  # the face box on the 1024 canvas (reported on the 256 photo)
    assert job.init_image is None and "pose_image" not in resp.json()


def test_explicit_fields_reach_the_job_and_pose_image_comes_back(tmp_path):
    gen = RecordingGenerator()
    resp = make_client(tmp_path, generator=gen).post("/v1/generate", json=request(
        width=64, height=96, enhance_face_region=False, prompt_weighting="none", return_pose_image=True))
    assert resp.status_code == 200, resp.text
    job = gen.jobs[-1]
    assert (job.width, job.height, job.enhance_face_region, job.prompt_weighting) == (
        64, 96, False, "none")
    pose = Image.open(io.BytesIO(base64.b64decode(resp.json()["pose_image"])))
    assert pose.format == "PNG" and pose.size == (64, 96)


def test_img2img_takes_the_init_images_size_after_the_demo_resize(tmp_path):
    gen = RecordingGenerator()
    init = png_bytes(size=(300, 200))
    resp = make_client(tmp_path, generator=gen).post("/v1/generate", json=request(init_image=b64(init),
                                                                                  strength=0.5))
    assert resp.status_code == 200, resp.text
    job = gen.jobs[-1]
    assert (job.width, job.height) == (1280, 832) and job.strength == 0.5 and job.init_image == init


def test_init_image_as_a_multipart_file(tmp_path):
    gen = RecordingGenerator()
    files = [("face_images", ("a.png", png_bytes(), "image/png")),
             ("init_image", ("i.png", png_bytes(size=(64, 64)), "image/png"))]
    resp = make_client(tmp_path, generator=gen).post("/v1/generate", files=files,
                                                     data={"steps": "2", "width": "64", "height": "64"})
    assert resp.status_code == 200, resp.text
    assert gen.jobs[-1].init_image == png_bytes(size=(64, 64))


@pytest.mark.parametrize("fields, status, code, field", [
    ({"init_image": b64(b"not an image at all")}, 400, "invalid_image", "init_image"),
    ({"init_image": "%%%"}, 400, "invalid_base64", "init_image"),
    ({"init_image": b64(png_bytes()), "strength": 0}, 422, "invalid_parameter", "strength"),
    ({"init_image": b64(png_bytes()), "strength": 1.5}, 422, "invalid_parameter", "strength"),
    ({"prompt_weighting": "sd15"}, 422, "invalid_parameter", "prompt_weighting"),
    ({"enhance_face_region": "sometimes"}, 422, "invalid_parameter", "enhance_face_region"),
    ({"width": 64, "height": 2048}, 422, "invalid_parameter", "width"),  # the face cannot fit that canvas
])
def test_bad_demo_fields(tmp_path, fields, status, code, field):
    gen = RecordingGenerator()
    resp = make_client(tmp_path, generator=gen).post("/v1/generate", json=request(**fields))
    err = assert_error(resp, status, code)
    assert err.get("field") == field or field in err["message"], err
    assert gen.jobs == []  # refused before any generation


def test_default_size_keeps_the_aspect_inside_the_limits():
    limits = Limits()
    assert default_size((1280, 832), limits) == (1280, 832)
    small = Limits(min_side=64, max_side=1024)
    assert default_size((1280, 832), small) == (1024, 664)  # one factor, then multiples of 8
    assert default_size((832, 1280), small) == (664, 1024)


# -- the Generator's side, on the tiny bundle ------------------------------------------------------------
def job(**fields) -> GenerationTask:
    base = {"model": "m", "embedding": np.ones(512, np.float32), "kps": [[20, 22], [44, 22], [32, 34], [23, 46],
                                                                         [41, 46]],
            "canvas": [64, 64], "width": 64, "height": 64, "steps": 2, "seed": 1}
    base.update(fields)
    return GenerationTask(**base)


def test_batch_key_groups_img2img_by_strength():
    plain = accept_task(job())
    a = accept_task(job(init_image=png_bytes(size=(64, 64)), strength=0.5))
    b = accept_task(job(init_image=png_bytes(size=(64, 64)), strength=0.7))
    same = accept_task(job(init_image=png_bytes(size=(32, 32)), strength=0.5, prompt_weighting="none",
                           enhance_face_region=True, bbox=[10, 10, 50, 50]))
    assert len({plain.batch_key(), a.batch_key(), b.batch_key()}) == 3 and a.batch_key() == same.batch_key()
    # prompts batch across weightings
    assert plain.batch_key() == accept_task(job(prompt_weighting="none")).batch_key()


def test_generator_builds_masks_and_pose_images_per_request(tiny_bundle):
    from deployments.tiny_profile import resolve_args
    from instantid.identity import Pose

    core = GeneratorCore(resolve_args({"profile": "tiny", "tiny_dir": str(tiny_bundle)}))
    model = core.load(core.args.default_model)
    seen = []
    real = model.pipe.generate

    def spy(requests, **kw):
        seen.extend(requests)
        return real(requests, **kw)

    model.pipe.generate = spy
    box = [12.0, 10.0, 52.0, 56.0]
    jobs = [accept_task(job(bbox=box, enhance_face_region=True, return_pose_image=True, seed=1)),
            accept_task(job(seed=2, prompt_weighting="none"))]
    results = core.predict(model, jobs)
    assert [r.timings["batch_size"] for r in results] == [2, 2]
    pose = Pose(np.asarray(jobs[0].kps), (64, 64), np.asarray(box))
    np.testing.assert_array_equal(np.asarray(seen[0].control_mask), np.asarray(pose.face_mask()))
    assert seen[1].control_mask is None and seen[1].prompt_weighting == "none"
    np.testing.assert_array_equal(results[0].pose_image, np.asarray(pose.draw()))
    assert results[1].pose_image is None

"""The output safety checker in the Generator (batched after decoding, blur or refuse) and its request switch at
the Ingress; tiny checkers that flag every image or none make each outcome deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deployments.errors import ServiceError
from deployments.generator.deployment import GeneratorCore, accept_task
from deployments.messages import GenerationTask
from deployments.tiny_profile import resolve_args
from instantid.safety import blur
from serve_helpers import app_args, assert_error
from fakes import generate_request, make_client

KPS = [[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]]


def job(**fields) -> GenerationTask:
    return accept_task(GenerationTask(**{"model": "tiny", "embedding": np.ones(512, np.float32), "kps": KPS,
                                         "canvas": [64, 64], "width": 64, "height": 64, "steps": 2, "seed": 5,
                                         "num_images": 2, **fields}))


@pytest.fixture(scope="module")
def plain(tiny_bundle):
    core = GeneratorCore(resolve_args(app_args(tiny_bundle)))
    return core.predict(core.load("tiny"), [job()])[0]


def core_with(tiny_bundle, checker: str, action: str = "blur"):
    args = app_args(tiny_bundle, safety={"enabled": True, "model": str(tiny_bundle / checker), "action": action})
    core = GeneratorCore(resolve_args(args))
    return core, core.load("tiny")


def test_blur_marks_and_blurs_flagged_images_in_one_batch(tiny_bundle, plain):
    core, model = core_with(tiny_bundle, "safety-flag-all")
    jobs = [job(), job(seed=6, num_images=1),
            job(safety_checker=False)]
    outputs = core.screen(jobs, core.predict(model, jobs))
    assert outputs[0].nsfw == [True, True] and outputs[1].nsfw == [True]
    assert outputs[2].nsfw is None  # the request turned it off (the Ingress allowed it)
    for raw, blurred in zip(plain.images, outputs[0].images):
        np.testing.assert_array_equal(blurred, np.asarray(blur(Image.fromarray(raw))))
    np.testing.assert_array_equal(outputs[2].images[0], plain.images[0])
    assert outputs[0].timings["safety_check_s"] > 0


def test_clean_images_pass_unchanged(tiny_bundle, plain):
    core, model = core_with(tiny_bundle, "safety")
    jobs = [job()]
    out = core.screen(jobs, core.predict(model, jobs))[0]
    assert out.nsfw == [False, False]
    for a, b in zip(out.images, plain.images):
        np.testing.assert_array_equal(a, b)


def test_refuse_answers_an_all_flagged_result_422(tiny_bundle):
    core, model = core_with(tiny_bundle, "safety-flag-all", action="refuse")
    jobs = [job()]
    out = core.screen(jobs, core.predict(model, jobs))[0]
    assert isinstance(out, ServiceError) and out.status == 422 and out.code == "unsafe_output"
    clean, model = core_with(tiny_bundle, "safety", action="refuse")
    assert clean.screen(jobs, clean.predict(model, jobs))[0].nsfw == [False, False]


def test_request_may_turn_it_off_only_where_allowed(tmp_path):
    on = {"safety": {"enabled": True, "model": "unused"}}
    assert_error(make_client(tmp_path, **on).post("/v1/generate", json=generate_request(safety_checker=False)),
                 422, "invalid_parameter", "safety_checker")
    allowed = {"safety": {"enabled": True, "model": "unused", "allow_disable": True}}
    assert make_client(tmp_path, **allowed).post("/v1/generate", json=generate_request(safety_checker=False)).status_code == 200


def test_nsfw_flags_reach_the_response(tmp_path):
    from fakes import FakeGenerator

    fake = FakeGenerator()
    inner = fake.denoise.fn

    async def flagged(task):
        result = await inner(task)
        result.nsfw = [True] * task.num_images
        return result

    fake.denoise.fn = flagged
    resp = make_client(tmp_path, generator=fake).post("/v1/generate", json=generate_request(num_images=2))
    assert resp.status_code == 200 and resp.json()["nsfw"] == [True, True]

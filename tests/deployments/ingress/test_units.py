"""Ingress, error mapping and health logic without a Ray cluster (fake handles, an in-process ASGI client)."""

from __future__ import annotations

import hashlib
import pickle
import time

import numpy as np
import pytest

from deployments.config import AppArgs
from deployments.errors import ServiceError, from_exception
from deployments.ingress.http.auth import RateLimiter
from deployments.ingress.inputs import decode_base64
from deployments.messages import GenerationTask
from deployments.ingress.service import GenerationService
from deployments.ingress.schemas import SCHEDULERS, GenerateRequest, build_models
from instantid.errors import InvalidImageError, InvalidParameterError, NoFaceError, WeightsError
from serve_helpers import assert_error, b64, png_bytes


from fakes import FakeFace, FakeGenerator, FakeMethod, generate_request, make_client


def test_fake_generate_round_trip(tmp_path):
    resp = make_client(tmp_path).post("/v1/generate", json=generate_request(num_images=2))
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["images"]) == 2 and 0 <= resp.json()["seed"] <= 2**32 - 1


def test_unexpected_errors_are_500_json_without_internals(tmp_path):
    client = make_client(tmp_path, generator=FakeGenerator(RuntimeError("secret /etc/shadow detail")))
    resp = client.post("/v1/generate", json=generate_request())
    err = assert_error(resp, 500, "internal")
    assert "secret" not in resp.text and "RuntimeError" not in resp.text
    assert "request id" in err["message"]


@pytest.mark.parametrize("exc,status,code", [
    (ServiceError(503, "queue_full", "full", headers={"Retry-After": "1"}), 503, "queue_full"),
    (NoFaceError("face_images[0]"), 422, "no_face"),
    (InvalidParameterError("steps", "too many"), 422, "invalid_parameter"),
    (InvalidImageError("bad"), 400, "invalid_image"),
    (WeightsError("gone"), 503, "model_unavailable"),
])
def test_backend_errors_map_to_status(tmp_path, exc, status, code):
    resp = make_client(tmp_path, generator=FakeGenerator(exc)).post("/v1/generate", json=generate_request())
    assert_error(resp, status, code)


def test_backpressure_maps_to_503_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    err = from_exception(BackPressureError(num_queued_requests=3, max_queued_requests=2))
    assert (err.status, err.code) == (503, "queue_full") and int(err.headers["Retry-After"]) >= 1
    assert from_exception(TimeoutError()).status == 504


def test_service_error_survives_pickling():
    err = ServiceError(422, "no_face", "no face found in face_images[1]", field="face_images[1]",
                       headers={"X": "1"})
    back = pickle.loads(pickle.dumps(err))
    assert (back.status, back.code, back.message, back.field, back.headers) == (422, "no_face", err.message,
                                                                                "face_images[1]", {"X": "1"})


def test_ray_task_error_is_unwrapped():
    from ray.exceptions import RayTaskError

    cause = ServiceError(422, "no_face", "no face found in pose_image", field="pose_image")
    wrapped = RayTaskError("analyze", "Traceback (most recent call last): ...", cause)
    assert from_exception(wrapped) is cause


def test_api_keys_and_rate_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEYS", "alice:" + hashlib.sha256(b"s3cret").hexdigest() + ",broken-entry")
    client = make_client(tmp_path, auth={"enabled": True, "key_hashes_env": "TEST_KEYS", "rate_per_s": 0.001,
                                         "burst": 2})
    missing = client.get("/v1/identities")
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(client.get("/v1/identities", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    good = {"Authorization": "Bearer s3cret"}
    assert client.get("/v1/identities", headers=good).status_code == 200
    assert client.get("/v1/models", headers=good).status_code == 200
    limited = client.get("/v1/identities", headers=good)
    assert_error(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1
    assert client.get("/healthz").status_code == 200  # probes need no key
    schema = client.get("/openapi.json").json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_rate_limiter_refills():
    now = [0.0]
    limiter = RateLimiter(rate_per_s=1.0, burst=1, clock=lambda: now[0])
    limiter.take("k")
    with pytest.raises(ServiceError):
        limiter.take("k")
    now[0] = 1.01
    limiter.take("k")


def test_readyz_reports_an_unloaded_model(tmp_path):
    client = make_client(tmp_path, status=lambda: {"FaceAnalyzer": "HEALTHY", "Generator": "UNHEALTHY"})
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["ready"] is False and "Generator" in resp.json()["message"]


def test_a_backend_down_is_503_at_once_and_a_stale_view_is_checked_again(tmp_path):
    """A backend whose status says it failed: 503 unavailable at once, without queueing. The Ingress keeps its
    status view up to a second, and a replacement replica can serve within it: a request that finds the backend
    down in that view gets a fresh look (at most four reads a second) before it is refused."""
    face = {"status": "UNHEALTHY"}
    client = make_client(tmp_path, status=lambda: {"FaceAnalyzer": face["status"], "Generator": "HEALTHY"})
    err = assert_error(client.post("/v1/generate", json=generate_request()), 503, "unavailable")
    assert "FaceAnalyzer" in err["message"]
    face["status"] = "HEALTHY"  # replaced; the Ingress's view still says UNHEALTHY for up to a second
    time.sleep(0.3)
    resp = client.post("/v1/generate", json=generate_request())
    assert resp.status_code == 200, resp.text


def test_check_health_fails_until_the_model_is_loaded():
    from deployments.face_analyzer.deployment import FaceAnalyzerDeployment
    from deployments.generator.deployment import Generator

    gen = Generator.func_or_class.__new__(Generator.func_or_class)
    gen.ready_error = "WeightsError: weights not found"
    with pytest.raises(RuntimeError, match="model not loaded"):
        gen.check_health()
    gen.ready_error = None
    gen.check_health()
    face = FaceAnalyzerDeployment.func_or_class.__new__(FaceAnalyzerDeployment.func_or_class)
    face.core, face.load_error = None, "WeightsError: no pack"
    with pytest.raises(RuntimeError, match="face model not loaded"):
        face.check_health()


def test_base64_accepts_data_urls_and_whitespace():
    data = png_bytes()
    assert decode_base64("data:image/png;base64," + b64(data), "x") == data
    assert decode_base64(b64(data)[:10] + "\n" + b64(data)[10:], "x") == data
    with pytest.raises(ServiceError) as err:
        decode_base64("abc", "face_images[2]")
    assert err.value.field == "face_images[2]"


def test_schedulers_match_the_library():
    from instantid.schedulers import NAMES

    assert tuple(SCHEDULERS) == tuple(NAMES)


def test_request_bounds_follow_limits():
    args = AppArgs.model_validate({"limits": {"max_steps": 12, "max_num_images": 2, "max_side": 512}})
    model = build_models(args).GenerateRequest
    props = model.model_json_schema()["properties"]
    assert props["steps"]["maximum"] == 12 and props["num_images"]["maximum"] == 2
    width = next(s for s in props["width"]["anyOf"] if s.get("type") == "integer")
    assert width["maximum"] == 512 and props["width"]["default"] is None  # absent: the pose canvas's size
    # the client-side model uses the default limits and any model name
    GenerateRequest(identity_id="id_" + "a" * 32, base_model="anything", steps=100)



def test_a_crashing_route_still_answers_json(tmp_path, monkeypatch):
    import deployments.ingress.service as service

    def boom(self):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(service.GenerationService, "model_list", boom)
    resp = make_client(tmp_path).get("/v1/models")
    assert_error(resp, 500, "internal")
    assert "secret" not in resp.text and "RuntimeError" not in resp.text


def test_deadline_cancels_and_answers_504(tmp_path):
    import asyncio

    from deployments.ingress.context import RequestContext

    core = GenerationService(AppArgs.model_validate({"identity_store": str(tmp_path)}), FakeFace(), FakeGenerator())

    class Pending:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    async def main():
        ctx = RequestContext(route="t")
        pending = Pending()
        ctx.pending.append(pending)
        with pytest.raises(ServiceError) as err:
            await core.within_deadline(ctx, asyncio.sleep(5), 0.05)
        return err.value, pending

    err, pending = asyncio.run(main())
    assert (err.status, err.code) == (504, "timeout") and pending.cancelled


def test_device_queue_merges_compatible_waiting_jobs_fifo():
    import asyncio

    from deployments.generator.deployment import Generator

    def job(name, width=64, loras=None, model="m", guidance_scale=5.0):
        return GenerationTask(model=model, embedding=np.zeros(512, np.float32), kps=np.zeros((5, 2), np.float32),
                              canvas=(64, 64), width=width, height=64, steps=2, loras=loras or {}, id=name,
                              guidance_scale=guidance_scale)

    gen = Generator.func_or_class.__new__(Generator.func_or_class)
    gen.args = AppArgs.model_validate({"batch": {"max_batch_size": 3}})
    loop = asyncio.new_event_loop()
    try:
        # "i" is unguided (guidance 1: no CFG copy), which the pipeline refuses to mix with guided rows (422);
        # "c" is guided at another strength, which a batch can mix
        jobs = [job("a"), job("i", guidance_scale=1.0), job("b", width=128), job("c", guidance_scale=3.0),
                job("d", loras={"x": 1.0}), job("e", model="other"), job("f"), job("g"), job("h"),
                job("j", guidance_scale=0.5)]
        jobs[6].cancelled = True
        gen._queue = [(j, loop.create_future()) for j in jobs]
        first = [j.id for j, _ in gen._next_group()]
        assert first == ["a", "c", "g"]  # "f" was cancelled; at most max_batch_size
        assert [j.id for j, _ in gen._queue] == ["i", "b", "d", "e", "h", "j"]
        assert [j.id for j, _ in gen._next_group()] == ["i", "j"]  # both unguided
        assert [j.id for j, _ in gen._next_group()] == ["b"]
        assert [j.id for j, _ in gen._next_group()] == ["d"]
        assert [j.id for j, _ in gen._next_group()] == ["e"]
        assert [j.id for j, _ in gen._next_group()] == ["h"]
        assert gen._next_group() == [] and gen._queue == []
    finally:
        loop.close()


def test_negative_prompt_absent_and_empty_stay_distinct(tmp_path):
    """Absent means SDXL's zero negative embedding; an empty string is encoded, as in the library and CLI: the
    task the Generator receives keeps the difference."""
    tasks = []
    generator = FakeGenerator()
    plain = generator.denoise.fn

    async def recording(task):
        tasks.append(task)
        return await plain(task)

    generator.denoise = FakeMethod(recording)
    client = make_client(tmp_path, generator=generator)
    for fields in ({}, {"negative_prompt": None}, {"negative_prompt": ""}, {"negative_prompt": "blurry"}):
        assert client.post("/v1/generate", json=generate_request(**fields)).status_code == 200
    assert [t.negative_prompt for t in tasks] == [None, None, "", "blurry"]

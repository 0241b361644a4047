"""Abandoned work stops: a request past its deadline or cancelled stops denoising at the next step (in a merged
batch only its rows), and a request that cannot finish before its deadline is refused up front."""

from __future__ import annotations

import time

import numpy as np
import pytest

from deployments.config import AppArgs
from deployments.generator.deployment import GeneratorCore
from deployments.messages import BackendHealth, GenerationTask
from serve_helpers import app_args, assert_error
from fakes import generate_request, make_client


# -- the cost budget (no cluster) -------------------------------------------------------------------------
def _costed_client(tmp_path, **spec):
    return make_client(tmp_path, models=[{"name": "sdxl", "base_model": "x", **spec}], request_timeout_s=60)


def test_a_request_too_costly_for_its_deadline_is_refused_up_front(tmp_path):
    client = _costed_client(tmp_path, megapixel_steps_per_s=10.0, overhead_s=2.0)
    # 1024^2 x 30 steps x 4 images = 126 megapixel-steps: ~15 s here, fits 60 s but not a 10 s timeout_s
    big = generate_request(width=1024, height=1024, steps=30, num_images=4)
    assert client.post("/v1/generate", json=big).status_code == 200
    err = assert_error(client.post("/v1/generate", json={**big, "timeout_s": 10}), 422, "too_costly", field="steps")
    assert [d["field"] for d in client.post("/v1/generate", json={**big, "timeout_s": 10}).json()["error"][
        "details"]] == ["width", "height", "steps", "num_images"]
    for name in ("width", "height", "steps", "num_images", "'sdxl'"):
        assert name in err["message"]
    # 2048^2 x 100 steps x 4 images: ~168 s, more than the service's 60 s deadline
    assert_error(client.post("/v1/generate", json=generate_request(width=2048, height=2048, steps=100, num_images=4)),
                 422, "too_costly")


def test_a_photo_shaped_request_is_costed_at_the_size_it_gets(tmp_path):
    """No width/height: the output takes the pose canvas's size, known after face analysis; the budget applies
    to that size (a 422, never a 500 from the missing size)."""
    client = _costed_client(tmp_path, megapixel_steps_per_s=0.01, overhead_s=0.0)
    request = {k: v for k, v in generate_request(steps=100, num_images=4, timeout_s=10).items() if k not in ("width", "height")}
    assert_error(client.post("/v1/generate", json=request), 422, "too_costly", field="steps")


def test_no_speed_configured_means_no_cost_check(tmp_path):
    client = _costed_client(tmp_path)
    # 1677 megapixel-steps in 30 s: refused with any speed under 56 megapixel-steps/s, accepted without one
    assert client.post("/v1/generate", json=generate_request(width=2048, height=2048, steps=100, num_images=4,
                                                     output_format="jpeg", timeout_s=30)).status_code == 200


# -- the Generator's step callback (in process, the tiny bundle) --------------------------------------------
@pytest.fixture(scope="module")
def core(tiny_bundle):
    models = [{"name": "tiny", "base_model": str(tiny_bundle / "sdxl")}]
    args = AppArgs.model_validate(app_args(tiny_bundle, models=models, instantid=str(tiny_bundle / "instantid"),
                                           device="cpu", dtype="float32"))
    core = GeneratorCore(args)
    return core, core.load("tiny")


def _job(seed: int, **fields) -> GenerationTask:
    kps = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=np.float32)
    return GenerationTask(model="tiny", embedding=np.random.RandomState(seed).randn(512).astype(np.float32), kps=kps,
                          canvas=(64, 64), width=64, height=64, steps=8, seed=seed, guidance_scale=1.0, **fields)


def _count_steps(model) -> list[int]:
    rows: list[int] = []
    model.pipe.unet.register_forward_pre_hook(lambda _, args: rows.append(int(args[0].shape[0])))
    return rows


def test_past_its_deadline_a_job_leaves_the_batch_and_the_other_goes_on(core):
    generator, model = core
    rows = _count_steps(model)
    try:
        alone = generator.predict(model, [_job(2)])[0]
        rows.clear()
        late = _job(1, deadline=time.time() - 1)  # already past when the first step ends
        out = generator.predict(model, [late, _job(2)])
    finally:
        model.pipe.unet._forward_pre_hooks.clear()
    assert getattr(out[0], "status", None) == 504 and out[0].code == "timeout"
    assert rows == [2] + [1] * 7  # its row left after the first step; the other ran all 8
    assert np.abs(out[1].images[0].astype(int) - alone.images[0].astype(int)).max() <= 2


def test_a_cancelled_batch_stops_at_the_next_step(core):
    generator, model = core
    rows = _count_steps(model)
    job = _job(3)
    job.steps = 50
    try:
        original = model.pipe.unet.forward

        def forward(*a, **kw):  # the caller goes away during the second step
            if len(rows) == 2:
                job.cancelled = True
            return original(*a, **kw)

        model.pipe.unet.forward = forward
        out = generator.predict(model, [job])
    finally:
        model.pipe.unet.forward = original
        model.pipe.unet._forward_pre_hooks.clear()
    assert out[0].status == 504 and len(rows) == 2  # 2 of 50 steps ran


# -- end to end: a short deadline frees the Generator for the next request ----------------------------------
@pytest.mark.serve
def test_after_a_504_the_generator_is_free_again_soon(http, identity_id, tiny_request):
    """Before: the abandoned 256x256 x 4 images x 50 steps kept the Generator busy for minutes after its 504, and
    the next request waited behind it. Now it stops at the next step."""
    started = time.perf_counter()
    slow = http.post("/v1/generate", json=tiny_request(identity_id=identity_id, width=256, height=256, steps=50,
                                                      num_images=4, timeout_s=3))
    assert_error(slow, 504, "timeout")
    assert time.perf_counter() - started < 15
    t0 = time.perf_counter()
    nxt = http.post("/v1/generate", json=tiny_request(identity_id=identity_id), timeout=90)
    assert nxt.status_code == 200, nxt.text
    print(f"\n504 after {t0 - started:.1f}s; the next request answered in {time.perf_counter() - t0:.1f}s")
    assert time.perf_counter() - t0 < 60, "the next request waited behind abandoned work"


# -- /readyz asks the backends ---------------------------------------------------------------------------------
class _Readiness:
    def __init__(self, answer=None, hang=False):
        async def ready():
            if hang:
                import asyncio

                await asyncio.sleep(30)
            return answer

        from fakes import FakeGenerator, FakeMethod

        self.inner = FakeGenerator()
        self.denoise = self.inner.denoise
        self.ready = FakeMethod(ready)

    def options(self, **_):
        return self


def test_readyz_is_503_when_the_generator_is_stuck_or_not_answering(tmp_path):
    stuck = make_client(tmp_path / "a", generator=_Readiness(
        BackendHealth(False, "busy finishing a denoising step of abandoned work")))
    resp = stuck.get("/readyz")
    assert resp.status_code == 503 and "abandoned work" in resp.json()["message"], resp.text
    silent = make_client(tmp_path / "b", generator=_Readiness(hang=True))
    t0 = time.perf_counter()
    resp = silent.get("/readyz")
    assert resp.status_code == 503 and "no answer" in resp.json()["message"], resp.text
    assert time.perf_counter() - t0 < 10
    fine = make_client(tmp_path / "c", generator=_Readiness(BackendHealth(True)))
    assert fine.get("/readyz").status_code == 200


def test_the_generator_reports_abandoned_work_on_its_device():
    from deployments.generator.deployment import Generator

    gen = Generator.func_or_class.__new__(Generator.func_or_class)
    gen.ready_error, gen._waiting = None, set()
    gen._running = [_job(1, deadline=time.time() - 1)]
    assert gen.ready().ready is False and "abandoned" in gen.ready().error
    gen._running = [_job(1, deadline=time.time() - 1), _job(2)]  # someone still waits: the work is useful
    assert gen.ready().ready is True


@pytest.mark.serve
def test_after_a_client_disconnects_the_generator_is_free_again_soon(serve_env, identity_id, tiny_request):
    """A client that gives up after 3 s (its connection closed) stops its generation too (Serve cancels the
    request, the Ingress cancels its backend call, the Generator drops the job at the next step): the next
    request does not wait for the abandoned one (which would run until its 60 s deadline)."""
    import httpx

    body = tiny_request(identity_id=identity_id, width=256, height=256, steps=50, num_images=4)
    with httpx.Client(base_url=serve_env.base_url, timeout=3) as impatient, pytest.raises(httpx.TimeoutException):
        impatient.post("/v1/generate", json=body)
    t0 = time.perf_counter()
    with httpx.Client(base_url=serve_env.base_url, timeout=90) as client:
        nxt = client.post("/v1/generate", json=tiny_request(identity_id=identity_id))
    assert nxt.status_code == 200, nxt.text
    print(f"\nafter the disconnect, the next request answered in {time.perf_counter() - t0:.1f}s")
    assert time.perf_counter() - t0 < 40, "the next request waited behind abandoned work"

"""Jobs on Ray Serve with a real redis-server: progress from the tiny pipeline's steps, cancel of one request in
a denoising batch while the other goes on, and a job that outlives the Ingress replica that ran it. The OpenAI
and Replicate surfaces are driven by their real clients against the same application."""

from __future__ import annotations

import time

import httpx
import pytest

from redis_server import redis_server
from serve_helpers import app_args, sse_events
from test_faults import _replica_actors, _wait

pytestmark = pytest.mark.serve

APP, PREFIX = "jobs", "/jobsapp"
WEBHOOK_SECRET = "serve-test-secret"


@pytest.fixture(scope="module")
def jobs_app(serve_env, tmp_path_factory):
    from ray import serve

    from deployments.app import bind
    from deployments.tiny_profile import resolve_args

    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        args = app_args(serve_env.tiny, identity_store=str(tmp_path_factory.mktemp("ids")), request_timeout_s=300,
                        batch={"max_batch_size": 4, "batch_wait_timeout_s": 0.3},
                        jobs={"redis_url": url, "lease_s": 3, "progress_interval_s": 0.1},
                        limits={"max_body_bytes": 20_000_000, "max_image_pixels": 1500 * 1500, "max_steps": 50,
                                "min_side": 64, "max_side": 1024})
        env = {"runtime_env": {"env_vars": {"INSTANTID_WEBHOOK_SECRET": WEBHOOK_SECRET}}}
        app = bind(resolve_args(args), {
            "Ingress": {"ray_actor_options": {"num_cpus": 0.1, **env}, "health_check_period_s": 1},
            "FaceAnalyzer": {"ray_actor_options": {"num_cpus": 0.1}},
            "Generator": {"ray_actor_options": {"num_cpus": 0.5}, "health_check_period_s": 1},
        })
        started = time.perf_counter()
        serve.run(app, name=APP, route_prefix=PREFIX)
        print(f"\njobs app up in {time.perf_counter() - started:.1f}s")
        try:
            with httpx.Client(base_url=serve_env.base_url + PREFIX, timeout=60) as client:
                yield client
        finally:
            if APP in serve.status().applications:
                serve.delete(APP)


def _poll(http, job_id, until=("succeeded", "failed", "canceled"), timeout=90.0) -> tuple[dict, list]:
    """The job once its status is in ``until``, and the (status, step) pairs seen on the way."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        resp = http.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        job = resp.json()
        seen.append((job["status"], (job.get("progress") or {}).get("step")))
        if job["status"] in until:
            return job, seen
        assert time.monotonic() < deadline, seen[-5:]
        time.sleep(0.05)


def test_a_job_reports_denoising_progress_and_ends_with_the_images(jobs_app, face_b64):
    body = {"face_images": [face_b64], "width": 256, "height": 256, "steps": 30, "seed": 5}
    resp = jobs_app.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job, seen = _poll(jobs_app, resp.json()["id"])
    assert job["status"] == "succeeded", job
    steps = sorted({s for status, s in seen if status == "running" and s})
    print(f"\nprogress steps seen: {steps}")
    assert len(steps) >= 2 and steps[0] < 30, steps  # updates while denoising, not only at the end
    assert job["progress"] == {"step": 30, "total": 30}
    sync = jobs_app.post("/v1/generate", json=body).json()
    assert job["result"]["images"] == sync["images"]  # the same seed gives the /v1/generate images
    assert job["result"]["request_id"] == job["id"]


def test_a_1024_job_of_4_images_and_its_events_through_the_proxy(jobs_app, face_b64, serve_env):
    """The largest output this app allows (1024², 4 images: 12 MB of arrays, streamed back by reference, ~MBs
    of PNG in the Redis record), watched through Server-Sent Events over HAProxy; then the job metrics."""
    import base64
    import io

    from PIL import Image

    body = {"face_images": [face_b64], "width": 1024, "height": 1024, "steps": 2, "num_images": 4, "seed": 3,
            "guidance_scale": 1.0}
    job = jobs_app.post("/v1/jobs", json=body).json()
    with jobs_app.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=300) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    names = [n for n, _ in events]
    assert names[-1] == "done" and "progress" in names, names
    steps = [e.get("progress", {}).get("step") for n, e in events if n == "progress" and e["status"] == "running"]
    print(f"\n1024² x4 job: events {names}, steps {steps}")
    final = events[-1][1]
    assert final["status"] == "succeeded", final.get("error")
    assert len(final["result"]["images"]) == 4
    for image in final["result"]["images"]:
        with Image.open(io.BytesIO(base64.b64decode(image))) as decoded:
            assert decoded.size == (1024, 1024)
    expected = ["ray_instantid_jobs_total{", 'status="succeeded"', "ray_instantid_job_queue_wait_seconds_bucket",
                "ray_instantid_job_first_step_seconds_bucket"]
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(serve_env.metrics_url, timeout=10).text
        missing = [m for m in expected if m not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, missing


def test_cancel_stops_one_request_of_a_batch_and_the_other_finishes(jobs_app, face_b64):
    body = {"face_images": [face_b64], "width": 256, "height": 256, "steps": 50, "seed": 1}
    first, second = (jobs_app.post("/v1/jobs", json=body).json() for _ in range(2))
    _poll(jobs_app, first["id"], until=("running",))
    deadline = time.monotonic() + 60
    while (jobs_app.get(f"/v1/jobs/{first['id']}").json().get("progress") or {}).get("step", 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    resp = jobs_app.post(f"/v1/jobs/{first['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "canceled", resp.text
    stopped_at = resp.json()["progress"]["step"]
    assert stopped_at < 50, resp.json()
    other, _ = _poll(jobs_app, second["id"])
    assert other["status"] == "succeeded", other
    assert other["result"]["timings"]["batch_size"] == 2  # they shared a batch; it went on without the first
    assert "result" not in jobs_app.get(f"/v1/jobs/{first['id']}").json()


def test_a_job_outlives_the_ingress_replica_running_it(jobs_app, face_b64):
    import ray

    body = {"face_images": [face_b64], "width": 256, "height": 256, "steps": 50, "seed": 2}
    job = jobs_app.post("/v1/jobs", json=body).json()
    _poll(jobs_app, job["id"], until=("running",))
    names = _replica_actors(APP, "Ingress")
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    t0 = time.monotonic()
    _wait(lambda: any(n not in names for n in _replica_actors(APP, "Ingress")), 60, "a new Ingress replica")

    def finished():
        try:
            return jobs_app.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    _wait(finished, 90, "the job to be taken over and finish")
    print(f"\njob finished {time.monotonic() - t0:.1f}s after its Ingress replica was killed")
    assert jobs_app.get(f"/v1/jobs/{job['id']}").json()["result"]["images"]


# -- the OpenAI and Replicate surfaces, with their real clients --------------------------------------------
def test_openai_sdk_edit_at_768x1024_and_its_error_classes(jobs_app, face_photo, blank_b64):
    import base64
    import io

    import openai
    from PIL import Image

    base = str(jobs_app.base_url).rstrip("/")
    client = openai.OpenAI(base_url=f"{base}/openai/v1", api_key="unused", max_retries=0)
    photo = face_photo.read_bytes()
    out = client.images.edit(image=[("a.jpg", photo, "image/jpeg"), ("b.jpg", photo, "image/jpeg")],
                             prompt="a watercolor portrait", n=2, size="768x1024", model="tiny",
                             extra_body={"steps": 2, "seed": 9})
    assert len(out.data) == 2 and out.model_extra["seed"] == 9
    for item in out.data:
        with Image.open(io.BytesIO(base64.b64decode(item.b64_json))) as image:
            assert image.size == (768, 1024)
    with pytest.raises(openai.UnprocessableEntityError) as caught:  # a photo with no face
        client.images.edit(image=("blank.png", base64.b64decode(blank_b64), "image/png"), prompt="x",
                           size="256x256", extra_body={"steps": 2})
    assert caught.value.body["code"] == "no_face" and caught.value.body["param"] == "image"
    with pytest.raises(openai.UnprocessableEntityError) as caught:  # a bad size
        client.images.edit(image=("a.jpg", photo, "image/jpeg"), prompt="x", size="1000x3000")
    assert caught.value.body["param"] == "size"


def test_replicate_client_run_and_cancel(jobs_app, face_b64):
    import io

    import replicate
    from PIL import Image

    client = replicate.Client(api_token="unused", base_url=f"{str(jobs_app.base_url).rstrip('/')}/replicate")
    face = "data:image/jpeg;base64," + face_b64
    outputs = client.run("instantid/tiny", input={"image": face, "width": 256, "height": 256, "steps": 2,
                                                  "num_images": 2})
    assert len(outputs) == 2
    for item in outputs:
        with Image.open(io.BytesIO(item.read())) as image:
            assert image.size == (256, 256)
    prediction = client.predictions.create(model="instantid/tiny", input={"face_images": [face], "width": 512,
                                                                          "height": 512, "steps": 50}, wait=False)
    deadline = time.monotonic() + 60
    while prediction.progress is None:
        assert time.monotonic() < deadline, prediction.status
        time.sleep(0.1)
        prediction.reload()
    prediction.cancel()
    assert prediction.status == "canceled" and prediction.progress.current < 50, prediction.logs


# -- the handle client -------------------------------------------------------------------------------------
def test_handle_client_jobs(jobs_app, face_photo):
    import asyncio

    from deployments.client import InstantIDClient, ServiceError

    client = InstantIDClient(APP, timeout_s=120)
    job = client.submit_job(face_images=[face_photo], width=64, height=64, steps=2, seed=6)
    assert job["status"] in ("queued", "running") and job["id"].startswith("job_")
    done = client.wait_job(job["id"], timeout_s=60)
    assert done["status"] == "succeeded" and done["result"]["seed"] == 6
    assert client.job(job["id"])["result"]["images"] == done["result"]["images"]
    long = client.submit_job(face_images=[face_photo], width=512, height=512, steps=50)
    with pytest.raises(ServiceError) as err:
        client.wait_job(long["id"], timeout_s=0.5)
    assert err.value.status == 504
    assert client.cancel_job(long["id"])["status"] == "canceled"
    with pytest.raises(ServiceError) as err:
        client.submit_job(face_images=[b"not an image"], width=64, height=64)
    assert err.value.status == 400 and err.value.code == "invalid_image"

    async def run_async():
        submitted = await client.submit_job_async(face_images=[face_photo], width=64, height=64, steps=2)
        assert (await client.job_async(submitted["id"]))["id"] == submitted["id"]
        return await client.wait_job_async(submitted["id"], timeout_s=60)

    assert asyncio.run(run_async())["status"] == "succeeded"


def test_zz_a_job_whose_generator_replica_dies_runs_again(jobs_app, face_b64):
    """Last in this file: it kills the jobs app's Generator."""
    import ray

    from test_faults import _replaced

    body = {"face_images": [face_b64], "width": 512, "height": 512, "steps": 50, "seed": 8}
    job = jobs_app.post("/v1/jobs", json=body).json()
    deadline = time.monotonic() + 60
    while (jobs_app.get(f"/v1/jobs/{job['id']}").json().get("progress") or {}).get("step", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [old] = _replica_actors(APP, "Generator")
    ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)
    t0 = time.monotonic()
    done, seen = _poll(jobs_app, job["id"], timeout=180)
    print(f"\nGenerator killed mid-job: the job ended {done['status']} {time.monotonic() - t0:.1f}s later")
    assert done["status"] == "succeeded", done
    assert done["result"]["images"] and done["progress"] == {"step": 50, "total": 50}
    _wait(lambda: _replaced(APP, "Generator", old), 60, "a new Generator replica")

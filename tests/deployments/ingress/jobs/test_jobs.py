"""The job core and /v1/jobs without a cluster: fake FaceAnalyzer and a fake streaming Generator, the in-process
store and a real redis-server (tests/deployments/ingress/jobs/test_jobs_serve.py runs it all on Ray Serve)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from starlette.testclient import TestClient

from deployments.config import AppArgs
from deployments.ingress.http.app import build_http_app
from deployments.ingress.service import GenerationService
from deployments.ingress.jobs.webhooks import SIGNATURE_HEADER, verify
from redis_server import redis_url  # noqa: F401  (a fixture)
from serve_helpers import assert_error, png_bytes, sse_events
from fakes import FakeFace, StreamingGenerator, job_request

SECRET = "s3cret-for-tests"


def client_for(tmp_path, generator=None, **jobs):
    args = AppArgs.model_validate({"identity_store": str(tmp_path / "ids"), "jobs": jobs})
    core = GenerationService(args, FakeFace(), generator or StreamingGenerator(),
                             status_fn=lambda: {"FaceAnalyzer": "HEALTHY", "Generator": "HEALTHY"})
    return TestClient(build_http_app(core), raise_server_exceptions=False), core


def wait_status(client, job_id, statuses=("succeeded", "failed", "canceled"), timeout=20.0, **headers):
    deadline = time.monotonic() + timeout
    while True:
        resp = client.get(f"/v1/jobs/{job_id}", headers=headers)
        assert resp.status_code == 200, resp.text
        if resp.json()["status"] in statuses or time.monotonic() > deadline:
            return resp.json()
        time.sleep(0.05)


@pytest.fixture(params=["memory", "redis"])
def store_args(request):
    if request.param == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url"), "key_prefix": f"t{time.monotonic_ns()}:"}


def test_a_job_runs_with_progress_and_ends_with_the_generate_response(tmp_path, store_args):
    client, _ = client_for(tmp_path, StreamingGenerator(step_s=0.2), progress_interval_s=0.05, **store_args)
    with client:
        resp = client.post("/v1/jobs", json=job_request(num_images=2))
        assert resp.status_code == 202, resp.text
        job = resp.json()
        assert job["status"] in ("queued", "running") and job["id"].startswith("job_")  # a worker may be quick
        assert job["created_at"].endswith("Z")
        assert resp.headers["location"] == job["urls"]["get"] == f"http://testserver/v1/jobs/{job['id']}"
        assert job["urls"]["cancel"].endswith("/cancel") and job["urls"]["events"].endswith("/events")
        seen = set()
        while (now := client.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
            if now["status"] == "running" and now["progress"]["total"]:
                seen.add(now["progress"]["step"])
            time.sleep(0.05)
        assert now["status"] == "succeeded", now
        assert seen and min(seen) < 4, seen  # progress seen while it ran
        assert now["progress"] == {"step": 4, "total": 4}
        result = now["result"]
        assert len(result["images"]) == 2 and result["seed"] == 3 and result["request_id"] == job["id"]
        assert result["width"] == 64 and now["started_at"] >= now["created_at"] and "completed_at" in now


def test_bad_input_is_refused_at_once_and_no_job_is_made(tmp_path):
    client, core = client_for(tmp_path)
    with client:
        assert_error(client.post("/v1/jobs", json=job_request(steps=0)), 422, "invalid_parameter", field="steps")
        assert_error(client.post("/v1/jobs", json=job_request(face_images=["%%%"])), 400, "invalid_base64")
        assert_error(client.post("/v1/jobs", json=job_request(webhook="https://evil.example/x")), 422,
                     "invalid_parameter", field="webhook")
        assert core.jobs.store.jobs == {}
        assert_error(client.get("/v1/jobs/job_" + "0" * 24), 404, "not_found")
        assert_error(client.get("/v1/jobs/../../etc"), 404, "not_found")


def test_multipart_jobs_take_the_generate_form(tmp_path):
    client, _ = client_for(tmp_path)
    with client:
        resp = client.post("/v1/jobs", data={"width": "64", "height": "64", "steps": "2"},
                           files=[("face_images", ("a.png", png_bytes(), "image/png"))])
        assert resp.status_code == 202, resp.text
        assert wait_status(client, resp.json()["id"])["status"] == "succeeded"


def test_cancel_stops_a_running_job_and_a_queued_one_never_starts(tmp_path, store_args):
    generator = StreamingGenerator(step_s=0.3)
    client, _ = client_for(tmp_path, generator, concurrency=1, **store_args)
    with client:
        running = client.post("/v1/jobs", json=job_request(steps=50)).json()
        queued = client.post("/v1/jobs", json=job_request(steps=50)).json()
        wait_status(client, running["id"], ("running",))
        assert client.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "canceled"
        t0 = time.monotonic()
        resp = client.post(f"/v1/jobs/{running['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "canceled", resp.text
        assert time.monotonic() - t0 < 3
        assert generator.streams[0].cancelled  # the Generator call was cancelled: its rows stop
        time.sleep(0.5)
        assert generator.calls == 1  # the queued one never reached the Generator
        assert "result" not in client.get(f"/v1/jobs/{running['id']}").json()


def test_past_max_queued_submit_is_503_queue_full_with_retry_after(tmp_path, store_args):
    client, _ = client_for(tmp_path, StreamingGenerator(step_s=0.5), concurrency=1, max_queued=1, **store_args)
    with client:
        first = client.post("/v1/jobs", json=job_request(steps=20)).json()
        wait_status(client, first["id"], ("running",))
        assert client.post("/v1/jobs", json=job_request()).status_code == 202  # waits in the queue
        resp = client.post("/v1/jobs", json=job_request())
        assert_error(resp, 503, "queue_full")
        assert int(resp.headers["retry-after"]) >= 1


def test_events_stream_progress_then_the_final_job(tmp_path):
    client, _ = client_for(tmp_path, StreamingGenerator(step_s=0.15), progress_interval_s=0.05)
    with client:
        job = client.post("/v1/jobs", json=job_request(steps=6)).json()
        with client.stream("GET", job["urls"]["events"]) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = sse_events(resp)
        names = [n for n, _ in events]
        assert names[-1] == "done" and set(names[:-1]) == {"progress"}, names
        steps = [e["progress"]["step"] for n, e in events if n == "progress" and e["status"] == "running"]
        assert steps == sorted(steps) and len(set(steps)) >= 2, steps
        assert events[-1][1]["status"] == "succeeded" and events[-1][1]["result"]["images"]


def test_a_dead_generator_replica_is_retried_once_then_the_job_fails_saying_why(tmp_path):
    client, _ = client_for(tmp_path, StreamingGenerator(die=1))
    with client:
        job = wait_status(client, client.post("/v1/jobs", json=job_request()).json()["id"])
        assert job["status"] == "succeeded", job
    generator = StreamingGenerator(die=5)
    client, _ = client_for(tmp_path, generator)
    with client:
        job = wait_status(client, client.post("/v1/jobs", json=job_request()).json()["id"], timeout=30)
        assert job["status"] == "failed" and job["error"]["code"] == "unavailable", job
        assert "failed 2 times" in job["error"]["message"]
        assert generator.calls == 2


def test_jobs_are_scoped_to_their_api_key(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("INSTANTID_API_KEY_HASHES", ",".join(
        f"{name}:{hashlib.sha256(name.encode() + b'-key').hexdigest()}" for name in ("alice", "bob")))
    args = AppArgs.model_validate({"identity_store": str(tmp_path / "ids"),
                                   "auth": {"enabled": True, "burst": 100, "rate_per_s": 100}})
    core = GenerationService(args, FakeFace(), StreamingGenerator(),
                             status_fn=lambda: {"FaceAnalyzer": "HEALTHY", "Generator": "HEALTHY"})
    with TestClient(build_http_app(core), raise_server_exceptions=False) as client:
        alice, bob = ({"Authorization": f"Bearer {n}-key"} for n in ("alice", "bob"))
        assert_error(client.post("/v1/jobs", json=job_request()), 401, "unauthorized")
        job = client.post("/v1/jobs", json=job_request(), headers=alice).json()
        assert wait_status(client, job["id"], **alice)["status"] == "succeeded"
        assert_error(client.get(f"/v1/jobs/{job['id']}", headers=bob), 404, "not_found")
        assert_error(client.post(f"/v1/jobs/{job['id']}/cancel", headers=bob), 404, "not_found")


# -- webhooks ---------------------------------------------------------------------------------------------
class _Receiver(BaseHTTPRequestHandler):
    received: list = []
    fail_first = 0

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers), body))
        if type(self).fail_first:
            type(self).fail_first -= 1
            self.send_response(503)
        else:
            self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_a_webhook_gets_the_final_job_signed_after_a_retry(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANTID_WEBHOOK_SECRET", SECRET)
    _Receiver.received, _Receiver.fail_first = [], 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client, _ = client_for(tmp_path, webhooks={"allowed_hosts": [f"127.0.0.1:{server.server_port}"],
                                                   "allow_http": True, "backoff_s": 0.1})
        url = f"http://127.0.0.1:{server.server_port}/hook"
        with client:
            job = client.post("/v1/jobs", json=job_request(webhook=url)).json()
            assert wait_status(client, job["id"])["status"] == "succeeded"
            deadline = time.monotonic() + 10
            while len(_Receiver.received) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert len(_Receiver.received) == 2  # one 503, then delivered
        (h1, b1), (h2, body) = _Receiver.received
        assert h1["X-InstantID-Webhook-Id"] == h2["X-InstantID-Webhook-Id"]
        assert verify(SECRET, body, h2[SIGNATURE_HEADER])
        assert not verify("wrong", body, h2[SIGNATURE_HEADER])
        final = json.loads(body)
        assert final["id"] == job["id"] and final["status"] == "succeeded" and final["result"]["images"]
    finally:
        server.shutdown()


def test_webhook_urls_outside_the_allowlist_or_without_a_secret_are_refused(tmp_path, monkeypatch):
    client, _ = client_for(tmp_path, webhooks={"allowed_hosts": ["hooks.example.com", "*.corp.example"]})
    with client:
        # no secret configured yet
        assert_error(client.post("/v1/jobs", json=job_request(webhook="https://hooks.example.com/x")), 422,
                     "invalid_parameter", field="webhook")
        monkeypatch.setenv("INSTANTID_WEBHOOK_SECRET", SECRET)
        for url in ("http://hooks.example.com/x", "https://169.254.169.254/latest", "https://corp.example/x",
                    "https://hooks.example.com.evil.io/x", "ftp://hooks.example.com/", "not a url"):
            assert_error(client.post("/v1/jobs", json=job_request(webhook=url)), 422, "invalid_parameter",
                         field="webhook")
        for url in ("https://hooks.example.com/x", "https://a.corp.example/y"):
            assert client.post("/v1/jobs", json=job_request(webhook=url)).status_code == 202


def test_redis_down_is_503_storage_unavailable_never_a_500(tmp_path):
    from deployments.ray_env import free_port

    client, _ = client_for(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with client:
        resp = client.post("/v1/jobs", json=job_request())
        assert_error(resp, 503, "storage_unavailable")
        assert resp.headers["retry-after"]
        assert_error(client.get("/v1/jobs/job_" + "0" * 24), 503, "storage_unavailable")


def test_a_prepared_generation_survives_the_record_with_people_controls_and_img2img():
    """What a job keeps for another replica to run (``pack``, JSON, ``unpack``) is the same task: arrays, the
    img2img upload's bytes, several people and control maps included."""
    import json as json_

    from deployments.ingress.jobs.service import pack, unpack
    from deployments.messages import GenerationTask, PersonPlacement
    from deployments.messages import PreparedGeneration

    rng = np.random.default_rng(0)
    people = [PersonPlacement(embedding=rng.standard_normal(512).astype(np.float32),
                              kps=rng.uniform(0, 500, (5, 2)).astype(np.float32), region=(0, 0, 256, 512)),
              PersonPlacement(embedding=rng.standard_normal(512).astype(np.float32),
                              kps=rng.uniform(0, 500, (5, 2)).astype(np.float32), region=(256, 0, 512, 512))]
    control_map = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    task = GenerationTask(model="tiny", embedding=None, kps=None, canvas=None, width=512, height=512, steps=3,
                          prompt="two friends", seed=5, people=people, init_image=png_bytes(),
                          controls=[{"name": "canny", "map": control_map, "scale": 0.5, "start": 0.0, "end": 1.0}])
    prepared = PreparedGeneration(task=task, face={"source": "people[0]"}, embedding=None,
                                  people=[{"source": "people[0]"}, {"source": "people[1]"}])
    back = unpack(json_.loads(json_.dumps(pack(prepared))))
    assert back.task.init_image == task.init_image and back.people == prepared.people
    assert np.array_equal(back.task.controls[0]["map"], control_map) and back.task.controls[0]["name"] == "canny"
    for mine, theirs in zip(back.task.people, people):
        assert np.array_equal(mine.embedding, theirs.embedding) and np.array_equal(mine.kps, theirs.kps)
        assert mine.region == theirs.region and mine.embedding.dtype == np.float32
    assert (back.task.width, back.task.steps, back.task.seed, back.task.prompt) == (512, 3, 5, "two friends")

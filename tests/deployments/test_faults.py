"""Fault injection on the local cluster: replicas killed mid-request, S3 stopped during identity writes, a
model that fails to load. Every wait is bounded; every answer must be a clean JSON status, never a hang.

These run on their own applications (``faults`` at /faults, ``broken`` at /broken), so killing replicas
never disturbs the shared ``instantid`` app the other test files use; both are deleted afterwards.
"""

from __future__ import annotations

import concurrent.futures as cf
import socket
import time

import httpx
import pytest

from serve_helpers import app_args, assert_error

from deployments.ray_env import free_port

pytestmark = pytest.mark.serve

FAULTS_BUCKET = "instantid-test-faults"
CLEAN_5XX = {503, 504}


def _wait(predicate, timeout_s: float, what: str, period_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(period_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def _replica_actors(app: str, deployment: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]


def _kill(app: str, deployment: str) -> str:
    import ray

    names = _replica_actors(app, deployment)
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def _replaced(app: str, deployment: str, old: str) -> bool:
    from ray import serve

    names = _replica_actors(app, deployment)
    status = serve.status().applications[app].deployments[deployment].status
    return bool(names) and old not in names and str(getattr(status, "value", status)) == "HEALTHY"


class PrivateS3:
    """A moto server of the faults app's own (same in-process backend as the session's), stoppable."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        _wait(lambda: _reachable(self.port), 10, "moto to listen")

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None


def _reachable(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def faults_app(serve_env):
    import boto3
    from ray import serve

    from deployments.app import bind
    from deployments.tiny_profile import resolve_args

    s3 = PrivateS3()
    s3.start()
    boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket=FAULTS_BUCKET)
    args = app_args(serve_env.tiny, identity_store=f"s3://{FAULTS_BUCKET}/ids", request_timeout_s=30,
                    batch={"max_batch_size": 4, "batch_wait_timeout_s": 0.0})
    env = {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": s3.endpoint}}}
    app = bind(resolve_args(args), {
        "Ingress": {"ray_actor_options": {"num_cpus": 0.1, **env}},
        "FaceAnalyzer": {"ray_actor_options": {"num_cpus": 0.1}, "health_check_period_s": 1},
        "Generator": {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 4,
                      "max_queued_requests": 8, "health_check_period_s": 1},
    })
    started = time.perf_counter()
    serve.run(app, name="faults", route_prefix="/faults")
    print(f"\nfaults app up in {time.perf_counter() - started:.1f}s")
    try:
        with httpx.Client(base_url=serve_env.base_url + "/faults", timeout=60) as client:
            yield client, s3
    finally:
        if "faults" in serve.status().applications:
            serve.delete("faults")
        s3.stop()


def test_face_analyzer_down_is_503_then_recovers(faults_app, face_b64, tiny_request):
    http, _ = faults_app
    assert http.post("/v1/identities", json={"face_images": [face_b64]}).status_code == 201
    old = _kill("faults", "FaceAnalyzer")
    statuses = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:  # while Serve replaces it: only clean 503s (or 201 once it is back)
        resp = http.post("/v1/identities", json={"face_images": [face_b64]}, timeout=40)
        statuses.append(resp.status_code)
        if resp.status_code == 201:
            break
        assert_error(resp, resp.status_code, resp.json()["error"]["code"])
        assert resp.status_code in CLEAN_5XX, resp.text
        if resp.status_code == 503:
            assert int(resp.headers["retry-after"]) >= 1
        time.sleep(0.5)
    print(f"\nFaceAnalyzer killed: statuses until recovery {statuses} in {time.monotonic() - t0:.1f}s")
    assert statuses[-1] == 201, statuses
    assert 503 in statuses or len(statuses) == 1, statuses  # a 503 while down (or Serve was faster)
    _wait(lambda: _replaced("faults", "FaceAnalyzer", old), 30, "a new FaceAnalyzer replica")


def test_generator_killed_mid_request(faults_app, face_b64, tiny_request):
    """8 concurrent generations, the Generator replica killed while they run: every request ends (bounded
    client timeout) with 200 or a clean JSON 503/504; after Serve replaces the replica, requests succeed."""
    http, _ = faults_app
    body = tiny_request(face_images=[face_b64], steps=50, num_images=2)
    warm = http.post("/v1/generate", json=body)
    assert warm.status_code == 200, warm.text

    def one(_):
        started = time.monotonic()
        try:
            resp = http.post("/v1/generate", json=body, timeout=45)
        except httpx.TimeoutException:
            return "hung", time.monotonic() - started
        return resp, time.monotonic() - started

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(8)]
        time.sleep(2.0)  # the first batch is denoising
        old = _kill("faults", "Generator")
        results = [f.result(timeout=60) for f in futures]
    statuses = [r if r == "hung" else r.status_code for r, _ in results]
    print(f"\nGenerator killed mid-request: statuses {statuses}, "
          f"max latency {max(t for _, t in results):.1f}s")
    assert "hung" not in statuses
    for resp, _ in results:
        if resp.status_code != 200:
            err = assert_error(resp, resp.status_code, resp.json()["error"]["code"])
            assert resp.status_code in CLEAN_5XX, resp.text
            assert err["code"] in ("unavailable", "timeout"), err
    assert any(s != 200 for s in statuses), statuses  # the kill did hit in-flight requests
    _wait(lambda: _replaced("faults", "Generator", old), 60, "a new Generator replica")
    after = [http.post("/v1/generate", json=body, timeout=45).status_code for _ in range(3)]
    assert after == [200, 200, 200], after


def test_s3_down_during_identity_writes(faults_app, face_b64):
    """Identity writes while the S3 server is stopped and restarted: each answer is 201 or a clean 503
    storage_unavailable; afterwards every identity reported created is readable and complete, and every
    stored object is a complete record (no partial writes)."""
    import json

    import boto3

    http, s3 = faults_app
    created, outcomes = [], []

    def write():
        resp = http.post("/v1/identities", json={"face_images": [face_b64]}, timeout=40)
        outcomes.append(resp.status_code)
        if resp.status_code == 201:
            created.append(resp.json()["identity_id"])
        else:
            err = assert_error(resp, 503, "storage_unavailable")
            assert int(resp.headers["retry-after"]) >= 1 and "Traceback" not in err["message"]
        return resp.status_code

    for _ in range(3):
        assert write() == 201
    s3.stop()
    t0 = time.monotonic()
    down = [write() for _ in range(3)]
    down_s = (time.monotonic() - t0) / 3
    reads_down = http.get(f"/v1/identities/{created[0]}", timeout=40)
    assert_error(reads_down, 503, "storage_unavailable")
    s3.start()
    up = [write() for _ in range(3)]
    print(f"\nS3 stopped: writes {down} (mean {down_s:.1f}s each), restarted: {up}")
    assert down == [503, 503, 503] and up == [201, 201, 201]
    for identity_id in created:
        resp = http.get(f"/v1/identities/{identity_id}", timeout=30)
        assert resp.status_code == 200, resp.text
        record = resp.json()
        assert record["num_photos"] == 1 and len(record["faces"]) == 1 and record["embedding_dim"] == 512
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=FAULTS_BUCKET, Prefix="ids/").get("Contents", [])]
    assert {f"ids/{i}.json" for i in created} <= set(keys)
    for key in keys:  # every object present is a whole record
        record = json.loads(client.get_object(Bucket=FAULTS_BUCKET, Key=key)["Body"].read())
        assert {"identity_id", "embedding", "pose", "faces"} <= set(record)


def test_directory_store_failure_is_503_and_leaves_no_partial_record(tmp_path, face_photo, monkeypatch):
    """The directory backend failing at its commit (disk full at the rename): 503 storage_unavailable,
    no partial record and no temporary file left behind; the earlier record is intact."""
    import errno
    import os

    from serve_helpers import b64
    from fakes import make_client

    client = make_client(tmp_path)
    store = tmp_path / "ids"
    photo = {"face_images": [b64(face_photo.read_bytes())]}
    first = client.post("/v1/identities", json=photo)
    assert first.status_code == 201
    before = sorted(os.listdir(store))

    def disk_full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("deployments.ingress.identities.os.replace", disk_full)
    assert_error(client.post("/v1/identities", json=photo), 503, "storage_unavailable")
    monkeypatch.undo()
    assert sorted(os.listdir(store)) == before
    assert client.get(f"/v1/identities/{first.json()['identity_id']}").status_code == 200


def test_model_that_fails_to_load_is_not_ready_with_the_reason(serve_env, face_b64, tiny_request):
    """A models entry and a face pack pointing at missing directories: /readyz says not ready and why (no
    traceback), and requests get a clean 503 at once instead of hanging (FaceAnalyzer down -> 503)."""
    from ray import serve
    from ray.serve.api import _run

    from deployments.app import bind
    from deployments.tiny_profile import resolve_args

    args = app_args(serve_env.tiny, models=[{"name": "broken", "base_model": "/nonexistent/sdxl-missing"}],
                    face_model="/nonexistent/face-pack-missing", request_timeout_s=20)
    app = bind(resolve_args(args), {
        "Ingress": {"ray_actor_options": {"num_cpus": 0.05}},
        "FaceAnalyzer": {"ray_actor_options": {"num_cpus": 0.05}},
        "Generator": {"ray_actor_options": {"num_cpus": 0.05}, "health_check_period_s": 1},
    })
    _run(app, name="broken", route_prefix="/broken", _blocking=False)
    try:
        with httpx.Client(base_url=serve_env.base_url + "/broken", timeout=30) as http:
            def readyz():
                try:
                    resp = http.get("/readyz")
                except httpx.HTTPError:
                    return None
                message = resp.json().get("message", "") if resp.status_code == 503 else ""
                if "sdxl-missing" in message and "face-pack-missing" in message:
                    return resp
                return None

            try:
                resp = _wait(readyz, 50, "/readyz to report the failed model")
            except AssertionError:
                info = serve.status().applications["broken"].deployments
                print({n: (d.status, d.message) for n, d in info.items()}, http.get("/readyz").text)
                raise
            body = resp.json()
            print(f"\n/readyz of the broken app: {body}")
            assert body["ready"] is False and body["deployments"]["Generator"] != "HEALTHY"
            assert "Generator" in body["message"] and "/nonexistent/sdxl-missing" in body["message"]
            assert "Traceback" not in resp.text and 'File "' not in resp.text
            assert "FaceAnalyzer: face model not loaded" in body["message"]
            started = time.monotonic()
            gen = http.post("/v1/generate", json=tiny_request(face_images=[face_b64]), timeout=40)
            err = assert_error(gen, 503, "unavailable")
            assert "Generator" in err["message"] and "Traceback" not in gen.text
            assert int(gen.headers["retry-after"]) >= 1
            # FaceAnalyzer down -> 503 on the routes that need it, at once (not after the 20 s deadline)
            ident = http.post("/v1/identities", json={"face_images": [face_b64]}, timeout=40)
            err = assert_error(ident, 503, "unavailable")
            assert "FaceAnalyzer" in err["message"]
            assert time.monotonic() - started < 10
    finally:
        serve.delete("broken")


def test_readiness_reason_is_one_line_without_traceback():
    from deployments.ingress.backends import _reason

    serve_message = ("The deployment failed to start 3 times in a row. Error:\n  File \"generator.py\", line 351\n"
                     "    raise RuntimeError(f\"model not loaded: {self.ready_error}\")\n"
                     "RuntimeError: model not loaded: WeightsError: weights not found: /x does not exist")
    assert _reason(serve_message) == "model not loaded: WeightsError: weights not found: /x does not exist"
    assert _reason("Traceback (most recent call last):\n  File ...") == ""


def test_zz_redeploy_drains_in_flight_requests(faults_app, face_b64, tiny_request):
    """Graceful shutdown: requests in flight when the app is deleted still complete (200), bounded.
    (Named zz so it runs last in this file: it removes the faults app.)"""
    from ray import serve

    http, _ = faults_app
    body = tiny_request(face_images=[face_b64], steps=50, num_images=2)
    with cf.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(http.post, "/v1/generate", json=body, timeout=60) for _ in range(3)]
        time.sleep(2.0)  # in flight, in the Generator
        started = time.monotonic()
        serve.delete("faults", _blocking=True)
        deleted_s = time.monotonic() - started
        results = [f.result(timeout=90) for f in futures]
    print(f"\ndrain on delete: statuses {[r.status_code for r in results]}, delete took {deleted_s:.1f}s")
    assert [r.status_code for r in results] == [200, 200, 200], [r.text[:200] for r in results]

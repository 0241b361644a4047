"""Issue 26 without a cluster: a shared store or a refusal to start; fair use (calls in flight per key, per-key job
caps, the result-size cap); a caller's own jobs listed, on /v1/jobs, on the Replicate surface (with the real
``replicate`` client) and through the handle; stored results served as stored."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import httpx
import pytest
import yaml
from starlette.testclient import TestClient

from deployments.config import AppArgs
from deployments.ingress.http.app import build_http_app
from deployments.ingress.jobs.service import check_shared_store, max_replicas_of
from deployments.ingress.jobs.store import Limits, MemoryJobStore, RawJSON, RedisJobStore, make_job_store
from deployments.ingress.service import GenerationService
from fakes import FakeFace, StreamingGenerator, job_request
from serve_helpers import assert_error

ROOT = Path(__file__).resolve().parents[4]
KEYS = {"alice": "alice-key-" + "1" * 20, "bob": "bob-key-" + "2" * 20}


def client_for(tmp_path, generator=None, monkeypatch=None, auth: dict | None = None, **args):
    if auth is not None:
        monkeypatch.setenv("SCALE_KEYS", ",".join(f"{n}:{hashlib.sha256(k.encode()).hexdigest()}"
                                                  for n, k in KEYS.items()))
        args["auth"] = {"enabled": True, "key_hashes_env": "SCALE_KEYS", "rate_per_s": 1000, "burst": 1000, **auth}
    app_args = AppArgs.model_validate({"identity_store": str(tmp_path / "ids"), **args})
    core = GenerationService(app_args, FakeFace(), generator or StreamingGenerator(),
                             status_fn=lambda: {"FaceAnalyzer": "HEALTHY", "Generator": "HEALTHY"})
    return core, build_http_app(core)


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


# -- 1. a shared store or a refusal ---------------------------------------------------------------------------
class Auto:
    def __init__(self, max_replicas):
        self.max_replicas = max_replicas


class DeploymentConfig:
    def __init__(self, num_replicas=None, autoscaling_config=None):
        self.num_replicas, self.autoscaling_config = num_replicas, autoscaling_config


def test_max_replicas_of_a_serve_deployment_config():
    from ray.serve._private.config import DeploymentConfig as Real
    from ray.serve.config import AutoscalingConfig

    assert max_replicas_of(Real(num_replicas=1)) == 1
    assert max_replicas_of(Real(num_replicas=3)) == 3
    assert max_replicas_of(Real(autoscaling_config=AutoscalingConfig(min_replicas=2, max_replicas=4))) == 4
    assert max_replicas_of(DeploymentConfig(autoscaling_config={"max_replicas": 5})) == 5


def test_several_ingress_replicas_with_jobs_in_memory_refuse_to_start():
    jobs = AppArgs().jobs
    with pytest.raises(ValueError) as refused:
        check_shared_store(jobs, MemoryJobStore(), 2)
    message = str(refused.value)
    assert "jobs.redis_url" in message and "jobs.redis_url_env" in message and "$INSTANTID_REDIS_URL" in message
    assert "jobs.enabled: false" in message
    check_shared_store(jobs, MemoryJobStore(), 1)  # one replica: its memory is the one store
    check_shared_store(jobs, RedisJobStore("redis://127.0.0.1:1/0"), 4)  # shared: fine (not connected here)
    check_shared_store(AppArgs.model_validate({"jobs": {"enabled": False}}).jobs, MemoryJobStore(), 4)


def _profile(name: str) -> tuple[AppArgs, dict]:
    config = yaml.safe_load((ROOT / "serve" / f"{name}.yaml").read_text())
    app = config["applications"][0]
    deployments = {d["name"]: d for d in app.get("deployments", [])}
    return AppArgs.model_validate(app["args"]), deployments.get("Ingress", {})


def test_production_takes_the_redis_url_from_the_env_and_refuses_without_it(monkeypatch):
    args, ingress = _profile("production")
    replicas = max_replicas_of(DeploymentConfig(ingress.get("num_replicas"), ingress.get("autoscaling_config")))
    assert replicas > 1 and args.jobs.enabled and args.jobs.redis_url is None  # no URL (password) in the file
    monkeypatch.delenv(args.jobs.redis_url_env, raising=False)
    with pytest.raises(ValueError, match="jobs.redis_url"):
        check_shared_store(args.jobs, make_job_store(args.jobs), replicas)
    monkeypatch.setenv(args.jobs.redis_url_env, "redis://redis.example:6379/0")
    store = make_job_store(args.jobs)
    assert isinstance(store, RedisJobStore)
    check_shared_store(args.jobs, store, replicas)


def test_the_local_profile_keeps_jobs_in_memory(monkeypatch):
    args, ingress = _profile("local")
    monkeypatch.delenv(args.jobs.redis_url_env, raising=False)
    replicas = max_replicas_of(DeploymentConfig(ingress.get("num_replicas"), ingress.get("autoscaling_config")))
    assert replicas == 1
    check_shared_store(args.jobs, make_job_store(args.jobs), replicas)


def test_production_policy_kwargs_are_the_app_s_own_facts():
    """The Generator's backlog policy counts per replica what one replica batches, on the jobs' own keys."""
    config = yaml.safe_load((ROOT / "serve" / "production.yaml").read_text())
    app = config["applications"][0]
    generator = next(d for d in app["deployments"] if d["name"] == "Generator")
    policy = generator["autoscaling_config"]["policy"]
    assert policy["policy_function"] == "deployments.ingress.jobs.autoscaling:BacklogPolicy"
    kwargs = policy["policy_kwargs"]
    assert kwargs["per_replica"] == app["args"]["batch"]["max_batch_size"]
    assert kwargs["key_prefix"] == app["args"]["jobs"]["key_prefix"]
    assert kwargs["redis_url_env"] == app["args"]["jobs"]["redis_url_env"]


def test_jobs_disabled_has_no_job_routes(tmp_path):
    _, app = client_for(tmp_path, jobs={"enabled": False})
    with TestClient(app) as client:
        assert_error(client.post("/v1/jobs", json=job_request()), 404, "not_found")
        assert client.post("/replicate/v1/predictions", json={"input": {}}).status_code == 404
        assert client.get("/healthz").status_code == 200


# -- 2. fair use ----------------------------------------------------------------------------------------------
def test_one_key_cannot_hold_every_slot(tmp_path, monkeypatch):
    """Replicate creates with ``Prefer: wait`` hold their call; past auth.max_in_flight a key's next call is a
    429 with Retry-After at once, while another key and the probes are served; the slots come back."""
    _, app = client_for(tmp_path, StreamingGenerator(step_s=0.1), monkeypatch, auth={"max_in_flight": 2})
    slow = {"input": job_request(steps=20)}

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            waits = [asyncio.ensure_future(c.post("/replicate/v1/predictions", json=slow,
                                                  headers={**bearer("alice"), "Prefer": "wait=10"}))
                     for _ in range(2)]
            await asyncio.sleep(0.5)  # both are holding their slot now
            third = await c.post("/replicate/v1/predictions", json=slow, headers={**bearer("alice"), "Prefer": "wait"})
            other = await c.get("/v1/jobs", headers=bearer("alice"))
            bob = await c.get("/v1/jobs", headers=bearer("bob"))
            probe = await c.get("/healthz")
            held = dict(_slots(app).held)
            done = await asyncio.gather(*waits)
            return third, other, bob, probe, held, done

    third, other, bob, probe, held, done = asyncio.run(go())
    assert third.status_code == 429 and third.json()["type"] == "too_many_in_flight" and third.headers["retry-after"]
    assert "auth.max_in_flight" in third.json()["detail"]
    assert other.status_code == 429  # the same key on another route: the bound is per key
    assert bob.status_code == 200 and probe.status_code == 200
    assert held == {"alice": 2}
    assert [r.status_code for r in done] == [201, 201]
    assert _slots(app).held == {}  # every slot given back


def _slots(app):
    for middleware in app.user_middleware:
        if middleware.cls.__name__ == "ReleaseSlots":
            return middleware.kwargs["slots"]
    raise AssertionError("no ReleaseSlots middleware")


def test_a_key_s_jobs_in_flight_are_bounded(tmp_path, monkeypatch):
    _, app = client_for(tmp_path, StreamingGenerator(step_s=0.2), monkeypatch, auth={},
                        jobs={"max_active_per_key": 1, "concurrency": 1})
    with TestClient(app) as client:
        assert client.post("/v1/jobs", json=job_request(steps=20), headers=bearer("alice")).status_code == 202
        refused = client.post("/v1/jobs", json=job_request(), headers=bearer("alice"))
        assert_error(refused, 429, "too_many_jobs")
        assert "jobs.max_active_per_key" in refused.json()["error"]["message"] and refused.headers["retry-after"]
        assert client.post("/v1/jobs", json=job_request(), headers=bearer("bob")).status_code == 202


def test_an_inline_result_over_the_cap_is_refused_at_submit_naming_it(tmp_path):
    core, app = client_for(tmp_path, jobs={"max_result_bytes": 2**20})
    with TestClient(app) as client:
        refused = client.post("/v1/jobs", json=job_request(width=512, height=512, num_images=2))
        assert_error(refused, 422, "result_too_large", field="delivery")
        assert "jobs.max_result_bytes (1048576)" in refused.json()["error"]["message"]
        assert core.jobs.store.jobs == {}
        assert client.post("/v1/jobs", json=job_request(width=256, height=256)).status_code == 202  # 262 KB


def test_with_an_output_bucket_a_large_inline_result_goes_to_s3(tmp_path):
    core, app = client_for(tmp_path, jobs={"max_result_bytes": 2**20}, output_bucket="s3://bucket/out")
    with TestClient(app) as client:
        resp = client.post("/v1/jobs", json=job_request(width=512, height=512, num_images=2))
        assert resp.status_code == 202, resp.text
        inputs = asyncio.run(core.jobs.store.inputs(resp.json()["id"]))
        assert inputs["request"]["delivery"] == "s3"


def test_a_stored_result_is_served_as_stored(tmp_path):
    """GET and the done event copy the stored JSON text in: odd spacing and key order survive (a parse and
    re-serialisation would normalise them)."""
    core, app = client_for(tmp_path)
    store = core.jobs.store
    text = '{ "seed" : 5,  "images": ["QUJD"] }'

    async def make():
        await store.submit("job_" + "a" * 24, {"created_at": time.time()}, Limits(10))
        store.queue.clear()
        store.running.append("job_" + "a" * 24)
        store.jobs["job_" + "a" * 24]["status"] = "running"
        await store.finish("job_" + "a" * 24, "succeeded", 60, result=RawJSON(text))
    asyncio.run(make())
    with TestClient(app) as client:
        resp = client.get("/v1/jobs/job_" + "a" * 24)
        assert resp.status_code == 200 and text in resp.text and resp.json()["result"] == json.loads(text)
        with client.stream("GET", "/v1/jobs/job_" + "a" * 24 + "/events") as events:
            body = "".join(events.iter_text())
        assert "event: done" in body and text in body


# -- 2. listing -----------------------------------------------------------------------------------------------
def test_v1_jobs_lists_the_callers_own_jobs_newest_first_by_pages(tmp_path, monkeypatch):
    _, app = client_for(tmp_path, monkeypatch=monkeypatch, auth={}, jobs={"concurrency": 1})
    with TestClient(app) as client:
        mine = [client.post("/v1/jobs", json=job_request(), headers=bearer("alice")).json()["id"] for _ in range(5)]
        client.post("/v1/jobs", json=job_request(), headers=bearer("bob"))
        first = client.get("/v1/jobs?limit=2", headers=bearer("alice")).json()
        second = client.get(f"/v1/jobs?limit=2&cursor={first['next_cursor']}", headers=bearer("alice")).json()
        third = client.get(f"/v1/jobs?limit=2&cursor={second['next_cursor']}", headers=bearer("alice")).json()
        listed = [j["id"] for page in (first, second, third) for j in page["jobs"]]
        assert listed == mine[::-1] and "next_cursor" not in third
        assert all("result" not in j and j["urls"]["cancel"].endswith("/cancel") for j in first["jobs"])
        # an orphan found by listing can be cancelled
        orphan = third["jobs"][0]["id"]
        assert client.post(f"/v1/jobs/{orphan}/cancel", headers=bearer("alice")).json()["status"] in (
            "canceled", "succeeded")
        assert len(client.get("/v1/jobs", headers=bearer("bob")).json()["jobs"]) == 1
        assert_error(client.get("/v1/jobs?cursor=bm9wZQ", headers=bearer("alice")), 422, "invalid_parameter",
                     field="cursor")
        assert client.get("/v1/jobs?limit=0", headers=bearer("alice")).status_code == 422


def test_replicate_predictions_list_with_the_replicate_client(tmp_path, monkeypatch):
    import socket
    import threading

    import replicate
    import uvicorn

    _, app = client_for(tmp_path, monkeypatch=monkeypatch, auth={})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        client = replicate.Client(api_token=KEYS["alice"], base_url=f"http://127.0.0.1:{port}/replicate")
        made = [client.predictions.create(model="instantid/sdxl", input=job_request(), wait=False).id
                for _ in range(22)]
        page = client.predictions.list()
        assert [p.id for p in page.results] == made[::-1][:20] and page.next and page.previous is None
        rest = client.predictions.list(page.next)
        assert [p.id for p in rest.results] == made[::-1][20:] and rest.next is None
        assert replicate.Client(api_token=KEYS["bob"], base_url=f"http://127.0.0.1:{port}/replicate"
                                ).predictions.list().results == []
    finally:
        server.should_exit = True
        thread.join(10)


# -- 3. workers claim what the Generators can batch --------------------------------------------------------------
def test_workers_run_as_many_jobs_as_the_published_capacity(tmp_path):
    """With the policy's capacity (here 2) the workers run 2 jobs at once whatever jobs.concurrency (1) says;
    without one they fall back to jobs.concurrency."""
    generator = StreamingGenerator(step_s=0.05)
    core, app = client_for(tmp_path, generator, jobs={"concurrency": 1, "progress_interval_s": 0.05})
    store = core.jobs.store
    store.capacity_value = 2
    peak = {"running": 0}
    with TestClient(app) as client:
        ids = [client.post("/v1/jobs", json=job_request(steps=10)).json()["id"] for _ in range(5)]
        deadline = time.monotonic() + 30
        while not all(store.jobs[j]["status"] == "succeeded" for j in ids):
            peak["running"] = max(peak["running"], len(store.running))
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert peak["running"] == 2
        store.capacity_value = None
        ids = [client.post("/v1/jobs", json=job_request(steps=10)).json()["id"] for _ in range(3)]
        peak["running"] = 0
        while not all(store.jobs[j]["status"] == "succeeded" for j in ids):
            peak["running"] = max(peak["running"], len(store.running))
            assert time.monotonic() < deadline + 30
            time.sleep(0.01)
        assert peak["running"] == 1


def test_serve_accepts_the_production_policy():
    """serve/production.yaml as Serve parses it: the Generator's policy is our class, instantiated with its
    kwargs as the controller does (no cluster)."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / "production.yaml").read_text()))
    generator = next(d for d in config.applications[0].deployments if d.name == "Generator")
    auto = AutoscalingConfig(**generator.autoscaling_config)
    policy = _resolve_policy_callable(auto.policy)
    assert type(policy).__name__ == "BacklogPolicy" and policy.per_replica == 4

"""One local Ray cluster per test session, shared by every file in tests/deployments.

Two applications run on it, both on the tiny bundle (64x64, 2 steps):
- ``instantid`` at ``/``: two models (``tiny`` with a LoRA, ``tiny-b``) and a one-model LRU per replica,
  identities in a directory, S3 delivery to the loopback moto server, a small Generator queue
  (max_ongoing 4 + max_queued 6) so backpressure is reachable;
- ``instantid-s3`` at ``/s3``: identities on the loopback S3 server; its Generator scales from zero
  (min_replicas 0, initial 0), so it costs nothing unless a test generates there.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from serve_helpers import IDENTITY_BUCKET, OUTPUT_BUCKET, app_args, assert_error, b64, png_bytes

from deployments.ray_env import free_port


@dataclass
class ServeEnv:
    base_url: str
    s3_base_url: str
    metrics_url: str
    args: dict
    identity_dir: Path
    tiny: Path
    haproxy_dir: Path


@pytest.fixture(scope="session")
def serve_env(tiny_bundle, s3_server, tmp_path_factory):
    import boto3
    import ray
    from ray import serve
    from ray.serve.api import RunTarget

    from deployments.app import bind
    from deployments.tiny_profile import resolve_args
    from deployments.ray_env import LOCAL_ENV, private_haproxy_env

    for bucket in (OUTPUT_BUCKET, IDENTITY_BUCKET):
        boto3.client("s3").create_bucket(Bucket=bucket)
    identity_dir = tmp_path_factory.mktemp("identities")
    http_port, metrics_port = free_port(), free_port()
    # Ray workers inherit this process's environment: HF_HUB_OFFLINE, AWS_ENDPOINT_URL and credentials, and
    # the cluster environment the app ships with (HAProxy ingress), its ports and files private to this run
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    os.environ.update(LOCAL_ENV)
    haproxy_env, haproxy_dir = private_haproxy_env()
    os.environ.update(haproxy_env)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})

    main_args = app_args(tiny_bundle, identity_store=str(identity_dir), output_bucket=f"s3://{OUTPUT_BUCKET}/out")
    s3_args = app_args(tiny_bundle, identity_store=f"s3://{IDENTITY_BUCKET}/identities")
    main = bind(resolve_args(main_args), {
        "Ingress": {"ray_actor_options": {"num_cpus": 0.1}},
        "FaceAnalyzer": {"ray_actor_options": {"num_cpus": 0.5}},
        "Generator": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 4, "max_queued_requests": 6},
    })
    s3_app = bind(resolve_args(s3_args), {
        "Ingress": {"ray_actor_options": {"num_cpus": 0.1}},
        "FaceAnalyzer": {"ray_actor_options": {"num_cpus": 0.25}},
        "Generator": {"ray_actor_options": {"num_cpus": 1},
                      "autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1}},
    })
    started = time.perf_counter()
    serve.run_many([RunTarget(main, name="instantid", route_prefix="/"),
                    RunTarget(s3_app, name="instantid-s3", route_prefix="/s3")])
    print(f"\nserve apps up in {time.perf_counter() - started:.1f}s")
    try:
        yield ServeEnv(base_url=f"http://127.0.0.1:{http_port}", s3_base_url=f"http://127.0.0.1:{http_port}/s3",
                       metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", args=main_args,
                       identity_dir=identity_dir, tiny=tiny_bundle, haproxy_dir=haproxy_dir)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(haproxy_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def http(serve_env):
    import httpx

    with httpx.Client(base_url=serve_env.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def face_b64(face_photo) -> str:
    return b64(face_photo.read_bytes())


@pytest.fixture(scope="session")
def blank_b64() -> str:
    """A uniform image: the tiny detector finds no face in it."""
    return b64(png_bytes())


@pytest.fixture(scope="session")
def identity_id(http, face_b64) -> str:
    """One stored identity, shared by tests that generate from an identity."""
    resp = http.post("/v1/identities", json={"face_images": [face_b64]})
    assert resp.status_code == 201, resp.text
    return resp.json()["identity_id"]


@pytest.fixture()
def tiny_request():
    def make(**fields) -> dict:
        return {"width": 64, "height": 64, "steps": 2, "seed": 7, **fields}

    return make


@pytest.fixture(scope="session")
def check_error():
    return assert_error

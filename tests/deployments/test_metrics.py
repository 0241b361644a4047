"""Metrics are exported the Ray way: scraped from the node's metrics export port, names ray_instantid_*."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.serve

EXPECTED = [
    'ray_instantid_requests_total{',
    'route="/v1/generate"',
    "ray_instantid_request_seconds_bucket",
    'ray_instantid_stage_seconds_bucket',
    'stage="face_analysis"',
    'stage="denoise"',
    'stage="vae_decode"',
    'stage="encode"',
    "ray_instantid_batch_size_bucket",
    "ray_instantid_generator_queue_length",
    "ray_instantid_faces_not_found_total",
    "ray_instantid_model_load_seconds_bucket",
    "ray_instantid_model_loads_total",
]


def test_prometheus_metrics_are_exported(http, serve_env, face_b64, blank_b64, tiny_request):
    assert http.post("/v1/generate", json=tiny_request(face_images=[face_b64])).status_code == 200
    assert http.post("/v1/generate", json=tiny_request(face_images=[blank_b64])).status_code == 422
    deadline = time.monotonic() + 60
    missing = EXPECTED
    while time.monotonic() < deadline:
        text = httpx.get(serve_env.metrics_url, timeout=10).text
        missing = [m for m in EXPECTED if m not in text]
        if not missing:
            break
        time.sleep(1)
    assert not missing, missing
    statuses = [line for line in text.splitlines()
                if line.startswith("ray_instantid_requests_total{") and 'route="/v1/generate"' in line]
    assert any('status="200"' in s for s in statuses) and any('status="422"' in s for s in statuses)


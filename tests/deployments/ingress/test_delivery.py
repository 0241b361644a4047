"""Output delivery to S3 (deployments/ingress/delivery.py) against a black-holed S3: a server that accepts the
connection and never answers. The upload must fail within the S3 client's bounded waits as the documented
503 storage_unavailable, never hold the request until its deadline (504)."""

from __future__ import annotations

import socket
import time

import pytest
from serve_helpers import assert_error
from fakes import generate_request, make_client

from instantid import weights


@pytest.fixture()
def black_hole(monkeypatch):
    """An S3 endpoint that completes TCP handshakes (the kernel does, from the listen backlog) and never sends a
    byte back; boto3 pointed at it with test credentials."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{sock.getsockname()[1]}")
    for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    yield
    sock.close()


def test_a_black_holed_s3_is_a_fast_503_not_a_504(tmp_path, monkeypatch, black_hole):
    # the factory's waits, shortened so the test is quick; production's are 3 s / 20 s (instantid/weights.py)
    monkeypatch.setattr(weights, "S3_CONNECT_TIMEOUT_S", 1.0, raising=False)
    monkeypatch.setattr(weights, "S3_READ_TIMEOUT_S", 1.0, raising=False)
    client = make_client(tmp_path, output_bucket="s3://outputs/p")
    started = time.perf_counter()
    resp = client.post("/v1/generate", json=generate_request(delivery="s3", timeout_s=30))
    elapsed = time.perf_counter() - started
    err = assert_error(resp, 503, "storage_unavailable")
    assert resp.headers["retry-after"] == "5", err
    assert elapsed < 20, f"the upload held the request {elapsed:.1f}s"


def test_every_s3_client_has_bounded_waits(black_hole):
    """The one factory is what the identity store, delivery and weight downloads use."""
    from deployments.ingress.delivery import S3Delivery
    from deployments.ingress.identities import S3Store

    for c in (weights.s3_client(), S3Store("s3://ids/p").client, S3Delivery("s3://outputs/p", 60).client):
        assert c.meta.config.connect_timeout == weights.S3_CONNECT_TIMEOUT_S
        assert c.meta.config.read_timeout == weights.S3_READ_TIMEOUT_S
        assert c.meta.config.retries["total_max_attempts"] == weights.S3_MAX_RETRIES + 1

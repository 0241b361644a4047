"""Shared fixtures: offline hub, a loopback S3 server, and the tiny random-weight bundle.

Every test runs with HF_HUB_OFFLINE=1: nothing may reach a hub. S3 tests talk to a real S3-protocol server
(moto's server mode) bound to 127.0.0.1, never to in-process mocks.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from deployments.ray_env import free_port

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL and points boto3 at it for the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the loopback S3 server; yields its name."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid()}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The tiny bundle (SDXL dir, InstantID dir, antelopev2-style face pack), built once per session."""
    from instantid.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    make_tiny(root)
    return root


@pytest.fixture(scope="session")
def face_photo() -> Path:
    """A real face photo shipped inside the insightface wheel."""
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection beyond loopback (a hub or a download) fails the test."""
    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1") and not str(host).startswith("/"):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)

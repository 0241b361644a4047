"""The OpenAI Images and Replicate surfaces driven by the real ``openai`` and ``replicate`` clients, against the
Ingress app with fake backends served by uvicorn on loopback (test_jobs_serve.py drives them on Ray Serve)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import socket
import threading
import time

import pytest
from PIL import Image

from deployments.config import AppArgs
from deployments.errors import ServiceError
from deployments.ingress.http.app import build_http_app
from deployments.ingress.service import GenerationService
from serve_helpers import b64, png_bytes
from fakes import CountingGenerator, FakeFace, StreamingGenerator

openai = pytest.importorskip("openai")
replicate = pytest.importorskip("replicate")

KEY = "alice-key"


@contextlib.contextmanager
def served(generator=None, **overrides):
    import uvicorn

    args = AppArgs.model_validate({"identity_store": "/tmp/unused-ids", "models": [
        {"name": "tiny", "base_model": "x"}, {"name": "tiny-b", "base_model": "y"}], **overrides})
    core = GenerationService(args, FakeFace(), generator or CountingGenerator(),
                             status_fn=lambda: {"FaceAnalyzer": "HEALTHY", "Generator": "HEALTHY"})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_http_app(core), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", core
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture()
def keyed(monkeypatch):
    monkeypatch.setenv("INSTANTID_API_KEY_HASHES", f"alice:{hashlib.sha256(KEY.encode()).hexdigest()}")
    return {"auth": {"enabled": True, "burst": 1000, "rate_per_s": 1000}}


# -- OpenAI ----------------------------------------------------------------------------------------------
def test_openai_images_edit_with_several_photos(keyed):
    with served(**keyed) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/openai/v1", api_key=KEY)
        photo = png_bytes()
        out = client.images.edit(image=[("a.png", photo, "image/png"), ("b.png", photo, "image/png")],
                                 prompt="a portrait", n=2, size="768x1024", model="tiny-b",
                                 extra_body={"steps": 3, "seed": 11, "negative_prompt": "blurry"})
        assert len(out.data) == 2
        for item in out.data:
            with Image.open(io.BytesIO(base64.b64decode(item.b64_json))) as image:
                assert image.size == (768, 1024) and image.format == "PNG"
        extra = out.model_extra
        assert extra["seed"] == 11 and extra["model"] == "tiny-b" and extra["width"] == 768 and out.size == "768x1024"
        single = client.images.edit(image=("a.png", photo, "image/png"), prompt="x", size="auto",
                                    output_format="jpeg", extra_body={"num_inference_steps": 2})
        assert len(single.data) == 1 and base64.b64decode(single.data[0].b64_json)[:2] == b"\xff\xd8"


def test_openai_errors_are_the_sdk_error_classes(keyed):
    with served(**keyed) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/openai/v1", api_key=KEY, max_retries=0)
        photo = ("a.png", png_bytes(), "image/png")
        for size in ("100x100", "banana", "64x99999"):
            with pytest.raises(openai.UnprocessableEntityError) as caught:
                client.images.edit(image=photo, prompt="x", size=size)
            assert caught.value.body["param"] == "size" and caught.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            client.images.edit(image=photo, prompt="x", model="dall-e-3")
        assert caught.value.body["param"] == "model"
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.edit(image=("a.png", b"not an image", "image/png"), prompt="x")
        assert caught.value.body["code"] == "invalid_image"
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            client.images.generate(prompt="x")  # no identity_id
        assert caught.value.body["param"] == "image"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/openai/v1", api_key="wrong", max_retries=0).images.edit(
                image=photo, prompt="x")


def test_openai_sdk_never_retries_a_500_on_its_own():
    generator = CountingGenerator(fail=RuntimeError("boom"))
    with served(generator) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/openai/v1", api_key="unused", max_retries=3)
        with pytest.raises(openai.InternalServerError) as caught:
            client.images.edit(image=("a.png", png_bytes(), "image/png"), prompt="x", size="64x64")
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert generator.calls == 1  # without the header the SDK would have run it 4 times
    generator = CountingGenerator(fail=ServiceError(503, "queue_full", "full", headers={"Retry-After": "1"}))
    with served(generator) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/openai/v1", api_key="unused", max_retries=1)
        with pytest.raises(openai.APIStatusError) as caught:
            client.images.edit(image=("a.png", png_bytes(), "image/png"), prompt="x", size="64x64")
        assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "1"
        assert generator.calls == 2  # a 503 ran nothing: the SDK may retry it, after Retry-After


def test_openai_images_generate_for_a_stored_identity():
    with served() as (url, core):
        import httpx

        ident = httpx.post(f"{url}/v1/identities", json={"face_images": [b64(png_bytes())]}).json()["identity_id"]
        client = openai.OpenAI(base_url=f"{url}/openai/v1", api_key="unused")
        out = client.images.generate(prompt="a knight", n=1, size="512x512", response_format="b64_json",
                                     extra_body={"identity_id": ident, "steps": 2})
        assert len(out.data) == 1 and out.model_extra["width"] == 512


# -- Replicate -------------------------------------------------------------------------------------------
def _input(**fields):
    return {"face_images": ["data:image/png;base64," + b64(png_bytes())], "width": 64, "height": 64,
            "steps": 2, "seed": 4, **fields}


def test_replicate_run_returns_file_outputs(keyed):
    with served(**keyed) as (url, _):
        client = replicate.Client(api_token=KEY, base_url=f"{url}/replicate")
        outputs = client.run("instantid/tiny-b", input=_input(num_images=2, output_format="webp"))
        assert len(outputs) == 2
        for item in outputs:
            with Image.open(io.BytesIO(item.read())) as image:
                assert image.format == "WEBP" and image.size == (64, 64)


def test_replicate_create_poll_progress_and_cancel():
    generator = CountingGenerator(step_s=0.2)
    with served(generator, jobs={"progress_interval_s": 0.05}) as (url, _):
        client = replicate.Client(api_token="unused", base_url=f"{url}/replicate")
        prediction = client.predictions.create(model="instantid/tiny", input=_input(steps=40), wait=False)
        assert prediction.status == "starting" and prediction.model == "instantid/tiny"
        assert prediction.input["face_images"] == "<1 image>"
        deadline = time.monotonic() + 20
        while prediction.progress is None or prediction.progress.current < 2:
            assert time.monotonic() < deadline, prediction.logs
            time.sleep(0.1)
            prediction.reload()
        assert prediction.status == "processing" and prediction.progress.total == 40
        prediction.cancel()
        assert prediction.status == "canceled" and prediction.output is None
        assert generator.stream.streams[-1].cancelled
        done = client.predictions.create(model="instantid/tiny", input=_input(), wait=False)
        done.wait()
        assert done.status == "succeeded" and done.output[0].startswith("data:image/png;base64,")
        assert done.progress.percentage == 1.0 and done.metrics["predict_time"] >= 0


def test_replicate_errors_are_replicate_errors(keyed):
    from replicate.exceptions import ModelError, ReplicateError

    with served(**keyed) as (url, _):
        client = replicate.Client(api_token=KEY, base_url=f"{url}/replicate")
        with pytest.raises(ReplicateError) as caught:
            client.run("someone/else", input=_input())
        assert caught.value.status == 404
        with pytest.raises(ReplicateError) as caught:
            client.run("instantid/tiny", input=_input(steps=0))
        assert caught.value.status == 422 and "steps" in caught.value.detail
        with pytest.raises(ReplicateError) as caught:
            replicate.Client(api_token="wrong", base_url=f"{url}/replicate").run("instantid/tiny", input=_input())
        assert caught.value.status == 401
    with served(StreamingGenerator(die=9)) as (url, _):  # a failed job is a failed prediction: ModelError
        with pytest.raises(ModelError) as caught:
            replicate.Client(api_token="x", base_url=f"{url}/replicate").run("instantid/tiny", input=_input())
        assert "failed 2 times" in caught.value.prediction.error

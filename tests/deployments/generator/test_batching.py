"""Throughput features on the local cluster: @serve.batch really batches, @serve.multiplexed switches models."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import time

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.serve


@pytest.fixture()
def generator_stats(serve_env):
    from ray import serve

    handle = serve.get_deployment_handle("Generator", app_name="instantid")
    return lambda: handle.stats.remote().result(timeout_s=60)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def _concurrent(http, bodies: list[dict]):
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: http.post("/v1/generate", json=b), bodies))


def test_concurrent_compatible_requests_share_a_denoising_batch(http, identity_id, tiny_request, generator_stats):
    # one prompt, four seeds: the seed is all that tells the images apart, whatever order Serve gives the batch
    bodies = [tiny_request(identity_id=identity_id, seed=i) for i in range(4)]
    responses = _concurrent(http, bodies)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    sizes = [r.json()["timings"]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    assert generator_stats()["max_batch_size_seen"] > 1
    batched = [_pixels(r.json()["images"][0]) for r in responses]
    assert len({r.json()["images"][0] for r in responses}) == 4  # a seed shared within a batch repeats an image
    # each request keeps its own seed: every batched image equals that request's image generated alone
    for body, image in zip(bodies, batched):
        alone = http.post("/v1/generate", json=body).json()
        assert alone["timings"]["batch_size"] == 1
        assert np.abs(image - _pixels(alone["images"][0])).max() <= 2, body["seed"]  # equal up to float rounding


def test_incompatible_requests_are_not_merged(http, identity_id, tiny_request):
    bodies = [tiny_request(identity_id=identity_id, width=64), tiny_request(identity_id=identity_id, width=128)]
    responses = _concurrent(http, bodies)
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["timings"]["batch_size"] for r in responses] == [1, 1]
    assert [r.json()["width"] for r in responses] == [64, 128]


def test_multiplexing_switches_models_with_lru_eviction(http, identity_id, tiny_request, generator_stats):
    # the test app keeps ONE model per replica: asking for tiny-b loads it and evicts tiny
    before = generator_stats()
    other = http.post("/v1/generate", json=tiny_request(identity_id=identity_id, base_model="tiny-b"))
    assert other.status_code == 200, other.text
    assert other.json()["model"] == "tiny-b"
    middle = generator_stats()
    assert middle["resident_models"] == ["tiny-b"]
    assert middle["model_loads"].get("tiny-b", 0) == before["model_loads"].get("tiny-b", 0) + 1
    assert "model_load_s" in other.json()["timings"]

    back = http.post("/v1/generate", json=tiny_request(identity_id=identity_id))
    assert back.status_code == 200 and back.json()["model"] == "tiny"
    after = generator_stats()
    assert after["resident_models"] == ["tiny"]
    assert after["model_loads"]["tiny"] == middle["model_loads"]["tiny"] + 1
    # a resident model is not reloaded
    again = http.post("/v1/generate", json=tiny_request(identity_id=identity_id))
    assert "model_load_s" not in again.json()["timings"]
    assert generator_stats()["model_loads"] == after["model_loads"]


def test_lora_sets_switch_without_reload(http, identity_id, tiny_request, generator_stats):
    http.post("/v1/generate", json=tiny_request(identity_id=identity_id))  # make sure "tiny" is resident
    loads = generator_stats()["model_loads"]
    plain = http.post("/v1/generate", json=tiny_request(identity_id=identity_id)).json()
    lora = http.post("/v1/generate", json=tiny_request(identity_id=identity_id, loras={"tiny-lora": 1.0})).json()
    plain_again = http.post("/v1/generate", json=tiny_request(identity_id=identity_id)).json()
    assert lora["loras"] == {"tiny-lora": 1.0}
    assert lora["images"] != plain["images"]
    assert plain_again["images"] == plain["images"]
    assert generator_stats()["model_loads"] == loads


def test_requests_queued_behind_a_running_batch_are_merged(http, identity_id, tiny_request):
    # B, C and D arrive 0.3 s apart (beyond the 0.2 s batch window, so Serve forms three batches) while A
    # holds the device; when A finishes they run as one denoising batch.
    slow = tiny_request(identity_id=identity_id, steps=50, width=128, height=128)
    with cf.ThreadPoolExecutor(4) as pool:
        first = pool.submit(http.post, "/v1/generate", json=slow)
        later = []
        for i in range(3):
            time.sleep(0.3)
            later.append(pool.submit(http.post, "/v1/generate", json=tiny_request(identity_id=identity_id, seed=i)))
        assert first.result().status_code == 200
        sizes = [f.result().json()["timings"]["batch_size"] for f in later]
    assert max(sizes) >= 2, sizes

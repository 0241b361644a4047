"""The identity score step of /v1/generate without a cluster: fake Generator and FaceAnalyzer handles whose
outputs encode a known similarity, so flags, retries, best-of selection, deadline and transport are exact."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from starlette.testclient import TestClient

from deployments.ingress import identity_score
from deployments.config import AppArgs
from deployments.ingress.backends import BY_VALUE_MAX_BYTES
from deployments.ingress.http.app import build_http_app
from deployments.messages import FaceAnalysisResult, GenerationResult
from deployments.ingress.service import GenerationService
from deployments.ingress.schemas import GenerateResponse
from serve_helpers import assert_error, b64, png_bytes
from fakes import FakeMethod, ready_ok


PHOTO_EMBEDDINGS = [np.full(512, 1.0, np.float32), np.full(512, 3.0, np.float32)]


class ScoringFace:
    """Analysis as the real one answers it; ``score`` reads the similarity an image encodes: its first pixel
    value / 255 (0: no face)."""

    def __init__(self):
        self.calls, self.options_seen = [], []

        async def analyze(photos, pose=None, thumbnail=False):
            face = {"source": "face_images[0]", "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.9,
                    "kps": [[1.0, 1.0]] * 5, "image_size": [256, 256]}
            embeddings = PHOTO_EMBEDDINGS[:len(photos)]
            return FaceAnalysisResult(embedding=np.mean(embeddings, axis=0), embeddings=embeddings,
                                      faces=[face] * len(photos), pose_kps=np.full((5, 2), 500.0, np.float32),
                                      pose_canvas=[1024, 1024], pose_face=face,
                                      timings={"decode_s": 0.0, "face_analysis_s": 0.0})

        async def score(images, reference, references=None):
            self.calls.append((len(images), reference, references))
            scores = []
            for image in images:
                value = int(image[0, 0, 0])
                scores.append({"similarity": value / 255, "face_found": True, "bbox": [0.0, 0.0, 8.0, 8.0]}
                              if value else {"similarity": None, "face_found": False, "bbox": None})
            return {"scores": scores, "timings": {"identity_score_s": 0.25}}

        self.analyze, self.score, self.ready = FakeMethod(analyze), FakeMethod(score), FakeMethod(ready_ok)

    def options(self, **kwargs):
        self.options_seen.append(kwargs)
        return self


class ValueGenerator:
    """Each generated image is filled with the next value of ``values`` (so its similarity is value / 255);
    calls after the first sleep ``retry_delay_s``."""

    def __init__(self, values: list[int], retry_delay_s: float = 0.0):
        self.values, self.jobs = list(values), []

        async def generate(job):
            self.jobs.append(job)
            if len(self.jobs) > 1 and retry_delay_s:
                await asyncio.sleep(retry_delay_s)
            images = [np.full((job.height, job.width, 3), self.values.pop(0), np.uint8)
                      for _ in range(job.num_images)]
            return GenerationResult(images=images, seed=job.seed, model=job.model,
                                    timings={"queue_s": 0.0, "denoise_s": 0.0, "vae_decode_s": 0.0, "batch_size": 1,
                                             "batch_images": job.num_images})

        self.denoise, self.ready = FakeMethod(generate), FakeMethod(ready_ok)

    def options(self, **_):
        return self


def client(tmp_path, face, generator) -> TestClient:
    args = AppArgs.model_validate({"identity_store": str(tmp_path / "ids")})
    core = GenerationService(args, face, generator,
                             status_fn=lambda: {"FaceAnalyzer": "HEALTHY", "Generator": "HEALTHY"})
    return TestClient(build_http_app(core), raise_server_exceptions=False)


def request(photos: int = 1, **fields) -> dict:
    return {"face_images": [b64(png_bytes())] * photos, "width": 64, "height": 64, "steps": 2, "seed": 5, **fields}


def first_pixels(body: dict) -> list[int]:
    import base64
    import io

    from PIL import Image

    return [int(np.asarray(Image.open(io.BytesIO(base64.b64decode(s))))[0, 0, 0]) for s in body["images"]]


def test_every_image_carries_its_score_and_the_cost_is_timed(tmp_path):
    face = ScoringFace()
    resp = client(tmp_path, face, ValueGenerator([204, 0])).post("/v1/generate", json=request(num_images=2))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    GenerateResponse.model_validate(body)
    assert body["identity"] == [{"similarity": 0.8, "face_found": True, "bbox": [0.0, 0.0, 8.0, 8.0]},
                                {"similarity": None, "face_found": False, "bbox": None}]
    assert body["timings"]["identity_score_s"] == 0.25
    (count, reference, references), = face.calls
    assert count == 2 and np.array_equal(reference, PHOTO_EMBEDDINGS[0]) and references == PHOTO_EMBEDDINGS[:1]


def test_several_photos_score_against_their_mean_and_each(tmp_path):
    face = ScoringFace()
    resp = client(tmp_path, face, ValueGenerator([100])).post("/v1/generate", json=request(photos=2))
    assert resp.status_code == 200, resp.text
    _, reference, references = face.calls[0]
    assert np.array_equal(reference, np.full(512, 2.0)) and len(references) == 2
    assert all(np.array_equal(a, b) for a, b in zip(references, PHOTO_EMBEDDINGS))


def test_min_similarity_flags_without_regenerating(tmp_path):
    generator = ValueGenerator([204, 51, 0])
    resp = client(tmp_path, ScoringFace(), generator).post(
        "/v1/generate", json=request(num_images=3, min_similarity=0.5))
    assert resp.status_code == 200, resp.text
    assert [e["below_threshold"] for e in resp.json()["identity"]] == [False, True, True]
    assert len(generator.jobs) == 1 and "identity_retry_s" not in resp.json()["timings"]


def test_retries_regenerate_only_the_images_under_it_and_keep_the_best(tmp_path):
    # first batch: 0.8 (kept), 0.1 (retried); round 1 gives 0.3 (better, still under), round 2 gives 0.2 (worse)
    generator = ValueGenerator([204, 25, 76, 51])
    resp = client(tmp_path, ScoringFace(), generator).post(
        "/v1/generate", json=request(num_images=2, min_similarity=0.5, retry_below_threshold=2))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [job.num_images for job in generator.jobs] == [2, 1, 1]
    round1_seed = generator.jobs[1].seed
    assert len({job.seed for job in generator.jobs}) == 3  # new seeds
    assert body["identity"][0] == {"similarity": 0.8, "face_found": True, "bbox": [0.0, 0.0, 8.0, 8.0],
                                   "below_threshold": False, "attempts": 1}
    assert body["identity"][1] == {"similarity": pytest.approx(76 / 255), "face_found": True,
                                   "bbox": [0.0, 0.0, 8.0, 8.0], "below_threshold": True, "seed": round1_seed,
                                   "attempts": 3}
    assert first_pixels(body) == [204, 76]  # the image returned is the best one, not the last
    assert body["seed"] == 5 and body["timings"]["identity_score_s"] == 0.75
    assert body["timings"]["identity_retry_s"] > 0


def test_retries_stop_once_every_image_passes(tmp_path):
    generator = ValueGenerator([0, 230])
    resp = client(tmp_path, ScoringFace(), generator).post(
        "/v1/generate", json=request(min_similarity=0.5, retry_below_threshold=3))
    assert resp.status_code == 200, resp.text
    assert len(generator.jobs) == 2
    assert resp.json()["identity"][0]["below_threshold"] is False and resp.json()["identity"][0]["attempts"] == 2


def test_a_retry_round_past_the_deadline_is_dropped_not_a_504(tmp_path, monkeypatch):
    monkeypatch.setattr(identity_score, "DEADLINE_RESERVE_S", 0.5)
    generator = ValueGenerator([25, 230], retry_delay_s=30)
    http = client(tmp_path, ScoringFace(), generator)
    started = time.perf_counter()
    resp = http.post("/v1/generate", json=request(min_similarity=0.5, retry_below_threshold=3, timeout_s=2))
    assert resp.status_code == 200, resp.text
    assert time.perf_counter() - started < 5  # the 30 s round was cancelled at the deadline's reserve
    assert resp.json()["identity"][0] == {"similarity": pytest.approx(25 / 255), "face_found": True,
                                          "bbox": [0.0, 0.0, 8.0, 8.0], "below_threshold": True, "attempts": 1}
    assert first_pixels(resp.json()) == [25]


def test_large_outputs_go_to_the_face_analyzer_by_reference(tmp_path):
    face = ScoringFace()
    resp = client(tmp_path, face, ValueGenerator([204] * 4)).post(
        "/v1/generate", json=request(num_images=4, width=1024, height=1024))
    assert resp.status_code == 200, resp.text
    assert 4 * 1024 * 1024 * 3 > BY_VALUE_MAX_BYTES and {"_by_reference": True} in face.options_seen
    assert [e["similarity"] for e in resp.json()["identity"]] == [0.8] * 4


def test_identity_score_false_skips_it(tmp_path):
    face = ScoringFace()
    resp = client(tmp_path, face, ValueGenerator([204])).post("/v1/generate", json=request(identity_score=False))
    assert resp.status_code == 200, resp.text
    assert "identity" not in resp.json() and face.calls == []


def test_a_failing_score_still_returns_the_images(tmp_path):
    face = ScoringFace()

    async def broken(images, reference, references=None):
        raise RuntimeError("face analyzer replica died")

    face.score = FakeMethod(broken)
    resp = client(tmp_path, face, ValueGenerator([204])).post("/v1/generate", json=request(min_similarity=0.5))
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["images"]) == 1 and "identity" not in resp.json()


@pytest.mark.parametrize("fields,field", [
    ({"retry_below_threshold": 1}, None),
    ({"min_similarity": 1.5}, "min_similarity"),
    ({"min_similarity": 0.5, "retry_below_threshold": 4}, "retry_below_threshold"),
    ({"min_similarity": 0.5, "identity_score": False}, None),
    ({"min_similarity": "0.5"}, "min_similarity"),
])
def test_bad_score_options_are_422(tmp_path, fields, field):
    resp = client(tmp_path, ScoringFace(), ValueGenerator([204])).post("/v1/generate", json=request(**fields))
    assert_error(resp, 422, "invalid_parameter", field)


def test_a_face_analyzer_that_never_answers_costs_the_score_not_the_images(tmp_path, monkeypatch):
    """As when the app is deleted while the request drains: the FaceAnalyzer has no replica left."""
    monkeypatch.setattr(identity_score, "SCORE_TIMEOUT_S", 0.5)
    face = ScoringFace()

    async def hang(images, reference, references=None):
        await asyncio.sleep(60)

    face.score = FakeMethod(hang)
    http = client(tmp_path, face, ValueGenerator([204]))
    started = time.perf_counter()
    resp = http.post("/v1/generate", json=request(min_similarity=0.5))
    assert resp.status_code == 200, resp.text
    assert "identity" not in resp.json() and len(resp.json()["images"]) == 1
    assert time.perf_counter() - started < 10

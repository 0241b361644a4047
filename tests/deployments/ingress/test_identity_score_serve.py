"""The identity score on the real FaceAnalyzer code (tiny face pack): exact against instantid.scoring in
process, and end to end through the cluster (FaceAnalyzer.score, the Ingress, the metrics)."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from deployments.face_analyzer.deployment import FaceAnalysisCore
from instantid.face import FaceModel, load_image
from instantid.identity import build_identity
from instantid.scoring import score_image


@pytest.fixture(scope="module")
def photos(face_photo):
    a = load_image(face_photo)
    return a, ImageOps.mirror(a)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_core_scores_exactly_as_the_library_at_full_size(tiny_bundle, photos):
    core = FaceAnalysisCore(str(tiny_bundle / "antelopev2"), threads=1)
    a, b = photos
    analysis = core.predict([("face_images[0]", png(a)), ("face_images[1]", png(b))])
    embedding, references = analysis.embedding, analysis.embeddings
    library = FaceModel(str(tiny_bundle / "antelopev2"))
    identity = build_identity(library, [("a", a), ("b", b)])
    assert np.allclose(embedding, identity.embedding) and len(references) == 2

    # the photos fed back as "outputs", a 1024x1024 upscale of one, and a face-free 1024x1024 output
    outputs = [np.asarray(a), np.asarray(b), np.asarray(a.resize((1024, 1024))),
               np.full((1024, 1024, 3), 128, np.uint8)]
    result = core.score(outputs, embedding, references)
    expected = [score_image(library, o, identity.embedding, [f.embedding for f in identity.faces]).to_dict()
                for o in outputs]
    assert [s["face_found"] for s in result["scores"]] == [True, True, True, False]
    for got, want in zip(result["scores"], expected):
        assert got.keys() == want.keys() and got["bbox"] == want["bbox"]
        assert got["similarity"] == pytest.approx(want["similarity"], abs=1e-6)
    assert result["scores"][0]["per_reference"][0] == pytest.approx(1.0, abs=1e-6)
    assert result["timings"]["identity_score_s"] > 0 and core.budget.used == 0


@pytest.mark.serve
def test_generate_returns_identity_per_image_and_exports_metrics(http, serve_env, face_b64, photos, tiny_request):
    out = io.BytesIO()
    photos[1].save(out, format="JPEG", quality=90)  # a PNG of it is over the test app's body limit
    mirrored = base64.b64encode(out.getvalue()).decode("ascii")
    resp = http.post("/v1/generate", json=tiny_request(face_images=[face_b64, mirrored], num_images=2,
                                                       min_similarity=0.99, retry_below_threshold=1))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["identity"]) == len(body["images"]) == 2
    for entry in body["identity"]:
        # random weights: whatever the tiny detector makes of the output, the flags must agree with it
        if entry["face_found"]:
            assert -1 <= entry["similarity"] <= 1 and len(entry["per_reference"]) == 2
        assert entry["below_threshold"] == (not entry["face_found"] or entry["similarity"] < 0.99)
        assert entry["attempts"] == 2 if entry["below_threshold"] or "seed" in entry else entry["attempts"] == 1
    assert body["timings"]["identity_score_s"] > 0

    expected = ["ray_instantid_identity_retries_total", 'stage="identity_score"']
    found = [e["face_found"] for e in body["identity"]]
    expected += ["ray_instantid_identity_similarity_bucket"] * any(found)
    expected += ["ray_instantid_identity_no_face_total"] * (not all(found))
    deadline, missing = time.monotonic() + 60, expected
    while time.monotonic() < deadline and missing:
        text = httpx.get(serve_env.metrics_url, timeout=10).text
        missing = [m for m in expected if m not in text]
        time.sleep(0 if not missing else 1)
    assert not missing, missing


def test_core_scores_the_largest_request_the_limits_allow(tiny_bundle, photos):
    """max_num_images (4) outputs at max_side (2048x2048): one call, every face found, the budget released."""
    from deployments.config import Limits

    limits = Limits()
    core = FaceAnalysisCore(str(tiny_bundle / "antelopev2"), threads=1)
    side = limits.max_side
    outputs = [np.asarray(photos[i % 2].resize((side, side))) for i in range(limits.max_num_images)]
    embedding = np.ones(512, np.float32)
    result = core.score(outputs, embedding)
    assert len(result["scores"]) == limits.max_num_images and all(s["face_found"] for s in result["scores"])
    for s in result["scores"]:
        x1, y1, x2, y2 = s["bbox"]
        assert 0 <= x1 < x2 <= side and 0 <= y1 < y2 <= side
    assert core.budget.peak == limits.max_num_images * side * side and core.budget.used == 0

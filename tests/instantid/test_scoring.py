"""The identity score on the tiny face pack: random weights, so the number means nothing, but it must be exactly
the cosine of the embeddings the same analysis gives, and a face-free output is an answer, not an error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from instantid.face import FaceModel, load_image, mean_embedding
from instantid.identity import build_identity
from instantid.scoring import below_threshold, cosine, score_image
from instantid.tiny_face import write_tiny_face_pack


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory) -> FaceModel:
    return FaceModel(str(write_tiny_face_pack(tmp_path_factory.mktemp("face") / "antelopev2")))


@pytest.fixture(scope="module")
def photos(face_photo):
    a = load_image(face_photo)
    return {"a": a, "b": ImageOps.mirror(a)}


def direct_cosine(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def test_a_reference_photo_fed_back_scores_its_exact_cosine(analyzer, photos):
    identity = build_identity(analyzer, [("a", photos["a"]), ("b", photos["b"])])
    emb_a, emb_b = (f.embedding for f in identity.faces)
    assert not np.allclose(emb_a, emb_b)  # two different faces, so the averaged identity differs from each

    for name, emb in (("a", emb_a), ("b", emb_b)):
        score = score_image(analyzer, photos[name], identity.embedding, [emb_a, emb_b])
        assert score.face_found
        assert score.similarity == pytest.approx(direct_cosine(emb, mean_embedding(identity.faces)), abs=1e-6)
        assert score.similarity < 1 - 1e-4
        assert score.per_reference == pytest.approx([direct_cosine(emb, emb_a), direct_cosine(emb, emb_b)],
                                                     abs=1e-6)
    one = score_image(analyzer, photos["a"], emb_a)
    assert one.similarity == pytest.approx(1.0, abs=1e-6) and one.per_reference is None
    assert set(one.to_dict()) == {"similarity", "face_found", "bbox"}


def test_bbox_is_in_the_output_images_own_pixels(analyzer, photos):
    """The same face on a canvas twice the size: its box scales with it (analysis resizes internally)."""
    a = photos["a"]
    small = score_image(analyzer, a, np.ones(512, np.float32))
    big = score_image(analyzer, a.resize((a.width * 2, a.height * 2), Image.BICUBIC), np.ones(512, np.float32))
    assert small.bbox is not None and len(small.bbox) == 4
    assert np.allclose(np.array(big.bbox) / 2, small.bbox, rtol=0.05, atol=4)
    x1, y1, x2, y2 = small.bbox
    assert 0 <= x1 < x2 <= a.width and 0 <= y1 < y2 <= a.height


def test_arrays_and_images_score_the_same(analyzer, photos):
    emb = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    assert score_image(analyzer, np.asarray(photos["a"]), emb) == score_image(analyzer, photos["a"], emb)


@pytest.mark.parametrize("size", [(64, 64), (1024, 1024), (1536, 640)])
def test_a_face_free_output_is_face_found_false_not_an_error(analyzer, size):
    score = score_image(analyzer, Image.new("RGB", size, (128, 128, 128)), np.ones(512, np.float32),
                        [np.ones(512, np.float32)] * 2)
    assert score.to_dict() == {"similarity": None, "face_found": False, "bbox": None}
    assert below_threshold(score, 0.1) and not below_threshold(score, None)


def test_threshold_flags_scores_under_it(analyzer, photos):
    emb_a = build_identity(analyzer, [("a", photos["a"])]).embedding
    score = score_image(analyzer, photos["b"], emb_a)
    assert below_threshold(score, score.similarity + 1e-3)
    assert not below_threshold(score, score.similarity)


def test_cosine_ignores_scale():
    x = np.arange(1, 513, dtype=np.float32)
    assert cosine(x, 3 * x) == pytest.approx(1.0) and cosine(x, -x) == pytest.approx(-1.0)

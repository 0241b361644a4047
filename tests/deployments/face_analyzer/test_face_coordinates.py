"""The FaceAnalyzer replica reports faces in the coordinates of the photo as uploaded: the library's analysis
(on the analysed canvas: the photo at one scale, centre-cropped to the demo's size) mapped back by that scale and
the crop's offset. Non-square photos, so that a width/height mix-up in the mapping (of the box, the keypoints, the
size or the canvas) or a forgotten crop shows."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deployments.face_analyzer.deployment import FaceAnalysisCore
from instantid.face import FaceModel, analysis_size
from instantid.identity import analyze_face


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


@pytest.fixture(scope="module")
def core(tiny_bundle):
    return FaceAnalysisCore(str(tiny_bundle / "antelopev2"), threads=1)


@pytest.fixture(scope="module")
def library(tiny_bundle):
    return FaceModel(str(tiny_bundle / "antelopev2"))


# t1.jpg as shipped (1280x886, analysed on 1280x832) and two crops whose canvas scales both axes differently
@pytest.mark.parametrize("crop", [None, (100, 0, 1000, 700), (300, 0, 900, 886)],
                         ids=["landscape-1280x886", "landscape-900x700", "portrait-600x886"])
def test_faces_are_reported_on_the_uploaded_photo_per_axis(core, library, face_photo, crop):
    photo = Image.open(face_photo).convert("RGB")
    if crop:
        photo = photo.crop(crop)
    data = _jpeg(photo)
    photo = Image.open(io.BytesIO(data)).convert("RGB")  # what the replica decodes
    width, height = photo.size
    assert width != height

    face, canvas = analyze_face(library, "p", photo)
    assert canvas == analysis_size(width, height) and canvas[0] != canvas[1]
    # independently of analysis_mapping: the demo's first resize, then the centred crop to the canvas
    ratio = 1024 / min(width, height)
    w, h = round(ratio * width), round(ratio * height)
    ratio = 1280 / max(w, h)
    resized = (round(ratio * w), round(ratio * h))
    sx, sy = width / resized[0], height / resized[1]
    ox, oy = (resized[0] - canvas[0]) // 2 * sx, (resized[1] - canvas[1]) // 2 * sy
    assert ox + oy > 5  # a crop happened: forgetting it moves every point
    box = [face.bbox[0] * sx + ox, face.bbox[1] * sy + oy, face.bbox[2] * sx + ox, face.bbox[3] * sy + oy]
    kps = [[x * sx + ox, y * sy + oy] for x, y in face.kps]

    result = core.predict([("face_images[0]", data)], thumbnail=True)
    (reported,) = result.faces
    assert reported["image_size"] == [width, height]
    np.testing.assert_allclose(reported["bbox"], box, rtol=1e-5)
    np.testing.assert_allclose(reported["kps"], kps, rtol=1e-5)
    # the pose: keypoints on the analysed canvas (what Pose.draw scales from), its face as uploaded
    assert list(result.pose_canvas) == list(canvas)
    np.testing.assert_allclose(result.pose_kps, face.kps, rtol=1e-6)
    np.testing.assert_allclose(result.pose_face["bbox"], box, rtol=1e-5)
    assert Image.open(io.BytesIO(result.thumbnail)).size[0] > 0

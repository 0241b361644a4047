"""The face keeps the person's proportions from the photo to the keypoints IdentityNet sees (issue 27, item 3).

The demo resizes the photo to its output canvas (sides floored to multiples of 64) non-uniformly before analysis,
so a photo whose sides are not multiples of 64 has its face squashed by up to ~6 % (t1.jpg 1280x886: 6.4 %). The
photo must be analysed at one scale and cropped to the demo's canvas instead.

Known answer without a trained detector: five coloured dots painted on a real photo stand for the five keypoints,
and a stand-in face model finds them by colour. The drawn keypoints must be the photo's own dots under one scale
and an offset; the aspect error is how far the best per-axis fit's x and y scales differ.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from instantid.face import Face, analysis_size
from instantid.identity import build_identity, build_pose
from instantid.keypoints import COLORS

TOLERANCE = 60  # per channel, around each dot's pure colour (the photo under the dots is grey)


class DotFaceModel:
    """Finds the five pure-colour dots (keypoint order = COLORS order) by their pixels' centroid."""

    def analyze(self, image):
        rgb = np.asarray(image.convert("RGB")).astype(int)
        kps = []
        for colour in COLORS:
            ys, xs = np.nonzero(np.all(np.abs(rgb - colour) < TOLERANCE, axis=-1))
            if xs.size == 0:
                return []
            kps.append([xs.mean() + 0.5, ys.mean() + 0.5])  # pixel centres
        kps = np.asarray(kps, dtype=np.float32)
        lo, hi = kps.min(axis=0) - 40, kps.max(axis=0) + 40
        return [Face(bbox=np.r_[lo, hi].astype(np.float32), score=1.0, kps=kps,
                     embedding=np.ones(512, dtype=np.float32))]

    def largest_face(self, image, source):
        return self.analyze(image)[0]


def dotted(face_photo, box) -> tuple[Image.Image, np.ndarray]:
    """A crop of the real photo (greyscale) with five dots in a face layout; returns it and the dots' centres."""
    photo = ImageOps.grayscale(Image.open(face_photo)).convert("RGB").crop(box)
    w, h = photo.size
    c = np.array([w * 0.45, h * 0.5])
    u = min(w, h) * 0.2  # eye distance 2u, eyes to mouth 2u: a square layout, so a squash shows on one axis
    dots = c + u * np.array([[-1, -1], [1, -1], [0, 0], [-0.8, 1], [0.8, 1]])
    draw = ImageDraw.Draw(photo)
    r = 14
    for (x, y), colour in zip(dots, COLORS):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return photo, dots + 0.5  # PIL's ellipse [x-r, x+r] covers pixels x-r..x+r: centre x + 0.5 in pixel-centre terms


def aspect_error(source: np.ndarray, drawn: np.ndarray) -> tuple[float, np.ndarray]:
    """(|sx / sy - 1|, residual of the best uniform fit) for drawn ~ source * (sx, sy) + offset."""
    scales = []
    for axis in (0, 1):
        a = np.c_[source[:, axis], np.ones(len(source))]
        scales.append(np.linalg.lstsq(a, drawn[:, axis], rcond=None)[0][0])
    s = float(np.mean(scales))
    offset = (drawn - source * s).mean(axis=0)
    return abs(scales[0] / scales[1] - 1), drawn - (source * s + offset)


# landscape, portrait and square, no side a multiple of 64 (t1.jpg is 1280x886)
CROPS = {"landscape-1100x730": (50, 0, 1150, 730), "portrait-600x886": (300, 0, 900, 886),
         "square-777x777": (200, 50, 977, 827), "t1-1280x886": None}


@pytest.mark.parametrize("name", CROPS)
def test_drawn_keypoints_keep_the_photos_proportions_at_the_demos_output_size(face_photo, name):
    box = CROPS[name] or (0, 0, *Image.open(face_photo).size)
    photo, dots = dotted(face_photo, box)
    assert photo.size[1] % 64  # at least one side is not a multiple of 64 (a square is never squashed: a guard)

    identity = build_identity(DotFaceModel(), [("p", photo)])
    canvas = analysis_size(*photo.size)  # the demo's output size for this photo, kept
    image = identity.pose.draw()
    assert image.size == canvas  # the default output is the demo's canvas
    drawn = identity.pose.keypoints_on(*canvas)
    error, residual = aspect_error(dots, drawn)
    print(f"{name}: aspect error {100 * error:.3f} %")
    assert error < 0.005, f"the face is squashed by {100 * error:.2f} %"
    assert np.abs(residual).max() < 1.5  # one scale and an offset, to the dots' centroid noise (~1 px)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(identity.pose.draw(*canvas)))

    pose = build_pose(DotFaceModel(), "p", photo)  # a pose photo the same way
    assert pose.draw().size == canvas
    assert aspect_error(dots, pose.keypoints_on(*canvas))[0] < 0.005

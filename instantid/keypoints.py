"""IdentityNet's spatial input: the five facial keypoints drawn as an image.

Pixel-identical to the official ``draw_kps``: on a black canvas, one filled ellipse per limb from each eye and
mouth corner to the nose (half-width 4 px, coloured by the outer point), the limb layer dimmed to 60% (with
float-to-uint8 truncation), then a filled circle of radius 10 at each point.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

# left eye, right eye, nose, left mouth corner, right mouth corner
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
LIMBS = [(0, 2), (1, 2), (3, 2), (4, 2)]
LIMB_HALF_WIDTH = 4
POINT_RADIUS = 10


def draw_keypoints(width: int, height: int, kps) -> Image.Image:
    """Draw ``kps`` (5 x [x, y] pixel coordinates on this canvas) on a width x height black RGB canvas."""
    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    # float64 canvas, as the reference: colours are written as floats and dimmed before the uint8 cast
    canvas = np.zeros((height, width, 3))
    for a, b in LIMBS:
        xs, ys = kps[[a, b], 0], kps[[a, b], 1]
        length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly(
            (int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), LIMB_HALF_WIDTH), int(angle), 0, 360, 1
        )
        canvas = cv2.fillConvexPoly(canvas, polygon, COLORS[a])
    canvas = (canvas * 0.6).astype(np.uint8)
    for (x, y), color in zip(kps, COLORS):
        canvas = cv2.circle(canvas, (int(x), int(y)), POINT_RADIUS, color, -1)
    return Image.fromarray(canvas)


def scale_keypoints(kps, source_size: tuple[int, int], target_size: tuple[int, int]) -> np.ndarray:
    """Map keypoints from a (width, height) image onto a canvas of another (width, height)."""
    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    sx = target_size[0] / source_size[0]
    sy = target_size[1] / source_size[1]
    return kps * np.array([sx, sy])

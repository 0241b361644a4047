"""IdentityNet's spatial input: the five facial keypoints drawn as an image.

Pixel-identical to the official ``draw_kps``: on a black canvas, one filled ellipse per limb from each eye and
mouth corner to the nose (half-width 4 px, coloured by the outer point), the limb layer dimmed to 60% (with
float-to-uint8 truncation), then a filled circle of radius 10 at each point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from .errors import InvalidParameterError

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


@dataclass(frozen=True)
class CanvasFit:
    """How a source canvas lands on a target canvas: ``target = source * scale + offset`` (one scale for x and y,
    so faces keep their proportions)."""

    scale: float
    offset: tuple[float, float]

    def apply(self, points) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        return points.reshape(-1, 2) * self.scale + np.asarray(self.offset)


def fit_canvas(source_size: tuple[int, int], target_size: tuple[int, int], kps, bbox=None) -> CanvasFit:
    """Cover-fit a (width, height) source onto a target canvas: one scale so the source covers the target, then
    the crop window centred on the face (the box's centre, or the keypoints' when no box is known), kept inside
    the source. Raises InvalidParameterError naming ``width``/``height`` when the face's keypoints fall outside.

    Same aspect ratio: plain scaling, no offset (the demo's case, where the output takes the pose canvas's size).
    """
    (sw, sh), (tw, th) = source_size, target_size
    scale = max(tw / sw, th / sh)
    kps = np.asarray(kps, dtype=np.float64).reshape(-1, 2)  # one face's five points, or several faces'
    centre = (np.asarray(bbox, dtype=np.float64).reshape(2, 2).mean(axis=0) if bbox is not None
              else kps.mean(axis=0))
    offset = []
    for c, s_len, t_len in ((centre[0], sw, tw), (centre[1], sh, th)):
        slack = t_len - s_len * scale  # <= 0: how much of the scaled source is cropped away on this axis
        offset.append(float(np.clip(t_len / 2 - c * scale, slack, 0.0)) if slack < 0 else 0.0)
    fit = CanvasFit(scale, (offset[0], offset[1]))
    mapped = fit.apply(kps)
    if not ((mapped >= 0).all() and (mapped[:, 0] < tw).all() and (mapped[:, 1] < th).all()):
        axis = "width" if (mapped[:, 0] < 0).any() or (mapped[:, 0] >= tw).any() else "height"
        raise InvalidParameterError(axis, f"the face does not fit on a {tw}x{th} canvas cut from the "
                                          f"{sw}x{sh} pose canvas; use a size closer to its aspect ratio")
    return fit


def face_region_mask(width: int, height: int, bbox) -> Image.Image:
    """The demo's "enhance non-face region" control mask: white inside the face box, black elsewhere (RGB).

    Box corners are truncated to int as the demo does; a box reaching past the canvas is clipped to it (the demo
    would wrap a negative corner around instead).
    """
    mask = np.zeros((height, width, 3), dtype=np.uint8)
    x1, y1, x2, y2 = (max(0, int(v)) for v in np.asarray(bbox, dtype=np.float64).reshape(4))
    mask[y1:y2, x1:x2] = 255
    return Image.fromarray(mask)

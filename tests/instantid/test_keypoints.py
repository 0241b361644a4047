"""The keypoint image: geometry and colours of the reference drawing, pixel by pixel where it is defined."""

import numpy as np

from instantid.identity import Pose
from instantid.keypoints import COLORS, draw_keypoints, scale_keypoints

KPS = [[60, 70], [140, 70], [100, 110], [70, 150], [130, 150]]


def test_canvas_size_and_black_background():
    image = np.asarray(draw_keypoints(200, 240, KPS))
    assert image.shape == (240, 200, 3) and image.dtype == np.uint8
    assert (image[:30] == 0).all() and (image[200:] == 0).all()


def test_points_are_filled_circles_of_radius_10_in_full_colour():
    image = np.asarray(draw_keypoints(200, 200, KPS))
    for (x, y), color in zip(KPS, COLORS):
        assert tuple(image[y, x]) == color
        assert tuple(image[y, x + 9]) == color and tuple(image[y - 9, x]) == color  # inside the radius
        # just outside the radius: background or a dimmed limb, never the point's full colour
        assert tuple(image[y, x + 12]) != color or tuple(image[y + 12, x]) != color


def test_limbs_are_dimmed_to_60_percent_with_truncation():
    image = np.asarray(draw_keypoints(200, 200, KPS))
    # the midpoint of left eye -> nose lies on the limb, outside both circles
    ex, ey = (KPS[0][0] + KPS[2][0]) // 2, (KPS[0][1] + KPS[2][1]) // 2
    assert tuple(image[ey, ex]) == (153, 0, 0)  # int(255 * 0.6) = 153, coloured by the outer point (red)
    mx, my = (KPS[4][0] + KPS[2][0]) // 2, (KPS[4][1] + KPS[2][1]) // 2
    assert tuple(image[my, mx]) == (153, 0, 153)  # right mouth corner's magenta
    # limbs are about 2 * 4 px wide: 6 px off the limb axis, perpendicular, is background
    direction = np.array([KPS[2][0] - KPS[0][0], KPS[2][1] - KPS[0][1]], dtype=float)
    normal = np.array([-direction[1], direction[0]]) / np.linalg.norm(direction)
    ox, oy = np.round(np.array([ex, ey]) + 6 * normal).astype(int)
    assert tuple(image[oy, ox]) == (0, 0, 0)


def test_only_the_five_colours_and_their_dimmed_versions_appear():
    image = np.asarray(draw_keypoints(200, 200, KPS)).reshape(-1, 3)
    allowed = {(0, 0, 0), *COLORS, *[tuple(int(c * 0.6) for c in color) for color in COLORS]}
    assert {tuple(p) for p in np.unique(image, axis=0)} <= allowed


def test_scaling_onto_another_canvas():
    scaled = scale_keypoints(KPS, (200, 200), (100, 400))
    np.testing.assert_allclose(scaled[0], [30, 140])
    image = np.asarray(Pose(np.array(KPS, dtype=float), (200, 200)).draw(100, 400))
    assert image.shape == (400, 100, 3)
    assert tuple(image[140, 30]) == COLORS[0]

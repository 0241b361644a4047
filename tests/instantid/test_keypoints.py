"""The keypoint image: geometry and colours of the reference drawing, pixel by pixel where it is defined."""

import numpy as np
import pytest

from instantid.errors import InvalidParameterError
from instantid.identity import Pose
from instantid.keypoints import COLORS, draw_keypoints, fit_canvas

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


def test_scaling_onto_a_canvas_of_the_same_aspect_is_plain_scaling():
    scaled = fit_canvas((200, 200), (400, 400), KPS).apply(KPS)
    np.testing.assert_allclose(scaled, np.array(KPS) * 2)
    image = np.asarray(Pose(np.array(KPS, dtype=float), (200, 200)).draw(400, 400))
    assert image.shape == (400, 400, 3)
    assert tuple(image[140, 120]) == COLORS[0]


def test_pose_defaults_to_its_own_canvas():
    pose = Pose(np.array(KPS, dtype=float), (200, 240))
    assert pose.draw().size == (200, 240)
    np.testing.assert_allclose(pose.keypoints_on(), KPS)


def _drawn_points(image: np.ndarray) -> np.ndarray:
    """Centres of the five full-colour discs of a keypoint image (the ratio test measures the drawing itself)."""
    centres = []
    for color in COLORS:
        ys, xs = np.nonzero((image == color).all(axis=-1))
        centres.append([xs.mean(), ys.mean()])
    return np.array(centres)


def _eye_mouth_ratio(p: np.ndarray) -> float:
    eye = np.linalg.norm(p[1] - p[0])
    mouth = np.linalg.norm((p[3] + p[4]) / 2 - (p[0] + p[1]) / 2)
    return eye / mouth


# insightface's t1.jpg is analysed on 1280x832 (landscape); portrait and square analysed canvases too
PHOTOS = {"landscape": (1280, 832), "portrait": (832, 1280), "square": (1024, 1024)}
CANVASES = [(1024, 1024), (1280, 832), (832, 1280), (1152, 896), (896, 1152), (1536, 640), (640, 1536),
            (512, 512), (768, 1024)]


@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize("canvas", CANVASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_face_proportions_survive_any_output_aspect(photo, canvas):
    # a face of realistic size (eyes ~1/8 of the short side) a little off-centre, on the analysed canvas
    sw, sh = PHOTOS[photo]
    unit = min(sw, sh) / 8
    cx, cy = sw * 0.45, sh * 0.4
    kps = np.array([[cx - unit / 2, cy], [cx + unit / 2, cy], [cx, cy + unit * 0.45],
                    [cx - unit * 0.4, cy + unit * 0.9], [cx + unit * 0.4, cy + unit * 0.9]])
    bbox = np.array([cx - unit, cy - unit, cx + unit, cy + unit * 1.4])
    pose = Pose(kps, (sw, sh), bbox)
    image = np.asarray(pose.draw(*canvas))
    assert image.shape == (canvas[1], canvas[0], 3)
    drawn = _drawn_points(image)
    # the drawing truncates to whole pixels: allow that, nothing like the old 0.8x / 1.23x stretch
    assert _eye_mouth_ratio(drawn) == pytest.approx(_eye_mouth_ratio(kps), rel=0.02)
    # one scale: the face keeps its size relative to the canvas's covering side
    scale = max(canvas[0] / sw, canvas[1] / sh)
    assert np.linalg.norm(drawn[1] - drawn[0]) == pytest.approx(unit * scale, abs=1.5)


def test_old_two_scale_mapping_would_fail_the_ratio_test():
    # t1.jpg's case from the issue: 1280x832 into 1024x1024 with separate x/y factors stretches the face 1.5x
    kps = np.array([[500, 300], [640, 300], [570, 360], [520, 420], [620, 420]], dtype=float)
    stretched = kps * np.array([1024 / 1280, 1024 / 832])
    assert _eye_mouth_ratio(stretched) / _eye_mouth_ratio(kps) < 0.7
    fitted = Pose(kps, (1280, 832)).keypoints_on(1024, 1024)
    assert _eye_mouth_ratio(fitted) == pytest.approx(_eye_mouth_ratio(kps))


def test_crop_is_centred_on_the_face_and_stays_inside_the_photo():
    kps = np.array([[1100, 300], [1200, 300], [1150, 350], [1110, 400], [1190, 400]], dtype=float)
    fitted = Pose(kps, (1280, 832)).keypoints_on(832, 832)  # scale 1; the face is near the right edge
    # the window cannot go past the photo's right edge: offset is -(1280 - 832)
    np.testing.assert_allclose(fitted, kps - [448, 0])
    centred = Pose(kps - [500, 0], (1280, 832)).keypoints_on(832, 832)
    assert centred[:, 0].mean() == pytest.approx(416)


def test_a_face_that_cannot_fit_names_the_size():
    kps = np.array([[100, 300], [1200, 300], [650, 500], [200, 700], [1100, 700]], dtype=float)
    with pytest.raises(InvalidParameterError) as err:
        Pose(kps, (1280, 832)).draw(512, 1024)
    assert err.value.field == "width"


def test_face_mask_is_the_box_on_the_output_canvas():
    pose = Pose(np.array(KPS, dtype=float), (200, 200), np.array([40.7, 50.2, 160.9, 170.0]))
    mask = np.asarray(pose.face_mask(400, 400))
    assert mask.shape == (400, 400, 3)
    ys, xs = np.nonzero(mask[:, :, 0])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (81, 320, 100, 339)  # int() of the scaled box, end exclusive
    assert set(np.unique(mask)) == {0, 255}
    with pytest.raises(InvalidParameterError) as err:
        Pose(np.array(KPS, dtype=float), (200, 200)).face_mask()
    assert err.value.field == "enhance_face_region"

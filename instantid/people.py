"""Several people in one picture: 2 to 4 identities, each confined to its own face region.

A ``Person`` is one identity (its face embedding) with its keypoints drawn on the output canvas and its region on
that canvas. The pipeline gives each identity its own ID tokens and its own IdentityNet pass (keypoint image +
ID tokens); each identity's attention output and IdentityNet residuals act only inside its region, as the
official full pipeline's control mask does for one face.

Where a person goes is one of:
- ``face_index``: a face of a group pose photo, counted left to right (by the centre of its box);
- ``box``: an explicit face box (x1, y1, x2, y2) on the output canvas; the keypoints are the person's own
  reference face's, scaled into the box (one scale, centred, so the face keeps its proportions);
- ``keypoints``: five explicit keypoints on the output canvas; the face box is estimated from them
  (``box_from_keypoints``).

The region of a person is its face box grown by ``REGION_MARGIN`` of the box's width (height) on the left and
right (top and bottom) -- hair, ears and chin lie outside a detector's tight box --, clipped to the canvas.
Regions may not overlap: a pixel belongs to at most one identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .defaults import MAX_PEOPLE, REGION_MARGIN  # one place: the service's request schema reads them too
from .errors import InvalidParameterError, NoFaceError
from .keypoints import draw_keypoints, face_region_mask, fit_canvas

BOX_PER_EYE_DISTANCE = 2.5  # a detector's face box is about 2.5 times the eye (or eye-to-mouth) distance wide


@dataclass
class Person:
    """One identity of a group picture, ready for the pipeline."""

    face_embedding: np.ndarray  # (512,) raw ArcFace embedding (or the mean of several)
    keypoint_image: Image.Image  # its keypoints drawn on the output canvas
    region: tuple[int, int, int, int]  # x1, y1, x2, y2 on that canvas, the grown face box (pixels, end-exclusive)
    keypoints: np.ndarray | None = None  # (5, 2) the drawn keypoints on that canvas, when known

    def region_mask(self) -> Image.Image:
        """The region as a control mask on the keypoint image's canvas (white inside)."""
        w, h = self.keypoint_image.size
        return face_region_mask(w, h, self.region)


@dataclass(frozen=True)
class Placement:
    """Where a person goes: exactly one of a group pose face index, a face box, or keypoints (output canvas)."""

    face_index: int | None = None
    box: tuple[float, float, float, float] | None = None
    keypoints: np.ndarray | None = None  # (5, 2)

    def __post_init__(self):
        given = [x is not None for x in (self.face_index, self.box, self.keypoints)]
        if sum(given) != 1:
            raise ValueError("a placement is exactly one of face_index, box and keypoints")


def grown_region(box, width: int, height: int) -> tuple[int, int, int, int]:
    """A face box grown by REGION_MARGIN on every side, clipped to the canvas, as integer pixel bounds."""
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    dx, dy = (x2 - x1) * REGION_MARGIN, (y2 - y1) * REGION_MARGIN
    return (max(0, int(x1 - dx)), max(0, int(y1 - dy)), min(width, int(np.ceil(x2 + dx))),
            min(height, int(np.ceil(y2 + dy))))


def box_from_keypoints(kps) -> np.ndarray:
    """A face box for bare keypoints: a square centred on their mean, BOX_PER_EYE_DISTANCE times the larger of
    the eye distance and the eyes-to-mouth distance wide (the larger one survives a turned or tilted head)."""
    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    eyes = np.linalg.norm(kps[0] - kps[1])
    eyes_to_mouth = np.linalg.norm((kps[0] + kps[1]) / 2 - (kps[3] + kps[4]) / 2)
    half = BOX_PER_EYE_DISTANCE * max(eyes, eyes_to_mouth, 1.0) / 2
    cx, cy = kps.mean(axis=0)
    return np.array([cx - half, cy - half, cx + half, cy + half])


def sorted_left_to_right(faces: list) -> list:
    """Faces (anything with a ``bbox``) ordered by the centre of their box, left to right: a face index counts
    in this order."""
    return sorted(faces, key=lambda f: float(f.bbox[0] + f.bbox[2]) / 2)


def check_people(people: list[Person]) -> None:
    """2-4 people (one is allowed: the single-identity request) whose regions do not overlap."""
    if not 1 <= len(people) <= MAX_PEOPLE:
        raise InvalidParameterError("people", f"1 to {MAX_PEOPLE} people, got {len(people)}")
    for i, a in enumerate(people):
        ax1, ay1, ax2, ay2 = a.region
        if ax2 <= ax1 or ay2 <= ay1:
            raise InvalidParameterError(f"people[{i}]", "its face region is empty on the canvas")
        for j in range(i):
            bx1, by1, bx2, by2 = people[j].region
            if min(ax2, bx2) > max(ax1, bx1) and min(ay2, by2) > max(ay1, by1):
                raise InvalidParameterError(
                    "people", f"the regions of people[{j}] and people[{i}] overlap (face boxes grown by "
                              f"{REGION_MARGIN:.0%} per side); move the faces apart or pick other faces")


def _in_canvas(points, width: int, height: int) -> bool:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return bool((points >= 0).all() and (points[:, 0] < width).all() and (points[:, 1] < height).all())


def _into_box(kps, ref_box, box) -> np.ndarray:
    """Reference keypoints moved into ``box``: one scale fitting the reference box inside it, centres aligned."""
    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    r, b = np.asarray(ref_box, dtype=np.float64).reshape(2, 2), np.asarray(box, dtype=np.float64).reshape(2, 2)
    ref_size, size = r[1] - r[0], b[1] - b[0]
    scale = float(min(size / np.maximum(ref_size, 1e-6)))
    return (kps - r.mean(axis=0)) * scale + b.mean(axis=0)


def place_people(
    embeddings: list[np.ndarray],
    placements: list[Placement],
    width: int | None = None,
    height: int | None = None,
    *,
    group=None,
    references: list | None = None,
) -> tuple[list[Person], tuple[int, int]]:
    """People on a width x height canvas, and that size.

    ``group`` is the group pose photo as a ``(faces, (w, h))`` pair (faces on its analysed canvas, any order);
    the size defaults to its canvas, and face indices count its faces left to right. The indexed faces share one
    cover-fit onto the canvas, centred on the union of their boxes. ``references[i]`` (a Pose, or None) is person
    i's own face, needed for a ``box`` placement. Errors name the offending entry: ``people[i].face_index`` ...
    """
    if not 1 <= len(placements) <= MAX_PEOPLE:
        raise InvalidParameterError("people", f"1 to {MAX_PEOPLE} people, got {len(placements)}")
    if len(embeddings) != len(placements):
        raise ValueError("one embedding per placement")
    references = references or [None] * len(placements)
    faces = sorted_left_to_right(group[0]) if group is not None else []
    if width is None or height is None:
        if group is None:
            raise InvalidParameterError("width", "give width and height (no group pose photo sets the canvas)")
        width, height = width or group[1][0], height or group[1][1]
    width, height = int(width), int(height)

    indexed = [p.face_index for p in placements if p.face_index is not None]
    for i, p in enumerate(placements):
        if p.face_index is None:
            continue
        if group is None:
            raise InvalidParameterError(f"people[{i}].face_index", "needs a group pose photo (pose_image)")
        if not 0 <= p.face_index < len(faces):
            raise InvalidParameterError(f"people[{i}].face_index",
                                        f"the pose photo has {len(faces)} face(s) (0 to {len(faces) - 1}, left to "
                                        f"right), not {p.face_index}")
    fit = None
    if indexed:
        chosen = [faces[k] for k in indexed]
        union = np.array([min(f.bbox[0] for f in chosen), min(f.bbox[1] for f in chosen),
                          max(f.bbox[2] for f in chosen), max(f.bbox[3] for f in chosen)])
        fit = fit_canvas(group[1], (width, height), np.concatenate([f.kps for f in chosen]), union)

    people = []
    for i, (embedding, p) in enumerate(zip(embeddings, placements)):
        if p.face_index is not None:
            face = faces[p.face_index]
            kps, box = fit.apply(face.kps), fit.apply(np.asarray(face.bbox).reshape(2, 2)).reshape(4)
            field = f"people[{i}].face_index"
        elif p.box is not None:
            box = np.asarray(p.box, dtype=np.float64).reshape(4)
            field = f"people[{i}].box"
            if not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
                raise InvalidParameterError(field, f"must be x1 < x2, y1 < y2 inside the {width}x{height} canvas, "
                                                   f"got {[float(v) for v in box]}")
            ref = references[i]
            if ref is None or getattr(ref, "bbox", None) is None:
                raise InvalidParameterError(field, "needs the person's own face photo (its keypoints); give "
                                                   "keypoints instead")
            kps = _into_box(ref.kps, ref.bbox, box)
        else:
            kps = np.asarray(p.keypoints, dtype=np.float64).reshape(5, 2)
            field = f"people[{i}].keypoints"
            box = box_from_keypoints(kps)
        if not _in_canvas(kps, width, height):
            raise InvalidParameterError(field, f"the face falls outside the {width}x{height} canvas")
        people.append(Person(np.asarray(embedding, dtype=np.float32), draw_keypoints(width, height, kps),
                             grown_region(box, width, height), np.asarray(kps, dtype=np.float64)))
    check_people(people)
    return people, (width, height)


def keypoints_overview(people: list[Person]) -> Image.Image:
    """Every person's keypoint image on one canvas (what the IdentityNet passes saw, together), for display."""
    return Image.fromarray(np.maximum.reduce([np.asarray(p.keypoint_image.convert("RGB")) for p in people]))


def group_faces(analyzer, name: str, image: Image.Image, det_size: int | None = None,
                retry: bool = False) -> tuple[list, tuple[int, int]]:
    """Every face of a group pose photo (after the reference resize), left to right, and the analysed size;
    ``det_size``/``retry`` as ``FaceModel.analyze``."""
    from .face import resize_for_analysis

    canvas = resize_for_analysis(image)
    faces = analyzer.analyze(canvas, det_size=det_size, retry=retry) if (det_size or retry) else analyzer.analyze(
        canvas)
    if not faces:
        raise NoFaceError(name)
    return sorted_left_to_right(faces), canvas.size

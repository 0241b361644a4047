"""From reference photos to what the pipeline conditions on: one embedding and five keypoints.

Several photos average their raw ArcFace embeddings (or, per request, ``combine_embeddings``' other modes); the
keypoints come from the first photo, or from a separate pose photo. Photos are resized as the official demo does
before analysis (one scale, then a centred crop to its canvas), and keypoints are kept in the coordinates of that
analysed canvas together with its size, so they can be drawn on any output size. Which face of a photo is used
(the largest, or the N-th left to right) and how the detector looks for it are a ``Detection``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from . import defaults
from .errors import InvalidParameterError
from .face import Face, FaceModel, check_det_size, mean_embedding, resize_for_analysis
from .image_limits import DecodeAborted
from .keypoints import draw_keypoints, face_region_mask, fit_canvas


@dataclass
class Pose:
    """Where the face is: keypoints (and, from a photo, the face box) on the canvas they were found on.

    The output defaults to that canvas's size, as in the demo; another size gets the pose by cover-fit (one
    scale, crop centred on the face), so the face is never stretched.
    """

    kps: np.ndarray  # (5, 2) pixel coordinates on a canvas of ``size``
    size: tuple[int, int]  # (width, height)
    bbox: np.ndarray | None = None  # (4,) x1, y1, x2, y2 on the same canvas; None for bare keypoints

    def _size(self, width, height) -> tuple[int, int]:
        return int(width or self.size[0]), int(height or self.size[1])

    def keypoints_on(self, width: int | None = None, height: int | None = None) -> np.ndarray:
        """The keypoints mapped onto a width x height canvas (default: the pose canvas itself)."""
        target = self._size(width, height)
        return fit_canvas(self.size, target, self.kps, self.bbox).apply(self.kps)

    def draw(self, width: int | None = None, height: int | None = None) -> Image.Image:
        """The keypoint image IdentityNet sees on a width x height canvas (default: the pose canvas)."""
        w, h = self._size(width, height)
        return draw_keypoints(w, h, self.keypoints_on(w, h))

    def face_mask(self, width: int | None = None, height: int | None = None) -> Image.Image:
        """The demo's face-region control mask on a width x height canvas; needs the face box."""
        if self.bbox is None:
            raise InvalidParameterError("enhance_face_region", "no face box is known (bare keypoints): give a "
                                                               "control mask instead, or turn it off")
        w, h = self._size(width, height)
        fit = fit_canvas(self.size, (w, h), self.kps, self.bbox)
        return face_region_mask(w, h, fit.apply(np.asarray(self.bbox).reshape(2, 2)).reshape(4))


@dataclass
class Identity:
    embedding: np.ndarray  # (512,) float32, the combined raw embedding; (photos, 512) with combine="concat"
    pose: Pose
    faces: list[Face] = field(default_factory=list)  # the face used from each photo, in order


@dataclass(frozen=True)
class Detection:
    """Which face of a photo is used, and how the detector looks for faces (defaults: the demo's)."""

    det_size: int | None = None  # the detector's input side; None: the face model's (640)
    retry: bool = False  # no face found: retry 64 pixels smaller at a time down to 192 (ComfyUI_InstantID)
    face_index: int | None = None  # None: the largest face (the demo's); N: the N-th, left to right (as people)

    def __post_init__(self):
        if self.det_size is not None:
            check_det_size(self.det_size)
        if self.face_index is not None and (isinstance(self.face_index, bool) or not isinstance(
                self.face_index, (int, np.integer)) or self.face_index < 0):
            raise InvalidParameterError("face_index", f"must be a whole number from 0, got {self.face_index!r}")


DEMO = Detection()


def combine_embeddings(embeddings: list[np.ndarray], mode: str = defaults.COMBINE) -> np.ndarray:
    """Several photos' raw embeddings as one identity, as ComfyUI_InstantID's ``combine_embeds`` choices:
    - "average": the element-wise mean (the official demo's; ``mean_embedding``), shape (512,);
    - "norm_average": the mean of the unit vectors, so that every photo pulls the direction equally whatever its
      embedding's length, scaled to the photos' mean length (the adapter was trained on raw embeddings, ~20-30
      long: a unit-length mean would act like no identity), shape (512,). ComfyUI_InstantID's "norm average"
      divides each dimension by its norm across the photos instead;
    - "concat": the embeddings one per row, shape (photos, 512): each goes through the Resampler alone and the
      UNet attends to their 16 ID tokens each side by side (ComfyUI_InstantID's "concat" keeps them apart too).
    One photo gives its own embedding in every mode (a (1, 512) row with "concat")."""
    if mode not in defaults.COMBINE_MODES:
        raise InvalidParameterError("combine", f"must be one of {list(defaults.COMBINE_MODES)}, got {mode!r}")
    if not embeddings:
        raise ValueError("at least one embedding is needed")
    stack = np.stack([np.asarray(e, dtype=np.float32).reshape(-1) for e in embeddings])
    if mode == "concat":
        return stack
    if mode == "average":
        return np.mean(stack, axis=0).astype(np.float32)
    norms = np.linalg.norm(stack.astype(np.float64), axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise InvalidParameterError("combine", "norm_average needs embeddings of non-zero length")
    return (np.mean(stack / norms, axis=0) * norms.mean()).astype(np.float32)


def pick_face(faces: list[Face], name: str, index: int | None) -> Face:
    """The largest face (``index`` None; faces come largest first) or the index-th left to right."""
    from .errors import NoFaceError
    from .people import sorted_left_to_right

    if not faces:
        raise NoFaceError(name)
    if index is None:
        return faces[0]
    if index >= len(faces):
        raise InvalidParameterError("face_index", f"{name} has {len(faces)} face(s) (counted from 0, left to "
                                                  f"right); there is no face {index}")
    return sorted_left_to_right(faces)[index]


def analyze_face(analyzer: FaceModel, name: str, image: Image.Image,
                 detection: Detection = DEMO) -> tuple[Face, tuple[int, int]]:
    """The face ``detection`` picks (default: the largest) of one photo after the reference resize, and the size of
    the analysed canvas."""
    canvas = resize_for_analysis(image)
    if detection == DEMO:
        return analyzer.largest_face(canvas, name), canvas.size
    faces = analyzer.analyze(canvas, det_size=detection.det_size, retry=detection.retry)
    return pick_face(faces, name, detection.face_index), canvas.size


def analyze_faces(analyzer: FaceModel, photos: list[tuple[str, Image.Image]],
                  should_stop=None, detection: Detection = DEMO) -> list[tuple[Face, tuple[int, int]]]:
    """``analyze_face`` of each named photo, in order (NoFaceError names the first one without a face);
    ``should_stop()`` true before a photo raises DecodeAborted (the caller gave up)."""
    found = []
    for name, image in photos:
        if should_stop is not None and should_stop():
            raise DecodeAborted("the request is gone")
        found.append(analyze_face(analyzer, name, image, detection))
    return found


def identity_of(found: list[tuple[Face, tuple[int, int]]], combine: str = defaults.COMBINE) -> Identity:
    """One Identity from analysed photos (``analyze_faces``): their embeddings combined (default: the mean raw
    embedding), the first photo's pose."""
    if not found:
        raise ValueError("at least one reference photo is needed")
    faces = [face for face, _ in found]
    first, size = found[0]
    embedding = mean_embedding(faces) if combine == "average" else combine_embeddings(
        [f.embedding for f in faces], combine)
    return Identity(embedding=embedding, pose=Pose(first.kps.copy(), size, first.bbox.copy()), faces=faces)


def build_identity(analyzer: FaceModel, photos: list[tuple[str, Image.Image]], should_stop=None, *,
                   detection: Detection = DEMO, combine: str = defaults.COMBINE) -> Identity:
    """Analyse named photos (NoFaceError names the first one without a face) into one Identity. The CLI and the
    service's FaceAnalyzer deployment both build identities here."""
    if not photos:
        raise ValueError("at least one reference photo is needed")
    if combine not in defaults.COMBINE_MODES:  # before any photo is analysed
        combine_embeddings([np.zeros(1)], combine)
    return identity_of(analyze_faces(analyzer, photos, should_stop, detection), combine)


def build_pose(analyzer: FaceModel, name: str, image: Image.Image, detection: Detection = DEMO) -> Pose:
    face, size = analyze_face(analyzer, name, image, detection)
    return Pose(face.kps.copy(), size, face.bbox.copy())

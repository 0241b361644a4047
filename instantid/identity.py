"""From reference photos to what the pipeline conditions on: one embedding and five keypoints.

Several photos average their raw ArcFace embeddings; the keypoints come from the first photo, or from a
separate pose photo. Photos are resized as the official demo does before analysis, and keypoints are kept in
the coordinates of that analysed canvas together with its size, so they can be drawn on any output size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import InvalidParameterError
from .face import Face, FaceModel, mean_embedding, resize_for_analysis
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
    embedding: np.ndarray  # (512,) float32, the mean raw embedding
    pose: Pose
    faces: list[Face] = field(default_factory=list)  # the face used from each photo, in order


def analyze_face(analyzer: FaceModel, name: str, image: Image.Image) -> tuple[Face, tuple[int, int]]:
    """The largest face of one photo after the reference resize, and the size of the analysed canvas."""
    canvas = resize_for_analysis(image)
    return analyzer.largest_face(canvas, name), canvas.size


def analyze_faces(analyzer: FaceModel, photos: list[tuple[str, Image.Image]],
                  should_stop=None) -> list[tuple[Face, tuple[int, int]]]:
    """``analyze_face`` of each named photo, in order (NoFaceError names the first one without a face);
    ``should_stop()`` true before a photo raises DecodeAborted (the caller gave up)."""
    found = []
    for name, image in photos:
        if should_stop is not None and should_stop():
            raise DecodeAborted("the request is gone")
        found.append(analyze_face(analyzer, name, image))
    return found


def identity_of(found: list[tuple[Face, tuple[int, int]]]) -> Identity:
    """One Identity from analysed photos (``analyze_faces``): the mean raw embedding, the first photo's pose."""
    if not found:
        raise ValueError("at least one reference photo is needed")
    faces = [face for face, _ in found]
    first, size = found[0]
    return Identity(embedding=mean_embedding(faces), pose=Pose(first.kps.copy(), size, first.bbox.copy()), faces=faces)


def build_identity(analyzer: FaceModel, photos: list[tuple[str, Image.Image]], should_stop=None) -> Identity:
    """Analyse named photos (NoFaceError names the first one without a face) into one Identity. The CLI and the
    service's FaceAnalyzer deployment both build identities here."""
    if not photos:
        raise ValueError("at least one reference photo is needed")
    return identity_of(analyze_faces(analyzer, photos, should_stop))


def build_pose(analyzer: FaceModel, name: str, image: Image.Image) -> Pose:
    face, size = analyze_face(analyzer, name, image)
    return Pose(face.kps.copy(), size, face.bbox.copy())

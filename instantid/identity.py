"""From reference photos to what the pipeline conditions on: one embedding and five keypoints.

Several photos average their raw ArcFace embeddings; the keypoints come from the first photo, or from a
separate pose photo. Photos are resized as the official demo does before analysis, and keypoints are kept in
the coordinates of that analysed canvas together with its size, so they can be drawn on any output size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .face import Face, FaceAnalyzer, mean_embedding, resize_for_analysis
from .keypoints import draw_keypoints, scale_keypoints


@dataclass
class Pose:
    kps: np.ndarray  # (5, 2) pixel coordinates on a canvas of ``size``
    size: tuple[int, int]  # (width, height)

    def draw(self, width: int | None = None, height: int | None = None) -> Image.Image:
        """The keypoint image on a width x height canvas (default: the analysed canvas itself)."""
        width, height = width or self.size[0], height or self.size[1]
        return draw_keypoints(width, height, scale_keypoints(self.kps, self.size, (width, height)))


@dataclass
class Identity:
    embedding: np.ndarray  # (512,) float32, the mean raw embedding
    pose: Pose
    faces: list[Face] = field(default_factory=list)  # the face used from each photo, in order


def analyze_face(analyzer: FaceAnalyzer, name: str, image: Image.Image) -> tuple[Face, tuple[int, int]]:
    """The largest face of one photo after the reference resize, and the size of the analysed canvas."""
    canvas = resize_for_analysis(image)
    return analyzer.largest_face(canvas, name), canvas.size


def build_identity(analyzer: FaceAnalyzer, photos: list[tuple[str, Image.Image]]) -> Identity:
    """Analyse named photos (NoFaceError names the first one without a face) into one Identity."""
    if not photos:
        raise ValueError("at least one reference photo is needed")
    found = [analyze_face(analyzer, name, image) for name, image in photos]
    faces = [face for face, _ in found]
    first, size = found[0]
    return Identity(embedding=mean_embedding(faces), pose=Pose(first.kps.copy(), size), faces=faces)


def build_pose(analyzer: FaceAnalyzer, name: str, image: Image.Image) -> Pose:
    face, size = analyze_face(analyzer, name, image)
    return Pose(face.kps.copy(), size)

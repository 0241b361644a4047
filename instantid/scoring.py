"""Identity score: does a generated image still show the reference person?

InstantID's paper measures identity fidelity as FaceSim: the cosine similarity of ArcFace embeddings between the
reference face and the face in the generated image. The output is analysed exactly as a reference photo is (the
demo's resize, then the largest face), so an output that *is* a reference photo scores exactly its cosine with
the identity. No face in the output is an answer (``face_found: False``), never an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .face import FaceModel, analysis_mapping, resize_for_analysis


def normed(embedding: np.ndarray) -> np.ndarray:
    """insightface's ``normed_embedding``: the raw embedding over its L2 norm (float64 for an exact cosine)."""
    vector = np.asarray(embedding, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two ArcFace embeddings (raw or normed), in [-1, 1]."""
    return float(np.dot(normed(a), normed(b)))


@dataclass
class IdentityScore:
    """One output image against the identity it was generated for."""

    face_found: bool
    similarity: float | None = None  # cosine with the (averaged) identity embedding; None without a face
    bbox: list[float] | None = None  # x1, y1, x2, y2 of the scored (largest) face, in the image's own pixels
    per_reference: list[float] | None = None  # cosine with each reference photo's face, when there were several

    def to_dict(self) -> dict:
        out = {"similarity": self.similarity, "face_found": self.face_found, "bbox": self.bbox}
        if self.per_reference is not None:
            out["per_reference"] = self.per_reference
        return out


def score_face(embedding: np.ndarray | None, bbox: list[float] | None, reference: np.ndarray,
               references: list[np.ndarray] | None = None) -> IdentityScore:
    """The score of an already analysed output face (``embedding`` None: no face was found). A concatenated
    identity (one row per photo) is scored against the mean of its rows, as the default identity is."""
    if reference is not None and np.ndim(reference) == 2:
        reference = np.asarray(reference, dtype=np.float32).mean(axis=0)
    if embedding is None:
        return IdentityScore(face_found=False)
    per = [cosine(embedding, r) for r in references] if references and len(references) > 1 else None
    return IdentityScore(face_found=True, similarity=cosine(embedding, reference), bbox=bbox, per_reference=per)


def output_face(analyzer: FaceModel, image: Image.Image | np.ndarray) -> tuple[np.ndarray | None, list | None]:
    """(raw embedding, bbox in the image's pixels) of the largest face of an output image, or (None, None)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    canvas = resize_for_analysis(image)  # as reference photos are analysed: a photo fed back scores exactly
    faces = analyzer.analyze(canvas)
    if not faces:
        return None, None
    return faces[0].embedding, [round(float(v), 2) for v in faces[0].to_dict(*analysis_mapping(*image.size))["bbox"]]


def score_image(analyzer: FaceModel, image: Image.Image | np.ndarray, reference: np.ndarray,
                references: list[np.ndarray] | None = None) -> IdentityScore:
    """Score one output image against the identity embedding (and each reference photo's, when several)."""
    return score_face(*output_face(analyzer, image), reference, references)


def score_people(analyzer: FaceModel, image: Image.Image | np.ndarray, regions: list, embeddings: list
                 ) -> list[IdentityScore]:
    """Several people: each person's score is that of the largest output face whose box centre lies in the
    person's region (x1, y1, x2, y2 in the image's pixels); no such face is ``face_found: False``."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    canvas = resize_for_analysis(image)
    mapping = analysis_mapping(*image.size)
    faces = [(f.embedding, f.to_dict(*mapping)["bbox"]) for f in analyzer.analyze(canvas)]  # largest first
    scores = []
    for (x1, y1, x2, y2), embedding in zip(regions, embeddings):
        inside = [(e, b) for e, b in faces if x1 <= (b[0] + b[2]) / 2 < x2 and y1 <= (b[1] + b[3]) / 2 < y2]
        face = inside[0] if inside else (None, None)
        scores.append(score_face(face[0], None if face[1] is None else [round(float(v), 2) for v in face[1]],
                                 embedding))
    return scores


def below_threshold(score: IdentityScore, min_similarity: float | None) -> bool:
    """Under ``min_similarity`` (an image without a face counts as under it); never, without a threshold."""
    if min_similarity is None:
        return False
    return not score.face_found or score.similarity < min_similarity

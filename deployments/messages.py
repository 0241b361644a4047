"""The typed messages that cross DeploymentHandles between the Ingress and its backends (Ray pickles them).

    Ingress --photos--> FaceAnalyzer.analyze   -> FaceAnalysisResult
    Ingress --GenerationTask--> Generator.denoise (denoise_stream for a job) -> GenerationResult
    Ingress --(field, type, photo bytes)--> FaceAnalyzer.control_maps -> ControlMaps

A message is built once, by the side that validated its contents (the Ingress validates client input; the
FaceAnalyzer and the Generator only produce what they computed), and read by attribute on the other side and in
the tests' fake backends: no dict shape is copied by hand anywhere. ``PreparedGeneration`` is the Ingress's own
record of a request ready for the Generator (a job keeps it between submit and run); ``load_map`` is the one
decode of a ready control map, run at both ends.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from instantid import defaults

from deployments.errors import INVALID_IMAGE


@dataclass
class FaceAnalysisResult:
    """The FaceAnalyzer's answer for one request's photos (and pose photo).

    ``embedding`` is the mean identity embedding (float32 (512,)) of the photos, ``embeddings`` each photo's own
    (outputs are scored against each reference photo too), ``faces`` each photo's largest face in the photo's own
    pixels (``FaceInfo`` dicts: source, bbox, score, kps, image_size). ``pose_kps`` (5, 2) are on ``pose_canvas``,
    the analysed canvas of the pose photo (the last photo when no pose photo was sent), and ``pose_face`` is that
    face as uploaded. Without photos (a pose photo only) the identity fields are None."""

    pose_kps: np.ndarray
    pose_canvas: list[int]
    pose_face: dict
    timings: dict[str, float]
    embedding: np.ndarray | None = None
    embeddings: list[np.ndarray] | None = None
    faces: list[dict] | None = None
    thumbnail: bytes | None = None  # a JPEG crop of the first face, when asked for
    # a group pose photo (people): every face of it, left to right, each {"kps", "bbox"} on ``pose_canvas`` and
    # "info" (its FaceInfo dict, as uploaded)
    group: list[dict] | None = None


@dataclass
class PersonPlacement:
    """One of a ``people`` request's identities, placed on the output canvas by the Ingress
    (instantid.people.place_people): the Generator draws ``kps`` and confines the identity to ``region``."""

    embedding: np.ndarray  # (512,) float32
    kps: np.ndarray  # (5, 2) on the output canvas
    region: tuple[int, int, int, int]  # x1, y1, x2, y2 on the output canvas, end-exclusive


@dataclass
class ControlMaps:
    """Control maps derived from a request's photos (deployments/ingress/controls.py), in the order asked: uint8 arrays at
    the demo's resize of each photo (HxW for canny, HxWx3 otherwise); the Generator resizes them to the output."""

    maps: list[np.ndarray]
    timings: dict[str, float]


@dataclass
class GenerationTask:
    """One generation request as the Generator batches it, validated and styled by the Ingress: the identity
    embedding, the pose (keypoints on their canvas, face box) and the resolved sampling parameters; or, for
    several people, ``people`` (then embedding, kps and canvas are None)."""

    model: str
    embedding: np.ndarray | None  # (512,) float32; (photos, 512) for combine "concat"
    kps: np.ndarray | None  # (5, 2) on ``canvas``
    canvas: tuple[int, int] | None
    width: int
    height: int
    steps: int
    scheduler: str = "default"
    prompt: str = ""
    negative_prompt: str | None = None  # None: the zero negative embedding, as in the library
    num_images: int = 1
    seed: int = 0
    guidance_scale: float = defaults.GUIDANCE_SCALE
    ip_adapter_scale: float = defaults.IP_ADAPTER_SCALE
    controlnet_conditioning_scale: float = defaults.CONTROLNET_CONDITIONING_SCALE
    loras: dict[str, float] = field(default_factory=dict)
    bbox: Any = None  # (4,) the pose face's box on ``canvas``
    enhance_face_region: bool = False  # control mask = the face box on the output canvas
    prompt_weighting: str = defaults.PROMPT_WEIGHTING
    init_image: Any = None  # img2img: the upload's bytes; the Generator decodes them on arrival (accept_task)
    strength: float = defaults.IMG2IMG_STRENGTH
    return_pose_image: bool = False
    people: list[PersonPlacement] | None = None
    # extra ControlNets: {name, map (derived HxW(x3) uint8 array, or a ready map's bytes), scale, start, end}; the
    # Generator resizes each map to width x height on arrival (accept_task)
    controls: list[dict] = field(default_factory=list)
    safety_checker: bool = True  # off only where the service's safety.allow_disable lets the request say so
    noise: float = defaults.NOISE  # the unconditional identity embedding's noise (GenerationRequest.noise)
    deadline: float | None = None  # time.time() past which nobody waits for the result
    # The Generator's own bookkeeping, reset when a task arrives there (accept_task): ``arrived`` is its clock.
    id: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)
    arrived: float = field(default_factory=time.perf_counter, compare=False)
    cancelled: bool = field(default=False, compare=False)
    on_step: Any = field(default=None, compare=False, repr=False)  # (step, total) after each step: a job's progress

    def abandoned(self, now: float) -> bool:
        """Its caller gave up (cancelled) or its deadline passed: its work is wasted."""
        return self.cancelled or (self.deadline is not None and now > self.deadline)

    def message_bytes(self) -> int:
        """The larger way across the handle: the task (an img2img upload, control maps) or its result (the RGB
        arrays). The caller sends over 1 MiB by reference (deployments/ingress/backends.py): gRPC's 4 MiB cap."""
        sent = controls_bytes(self.controls)
        if isinstance(self.init_image, (bytes, bytearray)):
            sent += len(self.init_image)
        return max(self.num_images * self.width * self.height * 3, sent)

    def batch_key(self) -> tuple:
        """Tasks with equal keys can share one denoising batch: one size, step count and scheduler, guided or not
        (classifier-free guidance doubles the batch), one LoRA set, and for img2img one strength (it cuts the
        timesteps). Prompts, prompt weighting, seeds and scales differ freely within a batch, and so does the
        number of people: the pipeline runs each extra identity's IdentityNet pass on its own rows only. A concatenated
        identity (combine "concat") has 16 ID tokens per photo: tasks share a batch with the same count only."""
        return (self.model, self.width, self.height, self.steps, self.scheduler, self.guidance_scale > 1,
                tuple(sorted(self.loras.items())),
                self.strength if self.init_image is not None else None,
                tuple(c["name"] for c in self.controls),  # one batch runs the same extra ControlNets, in order
                1 if self.embedding is None else int(np.prod(np.shape(self.embedding))) // 512)  # ID tokens / 16


@dataclass
class GenerationResult:
    """The Generator's answer for one task: uint8 HxWx3 RGB arrays (the Ingress encodes them once), the seed
    they reproduce with, the model that made them, the pose image when asked for, and per-stage timings."""

    images: list[np.ndarray]
    seed: int
    model: str
    timings: dict[str, Any]
    pose_image: np.ndarray | None = None
    nsfw: list[bool] | None = None  # per image, flagged by the safety checker (None: it did not run)


@dataclass
class BackendHealth:
    """A backend replica's health as data: what its ``ready()`` answers (the Ingress's /readyz asks each backend
    directly). ``details``: the replica's own extra facts (requests waiting, threads). While its model is not
    loaded, its ``check_health`` raises ``ModelNotLoaded`` to Serve instead."""

    ready: bool
    error: str | None = None  # one line: why not
    details: dict[str, Any] = field(default_factory=dict)


class ModelNotLoaded(RuntimeError):
    """A backend's failed health check. Serve passes only text from a replica to its deployment's status (the
    exception in a traceback); this class writes that text and ``reason_in`` reads it back, so the format lives
    here only."""

    MARK = "not loaded: "

    def __init__(self, model: str, error: str):
        self.model, self.error = model, error
        super().__init__(f"{model} {self.MARK}{error}")

    @classmethod
    def reason_in(cls, status_message: str) -> str | None:
        """The one-line reason a ``ModelNotLoaded`` put into a Serve status message ('face model not loaded:
        ...'), the last one when the message repeats it; None when there is none. Never a traceback line: the
        source line that raised it (an f-string with braces) is skipped."""
        found = None
        for line in (status_message or "").splitlines():
            for model in ("face model", "model"):  # the longer first: "model not loaded" is inside the other
                at = line.find(f"{model} {cls.MARK}")
                if at >= 0 and "{" not in line[at:]:
                    found = line[at:][:300]
                    break
        return found


def controls_bytes(controls: list[dict]) -> int:
    """What a task's control maps weigh on the wire (derived arrays, or a ready map's bytes)."""
    return sum(c["map"].nbytes if isinstance(c["map"], np.ndarray) else len(c["map"]) for c in controls)


@dataclass
class PreparedGeneration:
    """A request ready for the Generator (the Ingress's own record, kept by a job between submit and run): its
    task, and what the response needs besides the Generator's output (the pose face as reported, the identity
    embedding and each photo's for the identity score)."""

    task: GenerationTask
    face: dict
    embedding: Any
    references: list | None = None
    people: list | None = None  # the people as the response reports them (``people`` requests)


def load_map(source: bytes, i: int):
    """A ready control map (bytes) decoded as an RGB image, or the 400 ``invalid_image`` naming
    ``controls[i].map``: the one decode of ready maps, run by the Ingress (refused at submit) and the Generator."""
    from instantid.errors import InvalidImageError
    from instantid.face import load_image

    try:
        return load_image(bytes(source), name=f"controls[{i}].map")
    except InvalidImageError as exc:
        raise INVALID_IMAGE(str(exc).splitlines()[0], field=f"controls[{i}].map") from None

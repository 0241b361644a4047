"""Spatial control maps derived from a photo, as the official multi-ControlNet demo derives them
(``gradio_demo/app-multicontrolnet.py`` and ``controlnet_util.py`` of InstantX/InstantID).

- ``canny``: OpenCV Canny (100, 200) on the photo converted RGB -> BGR, a one-channel edge map;
- ``depth``: a transformers depth-estimation model (the demo: Intel/dpt-hybrid-midas through
  ``DPTForDepthEstimation``), its predicted depth resized bicubic to 1024x1024, min-max normalised to [0, 1],
  three channels, 8-bit;
- ``pose``: OpenPose body keypoints drawn as OpenPose's coloured skeleton. The demo runs controlnet_aux's
  OpenposeDetector (CMU's Caffe-era body model in torch, licensed for non-commercial use only, and a package that
  imports torchvision, timm and mediapipe-era modules at import time); we run DWPose (a YOLOX person detector and
  an RTMPose whole-body model, Apache-2.0, ONNX) through rtmlib, the maintained ONNX runner of the RTMPose
  authors, on onnxruntime, which the face analysis already uses. Its body keypoints are converted to OpenPose's
  18-point order and drawn in OpenPose's colours, which is what the SDXL OpenPose ControlNets were trained on.

Each map is then resized to the output canvas, as the demo does (``.resize((width, height))``). Weights load like
every model: hub id, directory or ``s3://`` through ``weights.resolve`` (cached; offline once fetched).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from .errors import InvalidParameterError, WeightsError

CONTROL_TYPES = ("pose", "canny", "depth")
# The demo's example scales for each extra ControlNet
DEFAULT_SCALES = {"pose": 0.4, "canny": 0.3, "depth": 0.5}
# The ControlNets the demo pairs with each type (SDXL, diffusers layout)
DEFAULT_CONTROLNETS = {
    "pose": "thibaud/controlnet-openpose-sdxl-1.0",
    "canny": "diffusers/controlnet-canny-sdxl-1.0",
    "depth": "diffusers/controlnet-depth-sdxl-1.0-small",
}
# The models that derive a map; canny needs none
DEFAULT_PREPROCESSORS = {"depth": "Intel/dpt-hybrid-midas", "pose": "yzd-v/DWPose"}

DEPTH_PATTERNS = ["config.json", "preprocessor_config.json", "model.safetensors"]
DEPTH_SIZE = (1024, 1024)  # the demo interpolates the predicted depth to this before resizing to the output
# DWPose's files as yzd-v/DWPose (and controlnet_aux) name them
POSE_DETECTOR_FILE = "yolox_l.onnx"
POSE_MODEL_FILE = "dw-ll_ucoco_384.onnx"
POSE_PATTERNS = [POSE_DETECTOR_FILE, POSE_MODEL_FILE]
POSE_CANVAS = 512  # the map is drawn with its short side at OpenPose's detect resolution, then resized
POSE_SCORE_THRESHOLD = 0.3  # DWPose's keypoint threshold for drawing


def canny_map(image: PIL.Image.Image, low: int = 100, high: int = 200) -> PIL.Image.Image:
    """The demo's ``get_canny_image``: Canny on the BGR array (OpenCV takes the strongest channel's gradient)."""
    import cv2

    bgr = cv2.cvtColor(np.array(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    return PIL.Image.fromarray(cv2.Canny(bgr, low, high), "L")


class DepthEstimator:
    """A transformers depth-estimation model (DPT) and its image processor, on CPU in float32."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self._lock = threading.Lock()  # torch modules are shared; a map at a time per estimator

    @classmethod
    def load(cls, ref: str) -> "DepthEstimator":
        from transformers import AutoImageProcessor, DPTForDepthEstimation

        from .weights import resolve

        path = resolve(ref, allow_patterns=DEPTH_PATTERNS)
        if not (path / "config.json").is_file():
            raise WeightsError(f"malformed depth model at {path}: missing config.json")
        try:
            model = DPTForDepthEstimation.from_pretrained(path).eval()
            processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise WeightsError(f"cannot load depth model from {path}: {exc}".splitlines()[0]) from exc
        return cls(model, processor)

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        import torch
        from torch.nn import functional as F

        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
        with self._lock, torch.no_grad():
            depth = self.model(pixel_values=pixels).predicted_depth
        depth = F.interpolate(depth.unsqueeze(1), size=DEPTH_SIZE, mode="bicubic", align_corners=False)
        low = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
        high = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
        depth = (depth - low) / (high - low)
        rgb = torch.cat([depth] * 3, dim=1).permute(0, 2, 3, 1).numpy()[0]
        return PIL.Image.fromarray((rgb * 255.0).clip(0, 255).astype(np.uint8))


class PoseEstimator:
    """DWPose through rtmlib: YOLOX finds people, RTMPose places keypoints; drawn as OpenPose's body skeleton."""

    def __init__(self, detector, estimator):
        self.detector, self.estimator = detector, estimator

    @classmethod
    def load(cls, ref: str) -> "PoseEstimator":
        from .weights import resolve

        path = resolve(ref, allow_patterns=POSE_PATTERNS)
        missing = [name for name in POSE_PATTERNS if not (path / name).is_file()]
        if missing:
            raise WeightsError(f"malformed pose model at {path}: missing {', '.join(missing)}")
        try:
            from rtmlib import YOLOX, RTMPose
        except ImportError as exc:  # pragma: no cover - a dependency
            raise WeightsError("pose control needs rtmlib (pip install rtmlib)") from exc
        try:
            with contextlib.redirect_stdout(sys.stderr):  # rtmlib prints each file it loads
                detector = YOLOX(str(path / POSE_DETECTOR_FILE), model_input_size=_input_size(path / POSE_DETECTOR_FILE),
                                 backend="onnxruntime", device="cpu")
                estimator = RTMPose(str(path / POSE_MODEL_FILE), model_input_size=_input_size(path / POSE_MODEL_FILE),
                                    to_openpose=True, backend="onnxruntime", device="cpu")
        except Exception as exc:  # onnxruntime raises its own types for a file that is not a model
            raise WeightsError(f"cannot load pose model from {path}: {type(exc).__name__}: {exc}".splitlines()[0]) \
                from exc
        return cls(detector, estimator)

    def keypoints(self, image: PIL.Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """(people, 18, 2) OpenPose-ordered body keypoints in the photo's pixels, and their (people, 18) scores."""
        bgr = np.ascontiguousarray(np.array(image.convert("RGB"))[:, :, ::-1])
        boxes = self.detector(bgr)
        if len(boxes) == 0:
            return np.zeros((0, 18, 2)), np.zeros((0, 18))
        keypoints, scores = self.estimator(bgr, bboxes=boxes)
        keypoints, scores = keypoints[:, :18], scores[:, :18]
        lost = ~np.isfinite(keypoints).all(axis=-1)
        return np.nan_to_num(keypoints), np.where(lost, 0.0, scores)

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        from rtmlib import draw_skeleton

        keypoints, scores = self.keypoints(image)
        width, height = image.size
        scale = POSE_CANVAS / min(width, height)
        canvas = np.zeros((max(1, round(height * scale)), max(1, round(width * scale)), 3), dtype=np.uint8)
        if len(keypoints):
            # rtmlib doubles both for OpenPose's style: circles of radius 4, limbs 4 px wide, as OpenPose draws at
            # 512; its colour table is OpenPose's RGB one, so the canvas is read as RGB
            canvas = draw_skeleton(canvas, keypoints * scale, scores, openpose_skeleton=True,
                                   kpt_thr=POSE_SCORE_THRESHOLD, radius=2, line_width=2)
        return PIL.Image.fromarray(canvas)


def _input_size(path: Path) -> tuple[int, int]:
    """An ONNX model's fixed (width, height) input, from its first input's shape (1, 3, H, W)."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    height, width = (d.dim_value for d in dims[2:4])
    if not (height and width):
        raise WeightsError(f"{path}: the model's input has no fixed size")
    return width, height


@dataclass
class Preprocessors:
    """The map derivers of one deployment: canny needs no model; depth and pose load once, on first use or at
    ``preload``."""

    depth: str = DEFAULT_PREPROCESSORS["depth"]
    pose: str = DEFAULT_PREPROCESSORS["pose"]

    def __post_init__(self):
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()

    def model(self, kind: str):
        with self._lock:
            if kind not in self._loaded:
                loader = {"depth": DepthEstimator, "pose": PoseEstimator}[kind]
                self._loaded[kind] = loader.load(getattr(self, kind))
            return self._loaded[kind]

    def preload(self, kinds) -> list[str]:
        """Load now the models of the control types in ``kinds`` that need one (depth, pose; canny needs none), as a
        replica does at start for the types its config offers; returns them. A failure names the preprocessor."""
        wanted = [kind for kind in ("depth", "pose") if kind in set(kinds)]
        for kind in wanted:
            try:
                self.model(kind)
            except WeightsError as exc:
                raise WeightsError(f"{kind} preprocessor {getattr(self, kind)}: {exc}") from exc
        return wanted

    def derive(self, kind: str, image: PIL.Image.Image, size: tuple[int, int] | None = None) -> PIL.Image.Image:
        """The ``kind`` map of ``image``, resized to ``size`` (width, height) when given, as the demo does."""
        if kind not in CONTROL_TYPES:
            raise InvalidParameterError("control type", f"unknown {kind!r}; choose one of {list(CONTROL_TYPES)}")
        result = canny_map(image) if kind == "canny" else self.model(kind)(image)
        if size is not None and result.size != tuple(size):
            result = result.resize(tuple(size))
        return result


@dataclass
class ControlSpec:
    """One extra ControlNet of a request: a ``photo`` to derive the ``kind`` map from, or a ready ``map``."""

    kind: str
    photo: PIL.Image.Image | None = None
    map: PIL.Image.Image | None = None
    scale: float | None = None  # None: the demo's default for the kind
    start: float = 0.0
    end: float = 1.0


def prepare_controls(preprocessors: Preprocessors, specs: list[ControlSpec], size: tuple[int, int]):
    """The pipeline's ``ControlInput``s (named by kind, as the ControlNets are loaded) for ``specs`` on a
    ``size`` (width, height) canvas: a ready map is resized; a photo's map is derived from the photo after the
    demo's resize (min side 1024, max side 1280, as it resizes its face and pose photos), then resized."""
    from .face import resize_for_analysis
    from .pipeline import ControlInput

    inputs = []
    for i, spec in enumerate(specs):
        if (spec.photo is None) == (spec.map is None):
            raise InvalidParameterError(f"controls[{i}]", "give a photo to derive the map from, or a ready map")
        # RGB, as diffusers' control image processor converts every map (canny's is one channel)
        image = (spec.map.convert("RGB").resize(tuple(size)) if spec.map is not None
                 else preprocessors.derive(spec.kind, resize_for_analysis(spec.photo), size).convert("RGB"))
        scale = DEFAULT_SCALES.get(spec.kind, 1.0) if spec.scale is None else spec.scale
        inputs.append(ControlInput(spec.kind, image, scale, spec.start, spec.end))
    return inputs

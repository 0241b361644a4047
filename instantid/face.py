"""Face analysis: image loading, the official demo's analysis resize, and insightface detection + embedding.

InstantID conditions on insightface's *raw* ArcFace embedding (``face.embedding``, not ``normed_embedding``)
and on the five keypoints of the largest face, exactly as the official demo does; this module returns both.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import weights
from .errors import InvalidImageError, InvalidParameterError, NoFaceError, WeightsError

ACCEPTED_FORMATS = {"JPEG", "PNG", "WEBP"}
EMBEDDING_DIM = 512
MODULES = ["detection", "recognition"]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode a JPEG, PNG or WebP file (path) or upload (bytes) into an RGB image with EXIF orientation applied."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "uploaded image"
        stream = io.BytesIO(bytes(source))
    else:
        label = name or str(source)
        try:
            stream = io.BytesIO(Path(source).expanduser().read_bytes())
        except OSError as exc:
            raise InvalidImageError(f"cannot read {label}: {exc.strerror or _one_line(exc)}") from exc
    try:
        image = Image.open(stream)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"{label} is not a readable image (JPEG, PNG or WebP expected)") from exc
    # judge by decoded content, not by file name or declared content type
    if image.format not in ACCEPTED_FORMATS:
        raise InvalidImageError(f"{label} is a {image.format} image; only JPEG, PNG and WebP are accepted")
    try:
        image.load()  # decode now: a truncated file fails here rather than deep inside the pipeline
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"{label} is truncated or corrupt: {_one_line(exc)}") from exc


def resize_for_analysis(image: Image.Image) -> Image.Image:
    """The official demo's ``resize_img`` (max_side=1280, min_side=1024, base 64): two bilinear resizes.

    Kept step for step, rounding included, so detected keypoints and embeddings match the reference.
    """
    (w_resize, h_resize), (new_w, new_h) = _analysis_sizes(*image.size)
    image = image.resize([w_resize, h_resize], Image.BILINEAR)
    return image.resize([new_w, new_h], Image.BILINEAR)


def analysis_size(width: int, height: int) -> tuple[int, int]:
    """The size ``resize_for_analysis`` gives a width x height image (the demo's output size for it)."""
    return _analysis_sizes(width, height)[1]


def _analysis_sizes(width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    w, h = width, height
    ratio = 1024 / min(h, w)
    w, h = round(ratio * w), round(ratio * h)
    ratio = 1280 / max(h, w)
    w_resize, h_resize = round(ratio * w), round(ratio * h)
    new_w, new_h = (w_resize // 64) * 64, (h_resize // 64) * 64
    if new_w == 0 or new_h == 0:  # the reference would crash on PIL; say why instead
        raise InvalidImageError(f"image of {width}x{height} is too elongated to analyse")
    return (w_resize, h_resize), (new_w, new_h)


@dataclass
class Face:
    """One detected face in the coordinates of the analysed image."""

    bbox: np.ndarray  # (4,) float32: x1, y1, x2, y2
    score: float
    kps: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left mouth corner, right mouth corner
    embedding: np.ndarray  # (512,) float32, insightface's raw embedding (InstantID is trained on it unnormalised)

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def to_dict(self) -> dict:
        """JSON-able summary (the embedding is left out: it is large and an identity biometric)."""
        return {
            "bbox": [float(v) for v in self.bbox],
            "score": float(self.score),
            "kps": [[float(x), float(y)] for x, y in self.kps],
        }


def _cuda_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _pack_dir(model: str, root: str | None) -> Path:
    """Local directory of a face pack: an existing directory, an ``s3://`` prefix, or a name under the root."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve()
    if weights.is_s3(model):
        path = weights.resolve(model)
        if not path.is_dir():
            raise WeightsError(f"face model {model} is a single object, expected a directory of ONNX files")
        return path
    if os.sep in model or model.startswith(("~", ".")):
        raise WeightsError(f"face model directory {model} does not exist")
    base = Path(root or os.environ.get("INSIGHTFACE_HOME") or "~/.insightface").expanduser()
    path = base / "models" / model
    if not path.is_dir():
        # checked here because insightface would otherwise try to download the pack
        raise WeightsError(f"face model pack {model!r} not found: {path} does not exist (no download is attempted)")
    return path.resolve()


class FaceAnalyzer:
    """insightface detection + recognition on a local, S3 or named pack (antelopev2 layout)."""

    def __init__(
        self,
        model: str = "antelopev2",
        *,
        root: str | None = None,
        providers: list[str] | None = None,
        det_size: tuple[int, int] = (640, 640),
        threads: int | None = None,
    ):
        import onnxruntime
        from insightface.app import FaceAnalysis

        model = str(model)
        self.pack_dir = _pack_dir(model, root)
        if not any(self.pack_dir.glob("*.onnx")):
            raise WeightsError(f"face model {model}: no .onnx files in {self.pack_dir}")
        if providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if _cuda_available() else [
                "CPUExecutionProvider"]
        self.providers = list(providers)
        # analyze() alternates between two sessions; spinning idle threads of one would steal the cores the other
        # needs (measured 1.2-1.7x faster without). ``threads`` caps each session to the replica's CPU share.
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        try:
            # an existing directory as name: insightface loads it in place and never downloads
            self.app = FaceAnalysis(name=str(self.pack_dir), root=str(self.pack_dir.parent),
                                    allowed_modules=MODULES, providers=self.providers, sess_options=options)
        except AssertionError as exc:  # insightface asserts a detector was found
            raise WeightsError(f"face model {model}: no face detector among the ONNX files in {self.pack_dir}") from exc
        except Exception as exc:  # onnxruntime/onnx raise many types for a corrupt file
            raise WeightsError(f"face model {model}: cannot load {self.pack_dir}: {type(exc).__name__}: "
                               f"{_one_line(exc)}") from exc
        missing = [m for m in MODULES if m not in self.app.models]
        if missing:
            raise WeightsError(f"face model {model}: no {' or '.join(missing)} model in {self.pack_dir}")
        ctx_id = 0 if "CUDAExecutionProvider" in self.providers else -1
        self.app.prepare(ctx_id=ctx_id, det_size=tuple(det_size))

    def analyze(self, image: Image.Image | np.ndarray) -> list[Face]:
        """Detect and embed every face of an RGB image; largest box first."""
        if isinstance(image, Image.Image):
            rgb = np.asarray(image.convert("RGB"))
        else:
            rgb = np.asarray(image)
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise InvalidImageError(f"expected an HxWx3 uint8 RGB array, got {rgb.dtype} {rgb.shape}")
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # insightface, like OpenCV, works in BGR
        faces = [
            Face(
                bbox=np.asarray(f.bbox[:4], dtype=np.float32),
                score=float(f.det_score),
                kps=np.asarray(f.kps, dtype=np.float32).reshape(5, 2),
                embedding=np.asarray(f.embedding, dtype=np.float32).reshape(EMBEDDING_DIM),
            )
            for f in self.app.get(bgr)
        ]
        return sorted(faces, key=lambda f: f.area, reverse=True)  # stable: equal areas keep detector order

    def largest_face(self, image: Image.Image | np.ndarray, source: str) -> Face:
        """The largest face, as the official demo uses; NoFaceError naming ``source`` when there is none."""
        faces = self.analyze(image)
        if not faces:
            raise NoFaceError(source)
        return faces[0]


def mean_embedding(faces: list[Face]) -> np.ndarray:
    """Element-wise mean of the faces' raw embeddings (several photos of one identity)."""
    if not faces:
        raise ValueError("mean_embedding needs at least one face")
    return np.mean(np.stack([f.embedding for f in faces]).astype(np.float32), axis=0).astype(np.float32)


def _numeric_array(x, field: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged nesting and the like
        raise InvalidParameterError(field, "must be an array of numbers") from exc
    # refuse strings/bools/objects instead of letting numpy coerce "1.5" or True into a float
    if arr.dtype.kind not in "iuf":
        raise InvalidParameterError(field, "must be an array of numbers")
    return arr.astype(np.float32)


def validate_embedding(x) -> np.ndarray:
    """A caller-supplied identity embedding: 512 finite numbers, returned as float32 of shape (512,)."""
    arr = _numeric_array(x, "face_embedding")
    if arr.shape not in ((EMBEDDING_DIM,), (1, EMBEDDING_DIM)):
        raise InvalidParameterError("face_embedding", f"must have {EMBEDDING_DIM} values, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InvalidParameterError("face_embedding", "must contain only finite numbers")
    return arr.reshape(EMBEDDING_DIM)


def validate_keypoints(x) -> np.ndarray:
    """Caller-supplied keypoints: exactly 5 finite [x, y] points, returned as float32 of shape (5, 2)."""
    arr = _numeric_array(x, "face_kps")
    if arr.shape != (5, 2):
        raise InvalidParameterError("face_kps", f"must be 5 [x, y] points, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InvalidParameterError("face_kps", "must contain only finite numbers")
    return arr

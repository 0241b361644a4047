"""Face analysis: image loading, the official demo's analysis resize, and insightface detection + embedding.

InstantID conditions on insightface's *raw* ArcFace embedding (``face.embedding``, not ``normed_embedding``)
and on the five keypoints of the largest face, exactly as the official demo does; this module returns both.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import defaults, weights
from .errors import InvalidImageError, InvalidParameterError, NoFaceError, WeightsError
from .image_limits import (MAX_DECODE_PIXELS, DecodeAborted, check_format, check_structure, open_bounded,
                           unreadable)

# A photo that takes longer than this to decode is refused (a bounded-scan JPEG at the pixel limit takes ~1 s).
DECODE_TIMEOUT_S = 10.0
EMBEDDING_DIM = 512
MODULES = ["detection", "recognition"]
log = logging.getLogger(__name__)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_image(source: str | Path | bytes, name: str | None = None, *, timeout_s: float = DECODE_TIMEOUT_S,
               should_stop=None, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Decode a JPEG (or a phone's MPO: its first frame), PNG or WebP file (path) or upload (bytes) into an RGB
    image with EXIF orientation applied. The decode is bounded (``instantid.image_limits``): refused when its
    framing is hostile, over ``max_pixels`` or past the scans its size may cost, stopped past ``timeout_s`` or
    as soon as ``should_stop()`` is true."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "uploaded image"
        data = bytes(source)
    else:
        label = name or str(source)
        try:
            data = Path(source).expanduser().read_bytes()
        except OSError as exc:
            raise InvalidImageError(f"cannot read {label}: {exc.strerror or _one_line(exc)}") from exc
    check_structure(data, label)
    try:
        image = open_bounded(data, label, timeout_s, should_stop, max_pixels)
    except InvalidImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise unreadable(label) from exc
    check_format(image.format, label)
    try:
        image.load()  # decode now: a truncated file fails here rather than deep inside the pipeline
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except InvalidImageError:  # stopped by a bound (DecodeAborted included): its own message
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"{label} is truncated or corrupt: {_one_line(exc)}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with 16-bit grayscale (PNG's I;16 and the 32-bit I mode Pillow may give it) scaled to 8 bits:
    Pillow's own conversion clips every value above 255 to white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        levels = np.asarray(image)
        if levels.dtype.kind == "i":  # mode I: 32-bit signed
            levels = np.clip(levels, 0, 65535)
        image = Image.fromarray((levels >> 8).astype(np.uint8))
    return image.convert("RGB")


def resize_for_analysis(image: Image.Image) -> Image.Image:
    """The photo on the demo's canvas without squashing it: the official demo's ``resize_img`` (max_side=1280,
    min_side=1024, base 64) first resize (bilinear, rounding as the reference, one scale for both axes), then a
    centred crop to the demo's output size (each side floored to a multiple of 64: at most 63 pixels cut).

    The demo resizes a second time, non-uniformly, to that size, which squashes the face by up to ~6 % on a photo
    whose sides are not multiples of 64; the crop keeps the person's proportions and the demo's output size.
    ``analysis_mapping`` maps the canvas's coordinates back onto the photo.
    """
    (w_resize, h_resize), (new_w, new_h) = _analysis_sizes(*image.size)
    image = image.resize([w_resize, h_resize], Image.BILINEAR)
    left, top = _crop_origin((w_resize, h_resize), (new_w, new_h))
    return image.crop((left, top, left + new_w, top + new_h))


def analysis_size(width: int, height: int) -> tuple[int, int]:
    """The size ``resize_for_analysis`` gives a width x height image (the demo's output size for it)."""
    return _analysis_sizes(width, height)[1]


def analysis_mapping(width: int, height: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, offset), each (x, y): a point on the analysed canvas of a width x height photo lies at
    ``canvas * scale + offset`` on the photo (the scales differ only by the resize's rounding)."""
    (w_resize, h_resize), size = _analysis_sizes(width, height)
    sx, sy = width / w_resize, height / h_resize
    left, top = _crop_origin((w_resize, h_resize), size)
    return (sx, sy), (left * sx, top * sy)


def _crop_origin(resized: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    return (resized[0] - size[0]) // 2, (resized[1] - size[1]) // 2


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

    def to_dict(self, scale: tuple[float, float] = (1.0, 1.0), offset: tuple[float, float] = (0.0, 0.0)) -> dict:
        """JSON-able summary, coordinates mapped by ``canvas * scale + offset`` (each x, y): from the analysed
        canvas to the photo as given, ``analysis_mapping(*photo.size)``. The embedding is left out: it is large
        and an identity biometric. The CLI's report and the service's ``FaceInfo`` both start here."""
        sx, sy = float(scale[0]), float(scale[1])
        ox, oy = float(offset[0]), float(offset[1])
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return {
            "bbox": [x1 * sx + ox, y1 * sy + oy, x2 * sx + ox, y2 * sy + oy],
            "score": float(self.score),
            "kps": [[float(x) * sx + ox, float(y) * sy + oy] for x, y in np.asarray(self.kps)],
        }


def _cuda_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


# InstantID's adapter and IdentityNet were trained on antelopev2's embeddings (glintr100) and keypoints (SCRFD-10G):
# another pack with the same interfaces loads and runs, but its embeddings do not preserve identity.
TRAINED_ON = "antelopev2"
TRAINED_RECOGNIZER = "glintr100.onnx"
PACK_PATTERNS = ["*.onnx"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def insightface_home(root: str | None = None) -> Path:
    """insightface's model root: ``root``, else ``$INSIGHTFACE_HOME``, else ``~/.insightface``."""
    return Path(root or os.environ.get("INSIGHTFACE_HOME") or "~/.insightface").expanduser()


def is_hub_id(model: str) -> bool:
    """``owner/name`` that is not an existing path: a face pack on the Hugging Face hub."""
    return bool(_HUB_ID.fullmatch(model)) and not Path(model).expanduser().exists()


def _onnx_dir(path: Path, model: str) -> Path:
    """The directory of a downloaded pack that holds its ONNX files (the top level, or one folder down)."""
    if any(path.glob("*.onnx")):
        return path
    nested = sorted({p.parent for p in path.glob("*/*.onnx")})
    if len(nested) == 1:
        return nested[0]
    raise WeightsError(f"face model {model}: no .onnx files in {path}")


def pack_dir(model: str, root: str | None = None) -> Path:
    """Local directory of a face pack: an existing directory, an ``s3://`` prefix, a hub repo id
    (``owner/name``, fetched into the Hugging Face cache; offline when HF_HUB_OFFLINE is set), or a name under
    ``root``/``$INSIGHTFACE_HOME``/models. insightface's own downloader is never used (its links are dead)."""
    model = str(model)
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve()
    if weights.is_s3(model):
        path = weights.resolve(model)
        if not path.is_dir():
            raise WeightsError(f"face model {model} is a single object, expected a directory of ONNX files")
        return path
    if is_hub_id(model):
        return _onnx_dir(weights.resolve(model, allow_patterns=PACK_PATTERNS), model)
    if os.sep in model or model.startswith(("~", ".")):
        raise WeightsError(f"face model directory {model} does not exist")
    path = insightface_home(root) / "models" / model
    if not path.is_dir():
        # checked here because insightface would otherwise try to download the pack
        raise WeightsError(f"face model pack {model!r} not found: {path} does not exist (get it with "
                           f"`instantid download`, or name a directory, s3:// prefix or hub repo)")
    return path.resolve()


def check_instantid_pack(models: dict, model: str) -> None:
    """Refuse a pack InstantID cannot use, judged on the models insightface routed its ONNX files to (by their
    graphs' inputs and outputs): a detector with five keypoints (IdentityNet draws them) and a recogniser
    with 512-d embeddings (the adapter's input)."""
    det, rec = models["detection"], models["recognition"]
    det_name, rec_name = Path(det.model_file).name, Path(rec.model_file).name
    outputs = det.session.get_outputs()
    if not getattr(det, "use_kps", False):
        raise WeightsError(f"face model {model}: detector {det_name} gives no facial keypoints ({len(outputs)} "
                           f"outputs; InstantID needs a detector with five keypoints, such as {TRAINED_ON}'s SCRFD)")
    # SCRFD's outputs: scores, boxes, then keypoints per stride (fmc of each); a keypoint row is x, y per point
    widths = {o.shape[-1] for o in outputs[2 * det.fmc:3 * det.fmc] if o.shape and isinstance(o.shape[-1], int)}
    if widths - {10}:
        raise WeightsError(f"face model {model}: detector {det_name} gives {max(widths) // 2} keypoints per face; "
                           f"InstantID needs five, as {TRAINED_ON}'s SCRFD gives")
    shape = list(rec.output_shape)
    if len(shape) != 2 or shape[-1] != EMBEDDING_DIM:
        raise WeightsError(f"face model {model}: recogniser {rec_name} gives embeddings of shape {shape}; InstantID "
                           f"needs {EMBEDDING_DIM}-d embeddings (its adapter was trained on {TRAINED_ON}'s)")
    if rec_name != TRAINED_RECOGNIZER:
        log.warning("face model %s: recogniser %s is not %s's %s; InstantID's adapter was trained on %s "
                    "embeddings, so identity may not be preserved", model, rec_name, TRAINED_ON,
                    TRAINED_RECOGNIZER, TRAINED_ON)


class FaceModel:
    """insightface detection + recognition on a local, S3, hub or named pack (antelopev2 layout).

    Any pack whose detector gives five keypoints and whose recogniser gives 512-d embeddings loads, but
    InstantID's adapter was trained on antelopev2's embeddings: another recogniser loses the identity.
    (The service's FaceAnalyzer deployment, deployments/face_analyzer/deployment.py, runs one per replica.)
    """

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
        self.pack_dir = pack_dir(model, root)
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
        check_instantid_pack(self.app.models, model)
        ctx_id = 0 if "CUDAExecutionProvider" in self.providers else -1
        self.app.prepare(ctx_id=ctx_id, det_size=tuple(det_size))

    def analyze(self, image: Image.Image | np.ndarray, det_size: int | None = None,
                retry: bool = False) -> list[Face]:
        """Detect and embed every face of an RGB image; largest box first.

        ``det_size``: the detector's input side for this call (default: the model's, 640); a larger one finds
        smaller faces, at a cost that grows with its square. ``retry``: when no face is found, try again 64 pixels
        smaller at a time down to 192, as ComfyUI_InstantID does (a face that fills the photo is too large for
        the detector's anchors at 640)."""
        if det_size is not None:
            check_det_size(det_size)
        if isinstance(image, Image.Image):
            rgb = np.asarray(image.convert("RGB"))
        else:
            rgb = np.asarray(image)
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise InvalidImageError(f"expected an HxWx3 uint8 RGB array, got {rgb.dtype} {rgb.shape}")
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # insightface, like OpenCV, works in BGR
        sizes = [det_size]
        if retry:
            first = det_size or int(self.app.det_model.input_size[0])
            sizes += list(range(first - 64, defaults.DET_RETRY_MIN - 1, -64))
        for size in sizes:
            found = self._get(bgr, size)
            if found:
                break
        faces = [
            Face(
                bbox=np.asarray(f.bbox[:4], dtype=np.float32),
                score=float(f.det_score),
                kps=np.asarray(f.kps, dtype=np.float32).reshape(5, 2),
                embedding=np.asarray(f.embedding, dtype=np.float32).reshape(EMBEDDING_DIM),
            )
            for f in found
        ]
        return sorted(faces, key=lambda f: f.area, reverse=True)  # stable: equal areas keep detector order

    def _get(self, bgr: np.ndarray, det_size: int | None) -> list:
        """insightface's ``FaceAnalysis.get`` (detection, then recognition of each face), with the detector's input
        size passed per call rather than set on the shared model (concurrent calls may ask for other sizes)."""
        if det_size is None:
            return self.app.get(bgr)
        from insightface.app.common import Face as InsightFace

        bboxes, kpss = self.app.det_model.detect(bgr, input_size=(det_size, det_size), max_num=0, metric="default")
        found = []
        for i in range(bboxes.shape[0]):
            face = InsightFace(bbox=bboxes[i, 0:4], kps=None if kpss is None else kpss[i], det_score=bboxes[i, 4])
            self.app.models["recognition"].get(bgr, face)
            found.append(face)
        return found

    def largest_face(self, image: Image.Image | np.ndarray, source: str) -> Face:
        """The largest face, as the official demo uses; NoFaceError naming ``source`` when there is none."""
        faces = self.analyze(image)
        if not faces:
            raise NoFaceError(source)
        return faces[0]


def check_det_size(value, field: str = "det_size") -> int:
    """A detector input side: a multiple of 32 (SCRFD's largest stride) in [DET_SIZE_MIN, DET_SIZE_MAX]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidParameterError(field, f"must be an integer, got {value!r}")
    if not defaults.DET_SIZE_MIN <= value <= defaults.DET_SIZE_MAX or value % 32:
        raise InvalidParameterError(field, f"must be a multiple of 32 from {defaults.DET_SIZE_MIN} to "
                                           f"{defaults.DET_SIZE_MAX}, got {value}")
    return int(value)


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

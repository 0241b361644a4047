"""FaceAnalyzer deployment: insightface detection + ArcFace embedding on CPU, scaled on its own.

setup            load the insightface pack (CPU execution provider, as many threads as the replica's num_cpus)
decode_request   raw image bytes (as uploaded; never re-encoded on the way) -> RGB images
predict          the reference resize, the largest face per photo, mean embedding, pose keypoints
score            generated images (RGB arrays) -> identity score each (instantid.scoring), batched per request
encode_response  a ``FaceAnalysisResult`` (deployments/messages.py): numpy arrays (embedding float32 (512,), keypoints
                 (5, 2)) + a JPEG thumbnail when asked

Errors leave as ``ServiceError`` (400 invalid_image, 422 no_face naming the image).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import threading
import time

import numpy as np
from ray import serve

from deployments import metrics
from deployments.errors import RETRY_LATER, UNAVAILABLE, from_exception
from deployments.face_analyzer.control_maps import ControlMapsCore
from deployments.messages import BackendHealth, FaceAnalysisResult, ModelNotLoaded
from deployments.tiny_profile import resolve_args

log = logging.getLogger("instantid.serve")

THUMBNAIL_SIDE = 128
# Decoded pixels one replica holds at once (each costs ~4-8 bytes while decoding: 16-bit PNGs, RGB copies,
# the analysis canvas). 16 concurrent 4-face + pose requests of 4096x4096 PNGs once took a replica from 0.7 to
# 3.9 GB; with this budget they wait their turn instead (~0.5 GB of pixels at a time).
MAX_DECODED_PIXELS = 64 * 1024 * 1024
# Threads that decode and analyse per replica. Few on purpose: each thread that allocates gets its own malloc
# arena, and memory freed in one is not reused by another, so the replica's resident size grew with the number
# of concurrent requests (asyncio's default pool runs up to 32) and stayed there.
ANALYSIS_THREADS = 2


class PixelBudget:
    """A counting semaphore over decoded pixels: a photo waits until its pixels fit (one that alone exceeds the
    budget runs when nothing else holds any, so nothing waits forever)."""

    def __init__(self, pixels: int):
        self.pixels, self.used = int(pixels), 0
        self.peak = 0  # the most pixels held at once (tests and benchmarks read it)
        self._cond = threading.Condition()

    def acquire(self, n: int, should_stop=None) -> None:
        with self._cond:
            while self.used and self.used + n > self.pixels:
                if should_stop is not None and should_stop():
                    from instantid.image_limits import DecodeAborted

                    raise DecodeAborted("the request is gone")
                self._cond.wait(0.1)
            self.used += n
            self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            idle = self.used == 0
            self._cond.notify_all()
        if idle and n >= 4 * 1024 * 1024:
            _return_memory()


def _return_memory() -> None:
    """Hand freed heap back to the OS once a large decode is done (glibc keeps it otherwise: the replica stayed
    at 2.1 GB after the probe's attack)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _header_pixels(name: str, data: bytes) -> int:
    """Pixels of an upload from its header (the Ingress checked it already; an unreadable one counts 1)."""
    from instantid.errors import InvalidImageError
    from instantid.image_limits import read_header

    try:
        width, height = read_header(data, name)[1]  # bounded: the framing walk before Pillow's header walk
    except InvalidImageError:
        return 1  # refused when it is decoded (load_image), with its reason
    return max(1, width * height)


def _face_info(face, source: str, image_size: tuple[int, int]) -> dict:
    """A face in the coordinates of the photo as uploaded (analysis ran on a resized, centre-cropped canvas)."""
    from instantid.face import analysis_mapping

    return {"source": source, **face.to_dict(*analysis_mapping(*image_size)),
            "image_size": [int(image_size[0]), int(image_size[1])]}


def make_thumbnail(image, bbox: list[float], side: int = THUMBNAIL_SIDE) -> bytes:
    """A square JPEG crop around the face (box enlarged by 40%), clamped to the image."""
    from PIL import Image

    x1, y1, x2, y2 = bbox
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1) * 0.7
    w, h = image.size
    box = (max(0, int(cx - half)), max(0, int(cy - half)), min(w, int(cx + half)), min(h, int(cy + half)))
    if box[2] <= box[0] or box[3] <= box[1]:
        box = (0, 0, w, h)
    crop = image.crop(box)
    crop.thumbnail((side, side), Image.BILINEAR)
    out = io.BytesIO()
    crop.save(out, format="JPEG", quality=85)
    return out.getvalue()


def replica_cpus() -> int | None:
    """onnxruntime threads for this replica: its CPU share (num_cpus, at least 1), so several replicas on a
    node do not oversubscribe it; None outside Ray (onnxruntime's default: all cores)."""
    try:
        import ray

        if not ray.is_initialized():  # get_runtime_context() would start a local Ray cluster
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:
        return None
    return max(1, round(cpus)) if cpus else None


class FaceAnalysisCore:
    """The deployment's logic without Serve (used as is by the benchmark's in-process baseline)."""

    def __init__(self, face_model: str, threads: int | None = None, max_decoded_pixels: int = MAX_DECODED_PIXELS):
        from instantid.face import FaceModel

        started = time.perf_counter()
        self.budget = PixelBudget(max_decoded_pixels)
        self.pool = concurrent.futures.ThreadPoolExecutor(ANALYSIS_THREADS, thread_name_prefix="face-analysis")
        self.threads = threads
        self.analyzer = FaceModel(face_model, providers=["CPUExecutionProvider"], threads=threads)
        self.load_seconds = time.perf_counter() - started
        self._lock = threading.Lock()  # one analysis at a time per replica: onnxruntime already uses the cores

    # -- decode_request ------------------------------------------------------------------------------
    @staticmethod
    def decode_request(items: list[tuple[str, bytes]], should_stop=None):
        from instantid.face import load_image

        return [(name, load_image(data, name=name, should_stop=should_stop)) for name, data in items]

    # -- predict -------------------------------------------------------------------------------------
    def predict(self, photos: list[tuple[str, bytes]], pose: tuple[str, bytes] | None = None,
                thumbnail: bool = False, should_stop=None, group: bool = False, detection=None,
                pose_detection=None) -> FaceAnalysisResult:
        """``should_stop()`` true (the request was cancelled) abandons the decode and skips the analysis.
        ``group``: the pose photo is a group photo (people): every face of it, left to right, in ``group``.
        ``detection``/``pose_detection``: instantid.identity.Detection for the photos/the pose photo (None: the
        demo's, the largest face at the model's detector size)."""
        from instantid.identity import DEMO, analyze_faces, identity_of

        items = list(photos) + ([pose] if pose else [])
        pixels = sum(_header_pixels(name, data) for name, data in items)
        self.budget.acquire(pixels, should_stop)
        try:
            t0 = time.perf_counter()
            decoded = self.decode_request(items, should_stop)
            t1 = time.perf_counter()
            with self._lock:
                each = decoded[:-1] if group and pose else decoded
                options = [detection or DEMO] * len(photos) + [pose_detection or DEMO] * (len(each) - len(photos))
                found = [(name, image, *analyze_faces(self.analyzer, [(name, image)], should_stop, option)[0])
                         for (name, image), option in zip(each, options)]
                group_found = None
                if group and pose:  # every face of the pose photo, left to right; the largest stands for it
                    from instantid.people import group_faces

                    name, image = decoded[-1]
                    faces, canvas = group_faces(self.analyzer, name, image)
                    group_found = [{"kps": np.asarray(f.kps, dtype=np.float32),
                                    "bbox": np.asarray(f.bbox, dtype=np.float32),
                                    "info": _face_info(f, name, image.size)} for f in faces]
                    found.append((name, image, max(faces, key=lambda f: f.area), canvas))
            t2 = time.perf_counter()
            name, image, face, canvas = found[-1] if pose else found[0]
            # the pose: keypoints on the analysed canvas (what Pose.draw scales from) + the face as uploaded
            result = FaceAnalysisResult(pose_kps=np.asarray(face.kps, dtype=np.float32),
                                        pose_canvas=[int(canvas[0]), int(canvas[1])],
                                        pose_face=_face_info(face, name, image.size),
                                        timings={"decode_s": t1 - t0, "face_analysis_s": t2 - t1},
                                        group=group_found)
            photos_found = found[:len(photos)]
            if photos_found:
                identity = identity_of([(face, canvas) for _, _, face, canvas in photos_found])
                result.embedding = identity.embedding.astype(np.float32)
                # each photo's own embedding: outputs are scored against each reference photo too
                result.embeddings = [np.asarray(face.embedding, dtype=np.float32) for face in identity.faces]
                result.faces = [_face_info(face, name, image.size)
                                for name, image, face, canvas in photos_found]
                if thumbnail:
                    result.thumbnail = make_thumbnail(photos_found[0][1], result.faces[0]["bbox"])
            return result
        finally:
            self.budget.release(pixels)

    def score(self, images: list[np.ndarray], reference: np.ndarray, references: list[np.ndarray] | None = None,
              should_stop=None) -> dict:
        """The identity score of each generated image (HxWx3 uint8 RGB) against the request's embedding (and each
        reference photo's): ``instantid.scoring``, the same analysis as the reference photos had."""
        from instantid.image_limits import DecodeAborted
        from instantid.scoring import output_face, score_face

        pixels = sum(int(a.shape[0]) * int(a.shape[1]) for a in images)
        self.budget.acquire(pixels, should_stop)
        try:
            t0 = time.perf_counter()
            scores = []
            with self._lock:
                for array in images:
                    if should_stop is not None and should_stop():
                        raise DecodeAborted("the request is gone")
                    scores.append(score_face(*output_face(self.analyzer, array), reference, references).to_dict())
            return {"scores": scores, "timings": {"identity_score_s": time.perf_counter() - t0}}
        finally:
            self.budget.release(pixels)


@serve.deployment(
    name="FaceAnalyzer",
    max_ongoing_requests=8,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class FaceAnalyzerDeployment:
    """setup: load the pack; analyze(): photos (+pose) bytes -> embedding, keypoints, faces, thumbnail."""

    maps_error: str | None = None  # why the preprocessors the config offers did not load (None: loaded, or none)

    def __init__(self, args: dict):
        self.args = resolve_args(args)
        self.core: FaceAnalysisCore | None = None
        self._maps = None  # control map derivation: at start when a model offers depth or pose, else on first use
        self.load_error: str | None = None
        try:
            self.core = FaceAnalysisCore(self.args.face_model, threads=replica_cpus())
            log.info("face model %s loaded in %.2fs (%s threads)", self.args.face_model, self.core.load_seconds,
                     self.core.threads)
        except Exception as exc:  # reported by check_health and /readyz; Serve replaces the replica
            self.load_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.error("face model failed to load: %s", self.load_error)
        # the preprocessors of the control types the models offer, loaded now: a replica that cannot load what its
        # config names is not ready (instead of failing the first request with controls)
        offered = {kind for model in self.args.models for kind in model.controlnets}
        if offered & {"depth", "pose"}:
            try:
                self._maps = ControlMapsCore(self.args.preprocessors.depth, self.args.preprocessors.pose)
                loaded = self._maps.preprocessors.preload(offered)
                log.info("control preprocessors loaded: %s", ", ".join(loaded))
            except Exception as exc:
                self._maps = None
                self.maps_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                log.error("control preprocessors failed to load: %s", self.maps_error)

    async def analyze(self, photos: list[tuple[str, bytes]], pose: tuple[str, bytes] | None = None,
                      thumbnail: bool = False, group: bool = False, detection=None,
                      pose_detection=None) -> FaceAnalysisResult:
        if self.core is None:
            raise UNAVAILABLE("the face model is not loaded", headers=RETRY_LATER)
        gone = threading.Event()  # set when the caller cancels (its deadline passed, its client left)
        try:
            result = await asyncio.wrap_future(self.core.pool.submit(self.core.predict, photos, pose, thumbnail,
                                                                     gone.is_set, group, detection, pose_detection))
        except asyncio.CancelledError:
            gone.set()  # the thread stops at its next read or photo; the replica's slot is freed now
            raise
        except Exception as exc:
            raise from_exception(exc) from None
        metrics.stage("face_analysis", result.timings["face_analysis_s"])
        return result

    async def score(self, images: list, reference, references: list | None = None) -> dict:
        """Generated images (RGB arrays, one request's, in one call) -> each one's identity score."""
        if self.core is None:
            raise UNAVAILABLE("the face model is not loaded", headers=RETRY_LATER)
        gone = threading.Event()
        try:
            result = await asyncio.wrap_future(self.core.pool.submit(self.core.score, images, reference, references,
                                                                     gone.is_set))
        except asyncio.CancelledError:
            gone.set()
            raise
        except Exception as exc:
            raise from_exception(exc) from None
        metrics.stage("identity_score", result["timings"]["identity_score_s"])
        return result

    async def control_maps(self, items: list[tuple[str, str, bytes]]):
        """(field, type, photo bytes) -> each photo's control map (deployments/ingress/controls.py), on this CPU group."""
        if self._maps is None:
            self._maps = ControlMapsCore(self.args.preprocessors.depth, self.args.preprocessors.pose)
        result = await self._maps.run(items)
        metrics.stage("control_maps", result.timings["control_maps_s"])
        return result

    def ready(self) -> BackendHealth:
        loaded = self.core is not None
        return BackendHealth(loaded and self.maps_error is None, self.load_error or self.maps_error,
                             details={"threads": self.core.threads if loaded else None})

    def check_health(self) -> None:
        if self.core is None:  # Serve replaces the replica; its status carries the reason
            raise ModelNotLoaded("face model", self.load_error)
        if self.maps_error is not None:
            raise ModelNotLoaded("control preprocessors", self.maps_error)

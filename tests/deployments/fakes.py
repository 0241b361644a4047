"""The tests' fake backends (one place): in-process stand-ins for the FaceAnalyzer and Generator handles, the
HTTP app over them, and a small valid request body."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
from starlette.testclient import TestClient

from deployments.config import AppArgs
from deployments.face_analyzer.control_maps import ControlMapsCore
from deployments.face_analyzer.deployment import FaceAnalysisCore
from deployments.generator.deployment import GeneratorCore, accept_task
from deployments.ingress.http.app import build_http_app
from deployments.ingress.service import GenerationService
from deployments.messages import BackendHealth, FaceAnalysisResult, GenerationResult, GenerationTask
from serve_helpers import b64, png_bytes


class FakeMethod:
    """A DeploymentHandle method: ``.remote(*args)`` runs ``fn`` (an async function) in process."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


async def ready_ok():
    return BackendHealth(True)


class FakeFace:
    def __init__(self):
        async def analyze(photos, pose=None, thumbnail=False, detection=None, pose_detection=None):
            canvas = [1024, 1024]
            face = {"source": "face_images[0]", "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.9,
                    "kps": [[1.0, 1.0]] * 5, "image_size": [256, 256]}
            return FaceAnalysisResult(embedding=np.ones(512, np.float32), faces=[face] * len(photos),
                                      embeddings=[np.ones(512, np.float32)] * len(photos),
                                      pose_kps=np.full((5, 2), 500.0, np.float32), pose_canvas=canvas,
                                      pose_face=face, thumbnail=b"jpeg" if thumbnail else None,
                                      timings={"decode_s": 0.0, "face_analysis_s": 0.0})

        async def score(images, reference, references=None):  # no face in a fake output
            return {"scores": [{"similarity": None, "face_found": False, "bbox": None}] * len(images),
                    "timings": {"identity_score_s": 0.0}}

        self.analyze = FakeMethod(analyze)
        self.score = FakeMethod(score)
        self.ready = FakeMethod(ready_ok)

    def options(self, **_):
        return self


class FakeGenerator:
    def __init__(self, fail: BaseException | None = None):
        self.fail = fail

        async def generate(task: GenerationTask):
            if self.fail is not None:
                raise self.fail
            return GenerationResult(images=[np.zeros((task.height, task.width, 3), np.uint8)] * task.num_images,
                                    seed=task.seed, model=task.model,
                                    timings={"queue_s": 0.0, "denoise_s": 0.0, "vae_decode_s": 0.0, "batch_size": 1,
                                             "batch_images": task.num_images})

        self.denoise = FakeMethod(generate)
        self.ready = FakeMethod(ready_ok)

        async def steps(task, interval):  # a job's stream: one progress event a step, then what denoise gives
            for step in range(1, task.steps + 1):
                await asyncio.sleep(0)
                yield {"progress": {"step": step, "total": task.steps}}
            yield {"result": await self.denoise.fn(task)}  # the denoise of the moment (subclasses replace it)

        self.denoise_stream = FakeMethod(lambda task, interval=0.25: FakeStream(steps(task, interval)))

    def options(self, **_):
        return self


def make_client(tmp_path, generator=None, status=None, **overrides) -> TestClient:
    args = AppArgs.model_validate({"identity_store": str(tmp_path / "ids"), **overrides})
    core = GenerationService(args, FakeFace(), generator or FakeGenerator(),
                             status_fn=status or (lambda: {"FaceAnalyzer": "HEALTHY", "Generator": "HEALTHY"}))
    return TestClient(build_http_app(core), raise_server_exceptions=False)


def generate_request(**fields):
    """A small valid /v1/generate body (one fake photo, 64x64, 2 steps), ``fields`` over it."""
    return {"face_images": [b64(png_bytes())], "width": 64, "height": 64, "steps": 2, **fields}


def job_request(**fields):
    """The jobs tests' body: ``generate_request`` with 4 steps (progress to report) and a fixed seed."""
    return generate_request(**{"steps": 4, "seed": 3, **fields})


class RecordingGenerator(FakeGenerator):
    """Keeps the jobs it was given; answers a pose image when asked for one."""

    def __init__(self):
        super().__init__()
        self.jobs = []
        plain = self.denoise.fn

        async def generate(job):
            self.jobs.append(job)
            out = await plain(job)
            if job.return_pose_image:
                out.pose_image = np.full((job.height, job.width, 3), 7, np.uint8)
            return out

        self.denoise = FakeMethod(generate)


class FakeStream:
    """What ``handle.options(stream=True).denoise_stream.remote`` gives: an async iterator with cancel()."""

    def __init__(self, agen):
        self.agen = agen
        self.cancelled = False

    def __aiter__(self):
        return self.agen.__aiter__()

    def cancel(self):
        self.cancelled = True


class StreamingGenerator:
    """Steps of ``step_s`` each; ``die`` the first N calls raise as a dead replica does."""

    def __init__(self, step_s: float = 0.01, die: int = 0):
        self.step_s, self.die, self.calls, self.streams = step_s, die, 0, []

        async def steps(task, interval):
            self.calls += 1
            if self.die:
                self.die -= 1
                from ray.exceptions import ActorDiedError

                raise ActorDiedError()
            for step in range(1, task.steps + 1):
                await asyncio.sleep(self.step_s)
                yield {"progress": {"step": step, "total": task.steps}}
            yield {"result": GenerationResult(
                images=[np.zeros((task.height, task.width, 3), np.uint8)] * task.num_images, seed=task.seed,
                model=task.model, timings={"queue_s": 0.0, "denoise_s": 0.0, "vae_decode_s": 0.0, "batch_size": 1,
                                           "batch_images": task.num_images})}

        def start(task, interval=0.25):
            stream = FakeStream(steps(task, interval))
            self.streams.append(stream)
            return stream

        self.denoise_stream = FakeMethod(start)
        self.ready = FakeMethod(ready_ok)

    def options(self, **_):
        return self


class CountingGenerator(FakeGenerator):
    """FakeGenerator (sync calls) and StreamingGenerator (jobs) in one; counts generate calls."""

    def __init__(self, fail=None, step_s=0.01):
        super().__init__(fail)
        self.calls = 0
        inner = self.denoise.fn

        async def counted(task):
            self.calls += 1
            return await inner(task)

        self.denoise = FakeMethod(counted)
        self.stream = StreamingGenerator(step_s=step_s)
        self.denoise_stream = self.stream.denoise_stream


CANVAS = [1000, 500]
# three faces of a group photo on its analysed canvas, in detector order (not left to right)
GROUP = [(600, 200), (100, 200), (350, 200)]


def face(x, y, side=80):
    box = np.array([x - side / 2, y - side / 2, x + side / 2, y + side / 2], np.float32)
    kps = np.array([[x - 15, y - 10], [x + 15, y - 10], [x, y + 5], [x - 12, y + 20], [x + 12, y + 20]], np.float32)
    return box, kps


class GroupFace(FakeFace):
    """FakeFace, plus a group pose photo with the faces of GROUP; each person's photos embed by their size."""

    def __init__(self, group=GROUP):
        super().__init__()
        single = self.analyze.fn

        async def analyze(photos, pose=None, thumbnail=False, group_photo=False):
            out = await single(photos, pose, thumbnail)
            if photos:  # a distinct embedding per person (the photo's byte length), a face in the middle
                out.embedding = np.full(512, float(len(photos[0][1])), np.float32)
                box, kps = face(512, 512, side=300)
                out.pose_kps, out.pose_canvas = kps, [1024, 1024]
                out.pose_face = {"source": photos[0][0], "bbox": box.tolist(), "score": 0.9, "kps": kps.tolist(),
                                 "image_size": [1024, 1024]}
            if group_photo:
                faces = []
                for x, y in group:
                    box, kps = face(x, y)
                    faces.append({"kps": kps, "bbox": box, "info": {
                        "source": "pose_image", "bbox": box.tolist(), "score": 0.9, "kps": kps.tolist(),
                        "image_size": CANVAS}})
                out.pose_canvas, out.group = CANVAS, sorted(faces, key=lambda f: f["bbox"][0])
            return out

        self.analyze = FakeMethod(analyze)


def photo(shade=128):
    return b64(png_bytes(size=(256 + shade, 256), color=(shade, shade, shade)))  # a distinct byte length


class TaskMethod:
    """A handle method whose ``.remote`` starts the call at once as a task (cancellable, as a real response)."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return asyncio.ensure_future(self.fn(*args, **kwargs))


class LocalFace:
    """The real FaceAnalysisCore and ControlMapsCore, in process."""

    def __init__(self, args: AppArgs):
        self.core = FaceAnalysisCore(args.face_model)
        self.maps = ControlMapsCore(args.preprocessors.depth, args.preprocessors.pose)
        self.calls: list = []

        async def analyze(photos, pose=None, thumbnail=False, group=False, detection=None, pose_detection=None):
            return await asyncio.to_thread(self.core.predict, photos, pose, thumbnail, None, group, detection,
                                           pose_detection)

        async def control_maps(items):
            self.calls.append(items)
            return await self.maps.run(items)

        self.analyze, self.control_maps = TaskMethod(analyze), TaskMethod(control_maps)

    def options(self, **_):
        return self


class LocalGenerator:
    """The real GeneratorCore on the tiny model, in process (each task deep-copied, as a handle would)."""

    def __init__(self, args: AppArgs):
        self.core = GeneratorCore(args)
        self.model = self.core.load("tiny")
        self.jobs: list = []

        async def denoise(task):
            task = copy.deepcopy(task)  # as it would cross a handle: the caller keeps its own
            self.jobs.append(copy.deepcopy(task))
            accept_task(task)
            out = await asyncio.to_thread(self.core.predict, self.model, [task])
            result = self.core.screen([task], out)[0]
            if isinstance(result, Exception):
                raise result
            return result

        self.denoise = TaskMethod(denoise)

    def options(self, **_):
        return self

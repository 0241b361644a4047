"""Generator deployment: IdentityNet + SDXL UNet, one GPU per replica in production, CPU in the local profile.

__init__         load the default model (so the replica is ready, or unhealthy, before it takes traffic)
accept_task      a ``GenerationTask`` from the Ingress (deployments/messages.py) checked on arrival (embedding
                 float32 (512,), keypoints on their canvas, control maps and people: controls.py, people.py)
predict          ``GeneratorCore.predict``: ``pipe.generate`` once per compatible group, one denoising batch;
                 the keypoint image is drawn here, at the output size
screen           the safety checker over a batch's images; a ``GenerationResult`` per task: uint8 HxWx3 arrays
                 (the Ingress encodes them once: png/jpeg/webp)

Throughput
- ``@serve.batch`` collects concurrent requests (``batch.max_batch_size``, ``batch.batch_wait_timeout_s``)
  and Serve splits its batches by multiplexed model id. Formed batches join one device queue; each time the
  device is free, the oldest waiting request leads a group of every waiting request with the same
  ``GenerationTask.batch_key()`` (model, width, height, steps, scheduler, guided = guidance_scale > 1, LoRA set
  with scales, img2img strength), up to ``max_batch_size``, and the group is ONE ``pipe.generate`` call. So
  requests that pile up while a batch runs are merged too, not only those arriving within one wait window
  (with a wait of 0 a lone request never waits). ``timings.batch_size`` reports the group size.
- ``@serve.multiplexed(max_num_models_per_replica=args.max_models_per_replica)``: the model id is the
  configured base model name (``ModelSpec.name``). A pipeline is loaded with all of that model's configured
  LoRAs, which are switched per group with ``pipe.set_loras`` (cheap), so LoRA sets never cost a reload or a
  cache slot. The least recently used pipeline is evicted when the cache is full. The Ingress routes with
  ``handle.options(multiplexed_model_id=name)``, so requests go to replicas that have the model resident.

Generation is blocking: it runs in a worker thread (one at a time per replica, under a lock), so health
checks, new arrivals and batching keep running on the event loop.

Abandoned work stops: a job carries its request's deadline (wall-clock, set by the Ingress) and is marked
cancelled when its caller goes away (Serve cancels ``generate`` when the Ingress cancels the call: client
disconnect, 504). After each denoising step the pipeline's callback drops such jobs' rows from the batch; the
others go on, and a batch with none left stops at once; during the VAE decode a job is checked before each decoder
block (``still_wanted``: a 2048x2048 decode takes ~25 s on CPU). Their callers get ``504 timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from ray import serve

from instantid.weights import prefetch

from deployments import metrics
from deployments.messages import BackendHealth, GenerationResult, GenerationTask, ModelNotLoaded
from deployments.ray_compat import multiplexed_models
from deployments.errors import INVALID_PARAMETER, TIMEOUT, UNSAFE_OUTPUT, ServiceError, from_exception
from deployments.generator.controls import decode_maps
from deployments.generator.people import accept_people, pipeline_people
from deployments.tiny_profile import resolve_args

log = logging.getLogger("instantid.serve")

# Formed batches that may wait for the device at once (>= max_ongoing_requests is enough: each holds >= 1).
MAX_PENDING_BATCHES = 256


def accept_task(task: GenerationTask) -> GenerationTask:
    """A task as it arrives from the Ingress: its arrays checked and made contiguous float32 (a replica never
    trusts what crossed the network to be shaped right), the img2img upload decoded (per task, so a bad one
    fails only its own request), and the Generator's bookkeeping (id, arrival on this replica's clock) reset."""
    from instantid.errors import InvalidParameterError
    from instantid.face import load_image, validate_embedding, validate_keypoints

    if not isinstance(task, GenerationTask):
        raise InvalidParameterError("request", f"expected a GenerationTask, got {type(task).__name__}")
    try:
        if task.people:
            accept_people(task)
        else:
            rows = np.asarray(task.embedding)
            task.embedding = (np.stack([validate_embedding(r) for r in rows]) if rows.ndim == 2 and len(rows) > 1
                              else validate_embedding(rows))  # several rows: a concatenated identity
            task.kps = validate_keypoints(task.kps)
            task.canvas = (int(task.canvas[0]), int(task.canvas[1]))
        if task.bbox is not None:
            task.bbox = np.asarray(task.bbox, dtype=np.float64).reshape(4)
    except (IndexError, TypeError, ValueError) as exc:
        raise InvalidParameterError("request", f"malformed generation task: {exc}") from exc
    if min(task.canvas) <= 0:
        raise InvalidParameterError("kps", "canvas size must be positive")
    if isinstance(task.init_image, (bytes, bytearray, memoryview)):
        task.init_image = load_image(task.init_image, "init_image")
    if task.controls:  # maps on the output canvas; a ready map decoded here, per task, as the init image
        task.controls = decode_maps(task.controls, task.width, task.height)
    task.id, task.arrived, task.cancelled, task.on_step = uuid.uuid4().hex, time.perf_counter(), False, None
    return task


def abandoned_error() -> ServiceError:
    return TIMEOUT("the request passed its deadline or was cancelled; its generation stopped")


class LoadedModel:
    def __init__(self, name: str, pipe, seconds: float):
        self.name = name
        self.pipe = pipe
        self.seconds = seconds


class GeneratorCore:
    """Model loading and batched prediction, without Serve (the benchmark uses it in-process)."""

    def __init__(self, args):
        self.args = args
        self.specs = {m.name: m for m in args.models}
        self._lock = threading.Lock()  # one pipeline call at a time on this device
        self._safety_lock = threading.Lock()
        self._safety = None

    def safety_checker(self):
        """The safety checker (one per replica, on the pipeline's device), loaded on first use; None when off."""
        if not self.args.safety.enabled:
            return None
        with self._safety_lock:
            if self._safety is None:
                from instantid.loading import pick_device, pick_dtype
                from instantid.safety import SafetyChecker

                device = pick_device(self.args.device)
                self._safety = SafetyChecker.load(self.args.safety.model, device, pick_dtype(self.args.dtype, device))
            return self._safety

    def load(self, name: str) -> LoadedModel:
        from instantid.loading import load_pipeline

        spec = self.specs[name]
        started = time.perf_counter()
        pipe = load_pipeline(spec.base_model, self.args.instantid, device=self.args.device, dtype=self.args.dtype,
                             loras=dict(spec.loras) or None, controlnets=dict(spec.controlnets) or None)
        pipe.set_progress_bar_config(disable=True)
        if self.args.compile.enabled:
            self.compile(pipe)
        return LoadedModel(name, pipe, time.perf_counter() - started)

    def compile(self, pipe) -> dict:
        """optimize() with the serving plan, then compile and run every planned graph (before the replica is
        ready: the default model loads in the replica's constructor). A compile failure leaves it serving eager."""
        from instantid.identity import Pose
        from instantid.optimize import ServingPlan, optimize, warm_up
        from instantid.pipeline import GenerationRequest

        cfg = self.args.compile
        plan = ServingPlan(batch_buckets=tuple(cfg.batch_buckets), sizes=tuple(map(tuple, cfg.sizes)))
        cache = str(Path(cfg.cache_dir).expanduser()) if cfg.cache_dir else None
        started = time.perf_counter()
        applied = optimize(pipe, serving=plan, compile_mode=cfg.mode, backend=cfg.backend, cache_dir=cache)
        pipe.serving.on_fallback.append(metrics.compile_fallback)
        kps = np.array([[0.35, 0.4], [0.65, 0.4], [0.5, 0.55], [0.38, 0.7], [0.62, 0.7]]) * 512

        def request(slots, text_length, guided):
            return GenerationRequest(face_embedding=np.zeros(512, np.float32), prompt="warm-up",
                                     keypoint_image=Pose(kps, (512, 512)).draw(),
                                     guidance_scale=5.0 if guided else 1.0)

        summary = warm_up(pipe, request)
        log.info("compiled %s; %d signatures warmed in %.1fs%s", ", ".join(applied), summary["warmed"],
                 time.perf_counter() - started, f"; serving eager: {summary['broken']}" if summary["broken"] else "")
        return summary

    def predict(self, model: LoadedModel, jobs: list[GenerationTask]) -> list[GenerationResult | ServiceError]:
        """One denoising batch for compatible jobs; one result (arrays + timings) per job."""
        from PIL import Image

        from instantid.identity import Pose
        from instantid.people import keypoints_overview
        from instantid.pipeline import ControlInput, GenerationRequest

        first = jobs[0]
        requests = []
        for j in jobs:
            pose = Pose(j.kps, j.canvas, j.bbox) if not j.people else None
            requests.append(GenerationRequest(
                face_embedding=j.embedding,
                keypoint_image=pose.draw(j.width, j.height) if pose else None,
                prompt=j.prompt, negative_prompt=j.negative_prompt, num_images=j.num_images, seed=j.seed,
                guidance_scale=j.guidance_scale, ip_adapter_scale=j.ip_adapter_scale,
                controlnet_conditioning_scale=j.controlnet_conditioning_scale,
                prompt_weighting=j.prompt_weighting, init_image=j.init_image, strength=j.strength,
                control_mask=pose.face_mask(j.width, j.height) if pose and j.enhance_face_region else None,
                people=pipeline_people(j.people, j.width, j.height) if j.people else [],
                controls=[ControlInput(c["name"], Image.fromarray(c["map"]), c["scale"], c["start"], c["end"])
                          for c in j.controls],
                noise=j.noise,
            ))
        marks: dict[str, float] = {}

        def on_step(step: int, total: int) -> list[int] | None:
            if step == total:
                marks["denoised"] = time.perf_counter()
            for j in jobs:
                if j.on_step is not None:
                    j.on_step(step, total)
            now = time.time()
            wanted = [k for k, j in enumerate(jobs) if not j.abandoned(now)]
            return wanted if len(wanted) < len(jobs) else None  # the others' rows leave the batch

        def still_wanted() -> list[int]:  # asked during the VAE decode, before each decoder block
            now = time.time()
            return [k for k, j in enumerate(jobs) if not j.abandoned(now)]

        with self._lock:
            started = time.perf_counter()
            model.pipe.set_loras(dict(first.loras))
            images = model.pipe.generate(requests, width=first.width, height=first.height, steps=first.steps,
                                         scheduler=first.scheduler, callback=on_step, still_wanted=still_wanted)
            finished = time.perf_counter()
        denoised = marks.get("denoised", finished)
        n_images = sum(j.num_images for j in jobs)
        return [
            abandoned_error() if imgs is None else GenerationResult(
                images=[np.asarray(img.convert("RGB"), dtype=np.uint8) for img in imgs],
                seed=j.seed,
                model=model.name,
                pose_image=np.asarray(r.keypoint_image if not r.people else keypoints_overview(r.people),
                                      dtype=np.uint8) if j.return_pose_image else None,
                timings={"queue_s": started - j.arrived, "denoise_s": denoised - started,
                         "vae_decode_s": finished - denoised, "batch_size": len(jobs), "batch_images": n_images},
            )
            for j, r, imgs in zip(jobs, requests, images)
        ]

    def screen(self, jobs: list[GenerationTask], outputs: list) -> list:
        """The safety check of a finished batch: every image of the tasks that keep it on, in one pass. Sets
        ``nsfw`` flags per image and ``safety_check_s``; blurs flagged images, or with ``refuse`` answers a task whose
        images are all flagged with 422 unsafe_output (flagged images of a mixed result are blurred)."""
        from PIL import Image

        from instantid.safety import blur

        checker = self.safety_checker()
        checked = [k for k, (j, out) in enumerate(zip(jobs, outputs))
                   if isinstance(out, GenerationResult) and j.safety_checker]
        if checker is None or not checked:
            return outputs
        started = time.perf_counter()
        images = [Image.fromarray(a) for k in checked for a in outputs[k].images]
        flags = iter(checker.check(images))
        seconds = time.perf_counter() - started
        metrics.stage("safety_check", seconds)
        outputs = list(outputs)
        for k in checked:
            out = outputs[k]
            nsfw = [next(flags) for _ in out.images]
            metrics.images_flagged(out.model, sum(nsfw))
            if self.args.safety.action == "refuse" and all(nsfw):
                outputs[k] = UNSAFE_OUTPUT("the safety checker flagged every generated image",
                                          field="safety_checker")
                continue
            out.images = [np.asarray(blur(Image.fromarray(a))) if flag else a for a, flag in zip(out.images, nsfw)]
            out.nsfw = nsfw
            out.timings["safety_check_s"] = seconds
        return outputs


@serve.deployment(
    name="Generator",
    max_ongoing_requests=8,  # keep >= batch.max_batch_size so batches can fill
    max_queued_requests=64,
    ray_actor_options={"num_cpus": 1, "num_gpus": 0},
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=120,
)
class Generator:
    async def __init__(self, args: dict):
        # -- setup -----------------------------------------------------------------------------------
        self.args = resolve_args(args)
        # the disk reads the default model's weights while the load below imports torch and diffusers
        default = self.args.model(self.args.default_model)
        prefetch(default.base_model, self.args.instantid, list(default.controlnets.values()))
        self.core = GeneratorCore(self.args)
        self.ready_error: str | None = "loading"
        self.loads: Counter[str] = Counter()
        self.batch_sizes: list[int] = []
        self._waiting: set[str] = set()
        self._running: list[GenerationTask] = []  # the group on the device now
        self._queue: list[tuple[GenerationTask, asyncio.Future]] = []  # formed batches' jobs, waiting for the device
        self._pump_task: asyncio.Task | None = None
        self._screening: set[asyncio.Task] = set()  # safety checks in flight (a reference keeps each alive)
        self._run_batch.set_max_batch_size(self.args.batch.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(self.args.batch.batch_wait_timeout_s)

        async def load_model(model_id: str) -> LoadedModel:
            return await self._load(model_id)

        # applied here rather than as a class decorator: the LRU size is an application argument
        self._load_model_fn = load_model
        self.get_model = serve.multiplexed(max_num_models_per_replica=self.args.max_models_per_replica)(load_model)
        try:
            await self.get_model(self.args.default_model)
            await asyncio.to_thread(self.core.safety_checker)  # ready only with the checker loaded, when on
            self.ready_error = None
        except Exception as exc:  # check_health fails until a replacement replica loads it
            self.ready_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.error("default model %s failed to load: %s", self.args.default_model, self.ready_error)

    async def _load(self, name: str) -> LoadedModel:
        if name not in self.core.specs:
            raise INVALID_PARAMETER(f"base_model: unknown model {name!r}", field="base_model")
        _release_memory()  # an evicted pipeline's memory, before the next one is allocated
        loaded = await asyncio.to_thread(self.core.load, name)
        self.loads[name] += 1
        metrics.model_loaded(name, loaded.seconds, len(self.resident_models()) + 1)
        log.info("model %s loaded in %.2fs", name, loaded.seconds)
        return loaded

    # -- the request path ------------------------------------------------------------------------------
    async def denoise(self, task: GenerationTask) -> GenerationResult:
        try:
            parsed = accept_task(task)
        except Exception as exc:
            raise from_exception(exc) from None
        return await self._denoise(parsed)

    async def denoise_stream(self, task: GenerationTask, progress_interval_s: float = 0.25):
        """``denoise`` for jobs, streamed (``handle.options(stream=True)``): ``{"progress": {"step", "total"}}``
        after denoising steps, at most one per ``progress_interval_s`` (and the last step), then
        ``{"result": GenerationResult}``. Cancelling the stream stops this task's rows at the next step."""
        try:
            parsed = accept_task(task)
        except Exception as exc:
            raise from_exception(exc) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        last = [-math.inf]

        def on_step(step: int, total: int) -> None:  # the worker thread
            now = time.monotonic()
            if step == total or now - last[0] >= progress_interval_s:
                last[0] = now
                loop.call_soon_threadsafe(events.put_nowait, {"progress": {"step": step, "total": total}})

        parsed.on_step = on_step
        work = asyncio.ensure_future(self._denoise(parsed))
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not events.empty():
                    yield events.get_nowait()
                break
            yield {"result": work.result()}
        finally:
            parsed.cancelled = True  # a no-op when done; the caller went away otherwise
            work.cancel()

    async def _denoise(self, parsed: GenerationTask) -> GenerationResult:
        self._waiting.add(parsed.id)
        metrics.queue_length(len(self._waiting))
        try:
            result = await self._run_batch(parsed)
        finally:
            parsed.cancelled = True  # a no-op when done; skips the work when the caller gave up
            self._waiting.discard(parsed.id)
            metrics.queue_length(len(self._waiting))
        if isinstance(result, BaseException):
            raise result
        return result

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05,  # both reset from AppArgs.batch in __init__
                 max_concurrent_batches=MAX_PENDING_BATCHES)
    async def _run_batch(self, jobs: list[GenerationTask]) -> list[GenerationResult | ServiceError]:
        """Serve's batch (formed within batch_wait_timeout_s) joins the device queue; see ``_pump``."""
        loop = asyncio.get_running_loop()
        futures = []
        for job in jobs:
            future = loop.create_future()
            self._queue.append((job, future))
            futures.append(future)
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = loop.create_task(self._pump())
        return list(await asyncio.gather(*futures))

    def _next_group(self) -> list[tuple[GenerationTask, asyncio.Future]]:
        """The oldest waiting job and the compatible jobs behind it (same model and key), FIFO; jobs whose
        callers gave up or whose deadline passed are dropped (answered 504, so their batch's others return)."""
        now = time.time()
        live = []
        for job, fut in self._queue:
            if fut.done():
                continue
            if job.abandoned(now):
                fut.set_result(abandoned_error())
            else:
                live.append((job, fut))
        if not live:
            self._queue = []
            return []
        head = live[0][0]
        limit = self.args.batch.max_batch_size
        group, rest = [], []
        for entry in live:
            job = entry[0]
            if len(group) < limit and job.batch_key() == head.batch_key():
                group.append(entry)
            else:
                rest.append(entry)
        self._queue = rest
        return group

    async def _pump(self) -> None:
        """One device, one denoising batch at a time: whatever piled up while it was busy is merged.

        ``@serve.batch`` forms its next batch as soon as a request arrives, even while the previous one
        still holds the device (its concurrency limit applies after the batch is formed), so on its own a
        batch only ever holds what arrived within one wait window. Here every formed batch joins one queue,
        and each time the device frees up the oldest job leads a group of all compatible waiting jobs."""
        while self._queue:
            group = self._next_group()
            if not group:
                continue
            jobs = [job for job, _ in group]
            for job in jobs:
                self._waiting.discard(job.id)
            metrics.queue_length(len(self._waiting))
            try:
                results = await self._predict_group(jobs)
            except Exception as exc:  # never leave a caller hanging
                results = [from_exception(exc)] * len(jobs)
            if self.args.safety.enabled:
                # the safety check runs beside the next group's denoising, off the device queue's critical path
                task = asyncio.get_running_loop().create_task(self._screen_and_answer(group, results))
                self._screening.add(task)
                task.add_done_callback(self._screening.discard)
                continue
            _answer(group, results)

    async def _screen_and_answer(self, group, results) -> None:
        try:
            results = await asyncio.to_thread(self.core.screen, [job for job, _ in group], results)
        except Exception as exc:  # an image that could not be checked is never delivered
            results = [from_exception(exc)] * len(group)
        _answer(group, results)

    async def _predict_group(self, jobs: list[GenerationTask]) -> list[GenerationResult | ServiceError]:
        name = jobs[0].model
        loads_before = self.loads[name]
        started = time.perf_counter()
        try:
            model = await self.get_model(name)
        except Exception as exc:
            return [from_exception(exc)] * len(jobs)
        load_s = time.perf_counter() - started if self.loads[name] > loads_before else None
        metrics.models_resident(len(self.resident_models()))
        self._running = jobs
        try:
            outputs = await asyncio.to_thread(self.core.predict, model, jobs)
        except Exception as exc:
            return [from_exception(exc)] * len(jobs)
        finally:
            self._running = []
        done = [out for out in outputs if isinstance(out, GenerationResult)]
        if done:
            self._record_batch(name, jobs, done, load_s)
        return outputs

    def _record_batch(self, name: str, group: list[GenerationTask], outputs: list[GenerationResult],
                      load_s: float | None) -> None:
        n_images = sum(j.num_images for j in group)
        self.batch_sizes = (self.batch_sizes + [len(group)])[-1000:]
        metrics.batch(name, len(group), n_images)
        metrics.images_generated(name, n_images)
        first = outputs[0].timings
        metrics.stage("denoise", first["denoise_s"])
        metrics.stage("vae_decode", first["vae_decode_s"])
        for out in outputs:
            metrics.stage("queue", out.timings["queue_s"])
            if load_s is not None:
                out.timings["model_load_s"] = load_s
        if load_s is not None:
            metrics.stage("model_load", load_s)

    # -- introspection and health -------------------------------------------------------------------
    def resident_models(self) -> list[str]:
        """Model ids in this replica's multiplexing LRU, least recently used first."""
        return multiplexed_models(self._load_model_fn)

    def stats(self) -> dict:
        return {
            "ready": self.ready_error is None,
            "error": self.ready_error,
            "resident_models": self.resident_models(),
            "model_loads": dict(self.loads),
            "batches": len(self.batch_sizes),
            "max_batch_size_seen": max(self.batch_sizes, default=0),
            "recent_batch_sizes": self.batch_sizes[-50:],
            "waiting": len(self._waiting),
            "torch_threads": _torch_threads(),
        }

    def ready(self) -> BackendHealth:
        """Live readiness (the Ingress's /readyz asks it): the model is loaded, and the device is not held by
        work nobody waits for any more (it stops at the end of the current step)."""
        error = self.ready_error
        if error is None and self._running and all(j.abandoned(time.time()) for j in self._running):
            error = "busy finishing a denoising step of abandoned work"
        return BackendHealth(error is None, error, details={"waiting": len(self._waiting)})

    def check_health(self) -> None:
        if self.ready_error is not None:  # Serve replaces the replica; its status carries the reason
            raise ModelNotLoaded("model", self.ready_error)


def _answer(group, results) -> None:
    for (_, future), result in zip(group, results):
        if not future.done():
            future.set_result(result)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _release_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass

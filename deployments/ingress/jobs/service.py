"""The job core under every asynchronous surface (/v1/jobs, the Replicate predictions; docs/jobs.md).

submit   the /v1/generate checks and the face analysis run at once (bad input: the same 4xx, never a failed job
         later); the Generator's job and what the response needs go into the record (``inputs``), so any
         Ingress replica can run it; the queue is bounded (503 queue_full + Retry-After)
run      Ingress replicas claim queued jobs, all together as many as the Generators can batch (the capacity
         the Generator's autoscaling policy publishes; without it ``jobs.concurrency`` each), and hold a lease they renew;
         a job whose replica died is taken over when its lease lapses. The Generator streams progress
         (``Generator.denoise_stream``), written to the record at most every ``progress_interval_s``. A
         Generator replica dying mid-job runs it again, ``max_attempts`` runs in all, then fails it saying why.
cancel   a queued job never starts; a running one's stream is cancelled: its rows leave the denoising batch at
         the next step, the other requests in the batch go on
end      the record keeps the /v1/generate response (or the error object) for ``result_ttl_s``; a webhook, if
         given, gets the final job (deployments/ingress/jobs/webhooks.py)

The core knows nothing of HTTP: surfaces format records (``JobService.views``) and map routes to these calls.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
import json
from typing import Any, Callable

import numpy as np

from deployments import metrics
from deployments.errors import (INTERNAL, INVALID_PARAMETER, NOT_FOUND, QUEUE_FULL, RESULT_TOO_LARGE, RETRY_LATER,
                                STORAGE_UNAVAILABLE, TOO_MANY_JOBS, UNAVAILABLE, ServiceError, from_exception, unwrap)
from deployments.ingress.identities import visible_to
from deployments.ingress.context import RequestContext
from deployments.ingress.jobs.fair_use import dumps_with_raw, result_bytes
from deployments.ingress.jobs.store import (ACCEPTED, KEY_BUSY, KEY_FULL, TERMINAL, Limits, MemoryJobStore, RawJSON,
                                            make_job_store)
from deployments.messages import GenerationTask, PersonPlacement, PreparedGeneration
from deployments.ingress.jobs.webhooks import WebhookSender

log = logging.getLogger("instantid.serve")

JOB_ID_PREFIX = "job_"
# what the request keeps in the record: the photos were analysed at submit (their embedding and keypoints are
# in the Generator's job), so the base64 images are not kept twice
DROPPED_FIELDS = {"face_images", "pose_image", "init_image"}


def new_job_id() -> str:
    return JOB_ID_PREFIX + secrets.token_hex(12)


def valid_job_id(job_id: str) -> bool:
    return (isinstance(job_id, str) and job_id.startswith(JOB_ID_PREFIX) and len(job_id) == len(JOB_ID_PREFIX) + 24
            and all(c in "0123456789abcdef" for c in job_id[len(JOB_ID_PREFIX):]))


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# -- plain data for the record: arrays and bytes tagged, everything else JSON ------------------------------
def to_plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode(),
                "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"__bytes__": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def from_plain(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            data = base64.b64decode(value["__ndarray__"])
            return np.frombuffer(data, dtype=value["dtype"]).reshape(value["shape"]).copy()
        if "__bytes__" in value:
            return base64.b64decode(value["__bytes__"])
        return {k: from_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    return value


# what a task carries from the Ingress (the Generator's own bookkeeping fields are compare=False)
TASK_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationTask) if f.compare)


def pack(prepared) -> dict:
    """A ``PreparedGeneration`` as plain data for the record."""
    task = {name: getattr(prepared.task, name) for name in TASK_FIELDS}
    if task.get("people"):
        task["people"] = [dataclasses.asdict(person) for person in task["people"]]
    return to_plain({"task": task, "face": prepared.face, "embedding": prepared.embedding,
                     "references": prepared.references, "people": prepared.people})


def unpack(data: dict):
    plain = from_plain(data)
    task = plain["task"]
    if task.get("people"):
        task["people"] = [PersonPlacement(**{**p, "region": tuple(p["region"])}) for p in task["people"]]
    return PreparedGeneration(task=GenerationTask(**task), face=plain["face"], embedding=plain["embedding"],
                              references=plain["references"], people=plain.get("people"))


def check_shared_store(config, store, max_replicas: int) -> None:
    """Refuse to start an Ingress that can run several replicas (``num_replicas`` or autoscaling
    ``max_replicas`` > 1) with jobs in each replica's memory: half the GETs would 404 and a restart loses every
    job. Jobs need a shared store there, or to be turned off."""
    if config.enabled and max_replicas > 1 and isinstance(store, MemoryJobStore):
        raise ValueError(
            f"jobs: this Ingress can run {max_replicas} replicas but its job store is this replica's memory: set "
            f"jobs.redis_url, or the env var jobs.redis_url_env names (${config.redis_url_env}), to a Redis every "
            f"replica reaches, or set jobs.enabled: false (docs/jobs.md)")


def max_replicas_of(deployment_config) -> int:
    """How many replicas a Serve deployment config lets a deployment run at most."""
    auto = getattr(deployment_config, "autoscaling_config", None)
    if auto is not None:
        return int(auto["max_replicas"] if isinstance(auto, dict) else auto.max_replicas)
    return int(getattr(deployment_config, "num_replicas", None) or 1)


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}|{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = text.split("|", 1)
        if not valid_job_id(job_id):
            raise ValueError(job_id)
        return float(created), job_id
    except Exception:
        raise INVALID_PARAMETER("cursor: not a cursor this service gave", field="cursor") from None


def replica_died(exc: BaseException) -> bool:
    """The Generator replica running the call died (killed, OOM, node lost): the job may run again."""
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(unwrap(exc), RayActorError)


class JobService:
    """Submit, look up, cancel and run jobs; ``core`` is the replica's ``GenerationService`` (validation, face
    analysis, the Generator handles, the response)."""

    def __init__(self, core, config):
        self.core = core
        self.config = config
        self.store = make_job_store(config)
        self.webhooks = WebhookSender(config.webhooks)
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        # the final job as each surface shows it (for webhooks): meta["surface"] -> formatter
        self.views: dict[str, Callable[[str, dict], dict]] = {}
        self._loop_task: asyncio.Task | None = None
        self._running: dict[str, asyncio.Task] = {}
        self._wake: asyncio.Event | None = None
        self._streams: dict[tuple[str, bool], Any] = {}

    # -- the worker loop -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start claiming jobs on the running event loop (idempotent; called on first use and by health checks,
        so a replica that takes no request still runs queued jobs and takes over dead replicas' ones)."""
        if not self.config.enabled:
            return
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        next_reap = 0.0
        lost = UNAVAILABLE(f"the replicas running this job stopped "
                            f"{self.config.max_attempts} times; giving up").body()["error"]
        while True:
            try:
                if time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + self.config.lease_s / 3
                    for job_id in await self.store.reap(self.config.max_attempts, self.config.result_ttl_s, lost):
                        log.warning("job %s: its replica stopped; ended by this one", job_id)
                        await self._ended(job_id)
                # with a published capacity the claim script bounds all replicas together; this is the guard
                published = await self.store.capacity()
                local = self.config.concurrency if published is None else self.config.max_running_per_replica
                while len(self._running) < local:
                    job_id = await self.store.claim(self.worker, self.config.lease_s)
                    if job_id is None:
                        break
                    self._running[job_id] = asyncio.ensure_future(self._run(job_id))
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.25)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep trying, the jobs wait in the queue
                log.warning("job loop: %s: %s", type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                await asyncio.sleep(1.0)

    async def _run(self, job_id: str) -> None:
        cfg = self.config
        status, payload = None, None
        try:
            record = await self.store.get(job_id, result=False)
            inputs = await self.store.inputs(job_id)
            if record is None or inputs is None:
                return
            if record.get("attempts", 1) == 1:
                metrics.job_started(time.time() - record["created_at"])
            owner = record.get("owner")
            ctx = RequestContext(route="job", request_id=job_id, api_key=owner)  # its identity was resolved at submit
            work = asyncio.ensure_future(self._execute(ctx, job_id, inputs))
            reason = None
            next_renew = time.monotonic() + cfg.lease_s / 3
            while not work.done():
                await asyncio.wait({work}, timeout=cfg.progress_interval_s)
                if work.done():
                    break
                try:
                    if await self.store.cancel_requested(job_id):
                        reason = "canceled"
                    elif time.monotonic() >= next_renew:
                        next_renew = time.monotonic() + cfg.lease_s / 3
                        if not await self.store.renew(job_id, self.worker, cfg.lease_s):
                            reason = "lost"  # another replica took it over
                except Exception as exc:
                    log.warning("job %s: store unreachable: %s", job_id, type(exc).__name__)
                if reason:
                    ctx.cancel_pending()  # the Generator drops its rows at the next step
                    work.cancel()
                    with contextlib.suppress(BaseException):
                        await work
                    break
            if reason == "lost":
                return
            if reason == "canceled":
                status = "canceled"
            else:
                try:
                    status, payload = "succeeded", {"result": await self._serialised(work.result())}
                except Exception as exc:
                    err = from_exception(exc, request_id=job_id)
                    status, payload = "failed", {"error": err.body()["error"]}
            if await self.store.finish(job_id, status, cfg.result_ttl_s, **(payload or {})):
                await self._ended(job_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store failed: the lease lapses and another replica takes the job over
            log.error("job %s: %s", job_id, type(exc).__name__)
        finally:
            self._running.pop(job_id, None)
            if self._wake is not None:
                self._wake.set()

    async def _serialised(self, result: dict) -> RawJSON:
        """The result as the JSON text stored once (in a thread: megabytes of base64), within the size cap."""
        text = await asyncio.to_thread(json.dumps, result, separators=(",", ":"))
        if len(text) > self.config.max_result_bytes:  # the bound at submit is an upper bound: a safety net
            raise RESULT_TOO_LARGE(f"the result is {len(text)} bytes, over jobs.max_result_bytes "
                                   f"({self.config.max_result_bytes}); ask for delivery s3 or fewer/smaller images")
        return RawJSON(text)

    async def _execute(self, ctx, job_id: str, inputs: dict) -> dict:
        core, cfg = self.core, self.config
        req = core.schemas.GenerateRequest.model_validate(inputs["request"])
        prepared = unpack(inputs["prepared"])
        ctx.timings.update(inputs.get("timings") or {})  # the result's timings are /v1/generate's: submit's too
        timeout = min(req.timeout_s or core.args.request_timeout_s, core.args.request_timeout_s)
        ctx.deadline = time.time() + timeout
        prepared.task.deadline = ctx.deadline
        async with asyncio.timeout(timeout):
            while True:
                try:
                    result = await self._denoise(ctx, job_id, prepared.task)
                    break
                except Exception as exc:
                    if not replica_died(exc):
                        raise
                    attempts = await self.store.attempt(job_id)
                    if attempts > cfg.max_attempts:
                        raise UNAVAILABLE(f"the Generator replica running this job failed "
                                           f"{cfg.max_attempts} times; giving up") from None
                    log.warning("job %s: Generator replica died; running it again (run %d)", job_id, attempts)
                    await asyncio.sleep(1.0)
            return await core.complete_generation(ctx, req, prepared, result)

    def _stream_handle(self, model: str, result_bytes: int):
        large = result_bytes > 1024 * 1024
        handle = self._streams.get((model, large))
        if handle is None:
            handle = self._streams[(model, large)] = self.core.backends.generator_for(model, result_bytes).options(
                stream=True)
        return handle

    async def _denoise(self, ctx, job_id: str, task: GenerationTask):
        stream = self._stream_handle(task.model, task.message_bytes()).denoise_stream.remote(
            task, self.config.progress_interval_s)
        ctx.pending.append(stream)
        started, first = time.perf_counter(), True
        try:
            async for event in stream:
                if "result" in event:
                    return event["result"]
                if first:
                    metrics.job_first_step(time.perf_counter() - started)
                    first = False
                with contextlib.suppress(Exception):  # progress is best effort; the job goes on
                    await self.store.update(job_id, progress=event["progress"])
        finally:
            with contextlib.suppress(ValueError):
                ctx.pending.remove(stream)
        raise INTERNAL("the Generator ended the job without a result")

    async def _ended(self, job_id: str) -> None:
        record = await self.store.get(job_id)
        if record is None:
            return
        metrics.job_status(record["status"])
        webhook = record.get("webhook")
        if webhook:
            meta = record.get("meta") or {}
            view = self.views.get(meta.get("surface", "jobs"))
            if view is not None:  # with the absolute URLs GET shows (the base URL the job was submitted to)
                body = await asyncio.to_thread(lambda: dumps_with_raw(view(job_id, record, meta.get("base_url", ""))))
                self.webhooks.send(webhook, body)

    # -- calls from the surfaces ---------------------------------------------------------------------------
    async def submit(self, ctx, data: dict, files: dict | None = None, *, webhook: str | None = None,
                     meta: dict | None = None) -> tuple[str, dict]:
        """Validate and analyse now (the same errors as /v1/generate), then queue. Returns (id, record)."""
        self._enabled()
        core = self.core
        self.start()
        try:
            if webhook is not None:
                self.webhooks.check(webhook)
            try:
                queued = await self.store.queued()
            except Exception as exc:
                raise self._store_down(exc) from None
            if queued >= self.config.max_queued:  # before any work; submit checks again
                raise self._queue_full()
            req, faces, pose, decode_s = await asyncio.to_thread(core.validate_generate_request, data, files)
            init_image = await asyncio.to_thread(core.validate_init_image, req, files)
            ctx.timings["decode_s"] = decode_s
            prepared = await core.within_deadline(ctx, core.prepare_generation(ctx, req, faces, pose, init_image),
                                            req.timeout_s)
            req = self._within_result_cap(req, prepared.task)  # the output size is known now
        except Exception as exc:
            raise core.fail(ctx, exc) from None
        job_id = new_job_id()
        request = req.model_dump(mode="json", exclude=DROPPED_FIELDS)
        record = {"created_at": time.time(), "owner": ctx.api_key, "webhook": webhook,
                  "meta": {"model": prepared.task.model, **(meta or {})},
                  "inputs": {"request": request, "prepared": pack(prepared),
                             "timings": dict(ctx.timings)}}  # submit's (decode, face analysis, identities...)
        cfg = self.config
        try:
            outcome = await self.store.submit(job_id, record, Limits(cfg.max_queued, cfg.max_jobs_per_key,
                                                                     cfg.max_active_per_key))
        except Exception as exc:
            raise self._store_down(exc) from None
        if outcome == KEY_BUSY:
            raise TOO_MANY_JOBS(f"this API key has {cfg.max_active_per_key} jobs queued or running "
                                "(jobs.max_active_per_key); retry when one has ended", headers=RETRY_LATER)
        if outcome == KEY_FULL:
            raise TOO_MANY_JOBS(f"this API key has {cfg.max_jobs_per_key} jobs stored (jobs.max_jobs_per_key); "
                                f"they expire jobs.result_ttl_s ({cfg.result_ttl_s} s) after they end",
                                headers=RETRY_LATER)
        if outcome != ACCEPTED:
            raise self._queue_full()
        metrics.job_status("queued")
        accepted = await self.get(ctx, job_id)  # as accepted: queued (a worker may claim it at once)
        self._wake.set()
        return job_id, accepted

    def _within_result_cap(self, req, task):
        """The request as it will run: an inline result that could pass ``jobs.max_result_bytes`` goes to S3
        when an output bucket is configured, else it is refused now, naming the limit."""
        cap, w, h, n = self.config.max_result_bytes, task.width, task.height, task.num_images
        size = result_bytes(w, h, n, req.delivery == "inline", req.return_pose_image)
        if size <= cap:
            return req
        if req.delivery == "inline" and self.core.args.output_bucket and result_bytes(
                w, h, n, False, req.return_pose_image) <= cap:
            return req.model_copy(update={"delivery": "s3"})
        raise RESULT_TOO_LARGE(f"{n} image(s) of {w}x{h} can make a result of "
                               f"{size} bytes, over jobs.max_result_bytes ({cap}): ask for delivery s3, fewer "
                               "or smaller images", field="delivery" if req.delivery == "inline" else None)

    def _enabled(self) -> None:
        if not self.config.enabled:
            raise NOT_FOUND("jobs are turned off on this service (jobs.enabled: false)")

    def _queue_full(self) -> ServiceError:
        return QUEUE_FULL(f"{self.config.max_queued} jobs are queued; retry later",
                            headers=RETRY_LATER)

    @staticmethod
    def _store_down(exc: BaseException) -> ServiceError:
        log.error("job store unavailable: %s", type(exc).__name__)
        return STORAGE_UNAVAILABLE("the job store is unavailable; retry later",
                            headers=RETRY_LATER)

    async def get(self, ctx, job_id: str, result: bool = True) -> dict:
        """The record (without inputs); 404 when absent, expired or another key's."""
        self._enabled()
        try:
            record = await self.store.get(job_id, result) if valid_job_id(job_id) else None
        except Exception as exc:
            raise self._store_down(exc) from None
        if record is None or not visible_to(record, ctx.scope):
            raise NOT_FOUND("job not found")
        return record

    async def cancel(self, ctx, job_id: str, wait_s: float = 5.0) -> dict:
        """Cancel; a running job is waited for (up to ``wait_s``) until its denoising stopped."""
        record = await self.get(ctx, job_id, result=False)
        try:
            state = await self.store.cancel(job_id, self.config.result_ttl_s)
        except Exception as exc:
            raise self._store_down(exc) from None
        if record["status"] not in TERMINAL:
            metrics.job_cancelled(record["status"])
        if state == "canceled" and record["status"] == "queued":
            await self._ended(job_id)
        deadline = time.monotonic() + wait_s
        while True:  # polled without the result; the result is read once, at the end
            record = await self.get(ctx, job_id, result=False)
            if record["status"] in TERMINAL or time.monotonic() >= deadline:
                return await self.get(ctx, job_id)
            await asyncio.sleep(0.1)

    async def wait(self, ctx, job_id: str, timeout_s: float) -> dict:
        """The record once it ends, or as it is after ``timeout_s`` (``Prefer: wait``, the handle's wait_job)."""
        deadline = time.monotonic() + timeout_s
        while True:
            record = await self.get(ctx, job_id, result=False)
            if record["status"] in TERMINAL or time.monotonic() >= deadline:
                return await self.get(ctx, job_id)
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    async def events(self, ctx, job_id: str, poll_s: float = 0.25):
        """The record each time its status or progress changes, the last one with the result."""
        last = None
        while True:
            record = await self.get(ctx, job_id, result=False)
            if record["status"] in TERMINAL:
                yield await self.get(ctx, job_id)
                return
            key = (record["status"], str(record.get("progress")))
            if key != last:
                last = key
                yield record
            await asyncio.sleep(poll_s)

    async def list(self, ctx, limit: int = 20, cursor: str | None = None) -> tuple[list[dict], str | None]:
        """The caller's own jobs, newest first, without results (GET one for it): a page of ``limit`` and the
        cursor of the next page (None: the last page)."""
        self._enabled()
        if not 1 <= int(limit) <= 100:
            raise INVALID_PARAMETER("limit: 1 to 100", field="limit")
        before = decode_cursor(cursor) if cursor else None
        try:
            records = await self.store.list(ctx.api_key, int(limit) + 1, before)
        except Exception as exc:
            raise self._store_down(exc) from None
        page = records[:int(limit)]
        more = len(records) > int(limit)
        return page, encode_cursor(page[-1]["created_at"], page[-1]["id"]) if more and page else None

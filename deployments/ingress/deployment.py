"""Ingress deployment: the HTTP API (FastAPI through ``serve.ingress``, built by deployments/ingress/http/app.py) and the
handle API, both over one ``GenerationService`` (deployments/ingress/service.py) composing the FaceAnalyzer and the
Generator through DeploymentHandles.

The Ingress imports no torch. Auth (API keys) and per-key rate limiting are on the HTTP /v1 router
(``AppArgs.auth``); the handle API is for trusted in-cluster callers and skips them.
"""

from __future__ import annotations

import asyncio
import json
import time

from ray import serve
from ray.serve.config import BackpressureConfig

from deployments import metrics
from deployments.errors import ServiceError
from deployments.ingress.context import RequestContext
from deployments.ingress.http.app import build_http_app
from deployments.ingress.http.surfaces.jobs import SURFACE, job_view
from deployments.ingress.jobs.service import check_shared_store, max_replicas_of
from deployments.ingress.service import GenerationService
from deployments.ray_compat import loop_local_handle


async def parsed(view: dict) -> dict:
    """A job view for the handle API: its stored result (JSON text) as the dict it was, parsed in a thread."""
    if isinstance(view.get("result"), str):
        view = {**view, "result": await asyncio.to_thread(json.loads, view["result"])}
    return view


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=64,
    max_queued_requests=256,
    # Beyond its own queue Serve answers before any app code runs (503, a plain-text body); at least the
    # client is told when to come back, as with every other 503 of this API.
    backpressure_config=BackpressureConfig(retry_after_s=1),
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=10,
    health_check_timeout_s=30,
)
@serve.ingress()
class Ingress:
    """HTTP via the FastAPI app built per replica (its schema carries this deployment's limits), and the
    handle API (generate, create_identity, get_identity, delete_identity, list_identities, list_models)."""

    def __init__(self, args: dict, face_analyzer, generator):
        # the backends' handles from this replica's event loop, by value (deployments/ray_compat.py): 3.8 -> 2.3 ms
        # per call, 5.0 -> 2.6 ms with a 128 KB photo; calls over BY_VALUE_MAX_BYTES go by reference (backends.py)
        self.service = GenerationService(args, loop_local_handle(face_analyzer), loop_local_handle(generator))
        # several Ingress replicas need a shared job store: refuse to start with one in memory (docs/jobs.md)
        check_shared_store(self.service.args.jobs, self.service.jobs.store,
                           max_replicas_of(serve.get_replica_context()._deployment_config))

    def __serve_build_asgi_app__(self):
        return build_http_app(self.service)

    # -- handle API (trusted, in-cluster callers; see deployments/client.py) -----------------------------
    async def _handle(self, route: str, fn, *a):
        ctx = RequestContext(route=f"handle.{route}")
        status = 200
        try:
            return await fn(ctx, *a)
        except ServiceError as err:
            status = err.status
            raise
        except Exception as exc:
            err = self.service.fail(ctx, exc)
            status = err.status
            raise err from None
        finally:
            metrics.request_done(ctx.route, "HANDLE", status, time.perf_counter() - ctx.started)

    async def generate(self, request: dict) -> dict:
        """Handle API: the /v1/generate JSON body as a dict -> the response dict."""
        return await self._handle("generate", self.service.generate, dict(request))

    async def create_identity(self, request: dict) -> dict:
        return await self._handle("create_identity", self.service.create_identity, dict(request))

    async def get_identity(self, identity_id: str) -> dict:
        return await self._handle("get_identity", self.service.get_identity, identity_id)

    async def delete_identity(self, identity_id: str) -> None:
        return await self._handle("delete_identity", self.service.delete_identity, identity_id)

    async def list_identities(self, limit: int = 100) -> dict:
        return await self._handle("list_identities", self.service.list_identities, limit)

    async def list_models(self) -> dict:
        return self.service.model_list()

    # -- jobs (deployments/ingress/jobs/service.py; the objects of GET /v1/jobs/{id}) -----------------------------------------
    async def submit_job(self, request: dict) -> dict:
        """Handle API: the POST /v1/jobs JSON body -> the job."""
        async def submit(ctx, data):
            webhook = data.pop("webhook", None)
            return await parsed(job_view(*await self.service.jobs.submit(ctx, data, webhook=webhook,
                                                                         meta={"surface": SURFACE})))

        return await self._handle("submit_job", submit, dict(request))

    async def job(self, job_id: str, wait_s: float = 0.0) -> dict:
        """Handle API: the job, once it ends or after ``wait_s`` seconds (at most 60)."""
        async def get(ctx, job_id):
            return await parsed(job_view(job_id, await self.service.jobs.wait(ctx, job_id, min(float(wait_s), 60.0))))

        return await self._handle("job", get, job_id)

    async def list_jobs(self, limit: int = 20, cursor: str | None = None) -> dict:
        """Handle API: jobs submitted through the handle, newest first: ``{"jobs": [...], "next_cursor"?}``."""
        async def listing(ctx, limit, cursor):
            records, next_cursor = await self.service.jobs.list(ctx, limit, cursor)
            out = {"jobs": [job_view(r["id"], r) for r in records]}
            return {**out, "next_cursor": next_cursor} if next_cursor else out

        return await self._handle("list_jobs", listing, limit, cursor)

    async def cancel_job(self, job_id: str) -> dict:
        async def cancel(ctx, job_id):
            return await parsed(job_view(job_id, await self.service.jobs.cancel(ctx, job_id)))

        return await self._handle("cancel_job", cancel, job_id)

    async def check_health(self) -> None:
        self.service.jobs.start()  # a replica runs queued jobs even before its first request

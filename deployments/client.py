"""Python API for Ray programs: call the service through ``serve.get_app_handle`` instead of HTTP.

    import ray
    from deployments.client import InstantIDClient, encode_image

    ray.init(address="auto")
    client = InstantIDClient()                      # the "instantid" application
    identity = client.create_identity(["me.jpg"])   # paths, bytes or base64 strings
    out = client.generate({"identity_id": identity.identity_id, "prompt": "a watercolor portrait",
                           "steps": 30})            # size: the identity's pose canvas
    open("out.png", "wb").write(out.image_bytes()[0])

Requests and responses are the HTTP API's models (``deployments.ingress.schemas``); the service validates
requests against its own configured limits. Errors raise ``ServiceError`` with the HTTP ``status``,
``code``, ``message`` and ``field`` the HTTP API would answer. The handle API is meant for trusted,
in-cluster callers: it bypasses API keys and rate limits. Each method has an ``_async`` twin for use
inside asyncio code (e.g. another deployment).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from deployments.errors import TIMEOUT, ServiceError, from_exception
from deployments.ingress.schemas import GenerateRequest, GenerateResponse, IdentityList, IdentityResponse, ModelList

__all__ = ["InstantIDClient", "ServiceError", "encode_image", "GenerateRequest", "GenerateResponse",
           "IdentityResponse"]


def encode_image(image: str | Path | bytes) -> str:
    """A path or raw bytes as the base64 string the request models take (a str is passed through)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(image)).decode("ascii")
    if isinstance(image, Path) or (isinstance(image, str) and len(image) < 4096 and Path(image).is_file()):
        return base64.b64encode(Path(image).read_bytes()).decode("ascii")
    return str(image)


def _payload(request: GenerateRequest | dict | None, overrides: dict) -> dict:
    if isinstance(request, BaseModel):
        data = request.model_dump(exclude_none=True)
    else:
        data = dict(request or {})
    data.update(overrides)
    if data.get("face_images") is not None:
        data["face_images"] = [encode_image(x) for x in data["face_images"]]
    for key in ("pose_image", "init_image"):
        if data.get(key) is not None:
            data[key] = encode_image(data[key])
    if data.get("people") is not None:  # each person's photos too
        data["people"] = [{**p, "face_images": [encode_image(x) for x in p["face_images"]]}
                          if isinstance(p, dict) and p.get("face_images") is not None else p for p in data["people"]]
    data["controls"] = [{k: encode_image(v) if k in ("image", "map") and v is not None else v
                         for k, v in dict(control).items()} for control in data.get("controls") or []]
    if not data["controls"]:
        del data["controls"]
    return data


def _raise(exc: BaseException):
    err = from_exception(exc)
    raise err from None


class InstantIDClient:
    def __init__(self, app_name: str = "instantid", *, handle=None, timeout_s: float | None = None):
        if handle is None:
            from ray import serve

            handle = serve.get_app_handle(app_name)
        self.handle = handle
        self.timeout_s = timeout_s

    def _result(self, response) -> Any:
        try:
            return response.result(timeout_s=self.timeout_s)
        except ServiceError:
            raise
        except Exception as exc:
            _raise(exc)

    @staticmethod
    async def _await(response) -> Any:
        try:
            return await response
        except Exception as exc:
            _raise(exc)

    # -- generate --------------------------------------------------------------------------------------
    def generate(self, request: GenerateRequest | dict | None = None, **fields) -> GenerateResponse:
        """``request`` (model or dict) and/or keyword fields; images may be paths or bytes."""
        payload = _payload(request, fields)
        return GenerateResponse.model_validate(self._result(self.handle.generate.remote(payload)))

    async def generate_async(self, request: GenerateRequest | dict | None = None, **fields) -> GenerateResponse:
        payload = _payload(request, fields)
        return GenerateResponse.model_validate(await self._await(self.handle.generate.remote(payload)))

    # -- identities ------------------------------------------------------------------------------------
    def create_identity(self, face_images: list[str | Path | bytes]) -> IdentityResponse:
        payload = {"face_images": [encode_image(x) for x in face_images]}
        return IdentityResponse.model_validate(self._result(self.handle.create_identity.remote(payload)))

    async def create_identity_async(self, face_images: list[str | Path | bytes]) -> IdentityResponse:
        payload = {"face_images": [encode_image(x) for x in face_images]}
        return IdentityResponse.model_validate(await self._await(self.handle.create_identity.remote(payload)))

    def get_identity(self, identity_id: str) -> IdentityResponse:
        return IdentityResponse.model_validate(self._result(self.handle.get_identity.remote(identity_id)))

    async def get_identity_async(self, identity_id: str) -> IdentityResponse:
        return IdentityResponse.model_validate(await self._await(self.handle.get_identity.remote(identity_id)))

    def delete_identity(self, identity_id: str) -> None:
        self._result(self.handle.delete_identity.remote(identity_id))

    async def delete_identity_async(self, identity_id: str) -> None:
        await self._await(self.handle.delete_identity.remote(identity_id))

    def list_identities(self, limit: int = 100) -> IdentityList:
        """At most ``limit`` (1 to 1000) identities, as ``GET /v1/identities?limit=``."""
        return IdentityList.model_validate(self._result(self.handle.list_identities.remote(limit)))

    async def list_identities_async(self, limit: int = 100) -> IdentityList:
        return IdentityList.model_validate(await self._await(self.handle.list_identities.remote(limit)))

    def models(self) -> ModelList:
        return ModelList.model_validate(self._result(self.handle.list_models.remote()))

    async def models_async(self) -> ModelList:
        return ModelList.model_validate(await self._await(self.handle.list_models.remote()))

    # -- jobs (the /v1/jobs objects as dicts: id, status, progress, result | error; docs/api.md) ------------
    def submit_job(self, request: GenerateRequest | dict | None = None, *, webhook: str | None = None,
                   **fields) -> dict:
        """Queue a generation; answers once the photos are checked and analysed (bad input raises at once)."""
        payload = _job_payload(request, fields, webhook)
        return self._result(self.handle.submit_job.remote(payload))

    async def submit_job_async(self, request: GenerateRequest | dict | None = None, *, webhook: str | None = None,
                               **fields) -> dict:
        return await self._await(self.handle.submit_job.remote(_job_payload(request, fields, webhook)))

    def job(self, job_id: str) -> dict:
        return self._result(self.handle.job.remote(job_id))

    async def job_async(self, job_id: str) -> dict:
        return await self._await(self.handle.job.remote(job_id))

    def list_jobs(self, limit: int = 20, cursor: str | None = None) -> dict:
        """Jobs submitted through the handle, newest first, without results: ``{"jobs": [...], "next_cursor"?}``
        (pass ``next_cursor`` back as ``cursor`` for the next page)."""
        return self._result(self.handle.list_jobs.remote(limit, cursor))

    async def list_jobs_async(self, limit: int = 20, cursor: str | None = None) -> dict:
        return await self._await(self.handle.list_jobs.remote(limit, cursor))

    def cancel_job(self, job_id: str) -> dict:
        """Cancel; returns the job once its denoising stopped (``status`` canceled), or as it is after 5 s."""
        return self._result(self.handle.cancel_job.remote(job_id))

    async def cancel_job_async(self, job_id: str) -> dict:
        return await self._await(self.handle.cancel_job.remote(job_id))

    def wait_job(self, job_id: str, timeout_s: float | None = None) -> dict:
        """The job once it ended (succeeded, failed or canceled); raises ServiceError 504 past ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = JOB_WAIT_S if deadline is None else max(0.0, min(JOB_WAIT_S, deadline - time.monotonic()))
            job = self._result(self.handle.job.remote(job_id, wait))
            if job["status"] in JOB_ENDED:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TIMEOUT(f"job {job_id} did not end within {timeout_s:g}s")

    async def wait_job_async(self, job_id: str, timeout_s: float | None = None) -> dict:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = JOB_WAIT_S if deadline is None else max(0.0, min(JOB_WAIT_S, deadline - time.monotonic()))
            job = await self._await(self.handle.job.remote(job_id, wait))
            if job["status"] in JOB_ENDED:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TIMEOUT(f"job {job_id} did not end within {timeout_s:g}s")


JOB_ENDED = ("succeeded", "failed", "canceled")
JOB_WAIT_S = 20.0  # each wait_job call holds the handle call this long at most (the service caps it at 60)


def _job_payload(request, fields: dict, webhook: str | None) -> dict:
    payload = _payload(request, fields)
    if webhook is not None:
        payload["webhook"] = webhook
    return payload

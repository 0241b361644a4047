"""GenerationService: what the Ingress does for a request, in plain Python (no FastAPI, no Serve): the HTTP
surfaces (deployments/ingress/http/surfaces/) and the handle API (deployments/ingress/deployment.py) both call it.

validate     the request dict (+ multipart files) against this deployment's schemas, base64 -> bytes, image
             headers checked (format, pixel count) before anything is decoded in full; once, here
identity     photos -> FaceAnalyzer (``FaceAnalysisResult``), or a stored identity (+ a pose photo analysed)
generate     a ``GenerationTask`` -> Generator (multiplexed by model) -> ``GenerationResult``, under the
             request's deadline; the identity score, when asked
deliver      one encoding of the arrays (png/jpeg/webp), base64 or S3 + presigned URLs (delivery.py)

The service imports no torch.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from pydantic import BaseModel, ValidationError

from instantid import defaults
from instantid.identity import DEMO, Detection, combine_embeddings

from deployments import metrics
from deployments.config import AppArgs
from deployments.errors import (INVALID_PARAMETER, NOT_FOUND, TIMEOUT, TOO_COSTLY, ServiceError, from_exception,
                                storage_unavailable, validation_error)
from deployments.ingress.backends import BACKENDS, Backends
from deployments.ingress.context import RequestContext
from deployments.ingress.controls import finish_control_maps, start_control_maps
from deployments.ingress.delivery import S3Delivery, encode_outputs, to_base64
from deployments.ingress.identities import (decode_embedding, make_record, make_store, new_identity_id,
                                            require_visible, valid_identity_id, visible_to)
from deployments.ingress.identity_score import score_outputs
from deployments.ingress.inputs import check_image, decode_base64
from deployments.ingress.jobs.service import JobService
from deployments.ingress.people import canvas_bbox, resolve_people
from deployments.ingress.schemas import (DELIVERIES, MAX_SEED, OUTPUT_FORMATS, SCHEDULERS, build_models, default_size,
                                         list_limit)
from deployments.messages import FaceAnalysisResult, GenerationTask, PreparedGeneration

log = logging.getLogger("instantid.serve")


def _validate(model: type[BaseModel], data: dict, strict: bool = True) -> BaseModel:
    """Strict types (``"seed": "12"``, ``"width": "64"``, ``"steps": true`` are refused) except for multipart
    forms, whose fields are text by nature."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except RecursionError:
        raise INVALID_PARAMETER("a field is nested too deeply") from None


COST_FIELDS = ("width", "height", "steps", "num_images")


def face_options(req) -> dict:
    """The FaceAnalyzer's Detection messages for a request's face photos and pose photo, only where they differ
    from the demo's (a plain analysis keeps its call)."""
    photos = Detection(det_size=req.det_size, retry=req.det_retry, face_index=req.face_index)
    pose = Detection(det_size=req.det_size, retry=req.det_retry, face_index=req.pose_face_index)
    return {k: v for k, v in (("detection", photos), ("pose_detection", pose)) if v != DEMO}


def check_cost(spec, req, deadline: float | None, size: tuple[int, int] | None = None) -> None:
    """Refuse up front a generation that cannot finish before its deadline: its cost, width x height x steps x
    num_images in megapixel-steps, over the model's measured ``megapixel_steps_per_s`` (``ModelSpec``), plus
    the model's fixed ``overhead_s``, must fit in the time left. 422 naming the four fields. ``size`` is the
    output size when the request leaves it to the photo (known only after face analysis)."""
    width, height = size or (req.width, req.height)
    if spec.megapixel_steps_per_s is None or deadline is None or not width or not height:
        return
    cost = width * height * req.steps * req.num_images / 1e6
    needed = spec.overhead_s + cost / spec.megapixel_steps_per_s
    left = deadline - time.time()
    if needed > left:
        raise TOO_COSTLY(
            f"width x height x steps x num_images = {cost:.1f} megapixel-steps needs about {needed:.0f}s on model "
            f"{spec.name!r}, more than the {max(left, 0):.0f}s left before this request's deadline; lower width, "
            f"height, steps or num_images", field="steps", details=[{"field": f} for f in COST_FIELDS])


class GenerationService:
    """Validation, orchestration of the backends, output policy and delivery for one Ingress replica."""

    def __init__(self, args: dict | AppArgs, face_analyzer, generator, *, status_fn=None, app_name: str | None = None):
        self.args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
        self.schemas = build_models(self.args)  # request schemas bound to this deployment's limits
        self.backends = Backends(face_analyzer, generator, status_fn=status_fn, app_name=app_name)
        self.store = make_store(self.args.identity_store)
        self.s3 = S3Delivery(self.args.output_bucket, self.args.presign_expiry_s) if self.args.output_bucket else None
        self.jobs = JobService(self, self.args.jobs)  # under /v1/jobs, the Replicate surface and the handle's jobs

    # -- plumbing --------------------------------------------------------------------------------------
    async def within_deadline(self, ctx: RequestContext, coro, timeout_s: float | None = None):
        """Run ``coro`` within the request's deadline; past it, cancel in-flight calls and answer 504."""
        timeout = min(timeout_s or self.args.request_timeout_s, self.args.request_timeout_s)
        left = timeout - (time.perf_counter() - ctx.started)  # receiving the body counted against it
        if left <= 0:
            coro.close()
            raise TIMEOUT(f"the request did not finish within {timeout:g}s")
        ctx.deadline = time.time() + left
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({task}, timeout=left)
        except asyncio.CancelledError:  # the client went away: stop the work too
            task.cancel()
            ctx.cancel_pending()
            raise
        if task in done:
            return task.result()
        task.cancel()
        ctx.cancel_pending()
        raise TIMEOUT(f"the request did not finish within {timeout:g}s")

    def fail(self, ctx: RequestContext, exc: BaseException) -> ServiceError:
        err = from_exception(exc, request_id=ctx.request_id)
        if err.code == "no_face":
            metrics.face_not_found(ctx.route)
        return err

    async def _store(self, method: str, *a):
        """An identity-store call in a worker thread; a failing backend (S3 down, disk full or read-only) is a
        503 storage_unavailable, never a 500 or a hang (S3 calls have connect/read timeouts)."""
        try:
            return await asyncio.to_thread(getattr(self.store, method), *a)
        except ServiceError:
            raise
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise
            log.error("identity store %s failed: %s", method, type(exc).__name__)
            raise storage_unavailable() from None

    # -- generate ----------------------------------------------------------------------------------------
    async def stored_identity(self, identity_id: str) -> dict | None:
        """The stored identity record (None when absent), whoever owns it: callers apply ``require_visible``."""
        return await self._store("get", identity_id)

    def validate_generate_request(self, data: dict, files: dict[str, Any] | None = None):
        """A request dict (+ multipart files) -> (validated request, face image bytes | None, pose bytes | None)."""
        started = time.perf_counter()
        req = _validate(self.schemas.GenerateRequest, data, strict=files is None)
        limits = self.args.limits
        faces: list[bytes] | None = None
        pose: bytes | None = None
        files = files or {}
        if req.face_images is not None:
            faces = [decode_base64(s, f"face_images[{i}]") for i, s in enumerate(req.face_images)]
        elif files.get("face_images"):
            faces = list(files["face_images"])
        if req.pose_image is not None:
            pose = decode_base64(req.pose_image, "pose_image")
        elif files.get("pose_image") is not None:
            pose = files["pose_image"]
        if faces is not None and req.identity_id is not None:
            raise INVALID_PARAMETER("give face_images or identity_id, not both",
                               field="face_images")
        if req.people is not None and faces is not None:
            raise INVALID_PARAMETER("people: replaces face_images; give one or the other",
                               field="people")
        if faces is None and req.identity_id is None and req.people is None:
            raise INVALID_PARAMETER("face_images or identity_id is required",
                               field="face_images")
        if faces is not None and not 1 <= len(faces) <= limits.max_faces:
            raise INVALID_PARAMETER(f"face_images: give 1 to {limits.max_faces} images",
                               field="face_images")
        for i, data_ in enumerate(faces or []):
            check_image(data_, f"face_images[{i}]", limits.max_image_pixels)
        if pose is not None:
            check_image(pose, "pose_image", limits.max_image_pixels)
        if req.pose_face_index is not None and pose is None:
            raise INVALID_PARAMETER("pose_face_index: picks a face of pose_image; give pose_image",
                                    field="pose_face_index")
        if (req.face_index is not None or req.combine != defaults.COMBINE) and faces is None:
            field = "face_index" if req.face_index is not None else "combine"
            raise INVALID_PARAMETER(f"{field}: applies to face_images; give face_images", field=field)
        return req, faces, pose, time.perf_counter() - started

    def validate_init_image(self, req, files: dict | None) -> bytes | None:
        """img2img's init image (base64 field or multipart file), header-checked as the photos are."""
        data = (decode_base64(req.init_image, "init_image") if req.init_image is not None
                else (files or {}).get("init_image"))
        if data is not None:
            check_image(data, "init_image", self.args.limits.max_image_pixels)
        return data

    def output_size(self, req, canvas, kps, bbox, init_image: bytes | None) -> tuple[int, int]:
        """The request's size, or the pose canvas's (the init image's after the demo's resize, for img2img);
        422 naming width/height when the face cannot fit that canvas."""
        from instantid.face import analysis_size
        from instantid.image_limits import read_header
        from instantid.keypoints import fit_canvas

        source = tuple(canvas)
        if init_image is not None:
            source = analysis_size(*read_header(init_image, "init_image")[1])  # checked at the edge already
        default = default_size(source, self.args.limits)
        width, height = req.width or default[0], req.height or default[1]
        fit_canvas(tuple(canvas), (width, height), kps, bbox)  # raises InvalidParameterError (422) if no fit
        return width, height

    async def generate_and_deliver(self, ctx: RequestContext, req, faces: list[bytes] | None, pose: bytes | None,
                                   init_image: bytes | None = None) -> dict:
        prepared = await self.prepare_generation(ctx, req, faces, pose, init_image)
        task = prepared.task
        handle = self.backends.generator_for(task.model, task.message_bytes())
        result = await ctx.call(handle.denoise.remote(task))
        return await self.complete_generation(ctx, req, prepared, result)

    async def prepare_generation(self, ctx: RequestContext, req, faces: list[bytes] | None, pose: bytes | None,
                                 init_image: bytes | None = None) -> PreparedGeneration:
        """Everything before the Generator: checks, the identity or the face analysis, the output size, the
        task. A job keeps what this returns in its record and runs it later, on any replica."""
        from instantid.styles import apply_style

        args = self.args
        spec = args.model(req.base_model)
        unknown = sorted(set(req.loras) - set(spec.loras))
        if unknown:
            raise INVALID_PARAMETER(f"loras: unknown LoRA {unknown} for model {spec.name!r}; "
                               f"available: {sorted(spec.loras)}",
                               field="loras")
        if req.delivery == "s3" and self.s3 is None:
            raise INVALID_PARAMETER("delivery: S3 delivery is not configured on this service",
                               field="delivery")
        if not req.safety_checker and args.safety.enabled and not args.safety.allow_disable:
            raise INVALID_PARAMETER("safety_checker: this service does not allow turning the "
                               "safety checker off", field="safety_checker")
        check_cost(spec, req, ctx.deadline)
        await self.backends.require(BACKENDS if req.identity_id is None or pose is not None else ("Generator",))
        prompt, negative = apply_style(req.style, req.prompt, req.negative_prompt)
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
        controls, maps = await start_control_maps(self, ctx, req, spec, faces, pose)  # beside the face analysis

        analysis = plan = None
        if req.people is not None:  # several identities: deployments/ingress/people.py
            plan = await resolve_people(self, ctx, req, pose, init_image)
            embedding = kps = canvas = face = bbox = None
            width, height = plan.width, plan.height
        elif req.identity_id is not None:
            t0 = time.perf_counter()
            record = await self.stored_identity(req.identity_id)
            ctx.timings["identity_load_s"] = time.perf_counter() - t0
            metrics.stage("identity_load", ctx.timings["identity_load_s"])
            require_visible(record, ctx.scope, req.identity_id, field="identity_id")
            embedding = decode_embedding(record["embedding"])
            face = {**record["faces"][0], "source": f"identity:{req.identity_id}"}
            kps, canvas = record["pose"]["kps"], record["pose"]["canvas"]
            if pose is not None:
                posed = await self.analyze_photos(ctx, [], ("pose_image", pose), **face_options(req))
                kps, canvas, face = posed.pose_kps, posed.pose_canvas, posed.pose_face
        else:
            photos = [(f"face_images[{i}]", data) for i, data in enumerate(faces)]
            analysis = await self.analyze_photos(ctx, photos, ("pose_image", pose) if pose is not None else None,
                                                 **face_options(req))
            embedding = analysis.embedding if req.combine == defaults.COMBINE else combine_embeddings(
                analysis.embeddings, req.combine)
            kps, canvas, face = analysis.pose_kps, analysis.pose_canvas, analysis.pose_face

        if plan is None:
            bbox = canvas_bbox(face, canvas)
            if req.enhance_face_region and bbox is None:
                raise INVALID_PARAMETER("enhance_face_region: no face box is known",
                                   field="enhance_face_region")
            width, height = self.output_size(req, canvas, kps, bbox, init_image)
        ctx.timings["identities"] = len(plan.people) if plan else 1
        metrics.identities(ctx.timings["identities"])
        check_cost(spec, req, ctx.deadline, (width, height))  # again at the photo's size when none was given
        controls = await finish_control_maps(ctx, controls, maps)
        task = GenerationTask(
            model=spec.name, embedding=embedding, kps=kps, canvas=canvas, bbox=bbox,
            enhance_face_region=req.enhance_face_region is not False and bbox is not None,
            prompt_weighting=req.prompt_weighting, init_image=init_image, strength=req.strength,
            return_pose_image=req.return_pose_image,
            width=width, height=height, steps=req.steps, scheduler=req.scheduler,
            prompt=prompt, negative_prompt=negative, num_images=req.num_images, seed=seed,
            guidance_scale=req.guidance_scale, ip_adapter_scale=req.ip_adapter_scale,
            controlnet_conditioning_scale=req.controlnet_conditioning_scale, loras=dict(req.loras),
            deadline=ctx.deadline, people=plan.people if plan else None, controls=controls,
            safety_checker=req.safety_checker, noise=req.noise,
        )
        # per photo embeddings for the identity score: only photos sent with this request have them
        return PreparedGeneration(task=task, face=face, embedding=embedding,
                                  references=analysis.embeddings if analysis is not None else None,
                                  people=plan.view if plan else None)

    async def complete_generation(self, ctx: RequestContext, req, prepared: PreparedGeneration, result) -> dict:
        """Everything after the Generator: the identity score, encoding, delivery; the /v1/generate response."""
        task, face = prepared.task, prepared.face
        spec = self.args.model(task.model)
        width, height, seed = task.width, task.height, task.seed
        ctx.timings.update(result.timings)
        arrays, identity = result.images, None
        if req.identity_score and prepared.people is None:  # people are scored per person by nobody yet
            arrays, identity = await score_outputs(self, ctx, req, spec, task, arrays, prepared.embedding,
                                                   prepared.references)

        t0 = time.perf_counter()
        encoded, pose_png = await asyncio.to_thread(encode_outputs, arrays, req.output_format, result.pose_image)
        ctx.timings["encode_s"] = time.perf_counter() - t0
        metrics.stage("encode", ctx.timings["encode_s"])
        images = urls = None
        if req.delivery == "s3":
            t0 = time.perf_counter()
            urls = await asyncio.to_thread(self.s3.upload, encoded, req.output_format, ctx.request_id)
            ctx.timings["upload_s"] = time.perf_counter() - t0
            metrics.stage("upload", ctx.timings["upload_s"])
        else:
            images = [to_base64(b) for b in encoded]
        ctx.timings["total_s"] = time.perf_counter() - ctx.started
        response = {
            "request_id": ctx.request_id, "images": images, "urls": urls, "format": req.output_format,
            "width": width, "height": height, "seed": seed, "model": result.model,
            "loras": dict(req.loras), "face": face, "people": prepared.people,
            "pose_image": to_base64(pose_png) if pose_png is not None else None,
            "identity": identity, "nsfw": result.nsfw,
            "timings": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in ctx.timings.items()},
        }
        return {k: v for k, v in response.items() if v is not None}

    async def analyze_photos(self, ctx: RequestContext, photos: list[tuple[str, bytes]], pose: tuple[str, bytes] | None = None,
                             thumbnail: bool = False, group: bool = False, **detection) -> FaceAnalysisResult:
        """The FaceAnalyzer's analysis of named photos (and a pose photo, every face of it with ``group``); its
        timings go into the request's. ``detection``: ``face_options``' non-default Detection messages."""
        size = sum(len(data) for _, data in photos) + (len(pose[1]) if pose is not None else 0)
        extra = (group,) if group else ()  # only people requests send it: a plain analysis keeps its signature
        analysis = await ctx.call(self.backends.face_for(size).analyze.remote(photos, pose, thumbnail, *extra,
                                                                                **detection))
        ctx.timings["image_decode_s"] = analysis.timings["decode_s"]
        ctx.timings["face_analysis_s"] = analysis.timings["face_analysis_s"]
        return analysis

    async def generate(self, ctx: RequestContext, data: dict, files: dict | None = None) -> dict:
        """Decode, run under the deadline, map errors: the one path for HTTP (JSON, multipart) and handles."""
        try:
            # base64, validation and image header checks are CPU work on client bytes: off the event loop
            req, faces, pose, decode_s = await asyncio.to_thread(self.validate_generate_request, data, files)
            init_image = await asyncio.to_thread(self.validate_init_image, req, files)
            ctx.timings["decode_s"] = decode_s
            metrics.stage("decode", decode_s)
            return await self.within_deadline(ctx, self.generate_and_deliver(ctx, req, faces, pose, init_image),
                                        req.timeout_s)
        except Exception as exc:
            raise self.fail(ctx, exc) from None

    # -- identities --------------------------------------------------------------------------------------
    def validate_identity_photos(self, data: dict, files: dict | None = None) -> list[bytes]:
        limits = self.args.limits
        if files and files.get("face_images"):
            if data:
                raise INVALID_PARAMETER(f"unexpected fields {[k[:64] for k in sorted(data)[:8]]}")
            faces = list(files["face_images"])
            if not 1 <= len(faces) <= limits.max_faces:
                raise INVALID_PARAMETER(f"face_images: give 1 to {limits.max_faces} images",
                                   field="face_images")
        else:
            req = _validate(self.schemas.IdentityCreateRequest, data, strict=files is None)
            faces = [decode_base64(s, f"face_images[{i}]") for i, s in enumerate(req.face_images)]
        for i, image in enumerate(faces):
            check_image(image, f"face_images[{i}]", limits.max_image_pixels)
        return faces

    async def _create_identity(self, ctx: RequestContext, faces: list[bytes]) -> dict:
        await self.backends.require(("FaceAnalyzer",))
        photos = [(f"face_images[{i}]", data) for i, data in enumerate(faces)]
        analysis = await self.analyze_photos(ctx, photos, None, thumbnail=True)
        record = make_record(new_identity_id(), embedding=analysis.embedding, pose_kps=analysis.pose_kps,
                             pose_canvas=analysis.pose_canvas, faces=analysis.faces,
                             thumbnail=analysis.thumbnail, owner=ctx.api_key)
        await self._store("put", record)
        return self.identity_view(record)

    async def create_identity(self, ctx: RequestContext, data: dict, files: dict | None = None) -> dict:
        try:
            faces = await asyncio.to_thread(self.validate_identity_photos, data, files)
            return await self.within_deadline(ctx, self._create_identity(ctx, faces))
        except Exception as exc:
            raise self.fail(ctx, exc) from None

    @staticmethod
    def identity_view(record: dict) -> dict:
        return {
            "identity_id": record["identity_id"], "created_at": record["created_at"],
            "num_photos": record["num_photos"], "faces": record["faces"],
            "embedding_dim": record.get("embedding_dim", 512), "thumbnail": record.get("thumbnail"),
        }

    async def get_identity(self, ctx: RequestContext, identity_id: str) -> dict:
        try:
            record = await self.stored_identity(identity_id) if valid_identity_id(identity_id) else None
        except Exception as exc:
            raise self.fail(ctx, exc) from None
        return self.identity_view(require_visible(record, ctx.scope))

    async def delete_identity(self, ctx: RequestContext, identity_id: str) -> None:
        try:
            deleted = valid_identity_id(identity_id)
            if deleted and ctx.scope is not None:  # another key's identity is left alone and reported absent
                record = await self.stored_identity(identity_id)
                deleted = record is not None and visible_to(record, ctx.scope)
            deleted = deleted and await self._store("delete", identity_id)
        except Exception as exc:
            raise self.fail(ctx, exc) from None
        if not deleted:
            raise NOT_FOUND("identity not found")  # never echo the input

    async def list_identities(self, ctx: RequestContext, limit: int) -> dict:
        limit = list_limit(limit)
        try:
            return {"identities": await self._store("list", limit, ctx.scope)}
        except Exception as exc:
            raise self.fail(ctx, exc) from None

    # -- face analysis (the playground's POST /v1/faces:analyze) -----------------------------------------------
    async def analyze_faces(self, ctx: RequestContext, data: dict, files: dict | None = None) -> dict:
        """Same input checks as creating an identity (``validate_identity_photos``), same FaceAnalyzer call, nothing
        stored: the face each photo contributes."""
        try:
            started = time.perf_counter()
            # header checks: off the event loop
            photos = await asyncio.to_thread(self.validate_identity_photos, data, files)
            ctx.timings["decode_s"] = time.perf_counter() - started
            return await self.within_deadline(ctx, self._find_faces(ctx, photos))
        except Exception as exc:
            raise self.fail(ctx, exc) from None

    async def _find_faces(self, ctx: RequestContext, photos: list[bytes]) -> dict:
        await self.backends.require(("FaceAnalyzer",))
        analysis = await self.analyze_photos(ctx, [(f"face_images[{i}]", data) for i, data in enumerate(photos)])
        ctx.timings["total_s"] = time.perf_counter() - ctx.started
        return {"faces": analysis.faces, "timings": {k: round(v, 6) for k, v in ctx.timings.items()}}

    # -- info and readiness ------------------------------------------------------------------------------
    def model_list(self) -> dict:
        from instantid.styles import presets

        return {
            "models": [{"name": m.name, "loras": sorted(m.loras), "controls": sorted(m.controlnets),
                        "default": m.name == self.args.default_model}
                       for m in self.args.models],
            "schedulers": list(SCHEDULERS), "styles": sorted(presets()),
            "output_formats": list(OUTPUT_FORMATS),
            "delivery": [d for d in DELIVERIES if d != "s3" or self.args.output_bucket],
            "profile": self.args.profile,
        }

    async def readiness(self, fresh: bool = False) -> dict:
        return await self.backends.readiness(fresh)

    async def live_readiness(self, timeout_s: float = 2.0) -> dict:
        return await self.backends.live_readiness(timeout_s)

"""The Ingress's identity score step: generated images -> the FaceAnalyzer's ``score`` -> per image ``identity``;
under ``min_similarity`` they are flagged and, with ``retry_below_threshold``, regenerated with new seeds (at
most that many rounds, each only while the request's deadline leaves room), keeping the best of each slot.

A scoring failure never costs the caller the images: they are returned without ``identity`` (and logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time

from deployments import metrics
from deployments.messages import GenerationTask, controls_bytes
from deployments.ingress.schemas import MAX_SEED

log = logging.getLogger("instantid.serve")

# Kept free at the end of the deadline for encoding and answering: a retry round is not started (and one that
# runs into it is cancelled, its images dropped) closer to the deadline than this.
DEADLINE_RESERVE_S = 2.0
# The longest a scoring call may take (4 outputs at 2048x2048 take a few seconds on a busy replica). Past it the
# images go back unscored: a FaceAnalyzer with no replica (the app being deleted or redeployed while this
# request drains) would otherwise hold the finished images until the Ingress is killed.
SCORE_TIMEOUT_S = 10.0


def below(score: dict, min_similarity: float | None) -> bool:
    """instantid.scoring.below_threshold on the FaceAnalyzer's dicts (the Ingress imports no model code)."""
    if min_similarity is None:
        return False
    return not score["face_found"] or score["similarity"] < min_similarity


def _why(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _better(new: dict, old: dict) -> bool:
    return new["face_found"] and (not old["face_found"] or new["similarity"] > old["similarity"])


async def _score(core, ctx, images: list, embedding, references, model: str) -> list[dict]:
    """One FaceAnalyzer call for all of ``images``; by reference when they are large (``Backends.face_for``)."""
    nbytes = sum(int(a.nbytes) for a in images)
    response = core.backends.face_for(nbytes).score.remote(list(images), embedding, references)
    try:
        async with asyncio.timeout(SCORE_TIMEOUT_S):
            result = await ctx.call(response)
    except TimeoutError:
        with contextlib.suppress(Exception):
            response.cancel()
        raise
    ctx.timings["identity_score_s"] = ctx.timings.get("identity_score_s", 0.0) + result["timings"]["identity_score_s"]
    for score in result["scores"]:
        metrics.identity_scored(model, score["similarity"])
    return result["scores"]


def _round_fits(spec, task: GenerationTask, count: int, deadline: float | None) -> bool:
    """Whether regenerating ``count`` images may finish before the deadline (the model's measured speed, when
    known, as check_cost estimates it)."""
    if deadline is None:
        return True
    left = deadline - time.time() - DEADLINE_RESERVE_S
    if spec.megapixel_steps_per_s is None:
        return left > 0
    cost = task.width * task.height * task.steps * count / 1e6
    return spec.overhead_s + cost / spec.megapixel_steps_per_s <= left


async def _regenerate(core, ctx, spec, task: GenerationTask, seeds: list[int]) -> list | None:
    """One image per new seed (separate tasks, so each reproduces with its seed and num_images 1; the Generator
    batches them); None when the deadline's reserve is reached first."""
    size = max(task.width * task.height * 3, controls_bytes(task.controls))  # the task carries its control maps
    responses = [core.backends.generator_for(spec.name, size).denoise.remote(
        dataclasses.replace(task, num_images=1, seed=seed, return_pose_image=False))
                 for seed in seeds]
    left = None if ctx.deadline is None else ctx.deadline - time.time() - DEADLINE_RESERVE_S
    try:
        async with asyncio.timeout(left):
            results = await asyncio.gather(*(ctx.call(r) for r in responses))
    except TimeoutError:
        for response in responses:
            with contextlib.suppress(Exception):
                response.cancel()
        return None
    return [r.images[0] for r in results]


async def score_outputs(core, ctx, req, spec, task: GenerationTask, images: list, embedding,
                        references) -> tuple[list, list | None]:
    """(images, per image identity dicts) after scoring and, when asked, regenerating those under the threshold."""
    images = list(images)
    try:
        scores = await _score(core, ctx, images, embedding, references, spec.name)
    except Exception as exc:  # a backend failure: the images stand without a score (cancellation passes)
        log.warning("identity score failed, images returned without it: %s", _why(exc))
        return images, None
    seeds: list[int | None] = [None] * len(images)
    attempts = [1] * len(images)
    todo = [i for i, s in enumerate(scores) if below(s, req.min_similarity)]
    rounds, started = 0, time.perf_counter()
    while todo and rounds < req.retry_below_threshold and _round_fits(spec, task, len(todo), ctx.deadline):
        rounds += 1
        new_seeds = [secrets.randbelow(MAX_SEED + 1) for _ in todo]
        fresh = await _regenerate(core, ctx, spec, task, new_seeds)
        if fresh is None:
            break
        metrics.identity_retries(spec.name, len(todo))
        try:
            fresh_scores = await _score(core, ctx, fresh, embedding, references, spec.name)
        except Exception as exc:
            log.warning("identity score of regenerated images failed: %s", _why(exc))
            break
        for i, image, score, seed in zip(todo, fresh, fresh_scores, new_seeds):
            attempts[i] += 1
            if _better(score, scores[i]):
                images[i], scores[i], seeds[i] = image, score, seed
        todo = [i for i in todo if below(scores[i], req.min_similarity)]
    if rounds:
        ctx.timings["identity_retry_s"] = time.perf_counter() - started
    identity = []
    for score, seed, tries in zip(scores, seeds, attempts):
        entry = dict(score)
        if req.min_similarity is not None:
            entry["below_threshold"] = below(score, req.min_similarity)
        if seed is not None:
            entry["seed"] = seed
        if req.retry_below_threshold:
            entry["attempts"] = tries
        identity.append(entry)
    return images, identity

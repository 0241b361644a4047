"""The job store as a state machine (issue 30): every event in every state, on both stores (a real redis-server
and the in-process one), against one table written out by hand. A store that let a finished job be claimed,
cancelled or finished again, or lost a running job's cancel request, fails a row here."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.ingress.jobs.store import ACCEPTED, Limits, MemoryJobStore, RawJSON, RedisJobStore
from redis_server import redis_url  # noqa: F401  (a fixture)

ERROR = {"code": "unavailable", "message": "lost"}
LEASE = 0.15  # seconds: a lease this short has run out after LAPSE
LAPSE = 0.3
MAX_ATTEMPTS = 2

# state -> how to get a job "j" there; "running+cancel": running with a cancel requested; "running-last": running on
# its last allowed attempt
STATES = ["queued", "running", "running+cancel", "running-last", "succeeded", "failed", "canceled"]


async def into(store, state: str, lease: float) -> None:
    assert await store.submit("j", {"created_at": time.time(), "inputs": {"n": 1}}, Limits(10)) == ACCEPTED
    if state == "queued":
        return
    if state == "canceled":
        assert await store.cancel("j", 60) == "canceled"
        return
    assert await store.claim("w1", lease) == "j"
    if state == "running+cancel":
        assert await store.cancel("j", 60) == "running"
    elif state == "running-last":
        await store.attempt("j")  # attempts == MAX_ATTEMPTS now
    elif state in ("succeeded", "failed"):
        assert await store.finish("j", state, 60, result=RawJSON('{"images":[]}') if state == "succeeded" else None,
                                  error=ERROR if state == "failed" else None)


async def lapse():
    await asyncio.sleep(LAPSE)


# event -> (how to apply it, {state: (returned, state after)}). Written from the contract (docs/jobs.md), not
# from either implementation.
EVENTS = {
    "claim": (lambda s: s.claim("w2", 60), {
        "queued": ("j", "running"), "running": (None, "running"), "running+cancel": (None, "running"),
        "running-last": (None, "running"), "succeeded": (None, "succeeded"), "failed": (None, "failed"),
        "canceled": (None, "canceled")}),
    "finish-succeeded": (lambda s: s.finish("j", "succeeded", 60, result=RawJSON('{"images":["x"]}')), {
        "queued": (True, "succeeded"), "running": (True, "succeeded"), "running+cancel": (True, "succeeded"),
        "running-last": (True, "succeeded"), "succeeded": (False, "succeeded"), "failed": (False, "failed"),
        "canceled": (False, "canceled")}),
    "finish-failed": (lambda s: s.finish("j", "failed", 60, error=ERROR), {
        "queued": (True, "failed"), "running": (True, "failed"), "running+cancel": (True, "failed"),
        "running-last": (True, "failed"), "succeeded": (False, "succeeded"), "failed": (False, "failed"),
        "canceled": (False, "canceled")}),
    "finish-canceled": (lambda s: s.finish("j", "canceled", 60), {
        "queued": (True, "canceled"), "running": (True, "canceled"), "running+cancel": (True, "canceled"),
        "running-last": (True, "canceled"), "succeeded": (False, "succeeded"), "failed": (False, "failed"),
        "canceled": (False, "canceled")}),
    "cancel": (lambda s: s.cancel("j", 60), {
        "queued": ("canceled", "canceled"), "running": ("running", "running"),
        "running+cancel": ("running", "running"), "running-last": ("running", "running"),
        "succeeded": ("succeeded", "succeeded"), "failed": ("failed", "failed"), "canceled": ("canceled", "canceled")}),
    "renew-own": (lambda s: s.renew("j", "w1", 60), {
        "queued": (False, "queued"), "running": (True, "running"), "running+cancel": (True, "running"),
        "running-last": (True, "running"), "succeeded": (False, "succeeded"), "failed": (False, "failed"),
        "canceled": (False, "canceled")}),
    "renew-other": (lambda s: s.renew("j", "w9", 60), {
        "queued": (False, "queued"), "running": (False, "running"), "running+cancel": (False, "running"),
        "running-last": (False, "running"), "succeeded": (False, "succeeded"), "failed": (False, "failed"),
        "canceled": (False, "canceled")}),
    # the lease runs out, then the reaper: a retry, or the end of a job that asked to stop or ran out of attempts
    "lease-lapses-then-reap": (None, {
        "queued": ([], "queued"), "running": ([], "queued"), "running+cancel": (["j"], "canceled"),
        "running-last": (["j"], "failed"), "succeeded": ([], "succeeded"), "failed": ([], "failed"),
        "canceled": ([], "canceled")}),
}


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    def make():
        if request.param == "memory":
            return MemoryJobStore()
        return RedisJobStore(request.getfixturevalue("redis_url"), prefix=f"tr{time.monotonic_ns()}:")

    return make


@pytest.mark.parametrize("event", sorted(EVENTS))
def test_every_event_in_every_state(make_store, event):
    apply, table = EVENTS[event]

    async def one(state):
        store = make_store()  # a fresh store (or Redis prefix) per state
        try:
            await into(store, state, LEASE if apply is None else 60)
            if apply is None:
                await lapse()
                got = list(await store.reap(MAX_ATTEMPTS, 60, ERROR))
            else:
                got = await apply(store)
            return got, (await store.get("j"))["status"]
        finally:
            await store.close()  # in this event loop: a Redis connection belongs to the loop that opened it

    async def all_states():
        return {state: await one(state) for state in STATES}

    results = asyncio.run(all_states())
    wrong = {k: {"got": results[k], "want": table[k]} for k in STATES if results[k] != table[k]}
    assert not wrong, wrong

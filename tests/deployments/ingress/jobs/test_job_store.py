"""The job store's contract, on a real redis-server and on the in-process store: the queue bound, one claim per
job, leases taken over when a replica stops renewing, cancel vs finish, expiry of finished jobs."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from deployments.ingress.jobs.store import ACCEPTED, QUEUE_FULL, Limits, MemoryJobStore, RawJSON, RedisJobStore
from redis_server import redis_url  # noqa: F401  (a fixture)

ERROR = {"code": "unavailable", "message": "lost"}


@pytest.fixture(params=["redis", "memory"])
def make_store(request):
    made = []

    def make():
        if request.param == "memory":
            return MemoryJobStore()
        store = RedisJobStore(request.getfixturevalue("redis_url"), prefix=f"t{time.monotonic_ns()}:")
        made.append(store)
        return store

    return make


def run(coro):
    return asyncio.run(coro)


def test_submit_is_bounded_and_claims_are_fifo_and_exclusive(make_store):
    async def go():
        store = make_store()
        for i in range(3):
            assert await store.submit(f"j{i}", {"created_at": time.time(), "inputs": {"n": i}}, Limits(3)) == ACCEPTED
        assert await store.submit("j3", {"created_at": time.time()}, Limits(3)) == QUEUE_FULL
        assert await store.get("j3") is None
        claims = await asyncio.gather(*(store.claim(f"w{i}", 5) for i in range(5)))
        assert sorted(c for c in claims if c) == ["j0", "j1", "j2"] and claims.count(None) == 2
        job = await store.get("j0")
        assert job["status"] == "running" and job["attempts"] == 1 and job["started_at"] >= job["created_at"]
        assert await store.inputs("j1") == {"n": 1}
        assert await store.queued() == 0
    run(go())


def test_finish_once_and_finished_jobs_expire(make_store):
    async def go():
        store = make_store()
        await store.submit("a", {"created_at": time.time(), "inputs": {"x": 1}}, Limits(10))
        assert await store.claim("w", 5) == "a"
        await store.update("a", progress={"step": 1, "total": 2})
        assert (await store.get("a"))["progress"] == {"step": 1, "total": 2}
        assert await store.finish("a", "succeeded", 1, result=RawJSON('{"images":["x"]}'))
        assert not await store.finish("a", "failed", 1, error=ERROR)  # the first end wins
        job = await store.get("a")
        assert job["status"] == "succeeded" and json.loads(job["result"]) == {"images": ["x"]} and "completed_at" in job
        assert await store.inputs("a") is None  # inputs go when the job ends
        assert "result" not in await store.get("a", result=False)
        await asyncio.sleep(2.1)
        assert await store.get("a") is None
    run(go())


def test_cancel_a_queued_job_removes_it_and_a_running_one_is_flagged(make_store):
    async def go():
        store = make_store()
        for name in ("q", "r"):
            await store.submit(name, {"created_at": time.time()}, Limits(10))
        assert await store.claim("w", 5) == "q"
        assert await store.cancel("r", 60) == "canceled"  # queued: canceled at once, never starts
        assert await store.claim("w", 5) is None
        assert await store.cancel("q", 60) == "running"
        assert await store.cancel_requested("q")
        assert await store.finish("q", "canceled", 60)
        assert await store.cancel("q", 60) == "canceled"
        assert await store.cancel("nope", 60) is None
    run(go())


def test_a_job_whose_lease_lapses_is_taken_over_then_failed_past_max_attempts(make_store):
    async def go():
        store = make_store()
        await store.submit("a", {"created_at": time.time(), "inputs": {"x": 1}}, Limits(10))
        assert await store.claim("dead", 0.2) == "a"
        assert await store.renew("a", "dead", 0.2)
        assert await store.reap(2, 60, ERROR) == []  # lease still held
        await asyncio.sleep(0.35)
        assert not await store.renew("a", "dead", 0.2)
        assert await store.reap(2, 60, ERROR) == []  # back in the queue, at the front
        assert (await store.get("a"))["status"] == "queued"
        assert await store.claim("other", 0.2) == "a"
        assert (await store.get("a"))["attempts"] == 2
        await asyncio.sleep(0.35)
        assert await store.reap(2, 60, ERROR) == ["a"]  # second loss: failed with the reason
        job = await store.get("a")
        assert job["status"] == "failed" and job["error"] == ERROR
    run(go())


def test_a_cancelled_job_whose_replica_died_ends_canceled(make_store):
    async def go():
        store = make_store()
        await store.submit("a", {"created_at": time.time()}, Limits(10))
        await store.claim("dead", 0.1)
        await store.cancel("a", 60)
        await asyncio.sleep(0.2)
        assert await store.reap(2, 60, ERROR) == ["a"]
        assert (await store.get("a"))["status"] == "canceled"
    run(go())

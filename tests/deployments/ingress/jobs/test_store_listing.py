"""The job store's per-key index, on a real redis-server and on the in-process store: a key's own jobs listed
newest first with a cursor, expired ones gone from the list and the counts, the per-key caps, the capacity
the autoscaling policy publishes bounding claims, results kept as the text they were stored as."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from redis_server import redis_url  # noqa: F401  (a fixture)

from deployments.ingress.jobs.store import (ACCEPTED, KEY_BUSY, KEY_FULL, QUEUE_FULL, Limits, MemoryJobStore, RawJSON,
                                            RedisJobStore)

BIG = Limits(100)


@pytest.fixture(params=["redis", "memory"])
def store(request):
    if request.param == "memory":
        yield MemoryJobStore()
        return
    made = RedisJobStore(request.getfixturevalue("redis_url"), prefix=f"t{time.monotonic_ns()}:")
    yield made


def run(coro):
    return asyncio.run(coro)


async def submit(store, job_id, owner, limits=BIG, created_at=None):
    return await store.submit(job_id, {"created_at": created_at or time.time(), "owner": owner}, limits)


def test_a_key_lists_its_own_jobs_newest_first_page_by_page(store):
    async def go():
        for i in range(5):
            assert await submit(store, f"a{i}", "alice", created_at=1000.0 + i) == ACCEPTED
        assert await submit(store, "b0", "bob", created_at=1002.5) == ACCEPTED
        first = await store.list("alice", 2)
        assert [j["id"] for j in first] == ["a4", "a3"] and first[0]["status"] == "queued"
        second = await store.list("alice", 2, before=(first[-1]["created_at"], first[-1]["id"]))
        third = await store.list("alice", 2, before=(second[-1]["created_at"], second[-1]["id"]))
        assert [j["id"] for j in second] == ["a2", "a1"] and [j["id"] for j in third] == ["a0"]
        assert [j["id"] for j in await store.list("bob", 10)] == ["b0"]
        assert await store.list("carol", 10) == []
    run(go())


def test_jobs_with_the_same_created_at_are_each_listed_once_across_pages(store):
    async def go():
        for name in "pqrst":
            await submit(store, name, "alice", created_at=5000.0)
        seen, before = [], None
        while True:
            page = await store.list("alice", 2, before=before)
            if not page:
                break
            seen += [j["id"] for j in page]
            before = (page[-1]["created_at"], page[-1]["id"])
        assert seen == ["t", "s", "r", "q", "p"]
    run(go())


def test_listing_has_no_results_and_expired_jobs_leave_it_and_the_counts(store):
    async def go():
        await submit(store, "old", "alice")
        await submit(store, "new", "alice")
        assert await store.claim("w", 5) == "old"
        assert await store.finish("old", "succeeded", 1, result=RawJSON('{"images":["x"]}'))
        listed = {j["id"]: j for j in await store.list("alice", 10)}
        assert listed["old"]["status"] == "succeeded" and "result" not in listed["old"]
        await asyncio.sleep(2.1)
        assert [j["id"] for j in await store.list("alice", 10)] == ["new"]
        limits = Limits(100, max_per_key=2)
        assert await submit(store, "third", "alice", limits) == ACCEPTED  # "old" no longer counts
        assert await submit(store, "fourth", "alice", limits) == KEY_FULL
    run(go())


def test_per_key_caps_refuse_that_key_only(store):
    async def go():
        limits = Limits(max_queued=100, max_per_key=3, max_active_per_key=2)
        assert await submit(store, "a1", "alice", limits) == ACCEPTED
        assert await submit(store, "a2", "alice", limits) == ACCEPTED
        assert await submit(store, "a3", "alice", limits) == KEY_BUSY  # two in flight already
        assert await submit(store, "b1", "bob", limits) == ACCEPTED
        assert await store.cancel("a1", 60) == "canceled"  # ended: stored, not in flight
        assert await submit(store, "a3", "alice", limits) == ACCEPTED
        assert await submit(store, "a4", "alice", limits) == KEY_FULL  # three stored
        assert await store.get("a4") is None
        assert await submit(store, "b2", "bob", Limits(max_queued=3)) == QUEUE_FULL  # a2, a3, b1 queued
    run(go())


def test_claims_stop_at_the_published_capacity(store):
    async def go():
        for i in range(3):
            await submit(store, f"j{i}", None)
        if isinstance(store, MemoryJobStore):
            store.capacity_value = 1
        else:
            await store.redis.set(store.capacity_key, 1)
        assert await store.capacity() == 1
        assert await store.claim("w1", 5) == "j0"
        assert await store.claim("w2", 5) is None  # the Generators take one job at once
        assert await store.finish("j0", "succeeded", 60, result=RawJSON("{}"))
        assert await store.claim("w2", 5) == "j1"
        if isinstance(store, MemoryJobStore):
            store.capacity_value = None
        else:
            await store.redis.delete(store.capacity_key)
        assert await store.claim("w3", 5) == "j2"  # no capacity published: no global bound
    run(go())


def test_the_result_comes_back_as_the_text_it_was_stored_as(store):
    async def go():
        await submit(store, "r", "alice")
        await store.claim("w", 5)
        text = json.dumps({"images": ["a" * 1000], "seed": 3}, separators=(",", ":"))
        await store.finish("r", "succeeded", 60, result=RawJSON(text))
        got = (await store.get("r"))["result"]
        assert isinstance(got, RawJSON) and got == text
    run(go())

"""Where job records and the job queue live: Redis (every Ingress replica sees them, they outlive a replica), or
in-process for the one-replica local profile (``scripts/demo``, unit tests). Both give the same async interface.

Redis layout (``prefix`` = ``jobs.key_prefix``):
    {prefix}job:{id}    hash: status, created_at, started_at, completed_at, progress (JSON), result (JSON),
                        error (JSON), owner, webhook, meta (JSON), inputs (JSON, until the job ends),
                        attempts, cancel, worker; expires ``result_ttl_s`` after the job ends
    {prefix}queue       list of queued ids (FIFO; a job taken back from a dead replica goes to the front)
    {prefix}running     list of running ids
    {prefix}lease:{id}  the worker's name, expiring ``lease_s`` after its last renewal
    {prefix}owner:{key} sorted set of the key's job ids by created_at (GET /v1/jobs lists it, newest first)
    {prefix}ends:{key}  the same ids by when their record expires (+inf while queued or running): expired ones
                        leave both sets on the key's next submit or list, and the key's counts come from it
    {prefix}capacity    jobs the Generators can batch at once (running replicas x per_replica), written by the
                        Generator's autoscaling policy (deployments/ingress/jobs/autoscaling.py); while it exists, all
                        workers together keep at most that many jobs running

The result is stored as JSON text, serialised once by the worker that finished the job (off the event loop);
reads hand it back as ``RawJSON`` (that text), so a GET never parses or re-serialises a large record.

Every transition (submit under the queue bound, claim, finish, cancel, reclaiming jobs whose lease expired) is
one Lua script, so two replicas never both start a job and a cancel never races a finish. The scripts build
key names from the prefix: a single Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

TERMINAL = ("succeeded", "failed", "canceled")
SWEEP_BATCH = 64  # expired in-memory records forgotten per write at most
INDEX_TTL_S = 7 * 24 * 3600  # a key's index sets outlive its last submit or end by this (then they go)
ANONYMOUS = "-"  # the index of jobs submitted without an API key (auth off)

# what submit answers
ACCEPTED, QUEUE_FULL, KEY_FULL, KEY_BUSY = "accepted", "queue_full", "key_full", "key_busy"


class RawJSON(str):
    """JSON text as stored: embedded as is in responses (deployments' views), parsed only where needed."""

# KEYS: queue, job, owner index, ends index; ARGV: max_queued, id, now, created_at, max_per_key,
# max_active_per_key, index ttl, then the record's fields
_SUBMIT = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[3])
for _, id in ipairs(gone) do redis.call('ZREM', KEYS[3], id); redis.call('ZREM', KEYS[4], id) end
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[5]) then return 'key_full' end
if redis.call('ZCOUNT', KEYS[4], '+inf', '+inf') >= tonumber(ARGV[6]) then return 'key_busy' end
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 'queue_full' end
redis.call('HSET', KEYS[2], unpack(ARGV, 8))
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('ZADD', KEYS[4], '+inf', ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[7])
redis.call('EXPIRE', KEYS[4], ARGV[7])
return 'accepted'
"""

# a job ended (in finish, cancel, reap): its record and its place in the owner's ends index expire together
_ENDED = """
local function ended(prefix, job, id, now, ttl)
  redis.call('HDEL', job, 'inputs')
  redis.call('EXPIRE', job, ttl)
  local owner = redis.call('HGET', job, 'owner') or '-'
  local ends = prefix .. 'ends:' .. owner
  if redis.call('ZSCORE', ends, id) then redis.call('ZADD', ends, now + ttl, id) end
end
"""

# KEYS: queue, running, capacity; ARGV: prefix, worker, lease ms, now
_CLAIM = """
local capacity = redis.call('GET', KEYS[3])
if capacity and redis.call('LLEN', KEYS[2]) >= tonumber(capacity) then return false end
for i = 1, 1000 do
  local id = redis.call('LPOP', KEYS[1])
  if not id then return false end
  local job = ARGV[1] .. 'job:' .. id
  if redis.call('HGET', job, 'status') == 'queued' then
    redis.call('RPUSH', KEYS[2], id)
    redis.call('SET', ARGV[1] .. 'lease:' .. id, ARGV[2], 'PX', ARGV[3])
    redis.call('HSET', job, 'status', 'running', 'worker', ARGV[2])
    if redis.call('HEXISTS', job, 'started_at') == 0 then redis.call('HSET', job, 'started_at', ARGV[4]) end
    redis.call('HINCRBY', job, 'attempts', 1)
    return id
  end
end
return false
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_FINISH = _ENDED + """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'running' and s ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'completed_at', ARGV[5])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], ARGV[3], ARGV[4]) end
ended(ARGV[7], KEYS[1], ARGV[1], tonumber(ARGV[5]), tonumber(ARGV[6]))
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('LREM', KEYS[3], 0, ARGV[1])
redis.call('DEL', KEYS[4])
return 1
"""

_CANCEL = _ENDED + """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return false end
if s == 'queued' then
  redis.call('LREM', KEYS[2], 0, ARGV[1])
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'completed_at', ARGV[2], 'cancel', '1')
  ended(ARGV[4], KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]))
  return 'canceled'
end
if s == 'running' then redis.call('HSET', KEYS[1], 'cancel', '1') end
return s
"""

_REAP = _ENDED + """
local out = {}
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[1] .. 'lease:' .. id) == 0 then
    redis.call('LREM', KEYS[1], 0, id)
    local job = ARGV[1] .. 'job:' .. id
    if redis.call('HGET', job, 'status') == 'running' then
      if redis.call('HGET', job, 'cancel') == '1' then
        redis.call('HSET', job, 'status', 'canceled', 'completed_at', ARGV[3])
        ended(ARGV[1], job, id, tonumber(ARGV[3]), tonumber(ARGV[4]))
        table.insert(out, id)
      elseif tonumber(redis.call('HGET', job, 'attempts') or '0') >= tonumber(ARGV[2]) then
        redis.call('HSET', job, 'status', 'failed', 'completed_at', ARGV[3], 'error', ARGV[5])
        ended(ARGV[1], job, id, tonumber(ARGV[3]), tonumber(ARGV[4]))
        table.insert(out, id)
      else
        redis.call('HSET', job, 'status', 'queued')
        redis.call('HDEL', job, 'progress', 'worker')
        redis.call('LPUSH', KEYS[2], id)
      end
    end
  end
end
return out
"""

# KEYS: owner index, ends index; ARGV: now. Expired ids leave both sets
_PRUNE = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, id in ipairs(gone) do redis.call('ZREM', KEYS[1], id); redis.call('ZREM', KEYS[2], id) end
return #gone
"""

_JSON_FIELDS = ("progress", "result", "error", "meta", "inputs")


def _decode(raw: dict) -> dict | None:
    raw = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
           for k, v in raw.items()}
    if "status" not in raw:
        return None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "result":
            out[key] = RawJSON(value)  # as stored: never parsed here (it can be megabytes)
        elif key in _JSON_FIELDS:
            out[key] = json.loads(value)
        elif key in ("created_at", "started_at", "completed_at"):
            out[key] = float(value)
        elif key == "attempts":
            out[key] = int(value)
        elif key == "cancel":
            out[key] = value == "1"
        else:
            out[key] = value
    return out


def _encode(fields: dict) -> dict[str, str]:
    out = {}
    for key, value in fields.items():
        if value is None:
            continue
        out[key] = (value if isinstance(value, RawJSON) else json.dumps(value, separators=(",", ":"))) \
            if key in _JSON_FIELDS else str(value)
    return out


class Limits:
    """What one submit may add: the queue's bound, and the submitting key's (``jobs.max_jobs_per_key`` stored,
    ``jobs.max_active_per_key`` queued or running)."""

    def __init__(self, max_queued: int, max_per_key: int = 10**9, max_active_per_key: int = 10**9):
        self.max_queued, self.max_per_key, self.max_active_per_key = max_queued, max_per_key, max_active_per_key


def owner_of(fields: dict) -> str:
    return fields.get("owner") or ANONYMOUS


SUMMARY_FIELDS = ("status", "created_at", "started_at", "completed_at", "progress", "error", "owner", "meta",
                  "attempts", "cancel", "webhook")


class RedisJobStore:
    """Job records and the queue in Redis (``redis-py``'s asyncio client)."""

    def __init__(self, url: str, prefix: str = "instantid:"):
        import redis.asyncio as redis

        self.redis = redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
        self.prefix = prefix
        self.queue_key, self.running_key = prefix + "queue", prefix + "running"
        self.capacity_key = prefix + "capacity"
        self._submit = self.redis.register_script(_SUBMIT)
        self._claim = self.redis.register_script(_CLAIM)
        self._renew = self.redis.register_script(_RENEW)
        self._finish = self.redis.register_script(_FINISH)
        self._cancel = self.redis.register_script(_CANCEL)
        self._reap = self.redis.register_script(_REAP)
        self._prune = self.redis.register_script(_PRUNE)

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _index(self, owner: str | None) -> list[str]:
        owner = owner or ANONYMOUS
        return [f"{self.prefix}owner:{owner}", f"{self.prefix}ends:{owner}"]

    async def submit(self, job_id: str, fields: dict, limits: Limits) -> str:
        """ACCEPTED, or why not: QUEUE_FULL, KEY_FULL (the key's stored jobs), KEY_BUSY (its jobs in flight)."""
        flat = [x for kv in _encode({**fields, "status": "queued"}).items() for x in kv]
        found = await self._submit(
            keys=[self.queue_key, self._job(job_id), *self._index(fields.get("owner"))],
            args=[limits.max_queued, job_id, repr(time.time()), repr(fields["created_at"]), limits.max_per_key,
                  limits.max_active_per_key, INDEX_TTL_S, *flat])
        return found.decode() if isinstance(found, bytes) else found

    async def get(self, job_id: str, result: bool = True) -> dict | None:
        if result:
            raw = await self.redis.hgetall(self._job(job_id))
            raw.pop(b"inputs", None)
            return _decode(raw)
        values = await self.redis.hmget(self._job(job_id), SUMMARY_FIELDS)
        return _decode({k: v for k, v in zip(SUMMARY_FIELDS, values) if v is not None})

    async def list(self, owner: str | None, limit: int, before: tuple[float, str] | None = None) -> list[dict]:
        """The owner's jobs, newest first, without results: ``limit`` of them created before ``before``
        ((created_at, id) of the last one of the previous page). Each has its ``id``."""
        index = self._index(owner)
        await self._prune(keys=index, args=[repr(time.time())])
        top = "+inf" if before is None else repr(before[0])
        ids: list[tuple[str, float]] = []
        offset = 0
        while len(ids) < limit:
            page = await self.redis.zrevrangebyscore(index[0], top, "-inf", start=offset, num=limit + 16,
                                                     withscores=True)
            if not page:
                break
            offset += len(page)
            for member, score in page:
                job_id = member.decode() if isinstance(member, bytes) else member
                # same created_at as the cursor: ids sort descending among equal scores, as ZREVRANGE has them
                if before is not None and score == before[0] and job_id >= before[1]:
                    continue
                ids.append((job_id, score))
        ids = ids[:limit]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, _ in ids:
                pipe.hmget(self._job(job_id), SUMMARY_FIELDS)
            rows = await pipe.execute()
        out = []
        for (job_id, _), values in zip(ids, rows):
            record = _decode({k: v for k, v in zip(SUMMARY_FIELDS, values) if v is not None})
            if record is not None:  # expired between the prune and now
                out.append({"id": job_id, **record})
        return out

    async def inputs(self, job_id: str) -> Any:
        raw = await self.redis.hget(self._job(job_id), "inputs")
        return None if raw is None else json.loads(raw)

    async def claim(self, worker: str, lease_s: float) -> str | None:
        found = await self._claim(keys=[self.queue_key, self.running_key, self.capacity_key],
                                  args=[self.prefix, worker, int(lease_s * 1000), repr(time.time())])
        return found.decode() if isinstance(found, bytes) else found

    async def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        return bool(await self._renew(keys=[f"{self.prefix}lease:{job_id}"], args=[worker, int(lease_s * 1000)]))

    async def update(self, job_id: str, **fields) -> None:
        await self.redis.hset(self._job(job_id), mapping=_encode(fields))

    async def attempt(self, job_id: str) -> int:
        return int(await self.redis.hincrby(self._job(job_id), "attempts", 1))

    async def cancel_requested(self, job_id: str) -> bool:
        return await self.redis.hget(self._job(job_id), "cancel") == b"1"

    async def finish(self, job_id: str, status: str, ttl_s: int, *, result: RawJSON | None = None,
                     error: Any = None) -> bool:
        """End a job; ``result`` is its JSON text (serialised by the caller, off the event loop)."""
        if result is not None:
            field, encoded = "result", str(result)
        elif error is not None:
            field, encoded = "error", json.dumps(error, separators=(",", ":"))
        else:
            field, encoded = "", ""
        return bool(await self._finish(
            keys=[self._job(job_id), self.running_key, self.queue_key, f"{self.prefix}lease:{job_id}"],
            args=[job_id, status, field, encoded, repr(time.time()), int(ttl_s), self.prefix]))

    async def cancel(self, job_id: str, ttl_s: int) -> str | None:
        found = await self._cancel(keys=[self._job(job_id), self.queue_key],
                                   args=[job_id, repr(time.time()), int(ttl_s), self.prefix])
        return found.decode() if isinstance(found, bytes) else found

    async def reap(self, max_attempts: int, ttl_s: int, error: dict) -> list[str]:
        ended = await self._reap(keys=[self.running_key, self.queue_key],
                                 args=[self.prefix, max_attempts, repr(time.time()), int(ttl_s),
                                       json.dumps(error, separators=(",", ":"))])
        return [x.decode() if isinstance(x, bytes) else x for x in ended]

    async def queued(self) -> int:
        return int(await self.redis.llen(self.queue_key))

    async def capacity(self) -> int | None:
        """Jobs all workers may run together (the Generator's autoscaling policy publishes it); None: unbounded."""
        found = await self.redis.get(self.capacity_key)
        return None if found is None else int(found)

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()


class MemoryJobStore:
    """The same interface in this process: for the local profile's single Ingress replica and unit tests.
    Records are lost when the replica stops and other replicas never see them."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.expires: dict[str, float] = {}
        self.queue: list[str] = []
        self.running: list[str] = []
        self.leases: dict[str, tuple[str, float]] = {}
        self.owners: dict[str, dict[str, float]] = {}  # owner -> {id: created_at}
        self.capacity_value: int | None = None  # the policy's capacity, as in Redis (tests set it)
        self.lock = asyncio.Lock()

    def _live(self, job_id: str) -> dict | None:
        if job_id in self.expires and time.time() > self.expires[job_id]:
            self._forget(job_id)
        return self.jobs.get(job_id)

    def _forget(self, job_id: str) -> None:
        job = self.jobs.pop(job_id, None)
        self.expires.pop(job_id, None)
        if job is not None:
            ids = self.owners.get(owner_of(job), {})
            ids.pop(job_id, None)

    def _sweep(self) -> None:
        """Forget expired records nobody asks for again (results hold base64 images): bounded work on each write
        (submit, claim), oldest end first (``expires`` is in end order), stopping at the first live one."""
        now = time.time()
        for job_id in list(itertools.islice(self.expires, SWEEP_BATCH)):
            if self.expires[job_id] > now:
                break
            self._forget(job_id)

    def _owned(self, owner: str) -> dict[str, float]:
        ids = self.owners.setdefault(owner, {})
        for job_id in list(ids):
            if self._live(job_id) is None:  # expired: _forget took it out
                ids.pop(job_id, None)
        return ids

    def _end(self, job_id: str, ttl_s: int) -> None:
        self.jobs[job_id].pop("inputs", None)
        self.expires.pop(job_id, None)  # re-inserted last: ``expires`` stays in end order for _sweep
        self.expires[job_id] = time.time() + ttl_s
        for ids in (self.queue, self.running):
            while job_id in ids:
                ids.remove(job_id)
        self.leases.pop(job_id, None)

    async def submit(self, job_id: str, fields: dict, limits: Limits) -> str:
        self._sweep()
        owned = self._owned(owner_of(fields))
        if len(owned) >= limits.max_per_key:
            return KEY_FULL
        if sum(1 for j in owned if self.jobs[j]["status"] not in TERMINAL) >= limits.max_active_per_key:
            return KEY_BUSY
        if len(self.queue) >= limits.max_queued:
            return QUEUE_FULL
        self.jobs[job_id] = {**json.loads(json.dumps({k: v for k, v in fields.items() if v is not None})),
                             "status": "queued"}
        self.queue.append(job_id)
        owned[job_id] = fields["created_at"]
        return ACCEPTED

    async def get(self, job_id: str, result: bool = True) -> dict | None:
        job = self._live(job_id)
        if job is None:
            return None
        return {k: v for k, v in job.items() if k != "inputs" and (result or k != "result")}

    async def list(self, owner: str | None, limit: int, before: tuple[float, str] | None = None) -> list[dict]:
        owned = self._owned(owner or ANONYMOUS)
        order = sorted(owned.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
        if before is not None:
            order = [(j, t) for j, t in order if (t, j) < before]
        return [{"id": j, **{k: v for k, v in self.jobs[j].items() if k in SUMMARY_FIELDS}}
                for j, _ in order[:limit]]

    async def inputs(self, job_id: str) -> Any:
        job = self._live(job_id)
        return None if job is None else job.get("inputs")

    async def claim(self, worker: str, lease_s: float) -> str | None:
        self._sweep()
        if self.capacity_value is not None and len(self.running) >= self.capacity_value:
            return None
        while self.queue:
            job_id = self.queue.pop(0)
            job = self._live(job_id)
            if job is not None and job["status"] == "queued":
                self.running.append(job_id)
                self.leases[job_id] = (worker, time.monotonic() + lease_s)
                job.update(status="running", worker=worker, attempts=job.get("attempts", 0) + 1)
                job.setdefault("started_at", time.time())
                return job_id
        return None

    async def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        lease = self.leases.get(job_id)
        if lease is None or lease[0] != worker or lease[1] < time.monotonic():
            return False
        self.leases[job_id] = (worker, time.monotonic() + lease_s)
        return True

    async def update(self, job_id: str, **fields) -> None:
        job = self._live(job_id)
        if job is not None:
            job.update(json.loads(json.dumps(fields)))

    async def attempt(self, job_id: str) -> int:
        job = self.jobs[job_id]
        job["attempts"] = job.get("attempts", 0) + 1
        return job["attempts"]

    async def cancel_requested(self, job_id: str) -> bool:
        job = self._live(job_id)
        return bool(job and job.get("cancel"))

    async def finish(self, job_id: str, status: str, ttl_s: int, *, result: RawJSON | None = None,
                     error: Any = None) -> bool:
        job = self._live(job_id)
        if job is None or job["status"] in TERMINAL:
            return False
        job.update(status=status, completed_at=time.time())
        if result is not None:
            job["result"] = RawJSON(result)  # kept as text, as Redis keeps it
        elif error is not None:
            job["error"] = json.loads(json.dumps(error))
        self._end(job_id, ttl_s)
        return True

    async def cancel(self, job_id: str, ttl_s: int) -> str | None:
        job = self._live(job_id)
        if job is None:
            return None
        if job["status"] == "queued":
            job.update(status="canceled", completed_at=time.time(), cancel=True)
            self._end(job_id, ttl_s)
            return "canceled"
        if job["status"] == "running":
            job["cancel"] = True
        return job["status"]

    async def reap(self, max_attempts: int, ttl_s: int, error: dict) -> list[str]:
        ended = []
        now = time.monotonic()
        for job_id in list(self.running):
            lease = self.leases.get(job_id)
            if lease is not None and lease[1] >= now:
                continue
            self.running.remove(job_id)
            self.leases.pop(job_id, None)
            job = self._live(job_id)
            if job is None or job["status"] != "running":
                continue
            if job.get("cancel"):
                job.update(status="canceled", completed_at=time.time())
            elif job.get("attempts", 0) >= max_attempts:
                job.update(status="failed", completed_at=time.time(), error=error)
            else:
                job["status"] = "queued"
                job.pop("progress", None)
                self.queue.insert(0, job_id)
                continue
            self._end(job_id, ttl_s)
            ended.append(job_id)
        return ended

    async def queued(self) -> int:
        return len(self.queue)

    async def capacity(self) -> int | None:
        return self.capacity_value

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def make_job_store(config) -> RedisJobStore | MemoryJobStore:
    """Redis when a URL is configured (``jobs.redis_url`` or the env var it names), else in-process."""
    import os

    url = config.redis_url or os.environ.get(config.redis_url_env) or None
    return RedisJobStore(url, config.key_prefix) if url else MemoryJobStore()

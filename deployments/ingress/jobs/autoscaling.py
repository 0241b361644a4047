"""The Generator's autoscaling policy: its replica count follows the job backlog plus the HTTP load
(a class-based ``AutoscalingPolicy`` of Serve 2.60; why ours and not Ray's ``AsyncInferenceAutoscalingPolicy``:
docs/jobs.md, "Scaling the GPUs from the backlog").

Serve's controller instantiates the class once (``policy_kwargs``) and calls it every control-loop tick with an
``AutoscalingContext``. What we return goes through Serve's own wrapper: scaling factors, ``upscale_delay_s`` /
``downscale_delay_s`` / ``downscale_to_zero_delay_s`` (none from zero: a backlog at 0 replicas scales up at
once), then the ``min_replicas``..``max_replicas`` bounds.

    work    = jobs queued in Redis (not yet claimed) + the Generator's ongoing requests (HTTP calls and the
              claimed jobs' streams, which Serve's handles report)
    desired = ceil(work / per_replica), within the bounds; 0 when there is no work at all

``per_replica`` is what one replica takes at once: ``batch.max_batch_size``. The policy also publishes
``capacity = running replicas × per_replica`` to Redis (``{prefix}capacity``, expiring after a few polls):
the job workers of every Ingress replica together keep at most that many jobs running, so the Generators get
as many jobs as they can batch and the rest stay in the queue, where this policy counts them. When the key is
absent (no policy, or the controller cannot reach Redis) the workers fall back to ``jobs.concurrency`` each.

Redis is read off the controller's event loop's critical path: each tick at most one short-lived poll task
(redis-py's asyncio client, 2 s timeouts) is started, and the tick uses the last value read. A poll that fails
keeps the last value and logs; the URL comes from an env var on the head node (never from ``policy_kwargs``,
which Serve shows in its status and dashboard).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any

log = logging.getLogger("ray.serve")

CAPACITY_KEY = "capacity"
QUEUE_KEY = "queue"


def desired_replicas(*, backlog: float, ongoing: float, per_replica: int, lower: int, upper: int) -> int:
    """Replicas for ``backlog`` queued jobs plus ``ongoing`` requests at ``per_replica`` each, within bounds."""
    work = max(0.0, float(backlog)) + max(0.0, float(ongoing))
    want = math.ceil(work / per_replica) if work > 0 else 0
    return max(lower, min(upper, want))


class BacklogPolicy:
    """``AutoscalingPolicy(policy_function="...:BacklogPolicy", policy_kwargs={...})`` for the Generator."""

    def __init__(self, per_replica: int, redis_url_env: str = "INSTANTID_REDIS_URL",
                 key_prefix: str = "instantid:", poll_interval_s: float = 2.0):
        if int(per_replica) < 1:
            raise ValueError("per_replica must be at least 1")
        self.per_replica = int(per_replica)
        self.redis_url_env = redis_url_env
        self.key_prefix = key_prefix
        self.poll_interval_s = float(poll_interval_s)
        self.backlog = 0
        self.read_at: float | None = None  # monotonic time of the last successful read
        self._redis = None
        self._task: asyncio.Task | None = None
        self._last_poll = -math.inf
        self._warned = False

    # -- Redis --------------------------------------------------------------------------------------------
    def _client(self):
        if self._redis is None:
            url = os.environ.get(self.redis_url_env)
            if not url:
                if not self._warned:
                    log.warning("BacklogPolicy: $%s is not set on the Serve controller's node: scaling on HTTP "
                                "load only, job workers use jobs.concurrency each", self.redis_url_env)
                    self._warned = True
                return None
            import redis.asyncio as redis

            self._redis = redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        return self._redis

    async def poll(self, running_replicas: int) -> None:
        """One read of the backlog, and the capacity published for the job workers."""
        client = self._client()
        if client is None:
            return
        ttl_ms = int(max(3 * self.poll_interval_s, 10.0) * 1000)
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.llen(self.key_prefix + QUEUE_KEY)
                pipe.set(self.key_prefix + CAPACITY_KEY, running_replicas * self.per_replica, px=ttl_ms)
                backlog, _ = await pipe.execute()
            self.backlog, self.read_at = int(backlog), time.monotonic()
        except Exception as exc:  # keep the last value: a Redis blip must not scale the GPUs down
            log.warning("BacklogPolicy: reading the job queue failed: %s", type(exc).__name__)

    def _maybe_poll(self, running_replicas: int) -> None:
        if self._task is not None and self._task.done():
            self._task = None
        now = time.monotonic()
        if self._task is not None or now - self._last_poll < self.poll_interval_s:
            return
        try:
            loop = asyncio.get_running_loop()  # the controller calls policies on its event loop
        except RuntimeError:
            return
        self._last_poll = now
        self._task = loop.create_task(self.poll(running_replicas))

    # -- the tick -----------------------------------------------------------------------------------------
    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        self._maybe_poll(ctx.current_num_replicas)
        desired = desired_replicas(backlog=self.backlog, ongoing=ctx.total_num_requests,
                                   per_replica=self.per_replica, lower=ctx.capacity_adjusted_min_replicas,
                                   upper=ctx.capacity_adjusted_max_replicas)
        return desired, {"job_backlog": self.backlog}

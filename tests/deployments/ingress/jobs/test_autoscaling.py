"""The Generator's backlog policy with known answers: contexts in, replicas out (no Ray cluster).

Known answers are worked by hand from the rule ``ceil((queued jobs + ongoing requests) / per_replica)`` within
``[min_replicas, max_replicas]``; Serve's own wrapper (delays, from zero) is exercised through the function the
controller wraps every policy with."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy
from redis_server import redis_server

from deployments.ingress.jobs.autoscaling import BacklogPolicy, desired_replicas


def context(*, current: int, target: int | None = None, ongoing: float = 0.0, lo: int = 0, hi: int = 4,
            policy_state: dict | None = None, **config) -> AutoscalingContext:
    cfg = AutoscalingConfig(min_replicas=lo, max_replicas=hi, target_ongoing_requests=4, **config)
    return AutoscalingContext(
        deployment_id=DeploymentID(name="Generator", app_name="instantid"), deployment_name="Generator",
        app_name="instantid", current_num_replicas=current,
        target_num_replicas=current if target is None else target, running_replicas=[],
        total_num_requests=ongoing, total_queued_requests=0.0, aggregated_metrics={}, raw_metrics={},
        capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
        policy_state=policy_state or {}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=time.time(), config=cfg)


@pytest.mark.parametrize("backlog, ongoing, per_replica, lower, upper, expected", [
    (40, 0, 4, 0, 4, 4),      # 40 jobs want 10 replicas of 4: capped at max_replicas
    (40, 0, 4, 0, 16, 10),    # room for them: 40 / 4
    (9, 0, 4, 0, 8, 3),       # ceil(9 / 4)
    (5, 3, 4, 0, 8, 2),       # queued jobs and HTTP load add up: ceil(8 / 4)
    (0, 0.5, 4, 0, 8, 1),     # any load keeps one replica
    (0, 0, 4, 0, 8, 0),       # nothing to do: zero
    (0, 0, 4, 1, 8, 1),       # ... but never under min_replicas
    (1, 0, 1, 0, 8, 1),       # per_replica 1 (no batching): one replica per job
    (-3, 0, 4, 0, 8, 0),      # a nonsense reading is no work, not negative replicas
])
def test_desired_replicas_known_answers(backlog, ongoing, per_replica, lower, upper, expected):
    assert desired_replicas(backlog=backlog, ongoing=ongoing, per_replica=per_replica, lower=lower,
                            upper=upper) == expected


def test_policy_combines_backlog_and_http_load_within_bounds():
    policy = BacklogPolicy(per_replica=4)
    policy.backlog = 10
    assert policy(context(current=1, ongoing=6.0, hi=8))[0] == 4  # ceil(16 / 4)
    assert policy(context(current=1, ongoing=6.0, hi=3))[0] == 3  # max_replicas
    policy.backlog = 0
    assert policy(context(current=2, ongoing=0.0, lo=1))[0] == 1  # min_replicas
    assert policy(context(current=2))[1] == {"job_backlog": 0}     # what Serve logs as the policy's state


def test_per_replica_must_be_positive():
    with pytest.raises(ValueError, match="per_replica"):
        BacklogPolicy(per_replica=0)


def serve_wrapped(policy_kwargs: dict):
    """The policy as Serve's controller runs it: deserialised from the config, the class instantiated once with
    ``policy_kwargs``, wrapped with Serve's delays and scaling factors (private: the controller's own code)."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    config = AutoscalingPolicy(policy_function="deployments.ingress.jobs.autoscaling:BacklogPolicy", policy_kwargs=policy_kwargs)
    instance = _resolve_policy_callable(config)
    assert type(instance).__name__ == "BacklogPolicy" and instance.per_replica == policy_kwargs["per_replica"]
    return instance, _apply_autoscaling_config(instance)


def test_from_zero_the_backlog_scales_up_at_once_past_the_upscale_delay():
    instance, tick = serve_wrapped({"per_replica": 4})
    instance.backlog = 40
    replicas, _ = tick(context(current=0, hi=4, upscale_delay_s=30))
    assert replicas == 4  # straight to max_replicas, no 30 s wait, no 1-then-grow


def test_downscale_waits_for_its_delay_then_goes_to_zero():
    instance, tick = serve_wrapped({"per_replica": 4})
    instance.backlog = 0
    replicas, state = tick(context(current=4, hi=4, downscale_delay_s=600))
    assert replicas == 4  # the queue drained, but downscale_delay_s has not passed
    replicas, _ = tick(context(current=1, hi=4, downscale_delay_s=0, downscale_to_zero_delay_s=0))
    assert replicas == 0


def test_policy_reads_the_queue_and_publishes_capacity_on_a_real_redis(tmp_path, monkeypatch):
    import redis

    with redis_server(tmp_path) as url:
        monkeypatch.setenv("TEST_POLICY_REDIS", url)
        r = redis.from_url(url)
        r.rpush("svc:queue", *[f"job_{i}" for i in range(40)])

        async def ticks():
            policy = BacklogPolicy(per_replica=4, redis_url_env="TEST_POLICY_REDIS", key_prefix="svc:",
                                   poll_interval_s=0.0)
            first = policy(context(current=0, hi=16))  # starts the poll; this tick has no reading yet
            await policy._task
            second = policy(context(current=3, hi=16))
            await policy._task
            return first, second, policy

        first, second, policy = asyncio.run(ticks())
        assert first[0] == 0 and second[0] == 10  # 40 queued / 4
        assert int(r.get("svc:capacity")) == 12  # the poll started by the second tick: 3 running replicas x 4
        assert 0 < r.pttl("svc:capacity") <= 10_000
        r.close()


def test_a_failed_read_keeps_the_last_backlog(monkeypatch):
    monkeypatch.setenv("TEST_POLICY_REDIS", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    policy = BacklogPolicy(per_replica=4, redis_url_env="TEST_POLICY_REDIS")
    policy.backlog = 12
    asyncio.run(policy.poll(running_replicas=2))
    assert policy.backlog == 12 and policy.read_at is None


def test_without_the_env_var_it_scales_on_http_load_alone(monkeypatch):
    monkeypatch.delenv("NO_SUCH_REDIS_ENV", raising=False)
    policy = BacklogPolicy(per_replica=4, redis_url_env="NO_SUCH_REDIS_ENV")
    asyncio.run(policy.poll(running_replicas=2))
    assert policy.backlog == 0 and policy(context(current=1, ongoing=9.0, hi=8))[0] == 3

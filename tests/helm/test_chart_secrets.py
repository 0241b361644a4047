"""Secrets where they are used: the jobs Redis URL and the webhook signing key from existing Secrets
(secretKeyRef) on the pods that run the Ingress only; no static keys in any shipped value set. And the jobs
store: with 2+ Ingress replicas the chart refuses a render without a shared Redis unless jobs are disabled."""

from __future__ import annotations

import re

import pytest
import yaml

from chart_helpers import CHART_DIR, CI_DIR, VALUE_SET_NAMES, effective_values, render, render_error, render_set

NO_STORE = {"jobs": {"redis": {"existingSecret": ""}}}


def env(template: dict) -> dict:
    return {e["name"]: e for e in template["spec"]["containers"][0]["env"]}


def test_redis_url_from_an_existing_secret_on_the_ingress_pods_only():
    rendered = render({"jobs": {"redis": {"existingSecret": "jobs-redis", "existingSecretKey": "uri"}}})
    templates = rendered.pod_templates()
    assert env(templates["face"])["INSTANTID_REDIS_URL"] == {
        "name": "INSTANTID_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "jobs-redis", "key": "uri"}}}
    assert "INSTANTID_REDIS_URL" not in env(templates["generator"])
    # the head has it for the Generator's backlog policy (the default values name one: the test below)
    # the variable is the one the app reads (app.jobs.redis_url_env)
    renamed = render({"app": {"jobs": {"redis_url_env": "JOBS_REDIS"}}})
    assert "JOBS_REDIS" in env(renamed.pod_templates()["face"])
    assert rendered.app["args"]["jobs"].get("redis_url") is None, "the URL never lands in the serve config"


@pytest.mark.parametrize("value_set", VALUE_SET_NAMES)
def test_every_value_set_has_a_shared_store(value_set):
    values = effective_values(value_set)
    face = env(render_set(value_set).pod_templates()[values["faceWorker"]["groupName"]])
    assert values["app"]["jobs"]["redis_url_env"] in face, f"{value_set}: Ingress replicas would keep jobs in memory"


def test_refuses_two_ingress_replicas_without_a_shared_store():
    message = render_error(NO_STORE)
    assert "jobs.redis.existingSecret" in message and "max_replicas" in message
    # one Ingress replica: memory is one store
    one = {"serve": {"deployments": {"Ingress": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}}}}
    render({**NO_STORE, **one})


def test_jobs_explicitly_disabled_needs_no_store_and_tells_the_app():
    rendered = render({"jobs": {"enabled": False, "redis": {"existingSecret": ""}}})
    assert rendered.app["args"]["jobs"]["enabled"] is False
    assert "INSTANTID_REDIS_URL" not in env(rendered.pod_templates()["face"])
    assert "enabled" not in render().app["args"]["jobs"], "left to the app's default when on"


def test_refuses_a_redis_password_in_the_serve_config():
    message = render_error({"app": {"jobs": {"redis_url": "redis://:hunter2@redis:6379/0"}}})
    assert "app.jobs.redis_url" in message and "jobs.redis.existingSecret" in message
    assert "hunter2" not in message


def test_trial_redis_runs_in_the_release():
    rendered = render_set("trial")
    (deployment,) = [d for d in rendered.of_kind("Deployment") if d["metadata"]["name"].endswith("-redis")]
    (service,) = [s for s in rendered.of_kind("Service") if s["metadata"]["name"].endswith("-redis")]
    secret = next(s for s in rendered.of_kind("Secret") if s["metadata"]["name"].endswith("-jobs-redis"))
    url = secret["stringData"]["url"]
    assert url == f"redis://{service['metadata']['name']}:6379/0"
    face = env(rendered.pod_templates()["face"])["INSTANTID_REDIS_URL"]
    assert face["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "url"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["resources"]["limits"]["memory"]
    policies = {p["metadata"]["name"]: p for p in rendered.of_kind("NetworkPolicy")}
    redis_policy = next(p for n, p in policies.items() if n.endswith("-redis"))
    assert redis_policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    assert redis_policy["spec"]["ingress"][0]["ports"] == [{"port": 6379, "protocol": "TCP"}]
    message = render_error({"jobs": {"trialRedis": {"enabled": True}, "redis": {"existingSecret": "r"}}})
    assert "jobs.trialRedis.enabled" in message


def test_webhook_signing_key_from_an_existing_secret_on_the_ingress_pods_only():
    rendered = render({"jobs": {"webhookSecret": {"existingSecret": "hooks", "existingSecretKey": "hmac"}}})
    templates = rendered.pod_templates()
    ref = env(templates["face"])["INSTANTID_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "hooks", "key": "hmac"}
    for group in ("head", "generator"):
        assert "INSTANTID_WEBHOOK_SECRET" not in env(templates[group])
    assert "INSTANTID_WEBHOOK_SECRET" not in env(render().pod_templates()["face"])


def test_no_static_keys_in_any_shipped_value_set():
    for path in [CHART_DIR / "values.yaml", *sorted(CI_DIR.glob("*.yaml"))]:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]", text), path.name
        values = yaml.safe_load(text) or {}
        aws = values.get("aws") or {}
        assert not aws.get("accessKeyId") and not aws.get("secretAccessKey"), path.name
        assert not (values.get("huggingface") or {}).get("token"), path.name


def test_static_aws_keys_in_values_are_refused():
    message = render_error({"aws": {"accessKeyId": "AKIAEXAMPLE", "secretAccessKey": "x"}})
    assert "aws.existingSecret" in message and "AKIAEXAMPLE" not in message
    rendered = render({"aws": {"existingSecret": "s3-creds"}})
    for group, template in rendered.pod_templates().items():
        names = env(template)
        assert ("AWS_ACCESS_KEY_ID" in names) == (group != "head"), group


def test_a_generator_autoscaling_policy_gives_the_head_the_store_too():
    """A class-based policy (the jobs backlog policy) runs in Serve's controller, on the head: it reads the queue."""
    policy = {"policy_function": "deployments.jobs.policy:BacklogPolicy"}
    rendered = render({"serve": {"deployments": {"Generator": {"autoscaling_config": {"policy": policy}}}},
                       "jobs": {"webhookSecret": {"existingSecret": "hooks"}}})
    templates = rendered.pod_templates()
    assert env(templates["head"])["INSTANTID_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "instantid-jobs-redis"
    assert "INSTANTID_WEBHOOK_SECRET" not in env(templates["head"]), "the head signs nothing"
    assert "INSTANTID_REDIS_URL" not in env(templates["generator"])
    assert rendered.deployment("Generator")["autoscaling_config"]["policy"]["policy_function"] == \
        policy["policy_function"]

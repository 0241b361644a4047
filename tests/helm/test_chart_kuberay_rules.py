"""Every admission rule of the pinned KubeRay operator (kuberay_rules.py, mirrored from validation.go) holds for
every value set, each rule can fail, and values that would break one are refused at render with a clear message
(instead of a RayService the API server accepts and the operator never reconciles)."""

from __future__ import annotations

import copy

import pytest
import yaml

from chart_helpers import CHART_DIR, VALUE_SET_NAMES, clean, render_error, render_set
from kuberay_rules import KUBERAY_VERSION, RULES, violations


def test_rules_mirror_the_pinned_operator_version():
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert KUBERAY_VERSION.startswith(chart["annotations"]["instantid-serve/kuberay-operator"])


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("name", VALUE_SET_NAMES)
def test_operator_rule_holds(name, rule):
    rayservice = clean(render_set(name).rayservice)
    assert RULES[rule](rayservice) is None, f"{name}: KubeRay {KUBERAY_VERSION} would refuse it: {RULES[rule](rayservice)}"


def _head(rs):
    return rs["spec"]["rayClusterConfig"]["headGroupSpec"]


def _worker(rs):
    return rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _head_env(rs):
    return _head(rs)["template"]["spec"]["containers"][0].setdefault("env", [])


def _cluster(rs):
    return rs["spec"]["rayClusterConfig"]


# One RayService each rule refuses: the mirror is not vacuous.
BREAKERS = {
    "rayservice_name_length": lambda rs: rs["metadata"].update(name="a" * 48),
    "rayservice_name_dns1035": lambda rs: rs["metadata"].update(name="9lives"),
    "initializing_timeout_annotation": lambda rs: rs["metadata"].setdefault("annotations", {}).update(
        {"ray.io/initializing-timeout": "soon"}),
    "no_k8s_token_auth_for_rayservice": lambda rs: _cluster(rs).update(authOptions={"mode": "token", "enableK8sTokenAuth": True}),
    "head_service_name_unset": lambda rs: _head(rs).update(headService={"metadata": {"name": "x"}}),
    "upgrade_strategy_type": lambda rs: rs["spec"].update(upgradeStrategy={"type": "Recreate"}),
    "deletion_delay_non_negative": lambda rs: rs["spec"].update(rayClusterDeletionDelaySeconds=-1),
    "incremental_upgrade_options": lambda rs: rs["spec"].update(upgradeStrategy={"type": "NewClusterWithIncrementalUpgrade"}),
    "raycluster_name": lambda rs: rs["metadata"].update(name="a" * 48),
    "head_has_container": lambda rs: _head(rs)["template"]["spec"].update(containers=[]),
    "workers_have_containers": lambda rs: _worker(rs)["template"]["spec"].update(containers=[]),
    "group_resources_not_twice": lambda rs: _worker(rs).update(resources={"CPU": "2"}),
    "group_labels": lambda rs: _worker(rs).update(labels={"bad key": "x"}),
    "replica_bounds": lambda rs: _worker(rs).update(minReplicas=5, maxReplicas=2),
    "worker_group_idle_timeout": lambda rs: _worker(rs).update(idleTimeoutSeconds=60),
    "worker_group_priority": lambda rs: _worker(rs).update(priority=5),
    "ft_annotation_or_options": lambda rs: (rs["metadata"].setdefault("annotations", {}).update({"ray.io/ft-enabled": "true"}),
                                            _cluster(rs).update(gcsFaultToleranceOptions={"redisAddress": "redis:6379"})),
    "redis_address_needs_ft_options": lambda rs: _head_env(rs).append({"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"}),
    "ft_options_own_redis_settings": lambda rs: (_cluster(rs).update(gcsFaultToleranceOptions={"redisAddress": "redis:6379"}),
                                                 _head_env(rs).append({"name": "REDIS_PASSWORD", "value": "x"})),
    "gcs_ft_backend": lambda rs: _cluster(rs).update(gcsFaultToleranceOptions={"backend": "rocksdb"}),
    "no_redis_username": lambda rs: _head_env(rs).append({"name": "REDIS_USERNAME", "value": "x"}),
    "suspend": lambda rs: _worker(rs).update(suspend=True),
    "autoscaler_v2_env_needs_autoscaling": lambda rs: (_cluster(rs).update(enableInTreeAutoscaling=False),
                                                       _head_env(rs).append({"name": "RAY_enable_autoscaler_v2", "value": "1"})),
    "autoscaler_version_not_twice": lambda rs: (_cluster(rs)["autoscalerOptions"].update(version="v2"),
                                                _head_env(rs).append({"name": "RAY_enable_autoscaler_v2", "value": "1"})),
    "autoscaler_v2_restart_policy": lambda rs: (_cluster(rs)["autoscalerOptions"].update(version="v2"),
                                                _worker(rs)["template"]["spec"].update(restartPolicy="Always")),
    "autoscaler_idle_timeout": lambda rs: _cluster(rs)["autoscalerOptions"].update(idleTimeoutSeconds=-1),
    "autoscaler_start_command_env": lambda rs: _cluster(rs)["autoscalerOptions"].update(
        env=[{"name": "KUBERAY_GEN_AUTOSCALER_START_CMD", "value": "x"}]),
    "history_server_gate": lambda rs: _cluster(rs).update(historyServerOptions={}),
    "token_auth": lambda rs: _cluster(rs).update(authOptions={"mode": "token"}, rayVersion="2.50.0"),
    "network_policy_gate": lambda rs: _cluster(rs).update(networkPolicy={}),
    "tls_gate": lambda rs: _cluster(rs).update(tlsOptions={"enabled": True}),
}


def test_every_rule_has_a_breaker():
    assert sorted(BREAKERS) == sorted(RULES)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_can_fail(rule):
    rayservice = copy.deepcopy(clean(render_set("default").rayservice))
    BREAKERS[rule](rayservice)
    assert rule in violations(rayservice), f"{rule} accepted a RayService the operator refuses"


REFUSED_AT_RENDER = [
    ({"generatorWorker": {"idleTimeoutSeconds": 120}}, "generatorWorker.idleTimeoutSeconds needs autoscaler v2"),
    ({"faceWorker": {"idleTimeoutSeconds": 60}, "autoscaler": {"version": "v1"}}, "faceWorker.idleTimeoutSeconds needs autoscaler v2"),
    ({"faceWorker": {"rayStartParams": {"labels": "a=b"}}}, "faceWorker.rayStartParams.labels is refused by KubeRay"),
    ({"head": {"rayStartParams": {"redis-password": "x"}}}, "head.rayStartParams.redis-password is refused"),
    ({"head": {"rayStartParams": {"redis-username": "x"}}}, "head.rayStartParams.redis-username is refused"),
    ({"head": {"env": [{"name": "RAY_enable_autoscaler_v2", "value": "1"}]}}, "env RAY_enable_autoscaler_v2 is refused"),
    ({"env": [{"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"}]}, "env RAY_REDIS_ADDRESS is refused"),
    ({"env": [{"name": "REDIS_USERNAME", "value": "x"}]}, "env REDIS_USERNAME is refused"),
    ({"autoscaler": {"env": [{"name": "KUBERAY_GEN_AUTOSCALER_START_CMD", "value": "x"}]}}, "must not set KUBERAY_GEN_AUTOSCALER_START_CMD"),
    ({"rayService": {"annotations": {"ray.io/initializing-timeout": "soon"}}}, "must be a positive Go duration"),
    ({"rayService": {"annotations": {"ray.io/initializing-timeout": "0"}}}, "must be a positive Go duration"),
]


@pytest.mark.parametrize(("values", "message"), REFUSED_AT_RENDER, ids=[m for _, m in REFUSED_AT_RENDER])
def test_values_the_operator_would_refuse_fail_at_render(values, message):
    assert message in render_error(values)


def test_valid_initializing_timeouts_render():
    from chart_helpers import render

    for value in ("30m", "1h30m", "900"):
        annotations = render({"rayService": {"annotations": {"ray.io/initializing-timeout": value}}}).rayservice["metadata"]["annotations"]
        assert annotations["ray.io/initializing-timeout"] == value

"""The KubeRay operator's admission rules for a RayService and the RayCluster it creates, mirrored from
ray-operator/controllers/ray/utils/validation.go at v1.7.0 (the operator version the chart pins in Chart.yaml).

The API server accepts a RayService that breaks these rules (the CRD schema cannot express them); the operator
then refuses to reconcile it and only says so in an event. Each rule is one function named after the Go check
it mirrors; it returns a message when the rendered RayService breaks the rule, or None. Feature gates are at
their v1.7.0 defaults (RayJobDeletionPolicy and RayServiceIncrementalUpgrade on; RayClusterNetworkPolicy,
RayClusterMTLS, RayClusterHistoryServer and GCSFaultToleranceEmbeddedStorage off).
"""

from __future__ import annotations

import re
from typing import Callable

KUBERAY_VERSION = "v1.7.0"
MAX_RAYCLUSTER_NAME = 53
MAX_RAYSERVICE_NAME = MAX_RAYCLUSTER_NAME - 6  # the RayCluster is "<rayservice>-<5 random chars>"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")

FT_ANNOTATION = "ray.io/ft-enabled"
EXTERNAL_STORAGE_NS_ANNOTATION = "ray.io/external-storage-namespace"
INITIALIZING_TIMEOUT_ANNOTATION = "ray.io/initializing-timeout"
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"

Rule = Callable[[dict], "str | None"]


# ------------------------------------------------------------------------------------------------ helpers
def _cluster(rs: dict) -> dict:
    return rs["spec"]["rayClusterConfig"]


def _annotations(rs: dict) -> dict:
    return rs["metadata"].get("annotations") or {}


def _head_container(rs: dict) -> dict:
    containers = _cluster(rs)["headGroupSpec"]["template"]["spec"].get("containers") or [{}]
    return containers[0]


def _env_names(container_or_options: dict) -> set[str]:
    return {e["name"] for e in container_or_options.get("env") or []}


def _env_value(container: dict, name: str) -> str | None:
    for entry in container.get("env") or []:
        if entry["name"] == name:
            return entry.get("value", "")
    return None


def _autoscaling(rs: dict) -> bool:
    return bool(_cluster(rs).get("enableInTreeAutoscaling"))


def _autoscaler_v2(rs: dict) -> bool:
    return (_cluster(rs).get("autoscalerOptions") or {}).get("version") == "v2"


def _v2_env(rs: dict) -> bool:
    return _env_value(_head_container(rs), AUTOSCALER_V2_ENV) in ("1", "true")


def _gcs_ft(rs: dict) -> bool:
    return _annotations(rs).get(FT_ANNOTATION, "").lower() == "true" or "gcsFaultToleranceOptions" in _cluster(rs)


def _groups(rs: dict) -> list[tuple[str, dict]]:
    cluster = _cluster(rs)
    return [("Head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs") or []]


def _version(text: str) -> tuple[int, ...] | None:
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x or 0) for x in match.groups()) if match else None


# ------------------------------------------------------------------------ ValidateRayServiceMetadata
def rayservice_name_length(rs):
    name = rs["metadata"]["name"]
    if len(name) > MAX_RAYSERVICE_NAME:
        return f"RayService name should be no more than {MAX_RAYSERVICE_NAME} characters"


def rayservice_name_dns1035(rs):
    if not DNS_1035.match(rs["metadata"]["name"]) or len(rs["metadata"]["name"]) > 63:
        return "RayService name should be a valid DNS1035 label"


def initializing_timeout_annotation(rs):
    value = _annotations(rs).get(INITIALIZING_TIMEOUT_ANNOTATION, "")
    if not value:
        return None
    if GO_DURATION.match(value):
        return None if re.search(r"[1-9]", value) else f"{INITIALIZING_TIMEOUT_ANNOTATION} must be a positive duration"
    if re.fullmatch(r"[+-]?\d+", value):
        return None if int(value) > 0 else f"{INITIALIZING_TIMEOUT_ANNOTATION} must be a positive integer (seconds)"
    return f"{INITIALIZING_TIMEOUT_ANNOTATION} has invalid format: {value}"


# ---------------------------------------------------------------------------- ValidateRayServiceSpec
def no_k8s_token_auth_for_rayservice(rs):
    if (_cluster(rs).get("authOptions") or {}).get("enableK8sTokenAuth"):
        return "K8s token auth mode is currently not supported for RayService"


def head_service_name_unset(rs):
    if ((_cluster(rs)["headGroupSpec"].get("headService") or {}).get("metadata") or {}).get("name"):
        return "spec.rayClusterConfig.headGroupSpec.headService.metadata.name should not be set"


def upgrade_strategy_type(rs):
    kind = (rs["spec"].get("upgradeStrategy") or {}).get("type")
    if kind is not None and kind not in ("None", "NewCluster", "NewClusterWithIncrementalUpgrade"):
        return f"Spec.UpgradeStrategy.Type value {kind} is invalid"


def deletion_delay_non_negative(rs):
    delay = rs["spec"].get("rayClusterDeletionDelaySeconds")
    if delay is not None and delay < 0:
        return "Spec.RayClusterDeletionDelaySeconds should be a non-negative integer"


def incremental_upgrade_options(rs):
    strategy = rs["spec"].get("upgradeStrategy") or {}
    if strategy.get("type") != "NewClusterWithIncrementalUpgrade":
        return None
    if not _autoscaling(rs):
        return "Ray Autoscaler is required for NewClusterWithIncrementalUpgrade"
    options = strategy.get("clusterUpgradeOptions")
    if options is None:
        return "ClusterUpgradeOptions are required for NewClusterWithIncrementalUpgrade"
    surge, step = options.get("maxSurgePercent", 100), options.get("stepSizePercent")
    if not 0 <= surge <= 100:
        return "maxSurgePercent must be between 0 and 100"
    if step is None or not 0 <= step <= 100:
        return "stepSizePercent must be between 0 and 100"
    if step > surge:
        return "stepSizePercent must be less than or equal to maxSurgePercent"
    if not options.get("intervalSeconds", 0) > 0:
        return "intervalSeconds must be greater than 0"
    if not options.get("gatewayClassName"):
        return "gatewayClassName is required for NewClusterWithIncrementalUpgrade"


# ---------------------------------------------------- ValidateRayClusterMetadata (the generated cluster)
def raycluster_name(rs):
    name = rs["metadata"]["name"] + "-abcde"  # KubeRay appends a dash and five random characters
    if len(name) > MAX_RAYCLUSTER_NAME or not DNS_1035.match(name):
        return f"RayCluster name {name!r} should be a DNS1035 label of at most {MAX_RAYCLUSTER_NAME} characters"


# ---------------------------------------------------------------------------- ValidateRayClusterSpec
def head_has_container(rs):
    if not _cluster(rs)["headGroupSpec"]["template"]["spec"].get("containers"):
        return "headGroupSpec should have at least one container"


def workers_have_containers(rs):
    for name, group in _groups(rs)[1:]:
        if not group["template"]["spec"].get("containers"):
            return f"workerGroupSpec {name} should have at least one container"


def group_resources_not_twice(rs):
    """validateRayGroupResources: resources in rayStartParams and the group's `resources` field, not both."""
    for name, group in _groups(rs):
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            return f"resource fields should not be set in both rayStartParams and Resources for {name} group"


def group_labels(rs):
    """validateRayGroupLabels: no rayStartParams['labels']; the group's `labels` are valid Kubernetes labels."""
    for name, group in _groups(rs):
        if "labels" in (group.get("rayStartParams") or {}):
            return f"rayStartParams['labels'] is not supported for {name} group"
        for key, value in (group.get("labels") or {}).items():
            prefix, _, local = key.rpartition("/")
            if (prefix and (len(prefix) > 253 or not DNS_1123_SUBDOMAIN.match(prefix))) or len(local) > 63 \
                    or not QUALIFIED_NAME.match(local):
                return f"invalid label key for {name} group: {key!r}"
            if len(value) > 63 or not LABEL_VALUE.match(value):
                return f"invalid label value for key {key!r} in {name} group"


def replica_bounds(rs):
    for name, group in _groups(rs)[1:]:
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not _autoscaling(rs) and (low is None or high is None):
            return f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled"
        if low is not None and low < 0:
            return f"worker group {name} has negative minReplicas"
        if high is not None and high < 0:
            return f"worker group {name} has negative maxReplicas"
        if low is not None and high is not None and low > high:
            return f"worker group {name} has minReplicas {low} greater than maxReplicas {high}"


def worker_group_idle_timeout(rs):
    """validateWorkerGroupIdleTimeout: a group's idleTimeoutSeconds needs autoscaler v2."""
    for name, group in _groups(rs)[1:]:
        timeout = group.get("idleTimeoutSeconds")
        if timeout is None:
            continue
        if timeout < 0:
            return f"worker group {name}: idleTimeoutSeconds must be non-negative"
        if not (_autoscaler_v2(rs) or _v2_env(rs)):
            return f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled"


def worker_group_priority(rs):
    """validateWorkerGroupPriority: a group priority needs Ray >= 2.56 and autoscaler v2."""
    for name, group in _groups(rs)[1:]:
        if not group.get("priority"):
            continue
        version = _version(_cluster(rs).get("rayVersion", ""))
        if version is None or version < (2, 56, 0):
            return f"worker group {name}: priority needs Ray 2.56.0 or later"
        if not (_autoscaler_v2(rs) or _v2_env(rs)):
            return f"worker group {name}: priority is set, but autoscaler v2 is not enabled"


def ft_annotation_or_options(rs):
    if _annotations(rs).get(FT_ANNOTATION) and "gcsFaultToleranceOptions" in _cluster(rs):
        return f"{FT_ANNOTATION} annotation and GcsFaultToleranceOptions are both set"


def redis_address_needs_ft_options(rs):
    if not _gcs_ft(rs) and "RAY_REDIS_ADDRESS" in _env_names(_head_container(rs)):
        return "RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance, but GcsFaultToleranceOptions is not set"


def ft_options_own_redis_settings(rs):
    """With gcsFaultToleranceOptions, Redis password/address/namespace come only from those options."""
    cluster = _cluster(rs)
    if "gcsFaultToleranceOptions" not in cluster:
        return None
    head = cluster["headGroupSpec"]
    env = _env_names(_head_container(rs))
    if (head.get("rayStartParams") or {}).get("redis-password"):
        return "cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is enabled"
    if "REDIS_PASSWORD" in env:
        return "cannot set `REDIS_PASSWORD` env var in head Pod when GcsFaultToleranceOptions is enabled"
    if "RAY_REDIS_ADDRESS" in env:
        return "cannot set `RAY_REDIS_ADDRESS` env var in head Pod when GcsFaultToleranceOptions is enabled"
    if _annotations(rs).get(EXTERNAL_STORAGE_NS_ANNOTATION):
        return f"cannot set `{EXTERNAL_STORAGE_NS_ANNOTATION}` annotation when GcsFaultToleranceOptions is enabled"


def gcs_ft_backend(rs):
    """validateGcsFaultToleranceBackend: rocksdb needs a feature gate (off by default); redis takes no storage."""
    options = _cluster(rs).get("gcsFaultToleranceOptions")
    if options is None:
        return None
    if options.get("backend", "redis") == "rocksdb":
        return "the embedded RocksDB GCS fault tolerance backend requires the GCSFaultToleranceEmbeddedStorage feature gate"
    if "storage" in options:
        return "cannot set GcsFaultToleranceOptions.Storage when backend is 'redis'"


def no_redis_username(rs):
    if (_cluster(rs)["headGroupSpec"].get("rayStartParams") or {}).get("redis-username") \
            or "REDIS_USERNAME" in _env_names(_head_container(rs)):
        return "cannot set redis username in rayStartParams or environment variables"


def suspend(rs):
    """Suspending a group is refused with the autoscaler on (and needs RayJobDeletionPolicy, on by default)."""
    for name, group in _groups(rs)[1:]:
        if group.get("suspend") and _autoscaling(rs):
            return f"worker group {name} cannot be suspended with Autoscaler enabled"


def autoscaler_v2_env_needs_autoscaling(rs):
    if not _autoscaling(rs) and _v2_env(rs):
        return f"environment variable {AUTOSCALER_V2_ENV} cannot be set when enableInTreeAutoscaling is false"


def autoscaler_version_not_twice(rs):
    options = _cluster(rs).get("autoscalerOptions") or {}
    if _autoscaling(rs) and options.get("version") and AUTOSCALER_V2_ENV in _env_names(_head_container(rs)):
        return f"both .spec.autoscalerOptions.version and head Pod env var {AUTOSCALER_V2_ENV} are set"


def autoscaler_v2_restart_policy(rs):
    if _autoscaling(rs) and _autoscaler_v2(rs):
        for name, group in _groups(rs):
            if group["template"]["spec"].get("restartPolicy", "Never") != "Never":
                return f"restartPolicy for {name} should be Never or unset when using autoscaler V2"


def autoscaler_idle_timeout(rs):
    timeout = (_cluster(rs).get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    if timeout is not None and timeout < 0:
        return "autoscalerOptions.idleTimeoutSeconds must be non-negative"


def autoscaler_start_command_env(rs):
    if "KUBERAY_GEN_AUTOSCALER_START_CMD" in _env_names(_cluster(rs).get("autoscalerOptions") or {}):
        return "autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD"


def history_server_gate(rs):
    if "historyServerOptions" in _cluster(rs):
        return "RayClusterHistoryServer feature gate is not enabled"


def token_auth(rs):
    """Token auth needs Ray >= 2.52 (Kubernetes token auth is refused for a RayService above)."""
    auth = _cluster(rs).get("authOptions") or {}
    if auth.get("mode") == "token":
        version = _version(_cluster(rs).get("rayVersion", ""))
        if version is None or version < (2, 52, 0):
            return "authOptions.mode is 'token' but the minimum Ray version is 2.52.0"
    elif auth.get("enableK8sTokenAuth"):
        return "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'"


def network_policy_gate(rs):
    if "networkPolicy" in _cluster(rs):
        return "spec.networkPolicy requires the RayClusterNetworkPolicy feature gate to be enabled"


def tls_gate(rs):
    if "tlsOptions" in _cluster(rs):
        return "spec.tlsOptions requires the RayClusterMTLS feature gate to be enabled"


RULES: dict[str, Rule] = {f.__name__: f for f in (
    rayservice_name_length, rayservice_name_dns1035, initializing_timeout_annotation,
    no_k8s_token_auth_for_rayservice, head_service_name_unset, upgrade_strategy_type, deletion_delay_non_negative,
    incremental_upgrade_options, raycluster_name,
    head_has_container, workers_have_containers, group_resources_not_twice, group_labels, replica_bounds,
    worker_group_idle_timeout, worker_group_priority, ft_annotation_or_options, redis_address_needs_ft_options,
    ft_options_own_redis_settings, gcs_ft_backend, no_redis_username, suspend, autoscaler_v2_env_needs_autoscaling,
    autoscaler_version_not_twice, autoscaler_v2_restart_policy, autoscaler_idle_timeout, autoscaler_start_command_env,
    history_server_gate, token_auth, network_policy_gate, tls_gate,
)}


def violations(rayservice: dict) -> dict[str, str]:
    """{rule name: message} for every rule the RayService breaks."""
    found = {}
    for name, rule in RULES.items():
        message = rule(rayservice)
        if message:
            found[name] = message
    return found

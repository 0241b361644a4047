"""Placement and scaling: no replicas on the head, GPUs only in the generator group, custom resources that
route CPU deployments to the face group, autoscaling bounds that follow the values."""

from __future__ import annotations

import json

import pytest

from chart_helpers import effective_values, render, render_error, render_set


def container(template: dict) -> dict:
    containers = template["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def gpu_quantity(template: dict) -> int:
    res = container(template)["resources"]
    return int(res.get("limits", {}).get("nvidia.com/gpu", 0)) + int(res.get("requests", {}).get("nvidia.com/gpu", 0))


def test_gpus_only_on_the_generator_group(value_set):
    rendered = render_set(value_set)
    values = effective_values(value_set)
    generator_group = values["generatorWorker"]["groupName"]
    templates = rendered.pod_templates()
    assert set(templates) == {"head", values["faceWorker"]["groupName"], generator_group}
    for group, template in templates.items():
        if group == generator_group:
            res = container(template)["resources"]
            assert res["limits"]["nvidia.com/gpu"] == values["generatorWorker"]["gpusPerPod"]
            assert res["requests"]["nvidia.com/gpu"] == values["generatorWorker"]["gpusPerPod"]
            assert rendered.group(group)["rayStartParams"]["num-gpus"] == str(values["generatorWorker"]["gpusPerPod"])
        else:
            assert gpu_quantity(template) == 0, f"{group} must not ask for GPUs"
            tolerations = template["spec"].get("tolerations") or []
            assert not any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{group} must not tolerate GPU taints"
    # Only the Generator asks Ray for GPUs.
    for deployment in rendered.app["deployments"]:
        gpus = deployment["ray_actor_options"].get("num_gpus", 0)
        if deployment["name"] == "Generator":
            assert gpus == values["serve"]["deployments"]["Generator"]["ray_actor_options"]["num_gpus"] > 0
        else:
            assert gpus == 0


def test_head_runs_no_replicas(value_set):
    rendered = render_set(value_set)
    params = rendered.head["rayStartParams"]
    assert params["num-cpus"] == "0"
    assert params["num-gpus"] == "0"
    assert "resources" not in params, "the head advertises no custom resources"
    assert gpu_quantity(rendered.head["template"]) == 0
    # Every deployment needs something the head does not have: CPUs, the face group's resource, or GPUs.
    for deployment in rendered.app["deployments"]:
        options = deployment["ray_actor_options"]
        assert options.get("num_cpus", 1) > 0 or options.get("num_gpus", 0) > 0 or options.get("resources")


def test_head_cannot_be_given_cpus():
    """User rayStartParams cannot undo num-cpus 0 on the head."""
    params = render({"head": {"rayStartParams": {"num-cpus": "8", "object-store-memory": "100000000"}}}).head["rayStartParams"]
    assert params["num-cpus"] == "0"
    assert params["object-store-memory"] == "100000000"


def test_custom_resource_routes_cpu_deployments_to_the_face_group(value_set):
    rendered = render_set(value_set)
    values = effective_values(value_set)
    custom = values["faceWorker"]["customResource"]
    face_group = rendered.group(values["faceWorker"]["groupName"])
    # KubeRay's format: a JSON object in a quoted string, e.g. '"{\"cpu_pool\":1000}"'.
    advertised = json.loads(json.loads(face_group["rayStartParams"]["resources"]))
    assert advertised == {custom["name"]: custom["amount"]}
    for name in ("Ingress", "FaceAnalyzer"):
        requested = rendered.deployment(name)["ray_actor_options"]["resources"]
        assert requested == {custom["name"]: 1}
    generator_group = rendered.group(values["generatorWorker"]["groupName"])
    assert "resources" not in generator_group["rayStartParams"], "the GPU group must not attract CPU deployments"
    assert "resources" not in rendered.deployment("Generator")["ray_actor_options"]


def test_worker_groups_expose_metrics(value_set):
    rendered = render_set(value_set)
    for group in rendered.cluster["workerGroupSpecs"]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
    assert rendered.head["rayStartParams"]["metrics-export-port"] == "8080"


def test_in_tree_autoscaling_from_values(value_set):
    rendered = render_set(value_set)
    values = effective_values(value_set)["autoscaler"]
    cluster = rendered.cluster
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert options["upscalingMode"] == values["upscalingMode"]
    assert options["idleTimeoutSeconds"] == values["idleTimeoutSeconds"]
    assert options["resources"] == values["resources"]
    assert options.get("version", "") == values["version"]


def test_autoscaling_can_be_switched_off():
    cluster = render({"autoscaler": {"enabled": False}}).cluster
    assert cluster["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in cluster


def test_group_bounds_follow_values(value_set):
    rendered = render_set(value_set)
    values = effective_values(value_set)
    for key in ("faceWorker", "generatorWorker"):
        wanted = values[key]
        group = rendered.group(wanted["groupName"])
        assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (
            wanted["minReplicas"], wanted["replicas"], wanted["maxReplicas"])
        if wanted.get("idleTimeoutSeconds") is None:
            assert "idleTimeoutSeconds" not in group
        else:
            assert group["idleTimeoutSeconds"] == wanted["idleTimeoutSeconds"]


@pytest.mark.parametrize(("gen_min", "gen_max", "pods_min", "pods_max"), [(0, 1, 0, 1), (2, 6, 2, 6), (1, 16, 1, 16)])
def test_generator_bounds_follow_values(gen_min, gen_max, pods_min, pods_max):
    rendered = render({
        "serve": {"deployments": {"Generator": {"autoscaling_config": {"min_replicas": gen_min, "max_replicas": gen_max}}}},
        "generatorWorker": {"minReplicas": pods_min, "replicas": pods_min, "maxReplicas": pods_max},
    })
    autoscaling = rendered.deployment("Generator")["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (gen_min, gen_max)
    group = rendered.group("generator")
    assert (group["minReplicas"], group["maxReplicas"]) == (pods_min, pods_max)


def test_scale_to_zero_value_set():
    rendered = render_set("scale-to-zero")
    autoscaling = rendered.deployment("Generator")["autoscaling_config"]
    assert autoscaling["min_replicas"] == 0
    group = rendered.group("generator")
    assert group["minReplicas"] == 0 and group["replicas"] == 0
    assert group["idleTimeoutSeconds"] > 0
    # A cold start (GPU node + model load) fits in the request timeout.
    assert rendered.app["args"]["request_timeout_s"] >= 600


def test_gpu_capacity_covers_generator_max_replicas(value_set):
    rendered = render_set(value_set)
    values = effective_values(value_set)
    per_replica = rendered.deployment("Generator")["ray_actor_options"]["num_gpus"]
    per_pod = values["generatorWorker"]["gpusPerPod"]
    max_pods = rendered.group(values["generatorWorker"]["groupName"])["maxReplicas"]
    assert rendered.deployment("Generator")["autoscaling_config"]["max_replicas"] <= (per_pod // per_replica) * max_pods


@pytest.mark.parametrize(("values", "message"), [
    ({"generatorWorker": {"maxReplicas": 1}}, "needs more GPU pods"),
    ({"serve": {"deployments": {"Generator": {"ray_actor_options": {"num_cpus": 4, "num_gpus": 2}}}}}, "more than generatorWorker.gpusPerPod"),
    ({"faceWorker": {"minReplicas": 5}}, "faceWorker.minReplicas (5) is greater than"),
    ({"generatorWorker": {"replicas": 9}}, "generatorWorker.replicas (9) must lie between"),
    ({"serve": {"deployments": {"FaceAnalyzer": {"autoscaling_config": {"min_replicas": 9}}}}}, "FaceAnalyzer.autoscaling_config.min_replicas"),
    ({"monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}}, "scrape the same pods twice"),
    ({"serviceAccount": {"create": False}}, "serviceAccount.name is required"),
    ({"serve": {"proxyLocation": "HeadOnly"}}, "excludeHeadPodFromServeSvc must be false"),
    ({"modelCache": {"persistence": {"enabled": False}}}, "app.identity_store \"/models/identities\" is not shared"),
    ({"app": {"identity_store": "/data/identities"}}, "is not shared by the replicas"),
    ({"serve": {"deployments": {"Generator": {"ray_actor_options": {"num_cpus": 4, "num_gpus": 1, "accelerator_type": "L4"}}}}},
     "pin the GPU type with generatorWorker.nodeSelector"),
])
def test_inconsistent_values_fail_at_render(values, message):
    assert message in render_error(values)


def test_gpu_scheduling_values_reach_the_gpu_pods():
    values = {"generatorWorker": {
        "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}},
        "priorityClassName": "gpu-serving",
    }}
    rendered = render(values)
    spec = rendered.group("generator")["template"]["spec"]
    for key, wanted in values["generatorWorker"].items():
        assert spec[key] == wanted
    for group in ("head", "face"):
        other = rendered.pod_templates()[group]["spec"]
        assert "nodeSelector" not in other and "priorityClassName" not in other
        assert other["affinity"]["nodeAffinity"] != spec["affinity"]["nodeAffinity"]  # the chart's off-GPU rule


def test_every_container_has_requests_and_limits(value_set):
    rendered = render_set(value_set)
    for group, template in rendered.pod_templates().items():
        res = container(template)["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), group
    assert {"cpu", "memory"} <= set(rendered.cluster["autoscalerOptions"]["resources"]["limits"])
    for hook in rendered.hooks:
        for c in hook["spec"]["containers"]:
            assert c["resources"]["limits"] and c["resources"]["requests"]


def test_shared_memory_volume_per_group(value_set):
    rendered = render_set(value_set)
    values = effective_values(value_set)
    sizes = {"head": values["head"]["shmSize"], values["faceWorker"]["groupName"]: values["faceWorker"]["shmSize"],
             values["generatorWorker"]["groupName"]: values["generatorWorker"]["shmSize"]}
    for group, template in rendered.pod_templates().items():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": sizes[group]}
        mounts = {m["name"]: m["mountPath"] for m in container(template)["volumeMounts"]}
        assert mounts["dshm"] == "/dev/shm"


def test_gpu_type_is_pinned_by_node_selector_not_a_ray_resource(value_set):
    """accelerator_type becomes a Ray resource KubeRay's autoscaler never advertises: the Generator would never
    scale past its first pod. The GPU type is a node selector on the GPU group."""
    rendered = render_set(value_set)
    for deployment in rendered.app["deployments"]:
        assert "accelerator_type" not in deployment["ray_actor_options"], deployment["name"]
    full = render_set("full").group("generator")["template"]["spec"]
    assert full["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


def test_gcs_fault_tolerance_value_set():
    """The head is not a single point of failure: external Redis for the GCS, head on on-demand capacity with a
    priority class, two warm GPU pods with a budget (KubeRay's rules: kuberay_rules.py runs on this set too)."""
    rendered = render_set("ha")
    options = rendered.cluster["gcsFaultToleranceOptions"]
    assert options["redisAddress"].endswith(":6379")
    assert options["redisPassword"] == {"valueFrom": {"secretKeyRef": {"name": "instantid-redis", "key": "password"}}}
    assert "externalStorageNamespace" not in options  # KubeRay picks one per RayCluster (blue/green safe)
    head = rendered.head["template"]["spec"]
    assert head["priorityClassName"] == "instantid-serving"
    assert head["nodeSelector"] == {"karpenter.sh/capacity-type": "on-demand"}
    env = {e["name"] for e in head["containers"][0]["env"]}
    assert not env & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"}, "KubeRay sets these from the options"
    assert "gcsFaultToleranceOptions" not in render_set("default").cluster
    assert "gcsFaultTolerance.enabled needs gcsFaultTolerance.redisAddress" in render_error({"gcsFaultTolerance": {"enabled": True}})

"""Every value set installs: each pod of each group fits the node shapes the set is meant for (allocatable CPU,
memory and ephemeral storage after the system's reservations, the daemonsets and the image; whole GPUs), its
node selectors and required node affinity admit those nodes, the GPU pods only GPUs with enough memory, and the
head and face pods never a GPU node. Shapes and their sources: node_shapes.py and docs/deploy.md 1.1."""

from __future__ import annotations

import pytest

from chart_helpers import REPO, VALUE_SET_NAMES, effective_values, render, render_error, render_set
from node_shapes import SHAPES, TARGETS, TOO_SMALL_FOR_DEFAULT

UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def cpu(q) -> float:
    text = str(q)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gib(q) -> float:
    text = str(q)
    for suffix in sorted(UNITS, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * UNITS[suffix] / 2**30
    return float(text) / 2**30


def pod_requests(template: dict, extra: list[dict] = ()) -> tuple[float, float, float, int]:
    """(CPU, GiB, ephemeral GiB, GPUs) the scheduler reserves: the containers' sum, or the largest init container."""
    def of(containers):
        total = [0.0, 0.0, 0.0, 0]
        for c in containers:
            req = (c.get("resources") or {}).get("requests") or {}
            total[0] += cpu(req.get("cpu", 0))
            total[1] += gib(req.get("memory", 0))
            total[2] += gib(req.get("ephemeral-storage", 0))
            total[3] += int(req.get("nvidia.com/gpu", 0))
        return total
    spec = template["spec"]
    main = of(spec["containers"] + list(extra))
    for init in spec.get("initContainers") or []:
        main = [max(a, b) for a, b in zip(main, of([init]))]
    return tuple(main)


def admits(spec: dict, labels: dict) -> bool:
    """Kubernetes' nodeSelector + required node affinity, evaluated on a node's labels."""
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    node_affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if not required:
        return True

    def matches(expr: dict) -> bool:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In":
            return labels.get(key) in values
        if op == "NotIn":
            return labels.get(key) not in values
        if op == "Exists":
            return key in labels
        if op == "DoesNotExist":
            return key not in labels
        if op in ("Gt", "Lt"):
            if key not in labels:
                return False
            return int(labels[key]) > int(values[0]) if op == "Gt" else int(labels[key]) < int(values[0])
        raise AssertionError(f"unknown operator {op}")

    return any(all(matches(e) for e in term.get("matchExpressions") or []) for term in required["nodeSelectorTerms"])


def groups(value_set: str) -> dict[str, tuple[str, dict]]:
    values = effective_values(value_set)
    rendered = render_set(value_set)
    templates = rendered.pod_templates()
    return {"head": ("head", templates["head"]),
            "face": (values["faceWorker"]["groupName"], templates[values["faceWorker"]["groupName"]]),
            "generator": (values["generatorWorker"]["groupName"], templates[values["generatorWorker"]["groupName"]])}


@pytest.mark.parametrize("value_set", VALUE_SET_NAMES)
def test_every_pod_fits_its_nodes(value_set):
    assert value_set in TARGETS, f"ci/{value_set}-values.yaml has no target nodes in node_shapes.TARGETS"
    rendered = render_set(value_set)
    sidecar = [{"resources": rendered.cluster["autoscalerOptions"]["resources"]}] \
        if rendered.cluster.get("enableInTreeAutoscaling") else []
    for target in TARGETS[value_set]:
        for role, (group, template) in groups(value_set).items():
            names = target[role] if isinstance(target[role], list) else [target[role]]
            for name in names:
                shape = SHAPES[name]
                labels = {**shape.labels, **target.get("extra_labels", {}).get(role, {})}
                need_cpu, need_mem, need_disk, need_gpus = pod_requests(template, sidecar if role == "head" else [])
                free_cpu, free_mem, free_disk = shape.allocatable()
                where = f"{value_set}: {role} pod on {name}"
                assert need_cpu <= free_cpu, f"{where}: {need_cpu} CPU > {free_cpu:.2f} allocatable"
                assert need_mem <= free_mem, f"{where}: {need_mem:.1f} GiB > {free_mem:.1f} GiB allocatable"
                assert need_disk <= free_disk, \
                    f"{where}: {need_disk:.1f} GiB ephemeral > {free_disk:.1f} GiB left beside the image"
                assert need_gpus <= shape.gpus and (need_gpus == 0 or shape.gpus % need_gpus == 0), where
                assert admits(template["spec"], labels), f"{where}: its selectors/affinity refuse the node"


@pytest.mark.parametrize("value_set", VALUE_SET_NAMES)
def test_head_and_face_pods_never_land_on_gpu_nodes(value_set):
    gpu_shapes = [s for s in SHAPES.values() if s.gpus]
    for role, (group, template) in groups(value_set).items():
        if role == "generator":
            continue
        for shape in gpu_shapes:
            labels = {**shape.labels, "pool": "system" if role == "head" else "cpu",
                      "karpenter.sh/capacity-type": "on-demand"}  # what the sets' own selectors ask for
            assert not admits(template["spec"], labels), f"{value_set}: {role} pod admitted on GPU node {shape.name}"
            # a GPU node without NVIDIA's feature discovery carries only its cloud's labels
            cloud_only = {k: v for k, v in labels.items() if not k.startswith("nvidia.com/")}
            assert not admits(template["spec"], cloud_only), f"{value_set}: {role} pod admitted on {shape.name}"


@pytest.mark.parametrize("value_set", VALUE_SET_NAMES)
def test_gpu_pods_only_on_gpus_with_enough_memory(value_set):
    values = effective_values(value_set)
    template = groups(value_set)["generator"][1]
    need = 15000 if values["app"]["max_models_per_replica"] == 1 else 22000
    pin = values["generatorWorker"]["gpu"]["nodeLabels"]
    for shape in (s for s in SHAPES.values() if s.gpus):
        if pin == "gke" and shape.cloud != "gke" or pin == "karpenter" and shape.cloud != "eks":
            continue  # the other cloud's nodes carry none of these labels: refused either way
        if shape.gpu_mib < need:
            assert not admits(template["spec"], shape.labels), f"{value_set}: {shape.name} ({shape.gpu}) admitted"


def test_default_refuses_a_16_gb_gpu_and_admits_24_gb():
    spec = render_set("default").group("generator")["template"]["spec"]
    for name in TOO_SMALL_FOR_DEFAULT:
        assert not admits(spec, SHAPES[name].labels), name
    for name in ("g6.4xlarge", "g5.4xlarge", "g2-standard-16"):
        assert admits(spec, SHAPES[name].labels), name
    # one model per replica fits a 16 GB card
    small = render({"app": {"max_models_per_replica": 1}}).group("generator")["template"]["spec"]
    assert admits(small, SHAPES["g4dn.4xlarge"].labels)


@pytest.mark.parametrize(("pin", "key"), [("gke", "cloud.google.com/gke-accelerator"),
                                          ("karpenter", "karpenter.k8s.aws/instance-gpu-memory"),
                                          ("gfd", "nvidia.com/gpu.memory")])
def test_gpu_pin_per_platform(pin, key):
    rendered = render({"generatorWorker": {"gpu": {"nodeLabels": pin}}})
    spec = rendered.group("generator")["template"]["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [e["key"] for e in terms[0]["matchExpressions"]] == [key]
    assert admits(spec, SHAPES["g2-standard-16" if pin == "gke" else "g6.4xlarge"].labels)
    none = render({"generatorWorker": {"gpu": {"nodeLabels": "none"}}}).group("generator")["template"]["spec"]
    assert "affinity" not in none or "nodeAffinity" not in none["affinity"]


def test_user_node_affinity_replaces_the_pin():
    mine = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["mine"]}]}]}}}
    spec = render({"generatorWorker": {"affinity": mine}}).group("generator")["template"]["spec"]
    assert spec["affinity"] == mine


def test_ephemeral_storage_covers_the_volumes_the_pod_writes():
    message = render_error({"generatorWorker": {"resources": {"requests": {"ephemeral-storage": "10Gi"}}}})
    assert "generatorWorker.resources.requests.ephemeral-storage" in message
    message = render_error({"modelCache": {"persistence": {"enabled": False}, "emptyDirSizeLimit": "80Gi"},
                            "app": {"identity_store": "s3://b/i"}})
    assert "modelCache.emptyDirSizeLimit" in message


@pytest.mark.parametrize(("cls", "size", "ok"), [("standard-rwx", "200Gi", False), ("standard-rwx", "1Ti", True),
                                                 ("premium-rwx", "1Ti", False), ("premium-rwx", "2560Gi", True),
                                                 ("enterprise-rwx", "1024Gi", True), ("efs-sc", "200Gi", True)])
def test_filestore_minimum_capacity(cls, size, ok):
    values = {"modelCache": {"persistence": {"storageClassName": cls, "size": size}}}
    if ok:
        render(values)
    else:
        message = render_error(values)
        assert "modelCache.persistence.size" in message and cls in message


def test_docs_list_the_shapes():
    doc = (REPO / "docs" / "deploy.md").read_text()
    for shape in SHAPES.values():
        assert f"`{shape.name}`" in doc, f"docs/deploy.md 1.1 does not list {shape.name}"
    assert "plan-node-sizes" in doc and "eni-max-pods" in doc


def test_ray_logs_volume_is_the_one_kuberay_shares_with_the_autoscaler(value_set):
    """KubeRay (v1.7 common/pod.go, addEmptyDir) mounts the volume named "ray-logs" at /tmp/ray in the autoscaler
    sidecar, creating an unbounded emptyDir of that name when the pod has none: the head's /tmp/ray volume must
    carry that name, or the autoscaler writes its logs to a volume of its own."""
    for group, template in render_set(value_set).pod_templates().items():
        mounts = {m["mountPath"]: m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/tmp/ray"] == "ray-logs", group
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == "ray-logs")
        assert volume["emptyDir"]["sizeLimit"], group

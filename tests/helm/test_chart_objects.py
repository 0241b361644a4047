"""Every rendered object is valid: Kubernetes schemas for built-in kinds, KubeRay's CRD schema for the
RayService, a structural schema for the Prometheus operator's monitors."""

from __future__ import annotations

import copy
import re

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError

from chart_helpers import CRD_KINDS, clean, render, render_set

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas available.
K8S_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def strict_crd_schema(node):
    """The CRD's structural schema as strict JSON Schema: the API server prunes (or, with field validation
    Strict, rejects) unknown fields, so objects with declared properties get additionalProperties: false;
    OpenAPI's `nullable` becomes a null type."""
    if isinstance(node, list):
        return [strict_crd_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_crd_schema(value) for key, value in node.items()}
    if "properties" in out:
        out["properties"] = {key: strict_crd_schema(value) for key, value in node["properties"].items()}
        if "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def rayservice_validator(crd_schema):
    schema = strict_crd_schema(copy.deepcopy(crd_schema))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_kubernetes_schemas(value_set):
    """Built-in kinds pass kubernetes-validate (strict: unknown fields fail) on the oldest and newest API."""
    rendered = render_set(value_set)
    checked = set()
    for obj in rendered.objects + rendered.hooks:
        if obj["kind"] in CRD_KINDS:
            with pytest.raises(SchemaNotFoundError):
                kubernetes_validate.validate(clean(obj), K8S_VERSIONS[0], strict=True)
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(clean(obj), version, strict=True)
        checked.add(obj["kind"])
    assert "Pod" in checked  # the helm test hook at least
    assert {o["kind"] for o in rendered.objects} - CRD_KINDS <= checked


def test_rayservice_matches_kuberay_crd(value_set, rayservice_validator):
    rayservice = clean(render_set(value_set).rayservice)
    assert rayservice["apiVersion"] == "ray.io/v1"
    errors = sorted(rayservice_validator.iter_errors(rayservice), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_strict_crd_schema_rejects_unknown_fields(rayservice_validator):
    """The strict CRD schema really bites: a misspelt field is an error, a wrong type too."""
    rayservice = clean(render_set("default").rayservice)
    typo = copy.deepcopy(rayservice)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert not rayservice_validator.is_valid(typo)
    wrong_type = copy.deepcopy(rayservice)
    wrong_type["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert not rayservice_validator.is_valid(wrong_type)
    assert rayservice_validator.is_valid(rayservice)


def test_pod_templates_are_valid_pods(value_set):
    """Each group's pod template is a valid Pod spec by Kubernetes' own schema (beyond the CRD's copy)."""
    for group, template in render_set(value_set).pod_templates().items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{group}", **template["metadata"]},
               "spec": template["spec"]}
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)


MONITOR_ENDPOINT = {
    "type": "object",
    "required": ["port", "path", "interval"],
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string", "minLength": 1},
        "path": {"type": "string", "pattern": "^/"},
        "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
        "scrapeTimeout": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
        "relabelings": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
                           "targetLabel": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
                           "action": {"type": "string"}, "regex": {"type": "string"}, "replacement": {"type": "string"}}}},
    },
}


def monitor_schema(kind: str) -> dict:
    """Structural schema of the monitoring.coreos.com/v1 fields the chart uses (prometheus-operator's API)."""
    endpoints_key = "podMetricsEndpoints" if kind == "PodMonitor" else "endpoints"
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name", "labels"], "properties": {
                "name": {"type": "string", "pattern": DNS_SUBDOMAIN.pattern, "maxLength": 253},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
            "spec": {
                "type": "object", "additionalProperties": False, "required": ["selector", endpoints_key],
                "properties": {
                    "selector": {"type": "object", "additionalProperties": False, "required": ["matchLabels"], "properties": {
                        "matchLabels": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}}}},
                    endpoints_key: {"type": "array", "minItems": 1, "items": MONITOR_ENDPOINT},
                },
            },
        },
    }


def test_monitors_are_structurally_valid(value_set):
    rendered = render_set(value_set)
    for kind in ("PodMonitor", "ServiceMonitor"):
        for obj in rendered.of_kind(kind):
            jsonschema.validate(clean(obj), monitor_schema(kind))


def test_monitor_schema_rejects_broken_objects():
    """The structural monitor schema is not vacuous."""
    pod_monitor = clean(render_set("s3").one("PodMonitor"))
    jsonschema.validate(pod_monitor, monitor_schema("PodMonitor"))
    broken = copy.deepcopy(pod_monitor)
    broken["spec"]["podMetricsEndpoints"][0]["interval"] = "fifteen seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, monitor_schema("PodMonitor"))


def test_names_and_labels(value_set):
    """Names are DNS-safe and short enough for KubeRay's suffixes; every object carries the release labels."""
    rendered = render_set(value_set)
    for obj in rendered.objects + rendered.hooks:
        name = obj["metadata"]["name"]
        assert DNS_SUBDOMAIN.match(name) and len(name) <= 63, name
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "instantid-serve"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert "namespace" not in obj["metadata"], "objects carry no namespace (Helm/kustomize set it)"
    rayservice = rendered.rayservice
    # KubeRay names the RayCluster <rayservice>-<5 chars> and pods/services after it.
    assert DNS_LABEL.match(rayservice["metadata"]["name"]) and len(rayservice["metadata"]["name"]) <= 40


def test_every_value_set_renders_the_core_objects(value_set):
    kinds = render_set(value_set).kinds()
    assert kinds.count("RayService") == 1
    assert set(kinds) <= {"RayService", "ServiceAccount", "Secret", "PersistentVolumeClaim", "Ingress", "Service",
                          "ServiceMonitor", "PodMonitor", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy",
                          "Deployment"}  # the trial Redis


def test_common_labels_reach_objects_and_pods():
    rendered = render({"commonLabels": {"team": "ml"}})
    assert all(o["metadata"]["labels"]["team"] == "ml" for o in rendered.objects)
    assert all(t["metadata"]["labels"]["team"] == "ml" for t in rendered.pod_templates().values())


def test_release_names_kuberay_refuses_fail_at_render():
    from chart_helpers import render_error

    assert "DNS-1035" in render_error({"fullnameOverride": "9lives"})

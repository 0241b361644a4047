"""Chart metadata, lint, values documentation and values.schema.json (bad values fail at install time)."""

from __future__ import annotations

import json
import re
import tomllib

import jsonschema
import pytest
import yaml

from chart_helpers import (CHART_DIR, CI_DIR, REPO, VALUE_SETS, default_values, effective_values, render, render_error,
                           render_set)

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())


def pinned_ray_version() -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [d for d in project["project"]["optional-dependencies"]["serve"] if d.startswith("ray[")]
    assert len(pins) == 1
    return pins[0].split("==")[1]


def test_chart_metadata_agrees_with_the_project():
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "instantid-serve" and chart["type"] == "application"
    ray = pinned_ray_version()
    assert chart["annotations"]["instantid-serve/ray-version"] == ray
    assert default_values()["rayVersion"] == ray
    assert render_set("default").cluster["rayVersion"] == ray
    project_version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == project_version
    assert render_set("default").head["template"]["spec"]["containers"][0]["image"].endswith(":" + project_version)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_is_clean(name):
    import helm_python

    report = helm_python.lint(CHART_DIR, VALUE_SETS[name], strict=True, kube_version="v1.29.0")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_helm_lint_reports_schema_violations():
    import helm_python

    report = helm_python.lint(CHART_DIR, {"app": {"device": "tpu"}}, strict=True)
    assert report["errors"], "lint must flag values the schema refuses"
    assert any("/app/device" in m["error"] for m in report["messages"])


def test_schema_is_valid_and_accepts_every_value_set():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    validator = jsonschema.Draft7Validator(SCHEMA)
    for name in VALUE_SETS:
        errors = list(validator.iter_errors(effective_values(name)))
        assert not errors, f"{name}: {[e.message for e in errors]}"


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaf_paths(value, prefix + (key,))
    else:
        yield prefix


def _schema_at(schema, path):
    node = schema
    for key in path:
        if "$ref" in node:
            node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
        props = node.get("properties", {})
        if key in props:
            node = props[key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif node.get("type") == "object" and node.get("additionalProperties") is not False and not props:
            return node  # free-form Kubernetes object (affinity, securityContext, ...)
        else:
            return None
    return node


def test_every_default_value_is_typed_by_the_schema():
    missing = [".".join(p) for p in _leaf_paths(default_values()) if _schema_at(SCHEMA, p) is None]
    assert missing == []


def test_every_value_is_documented():
    """helm-docs style: each key has a '# --' comment on itself or on an enclosing key."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    key_re = re.compile(r"^(\s*)(?:- )?([A-Za-z_][\w.-]*):(\s|$)")
    stack: list[tuple[int, bool]] = []  # (indent, documented)
    undocumented = []
    in_doc = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("# --"):
            in_doc = True
            continue
        if stripped.startswith("#"):
            continue  # continuation of a doc comment, or a plain comment
        if not stripped:
            in_doc = False
            continue
        match = key_re.match(line)
        if not match:
            in_doc = False
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = in_doc or any(doc for _, doc in stack)
        stack.append((indent, documented))
        is_parent = line.rstrip().endswith(":")
        if not documented and not is_parent:
            undocumented.append(stripped)
        in_doc = False
    assert undocumented == [], f"undocumented values: {undocumented}"


BAD_VALUES = [
    ({"app": {"profile": "huge"}}, "/app/profile"),
    ({"app": {"device": "tpu"}}, "/app/device"),
    ({"app": {"models": []}}, "/app/models"),
    ({"app": {"models": [{"name": "Bad Name", "base_model": "x"}]}}, "/app/models/0/name"),
    ({"app": {"batch": {"max_batch_size": 0}}}, "/app/batch/max_batch_size"),
    ({"app": {"output_bucket": "gs://nope"}}, "/app/output_bucket"),
    ({"app": {"auth": {"key_hashes_env": "OTHER"}}}, "/app/auth"),
    ({"app": {"unknown_arg": 1}}, "/app"),
    ({"apiKeys": {"hashes": ["ci:not-a-sha256"]}}, "/apiKeys/hashes/0"),
    ({"generatorWorker": {"maxReplicas": 0}}, "/generatorWorker/maxReplicas"),
    ({"generatorWorker": {"gpusPerPod": 0}}, "/generatorWorker/gpusPerPod"),
    ({"generatorWorker": {"resources": {"limits": {"cpu": "8", "memory": "lots"}}}}, "/generatorWorker/resources"),
    ({"faceWorker": {"customResource": {"name": "GPU", "amount": 1}}}, "/faceWorker/customResource/name"),
    ({"faceWorker": {"rayStartParams": {"num-cpus": 4}}}, "/faceWorker/rayStartParams/num-cpus"),
    ({"serve": {"deployments": {"Generator": {"num_replicas": 3}}}}, "/serve/deployments/Generator"),
    ({"serve": {"deployments": {"Generator": {"ray_actor_options": {"num_gpus": 1, "resources": {"x": 1}}}}}},
     "/serve/deployments/Generator/ray_actor_options"),
    ({"serve": {"deployments": {"Extra": {}}}}, "/serve/deployments"),
    ({"serve": {"deployments": {"FaceAnalyzer": {"ray_actor_options": {"num_cpus": 2, "num_gpus": 1}}}}},
     "/serve/deployments/FaceAnalyzer/ray_actor_options/num_gpus"),
    ({"serve": {"httpOptions": {"port": 9000}}}, "/serve/httpOptions/port"),
    ({"autoscaler": {"upscalingMode": "Turbo"}}, "/autoscaler/upscalingMode"),
    ({"rayService": {"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade"}}}, "/rayService/upgradeStrategy/type"),
    ({"aws": {"region": 5}}, "/aws/region"),
    ({"monitoring": {"podMonitor": {"interval": "often"}}}, "/monitoring/podMonitor/interval"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"modelCache": {"persistence": {"accessModes": ["ReadWriteAlways"]}}}, "/modelCache/persistence/accessModes/0"),
    ({"typo": True}, "typo"),
]


@pytest.mark.parametrize(("values", "where"), BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_bad_values_fail_at_install_time(values, where):
    """The Helm engine itself refuses them (values.schema.json), before anything reaches a cluster."""
    message = render_error(values)
    assert "schema" in message and where in message


SHORT_DRAINS = [
    ({"serve": {"deployments": {"Generator": {"graceful_shutdown_timeout_s": 120}}}},
     "serve.deployments.Generator.graceful_shutdown_timeout_s (120) is less than app.request_timeout_s (300)"),
    ({"app": {"request_timeout_s": 600}},
     "serve.deployments.Ingress.graceful_shutdown_timeout_s (310) is less than app.request_timeout_s (600)"),
    ({"rayService": {"rayClusterDeletionDelaySeconds": 60}},
     "rayService.rayClusterDeletionDelaySeconds (60) is less than app.request_timeout_s (300)"),
]


@pytest.mark.parametrize(("values", "message"), SHORT_DRAINS, ids=["generator-drain", "timeout", "deletion-delay"])
def test_drains_shorter_than_a_request_fail_at_render(values, message):
    """A stopping replica or a replaced cluster must outlive the longest request, or work in flight is cut."""
    assert message in render_error(values)


def test_in_place_upgrades_need_no_deletion_delay():
    render({"rayService": {"upgradeStrategy": {"type": "None"}, "rayClusterDeletionDelaySeconds": 0}})


def test_schema_app_section_mirrors_appargs():
    """values.schema.json's app section has AppArgs' fields and bounds (AppArgs is the source of truth)."""
    from deployments.config import AppArgs

    app_schema = SCHEMA["properties"]["app"]
    model_schema = AppArgs.model_json_schema()
    defs = model_schema["$defs"]

    def resolve(node):
        return defs[node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node

    chart_owned = {"app.auth": {"key_hashes_env"}}  # set by the chart, wired to the API-key Secret

    def compare(ours, theirs, path):
        theirs = resolve(theirs)
        assert set(ours["properties"]) == set(theirs["properties"]) - chart_owned.get(path, set()), path
        assert ours.get("additionalProperties") is False, path
        for key, prop in ours["properties"].items():
            other = resolve(theirs["properties"][key])
            for bound in ("minimum", "maximum", "exclusiveMinimum", "enum", "pattern", "minItems"):
                if bound in other:
                    assert prop.get(bound) == other[bound], f"{path}.{key}.{bound}"
            if "properties" in other:
                compare(prop, other, f"{path}.{key}")
            if other.get("type") == "array" and "$ref" in other.get("items", {}):
                compare(prop["items"], other["items"], f"{path}.{key}[]")

    compare(app_schema, model_schema, "app")


def test_ci_value_sets_exist():
    names = {p.name for p in CI_DIR.glob("*-values.yaml")}
    assert {"minimal-values.yaml", "s3-values.yaml", "no-monitoring-values.yaml", "scale-to-zero-values.yaml",
            "ha-values.yaml"} <= names

"""Helpers for the chart tests: offline renders with the real Helm engine, value sets, paths.

Everything is offline. The chart is rendered through helm-python-sdk (Helm v4's Go SDK in a wheel); the
RayService is validated against KubeRay's CRD schema, read from <repo>/../shared/kuberay/ (never copied
into the repository; $KUBERAY_CRD_DIR points elsewhere). Without it, the tests that need it skip with the reason.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "instantid-serve"
CI_DIR = CHART_DIR / "ci"
K8S_DIR = REPO / "k8s"
CRD_DIR = Path(os.environ.get("KUBERAY_CRD_DIR") or REPO.parent / "shared" / "kuberay")
CRD_PATH = CRD_DIR / "ray.io_rayservices.yaml"
CRD_MISSING = (f"KubeRay's RayService CRD is not at {CRD_PATH} (it sits in ../shared/kuberay/ beside the repository "
               "in CI; set KUBERAY_CRD_DIR to its folder): CRD schema checks skipped")
RELEASE = "instantid-serve"
NAMESPACE = "ml"

# Kinds that kubernetes-validate has no schema for (custom resources).
CRD_KINDS = {"RayService", "ServiceMonitor", "PodMonitor"}


def _load_render_k8s():
    spec = importlib.util.spec_from_file_location("render_k8s", REPO / "helm" / "render_k8s.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_k8s", module)
    spec.loader.exec_module(module)
    return module


render_k8s = _load_render_k8s()


def _value_sets() -> dict[str, dict]:
    # "default": the chart's defaults plus the storage class every install must choose (as k8s/ renders them).
    sets = {"default": copy.deepcopy(render_k8s.PLAIN_VALUES)}
    for path in sorted(CI_DIR.glob("*-values.yaml")):
        sets[path.name.removesuffix("-values.yaml")] = yaml.safe_load(path.read_text()) or {}
    return sets


VALUE_SETS = _value_sets()
VALUE_SET_NAMES = sorted(VALUE_SETS)


def deep_merge(base: dict, override: dict) -> dict:
    """Helm-style coalescing of user values over defaults (maps merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@lru_cache(maxsize=None)
def default_values() -> dict:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def effective_values(name: str) -> dict:
    """Chart defaults coalesced with a named value set: what the templates saw."""
    return deep_merge(default_values(), VALUE_SETS[name])


class Render:
    """One offline render: raw template outputs and the parsed objects."""

    def __init__(self, raw: dict[str, str]):
        self.raw = raw
        self.objects: list[dict] = []
        self.hooks: list[dict] = []
        for path, text in sorted(raw.items()):
            if not path.endswith(".yaml"):
                continue
            for doc in yaml.safe_load_all(text):
                if not doc:
                    continue
                doc.setdefault("_template", path)
                annotations = doc.get("metadata", {}).get("annotations") or {}
                (self.hooks if "helm.sh/hook" in annotations else self.objects).append(doc)

    def kinds(self) -> list[str]:
        return sorted(o["kind"] for o in self.objects)

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def rayservice(self) -> dict:
        return self.one("RayService")

    @property
    def serve_config(self) -> dict:
        return yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])

    @property
    def app(self) -> dict:
        apps = self.serve_config["applications"]
        assert len(apps) == 1
        return apps[0]

    def deployment(self, name: str) -> dict:
        matches = [d for d in self.app["deployments"] if d["name"] == name]
        assert len(matches) == 1, f"deployment {name} appears {len(matches)} times"
        return matches[0]

    @property
    def cluster(self) -> dict:
        return self.rayservice["spec"]["rayClusterConfig"]

    @property
    def head(self) -> dict:
        return self.cluster["headGroupSpec"]

    def group(self, name: str) -> dict:
        matches = [g for g in self.cluster["workerGroupSpecs"] if g["groupName"] == name]
        assert len(matches) == 1, f"worker group {name} appears {len(matches)} times"
        return matches[0]

    def pod_templates(self) -> dict[str, dict]:
        """{group name ("head" for the head): pod template}."""
        out = {"head": self.head["template"]}
        for group in self.cluster["workerGroupSpecs"]:
            out[group["groupName"]] = group["template"]
        return out


def clean(obj: dict) -> dict:
    """An object without the bookkeeping key the tests add."""
    return {k: v for k, v in obj.items() if k != "_template"}


@lru_cache(maxsize=None)
def _render_cached(key: str) -> Render:
    values = yaml.safe_load(key)
    return Render(render_k8s.render_chart(values, release=RELEASE, namespace=NAMESPACE))


def render(values: dict | None = None) -> Render:
    """Render the chart with user values over the "default" value set (cached by content)."""
    return _render_cached(yaml.safe_dump(deep_merge(VALUE_SETS["default"], values or {}), sort_keys=True))


def render_set(name: str) -> Render:
    """Render one value set exactly as written (nothing merged under it)."""
    return _render_cached(yaml.safe_dump(VALUE_SETS[name], sort_keys=True))


def render_error(values: dict, *, base: dict | None = None) -> str:
    """Render values (over the "default" value set, or `base`) that must be refused; returns the error message."""
    import helm_python

    merged = deep_merge(VALUE_SETS["default"] if base is None else base, values)
    with pytest.raises(helm_python.HelmError) as excinfo:
        render_k8s.render_chart(merged, release=RELEASE, namespace=NAMESPACE)
    return str(excinfo.value)

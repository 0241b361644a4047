"""k8s/ (plain manifests for teams without Helm) is exactly what the chart renders for its default values."""

from __future__ import annotations

import yaml

from chart_helpers import K8S_DIR, render_k8s


def test_k8s_dir_equals_a_fresh_render():
    problems = render_k8s.differences(K8S_DIR)
    assert problems == [], "k8s/ is stale, run `python helm/render_k8s.py`:\n" + "\n".join(problems)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    files = sorted(p.name for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    kinds = set()
    for name in files:
        docs = [d for d in yaml.safe_load_all((K8S_DIR / name).read_text()) if d]
        assert docs, name
        kinds |= {d["kind"] for d in docs}
    assert {"RayService", "ConfigMap", "PodDisruptionBudget"} <= kinds
    assert "PodMonitor" not in kinds, "opt-in: plain manifests must apply on clusters without the Prometheus operator"
    assert "Pod" not in kinds, "helm test hooks stay out of the plain manifests"


def test_check_mode_detects_drift(tmp_path):
    """The comparison the test relies on notices edits, extra files and missing files."""
    for name, text in render_k8s.expected().items():
        (tmp_path / name).write_text(text)
    assert render_k8s.differences(tmp_path) == []
    (tmp_path / "rayservice.yaml").write_text((tmp_path / "rayservice.yaml").read_text().replace("maxReplicas: 4", "maxReplicas: 5"))
    (tmp_path / "extra.yaml").write_text("kind: ConfigMap\n")
    (tmp_path / "poddisruptionbudget.yaml").unlink()
    assert render_k8s.differences(tmp_path) == [
        "missing: k8s/poddisruptionbudget.yaml",
        "not rendered by the chart: k8s/extra.yaml",
        "stale: k8s/rayservice.yaml",
    ]

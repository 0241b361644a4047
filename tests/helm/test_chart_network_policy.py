"""The NetworkPolicy lets only the right peers reach each port of the Ray pods (evaluated as Kubernetes does:
a connection is allowed when any ingress rule admits its source and port)."""

from __future__ import annotations

import pytest

from chart_helpers import render, render_set

RELEASE_POD = {"app.kubernetes.io/instance": "instantid-serve", "app.kubernetes.io/part-of": "instantid-serve",
               "ray.io/is-ray-node": "yes"}
TEST_POD = {"app.kubernetes.io/instance": "instantid-serve", "app.kubernetes.io/component": "test"}


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _peer_admits(peer: dict, source: dict) -> bool:
    if "ipBlock" in peer:
        return False  # sources here are pods
    ns_ok = _matches(peer["namespaceSelector"], source["ns"]) if "namespaceSelector" in peer else source["ns_name"] == "ml"
    pod_ok = _matches(peer["podSelector"], source["pod"]) if "podSelector" in peer else True
    return ns_ok and pod_ok


def allowed(policy: dict, source: dict, port: int) -> bool:
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        if any(_peer_admits(peer, source) for peer in rule.get("from", [])):
            return True
    return False


def source(namespace: str, pod: dict | None = None) -> dict:
    return {"ns_name": namespace, "ns": {"kubernetes.io/metadata.name": namespace}, "pod": pod or {"app": "x"}}


RAY_PORTS = {"gcs": 6379, "client": 10001, "dashboard": 8265, "haproxy-stats": 8404, "raylet": 44000}
METRICS = [8080, 9101, 44217, 44227]

CASES = [
    ("ingress controller -> serve", source("ingress-nginx"), [8000], True),
    ("ingress controller -> Ray", source("ingress-nginx"), list(RAY_PORTS.values()) + METRICS, False),
    ("prometheus -> metrics", source("monitoring"), METRICS, True),
    ("prometheus -> serve and Ray", source("monitoring"), [8000] + list(RAY_PORTS.values()), False),
    ("kuberay operator -> dashboard", source("kuberay-system"), [8265], True),
    ("kuberay operator -> Ray client, GCS, stats", source("kuberay-system"), [10001, 6379, 8404, 8000], False),
    ("another pod of the namespace", source("ml"), [8000, 8265, 10001, 6379, 8404] + METRICS, False),
    ("another namespace", source("default"), [8000, 8265, 10001, 6379, 8404] + METRICS, False),
    ("helm test pod -> serve", source("ml", TEST_POD), [8000], True),
    ("helm test pod -> Ray", source("ml", TEST_POD), [8265, 10001, 6379], False),
    ("this release's Ray pods", source("ml", RELEASE_POD), [8000, 6379, 10001, 8265, 44000, 8080], True),
]


@pytest.mark.parametrize(("who", "src", "ports", "expected"), CASES, ids=[c[0] for c in CASES])
def test_who_reaches_what(who, src, ports, expected):
    policy = render_set("default").one("NetworkPolicy")
    for port in ports:
        assert allowed(policy, src, port) is expected, f"{who}: port {port}"


def test_policy_selects_every_ray_pod_and_only_ingress(value_set):
    rendered = render_set(value_set)
    for policy in rendered.of_kind("NetworkPolicy"):
        assert policy["spec"]["policyTypes"] == ["Ingress"], "egress stays open: weights come from the hub or S3"
        if policy["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "redis":
            continue  # the trial Redis's own policy (test_chart_secrets.py)
        for group, template in rendered.pod_templates().items():
            labels = {**template["metadata"]["labels"], "ray.io/is-ray-node": "yes"}
            assert _matches(policy["spec"]["podSelector"], labels), group
        assert all(rule.get("from") for rule in policy["spec"]["ingress"]), "a rule without `from` admits everyone"


def test_peers_are_configurable_and_policy_can_be_off():
    policy = render({"networkPolicy": {"serveFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                                       "dashboardFrom": [], "metricsFrom": []}}).one("NetworkPolicy")
    assert not allowed(policy, source("kuberay-system"), 8265)
    assert not allowed(policy, source("monitoring"), 8080)
    serve_rule = [r for r in policy["spec"]["ingress"] if {p["port"] for p in r.get("ports", [])} == {8000}][0]
    assert {"ipBlock": {"cidr": "10.0.0.0/8"}} in serve_rule["from"]
    assert render({"networkPolicy": {"enabled": False}}).of_kind("NetworkPolicy") == []


def test_ray_token_auth_is_offered():
    """KubeRay's token mode (Ray >= 2.52) protects the dashboard, GCS and Ray Client beyond the NetworkPolicy;
    the kuberay_rules mirror checks it passes the operator on the full value set."""
    assert "authOptions" not in render_set("default").cluster
    assert render_set("full").cluster["authOptions"] == {"mode": "token"}

"""Serve Service, Ingress, PodMonitor/ServiceMonitor, Grafana dashboard, PodDisruptionBudget, chart test."""

from __future__ import annotations

import json
import re

from chart_helpers import CHART_DIR, effective_values, render, render_set

DASHBOARD = json.loads((CHART_DIR / "dashboards" / "instantid-serve.json").read_text())


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def container_ports(template: dict) -> set[str]:
    return {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def test_serve_service_declared_for_kuberay(value_set):
    """KubeRay builds the serve Service from spec.serveService and keeps its selector on the active cluster."""
    rendered = render_set(value_set)
    values = effective_values(value_set)
    spec = rendered.rayservice["spec"]
    service = spec["serveService"]
    assert service["metadata"]["name"] == "instantid-serve-serve" or service["metadata"]["name"].endswith("-serve")
    assert service["spec"]["type"] == values["service"]["type"]
    assert service["spec"]["ports"] == [{"name": "serve", "port": 8000, "protocol": "TCP"}]
    assert "selector" not in service["spec"], "KubeRay owns the selector"
    assert spec["excludeHeadPodFromServeSvc"] is values["rayService"]["excludeHeadPodFromServeSvc"]
    assert spec["upgradeStrategy"] == values["rayService"]["upgradeStrategy"]
    # Every pod listens on the serve port (proxies run on every node).
    for template in rendered.pod_templates().values():
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["serve"] == 8000 and ports["metrics"] == 8080


def test_ingress_points_at_the_serve_service():
    assert render_set("default").of_kind("Ingress") == []
    rendered = render_set("full")
    ingress = rendered.one("Ingress")
    service_name = rendered.rayservice["spec"]["serveService"]["metadata"]["name"]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "instantid-tls", "hosts": ["instantid.example.com"]}]
    backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends == [{"name": service_name, "port": {"name": "serve"}}]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "25m"


def test_pod_monitor_selects_every_ray_pod():
    rendered = render_set("s3")
    monitor = rendered.one("PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector["ray.io/is-ray-node"] == "yes"  # set by KubeRay on every Ray pod
    all_ports = set()
    for group, template in rendered.pod_templates().items():
        # Labels KubeRay adds to every pod it creates, plus the template's own.
        labels = {**template["metadata"]["labels"], "ray.io/is-ray-node": "yes", "ray.io/group": group}
        assert labels_match(selector, labels), group
        all_ports |= container_ports(template)
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} == {"metrics", "as-metrics", "dash-metrics", "haproxy-metrics"} <= all_ports
    assert all(e["interval"] == "15s" for e in endpoints)


def test_pod_monitor_is_opt_in():
    """Without the Prometheus operator's CRDs a PodMonitor fails the whole install: off unless asked for."""
    assert render_set("default").of_kind("PodMonitor") == []
    assert render({"monitoring": {"podMonitor": {"enabled": True}}}).one("PodMonitor")


def test_haproxy_exporter_is_declared_and_scraped(value_set):
    """Ray's HAProxy ingress exports Prometheus metrics on 9101 (RAY_SERVE_HAPROXY_METRICS_PORT) on every pod
    that runs a proxy; the pods declare it and whichever monitor is on scrapes it."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_METRICS_PORT

    rendered = render_set(value_set)
    values = effective_values(value_set)
    haproxy = values["serve"]["httpIngress"] == "haproxy"
    for group, template in rendered.pod_templates().items():
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert (ports.get("haproxy-metrics") == RAY_SERVE_HAPROXY_METRICS_PORT) is haproxy, group
    for monitor in rendered.of_kind("PodMonitor"):
        assert ("haproxy-metrics" in {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}) is haproxy
    for monitor in rendered.of_kind("ServiceMonitor"):
        assert ("haproxy-metrics" in {e["port"] for e in monitor["spec"]["endpoints"]}) is haproxy
    proxy = render({"serve": {"httpIngress": "proxy"}})
    assert all("haproxy-metrics" not in container_ports(t) for t in proxy.pod_templates().values())


def test_pod_monitor_labels_for_prometheus_selector():
    monitor = render({"monitoring": {"podMonitor": {"enabled": True, "labels": {"release": "kps"}}}}).one("PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"


def test_service_monitor_alternative():
    rendered = render_set("full")
    assert rendered.of_kind("PodMonitor") == []
    monitor = rendered.one("ServiceMonitor")
    services = [s for s in rendered.of_kind("Service") if labels_match(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert len(services) == 1
    service = services[0]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True, "starting or failing pods must still be scraped"
    assert {p["name"] for p in service["spec"]["ports"]} == {e["port"] for e in monitor["spec"]["endpoints"]}
    for group, template in rendered.pod_templates().items():
        labels = {**template["metadata"]["labels"], "ray.io/is-ray-node": "yes"}
        assert labels_match(service["spec"]["selector"], labels), group
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert all(e["interval"] == "30s" for e in monitor["spec"]["endpoints"])


def test_no_monitoring_value_set_renders_no_monitoring_objects():
    kinds = render_set("no-monitoring").kinds()
    assert not {"PodMonitor", "ServiceMonitor", "ConfigMap", "PodDisruptionBudget", "Service"} & set(kinds)


def test_dashboard_configmap_carries_the_dashboard_file():
    rendered = render_set("default")
    configmap = rendered.one("ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["instantid-serve.json"]) == DASHBOARD
    full = render_set("full").one("ConfigMap")
    assert full["metadata"]["annotations"]["grafana_folder"] == "ML"


def _exprs() -> list[str]:
    exprs = []
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def test_dashboard_covers_requests_latency_queue_replicas_gpu():
    exprs = "\n".join(_exprs())
    # App metrics are matched with and without Ray's "ray_" export prefix (ray.util.metrics adds it).
    app = '{__name__=~"(ray_)?'
    assert app + 'instantid_requests_total"' in exprs
    assert 'histogram_quantile(0.95, sum by (le, stage) (rate(' + app + 'instantid_stage_seconds_bucket"' in exprs
    assert app + 'instantid_(generator_)?queue_length"' in exprs and "ray_serve_deployment_queued_queries" in exprs
    assert app + "instantid_batch_size_bucket" in exprs
    assert "ray_serve_deployment_replica_healthy" in exprs and "ray_serve_autoscaling_target_replicas" in exprs
    assert "DCGM_FI_DEV_GPU_UTIL" in exprs
    titles = [p["title"] for p in DASHBOARD["panels"]]
    assert len(titles) == len(set(titles))


def test_dashboard_is_well_formed():
    assert DASHBOARD["uid"] == "instantid-serve"
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for expr in _exprs():
        assert expr.count("(") == expr.count(")"), expr
        assert expr.count("{") == expr.count("}"), expr
        assert expr.count('"') % 2 == 0, expr
        # Every app/Serve series is scoped to the dashboard's namespace variable.
        selectors = re.findall(r'ray_serve_\w+\{[^}]*\}|\{__name__=~"[^"]*instantid[^"]*"[^}]*\}', expr)
        assert selectors or "DCGM_" in expr, expr
        for selector in selectors:
            assert 'namespace=~"$namespace"' in selector, selector
    for panel in DASHBOARD["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_pod_disruption_budgets_allow_drains(value_set):
    """Ray pods are owned by a RayCluster (no scale subresource): only an integer minAvailable works there (with
    maxUnavailable or a percentage the disruption controller allows 0 evictions). Each budget covers one worker
    group and leaves at least one pod evictable at the group's minimum size."""
    rendered = render_set(value_set)
    values = effective_values(value_set)
    groups = {values[k]["groupName"]: values[k] for k in ("faceWorker", "generatorWorker")}
    templates = rendered.pod_templates()
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        spec = pdb["spec"]
        assert set(spec) == {"minAvailable", "selector"}, spec
        assert isinstance(spec["minAvailable"], int) and spec["minAvailable"] >= 1
        selector = spec["selector"]["matchLabels"]
        covered = [g for g, t in templates.items()
                   if labels_match(selector, {**t["metadata"]["labels"], "ray.io/is-ray-node": "yes", "ray.io/group": g})]
        assert len(covered) == 1 and covered[0] in groups, covered
        assert spec["minAvailable"] < groups[covered[0]]["minReplicas"], "a drain could never evict a pod of this group"


def test_default_budget_keeps_one_face_pod_and_leaves_the_head_to_annotations():
    rendered = render_set("default")
    pdbs = {p["metadata"]["name"]: p["spec"] for p in rendered.of_kind("PodDisruptionBudget")}
    assert pdbs == {"instantid-serve-face": {"minAvailable": 1, "selector": {"matchLabels": {
        "app.kubernetes.io/instance": "instantid-serve", "app.kubernetes.io/part-of": "instantid-serve",
        "ray.io/is-ray-node": "yes", "ray.io/group": "face"}}}}
    annotations = rendered.head["template"]["metadata"]["annotations"]
    assert annotations["karpenter.sh/do-not-disrupt"] == "true"
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    gpu = render({"podDisruptionBudget": {"generator": {"minAvailable": 1}},
                  "generatorWorker": {"minReplicas": 2, "replicas": 2},
                  "serve": {"deployments": {"Generator": {"autoscaling_config": {"min_replicas": 2}}}}})
    assert {p["metadata"]["name"] for p in gpu.of_kind("PodDisruptionBudget")} == {"instantid-serve-face", "instantid-serve-generator"}


def test_budgets_that_would_hang_drains_fail_at_render():
    from chart_helpers import render_error

    assert "podDisruptionBudget.face.minAvailable (2) must be less than faceWorker.minReplicas (2)" in render_error(
        {"podDisruptionBudget": {"face": {"minAvailable": 2}}})
    assert "podDisruptionBudget.generator.minAvailable (1) must be less than generatorWorker.minReplicas (1)" in render_error(
        {"podDisruptionBudget": {"generator": {"minAvailable": 1}}})
    assert "/podDisruptionBudget/face/minAvailable" in render_error({"podDisruptionBudget": {"face": {"minAvailable": "50%"}}})
    assert "/podDisruptionBudget" in render_error({"podDisruptionBudget": {"maxUnavailable": 1}})


def test_http_path_survives_losing_a_face_pod(value_set):
    """Both Ingress replicas live on the face group: production value sets keep two face pods, spread over nodes."""
    rendered = render_set(value_set)
    values = effective_values(value_set)
    assert values["faceWorker"]["minReplicas"] >= 2
    for name in ("Ingress", "FaceAnalyzer"):
        assert rendered.deployment(name)["autoscaling_config"]["min_replicas"] >= 2, name
    affinity = rendered.group(values["faceWorker"]["groupName"])["template"]["spec"]["affinity"]
    if not values["faceWorker"].get("affinity"):
        term = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        face_labels = rendered.group(values["faceWorker"]["groupName"])["template"]["metadata"]["labels"]
        assert labels_match(term["labelSelector"]["matchLabels"], face_labels)
        generator_labels = rendered.group(values["generatorWorker"]["groupName"])["template"]["metadata"]["labels"]
        assert not labels_match(term["labelSelector"]["matchLabels"], generator_labels)


def test_face_spread_modes():
    required = render({"faceWorker": {"spreadAcrossNodes": "required"}}).group("face")["template"]["spec"]["affinity"]
    assert list(required["podAntiAffinity"]) == ["requiredDuringSchedulingIgnoredDuringExecution"]
    spread_none = render({"faceWorker": {"spreadAcrossNodes": "none"}}).group("face")["template"]["spec"]["affinity"]
    assert list(spread_none) == ["nodeAffinity"], "only the chart's keep-off-GPU-nodes rule"
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["cpu"]}]}]}}}
    assert render({"faceWorker": {"affinity": own}}).group("face")["template"]["spec"]["affinity"] == own


def test_pods_keep_kuberays_name_label():
    """Pod templates must not set app.kubernetes.io/name: KubeRay sets it to "kuberay" and ours would win."""
    for template in render_set("full").pod_templates().values():
        assert "app.kubernetes.io/name" not in template["metadata"]["labels"]


def test_chart_test_hook_checks_health_and_auth(value_set):
    rendered = render_set(value_set)
    values = effective_values(value_set)
    assert len(rendered.hooks) == 1
    hook = rendered.hooks[0]
    assert hook["kind"] == "Pod"
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = rendered.rayservice["spec"]["serveService"]["metadata"]["name"]
    env = {e["name"]: e["value"] for e in hook["spec"]["containers"][0]["env"]}
    assert env["SERVE_URL"] == f"http://{service}:8000"
    assert env["EXPECT_AUTH"] == ("1" if values["app"]["auth"]["enabled"] else "0")
    script = hook["spec"]["containers"][0]["command"][-1]
    compile(script, "helm-test", "exec")
    assert "/healthz" in script and "/readyz" in script and "/v1/identities" in script


def test_chart_version_does_not_roll_the_ray_cluster():
    """Pod templates carry no chart or app version: KubeRay hashes the cluster spec, and a label that changes
    with every chart release would start a blue/green cluster (2x GPUs) for nothing."""
    from chart_helpers import render_k8s

    a = render_set("default")
    for template in a.pod_templates().values():
        labels = template["metadata"]["labels"]
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels
    # Rendering the same values twice gives the same cluster spec (nothing random or time-based).
    again = render_k8s.render_chart(render_k8s.PLAIN_VALUES, release="instantid-serve", namespace="ml")
    assert again["instantid-serve/templates/rayservice.yaml"] == a.raw["instantid-serve/templates/rayservice.yaml"]

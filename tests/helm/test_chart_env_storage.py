"""Pod environment, secrets, service account and the model cache volume."""

from __future__ import annotations

from chart_helpers import effective_values, render, render_set


def env_of(template: dict) -> dict[str, dict]:
    return {e["name"]: e for e in template["spec"]["containers"][0]["env"]}


def secret_ref(entry: dict) -> tuple[str, str]:
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_cache_locations_on_the_model_volume(value_set):
    rendered = render_set(value_set)
    mount = effective_values(value_set)["modelCache"]["mountPath"]
    for group, template in rendered.pod_templates().items():
        env = env_of(template)
        assert env["HF_HOME"]["value"] == f"{mount}/huggingface", group
        assert env["INSTANTID_CACHE"]["value"] == f"{mount}/instantid", group
        assert env["INSIGHTFACE_HOME"]["value"] == f"{mount}/insightface", group
        mounts = {m["name"]: m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["model-cache"] == mount


def test_model_cache_pvc_shared_by_all_pods():
    rendered = render_set("default")
    pvc = rendered.one("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for template in rendered.pod_templates().values():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_existing_claim_and_storage_class():
    rendered = render_set("full")
    assert rendered.of_kind("PersistentVolumeClaim") == []
    for template in rendered.pod_templates().values():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "shared-model-cache"
    assert render_set("minimal").one("PersistentVolumeClaim")["spec"]["storageClassName"] == "efs-sc"
    pvc = render({"modelCache": {"persistence": {"keepOnUninstall": False}}}).one("PersistentVolumeClaim")
    assert "annotations" not in pvc["metadata"]


def test_without_persistence_each_pod_gets_an_empty_dir():
    rendered = render_set("no-monitoring")
    assert rendered.of_kind("PersistentVolumeClaim") == []
    for template in rendered.pod_templates().values():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["model-cache"] == {"name": "model-cache", "emptyDir": {"sizeLimit": "80Gi"}}


def test_api_key_secret_by_default():
    rendered = render({"apiKeys": {"hashes": ["alice:" + "a" * 64, "bob:" + "b" * 64]}})
    secret = rendered.one("Secret")
    assert secret["metadata"]["name"] == "instantid-serve-api-keys"
    assert secret["stringData"] == {"INSTANTID_API_KEY_HASHES": f"alice:{'a' * 64},bob:{'b' * 64}"}
    for template in rendered.pod_templates().values():
        entry = env_of(template)["INSTANTID_API_KEY_HASHES"]
        assert secret_ref(entry) == ("instantid-serve-api-keys", "INSTANTID_API_KEY_HASHES")
    assert rendered.app["args"]["auth"]["enabled"] is True


def test_existing_api_key_secret():
    rendered = render_set("full")
    assert all(s["metadata"]["name"] != "instantid-api-keys" for s in rendered.of_kind("Secret"))
    entry = env_of(rendered.pod_templates()["head"])["INSTANTID_API_KEY_HASHES"]
    assert secret_ref(entry) == ("instantid-api-keys", "hashes")


def test_auth_off_means_no_key_secret():
    rendered = render_set("no-monitoring")
    assert rendered.of_kind("Secret") == []
    assert all("INSTANTID_API_KEY_HASHES" not in env_of(t) for t in rendered.pod_templates().values())
    assert rendered.app["args"]["auth"]["enabled"] is False


def test_hugging_face_token():
    assert all("HF_TOKEN" not in env_of(t) for t in render_set("default").pod_templates().values())
    rendered = render({"huggingface": {"token": "hf_example"}})
    secret = [s for s in rendered.of_kind("Secret") if s["metadata"]["name"].endswith("-hf-token")]
    assert len(secret) == 1 and secret[0]["stringData"] == {"HF_TOKEN": "hf_example"}
    for template in rendered.pod_templates().values():
        assert secret_ref(env_of(template)["HF_TOKEN"]) == ("instantid-serve-hf-token", "HF_TOKEN")
    full = render_set("full")
    assert secret_ref(env_of(full.pod_templates()["head"])["HF_TOKEN"]) == ("hf-token", "HF_TOKEN")
    assert not [s for s in full.of_kind("Secret") if s["metadata"]["name"].endswith("-hf-token")]


def test_s3_with_irsa():
    rendered = render_set("s3")
    account = rendered.one("ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for template in rendered.pod_templates().values():
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
        env = env_of(template)
        assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
        assert env["AWS_REGION"]["value"] == env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
    args = rendered.app["args"]
    refs = [args["instantid"], args["face_model"], args["identity_store"], args["output_bucket"]]
    refs += [m["base_model"] for m in args["models"]]
    assert all(ref.startswith("s3://") for ref in refs)


def test_s3_with_static_credentials_and_endpoint():
    rendered = render_set("full")
    secret = [s for s in rendered.of_kind("Secret") if s["metadata"]["name"] == "instantid-aws"]
    assert len(secret) == 1
    assert secret[0]["stringData"] == {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "example-secret"}
    for template in rendered.pod_templates().values():
        env = env_of(template)
        assert secret_ref(env["AWS_ACCESS_KEY_ID"]) == ("instantid-aws", "AWS_ACCESS_KEY_ID")
        assert secret_ref(env["AWS_SECRET_ACCESS_KEY"]) == ("instantid-aws", "AWS_SECRET_ACCESS_KEY")
        assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.storage.svc:9000"
        assert env["INSTANTID_LOG_LEVEL"]["value"] == "debug"
        assert template["spec"]["serviceAccountName"] == "instantid-runtime"
    assert rendered.of_kind("ServiceAccount") == []


def test_existing_aws_secret():
    rendered = render({"aws": {"existingSecret": "s3-creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"}})
    assert [s["metadata"]["name"] for s in rendered.of_kind("Secret")] == ["instantid-serve-api-keys"]
    env = env_of(rendered.pod_templates()["generator"])
    assert secret_ref(env["AWS_ACCESS_KEY_ID"]) == ("s3-creds", "id")
    assert secret_ref(env["AWS_SECRET_ACCESS_KEY"]) == ("s3-creds", "secret")


def test_pods_run_as_non_root(value_set):
    rendered = render_set(value_set)
    for template in list(rendered.pod_templates().values()) + [{"spec": h["spec"]} for h in rendered.hooks]:
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_image_and_pull_secrets():
    rendered = render_set("full")
    images = {c["image"] for t in rendered.pod_templates().values() for c in t["spec"]["containers"]}
    assert images == {"registry.example.com/ml/instantid-serve:0.1.0-cu128"}
    for template in rendered.pod_templates().values():
        assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert template["spec"]["containers"][0]["imagePullPolicy"] == "Always"
    assert rendered.cluster["autoscalerOptions"]["imagePullPolicy"] == "Always"


def test_ray_cluster_environment_matches_the_app(value_set):
    """Every Ray container gets deployments.ray_env.CLUSTER_ENV (the HAProxy ingress), the environment the tests
    and benchmarks run the app in; "proxy" falls back to Serve's Python proxy."""
    from deployments.ray_env import CLUSTER_ENV

    for group, template in render_set(value_set).pod_templates().items():
        env = env_of(template)
        assert {k: env[k]["value"] for k in CLUSTER_ENV if k in env} == CLUSTER_ENV, group
    for group, template in render({"serve": {"httpIngress": "proxy"}}).pod_templates().items():
        assert not set(CLUSTER_ENV) & set(env_of(template)), group


def test_new_readwritemany_claim_without_a_class_fails_at_render():
    """The cluster default class (EBS, PD) cannot do ReadWriteMany: the claim would stay Pending forever."""
    from chart_helpers import render_error

    message = render_error({}, base={})  # the chart's bare defaults
    assert "modelCache.persistence.storageClassName is empty" in message
    assert "efs" in message.lower() and "filestore" in message.lower()
    # What makes it bindable: a class, an existing claim, or per-pod caches (identities then on S3).
    assert render({"modelCache": {"persistence": {"storageClassName": "standard-rwx"}}}).one("PersistentVolumeClaim")
    render_error_free = [
        {"modelCache": {"persistence": {"storageClassName": "", "existingClaim": "models"}}},
        {"modelCache": {"persistence": {"storageClassName": "", "enabled": False}}, "app": {"identity_store": "s3://b/ids"}},
    ]
    for values in render_error_free:
        render(values)

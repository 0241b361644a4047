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
        assert volumes["model-cache"] == {"name": "model-cache", "emptyDir": {"sizeLimit": "30Gi"}}


def test_auth_off_means_no_key_secret():
    rendered = render_set("no-monitoring")
    assert rendered.of_kind("Secret") == []
    assert all("INSTANTID_API_KEY_HASHES" not in env_of(t) for t in rendered.pod_templates().values())
    assert rendered.app["args"]["auth"]["enabled"] is False


def test_s3_with_irsa():
    rendered = render_set("s3")
    accounts = {a["metadata"]["name"]: a for a in rendered.of_kind("ServiceAccount")}
    assert set(accounts) == {"instantid-serve", "instantid-serve-head"}
    for account in accounts.values():
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for template in rendered.pod_templates().values():
        assert template["spec"]["serviceAccountName"] in accounts
        env = env_of(template)
        assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
        assert env["AWS_REGION"]["value"] == env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
    args = rendered.app["args"]
    refs = [args["instantid"], args["face_model"], args["identity_store"], args["output_bucket"]]
    refs += [m["base_model"] for m in args["models"]]
    assert all(ref.startswith("s3://") for ref in refs)


def test_s3_credentials_from_an_existing_secret_and_endpoint():
    rendered = render_set("full")
    assert not [s for s in rendered.of_kind("Secret") if "aws" in s["metadata"]["name"]], "no chart-made key Secret"
    assert "AWS_ACCESS_KEY_ID" not in env_of(rendered.pod_templates()["head"]), "the head reads nothing from S3"
    for group, template in rendered.pod_templates().items():
        env = env_of(template)
        if group == "head":
            continue
        assert secret_ref(env["AWS_ACCESS_KEY_ID"]) == ("minio-credentials", "AWS_ACCESS_KEY_ID")
        assert secret_ref(env["AWS_SECRET_ACCESS_KEY"]) == ("minio-credentials", "AWS_SECRET_ACCESS_KEY")
        assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.storage.svc:9000"
        assert env["INSTANTID_LOG_LEVEL"]["value"] == "debug"
    for template in rendered.pod_templates().values():
        assert template["spec"]["serviceAccountName"] == "instantid-runtime"  # create=false: one existing account
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
    from deployments.ray_env import CLUSTER_ENV, HARD_STOP_ENV, hard_stop_after_s

    # the hard stop follows the set's request timeout, by ray_env's rule
    wanted = {**CLUSTER_ENV, HARD_STOP_ENV: str(hard_stop_after_s(effective_values(value_set)["app"]["request_timeout_s"]))}
    for group, template in render_set(value_set).pod_templates().items():
        env = env_of(template)
        assert {k: env[k]["value"] for k in CLUSTER_ENV if k in env} == wanted, group
    for group, template in render({"serve": {"httpIngress": "proxy"}}).pod_templates().items():
        assert not set(CLUSTER_ENV) & set(env_of(template)), group


def test_new_readwritemany_claim_without_a_class_fails_at_render():
    """The cluster default class (EBS, PD) cannot do ReadWriteMany: the claim would stay Pending forever."""
    from chart_helpers import render_error

    message = render_error({}, base={})  # the chart's bare defaults
    assert "modelCache.persistence.storageClassName is empty" in message
    assert "efs" in message.lower() and "filestore" in message.lower()
    # What makes it bindable: a class, an existing claim, or per-pod caches (identities then on S3).
    assert render({"modelCache": {"persistence": {"storageClassName": "standard-rwx", "size": "1Ti"}}}).one("PersistentVolumeClaim")
    render_error_free = [
        {"modelCache": {"persistence": {"storageClassName": "", "existingClaim": "models"}}},
        {"modelCache": {"persistence": {"storageClassName": "", "enabled": False}}, "app": {"identity_store": "s3://b/ids"},
         "generatorWorker": {"resources": {"requests": {"ephemeral-storage": "52Gi"}}}},  # /tmp/ray + the per-pod cache
    ]
    for values in render_error_free:
        render(values)


def _secret_mounts(template: dict) -> dict[str, tuple[str, str, str]]:
    """{mount dir: (secret name, key, file)} of the Secret volumes a pod mounts."""
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    out = {}
    for mount in template["spec"]["containers"][0]["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret:
            assert mount["readOnly"] is True
            (item,) = secret["items"]
            out[mount["mountPath"]] = (secret["secretName"], item["key"], item["path"])
    return out


def test_no_secret_reaches_a_pod_through_env_except_s3_keys_and_the_jobs_store(value_set):
    """Secrets are files where they can rotate (a mounted Secret is updated in place; env is fixed). Env only
    for what the libraries read from env: S3 keys (boto3), and on the Ingress's face pods the jobs Redis URL and
    the webhook key (app.jobs.redis_url_env, app.jobs.webhooks.secret_env; a rotation needs a rolling restart)."""
    values = effective_values(value_set)
    jobs_env = {values["app"]["jobs"]["redis_url_env"], values["app"]["jobs"]["webhooks"]["secret_env"]}
    for group, template in render_set(value_set).pod_templates().items():
        for entry in template["spec"]["containers"][0]["env"]:
            if "valueFrom" in entry:
                allowed = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
                if group == values["faceWorker"]["groupName"]:
                    allowed |= jobs_env
                if group == "head" and (values["serve"]["deployments"]["Generator"].get("autoscaling_config")
                                        or {}).get("policy"):
                    allowed.add(values["app"]["jobs"]["redis_url_env"])  # the backlog policy reads the queue
                assert entry["name"] in allowed, (group, entry["name"])


def test_api_keys_are_a_file_on_the_face_pods_only():
    rendered = render({"apiKeys": {"hashes": ["alice:" + "a" * 64, "bob:" + "b" * 64]}})
    secret = rendered.one("Secret")
    assert secret["metadata"]["name"] == "instantid-serve-api-keys"
    assert secret["stringData"] == {"INSTANTID_API_KEY_HASHES": f"alice:{'a' * 64},bob:{'b' * 64}"}
    templates = rendered.pod_templates()
    face = templates["face"]
    assert _secret_mounts(face) == {"/etc/instantid/api-keys": ("instantid-serve-api-keys", "INSTANTID_API_KEY_HASHES", "hashes")}
    env = env_of(face)
    assert env["INSTANTID_API_KEY_HASHES_FILE"]["value"] == "/etc/instantid/api-keys/hashes"
    assert "INSTANTID_API_KEY_HASHES" not in env
    # The app reads <auth.key_hashes_env>_FILE (deployments/ingress/http/api_keys.py).
    assert rendered.app["args"]["auth"] == {**rendered.app["args"]["auth"], "enabled": True, "key_hashes_env": "INSTANTID_API_KEY_HASHES"}
    for group in ("head", "generator"):
        assert _secret_mounts(templates[group]) == {}, group
        assert "INSTANTID_API_KEY_HASHES_FILE" not in env_of(templates[group])


def test_existing_api_key_secret():
    rendered = render_set("full")
    assert all(s["metadata"]["name"] != "instantid-api-keys" for s in rendered.of_kind("Secret"))
    assert _secret_mounts(rendered.pod_templates()["face"])["/etc/instantid/api-keys"] == ("instantid-api-keys", "hashes", "hashes")


def test_hugging_face_token_is_a_file_where_weights_are_downloaded():
    assert all(not _secret_mounts(t) or "/etc/instantid/hf" not in _secret_mounts(t)
               for t in render_set("default").pod_templates().values())
    rendered = render({"huggingface": {"token": "hf_example"}})
    secret = [s for s in rendered.of_kind("Secret") if s["metadata"]["name"].endswith("-hf-token")]
    assert len(secret) == 1 and secret[0]["stringData"] == {"HF_TOKEN": "hf_example"}
    templates = rendered.pod_templates()
    for group in ("face", "generator"):
        assert _secret_mounts(templates[group])["/etc/instantid/hf"] == ("instantid-serve-hf-token", "HF_TOKEN", "token")
        assert env_of(templates[group])["HF_TOKEN_PATH"]["value"] == "/etc/instantid/hf/token"  # huggingface_hub re-reads it
        assert "HF_TOKEN" not in env_of(templates[group])
    assert "/etc/instantid/hf" not in _secret_mounts(templates["head"]) and "HF_TOKEN_PATH" not in env_of(templates["head"])
    full = render_set("full")
    assert _secret_mounts(full.pod_templates()["generator"])["/etc/instantid/hf"] == ("hf-token", "HF_TOKEN", "token")
    assert not [s for s in full.of_kind("Secret") if s["metadata"]["name"].endswith("-hf-token")]


def test_hf_token_path_is_what_huggingface_hub_reads(tmp_path):
    import subprocess
    import sys

    token = tmp_path / "token"
    token.write_text("hf_from_file\n")
    code = "from huggingface_hub import get_token; print(get_token())"
    env = {"HF_TOKEN_PATH": str(token), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "hf_from_file"


def test_head_and_workers_have_separate_service_accounts():
    """KubeRay binds the autoscaler's pod-patching Role to the head's account: workers get another one and no
    API token at all."""
    rendered = render_set("default")
    names = sorted(a["metadata"]["name"] for a in rendered.of_kind("ServiceAccount"))
    assert names == ["instantid-serve", "instantid-serve-head"]
    templates = rendered.pod_templates()
    assert templates["head"]["spec"]["serviceAccountName"] == "instantid-serve-head"
    assert "automountServiceAccountToken" not in templates["head"]["spec"]  # the autoscaler sidecar needs it
    for group in ("face", "generator"):
        assert templates[group]["spec"]["serviceAccountName"] == "instantid-serve"
        assert templates[group]["spec"]["automountServiceAccountToken"] is False
    assert rendered.hooks[0]["spec"]["automountServiceAccountToken"] is False

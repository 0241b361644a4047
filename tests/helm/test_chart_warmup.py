"""modelCache.warmup: `instantid download` runs once, before any Ray pod starts (an init container of the head;
KubeRay's workers wait for the head's GCS), filling the shared cache the replicas read."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from chart_helpers import render, render_error, render_set

MODELS = [{"name": "sdxl", "base_model": "stabilityai/stable-diffusion-xl-base-1.0", "loras": {}},
          {"name": "realvis", "base_model": "s3://ml-weights/sdxl/realvis xl", "loras": {}}]
WARM = {"modelCache": {"warmup": {"enabled": True}}, "huggingface": {"token": "hf_x", "offline": True},
        "aws": {"existingSecret": "s3-creds"}, "app": {"models": MODELS}}


def warmup_container(rendered) -> dict:
    (container,) = rendered.head["template"]["spec"]["initContainers"]
    assert container["name"] == "model-cache-warmup"
    return container


def test_off_by_default_and_only_on_the_head(value_set):
    rendered = render_set(value_set)
    for template in rendered.pod_templates().values():
        assert "initContainers" not in template["spec"]
    warm = render(WARM)
    for group in ("face", "generator"):
        assert "initContainers" not in warm.pod_templates()[group]["spec"], "workers wait for the head instead"


def test_downloads_every_model_in_the_serving_dtype_into_the_shared_cache(tmp_path):
    rendered = render(WARM)
    container = warmup_container(rendered)
    assert container["command"][:2] == ["/bin/sh", "-c"]
    # Run the command with a stand-in `instantid` that records its arguments and the config it reads: the quoting
    # survives the shell, and the config is the app's own model references, as `instantid download --config` reads.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "instantid").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s|" "$a"; done > {tmp_path}/calls\n'
                                       f'cat > {tmp_path}/config\n')
    (bin_dir / "instantid").chmod(0o755)
    env_vars = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    subprocess.run(container["command"], env={**os.environ, **env_vars, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                   check=True, timeout=30)
    assert (tmp_path / "calls").read_text() == "download|--config|-|--dtype|float16|"
    config = json.loads((tmp_path / "config").read_text())
    app = rendered.app["args"]
    assert config == {key: app[key] for key in ("models", "instantid", "face_model", "safety", "preprocessors")}
    # and the library fetches from it exactly what the app names (instantid.download.config_refs)
    from instantid.download import config_refs

    fields = {field for _, field, _ in config_refs(config)}
    assert {"models[0].base_model", "models[1].base_model", "instantid", "face_model", "safety.model"} <= fields
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HOME"]["value"] == "/models/huggingface" and env["INSIGHTFACE_HOME"]["value"] == "/models/insightface"
    assert env["INSTANTID_CACHE"]["value"] == "/models/instantid"
    assert "HF_HUB_OFFLINE" not in env, "the warm-up is what lets the replicas run offline"
    assert env["HF_TOKEN_PATH"]["value"] == "/etc/instantid/hf/token"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"model-cache": "/models", "hf-token": "/etc/instantid/hf"}
    volumes = {v["name"] for v in rendered.head["template"]["spec"]["volumes"]}
    assert {"model-cache", "hf-token"} <= volumes
    # The head's Ray container itself still gets no secret.
    head_env = {e["name"] for e in rendered.head["template"]["spec"]["containers"][0]["env"]}
    assert not head_env & {"HF_TOKEN_PATH", "AWS_ACCESS_KEY_ID"}
    assert "HF_HUB_OFFLINE" in head_env


def test_explicit_dtype_and_refusals():
    container = warmup_container(render({"modelCache": {"warmup": {"enabled": True}}, "app": {"dtype": "bfloat16"}}))
    assert container["command"][2].endswith("--dtype bfloat16")
    assert "modelCache.warmup.enabled needs modelCache.persistence.enabled" in render_error(
        {"modelCache": {"warmup": {"enabled": True}, "persistence": {"enabled": False}}, "app": {"identity_store": "s3://b/i"}})


OFFLINE_NO_WARMUP = {"huggingface": {"offline": True}}


@pytest.mark.parametrize(("values", "field"), [
    ({"app": {"models": [{"name": "sdxl", "base_model": "stabilityai/stable-diffusion-xl-base-1.0"}]}},
     "app.models[0].base_model"),
    ({"app": {"models": [{"name": "sdxl", "base_model": "s3://w/sdxl", "loras": {"x": "acme/lora"}}]}},
     "app.models[0].loras.x"),
    ({"app": {"instantid": "InstantX/InstantID"}}, "app.instantid"),
    ({"app": {"face_model": "antelopev2"}}, "app.face_model"),
    ({"app": {"safety": {"enabled": True, "model": "CompVis/stable-diffusion-safety-checker"}}}, "app.safety.model"),
    ({"app": {"models": [{"name": "sdxl", "base_model": "s3://w/sdxl", "controlnets": {"depth": "s3://w/cn"}}],
              "preprocessors": {"depth": "Intel/dpt-hybrid-midas", "pose": "yzd-v/DWPose"}}},
     "app.preprocessors.depth"),
])
def test_offline_without_a_warm_up_refuses_a_hub_reference_nothing_fetches(values, field):
    s3 = {"app": {"models": [{"name": "sdxl", "base_model": "s3://w/sdxl", "loras": {}, "controlnets": {}}],
                  "instantid": "s3://w/iid", "face_model": "s3://w/antelopev2", "safety": {"model": "s3://w/safety"},
                  "preprocessors": {"depth": "s3://w/dpt", "pose": "s3://w/dwpose"}}}
    render({**OFFLINE_NO_WARMUP, **s3})  # all on S3: the replicas fetch them without the hub
    merged = {**OFFLINE_NO_WARMUP, "app": {**s3["app"], **values["app"]}}
    if field == "app.safety.model":
        merged["app"]["safety"] = values["app"]["safety"]
    message = render_error(merged)
    assert field in message and "huggingface.offline" in message
    # the warm-up fetches it before any replica starts: fine
    render({**merged, "modelCache": {"warmup": {"enabled": True}}})


def test_a_preprocessor_no_model_needs_is_not_refused():
    """As the app loads them (and `instantid download --config` fetches them): only for a model's control type."""
    values = {**OFFLINE_NO_WARMUP, "app": {
        "models": [{"name": "sdxl", "base_model": "s3://w/sdxl", "loras": {}, "controlnets": {"canny": "s3://w/c"}}],
        "instantid": "s3://w/iid", "face_model": "s3://w/antelopev2", "safety": {"model": "s3://w/safety"}}}
    render(values)  # preprocessors stay hub ids: canny needs none, and no model offers depth or pose

"""modelCache.warmup: `instantid download` runs once, before any Ray pod starts (an init container of the head;
KubeRay's workers wait for the head's GCS), filling the shared cache the replicas read."""

from __future__ import annotations

import os
import subprocess

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
    # Run the command with a stand-in `instantid` that records its arguments: the quoting survives the shell.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "instantid").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s|" "$a"; done >> {tmp_path}/calls\necho >> {tmp_path}/calls\n')
    (bin_dir / "instantid").chmod(0o755)
    subprocess.run(container["command"], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, check=True, timeout=30)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [f"download|--base-model|{m['base_model']}|--weights|InstantX/InstantID|--face-model|antelopev2|--dtype|float16|"
                     for m in MODELS]
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

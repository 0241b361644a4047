"""Evictions do not cut requests: worker pods get a grace period longer than the graceful shutdown of every
replica they host, and a preStop hook that drains the Ray node and waits for its Serve replicas to leave."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from chart_helpers import effective_values, render_set

# The face group hosts Ingress and FaceAnalyzer replicas; the generator group hosts Generator replicas.
HOSTED = {"faceWorker": ("Ingress", "FaceAnalyzer"), "generatorWorker": ("Generator",)}


def prestop(template: dict) -> str:
    command = template["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    return command[2]


def test_worker_grace_covers_every_hosted_replica_drain(value_set):
    rendered = render_set(value_set)
    values = effective_values(value_set)
    for key, deployments in HOSTED.items():
        spec = rendered.group(values[key]["groupName"])["template"]
        grace = spec["spec"]["terminationGracePeriodSeconds"]
        longest = max(rendered.deployment(d)["graceful_shutdown_timeout_s"] for d in deployments)
        assert grace >= longest + 30, f"{key}: grace {grace}s does not cover a {longest}s replica drain"
        script = prestop(spec)
        assert "ray drain-node" in script and f"--deadline-remaining-seconds {grace - 15}" in script
    # The head hosts no replica: no drain (draining the GCS node would stop the cluster).
    assert "lifecycle" not in rendered.head["template"]["spec"]["containers"][0]


def _fake_ray(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/drain-args\n')
    (bin_dir / "ray").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOSTNAME": "face-pod-1"}


def _fake_proc(tmp_path, script: str) -> tuple[str, "Path"]:
    """The script pointed at a private /proc (the test machine's own may hold other Ray clusters' replicas),
    holding the preStop shell itself: its command line quotes the pattern and must not count as a replica."""
    proc = tmp_path / "proc"
    (proc / "100").mkdir(parents=True)
    (proc / "100" / "cmdline").write_text("/bin/sh\0-c\0" + script)
    return script.replace("/proc/", f"{proc}/"), proc


def test_prestop_drains_then_waits_for_the_replicas_to_leave(tmp_path):
    script, proc = _fake_proc(tmp_path, prestop(render_set("default").group("face")["template"]))
    (proc / "200").mkdir()
    (proc / "200" / "cmdline").write_text("ray::ServeReplica:instantid:Ingress\0")
    threading.Timer(3.0, lambda: (proc / "200" / "cmdline").unlink()).start()  # the replica leaves after 3 s
    started = time.monotonic()
    subprocess.run(["/bin/sh", "-c", script], env=_fake_ray(tmp_path), check=True, timeout=60)
    waited = time.monotonic() - started
    assert 2.5 <= waited < 20, f"preStop returned after {waited:.1f}s; the replica lived 3s"
    args = (tmp_path / "drain-args").read_text()
    assert "drain-node --reason DRAIN_NODE_REASON_PREEMPTION" in args and "face-pod-1" in args


def test_prestop_returns_at_once_without_replicas(tmp_path):
    script, _ = _fake_proc(tmp_path, prestop(render_set("default").group("generator")["template"]))
    started = time.monotonic()
    subprocess.run(["/bin/sh", "-c", script], env=_fake_ray(tmp_path), check=True, timeout=60)
    assert time.monotonic() - started < 5, "its own command line must not count as a replica"


@pytest.mark.parametrize("group", ["head", "face", "generator"])
def test_ray_tmp_on_its_own_volume_with_ephemeral_storage_requested(group):
    for name in ("default", "no-monitoring", "full"):
        rendered = render_set(name)
        template = rendered.pod_templates()[group]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        container = template["spec"]["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["ray-logs"] == "/tmp/ray"
        limit = volumes["ray-logs"]["emptyDir"]["sizeLimit"]
        need = gib(limit)
        if group == "generator" and "emptyDir" in volumes["model-cache"]:
            need += gib(volumes["model-cache"]["emptyDir"]["sizeLimit"])  # without the PVC, SDXL lands here
        requested = gib(container["resources"]["requests"]["ephemeral-storage"])
        assert requested >= need, f"{name}/{group}: {requested} GiB requested, emptyDirs may hold {need} GiB"


def gib(quantity: str) -> float:
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    for suffix, factor in units.items():
        if str(quantity).endswith(suffix):
            return float(str(quantity)[: -len(suffix)]) * factor
    raise AssertionError(f"unexpected quantity {quantity}")

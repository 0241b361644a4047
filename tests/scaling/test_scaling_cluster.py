"""The autoscaled endpoint on a multi-node Ray cluster simulated on this machine (bench/scaling.py): a head,
Ray's v2 autoscaler with the fake multi-node provider adding and removing "face" and "GPU" worker nodes, and
the app's own deployments with serve/production.yaml's Generator autoscaling, delays divided by 60.

Each scenario runs the benchmark script in its own process (its own Ray cluster, apart from the one other
test files keep in this process) and checks what it recorded. Bounded: every wait in the script has a
timeout, every client a deadline past the service's own (a request the service never ends shows as lost),
the process a timeout here, and the script checks that every process of its cluster is gone at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.serve

ROOT = Path(__file__).resolve().parents[2]
TIME_SCALE = 60  # upscale 30 s -> 0.5 s, downscale 600 s -> 10 s, node idle 300 s -> 5 s
REQUEST_TIMEOUT_S = 60


def run_scenario(name: str, tmp_path: Path, tiny: Path, *extra: str, timeout_s: float,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> dict:
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "scaling.py"), "--scenario", name, "--out", str(out),
           "--tiny", str(tiny), "--time-scale", str(TIME_SCALE), "--request-timeout", str(request_timeout_s),
           "--steps", "1", "--gpu-nodes", "2", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    autoscaler = "".join(log.read_text()[-3000:] for log in sorted(out.glob("autoscaler-*monitor.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:] + autoscaler
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes_left"] == 0, "processes of the simulated cluster left running"
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / f"{name}.json").read_text())
    print(f"\n{name}: {json.dumps(summary['results'][name])}")
    return result


def _clean(summary: dict, ok=(200,)) -> None:
    """Every request ended: success, 503 with Retry-After, or (a request that waited for a replacement replica
    and did not get one in time) 504 at its deadline; none lost, none past the deadline."""
    assert summary["lost"] == 0, summary
    assert set(summary["statuses"]) <= {str(s) for s in ok} | {"503", "504"}, summary
    assert summary["refusals_without_retry_after"] == 0, summary
    assert set(summary["codes"]) <= {"503 unavailable", "503 queue_full", "504 timeout"}, summary
    assert summary["max_latency_s"] is None or summary["max_latency_s"] <= REQUEST_TIMEOUT_S + 2, summary


def _most(result: dict, key: str) -> int:
    return max(s[key] for s in result["timeline"] if "error" not in s)


def test_scale_from_zero_first_request_waits_for_a_node_and_succeeds(tmp_path, tiny_bundle):
    # the deadline covers a cold start, as production's 300 s does (here: up to ~50 s on a loaded machine)
    deadline_s = 2 * REQUEST_TIMEOUT_S
    result = run_scenario("scale_from_zero", tmp_path, tiny_bundle, timeout_s=360, request_timeout_s=deadline_s)
    # no 503 while a GPU node and a replica came up: the one request waited and got its image
    logs = "".join(log.read_text()[-4000:] for log in (tmp_path / "out").glob("autoscaler-*monitor.log"))
    assert result["first_status"] == 200, (result["outcomes"], result["timeline"], logs)
    assert result["time_to_first_image_s"] < deadline_s
    first = next(s for s in result["timeline"] if "error" not in s)
    assert first["gpu_nodes"] == 0 and first["generators_running"] == 0, first
    assert _most(result, "gpu_nodes") == 1 and _most(result, "generators_running") == 1


def test_load_ramp_scales_replicas_and_gpu_nodes_up_then_down(tmp_path, tiny_bundle):
    # 12 clients ask for 3 replicas at target_ongoing_requests 4 (capped at 2): the load still asks for 2 when
    # a loaded machine keeps half of each request's time in the Ingress (6 clients did not; Serve then began
    # its downscale delay before the load stopped, and CI saw the scale-down 5.6 s after it)
    result = run_scenario("scale_up_down", tmp_path, tiny_bundle, "--ramp", "3:1,5:12", "--hold-until-replicas", "2",
                          timeout_s=480)
    _clean(result["summary"])
    assert result["summary"]["statuses"].get("200", 0) > 10
    # up: a second replica needed a second GPU node, and both came
    assert _most(result, "generators_running") == 2 and _most(result, "gpu_nodes") == 2
    # down: not before Serve's (scaled) downscale delay; then the idle GPU node went too
    assert result["scaled_down_after_s"] >= result["downscale_delay_s"]
    assert result["final_nodes"] == {"face": 1, "gpu": 1}


def test_node_loss_face_node_loss_and_controller_restart(tmp_path, tiny_bundle):
    result = run_scenario("node_loss", tmp_path, tiny_bundle, "--loss-clients", "2", "--loss-phase-s", "6",
                          timeout_s=540)
    phases = result["phases"]
    assert result["killed_processes"] >= 2  # the raylet and at least the replica's worker
    _clean(phases["gpu_node"])
    _clean(phases["face_node"], ok=(201,))
    # the data plane does not need the controller: nothing refused while it restarted
    assert set(phases["controller"]["statuses"]) == {"200"}, phases["controller"]
    _clean(phases["controller"])
    # whole again: consecutive requests succeed on the replaced replica, node and controller
    assert [o["status"] for o in result["after"]] == [200, 200, 200, 201], result["after"]
    assert result["final_nodes"] == {"face": 1, "gpu": 2}


def test_head_recovery_gcs_restart_with_external_redis(tmp_path, tiny_bundle):
    import shutil

    if not shutil.which("redis-server"):
        pytest.skip("redis-server not installed (Debian: apt-get install redis-server)")
    result = run_scenario("head_recovery", tmp_path, tiny_bundle, "--gcs-down", "8", timeout_s=360)
    phases = result["phases"]
    # serving never needed the GCS: requests in flight or sent while it was down were answered
    for phase in ("before", "gcs_down", "after"):
        _clean(phases[phase])
    assert phases["gcs_down"]["statuses"].get("200", 0) >= 1, phases["gcs_down"]
    assert set(phases["after"]["statuses"]) == {"200"}, phases["after"]
    # the restarted GCS reloaded the cluster from Redis: the same replicas, nothing redeployed
    assert result["same_replicas"], (result["replicas_before"], result["replicas_after"])
    assert result["status_back_s"] < 60

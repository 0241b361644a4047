"""Autoscaling on a multi-node Ray cluster simulated on one machine: scale up/down, from zero, node loss, and
head recovery (GCS restart with its tables in Redis). Figures and plots: docs/scaling.md.

    .venv/bin/python bench/scaling.py --out /tmp/scaling                           # every scenario, plots + JSON
    .venv/bin/python bench/scaling.py --scenario scale_from_zero --out /tmp/scaling  # one scenario

The cluster is what KubeRay runs, shrunk onto one machine (docs/scaling.md):

- a head node (GCS, Serve controller, HAProxy ingress, the Ingress replica) started here;
- Ray's autoscaler (v2, the one KubeRay's in-tree autoscaling runs) with Ray's fake multi-node provider,
  which launches and removes worker "nodes" (a raylet and its agents, local processes) when the autoscaler
  asks, instead of pods: a ``face`` group (the chart's CPU group: custom resource ``cpu_pool``, FaceAnalyzer)
  and a ``gpu`` group (the chart's generator group: ``GPU`` 1 per node, Generator ``num_gpus: 1``);
- the app's own deployments (``deployments.app.bind``) on the tiny random-weight bundle (64x64, 1-2 steps),
  with serve/production.yaml's Generator settings, its delays divided by ``time_scale``.

Nothing here listens beyond 127.0.0.1 (Ray's node address is forced to loopback) and every process the
cluster starts is stopped by ``SimCluster.stop`` (by pid: the processes whose command line names the
cluster's private temp directory). ``ray.cluster_utils.AutoscalingCluster`` is not used: it runs
``ray stop --force`` (every Ray process of the machine) and needs a config file its wheel does not ship.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from deployments.ray_env import free_port

ROOT = Path(__file__).resolve().parents[1]
APP = "instantid"
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's head id (ray.autoscaler._private.fake_multi_node)
HEAD_TYPE = "ray.head.default"
FACE_GROUP, GPU_GROUP = "face", "gpu"
FACE_RESOURCE = "cpu_pool"  # helm values faceWorker.customResource.name

# The autoscaler's monitor as Ray starts it, with the fake provider's defaults pointed at our own file
# (the wheel lacks fake_multi_node/example.yaml).
_MONITOR = ("import sys, runpy, ray.autoscaler._private.providers as p; path = sys.argv.pop(1); "
            "p._DEFAULT_CONFIGS['fake_multinode'] = lambda: path; sys.argv[0] = 'monitor'; "
            "runpy.run_module('ray.autoscaler.v2.monitor', run_name='__main__')")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def wait_for(predicate, timeout_s: float, what: str, period_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(period_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


# ----------------------------------------------------------------------------------------------- settings

def production_deployments() -> dict[str, dict]:
    """serve/production.yaml's deployments section, by name (the one place the production values live)."""
    import yaml

    config = yaml.safe_load((ROOT / "serve" / "production.yaml").read_text())
    app = next(a for a in config["applications"] if a["name"] == APP)
    return {d["name"]: d for d in app["deployments"]}


def generator_options(time_scale: float, max_replicas: int, min_replicas: int | None = None,
                      num_cpus: float = 0.5) -> dict:
    """The production Generator settings on the simulated cluster: autoscaling delays divided by
    ``time_scale``, ``max_replicas`` capped to the simulated GPU group, a fraction of a CPU per replica
    (the real one asks 4 CPUs + 1 GPU; here 1 GPU "node" is 1 logical CPU + 1 GPU)."""
    prod = production_deployments()["Generator"]
    auto = dict(prod["autoscaling_config"])
    auto["upscale_delay_s"] = auto["upscale_delay_s"] / time_scale
    auto["downscale_delay_s"] = auto["downscale_delay_s"] / time_scale
    auto["max_replicas"] = min(auto["max_replicas"], max_replicas)
    if min_replicas is not None:
        auto["min_replicas"] = min_replicas
        auto["initial_replicas"] = min_replicas
    # Serve reads the autoscaling metrics this often; the defaults (10 s look-back) suit minutes, not seconds
    auto["metrics_interval_s"] = min(10.0, max(0.5, 10.0 / time_scale))
    auto["look_back_period_s"] = min(30.0, max(1.0, 30.0 / time_scale))
    return {
        "max_ongoing_requests": prod["max_ongoing_requests"],
        "max_queued_requests": prod["max_queued_requests"],
        "autoscaling_config": auto,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": prod["ray_actor_options"]["num_gpus"]},
        "health_check_period_s": 1,
        "health_check_timeout_s": prod["health_check_timeout_s"],
        "graceful_shutdown_timeout_s": 5,
    }


def app_options(time_scale: float, max_gpu_nodes: int, min_generators: int | None = None) -> dict[str, dict]:
    return {
        # on the head: the one HTTP entry of the simulated cluster (proxy_location HeadOnly, see docs)
        "Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}, "graceful_shutdown_timeout_s": 5},
        "FaceAnalyzer": {"num_replicas": 1, "health_check_period_s": 1, "graceful_shutdown_timeout_s": 5,
                         "ray_actor_options": {"num_cpus": 0.25, "resources": {FACE_RESOURCE: 1}}},
        "Generator": generator_options(time_scale, max_gpu_nodes, min_generators),
    }


def tiny_app_args(tiny: Path, identity_dir: Path, request_timeout_s: float) -> dict:
    return {
        "profile": "tiny", "tiny_dir": str(tiny),
        "models": [{"name": "tiny", "base_model": str(tiny / "sdxl")}],
        "device": "cpu", "max_models_per_replica": 1,
        "batch": {"max_batch_size": 4, "batch_wait_timeout_s": 0.0},
        "identity_store": str(identity_dir),
        "request_timeout_s": request_timeout_s,
    }


# ----------------------------------------------------------------------------------------------- cluster

@dataclass
class SimCluster:
    """A head node here plus the v2 autoscaler with the fake multi-node provider (worker nodes on demand)."""

    max_gpu_nodes: int = 2
    gpu_node_cpus: float = 1
    face_nodes: int = 1
    face_node_cpus: float = 1
    idle_timeout_s: float = 10.0
    head_cpus: float = 1
    # host:port of an external Redis: the GCS keeps its tables there (KubeRay gcsFaultToleranceOptions), so
    # it can be restarted without losing the cluster
    redis_address: str = ""
    # where the autoscaler's log is copied at stop (the cluster's own directory is removed)
    keep_logs_in: Path | None = None
    # more environment for every process of the cluster, over LOCAL_ENV and the private HAProxy setup (the
    # rehearsal passes the chart's rendered pod environment here)
    env: dict[str, str] = field(default_factory=dict)
    temp_dir: str = ""
    gcs_address: str = ""
    http_url: str = ""
    _head: object = None
    _monitor: subprocess.Popen | None = None
    _haproxy_dir: Path | None = None
    _saved_env: dict = field(default_factory=dict)

    def _set_env(self, **values: str) -> None:
        for key, value in values.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def start(self) -> "SimCluster":
        from deployments.ray_env import LOCAL_ENV, private_haproxy_env

        # a short private directory: Ray's socket paths must stay under 108 characters
        self.temp_dir = tempfile.mkdtemp(prefix="rsim-", dir="/tmp")
        haproxy_env, self._haproxy_dir = private_haproxy_env()
        # inherited by every process of the cluster (the monitor starts the worker nodes):
        self._set_env(
            RAY_FAKE_CLUSTER="1", RAY_enable_autoscaler_v2="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # node address 127.0.0.1
            RAY_metrics_report_interval_ms="1000", **{**LOCAL_ENV, **haproxy_env, **self.env},
        )
        try:
            self._start_head()
            self._start_monitor()
            self._start_serve()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_head(self) -> None:
        import ray._private.node
        import ray._private.parameter

        # the head is the fake provider's head instance (id and type), as a KubeRay head pod is to its operator
        head_ids = {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID, "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                    "RAY_NODE_TYPE_NAME": HEAD_TYPE}
        if self.redis_address:
            head_ids["RAY_REDIS_ADDRESS"] = self.redis_address  # what KubeRay sets on the head for GCS FT
        os.environ.update(head_ids)
        try:
            params = ray._private.parameter.RayParams(
                num_cpus=self.head_cpus, num_gpus=0, temp_dir=self.temp_dir, node_ip_address="127.0.0.1",
                gcs_server_port=free_port(), dashboard_port=free_port(), include_dashboard=False,
                no_monitor=True, min_worker_port=0, max_worker_port=0, object_store_memory=100 * 2**20,
                # node death seen in ~3 s instead of ~15-30 s (a deleted pod's raylet stops answering the same way)
                _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
            )
            self._head = ray._private.node.Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)
        finally:
            for key in head_ids:
                os.environ.pop(key, None)
        self.gcs_address = self._head.gcs_address

    def autoscaler_config(self) -> dict:
        node_types = {
            HEAD_TYPE: {"resources": {"CPU": self.head_cpus}, "node_config": {}, "max_workers": 0},
            FACE_GROUP: {"resources": {"CPU": self.face_node_cpus, FACE_RESOURCE: 1000}, "node_config": {},
                         "min_workers": self.face_nodes, "max_workers": max(1, self.face_nodes)},
            GPU_GROUP: {"resources": {"CPU": self.gpu_node_cpus, "GPU": 1}, "node_config": {},
                        "min_workers": 0, "max_workers": self.max_gpu_nodes},
        }
        return {
            "cluster_name": os.path.basename(self.temp_dir), "max_workers": self.max_gpu_nodes + self.face_nodes,
            "upscaling_speed": 1.0, "idle_timeout_minutes": self.idle_timeout_s / 60,
            # disable_node_updaters, as KubeRay's provider config has it: a node starts Ray itself. Without it
            # the v2 reconciler tries to install Ray on a node that has not registered yet, the fake provider
            # refuses, and after a few tries the node is terminated: on a loaded machine the GPU node of a
            # scale-from-zero was killed that way before its raylet registered (seen in a test run).
            "provider": {"type": "fake_multinode", "gcs_address": self.gcs_address, "launch_multiple": True,
                         "head_node_id": FAKE_HEAD_NODE_ID, "disable_node_updaters": True},
            "auth": {"ssh_user": "ray"}, "docker": {}, "available_node_types": node_types,
            "head_node_type": HEAD_TYPE, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }

    def _start_monitor(self) -> None:
        config = Path(self.temp_dir) / "autoscaler.json"
        config.write_text(json.dumps(self.autoscaler_config()))
        logs = Path(self._head.get_session_dir_path()) / "logs"
        self._monitor = subprocess.Popen(
            [sys.executable, "-c", _MONITOR, str(config), "--gcs-address", self.gcs_address,
             "--autoscaling-config", str(config), "--logs-dir", str(logs)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def _start_serve(self) -> None:
        import ray
        from ray import serve

        ray.init(address=self.gcs_address, _node_ip_address="127.0.0.1", log_to_driver=False)
        port = free_port()
        # one machine: proxies on every node would all want the same port, so HTTP enters on the head only
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        self.http_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: len(self.nodes(FACE_GROUP)) >= self.face_nodes, 120, "the face group's nodes")

    # ----- observation

    def nodes(self, group: str | None = None) -> list[dict]:
        """Alive nodes (ray.nodes() records) of a group: face, gpu or head."""
        import ray

        def group_of(node: dict) -> str:
            res = node["Resources"]
            return GPU_GROUP if res.get("GPU") else FACE_GROUP if res.get(FACE_RESOURCE) else "head"

        return [n for n in ray.nodes() if n["Alive"] and (group is None or group_of(n) == group)]

    def replicas(self, deployment: str) -> dict[str, int]:
        """Replicas by state; raises LookupError while Serve reports no such deployment (e.g. while its
        controller restarts)."""
        from ray import serve

        status = serve.status().applications[APP].deployments[deployment]
        return {str(getattr(k, "value", k)): v for k, v in status.replica_states.items()}

    def replica_nodes(self, deployment: str) -> dict[str, str]:
        """Running replica actor name -> node id."""
        import ray

        prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
        # the GCS's actor table (no dashboard needed)
        return {a["Name"]: a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                if a["State"] == "ALIVE" and a.get("Name", "").startswith(prefix)}

    # ----- faults

    def _pids(self, needle: str | None = None) -> list[int]:
        """Processes of this cluster (their command line names its temp directory), optionally only those
        whose command line also contains ``needle``."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if self.temp_dir and self.temp_dir in cmdline and (needle is None or needle in cmdline):
                pids.append(int(entry.name))
        return pids

    def kill_node(self, node_id: str) -> int:
        """SIGKILL a worker node: its raylet and every process under it (agents, workers, replicas), as when
        its machine is lost. Returns how many processes were killed."""
        import ray

        assert node_id != FAKE_HEAD_NODE_ID, "the head is not a worker node"
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        raylets = self._pids(f"--raylet_socket_name={node['RayletSocketName']} ")
        assert len(raylets) == 1, raylets
        return _kill_trees(raylets)

    def restart_gcs(self, down_s: float) -> None:
        """Kill the head's GCS server, leave it down ``down_s`` seconds, start it again on the same port (a
        restarted head pod; with an external Redis it reloads the cluster's tables from there)."""
        self._head.kill_gcs_server()
        time.sleep(down_s)
        self._head.start_gcs_server()

    def restart_controller(self) -> None:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        ray.kill(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE), no_restart=False)

    # ----- teardown

    def stop(self) -> None:
        import ray

        try:
            if ray.is_initialized():
                from ray import serve

                try:
                    serve.shutdown()
                except Exception:
                    pass
                ray.shutdown()
        finally:
            if self._monitor is not None:
                self._monitor.kill()
                self._monitor.wait(10)
            # the worker nodes belong to the monitor's provider (no reaper): stop everything of this cluster
            for _ in range(3):
                _kill_trees(self._pids())
                if not self._pids():
                    break
                time.sleep(0.5)
            if self._head is not None:
                self._head.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
            import shutil

            if self.keep_logs_in is not None:
                for log in Path(self.temp_dir).glob("session_*/logs/monitor.*"):
                    self.keep_logs_in.mkdir(parents=True, exist_ok=True)
                    shutil.copy(log, self.keep_logs_in / f"autoscaler-{os.path.basename(self.temp_dir)}-{log.name}")
            if self._haproxy_dir is not None:
                shutil.rmtree(self._haproxy_dir, ignore_errors=True)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def __enter__(self) -> "SimCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_trees(roots: list[int]) -> int:
    """SIGKILL processes and all their descendants (Ray's workers rename themselves, so their command lines
    no longer name the cluster; they are found as children of their raylet)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(tree)


# ----------------------------------------------------------------------------------------------- load

@dataclass
class Outcome:
    start: float  # seconds since the scenario's t0
    end: float
    status: int | str  # HTTP status, or "lost" (client timeout / transport error)
    retry_after: str | None = None
    code: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start


class ClosedLoopLoad:
    """``concurrency`` clients, each sending its request again as soon as it is answered, after waiting out a
    refusal's ``Retry-After`` (httpx, threads).
    ``set(n)`` changes how many are active; the others idle. Every answer is kept as an ``Outcome``."""

    def __init__(self, url: str, path: str, body: dict, timeout_s: float, t0: float, max_clients: int = 16,
                 max_requests: int | None = None):
        self.url, self.path, self.body, self.timeout_s, self.t0 = url, path, body, timeout_s, t0
        self.max_requests = max_requests
        self.outcomes: list[Outcome] = []
        self.active = 0
        self.in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(max_clients)]
        for thread in self._threads:
            thread.start()

    def set(self, clients: int) -> None:
        self.active = clients

    def _client(self, index: int) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                if index >= self.active:
                    time.sleep(0.05)
                    continue
                with self._lock:
                    if self.max_requests is not None and len(self.outcomes) + self.in_flight >= self.max_requests:
                        self.active = 0
                        continue
                    self.in_flight += 1
                outcome = request_once(client, self.path, self.body, self.t0)
                self.outcomes.append(outcome)
                with self._lock:
                    self.in_flight -= 1
                if outcome.retry_after:  # a well-behaved client backs off as told (capped: the run is short)
                    self._stop.wait(min(float(outcome.retry_after), 5.0))

    def close(self, timeout_s: float | None = None) -> None:
        """Stop sending; wait for the answers in flight (bounded by the client timeout)."""
        self.active = 0
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s if timeout_s is not None else self.timeout_s + 5)


def request_once(client, path: str, body: dict, t0: float) -> Outcome:
    import httpx

    start = time.monotonic() - t0
    try:
        resp = client.post(path, json=body)
        code = None
        if resp.status_code >= 400:
            try:
                code = resp.json()["error"]["code"]
            except Exception:
                code = "not-json"
        return Outcome(start, time.monotonic() - t0, resp.status_code, resp.headers.get("retry-after"), code)
    except httpx.HTTPError as exc:
        return Outcome(start, time.monotonic() - t0, "lost", None, type(exc).__name__)


class Timeline:
    """Samples the cluster every ``period_s``: replicas by state, nodes by group, requests in flight, and the
    p50/p95 latency of the answers of the last ``window_s``."""

    def __init__(self, cluster: SimCluster, t0: float, period_s: float = 1.0, window_s: float = 5.0):
        self.cluster, self.t0, self.period_s, self.window_s = cluster, t0, period_s, window_s
        self.samples: list[dict] = []
        self.events: list[tuple[float, str]] = []
        self.loads: list[ClosedLoopLoad] = []
        self.extra = None  # a callable adding fields to each sample (the job queue, for jobs_backlog)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, what: str) -> None:
        self.events.append((round(self.now(), 2), what))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # a sample during a controller restart may fail; keep the gap visible
                self.samples.append({"t": round(self.now(), 2), "error": type(exc).__name__})

    def sample(self) -> dict:
        t = self.now()
        recent = [o.latency for load in self.loads for o in list(load.outcomes)
                  if o.status == 200 and t - self.window_s <= o.end <= t]
        generators = self.cluster.replicas("Generator")
        return {
            "t": round(t, 2),
            "generators_running": generators.get("RUNNING", 0),
            "generators_starting": sum(v for k, v in generators.items() if k in ("STARTING", "PENDING_MIGRATION")),
            "face_analyzers_running": self.cluster.replicas("FaceAnalyzer").get("RUNNING", 0),
            "gpu_nodes": len(self.cluster.nodes(GPU_GROUP)),
            "face_nodes": len(self.cluster.nodes(FACE_GROUP)),
            "in_flight": sum(load.in_flight for load in self.loads),
            "p50_s": percentile(recent, 50), "p95_s": percentile(recent, 95),
            **(self.extra() if self.extra else {}),
        }

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def summarize(outcomes: list[Outcome]) -> dict:
    statuses = Counter(str(o.status) for o in outcomes)
    ok = [o.latency for o in outcomes if o.status == 200]
    return {
        "requests": len(outcomes), "statuses": dict(statuses),
        "codes": dict(Counter(f"{o.status} {o.code}" for o in outcomes if o.status not in (200, 201))),
        "refusals_without_retry_after": sum(1 for o in outcomes if o.status in (429, 503) and not o.retry_after),
        "lost": statuses.get("lost", 0),
        "p50_s": percentile(ok, 50), "p95_s": percentile(ok, 95),
        "max_latency_s": max((o.latency for o in outcomes), default=None),
    }


# ----------------------------------------------------------------------------------------------- scenarios

@dataclass
class Scenario:
    """One deployed app on the cluster and what was seen while it ran."""

    cluster: SimCluster
    tiny: Path
    work: Path
    time_scale: float
    request_timeout_s: float = 60.0
    steps: int = 2
    size: int = 64
    t0: float = field(default_factory=time.monotonic)
    timeline: Timeline | None = None

    def deploy(self, min_generators: int | None = None, **app_args) -> None:
        from ray import serve

        from deployments.app import bind
        from deployments.tiny_profile import resolve_args

        identity_dir = self.work / "identities"
        identity_dir.mkdir(parents=True, exist_ok=True)
        args = {**tiny_app_args(self.tiny, identity_dir, self.request_timeout_s), **app_args}
        app = bind(resolve_args(args), app_options(self.time_scale, self.cluster.max_gpu_nodes, min_generators))
        serve.run(app, name=APP, route_prefix="/", blocking=False)
        wait_for(lambda: _app_running(), 300, "the app to be RUNNING")
        self.t0 = time.monotonic()
        self.timeline = Timeline(self.cluster, self.t0)

    def identity(self) -> str:
        import httpx

        face = Path(__import__("insightface").__file__).parent / "data" / "images" / "t1.jpg"
        resp = httpx.post(self.cluster.http_url + "/v1/identities", timeout=self.request_timeout_s,
                          json={"face_images": [base64.b64encode(face.read_bytes()).decode()]})
        assert resp.status_code == 201, resp.text
        return resp.json()["identity_id"]

    def generate_body(self, identity: str) -> dict:
        return {"identity_id": identity, "width": self.size, "height": self.size, "steps": self.steps, "seed": 7}

    def load(self, path: str, body: dict, max_clients: int = 16, max_requests: int | None = None) -> ClosedLoopLoad:
        # a client waits past the service's own deadline, so a request the service fails to end shows as lost
        load = ClosedLoopLoad(self.cluster.http_url, path, body, self.request_timeout_s + 15, self.t0, max_clients,
                              max_requests)
        self.timeline.loads.append(load)
        return load

    def finish(self, name: str, **extra) -> dict:
        from ray import serve

        self.timeline.close()
        self.timeline.samples.append(self.timeline.sample())  # the state at the end, whatever the period
        outcomes = sorted((o for load in self.timeline.loads for o in load.outcomes), key=lambda o: o.start)
        result = {
            "scenario": name, "time_scale": self.time_scale, "request_timeout_s": self.request_timeout_s,
            "summary": summarize(outcomes), "events": self.timeline.events, "timeline": self.timeline.samples,
            "outcomes": [o.__dict__ for o in outcomes], **extra,
        }
        serve.delete(APP)
        return result


def _app_running() -> bool:
    from ray import serve

    app = serve.status().applications.get(APP)
    return app is not None and str(getattr(app.status, "value", app.status)) == "RUNNING"


def scale_up_down(sc: Scenario, ramp: list[tuple[float, int]], settle_timeout_s: float = 180,
                  hold_until_replicas: int | None = None, hold_timeout_s: float = 150) -> dict:
    """A load ramp (seconds, clients) drives Generator replicas and GPU nodes up; after it stops, both come
    back down to the minimum after the scaled downscale delay and node idle timeout. With
    ``hold_until_replicas``, the last stage lasts until that many replicas run (at most ``hold_timeout_s``
    more): on a busy machine a replica's start on a fresh node takes from seconds to a minute."""
    sc.deploy()
    body = sc.generate_body(sc.identity())
    load = sc.load("/v1/generate", body, max_clients=max(c for _, c in ramp))
    for seconds, clients in ramp:
        sc.timeline.event(f"{clients} clients")
        load.set(clients)
        time.sleep(seconds)
    if hold_until_replicas:
        try:
            wait_for(lambda: sc.cluster.replicas("Generator").get("RUNNING", 0) >= hold_until_replicas,
                     hold_timeout_s, f"{hold_until_replicas} Generator replicas under load")
            sc.timeline.event(f"{hold_until_replicas} replicas running")
            time.sleep(3)  # a few answers from both
        except TimeoutError:  # recorded, not raised: the timeline shows how far it got (the test checks)
            sc.timeline.event(f"{hold_until_replicas} replicas not running after {hold_timeout_s:g} s more")
    load.close()
    sc.timeline.event("load stopped")
    stopped = sc.timeline.now()
    minimum = production_deployments()["Generator"]["autoscaling_config"]["min_replicas"]
    wait_for(lambda: sc.cluster.replicas("Generator").get("RUNNING", 0) == minimum
             and len(sc.cluster.nodes(GPU_GROUP)) == minimum, settle_timeout_s, "scale down to the minimum")
    sc.timeline.event("back at the minimum")
    downscale_delay_s = generator_options(sc.time_scale, 1)["autoscaling_config"]["downscale_delay_s"]
    return sc.finish("scale_up_down", ramp=ramp, downscale_delay_s=downscale_delay_s,
                     node_idle_timeout_s=sc.cluster.idle_timeout_s, scaled_down_after_s=round(sc.timeline.now() - stopped, 1),
                     generator_min_replicas=minimum)


def scale_from_zero(sc: Scenario, idle_timeout_s: float = 120) -> dict:
    """Generator at zero replicas and no GPU node: the first request waits for a node and a replica."""
    wait_for(lambda: not sc.cluster.nodes(GPU_GROUP), idle_timeout_s, "no GPU node")
    sc.deploy(min_generators=0)
    body = sc.generate_body(sc.identity())
    assert not sc.cluster.nodes(GPU_GROUP) and not sc.cluster.replicas("Generator").get("RUNNING")
    sc.timeline.event("first request")
    load = sc.load("/v1/generate", body, max_clients=1, max_requests=1)
    load.set(1)
    wait_for(lambda: load.outcomes, sc.request_timeout_s + 20, "the first answer", period_s=0.2)
    load.close()
    first = load.outcomes[0]
    sc.timeline.event(f"first answer {first.status}")
    time.sleep(3)  # a few samples of the state it left
    return sc.finish("scale_from_zero", time_to_first_image_s=round(first.latency, 2),
                     first_status=first.status)


def node_loss(sc: Scenario, clients: int = 4, before_s: float = 8, after_s: float = 20,
              recover_timeout_s: float = 180) -> dict:
    """Kill the GPU node of one Generator replica under load; then the FaceAnalyzer's node under identity
    writes; then restart the Serve controller under load. Every request must end (200, or 503 with
    Retry-After), and the service must come back whole."""
    gpus = sc.cluster.max_gpu_nodes
    sc.deploy(min_generators=gpus)
    wait_for(lambda: sc.cluster.replicas("Generator").get("RUNNING", 0) == gpus, recover_timeout_s,
             "every Generator replica")
    identity = sc.identity()
    generate = sc.load("/v1/generate", sc.generate_body(identity), max_clients=clients)
    generate.set(clients)
    time.sleep(before_s)

    # 1. a GPU node holding a Generator replica
    victim_replica, victim_node = sorted(sc.cluster.replica_nodes("Generator").items())[0]
    killed = sc.cluster.kill_node(victim_node)
    sc.timeline.event("GPU node killed")
    gpu_killed_at = sc.timeline.now()
    time.sleep(after_s)
    wait_for(lambda: sc.cluster.replicas("Generator").get("RUNNING", 0) == gpus
             and victim_node not in sc.cluster.replica_nodes("Generator").values()
             and len(sc.cluster.nodes(GPU_GROUP)) == gpus, recover_timeout_s, "a replacement node and replica")
    gpu_recovered_s = sc.timeline.now() - gpu_killed_at
    sc.timeline.event("Generator whole again")

    # 2. the face node (FaceAnalyzer) under identity writes
    face_body = {"face_images": [base64.b64encode(
        (Path(__import__("insightface").__file__).parent / "data" / "images" / "t1.jpg").read_bytes()).decode()]}
    faces = sc.load("/v1/identities", face_body, max_clients=2)
    faces.set(2)
    time.sleep(before_s / 2)
    face_node = next(iter(sc.cluster.replica_nodes("FaceAnalyzer").values()))
    sc.cluster.kill_node(face_node)
    sc.timeline.event("face node killed")
    face_killed_at = sc.timeline.now()
    wait_for(lambda: sc.cluster.replicas("FaceAnalyzer").get("RUNNING", 0) == 1
             and face_node not in sc.cluster.replica_nodes("FaceAnalyzer").values(), recover_timeout_s,
             "a replacement face node and FaceAnalyzer")
    face_recovered_s = sc.timeline.now() - face_killed_at
    sc.timeline.event("FaceAnalyzer whole again")
    time.sleep(before_s / 2)
    faces.close()

    # 3. the Serve controller (restarted by Ray; replicas and proxies keep serving meanwhile)
    controller_at = sc.timeline.now()
    sc.cluster.restart_controller()
    sc.timeline.event("controller killed")
    wait_for(lambda: _controller_answers(), recover_timeout_s, "the controller back")
    controller_recovered_s = sc.timeline.now() - controller_at
    sc.timeline.event("controller back")
    time.sleep(before_s)
    generate.close()
    sc.timeline.event("load stopped")

    # whole again: a few requests in a row all succeed
    import httpx

    with httpx.Client(base_url=sc.cluster.http_url, timeout=sc.request_timeout_s + 15) as client:
        after = [request_once(client, "/v1/generate", sc.generate_body(identity), sc.t0) for _ in range(3)]
        after.append(request_once(client, "/v1/identities", face_body, sc.t0))
    phases = {
        "gpu_node": [o for o in generate.outcomes if o.start < controller_at],
        "face_node": list(faces.outcomes),
        "controller": [o for o in generate.outcomes if o.start >= controller_at],
        "after": after,
    }
    return sc.finish("node_loss", killed_processes=killed, victim_replica=victim_replica,
                     gpu_recovered_s=round(gpu_recovered_s, 1), face_recovered_s=round(face_recovered_s, 1),
                     controller_recovered_s=round(controller_recovered_s, 1),
                     phases={k: summarize(v) for k, v in phases.items()},
                     after=[o.__dict__ for o in after])


def head_recovery(sc: Scenario, redis_address: str, clients: int = 2, phase_s: float = 6,
                  gcs_down_s: float = 10, recover_timeout_s: float = 120) -> dict:
    """GCS fault tolerance: with the GCS's tables in an external Redis, kill the GCS under load, keep it down
    ``gcs_down_s`` (less than the raylets' reconnect timeout, 60 s), start it again. Requests keep being
    served meanwhile (the data plane does not go through the GCS); afterwards the same replicas serve and
    Serve's control plane answers again."""
    assert sc.cluster.redis_address == redis_address, "the cluster must have been started with this Redis"
    sc.deploy(min_generators=1)
    wait_for(lambda: sc.cluster.replicas("Generator").get("RUNNING", 0) == 1, recover_timeout_s, "a Generator")
    identity = sc.identity()
    before = sorted(sc.cluster.replica_nodes("Generator")) + sorted(sc.cluster.replica_nodes("FaceAnalyzer"))
    load = sc.load("/v1/generate", sc.generate_body(identity), max_clients=clients)
    load.set(clients)
    time.sleep(phase_s)
    down_at = sc.timeline.now()
    sc.timeline.event("GCS killed")
    sc.cluster.restart_gcs(gcs_down_s)
    up_at = sc.timeline.now()
    sc.timeline.event("GCS started")
    wait_for(lambda: _controller_answers(), recover_timeout_s, "Serve's status after the GCS restart")
    sc.timeline.event("status answers")
    status_back_s = sc.timeline.now() - up_at
    time.sleep(phase_s)
    load.close()
    after = sorted(sc.cluster.replica_nodes("Generator")) + sorted(sc.cluster.replica_nodes("FaceAnalyzer"))
    phases = {"before": [o for o in load.outcomes if o.end < down_at],
              "gcs_down": [o for o in load.outcomes if o.end >= down_at and o.start <= up_at],
              "after": [o for o in load.outcomes if o.start > up_at]}
    return sc.finish("head_recovery", gcs_down_s=round(up_at - down_at, 1), status_back_s=round(status_back_s, 1),
                     same_replicas=before == after, replicas_before=before, replicas_after=after,
                     phases={k: summarize(v) for k, v in phases.items()})


class JobBatch:
    """``count`` jobs submitted to /v1/jobs at once, then polled until each has ended."""

    def __init__(self, sc: Scenario, body: dict, count: int):
        import httpx

        self.sc, self.started = sc, sc.timeline.now()
        self.ids, self.refused, self.ended = [], [], {}
        with httpx.Client(base_url=sc.cluster.http_url, timeout=sc.request_timeout_s) as client:
            for _ in range(count):
                resp = client.post("/v1/jobs", json=body)
                (self.ids.append(resp.json()["id"]) if resp.status_code == 202 else self.refused.append(
                    resp.status_code))
        self.submitted = sc.timeline.now()

    def poll(self) -> bool:
        """One look at every job not yet ended; True when all have."""
        import httpx

        with httpx.Client(base_url=self.sc.cluster.http_url, timeout=30) as client:
            for job_id in self.ids:
                if job_id in self.ended:
                    continue
                try:
                    job = client.get(f"/v1/jobs/{job_id}").json()
                except httpx.HTTPError:
                    continue  # the Ingress is being replaced: look again
                if job.get("status") in ("succeeded", "failed", "canceled"):
                    self.ended[job_id] = (self.sc.timeline.now(), job["status"])
        return len(self.ended) == len(self.ids)

    def drain(self, timeout_s: float, during=None) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.poll():
            if during is not None:
                during(self)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.ids) - len(self.ended)} jobs not ended after {timeout_s:g} s")
            time.sleep(0.5)

    def report(self) -> dict:
        ends = sorted(t for t, _ in self.ended.values())
        span = (ends[-1] - self.started) if ends else None
        return {"submitted": len(self.ids), "refused_at_submit": self.refused,
                "statuses": dict(Counter(status for _, status in self.ended.values())),
                "submit_s": round(self.submitted - self.started, 2),
                "drained_after_s": round(span, 2) if span else None,
                "images_per_min": round(len(ends) / span * 60, 1) if span else None}


def jobs_backlog(sc: Scenario, redis_url: str, jobs: int = 40, kill_jobs: int = 20, drain_timeout_s: float = 600,
                 idle_timeout_s: float = 240) -> dict:
    """Generator at 0 replicas, ``jobs`` jobs queued: the backlog policy (serve/production.yaml's
    ``autoscaling_config.policy``) brings replicas up to ``max_replicas``, the queue drains, replicas fall back
    to 0. With the replicas warm, the job path's images per minute against the sync path's (``jobs`` each, as
    many sync clients as the Generators batch); then ``kill_jobs`` more with the Ingress replica killed
    mid-drain: nothing may be lost."""
    import ray
    import redis as redis_py

    prefix = "instantid:"
    r = redis_py.from_url(redis_url)
    wait_for(lambda: not sc.cluster.nodes(GPU_GROUP), idle_timeout_s, "no GPU node")
    # one anonymous client submits them all: the per-key cap must let the whole batch in
    sc.deploy(min_generators=0, jobs={"redis_url": redis_url, "key_prefix": prefix, "lease_s": 3.0,
                                      "max_active_per_key": max(jobs, kill_jobs) + 8})
    sc.timeline.extra = lambda: {"queued": r.llen(prefix + "queue"), "jobs_running": r.llen(prefix + "running")}
    body = sc.generate_body(sc.identity())
    assert not sc.cluster.replicas("Generator").get("RUNNING")
    per_replica = production_deployments()["Generator"]["autoscaling_config"]["policy"]["policy_kwargs"][
        "per_replica"]
    maximum = sc.cluster.max_gpu_nodes

    sc.timeline.event(f"{jobs} jobs submitted")
    cold = JobBatch(sc, body, jobs)
    peak = {"replicas": 0}

    def watch(_batch):
        peak["replicas"] = max(peak["replicas"], sc.cluster.replicas("Generator").get("RUNNING", 0))
    cold.drain(drain_timeout_s, during=watch)
    sc.timeline.event("queue drained")

    sc.timeline.event(f"{jobs} jobs, replicas warm")
    warm = JobBatch(sc, body, jobs)
    warm.drain(drain_timeout_s)
    sc.timeline.event(f"{jobs} sync requests, {maximum * per_replica} clients")
    sync_started = sc.timeline.now()
    load = sc.load("/v1/generate", body, max_clients=maximum * per_replica, max_requests=jobs)
    load.set(maximum * per_replica)
    wait_for(lambda: len(load.outcomes) >= jobs, drain_timeout_s, "the sync requests", period_s=0.2)
    load.close()
    sync_ok = [o for o in load.outcomes if o.status == 200]
    sync_span = max(o.end for o in load.outcomes) - sync_started
    replicas_at_comparison = sc.cluster.replicas("Generator").get("RUNNING", 0)

    sc.timeline.event(f"{kill_jobs} jobs; the Ingress will be killed")
    killed = {"done": False}

    def kill_ingress(batch):
        if not killed["done"] and len(batch.ended) >= kill_jobs // 4:
            name = next(iter(sc.cluster.replica_nodes("Ingress")))
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            killed["done"] = True
            sc.timeline.event("Ingress replica killed")
    chaos = JobBatch(sc, body, kill_jobs)
    chaos.drain(drain_timeout_s, during=kill_ingress)
    sc.timeline.event("drained after the kill")
    drained_at = sc.timeline.now()
    wait_for(lambda: sc.cluster.replicas("Generator").get("RUNNING", 0) == 0, idle_timeout_s,
             "the Generator back at 0 replicas")
    sc.timeline.event("Generator at 0")
    zero_at = sc.timeline.now()
    r.close()
    job_rate, sync_rate = warm.report()["images_per_min"], round(len(sync_ok) / sync_span * 60, 1)
    return sc.finish("jobs_backlog", per_replica=per_replica, max_replicas=maximum, peak_replicas=peak["replicas"],
                     cold=cold.report(), warm_jobs=warm.report(),
                     sync={"requests": len(load.outcomes), "ok": len(sync_ok), "images_per_min": sync_rate},
                     replicas_at_comparison=replicas_at_comparison,
                     job_vs_sync=round(job_rate / sync_rate, 3) if job_rate and sync_rate else None,
                     ingress_killed=chaos.report(), killed=killed["done"],
                     back_to_zero_after_drain_s=round(zero_at - drained_at, 1))


class RedisServer:
    """A private redis-server on 127.0.0.1 (Debian's package), nothing saved to disk."""

    def __init__(self, work: Path):
        import shutil

        self.binary = shutil.which("redis-server")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.work = work
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "RedisServer":
        if not self.binary:
            raise FileNotFoundError("redis-server not found (Debian: apt-get install redis-server)")
        self.work.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.work)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            with socket.socket() as sock:
                sock.settimeout(0.5)
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(answers, 20, "redis-server to listen", period_s=0.1)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def _controller_answers() -> bool:
    from ray import serve

    try:
        return _app_running() and bool(serve.status().applications)
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------- report

def plot(result: dict, path: Path) -> Path:
    """Replicas and nodes (top) and p50/p95 latency with refusals (bottom) against time; events as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a failed sample (cluster state unreadable: the GCS or controller down) leaves a gap in the lines
    samples = result["timeline"]
    nan = float("nan")
    samples = [s if "error" not in s else {"t": s["t"], **{k: nan for k in (
        "generators_running", "generators_starting", "gpu_nodes", "face_nodes", "in_flight", "p50_s", "p95_s")}}
        for s in samples]
    gaps = [{"t": (a["t"] + b["t"]) / 2, **{k: nan for k in a if k != "t"}}
            for a, b in zip(samples, samples[1:]) if b["t"] - a["t"] > 3]  # a sample that hung, e.g. no GCS
    samples = sorted(samples + gaps, key=lambda s: s["t"])
    t = [s["t"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.step(t, [s["generators_running"] for s in samples], where="post", label="Generator replicas (running)")
    top.step(t, [s["generators_starting"] for s in samples], where="post", linestyle=":",
             label="Generator replicas (starting)")
    top.step(t, [s["gpu_nodes"] for s in samples], where="post", linestyle="--", label="GPU nodes")
    if result["scenario"] == "node_loss":
        top.step(t, [s["face_nodes"] for s in samples], where="post", linestyle="-.", label="face nodes")
    top.plot(t, [s["in_flight"] for s in samples], color="grey", alpha=0.6, label="requests in flight")
    top.set_ylabel("count")
    top.legend(loc="upper left", fontsize=8)
    bottom.plot(t, [nan if s["p95_s"] is None else s["p95_s"] for s in samples], label="p95 latency (last 5 s)")
    bottom.plot(t, [nan if s["p50_s"] is None else s["p50_s"] for s in samples], label="p50 latency (last 5 s)",
                alpha=0.7)
    served = [o for o in result["outcomes"] if o["status"] in (200, 201)]
    bottom.scatter([o["end"] for o in served], [o["end"] - o["start"] for o in served], s=4, color="grey",
                   alpha=0.5, label="each answer 200/201")
    refused = [o for o in result["outcomes"] if o["status"] not in (200, 201)]
    if refused:
        bottom.scatter([o["end"] for o in refused], [o["end"] - o["start"] for o in refused], marker="x",
                       color="red", label="503/504 (latency at answer)")
    for at, what in result["events"]:
        for axis in (top, bottom):
            axis.axvline(at, color="black", alpha=0.3, linewidth=0.8)
        top.annotate(what, (at, top.get_ylim()[1]), rotation=90, fontsize=7, va="top", ha="right")
    bottom.set_ylabel("seconds")
    bottom.set_xlabel(f"seconds (delays scaled 1/{result['time_scale']:g})")
    bottom.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{result['scenario']}: {result['summary']['statuses']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


SCENARIOS = ("scale_up_down", "scale_from_zero", "node_loss", "head_recovery", "jobs_backlog")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=SCENARIOS, action="append",
                        help="run only these (repeatable); default: all, in the order listed")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaling")
    parser.add_argument("--time-scale", type=float, default=30.0,
                        help="production autoscaling delays and the node idle timeout are divided by this")
    parser.add_argument("--gpu-nodes", type=int, default=2, help="most GPU nodes (the Generator's max_replicas)")
    parser.add_argument("--ramp", default="10:1,40:8,20:4",
                        help="scale_up_down load: seconds:clients,... (closed-loop clients)")
    parser.add_argument("--hold-until-replicas", type=int, default=None,
                        help="scale_up_down: keep the last load stage until this many Generator replicas run")
    parser.add_argument("--hold-timeout", type=float, default=240.0, help="... but at most this many seconds")
    parser.add_argument("--loss-clients", type=int, default=4, help="node_loss: closed-loop clients")
    parser.add_argument("--loss-phase-s", type=float, default=10.0,
                        help="node_loss: seconds of load before and after each fault")
    parser.add_argument("--gcs-down", type=float, default=10.0, help="head_recovery: seconds the GCS stays down")
    parser.add_argument("--request-timeout", type=float, default=90.0, help="the app's request_timeout_s")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=40, help="jobs_backlog: jobs queued at once")
    parser.add_argument("--tiny", type=Path, default=None, help="a tiny bundle (built under --out if absent)")
    args = parser.parse_args(argv)

    from instantid.tiny import make_tiny

    args.out.mkdir(parents=True, exist_ok=True)
    tiny = args.tiny or args.out / "tiny"
    if not (tiny / "sdxl").exists():
        make_tiny(tiny)
    ramp = [(float(s), int(c)) for s, c in (step.split(":") for step in args.ramp.split(","))]
    # a GPU node idles out after autoscaler.idleTimeoutSeconds (helm values) over the same time scale
    import yaml

    idle_s = yaml.safe_load((ROOT / "helm" / "instantid-serve" / "values.yaml").read_text())["autoscaler"][
        "idleTimeoutSeconds"] / args.time_scale
    report: dict = {"time_scale": args.time_scale, "gpu_nodes": args.gpu_nodes, "node_idle_timeout_s": idle_s,
                    "results": {}}
    names = args.scenario or list(SCENARIOS)
    report["processes_left"] = 0
    for name in names:
        if name == "head_recovery":
            # its own cluster: the head starts with its GCS tables in a private Redis
            with RedisServer(args.out / "redis") as redis:
                with SimCluster(max_gpu_nodes=1, idle_timeout_s=idle_s, redis_address=redis.address,
                                keep_logs_in=args.out) as cluster:
                    sc = Scenario(cluster, tiny, args.out / "work", args.time_scale, args.request_timeout, args.steps)
                    started = time.monotonic()
                    result = head_recovery(sc, redis.address, gcs_down_s=args.gcs_down)
                    _record(args.out, report, cluster, name, result, started)
                report["processes_left"] += len(cluster._pids())
    if "jobs_backlog" in names:
        # its own cluster: the Serve controller (the backlog policy) reads the queue from $INSTANTID_REDIS_URL,
        # which the head must have from its start, as the chart gives it to the head pod
        with RedisServer(args.out / "jobs-redis") as redis:
            url = f"redis://{redis.address}/0"
            saved, os.environ["INSTANTID_REDIS_URL"] = os.environ.get("INSTANTID_REDIS_URL"), url
            try:
                with SimCluster(max_gpu_nodes=args.gpu_nodes, idle_timeout_s=idle_s, keep_logs_in=args.out) as cluster:
                    sc = Scenario(cluster, tiny, args.out / "work", args.time_scale, args.request_timeout, args.steps)
                    started = time.monotonic()
                    result = jobs_backlog(sc, url, jobs=args.jobs, idle_timeout_s=idle_s + 240)
                    _record(args.out, report, cluster, "jobs_backlog", result, started)
                report["processes_left"] += len(cluster._pids())
            finally:
                os.environ.pop("INSTANTID_REDIS_URL") if saved is None else os.environ.update(
                    INSTANTID_REDIS_URL=saved)
    names = [n for n in names if n not in ("head_recovery", "jobs_backlog")]
    if not names:
        (args.out / "summary.json").write_text(json.dumps(report, indent=1))
        return report
    with SimCluster(max_gpu_nodes=args.gpu_nodes, idle_timeout_s=idle_s, keep_logs_in=args.out) as cluster:
        for name in names:
            started = time.monotonic()
            sc = Scenario(cluster, tiny, args.out / "work", args.time_scale, args.request_timeout, args.steps)
            if name == "scale_up_down":
                result = scale_up_down(sc, ramp, hold_until_replicas=args.hold_until_replicas,
                                       hold_timeout_s=args.hold_timeout)
            elif name == "scale_from_zero":
                result = scale_from_zero(sc, idle_timeout_s=idle_s + 120)
            else:
                result = node_loss(sc, clients=args.loss_clients, before_s=args.loss_phase_s,
                                   after_s=args.loss_phase_s)
            _record(args.out, report, cluster, name, result, started)
    report["processes_left"] += len(cluster._pids())  # after stop: must be 0
    (args.out / "summary.json").write_text(json.dumps(report, indent=1))
    return report


def _record(out: Path, report: dict, cluster: SimCluster, name: str, result: dict, started: float) -> None:
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["final_nodes"] = {g: len(cluster.nodes(g)) for g in (FACE_GROUP, GPU_GROUP)}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{name}.png")
    brief = {k: v for k, v in result.items() if k not in ("timeline", "outcomes", "after")}
    report["results"][name] = brief
    print(json.dumps(brief), flush=True)


if __name__ == "__main__":
    main()

"""Production, rehearsed: the chart's own serve config and pod environment, as `helm template` renders them
with the default values, run on the simulated multi-node cluster of bench/scaling.py. Figures: docs/scaling.md.

    .venv/bin/python bench/rehearsal.py --out /tmp/rehearsal                     # every scenario
    .venv/bin/python bench/rehearsal.py --out /tmp/rehearsal-cut --hard-stop 10 --scenario reload  # the cut

Real parts: the rendered ``serveConfigV2`` (deployments, replica counts, autoscaling, resources, limits, auth,
jobs settings, request timeout: as rendered), the union of the head, face and generator pods' rendered ``env``,
Ray's HAProxy ingress through deployments/haproxy_guard.py, 2 Ingress replicas (the rendered minimum), a real
``redis-server`` behind ``INSTANTID_REDIS_URL`` (the chart's secretKeyRef), API keys read from a mounted file
(``INSTANTID_API_KEY_HASHES_FILE``), the offline hub (``HF_HUB_OFFLINE=1``, an empty HF cache).

Changed, because this machine cannot have it (``CHANGES``, also in the JSON result and docs/scaling.md):

- weights: every hub reference of the rendered args (base model, InstantID, face pack, depth/pose
  preprocessors, safety checker) points at the tiny random bundle's directory of that layout, under the
  model-cache directory; ``device: cpu``, ``dtype: float32``; ``compile.enabled: false`` (inductor on CPU:
  minutes here);
- paths: the pods' ``/models`` (model-cache PVC) and ``/etc/instantid/api-keys`` (Secret volume) are local
  directories; the image's HAProxy launcher path is the private launcher of ray_env.private_haproxy_env;
- HTTP: ``proxy_location: HeadOnly`` on a free 127.0.0.1 port (every node of this machine would want port
  8000); ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=1`` (ray_env.LOCAL_ENV);
- nodes: fake ``GPU: 1`` on the GPU group; logical CPUs as the pods request (face 6, generator 8, head 0);
  one face node instead of the chart's two (both Ingress and both FaceAnalyzer replicas fit on one); at most
  one GPU node;
- the whole cluster shares one environment: the union of the three pods' rendered env (they agree where they
  overlap; the script refuses a conflict).

Every scenario is in one cluster; ``SimCluster.stop`` removes every process of it, the redis-server stops with
the script (also on SIGINT), and ``summary.json`` records how many processes were left (must be 0).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "helm"))

from scaling import RedisServer, SimCluster, _app_running, wait_for  # noqa: E402

from deployments.ray_env import HARD_STOP_ENV, haproxy_pids  # noqa: E402

API_KEY = "rehearsal-key-0123456789"
REDIS_SECRET = ("instantid-jobs-redis", "url")  # PLAIN_VALUES' jobs.redis.existingSecret, key "url"
CHANGES = [
    "weights: hub references -> tiny random bundle directories of the same layout (base model, InstantID, "
    "face pack, depth/pose preprocessors, safety checker); device cpu, dtype float32; compile.enabled false",
    "paths: /models (model-cache PVC) and /etc/instantid/api-keys (Secret volume) -> local directories; the "
    "image's HAProxy launcher -> ray_env's private launcher (same guard)",
    "HTTP: proxy_location HeadOnly on a free 127.0.0.1 port; direct-ingress draining period 1 s",
    "nodes: fake GPU 1 on the GPU group; logical CPUs as the pods request (face 6, generator 8, head 0); one "
    "face node (chart: 2), at most one GPU node",
    "one environment for the whole cluster: the union of the head, face and generator pods' rendered env",
    "HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1 (no network here; HF_HOME is the rendered one, an empty cache)",
]


# ----------------------------------------------------------------------------------------------- the render

def render_default() -> dict:
    """The chart rendered with its defaults (plus what every install must choose: render_k8s.PLAIN_VALUES)."""
    import render_k8s

    raw = render_k8s.render_chart(render_k8s.PLAIN_VALUES)
    for path, text in raw.items():
        if path.endswith("rayservice.yaml"):
            return next(d for d in yaml.safe_load_all(text) if d and d.get("kind") == "RayService")
    raise LookupError("no RayService in the render")


def pod_env(rayservice: dict, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The union of the rendered pods' container env; a secretKeyRef takes its value from ``secrets``."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    env: dict[str, str] = {}
    for template in templates:
        for container in template["spec"]["containers"]:
            for item in container.get("env") or []:
                if "value" in item:
                    value = str(item["value"])
                else:
                    ref = item["valueFrom"]["secretKeyRef"]
                    value = secrets[(ref["name"], ref["key"])]  # KeyError: a Secret the rehearsal lacks
                if env.setdefault(item["name"], value) != value:
                    raise ValueError(f"pods disagree on {item['name']}: {env[item['name']]!r} vs {value!r}")
    return env


def localize(value: str, models: Path, keys: Path) -> str:
    for pod_path, here in (("/models", models), ("/etc/instantid/api-keys", keys)):
        if value == pod_path or value.startswith(pod_path + "/"):
            return str(here) + value[len(pod_path):]
    return value


def rehearsal_config(rendered: dict, models: Path, keys: Path, http_port: int) -> dict:
    """serveConfigV2 as rendered, with only CHANGES applied."""
    config = yaml.safe_load(rendered["spec"]["serveConfigV2"])
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {**config["http_options"], "host": "127.0.0.1", "port": http_port}
    (app,) = config["applications"]
    args = app["args"]
    tiny = models / "tiny"
    for model in args["models"]:
        model["base_model"] = str(tiny / "sdxl")
    args["instantid"] = str(tiny / "instantid")
    args["face_model"] = str(tiny / "antelopev2")
    args["preprocessors"] = {"depth": str(tiny / "dpt"), "pose": str(tiny / "dwpose")}
    args["safety"]["model"] = str(tiny / "safety")
    args["device"], args["dtype"] = "cpu", "float32"
    if "compile" in args:  # torch.compile (inductor) of the UNet: minutes on 2 shared CPU cores, for a GPU's gain
        args["compile"] = {**args["compile"], "enabled": False}
    for key in ("identity_store", "tiny_dir"):
        args[key] = localize(args[key], models, keys)
    return config


def haproxy_config(directory: Path) -> str:
    """The head's live HAProxy configuration (Ray writes it under a directory named after the node)."""
    (path,) = directory.glob("*/haproxy.cfg")
    return path.read_text()


def ingress_servers(config: str) -> list[str]:
    """host:port of each Ingress replica in HAProxy's live configuration (not the head proxy's fallback)."""
    servers, section = [], ""
    for line in config.splitlines():
        if line and not line[0].isspace():
            section = line.strip()
        parts = line.split()
        if section.startswith("backend ") and "-via-" not in section and parts[:1] == ["server"] \
                and "backup" not in parts:
            servers.append(parts[2])
    return sorted(set(servers))


# ----------------------------------------------------------------------------------------------- scenarios

class Rehearsal:
    def __init__(self, cluster: SimCluster, config: dict, haproxy_dir: Path):
        self.cluster, self.config, self.haproxy_dir = cluster, config, haproxy_dir
        self.headers = {"Authorization": f"Bearer {API_KEY}"}
        self.timeout_s = config["applications"][0]["args"]["request_timeout_s"] + 30

    def deploy(self, config: dict, timeout_s: float = 420) -> None:
        from ray.serve._private.api import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
        time.sleep(1)
        wait_for(_app_running, timeout_s, "the rendered app to be RUNNING", period_s=1)

    def client(self, base: str | None = None):
        import httpx

        return httpx.Client(base_url=base or self.cluster.http_url, timeout=self.timeout_s, headers=self.headers)

    def identity(self) -> str:
        face = Path(__import__("insightface").__file__).parent / "data" / "images" / "t1.jpg"
        with self.client() as http:
            resp = http.post("/v1/identities", json={"face_images": [base64.b64encode(face.read_bytes()).decode()]})
        assert resp.status_code == 201, resp.text
        return resp.json()["identity_id"]

    def native(self, identity: str) -> dict:
        """(a) POST /v1/generate through HAProxy; and the refusal without a key."""
        import httpx

        refused = httpx.post(self.cluster.http_url + "/v1/generate", json={"identity_id": identity}, timeout=60)
        with self.client() as http:
            started = time.monotonic()
            resp = http.post("/v1/generate", json={"identity_id": identity, "width": 64, "height": 64, "steps": 2,
                                                   "seed": 7})
            latency = time.monotonic() - started
        body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
        png = base64.b64decode(body["images"][0]) if resp.status_code == 200 and body.get("images") else b""
        return {"status": resp.status_code, "latency_s": round(latency, 2), "png": png[:8] == b"\x89PNG\r\n\x1a\n",
                "without_key_status": refused.status_code, "detail": resp.text[:300] if resp.status_code != 200 else ""}

    def jobs_across_replicas(self, identity: str, poll_timeout_s: float = 180) -> dict:
        """(b) a job submitted to one Ingress replica (its own HTTP port, as HAProxy reaches it) and polled on
        the other: only the shared Redis store can answer."""
        servers = ingress_servers(haproxy_config(self.haproxy_dir))
        assert len(servers) >= 2, servers
        submit_to, poll_on = f"http://{servers[0]}", f"http://{servers[1]}"
        with self.client(submit_to) as a, self.client(poll_on) as b:
            started = time.monotonic()
            resp = a.post("/v1/jobs", json={"identity_id": identity, "width": 64, "height": 64, "steps": 2,
                                            "seed": 7})
            assert resp.status_code == 202, resp.text
            job_id = resp.json()["id"]
            polls, job = 0, {}
            deadline = time.monotonic() + poll_timeout_s
            while time.monotonic() < deadline:
                got = b.get(f"/v1/jobs/{job_id}")
                polls += 1
                assert got.status_code == 200, got.text
                job = got.json()
                if job["status"] in ("succeeded", "failed", "canceled"):
                    break
                time.sleep(1.0)  # within the key's rate (2/s)
            done_s = time.monotonic() - started
        return {"submitted_to": servers[0], "polled_on": servers[1], "status": job.get("status"), "polls": polls,
                "done_s": round(done_s, 2), "error": job.get("error")}

    def reload(self, identity: str, hold_s: float, scale_to: int = 3, timeout_s: float = 300) -> dict:
        """(c) a request held open through HAProxy while the Ingress replica set changes (an in-place update of
        the rendered config: Ingress min_replicas 2 -> ``scale_to``), which makes Ray reload HAProxy: a new
        process with -sf, the old one keeps its open connections until they end or hard-stop-after.

        The request is a 64x64 generate whose client sends its body slowly (the first 20 KB at once, then a
        space every 0.25 s) until ``hold_s`` after the reload: a request as long as we choose, whatever the
        machine's load (a slow upload holds a connection the way a request waiting for a GPU does)."""
        import httpx

        before_pids = set(haproxy_pids(self.haproxy_dir))
        live = haproxy_config(self.haproxy_dir)
        result: dict = {"hard_stop_in_config": next((ln.split()[1] for ln in live.splitlines()
                                                     if ln.strip().startswith("hard-stop-after")), None)}
        outcome: dict = {}
        release = threading.Event()
        head = json.dumps({"identity_id": identity, "width": 64, "height": 64, "steps": 2, "seed": 7})[:-1]

        def body():
            yield (head + " " * 20_000).encode()
            while not release.wait(0.25):
                yield b" "
            yield b"}"

        def long_request() -> None:
            t0 = time.monotonic()
            try:
                with self.client() as http:
                    resp = http.post("/v1/generate", content=body(),
                                     headers={"Content-Type": "application/json"})
                outcome.update(status=resp.status_code, text=resp.text[:200] if resp.status_code != 200 else "")
            except httpx.HTTPError as exc:
                outcome.update(status="cut", text=f"{type(exc).__name__}: {exc}"[:200])
            outcome["latency_s"] = round(time.monotonic() - t0, 2)
            outcome["ended_at"] = time.monotonic()

        thread = threading.Thread(target=long_request, daemon=True)
        t0 = time.monotonic()
        thread.start()
        time.sleep(1)
        config = json.loads(json.dumps(self.config))
        ingress = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress")
        ingress["autoscaling_config"]["min_replicas"] = scale_to
        self.deploy(config, timeout_s)

        def reloaded():
            servers = ingress_servers(haproxy_config(self.haproxy_dir))
            new = set(haproxy_pids(self.haproxy_dir)) - before_pids
            return (len(servers) >= scale_to and new) or None

        try:
            wait_for(reloaded, timeout_s, f"HAProxy reloaded with {scale_to} Ingress replicas", period_s=0.2)
            reload_at = time.monotonic()
            result["old_haproxy_alive_at_reload"] = bool(set(haproxy_pids(self.haproxy_dir)) & before_pids)
            result["in_flight_at_reload"] = not outcome
            result["reload_after_s"] = round(reload_at - t0, 2)
            # hold the request open past the reload, then let it finish (or see it cut before)
            thread.join(hold_s)
        finally:
            release.set()
        thread.join(self.timeout_s + 10)
        result.update(status=outcome.get("status", "lost"), latency_s=outcome.get("latency_s"),
                      detail=outcome.get("text", ""), hold_after_reload_s=hold_s,
                      ended_after_reload_s=round(outcome["ended_at"] - reload_at, 2) if outcome else None,
                      old_haproxy_alive_at_end=bool(set(haproxy_pids(self.haproxy_dir)) & before_pids),
                      ingress_servers=len(ingress_servers(haproxy_config(self.haproxy_dir))))
        return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", type=Path, default=None, help="a tiny bundle (built under --out if absent)")
    parser.add_argument("--scenario", choices=("native", "jobs", "reload"), action="append",
                        help="run only these (repeatable); default: all")
    parser.add_argument("--hard-stop", type=int, default=None,
                        help=f"override the rendered {HARD_STOP_ENV} (seconds), e.g. 10 to show the cut")
    parser.add_argument("--reload-hold", type=float, default=15.0,
                        help="seconds the reload scenario's request stays open after the reload")
    args = parser.parse_args(argv)
    # Stopped by a signal, send SIGINT (KeyboardInterrupt: the cluster and redis-server stop on the way out),
    # not SIGTERM: once connected, Ray's handler turns SIGTERM into an abort that skips every finally (seen).
    from instantid.tiny import make_tiny

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tiny = args.tiny or out / "tiny-bundle"
    if not (tiny / "sdxl").exists():
        make_tiny(tiny)
    models, keys = out / "models", out / "api-keys"
    for d in (models, keys):
        d.mkdir(parents=True, exist_ok=True)
    if not (models / "tiny").exists():
        (models / "tiny").symlink_to(tiny.resolve())
    (keys / "hashes").write_text(f"rehearsal:{hashlib.sha256(API_KEY.encode()).hexdigest()}\n")
    names = args.scenario or ["native", "jobs", "reload"]
    report: dict = {"changes": CHANGES, "results": {}, "processes_left": None}
    rendered = render_default()
    with RedisServer(out / "redis") as redis:
        (out / "redis.pid").write_text(str(redis.proc.pid))
        env = pod_env(rendered, {REDIS_SECRET: f"redis://{redis.address}/0"})
        report["rendered_hard_stop_s"] = env.get(HARD_STOP_ENV)
        env = {k: localize(v, models, keys) for k, v in env.items() if k != "RAY_SERVE_HAPROXY_BINARY_PATH"}
        if args.hard_stop is not None:
            env[HARD_STOP_ENV] = str(args.hard_stop)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # no network here (HF_HOME: the empty cache)
        report["env"] = env
        cluster = SimCluster(max_gpu_nodes=1, face_nodes=1, face_node_cpus=6, gpu_node_cpus=8, head_cpus=0,
                             idle_timeout_s=300, keep_logs_in=out, env=env)
        started = time.monotonic()
        try:
            cluster.start()
            (out / "cluster.json").write_text(json.dumps({"temp_dir": cluster.temp_dir,
                                                          "haproxy_dir": str(cluster._haproxy_dir)}))
            report["cluster_up_s"] = round(time.monotonic() - started, 1)
            from urllib.parse import urlparse

            config = rehearsal_config(rendered, models, keys, urlparse(cluster.http_url).port)
            (out / "serve-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            r = Rehearsal(cluster, config, cluster._haproxy_dir)
            t = time.monotonic()
            r.deploy(config)
            report["app_running_s"] = round(time.monotonic() - t, 1)
            identity = r.identity()
            if "native" in names:
                report["results"]["native"] = r.native(identity)
            if "jobs" in names:
                report["results"]["jobs"] = r.jobs_across_replicas(identity)
            if "reload" in names:
                report["results"]["reload"] = {"hard_stop_env_s": env[HARD_STOP_ENV],
                                               **r.reload(identity, args.reload_hold)}
        except BaseException as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            raise
        finally:
            report["wall_s"] = round(time.monotonic() - started, 1)
            cluster.stop()
            report["processes_left"] = len(cluster._pids())
            (out / "summary.json").write_text(json.dumps(report, indent=1))
            print(json.dumps({k: v for k, v in report.items() if k != "env"}), flush=True)
    return report


if __name__ == "__main__":
    main()

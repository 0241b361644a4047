"""Serve overhead: HTTP end-to-end latency / in-process latency, for the same tiny request.

    .venv/bin/python bench/serve_overhead.py                      # concurrency 1 and 8, 64x64, 2 steps
    .venv/bin/python bench/serve_overhead.py --requests 48 --concurrency 1 8 --json out.json

The request: insightface's bundled t1.jpg as base64 JSON, 64x64, 2 steps, fixed seed, PNG inline.

- HTTP: the application as serve/local.yaml deploys it (its args and deployment settings; the tiny bundle),
  on a local Ray started here; a wave of ``c`` simultaneous requests, latency measured at the client from
  the wave's start (JSON encode, HTTP, proxy, Ingress, FaceAnalyzer, Generator, encode, response).
- In-process: the same work in this process with the same code paths and no Serve:
  base64 decode + header check, face analysis (FaceAnalysisCore), generation (GeneratorCore.predict),
  PNG encode + base64 + JSON, with torch and onnxruntime limited to the replicas' thread counts (OpenMP's pool
  sized by OMP_NUM_THREADS before torch starts, as Ray does for the replica).
  At concurrency c the in-process baseline serves the c requests as one wave the best one process can:
  decode + analyse each, then generate in batches of ``batch.max_batch_size`` (as the Generator would),
  encode; a request's latency is from the wave's start to its own response.

In-process and HTTP waves alternate (same process, same moment, ``--pause`` seconds apart so neither
side's spinning thread pools slow the other), so load from other work on a shared machine hits both
alike. The ratio is mean HTTP latency / mean in-process latency (and of the medians).
A benchmark, not a test: numbers depend on the machine; record them in docs/benchmarks.md with the
command that produced them.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deployments.ray_env import free_port  # noqa: E402  (after the path: run as a script)


def _summary(latencies: list[float], wall: float) -> dict:
    ordered = sorted(latencies)
    return {
        "n": len(ordered),
        "mean_ms": 1000 * statistics.fmean(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))],
        "throughput_rps": len(ordered) / wall if wall > 0 else 0.0,
    }


def load_local_config(tiny_dir: str, identity_dir: str) -> tuple[dict, dict]:
    import yaml

    config = yaml.safe_load((ROOT / "serve" / "local.yaml").read_text())
    app = config["applications"][0]
    args = {**app["args"], "tiny_dir": tiny_dir, "identity_store": identity_dir}
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
    return args, options


class InProcess:
    """The service's work for one request, in this process, with the same code and no Serve."""

    def __init__(self, args: dict, threads: int, face_threads: int | None):
        import torch

        from deployments.face_analyzer.deployment import FaceAnalysisCore
        from deployments.generator.deployment import GeneratorCore
        from deployments.tiny_profile import resolve_args

        torch.set_num_threads(threads)
        self.args = resolve_args(args)
        self.face = FaceAnalysisCore(self.args.face_model, threads=face_threads)
        self.gen = GeneratorCore(self.args)
        self.model = self.gen.load(self.args.default_model)

    def _analyse(self, req: dict):
        from deployments.ingress.inputs import check_image, decode_base64
        from deployments.messages import GenerationTask

        data = decode_base64(req["face_images"][0], "face_images[0]")
        check_image(data, "face_images[0]", self.args.limits.max_image_pixels)
        analysis = self.face.predict([("face_images[0]", data)])
        task = GenerationTask(model=self.args.default_model, embedding=analysis.embedding, kps=analysis.pose_kps,
                              canvas=analysis.pose_canvas, width=req["width"], height=req["height"],
                              steps=req["steps"], seed=req["seed"], prompt=req["prompt"])
        return task, analysis.pose_face

    @staticmethod
    def _respond(face: dict, out) -> str:
        from deployments.ingress.delivery import encode_image

        images = [base64.b64encode(encode_image(a, "png")).decode() for a in out.images]
        return json.dumps({"images": images, "seed": out.seed, "face": face, "timings": out.timings})

    def wave(self, body: dict, c: int) -> list[float]:
        """c simultaneous requests: analyse each, generate in batches of max_batch_size, respond."""
        from deployments.generator.deployment import accept_task

        started = time.perf_counter()
        reqs = [json.loads(json.dumps(body)) for _ in range(c)]  # parse cost, as a server would pay
        jobs = [self._analyse(r) for r in reqs]
        done, batch = [], self.args.batch.max_batch_size
        for i in range(0, len(jobs), batch):
            chunk = jobs[i:i + batch]
            outs = self.gen.predict(self.model, [accept_task(task) for task, _ in chunk])
            for (_, face), out in zip(chunk, outs):
                self._respond(face, out)
                done.append(time.perf_counter() - started)
        return done


def http_wave(client, url: str, body: dict, c: int, batch_sizes: list[int]) -> list[float]:
    """c simultaneous HTTP requests; each latency from the wave's start to its own response."""
    latencies: list[float] = []
    lock = threading.Lock()
    started = time.perf_counter()

    def one():
        resp = client.post(url, json=body)
        dt = time.perf_counter() - started
        resp.raise_for_status()
        with lock:
            latencies.append(dt)
            batch_sizes.append(resp.json()["timings"]["batch_size"])

    if c == 1:
        one()
    else:
        threads = [threading.Thread(target=one) for _ in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return latencies


def run(args: dict, options: dict, body: dict, concurrencies: list[int], requests: int, warmup: int,
        pause: float) -> dict:
    """Alternate in-process and HTTP waves, so background load on a shared machine hits both alike."""
    import httpx
    import ray
    from ray import serve

    from deployments.app import bind
    from deployments.tiny_profile import resolve_args
    from deployments.ray_env import LOCAL_ENV, private_haproxy_env

    port = free_port()
    # the cluster environment the app ships with (HAProxy ingress); Ray's processes inherit it
    haproxy_env, haproxy_dir = private_haproxy_env()
    os.environ.update({**LOCAL_ENV, **haproxy_env})
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(bind(resolve_args(args), options), name="instantid", route_prefix="/")
        threads = serve.get_deployment_handle("Generator", app_name="instantid").stats.remote().result()[
            "torch_threads"]
        face_threads = serve.get_deployment_handle("FaceAnalyzer", app_name="instantid").ready.remote().result(
            ).details["threads"]
        local = InProcess(args, threads, face_threads)
        url = f"http://127.0.0.1:{port}/v1/generate"
        report: dict = {"torch_threads": threads, "face_threads": face_threads, "levels": {}}
        with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
            for _ in range(warmup):
                local.wave(body, 1)
                http_wave(client, url, body, 1, [])
            for c in concurrencies:
                in_lat, http_lat, sizes = [], [], []
                rounds = max(1, requests // c)
                in_wall = http_wall = 0.0
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    in_lat += local.wave(body, c)
                    t1 = time.perf_counter()
                    time.sleep(pause)  # let spinning thread pools (OpenMP, onnxruntime) go idle
                    t2 = time.perf_counter()
                    http_lat += http_wave(client, url, body, c, sizes)
                    in_wall, http_wall = in_wall + (t1 - t0), http_wall + (time.perf_counter() - t2)
                    time.sleep(pause)
                level = {"in_process": _summary(in_lat, in_wall), "http": _summary(http_lat, http_wall),
                         "http_mean_batch_size": statistics.fmean(sizes)}
                level["ratio_mean"] = level["http"]["mean_ms"] / level["in_process"]["mean_ms"]
                level["ratio_p50"] = level["http"]["p50_ms"] / level["in_process"]["p50_ms"]
                report["levels"][c] = level
                print(f"  c={c}: {json.dumps(level)}", flush=True)
        return report
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(haproxy_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=40, help="requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tiny-dir", default=os.path.expanduser("~/.cache/instantid/tiny"))
    parser.add_argument("--pause", type=float, default=0.3,
                        help="seconds between waves, so one side's spinning thread pools do not slow the other")
    parser.add_argument("--json", help="also write the results here")
    opts = parser.parse_args()

    # The Generator replica's OpenMP pool is sized by OMP_NUM_THREADS, which Ray sets from its num_cpus before
    # torch starts. Sizing this process's pool the same way, before torch is imported, keeps the in-process side
    # equal: torch.set_num_threads alone, after start-up, measured ~7 % slower denoising here.
    generator_cpus = load_local_config(opts.tiny_dir, "")[1]["Generator"]["ray_actor_options"]["num_cpus"]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(generator_cpus))))
    assert "torch" not in sys.modules

    import insightface

    photo = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    body = {"face_images": [base64.b64encode(photo.read_bytes()).decode()], "prompt": "a portrait",
            "width": opts.size, "height": opts.size, "steps": opts.steps, "seed": 1234, "output_format": "png",
            # the same work as the in-process path, which builds its job by hand: no face-region mask, no
            # identity score of the output (both on by default over HTTP; their cost is in their own timings)
            "enhance_face_region": False, "identity_score": False}
    from instantid.tiny import make_tiny

    make_tiny(opts.tiny_dir)
    with tempfile.TemporaryDirectory() as identities:
        args, options = load_local_config(opts.tiny_dir, identities)
        print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; request {opts.size}x{opts.size}, "
              f"{opts.steps} steps; {opts.requests} requests per level, in-process and HTTP waves alternating",
              flush=True)
        report = run(args, options, body, opts.concurrency, opts.requests, opts.warmup, opts.pause)
    report.update({"size": opts.size, "steps": opts.steps, "requests": opts.requests, "cpus": os.cpu_count()})

    print(f"\n| concurrency | in-process mean / p50 (ms) | HTTP mean / p50 / p95 (ms) | HTTP mean batch | "
          f"HTTP ÷ in-process (mean) | (p50) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c, level in report["levels"].items():
        ip, h = level["in_process"], level["http"]
        print(f"| {c} | {ip['mean_ms']:.0f} / {ip['p50_ms']:.0f} | {h['mean_ms']:.0f} / {h['p50_ms']:.0f} / "
              f"{h['p95_ms']:.0f} | {level['http_mean_batch_size']:.2f} | {level['ratio_mean']:.2f} | "
              f"{level['ratio_p50']:.2f} |")
    print(f"(threads, in the replicas and in-process alike: torch {report['torch_threads']}, "
          f"onnxruntime {report['face_threads']})")
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

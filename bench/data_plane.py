"""Large messages between deployments: by value over Serve's gRPC data plane vs by reference (object store).

    .venv/bin/python bench/data_plane.py                       # cap as deployments/ray_env.py sets it
    .venv/bin/python bench/data_plane.py --cap-mib 4           # Ray's default cap: what failed before
    .venv/bin/python bench/data_plane.py --sizes-mb 1 15 48 --repeats 5 --json out.json

A caller deployment (as the Ingress: a handle whose router runs on the replica's loop) calls an echo
deployment (as the FaceAnalyzer / Generator) with payloads of the sizes a request can carry at the documented
limits: a 20 MB body's photo (~15 MB raw bytes) goes *to* a backend, 4 x 2048^2 RGB uint8 arrays (48 MiB) come
*back* from the Generator. Each size is timed both ways (request payload, response payload) and both
mechanisms (``_by_reference=False``: gRPC by value; ``_by_reference=True``: an actor call, large arguments and
results through the object store). A failure is recorded with its error's first line.

A benchmark, not a test: figures depend on the machine; docs/reliability.md records them with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-mib", type=int, default=None,
                        help="RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH in MiB (default: deployments/ray_env.py's)")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[0.1, 1, 6, 15, 48])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()

    from deployments.ray_env import LOCAL_ENV, private_haproxy_env

    os.environ.update(LOCAL_ENV)
    env, hap_dir = private_haproxy_env()
    os.environ.update(env)
    if opts.cap_mib is not None:
        os.environ["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"] = str(opts.cap_mib * 1024 * 1024)
    cap = int(os.environ.get("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", 4 * 1024 * 1024))

    import numpy as np
    import ray
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.5})
    class Echo:
        def take(self, payload) -> int:
            return len(payload)

        def give(self, n_bytes: int):
            return np.zeros(n_bytes, dtype=np.uint8)

    @serve.deployment(ray_actor_options={"num_cpus": 0.5})
    class Caller:
        def __init__(self, echo):
            if not echo.is_initialized:
                echo._init(_run_router_in_separate_loop=False)
            self.handles = {False: echo.options(_by_reference=False), True: echo.options(_by_reference=True)}

        async def run(self, by_reference: bool, direction: str, n_bytes: int, repeats: int) -> dict:
            handle = self.handles[by_reference]
            payload = np.zeros(n_bytes, dtype=np.uint8).tobytes()
            times = []
            try:
                for _ in range(repeats + 1):  # the first call warms the connection up and is not counted
                    t0 = time.perf_counter()
                    if direction == "request":
                        got = await handle.take.remote(payload)
                    else:
                        got = len(await handle.give.remote(n_bytes))
                    times.append(time.perf_counter() - t0)
                    assert got == n_bytes
            except Exception as exc:  # gRPC errors keep the reason in details(), not in the first line
                reason = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
                return {"error": f"{type(exc).__name__}: {str(reason).splitlines()[0][:160]}"}
            return {"p50_ms": 1000 * statistics.median(times[1:]), "min_ms": 1000 * min(times[1:])}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        caller = serve.run(Caller.bind(Echo.bind()), name="data-plane", route_prefix=None)
        rows = []
        for size in opts.sizes_mb:
            n = int(size * 1_000_000)
            for direction in ("request", "response"):
                for by_reference in (False, True):
                    out = caller.run.remote(by_reference, direction, n, opts.repeats).result(timeout_s=600)
                    row = {"size_mb": size, "direction": direction,
                           "mechanism": "by reference" if by_reference else "by value (gRPC)", **out}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        result = {"cap_bytes": cap, "repeats": opts.repeats, "rows": rows}
        if opts.json:
            opts.json.write_text(json.dumps(result, indent=2))
    finally:
        serve.shutdown()
        ray.shutdown()
        import shutil

        shutil.rmtree(hap_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

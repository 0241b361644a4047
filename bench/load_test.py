"""Overload test: N requests at concurrency C against a running service; every request must be answered.

    .venv/bin/python bench/load_test.py --url http://127.0.0.1:8000 --requests 300 --concurrency 32
    .venv/bin/python bench/load_test.py --url ... --face path/to/face.jpg --steps 2 --json out.json

The request: /v1/generate, 64x64, ``--steps`` steps, fixed seed, PNG inline, from a stored identity (one is
created first from ``--face``, default: insightface's bundled t1.jpg) so the load lands on the Generator.
Each request has a client timeout (``--timeout``); a request that times out or fails at the transport
counts as ``lost``. The service passes when every answer is 200, 429 or 503 (with Retry-After on
429/503) and none is lost. Prints the split and p50/p90/p99/max latency per outcome; ``--json`` writes
the same as JSON. Without ``--url``, nothing is started: point it at ``serve run serve/local.yaml``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections import Counter
from pathlib import Path

ALLOWED = {200, 429, 503}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def _run(base_url: str, body: dict, requests: int, concurrency: int, timeout_s: float,
               headers: dict | None = None) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, headers=headers) as client:
        async def one(i: int) -> None:
            async with sem:
                started = time.perf_counter()
                try:
                    resp = await client.post("/v1/generate", json=body)
                    outcome = {"status": resp.status_code, "retry_after": resp.headers.get("retry-after"),
                               "code": None}
                    if resp.status_code != 200:
                        try:
                            outcome["code"] = resp.json()["error"]["code"]
                        except Exception:
                            outcome["code"] = "not-json"
                except httpx.TimeoutException:
                    outcome = {"status": "lost", "code": "client-timeout", "retry_after": None}
                except httpx.HTTPError as exc:
                    outcome = {"status": "lost", "code": type(exc).__name__, "retry_after": None}
                outcome["latency_s"] = time.perf_counter() - started
                results.append(outcome)

        started = time.perf_counter()
        # asyncio.wait_for bounds the whole run even if a client timeout were not honoured
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(requests))),
                               timeout=timeout_s * (requests / max(1, concurrency) + 2))
        wall = time.perf_counter() - started
    return summarize(results, wall, requests, concurrency)


def summarize(results: list[dict], wall_s: float, requests: int, concurrency: int) -> dict:
    split = Counter(str(r["status"]) for r in results)
    codes = Counter(f"{r['status']} {r['code']}" for r in results if r["status"] != 200)
    latency = {}
    for key in sorted(split):
        values = [r["latency_s"] for r in results if str(r["status"]) == key]
        latency[key] = {"p50": percentile(values, 50), "p90": percentile(values, 90),
                        "p99": percentile(values, 99), "max": max(values)}
    every = [r["latency_s"] for r in results]
    latency["all"] = {"p50": percentile(every, 50), "p90": percentile(every, 90), "p99": percentile(every, 99),
                      "max": max(every) if every else float("nan")}
    missing_retry_after = sum(1 for r in results if r["status"] in (429, 503) and not r["retry_after"])
    unexpected = sum(n for s, n in split.items() if s not in {str(a) for a in ALLOWED})
    return {"requests": requests, "answered": len(results), "concurrency": concurrency, "wall_s": wall_s,
            "throughput_rps": len(results) / wall_s if wall_s else 0.0, "split": dict(split),
            "error_codes": dict(codes), "latency_s": latency, "missing_retry_after": missing_retry_after,
            "lost": split.get("lost", 0) + (requests - len(results)), "unexpected": unexpected,
            "ok": unexpected == 0 and missing_retry_after == 0 and len(results) == requests}


def run_load(base_url: str, body: dict, requests: int = 300, concurrency: int = 32, timeout_s: float = 60.0,
             headers: dict | None = None) -> dict:
    return asyncio.run(_run(base_url, body, requests, concurrency, timeout_s, headers))


def table(res: dict) -> str:
    lines = [f"{res['requests']} requests at concurrency {res['concurrency']}: {res['answered']} answered in "
             f"{res['wall_s']:.1f}s ({res['throughput_rps']:.1f} answers/s), lost {res['lost']}, "
             f"unexpected {res['unexpected']}, 429/503 without Retry-After {res['missing_retry_after']}",
             f"{'outcome':<10}{'count':>7}{'share':>8}{'p50 s':>9}{'p90 s':>9}{'p99 s':>9}{'max s':>9}"]
    for key, lat in res["latency_s"].items():
        count = res["answered"] if key == "all" else res["split"][key]
        share = count / max(1, res["answered"])
        lines.append(f"{key:<10}{count:>7}{share:>8.1%}{lat['p50']:>9.3f}{lat['p90']:>9.3f}{lat['p99']:>9.3f}"
                     f"{lat['max']:>9.3f}")
    if res["error_codes"]:
        lines.append("error codes: " + ", ".join(f"{k}: {v}" for k, v in sorted(res["error_codes"].items())))
    return "\n".join(lines)


def create_identity(base_url: str, face: Path, headers: dict | None = None) -> str:
    import httpx

    resp = httpx.post(f"{base_url}/v1/identities", json={"face_images": [base64.b64encode(face.read_bytes())
                                                                         .decode()]}, headers=headers, timeout=120)
    resp.raise_for_status()
    return resp.json()["identity_id"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request client timeout, seconds")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--face", type=Path, help="face photo (default: insightface's t1.jpg)")
    parser.add_argument("--api-key", help="Bearer key, when the service has auth on")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    face = args.face
    if face is None:
        import insightface

        face = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    identity = create_identity(args.url, face, headers)
    body = {"identity_id": identity, "width": args.size, "height": args.size, "steps": args.steps, "seed": 7}
    res = run_load(args.url, body, args.requests, args.concurrency, args.timeout, headers)
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

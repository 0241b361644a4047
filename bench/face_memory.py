"""FaceAnalyzer memory under the probe's attack (issue 10, item 8): concurrent requests of 4 faces + pose made
from small 4096x4096 16-bit grayscale PNGs, against one FaceAnalysisCore (the replica's logic, in process, with
the tiny face pack: the cost measured is decoding and resizing, which does not depend on the model).

    .venv/bin/python bench/face_memory.py [--requests 16] [--budget-mp 64] [--side 4096]

Prints the process's resident memory before, at peak (sampled every 10 ms) and after, and the decoded pixels
held at once. ``--budget-mp 0`` runs without a budget (as before the fix).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def photo(side: int) -> bytes:
    """A 16-bit grayscale PNG, mostly flat (small on the wire, like the probe's 130 KB files) with a coarse
    textured square where a face would be."""
    levels = np.full((side, side), 30000, np.uint16)
    rng = np.random.default_rng(0)
    q = side // 4
    levels[q:2 * q, q:2 * q] = rng.integers(20000, 40000, (q, q), dtype=np.uint16) // 4096 * 4096
    out = io.BytesIO()
    Image.fromarray(levels).save(out, format="PNG", optimize=True)
    return out.getvalue()


def main() -> None:
    from deployments.face_analyzer.deployment import MAX_DECODED_PIXELS, FaceAnalysisCore
    from instantid.tiny.face_pack import write_tiny_face_pack

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--budget-mp", type=float, default=MAX_DECODED_PIXELS / 2**20)
    parser.add_argument("--side", type=int, default=4096)
    args = parser.parse_args()

    data = photo(args.side)
    pack = write_tiny_face_pack(Path(tempfile.mkdtemp()) / "antelopev2")
    budget = int(args.budget_mp * 2**20) if args.budget_mp > 0 else 2**62
    core = FaceAnalysisCore(str(pack), threads=1, max_decoded_pixels=budget)
    before = rss_mb()
    peak, stop = [before], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.01)

    outcomes: list[str] = []

    def one():
        try:
            core.predict([(f"face_images[{i}]", data) for i in range(4)], ("pose_image", data))
            outcomes.append("ok")
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    # as the deployment does: requests arrive concurrently, the replica's analysis threads take them in turn
    futures = [core.pool.submit(one) for _ in range(args.requests)]
    for future in futures:
        future.result()
    took = time.perf_counter() - started
    stop.set()
    sampler.join()
    print(f"photo {args.side}x{args.side} 16-bit PNG, {len(data) / 1024:.0f} KB; {args.requests} requests x 5 photos; "
          f"budget {'none' if args.budget_mp <= 0 else f'{args.budget_mp:g} MP'}")
    print(f"RSS before {before:.0f} MB, peak {peak[0]:.0f} MB, after {rss_mb():.0f} MB; pixels held at most "
          f"{core.budget.peak / 2**20:.0f} MP; {took:.1f} s; outcomes {sorted(set(outcomes))}")


if __name__ == "__main__":
    main()

"""What checking a download costs: ``instantid.weights.verify_hub_snapshot`` over a file in the hub cache layout.

    python bench/download_verify.py --gib 5 --out verify.json      # one weight file of 5 GiB
    python bench/download_verify.py --tiny --out verify-tiny.json  # CI smoke: 1 MiB

``instantid download`` checks every hub file it fetched against the hash the hub named it by (the sha256 of an
LFS file): one full read and hash of the weights, after the download. This writes one file of ``--gib`` GiB as
``blobs/<sha256>`` with a snapshot link to it, exactly as huggingface_hub stores a download, and times the check
with the file out of the page cache (``posix_fadvise(DONTNEED)``; a VM host may still cache the disk image) and
in it. The contents are a 64 MiB random pool repeated: hashing speed does not depend on the bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instantid.weights import verify_hub_snapshot  # noqa: E402


def write_cache_entry(root: Path, size: int) -> Path:
    """A hub cache entry holding one LFS file of ``size`` bytes; returns its snapshot directory."""
    pool = os.urandom(min(size, 64 << 20))
    repo = root / "models--bench--weights"
    (repo / "blobs").mkdir(parents=True)
    staging = repo / "blobs" / "staging"
    digest = hashlib.sha256()
    with open(staging, "wb") as fh:
        left = size
        while left:
            chunk = pool[:min(left, len(pool))]
            fh.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    blob = repo / "blobs" / digest.hexdigest()
    staging.rename(blob)
    snapshot = repo / "snapshots" / ("0" * 40)
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").symlink_to(
        os.path.relpath(blob, snapshot / "unet"))
    return snapshot


def evict(path: Path) -> None:
    with open(path, "rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=5.0, help="size of the weight file (default %(default)s GiB)")
    parser.add_argument("--tiny", action="store_true", help="1 MiB: a smoke run")
    parser.add_argument("--root", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    size = (1 << 20) if args.tiny else int(args.gib * (1 << 30))
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        snapshot = write_cache_entry(Path(tmp), size)
        blob = next((Path(tmp) / "models--bench--weights" / "blobs").iterdir())
        os.sync()
        runs = {}
        for state in ("cold", "warm"):
            if state == "cold":
                evict(blob)
            started, cpu = time.perf_counter(), time.process_time()
            files, checked = verify_hub_snapshot(snapshot)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            assert (files, checked) == (1, size)
            # wall time depends on what else runs on the machine; CPU time is the check's own cost
            runs[state] = {"seconds": round(seconds, 3), "gb_per_s": round(size / 1e9 / seconds, 3),
                           "cpu_seconds": round(cpu, 3), "gb_per_cpu_s": round(size / 1e9 / cpu, 3),
                           "load_average_1m": round(os.getloadavg()[0], 1)}
    result = {"bytes": size, "runs": runs,
              "environment": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                              "python": platform.python_version()}}
    for state, run in runs.items():
        print(f"verify {size / 1e9:.2f} GB {state}: {run['seconds']:.2f} s wall ({run['gb_per_s']:.2f} GB/s), "
              f"{run['cpu_seconds']:.2f} s CPU ({run['gb_per_cpu_s']:.2f} GB/CPU-s), load {run['load_average_1m']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Cold start: time from "replica starts" to "pipeline ready", against the raw read time of the same bytes.

    python bench/cold_start.py --root /tmp/instantid-cold --out cold.json        # full size (~11 GB on disk)
    python bench/cold_start.py --tiny --out cold-tiny.json                       # CI smoke: tiny bundle, moto S3

Steps:

1. ``write``: SDXL base + InstantID in their real on-disk layouts and real sizes: ``sdxl/`` (model_index.json,
   unet/, vae/, text_encoder{,_2}/ as float16 safetensors, tokenizers, scheduler) and ``instantid/``
   (``ControlNetModel/`` float16 safetensors, ``ip-adapter.bin`` a float32 torch pickle, as the official file
   is: 1.69 GB). Tensor names, shapes and dtypes are those the real checkpoints have (taken from the
   models built from ``tests/fixtures/real_configs.py`` on the meta device); the values are random (normal, sigma
   0.02), tiled from a 64 MiB random pool, since values do not change load time. Files are streamed to disk, so
   writing needs no model in memory. ``--tiny`` writes ``instantid.tiny.make_tiny``'s bundle instead.
2. ``raw``: read every file fully (16 MiB ``readinto`` into one reused buffer): the floor for any loader.
3. ``local``: a fresh Python process per start (a replica), timed from spawn to ``load_pipeline`` returned,
   then to every weight resident ("touched": one read of every parameter and buffer, as the first request
   would do; on the CPU some loaders leave weights memory-mapped and page them in lazily). Like the Generator
   replica, the process first starts ``instantid.weights.prefetch`` (the weight files read into the page cache in
   a background thread), then imports torch and diffusers; ``--variants no-prefetch`` leaves that out.
4. ``s3``: the weights served over the S3 protocol on 127.0.0.1; first start (download into an empty
   ``INSTANTID_CACHE`` + load) and second start (cache hit: one LIST, then load).

"cold" runs evict the files from the page cache first with ``posix_fadvise(DONTNEED)`` (works without
privileges for clean pages; a VM host may still cache the disk image: compare the cold raw read rate with the
device's). "warm" runs read once beforehand.

Dtype: the GPU path loads float16. On the CPU ``load_pipeline`` only accepts float32 (``pick_dtype``); with
``--dtype float16`` the child process replaces ``pick_dtype`` for itself only (nothing is changed in the
library) so that the loading path of a GPU replica -- same files, same dtype, no conversion -- can be timed here.
``--dtype float32`` times the real CPU default (float16 files upcast to float32 on load).

S3 server: ``--s3-server moto`` uses moto's ``ThreadedMotoServer`` (what the tests use). moto keeps whole
objects in Python byte strings and answers every ranged GET by reading the whole object first (boto3 downloads
large objects in 8 MiB ranges), and completes a multipart upload by concatenating the parts in memory: a 5 GB
UNet file costs tens of GB of RAM and quadratic time, so the full-size default is ``--s3-server disk``, a small
read-only S3-protocol server (ListObjectsV2, HeadObject, GetObject with Range) answering from the files on
disk. Both speak the protocol boto3 and ``instantid.weights`` use; neither tells anything about a real S3
bucket's bandwidth, only about our client side (listing, ranged download, verification, atomic publish) and the
load after it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BUFFER = 16 << 20
POOL_BYTES = 64 << 20
HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # tests.fixtures (the real models' configs)


# ----------------------------------------------------------------------------------------------------------
# 1. writing the real-size layouts
# ----------------------------------------------------------------------------------------------------------
class _Pool:
    """A 64 MiB block of random values, handed out in slices to fill tensors of any size."""

    def __init__(self, dtype):
        import torch

        gen = torch.Generator().manual_seed(0)
        n = POOL_BYTES // torch.empty((), dtype=dtype).element_size()
        self.data = (torch.randn(n, generator=gen) * 0.02).to(dtype).numpy().tobytes()
        self.pos = 0

    def write(self, fh, nbytes: int) -> None:
        while nbytes:
            chunk = min(nbytes, len(self.data) - self.pos)
            fh.write(memoryview(self.data)[self.pos:self.pos + chunk])
            self.pos = (self.pos + chunk) % len(self.data)
            nbytes -= chunk


_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def write_safetensors(path: Path, shapes: dict[str, tuple], dtype: str, pool: _Pool) -> int:
    """Stream a safetensors file with tensors ``shapes`` of ``dtype`` and random values; returns its size."""
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    header, offset = {}, 0
    for name in sorted(shapes):
        n = itemsize
        for d in shapes[name]:
            n *= d
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name in sorted(shapes):
            start, end = header[name]["data_offsets"]
            pool.write(fh, end - start)
        fh.flush()
        os.fsync(fh.fileno())
    return path.stat().st_size


def _shapes(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def write_full_layout(root: Path, dtype: str = "float16") -> None:
    """SDXL base + InstantID at real size in the real layouts (see the module docstring)."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.fixtures import real_configs as rc
    from instantid.resampler import Resampler
    from instantid.tiny.bundle import _hidden_size, _tokenizer

    sdxl, iid = root / "sdxl", root / "instantid"
    pool = _Pool(getattr(torch, dtype))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**rc.SDXL_UNET)
        vae = AutoencoderKL(**rc.SDXL_VAE)
        identitynet = ControlNetModel(**rc.SDXL_IDENTITYNET)
        te_cfg = CLIPTextConfig(**rc.SDXL_TEXT_ENCODER, architectures=["CLIPTextModel"])
        te2_cfg = CLIPTextConfig(**rc.SDXL_TEXT_ENCODER_2, architectures=["CLIPTextModelWithProjection"])
        te, te2 = CLIPTextModel(te_cfg), CLIPTextModelWithProjection(te2_cfg)
        resampler = Resampler(**rc.INSTANTID_RESAMPLER)
    for name, model in (("unet", unet), ("vae", vae)):
        model.save_config(sdxl / name)
        write_safetensors(sdxl / name / "diffusion_pytorch_model.safetensors", _shapes(model), dtype, pool)
        print(f"  wrote sdxl/{name}", flush=True)
    for name, model, cfg in (("text_encoder", te, te_cfg), ("text_encoder_2", te2, te2_cfg)):
        cfg.dtype = dtype
        cfg.save_pretrained(sdxl / name)
        write_safetensors(sdxl / name / "model.safetensors", _shapes(model), dtype, pool)
        print(f"  wrote sdxl/{name}", flush=True)
    for name in ("tokenizer", "tokenizer_2"):
        _tokenizer(sdxl / name)  # a byte-level vocabulary: load time of a tokenizer is not what is measured
    EulerDiscreteScheduler(**rc.SDXL_SCHEDULER).save_config(sdxl / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
             "force_zeros_for_empty_prompt": True, "add_watermarker": None,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (sdxl / "model_index.json").write_text(json.dumps(index, indent=2))

    identitynet.save_config(iid / "ControlNetModel")
    write_safetensors(iid / "ControlNetModel" / "diffusion_pytorch_model.safetensors", _shapes(identitynet), dtype,
                      pool)
    print("  wrote instantid/ControlNetModel", flush=True)
    # ip-adapter.bin: a float32 torch pickle, {'image_proj': Resampler, 'ip_adapter': {'{i}.to_k_ip.weight', ...}}
    pool32 = _Pool(torch.float32)
    flat = torch.frombuffer(bytearray(pool32.data), dtype=torch.float32)

    def filled(shape):
        t = torch.empty(shape)
        v = t.view(-1)
        for start in range(0, v.numel(), flat.numel()):
            n = min(flat.numel(), v.numel() - start)
            v[start:start + n] = flat[:n]
        return t

    image_proj = {k: filled(s) for k, s in _shapes(resampler).items()}
    ip_adapter = {}
    for index, (name, _) in enumerate(unet.attn_processors.items()):
        if name.endswith("attn1.processor"):
            continue
        for part in ("to_k_ip", "to_v_ip"):
            shape = (_hidden_size(unet, name), rc.SDXL_UNET["cross_attention_dim"])
            ip_adapter[f"{index}.{part}.weight"] = filled(shape)
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, iid / "ip-adapter.bin")
    del image_proj, ip_adapter
    with open(iid / "ip-adapter.bin", "rb") as fh:
        os.fsync(fh.fileno())
    print("  wrote instantid/ip-adapter.bin", flush=True)


def write_layout(root: Path, tiny: bool) -> None:
    if (root / ".complete").exists():
        return
    if tiny:
        from instantid.tiny import make_tiny

        make_tiny(root)
    else:
        write_full_layout(root)
    (root / ".complete").write_text("ok\n")


def weight_files(root: Path) -> list[Path]:
    return sorted(p for d in ("sdxl", "instantid") for p in (root / d).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------------
# 2. raw reads and the page cache
# ----------------------------------------------------------------------------------------------------------
def evict(files: list[Path]) -> None:
    """Drop the files' clean pages from the page cache (no privileges needed)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files: list[Path]) -> tuple[float, int]:
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    total = 0
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view)
                if not n:
                    break
                total += n
    return time.perf_counter() - started, total


# ----------------------------------------------------------------------------------------------------------
# 3. one replica start, in a fresh process
# ----------------------------------------------------------------------------------------------------------
def child(args) -> None:
    """Runs in the replica process: import, load_pipeline, touch every weight; prints one JSON line."""
    spawned = float(os.environ["COLD_START_SPAWNED"])
    t0 = time.time()
    import resource

    if not args.no_prefetch:
        # as the Generator replica does: the disk reads the weights while torch and diffusers import
        from instantid.weights import prefetch

        prefetch(args.base, args.instantid)
    import torch

    from instantid import loading

    if args.no_adapter_mmap:
        # bench only: the loader as it was before ip-adapter.bin was memory-mapped (a before/after comparison)
        loading.zipfile = type("NoZip", (), {"is_zipfile": staticmethod(lambda path: False)})
    if args.dtype != "float32":
        # bench only: let the CPU take the GPU's dtype, to time the GPU loading path without a GPU
        loading.pick_dtype = lambda dtype, device: loading.DTYPES[dtype]
    t_import = time.time()
    pipe = loading.load_pipeline(args.base, args.instantid, device="cpu", dtype=args.dtype)
    t_loaded = time.time()
    total, nbytes = 0.0, 0
    with torch.no_grad():
        for module in [pipe.unet, pipe.controlnet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2,
                       pipe.image_proj_model]:
            for t in [*module.parameters(), *module.buffers()]:
                total += float(t.float().sum()) if t.numel() < (1 << 16) else float(t.view(-1)[::512].float().sum())
                nbytes += t.numel() * t.element_size()
    # a strided read touches every 4 KiB page (512 elements of >= 2 bytes = 1 KiB apart)
    t_touched = time.time()
    dtypes = sorted({str(p.dtype) for m in (pipe.unet, pipe.controlnet, pipe.text_encoder_2) for p in m.parameters()})
    print(json.dumps({
        "python_start_s": t0 - spawned, "import_s": t_import - t0, "load_s": t_loaded - t_import,
        "touch_s": t_touched - t_loaded, "ready_s": t_loaded - spawned, "resident_s": t_touched - spawned,
        "weight_bytes": nbytes, "param_dtypes": dtypes,
        "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "checksum": total,
    }), flush=True)


def download_only(uris: list[str], env: dict) -> dict:
    """``instantid.weights.download_s3`` alone, in a fresh process: the S3 part of a first start."""
    code = ("import json, sys, time; from instantid.weights import download_s3; t = time.perf_counter(); "
            "[download_s3(u) for u in sys.argv[1:]]; print(json.dumps({'seconds': time.perf_counter() - t}))")
    proc = subprocess.run([sys.executable, "-c", code, *uris], env={**os.environ, **env}, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"download failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_replica(base: str, instantid: str, dtype: str, env: dict | None = None, variant: str = "current") -> dict:
    cmd = [sys.executable, str(HERE), "_child", "--base", base, "--instantid", instantid, "--dtype", dtype]
    if variant == "no-adapter-mmap":
        cmd.append("--no-adapter-mmap")
    if variant == "no-prefetch":
        cmd.append("--no-prefetch")
    full_env = {**os.environ, **(env or {}), "COLD_START_SPAWNED": repr(time.time()),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"replica failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# 4. S3 over 127.0.0.1
# ----------------------------------------------------------------------------------------------------------
def _etag(path: Path) -> str:
    """S3's ETag: the MD5 for a single-part object, else '<md5 of part md5s>-<parts>' (8 MiB parts, as boto3)."""
    part = 8 << 20
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= part:
            return hashlib.md5(fh.read()).hexdigest()
        digests = [hashlib.md5(chunk).digest() for chunk in iter(lambda: fh.read(part), b"")]
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


class DiskS3:
    """A read-only S3-protocol server over a directory: bucket ``bucket``, keys = paths under ``root``."""

    def __init__(self, root: Path, bucket: str = "weights"):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, unquote, urlparse
        from xml.sax.saxutils import escape

        self.root, self.bucket = root, bucket
        objects = {}
        for path in weight_files(root):
            key = path.relative_to(root).as_posix()
            objects[key] = {"path": path, "size": path.stat().st_size, "etag": _etag(path)}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _split(self):
                url = urlparse(self.path)
                parts = unquote(url.path).lstrip("/").split("/", 1)
                return parts[0], (parts[1] if len(parts) > 1 else ""), parse_qs(url.query)

            def _send(self, code, body=b"", headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _object(self, key):
                obj = objects.get(key)
                if obj is None:
                    self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", {"Content-Type": "application/xml"})
                return obj

            def do_HEAD(self):
                bucket, key, _ = self._split()
                obj = self._object(key)
                if obj is not None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(obj["size"]))
                    self.send_header("ETag", f'"{obj["etag"]}"')
                    self.send_header("Accept-Ranges", "bytes")
                    self.send_header("Content-Type", "binary/octet-stream")
                    self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
                    self.end_headers()

            def do_GET(self):
                bucket, key, query = self._split()
                if not key:  # ListObjectsV2 (everything in one page)
                    prefix = query.get("prefix", [""])[0]
                    items = "".join(
                        f"<Contents><Key>{escape(k)}</Key><Size>{o['size']}</Size><ETag>&quot;{o['etag']}&quot;"
                        f"</ETag><LastModified>2024-01-01T00:00:00.000Z</LastModified>"
                        f"<StorageClass>STANDARD</StorageClass></Contents>"
                        for k, o in sorted(objects.items()) if k.startswith(prefix))
                    n = sum(1 for k in objects if k.startswith(prefix))
                    body = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/'
                            f'doc/2006-03-01/"><Name>{bucket}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{n}'
                            f"</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{items}"
                            f"</ListBucketResult>").encode()
                    return self._send(200, body, {"Content-Type": "application/xml"})
                obj = self._object(key)
                if obj is None:
                    return
                start, end = 0, obj["size"] - 1
                rng = self.headers.get("Range")
                code = 200
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    start, end, code = int(a), min(int(b) if b else end, end), 206
                self.send_response(code)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("ETag", f'"{obj["etag"]}"')
                self.send_header("Content-Type", "binary/octet-stream")
                self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
                if code == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{obj['size']}")
                self.end_headers()
                with open(obj["path"], "rb") as fh:
                    offset, left = start, end - start + 1
                    while left:
                        sent = os.sendfile(self.wfile.fileno(), fh.fileno(), offset, min(left, BUFFER))
                        if sent == 0:
                            break
                        offset += sent
                        left -= sent

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class MotoS3:
    """moto's threaded server on 127.0.0.1, with the files uploaded through boto3."""

    def __init__(self, root: Path, bucket: str = "weights"):
        import socket

        from moto.server import ThreadedMotoServer

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.root, self.bucket = root, bucket

    def start(self):
        import boto3

        self.server.start()
        client = boto3.client("s3", endpoint_url=self.endpoint, **_aws_env())
        client.create_bucket(Bucket=self.bucket)
        for path in weight_files(self.root):
            client.upload_file(str(path), self.bucket, path.relative_to(self.root).as_posix())
        return self

    def stop(self):
        self.server.stop()


def _aws_env() -> dict:
    return {"aws_access_key_id": "bench", "aws_secret_access_key": "bench", "region_name": "us-east-1"}


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------
def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    c = sub.add_parser("_child")
    c.add_argument("--base", required=True)
    c.add_argument("--instantid", required=True)
    c.add_argument("--dtype", default="float16")
    c.add_argument("--no-adapter-mmap", action="store_true")
    c.add_argument("--no-prefetch", action="store_true")
    parser.add_argument("--root", default="/tmp/instantid-cold", help="where the layouts are written")
    parser.add_argument("--tiny", action="store_true", help="the tiny bundle (CI smoke)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phases", default="write,raw,local,s3", help="comma-separated subset")
    parser.add_argument("--no-cold", action="store_true", help="skip the page-cache-evicted runs")
    parser.add_argument("--s3-server", choices=["disk", "moto"], default=None,
                        help="default: moto with --tiny, disk otherwise (see the module docstring)")
    parser.add_argument("--variants", default="current",
                        help="local starts: 'current' and/or 'no-adapter-mmap' (the loader before the mmap fix) "
                             "and/or 'no-prefetch' (no weight prefetch during the imports), run alternately for a "
                             "before/after comparison under the same conditions")
    parser.add_argument("--keep", action="store_true", help="keep the written layouts (default: delete at the end)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.cmd == "_child":
        child(args)
        return {}

    root = Path(args.root)
    if args.tiny and args.root == parser.get_default("root"):
        root = Path("/tmp/instantid-cold-tiny")
    phases = set(args.phases.split(","))
    server_kind = args.s3_server or ("moto" if args.tiny else "disk")
    results = {"machine": _machine(), "root": str(root), "tiny": args.tiny, "dtype": args.dtype,
               "s3_server": server_kind, "runs": {}}
    try:
        if "write" in phases or not (root / ".complete").exists():
            started = time.perf_counter()
            write_layout(root, args.tiny)
            results["write_s"] = time.perf_counter() - started
        files = weight_files(root)
        results["files"] = {p.relative_to(root).as_posix(): p.stat().st_size for p in files}
        results["total_bytes"] = sum(results["files"].values())
        print(f"layout: {len(files)} files, {results['total_bytes'] / 1e9:.2f} GB under {root}", flush=True)
        base, iid = str(root / "sdxl"), str(root / "instantid")
        modes = ["warm"] if args.no_cold else ["cold", "warm"]

        if "raw" in phases:
            for mode in modes:
                runs = []
                for _ in range(args.repeats):
                    if mode == "cold":
                        evict(files)
                    else:
                        raw_read(files)
                    seconds, nbytes = raw_read(files)
                    runs.append({"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9})
                results["runs"][f"raw_{mode}"] = runs
                print(f"raw read ({mode}): {_median(runs, 'seconds'):.2f} s", flush=True)

        if "local" in phases:
            variants = args.variants.split(",")
            for mode in modes:
                runs = {v: [] for v in variants}
                for _ in range(args.repeats):
                    for variant in variants:
                        if mode == "cold":
                            evict(files)
                        else:
                            raw_read(files)
                        runs[variant].append(start_replica(base, iid, args.dtype, variant=variant))
                for variant in variants:
                    name = f"local_{mode}" + ("" if variant == "current" else f"_{variant}")
                    results["runs"][name] = runs[variant]
                    print(f"{name}: ready {_median(runs[variant], 'ready_s'):.2f} s, resident "
                          f"{_median(runs[variant], 'resident_s'):.2f} s", flush=True)

        if "s3" in phases:
            server = (MotoS3 if server_kind == "moto" else DiskS3)(root).start()
            cache = root.parent / f"{root.name}-s3cache"
            env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                   "INSTANTID_CACHE": str(cache)}
            s3_base, s3_iid = f"s3://{server.bucket}/sdxl", f"s3://{server.bucket}/instantid"
            first, second, download = [], [], []
            try:
                for _ in range(args.repeats):
                    shutil.rmtree(cache, ignore_errors=True)
                    raw_read(files)  # the server's source files warm: the download, not our disk, is timed
                    download.append(download_only([s3_base, s3_iid], env))
                    download[-1]["gb_per_s"] = results["total_bytes"] / download[-1]["seconds"] / 1e9
                    shutil.rmtree(cache, ignore_errors=True)
                    raw_read(files)
                    first.append(start_replica(s3_base, s3_iid, args.dtype, env))
                    second.append(start_replica(s3_base, s3_iid, args.dtype, env))
            finally:
                server.stop()
                shutil.rmtree(cache, ignore_errors=True)
            results["runs"]["s3_first"], results["runs"]["s3_second"] = first, second
            results["runs"]["s3_download_only"] = download
            print(f"s3 first start: ready {_median(first, 'ready_s'):.2f} s; second start: ready "
                  f"{_median(second, 'ready_s'):.2f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    results["summary"] = summarize(results)
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def summarize(results: dict) -> dict:
    runs = results["runs"]
    summary = {}
    for mode in ("warm", "cold"):
        raw = runs.get(f"raw_{mode}")
        if raw:
            summary[f"raw_{mode}_s"] = _median(raw, "seconds")
    if runs.get("s3_download_only"):
        summary["s3_download_only_s"] = _median(runs["s3_download_only"], "seconds")
    for name, r in runs.items():
        if name.startswith("raw_") or name == "s3_download_only":
            continue
        summary[name] = {k: _median(r, k) for k in ("import_s", "load_s", "touch_s", "ready_s", "resident_s",
                                                     "max_rss_gb")}
        ref = summary.get("raw_cold_s" if "_cold" in name else "raw_warm_s")
        if ref:
            summary[name]["load_vs_raw"] = summary[name]["load_s"] / ref
            summary[name]["load_touch_vs_raw"] = (summary[name]["load_s"] + summary[name]["touch_s"]) / ref
    return summary


def print_table(results: dict) -> None:
    s = results["summary"]
    print(f"\n{results['total_bytes'] / 1e9:.2f} GB, dtype {results['dtype']}, medians of the runs")
    print(f"{'what':<28}{'import s':>10}{'load s':>9}{'touch s':>9}{'ready s':>9}{'resident s':>12}"
          f"{'load/raw':>10}{'(+touch)/raw':>14}{'RSS GB':>8}")
    for mode in ("warm", "cold"):
        if f"raw_{mode}_s" in s:
            print(f"{'raw ' + mode:<28}{'':>10}{s[f'raw_{mode}_s']:>9.2f}")
    if "s3_download_only_s" in s:
        print(f"{'s3 download only':<28}{'':>10}{s['s3_download_only_s']:>9.2f}")
    for name, r in s.items():
        if isinstance(r, dict):
            print(f"{name:<28}{r['import_s']:>10.2f}{r['load_s']:>9.2f}{r['touch_s']:>9.2f}{r['ready_s']:>9.2f}"
                  f"{r['resident_s']:>12.2f}{r.get('load_vs_raw', float('nan')):>10.2f}"
                  f"{r.get('load_touch_vs_raw', float('nan')):>14.2f}{r['max_rss_gb']:>8.1f}")


def _machine() -> dict:
    import platform

    import torch

    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_avg_start": os.getloadavg()}
    try:
        info["mem_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        pass
    return info


if __name__ == "__main__":
    main()

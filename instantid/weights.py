"""Resolve a model reference to local files: a Hugging Face repo id, a local path, or ``s3://bucket/prefix``.

S3 objects are downloaded once into a local cache. A download is staged in a temporary directory and
published with an atomic rename, under an exclusive file lock, so several processes starting at once on one
node download once and never see a half-written directory. Each object is verified by size (and by MD5
where the ETag is a plain MD5), and a manifest records what was fetched; a later start with S3 unreachable
uses a complete cached copy.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from .errors import WeightsError

log = logging.getLogger(__name__)

MANIFEST = ".instantid-manifest.json"
# The files a pipeline load reads (fnmatch patterns, relative to the model directory); also what a hub download
# of each fetches. SDXL: configs, tokenizers and the four weight files, in one precision variant (below).
SDXL_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
# diffusers' name for the half-precision copies a repo may carry (unet/diffusion_pytorch_model.fp16.safetensors):
# half the bytes of the full-precision files, and what a float16 or bfloat16 pipeline loads anyway
HALF_VARIANT = "fp16"
SINGLE_FILE_CONFIG_PATTERNS = ["*.json", "*.txt"]  # what a single-file base takes from its diffusers layout
INSTANTID_PATTERNS = ["ControlNetModel/*", "ip-adapter.bin"]
CONTROLNET_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]


def base_weights(variant: str | None = None) -> list[str]:
    """The SDXL weight files in ``variant`` (None: full precision), relative to the model directory."""
    suffix = f".{variant}" if variant else ""
    return [f"{component}/{stem}{suffix}.safetensors" for component, stem in SDXL_WEIGHTS.items()]


def base_patterns(variant: str | None = None) -> list[str]:
    return ["*.json", "*.txt", *base_weights(variant)]


BASE_WEIGHTS = base_weights()
BASE_PATTERNS = base_patterns()


def variant_for_dtype(dtype: str) -> str | None:
    """The weight variant to fetch for a serving dtype: half precision for float16/bfloat16, else full."""
    return HALF_VARIANT if str(dtype).removeprefix("torch.") in ("float16", "bfloat16") else None


def local_variant(path: Path, preferred: str | None) -> str | None:
    """Which variant of an SDXL directory to load: ``preferred`` when all its files are there, else whichever
    complete set is (full precision first); None when neither is complete (the load then names what is missing)."""
    for variant in dict.fromkeys([preferred, None, HALF_VARIANT]):
        if all((path / rel).is_file() for rel in base_weights(variant)):
            return variant
    return None


def resolve_base(ref: str, variant: str | None = None) -> tuple[Path, str | None]:
    """Resolve an SDXL base model and say which weight variant to load from it.

    From the hub only the files of ``variant`` are fetched (fp16 for a half-precision pipeline: about half the
    bytes); a repo without them falls back to its full-precision files, and the reverse. A local or S3 copy is
    used as it is, preferring ``variant`` when it holds both.
    """
    ref = str(ref)
    if not is_hub_ref(ref):
        path = resolve(ref, allow_patterns=BASE_PATTERNS)
        return path, (local_variant(path, variant) if path.is_dir() else None)
    error = None
    for candidate in dict.fromkeys([variant, None, HALF_VARIANT]):
        try:
            path = resolve(ref, allow_patterns=base_patterns(candidate))
        except WeightsError as exc:  # offline, with this variant not in the cache: try the other
            error = error or exc
            continue
        if local_variant(path, candidate) == candidate:
            return path, candidate
    if error is not None:
        raise error
    return path, None  # no complete set on the hub: the load reports which files are missing


def cache_root() -> Path:
    """Where downloaded weights live: ``$INSTANTID_CACHE``, else ``~/.cache/instantid``."""
    return Path(os.environ.get("INSTANTID_CACHE", Path.home() / ".cache" / "instantid")).expanduser()


def is_s3(ref: str) -> bool:
    return str(ref).startswith("s3://")


def _looks_local(ref: str) -> bool:
    """A path or a file name, never a hub repo id (so a missing one is reported missing, not looked up)."""
    return ref.startswith(("/", "./", "../", "~")) or ref.endswith((".safetensors", ".ckpt", ".bin"))


def is_hub_ref(ref: str) -> bool:
    """What ``resolve`` looks up on the Hugging Face hub: not an existing path, not s3://, not path-like."""
    ref = str(ref)
    return not (Path(ref).expanduser().exists() or is_s3(ref) or _looks_local(ref))


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise WeightsError(f"malformed S3 URI {uri!r}: expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


# The waits of every S3 client of the project (weights, the identity store, output delivery): an unreachable or
# black-holed S3 fails a call within seconds (the service answers 503 storage_unavailable) instead of botocore's
# 60 s per read and 5 attempts, which held an output upload until the request's deadline (504). The read
# timeout bounds each wait for data, not a whole transfer.
S3_CONNECT_TIMEOUT_S = 3.0
S3_READ_TIMEOUT_S = 20.0
S3_MAX_RETRIES = 3  # after the first attempt: 4 in all


def s3_client():
    """The one S3 client factory: the standard credential chain (AWS_ENDPOINT_URL(_S3) selects an S3-compatible
    server) with bounded connect and read timeouts and retries."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S,
                                            retries={"max_attempts": S3_MAX_RETRIES, "mode": "standard"}))


def resolve(ref: str, *, allow_patterns: list[str] | None = None) -> Path:
    """Return a local path (file or directory) holding the weights named by ``ref``.

    Order: an existing local path; ``s3://``; else a Hugging Face repo id (honours HF_HUB_OFFLINE and the
    usual HF cache). Raises WeightsError with a one-line reason when nothing can be found.
    """
    ref = str(ref)
    local = Path(ref).expanduser()
    if local.exists():
        return local
    if is_s3(ref):
        return download_s3(ref)
    if _looks_local(ref):
        raise WeightsError(f"weights not found: {ref} does not exist")
    return _hub_snapshot(ref, allow_patterns)


def _hub_snapshot(repo_id: str, allow_patterns: list[str] | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as exc:  # the hub raises a zoo of types; the user needs one line
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise WeightsError(f"cannot load {repo_id!r} from the Hugging Face hub{hint}: {type(exc).__name__}"
                           + (f": {detail}" if detail else "")) from exc


def _content_digest(path: Path, kind: str) -> str:
    """sha256 of the file, or its git blob id (sha1 over a ``blob <size>\\0`` header), as the hub names blobs."""
    digest = hashlib.sha256() if kind == "sha256" else hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(16 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_hub_snapshot(snapshot: Path, patterns: list[str] | None = None) -> tuple[int, int]:
    """Check each file of a Hugging Face cache snapshot (matching ``patterns``) against the hash the hub gave it.

    The cache stores a file as ``blobs/<etag>``, and the hub's etag is the file's sha256 for LFS files (weights)
    and its git blob id for the others, so every file can be checked offline. A file that does not match is
    removed, blob and link, so the next download fetches it again; WeightsError names it. Files not stored
    that way (a cache on a filesystem without symlinks) are left unchecked. Returns (files checked, bytes).
    """
    checked = size = 0
    for link in sorted(snapshot.rglob("*")):
        relative = link.relative_to(snapshot).as_posix()
        if not link.is_symlink() or (patterns and not any(fnmatch.fnmatch(relative, p) for p in patterns)):
            continue
        blob = link.resolve()
        name = blob.name.lower()
        kind = {64: "sha256", 40: "sha1"}.get(len(name)) if all(c in "0123456789abcdef" for c in name) else None
        if kind is None or not blob.is_file():
            continue
        if _content_digest(blob, kind) != name:
            blob.unlink(missing_ok=True)
            link.unlink(missing_ok=True)
            raise WeightsError(f"checksum mismatch for {relative} in {snapshot}: removed; run the download again")
        checked += 1
        size += blob.stat().st_size
    return checked, size


def download_s3(uri: str, *, client=None) -> Path:
    """Mirror ``s3://bucket/prefix`` (a 'directory' or one object) into the cache and return its local path."""
    bucket, prefix = split_s3(uri)
    target = _s3_target(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one downloader per node; the others wait, then reuse
        try:
            objects = _list_objects(client or s3_client(), bucket, prefix)
        except WeightsError:
            cached = _cached_payload(target)
            if cached is not None:
                return cached  # S3 unreachable but a verified copy exists: start anyway
            raise
        if _manifest_matches(target, objects):
            return _payload(target)
        _fetch_into(client or s3_client(), bucket, prefix, objects, target)
    return _payload(target)


def _s3_target(uri: str) -> Path:
    """The cache directory of ``s3://bucket/prefix`` (its manifest and payload)."""
    bucket, prefix = split_s3(uri)
    return cache_root() / "s3" / bucket / (prefix or "_root")


def _list_objects(client, bucket: str, prefix: str) -> list[dict]:
    try:
        paginator = client.get_paginator("list_objects_v2")
        objects = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):
                    continue
                # 'prefix' must match a whole path component, or be the object itself
                if prefix and key != prefix and not key.startswith(prefix + "/"):
                    continue
                objects.append({"key": key, "size": obj["Size"], "etag": obj.get("ETag", "").strip('"')})
    except Exception as exc:
        raise WeightsError(f"cannot list s3://{bucket}/{prefix}: {type(exc).__name__}: {exc}") from exc
    if not objects:
        raise WeightsError(f"no objects under s3://{bucket}/{prefix}")
    return sorted(objects, key=lambda o: o["key"])


def _relative(key: str, prefix: str) -> str:
    if key == prefix:  # a single object: keep its file name
        return Path(key).name
    rel = key[len(prefix) + 1:] if prefix else key
    parts = Path(rel).parts
    if any(p in ("..", "") for p in parts) or Path(rel).is_absolute():
        raise WeightsError(f"refusing S3 key that escapes its prefix: {key!r}")
    return rel


def _fetch_into(client, bucket: str, prefix: str, objects: list[dict], target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        payload = staging / "payload"
        for obj in objects:
            dest = payload / _relative(obj["key"], prefix)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                client.download_file(bucket, obj["key"], str(dest))
            except Exception as exc:
                raise WeightsError(f"cannot download s3://{bucket}/{obj['key']}: {type(exc).__name__}") from exc
            _verify(dest, obj)
        (staging / MANIFEST).write_text(json.dumps({"objects": objects, "prefix": prefix}))
        old = None
        if target.exists():
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.rename(staging, target)  # atomic publish: readers see all or nothing
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _verify(path: Path, obj: dict) -> None:
    size = path.stat().st_size
    if size != obj["size"]:
        raise WeightsError(f"download of {obj['key']} is {size} bytes, expected {obj['size']}")
    etag = obj.get("etag", "")
    if len(etag) == 32 and "-" not in etag:  # single-part upload: the ETag is the MD5
        digest = hashlib.md5()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != etag:
            raise WeightsError(f"checksum mismatch for {obj['key']}")


def _manifest_matches(target: Path, objects: list[dict]) -> bool:
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("objects") == objects


def _cached_payload(target: Path) -> Path | None:
    return _payload(target) if (target / MANIFEST).exists() else None


def _payload(target: Path) -> Path:
    payload = target / "payload"
    files = list(payload.iterdir()) if payload.is_dir() else []
    manifest = json.loads((target / MANIFEST).read_text())
    # a single object (a .safetensors checkpoint) resolves to the file itself
    if len(manifest["objects"]) == 1 and manifest["objects"][0]["key"] == manifest["prefix"]:
        return files[0]
    return payload


# -- prefetch --------------------------------------------------------------------------------------------------
def cached_path(ref: str, allow_patterns: list[str] | None = None) -> Path | None:
    """Where ``resolve(ref)`` would find ``ref`` without any network or download: an existing path, a complete
    S3 cache entry, or a snapshot in the Hugging Face cache holding every file of the repo that matches
    ``allow_patterns`` (all files when None); None otherwise."""
    ref = str(ref)
    local = Path(ref).expanduser()
    if local.exists():
        return local
    if is_s3(ref):
        try:
            return _cached_payload(_s3_target(ref))
        except (WeightsError, OSError, ValueError, KeyError, IndexError):  # malformed URI or cache entry
            return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True, allow_patterns=allow_patterns))
    except Exception:  # not cached (or not a repo id): nothing to prefetch
        return None


def pipeline_weight_files(base_model: str, instantid: str, controlnets: list[str] = ()) -> list[Path]:
    """The weight files ``load_pipeline(base_model, instantid, controlnets=...)`` will read that are already on
    this machine."""
    files: list[Path] = []
    refs = [(instantid, INSTANTID_PATTERNS), (base_model, None), *((ref, CONTROLNET_PATTERNS) for ref in controlnets)]
    for ref, patterns in refs:
        # a hub snapshot holds what a download's patterns fetched (never the whole repo); the base's configs
        # come with any variant
        path = cached_path(ref, patterns or ["*.json"])
        if path is None:
            continue
        if patterns is None:  # the base: the variant on disk (a half-precision download holds only fp16 files)
            patterns = base_weights(local_variant(path, None)) if path.is_dir() else []
        if path.is_file():
            files.append(path)
            continue
        for candidate in sorted(path.rglob("*")):
            relative = candidate.relative_to(path).as_posix()
            if candidate.is_file() and any(fnmatch.fnmatch(relative, p) for p in patterns):
                files.append(candidate)
    return files


def prefetch(base_model: str, instantid: str, controlnets: list[str] = (), *,
             chunk_bytes: int = 16 << 20) -> threading.Thread:
    """Read the pipeline's weight files once, in a background thread, into the OS page cache.

    A replica starts this before it imports torch and diffusers (several seconds of CPU work), so the disk reads
    the weights meanwhile and the load that follows finds them in memory. Only what is already local is read
    (a download is a read); errors are logged, never raised: this only warms a cache.
    """

    def run() -> None:
        started, total = time.perf_counter(), 0
        try:
            buffer = bytearray(chunk_bytes)
            for path in pipeline_weight_files(base_model, instantid, controlnets):
                with open(path, "rb", buffering=0) as f:
                    while n := f.readinto(buffer):
                        total += n
        except Exception as exc:  # a cache warm-up: the load that follows reports real problems itself
            log.warning("weight prefetch stopped: %s: %s", type(exc).__name__, exc)
        log.info("prefetched %.2f GB of weights in %.1fs", total / 1e9, time.perf_counter() - started)

    thread = threading.Thread(target=run, name="weight-prefetch", daemon=True)
    thread.start()
    return thread

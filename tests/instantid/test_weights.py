"""Weight resolution against a real S3-protocol server on loopback (moto server mode), never in-process mocks.

Covers: mirroring an ``s3://bucket/prefix`` "directory" byte for byte into ``$INSTANTID_CACHE``, reuse of the
cache without a second download, refresh when an object changes, single-object references, missing prefixes,
S3 unreachable with and without a complete cache, concurrent first starts from several processes, keys that
would escape their prefix, local paths, and hub ids while offline.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import socket
from pathlib import Path

import pytest

from instantid import weights
from instantid.errors import WeightsError

FILES = {
    "model_index.json": b'{"_class_name": "X"}\n',
    "unet/config.json": b'{"in_channels": 4}\n',
    "unet/diffusion_pytorch_model.safetensors": os.urandom(300_000),
    "text_encoder/model.safetensors": os.urandom(70_000),
    "deep/er/nested/file.bin": b"\x00\x01\x02" * 1000,
}


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("INSTANTID_CACHE", str(root))
    return root


def s3():
    import boto3

    return boto3.client("s3")


def upload(bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    client = s3()
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}" if prefix else rel, Body=data)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again on exit: connections are refused


class CountingClient:
    """The real boto3 client, counting the objects it downloads."""

    def __init__(self):
        self.client = s3()
        self.downloads: list[str] = []

    def download_file(self, bucket, key, filename, *args, **kwargs):
        self.downloads.append(key)
        return self.client.download_file(bucket, key, filename, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.fixture()
def counting(monkeypatch) -> list[CountingClient]:
    """Every client weights.py creates counts its downloads; yields the list of clients created."""
    clients: list[CountingClient] = []

    def make():
        clients.append(CountingClient())
        return clients[-1]

    monkeypatch.setattr(weights, "s3_client", make)
    return clients


def downloads(clients: list[CountingClient]) -> list[str]:
    return [key for c in clients for key in c.downloads]


# --- S3 "directories" --------------------------------------------------------------------------------------


def test_prefix_is_mirrored_byte_for_byte_into_the_cache(s3_bucket, cache, counting):
    upload(s3_bucket, "models/sdxl", FILES)
    upload(s3_bucket, "models/sdxl-other", {"not-mine.txt": b"sibling prefix"})  # shares the string prefix

    path = weights.resolve(f"s3://{s3_bucket}/models/sdxl")

    assert path.is_dir() and cache in path.parents
    assert tree(path) == FILES  # exactly these files, no sibling-prefix leakage, no manifest in the payload
    assert sorted(downloads(counting)) == sorted(f"models/sdxl/{rel}" for rel in FILES)
    leftovers = sorted(p.name for p in path.parent.parent.iterdir())
    assert leftovers == [".sdxl.lock", "sdxl"]  # no staging directory left behind


def test_second_resolve_reuses_the_cache_without_downloading(s3_bucket, cache, counting):
    upload(s3_bucket, "m", FILES)
    uri = f"s3://{s3_bucket}/m"
    first = weights.resolve(uri)
    stats = {rel: (first / rel).stat() for rel in FILES}
    assert len(downloads(counting)) == len(FILES)

    second = weights.resolve(uri)

    assert second == first
    assert len(downloads(counting)) == len(FILES)  # listed again, nothing fetched again
    for rel, before in stats.items():
        after = (second / rel).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_changed_object_triggers_a_refresh(s3_bucket, cache, counting):
    upload(s3_bucket, "m", FILES)
    uri = f"s3://{s3_bucket}/m"
    weights.resolve(uri)
    changed = {**FILES, "unet/config.json": b'{"in_channels": 9}\n', "added.txt": b"new"}
    upload(s3_bucket, "m", {"unet/config.json": changed["unet/config.json"], "added.txt": b"new"})

    path = weights.resolve(uri)

    assert tree(path) == changed
    assert len(downloads(counting)) == len(FILES) + len(changed)  # the whole prefix was mirrored again
    assert not list(path.parent.parent.glob("*.old"))  # the superseded copy is gone


def test_removed_object_disappears_from_the_refreshed_copy(s3_bucket, cache):
    upload(s3_bucket, "m", FILES)
    uri = f"s3://{s3_bucket}/m"
    weights.resolve(uri)
    s3().delete_object(Bucket=s3_bucket, Key="m/deep/er/nested/file.bin")

    path = weights.resolve(uri)

    assert tree(path) == {k: v for k, v in FILES.items() if k != "deep/er/nested/file.bin"}


def test_single_object_resolves_to_the_file(s3_bucket, cache):
    data = os.urandom(50_000)
    s3().put_object(Bucket=s3_bucket, Key="model.safetensors", Body=data)
    s3().put_object(Bucket=s3_bucket, Key="model.safetensors.bak", Body=b"not this one")
    s3().put_object(Bucket=s3_bucket, Key="loras/style.safetensors", Body=data[:100])

    path = weights.resolve(f"s3://{s3_bucket}/model.safetensors")
    nested = weights.resolve(f"s3://{s3_bucket}/loras/style.safetensors")

    assert path.is_file() and path.name == "model.safetensors" and path.read_bytes() == data
    assert nested.is_file() and nested.name == "style.safetensors" and nested.read_bytes() == data[:100]
    assert weights.resolve(f"s3://{s3_bucket}/model.safetensors") == path  # cached path is stable


def test_whole_bucket_resolves(s3_bucket, cache):
    upload(s3_bucket, "", {"a.txt": b"a", "b/c.txt": b"c"})
    assert tree(weights.resolve(f"s3://{s3_bucket}")) == {"a.txt": b"a", "b/c.txt": b"c"}


def test_missing_prefix_and_bucket_are_weights_errors(s3_bucket, cache):
    upload(s3_bucket, "present", {"x": b"x"})
    with pytest.raises(WeightsError, match="no objects under"):
        weights.resolve(f"s3://{s3_bucket}/absent")
    with pytest.raises(WeightsError, match="no objects under"):
        weights.resolve(f"s3://{s3_bucket}/pres")  # a string prefix of a key is not a path prefix
    with pytest.raises(WeightsError):
        weights.resolve(f"s3://{s3_bucket}-does-not-exist/x")
    with pytest.raises(WeightsError, match="malformed"):
        weights.resolve("s3:///x")
    assert not list((cache / "s3" / s3_bucket).glob("absent*"))


def test_unreachable_s3_uses_a_complete_cache(s3_bucket, cache, monkeypatch):
    upload(s3_bucket, "m", FILES)
    uri = f"s3://{s3_bucket}/m"
    cached = weights.resolve(uri)

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    path = weights.resolve(uri)

    assert path == cached and tree(path) == FILES


def test_unreachable_s3_without_cache_is_a_weights_error(s3_bucket, cache, monkeypatch):
    upload(s3_bucket, "m", FILES)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(WeightsError, match=f"cannot list s3://{s3_bucket}/m"):
        weights.resolve(f"s3://{s3_bucket}/m")


def test_incomplete_cache_is_not_used_when_s3_is_unreachable(s3_bucket, cache, monkeypatch):
    upload(s3_bucket, "m", FILES)
    cached = weights.resolve(f"s3://{s3_bucket}/m")
    (cached.parent / weights.MANIFEST).unlink()  # as if a download had been interrupted before publishing

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(WeightsError):
        weights.resolve(f"s3://{s3_bucket}/m")


def test_object_replaced_by_one_of_another_size_is_fetched_again(s3_bucket, cache):
    upload(s3_bucket, "m", {"w.bin": b"1" * 100})
    path = weights.resolve(f"s3://{s3_bucket}/m")
    upload(s3_bucket, "m", {"w.bin": b"2" * 200})
    assert weights.resolve(f"s3://{s3_bucket}/m") == path
    assert (path / "w.bin").read_bytes() == b"2" * 200


class CorruptingClient(CountingClient):
    """Downloads through the real client, then flips one byte of each file (a corrupted transfer)."""

    def download_file(self, bucket, key, filename, *args, **kwargs):
        super().download_file(bucket, key, filename, *args, **kwargs)
        data = bytearray(Path(filename).read_bytes())
        data[len(data) // 2] ^= 0xFF
        Path(filename).write_bytes(bytes(data))


def test_corrupted_download_is_refused_and_nothing_is_published(s3_bucket, cache, monkeypatch):
    upload(s3_bucket, "m", FILES)
    monkeypatch.setattr(weights, "s3_client", CorruptingClient)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        weights.resolve(f"s3://{s3_bucket}/m")
    assert [p.name for p in (cache / "s3" / s3_bucket).iterdir()] == [".m.lock"]

    monkeypatch.setattr(weights, "s3_client", s3)  # a good transfer afterwards publishes normally
    assert tree(weights.resolve(f"s3://{s3_bucket}/m")) == FILES


def _resolve_in_process(uri, barrier, results):
    from instantid import weights as w

    barrier.wait(timeout=60)  # start together: all four race for the first download
    path = w.resolve(uri)
    files = {p.relative_to(path).as_posix(): (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
             for p in sorted(path.rglob("*")) if p.is_file()}
    results.put((str(path), files))


def test_concurrent_first_resolves_download_once_and_agree(s3_bucket, cache):
    upload(s3_bucket, "m", FILES)
    uri = f"s3://{s3_bucket}/m"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_process, args=(uri, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    expected = {rel: hashlib.sha256(data).hexdigest() for rel, data in FILES.items()}
    paths = {path for path, _ in got}
    assert len(paths) == 1
    for _, files in got:
        assert {rel: digest for rel, (_, digest) in files.items()} == expected
    # one download: every process saw the very same files (a second download would have replaced them)
    assert len({tuple(sorted((rel, ino) for rel, (ino, _) in files.items())) for _, files in got}) == 1
    assert tree(Path(paths.pop())) == FILES
    assert sorted(p.name for p in (cache / "s3" / s3_bucket).iterdir()) == [".m.lock", "m"]


def test_key_escaping_the_prefix_is_refused(s3_bucket, cache):
    upload(s3_bucket, "m", {"ok.txt": b"ok"})
    s3().put_object(Bucket=s3_bucket, Key="m/../../../escaped.txt", Body=b"evil")
    listed = [o["Key"] for o in s3().list_objects_v2(Bucket=s3_bucket, Prefix="m/")["Contents"]]
    assert "m/../../../escaped.txt" in listed  # the server stored the key as written

    with pytest.raises(WeightsError, match="escapes its prefix"):
        weights.resolve(f"s3://{s3_bucket}/m")

    assert not list(cache.rglob("escaped.txt"))
    assert not (cache.parent / "escaped.txt").exists() and not (cache / "escaped.txt").exists()
    assert not (cache / "s3" / s3_bucket / "m").exists()  # nothing half-published
    assert [p.name for p in (cache / "s3" / s3_bucket).iterdir()] == [".m.lock"]  # staging cleaned up


def test_absolute_key_under_the_prefix_is_refused(s3_bucket, cache):
    s3().put_object(Bucket=s3_bucket, Key="m//etc/evil", Body=b"evil")
    with pytest.raises(WeightsError, match="escapes its prefix"):
        weights.resolve(f"s3://{s3_bucket}/m")


# --- local paths and hub ids -------------------------------------------------------------------------------


def test_local_paths_are_returned_as_is(tmp_path, cache):
    directory = tmp_path / "weights"
    directory.mkdir()
    file = directory / "model.safetensors"
    file.write_bytes(b"x")
    assert weights.resolve(str(directory)) == directory
    assert weights.resolve(str(file)) == file
    assert weights.resolve(directory) == directory  # a Path works too
    assert not cache.exists()  # nothing copied


def test_missing_local_paths_are_weights_errors_not_hub_lookups(tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking path was looked up on the hub")

    monkeypatch.setattr(weights, "_hub_snapshot", no_hub)
    for ref in (str(tmp_path / "missing"), "./missing-dir", "../missing", "~/definitely-missing-instantid",
                "checkpoint.safetensors", "weights/model.bin"):
        with pytest.raises(WeightsError, match="does not exist"):
            weights.resolve(ref)


def test_hub_id_offline_is_a_weights_error_without_network(tmp_path, monkeypatch, no_network):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE") as info:
        weights.resolve("some-org/some-model-that-is-not-cached")
    assert "\n" not in str(info.value)


# -- prefetch ------------------------------------------------------------------------------------------------
def test_pipeline_weight_files_are_the_weights_a_load_reads(tiny_bundle):
    files = weights.pipeline_weight_files(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"))
    names = sorted(p.relative_to(tiny_bundle).as_posix() for p in files)
    assert names == sorted([
        "instantid/ControlNetModel/config.json",
        "instantid/ControlNetModel/diffusion_pytorch_model.safetensors",
        "instantid/ip-adapter.bin",
        "sdxl/text_encoder/model.safetensors",
        "sdxl/text_encoder_2/model.safetensors",
        "sdxl/unet/diffusion_pytorch_model.safetensors",
        "sdxl/vae/diffusion_pytorch_model.safetensors",
    ])


def test_prefetch_reads_every_weight_file_in_the_background(tiny_bundle, monkeypatch):
    opened: list[str] = []
    real_open = open

    def recording_open(path, *a, **kw):
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", recording_open)
    thread = weights.prefetch(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"))
    thread.join(60)
    assert not thread.is_alive() and thread.daemon
    expected = weights.pipeline_weight_files(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"))
    assert sorted(p for p in opened if p.startswith(str(tiny_bundle))) == sorted(str(p) for p in expected)


def test_prefetch_finds_a_complete_s3_cache_and_skips_what_is_not_local(s3_bucket, cache, monkeypatch):
    upload(s3_bucket, "iid", {"ControlNetModel/diffusion_pytorch_model.safetensors": b"w" * 10,
                              "ControlNetModel/config.json": b"{}", "ip-adapter.bin": b"a", "README.md": b"r"})
    uri = f"s3://{s3_bucket}/iid"
    assert weights.cached_path(uri) is None  # not downloaded yet: prefetch never downloads
    local = weights.resolve(uri)
    assert weights.cached_path(uri) == local
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = weights.pipeline_weight_files("someone/not-in-the-cache", uri)
    assert sorted(p.relative_to(local).as_posix() for p in files) == [
        "ControlNetModel/config.json", "ControlNetModel/diffusion_pytorch_model.safetensors", "ip-adapter.bin"]
    assert weights.pipeline_weight_files("/nonexistent/sdxl", "/nonexistent/iid") == []
    weights.prefetch("/nonexistent/sdxl", "/nonexistent/iid").join(10)  # nothing to read, nothing raised


def test_prefetch_never_raises(monkeypatch):
    """A malformed reference stops the warm-up with a log line; the load that follows reports it properly."""
    import threading

    failures: list = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    weights.prefetch("s3://", "s3://").join(10)
    assert failures == []
    assert weights.cached_path("s3://") is None


# -- weight variants (issue 19 item 9) -------------------------------------------------------------------------
def test_variant_follows_the_serving_dtype():
    assert weights.variant_for_dtype("float16") == weights.variant_for_dtype("torch.bfloat16") == "fp16"
    assert weights.variant_for_dtype("float32") is None
    assert weights.base_weights("fp16") == ["unet/diffusion_pytorch_model.fp16.safetensors",
                                            "vae/diffusion_pytorch_model.fp16.safetensors",
                                            "text_encoder/model.fp16.safetensors",
                                            "text_encoder_2/model.fp16.safetensors"]


def test_a_local_sdxl_directory_loads_the_variant_it_holds(tmp_path):
    both = tmp_path / "both"
    for rel in weights.base_weights() + weights.base_weights("fp16"):
        (both / rel).parent.mkdir(parents=True, exist_ok=True)
        (both / rel).write_bytes(b"w")
    assert weights.resolve_base(str(both), "fp16") == (both, "fp16")
    assert weights.resolve_base(str(both), None) == (both, None)
    half_only = tmp_path / "half"
    for rel in weights.base_weights("fp16"):
        (half_only / rel).parent.mkdir(parents=True, exist_ok=True)
        (half_only / rel).write_bytes(b"w")
    assert weights.resolve_base(str(half_only), None) == (half_only, "fp16")  # float32 from the fp16 files
    assert weights.local_variant(tmp_path, "fp16") is None  # neither set complete


def test_pipeline_loads_an_fp16_only_directory_in_float32(tiny_bundle, tmp_path):
    """What a float16 download leaves on disk also loads in a float32 CPU process, from the fp16 files."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from instantid.loading import load_pipeline

    sdxl = tmp_path / "sdxl"
    shutil.copytree(tiny_bundle / "sdxl", sdxl)
    for full, half in zip(weights.base_weights(), weights.base_weights("fp16")):
        save_file({k: v.half().contiguous() for k, v in load_file(sdxl / full).items()}, sdxl / half)
        (sdxl / full).unlink()
    pipe = load_pipeline(str(sdxl), str(tiny_bundle / "instantid"), device="cpu")
    unet = load_file(sdxl / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    name = next(iter(unet))
    assert pipe.unet.dtype == torch.float32 and torch.equal(pipe.unet.state_dict()[name], unet[name].float())
    assert {p.name for p in weights.pipeline_weight_files(str(sdxl), str(tiny_bundle / "instantid"))} >= {
        "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"}

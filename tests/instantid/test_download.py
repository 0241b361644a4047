"""`instantid download` against a hub endpoint on loopback (tests/instantid/fake_hub.py) and a loopback S3.

The hub serves the tiny bundle in the real repos' layouts, under the default repo ids, with the extra files the
real repos carry (fp16 and full-precision weights side by side, a single-file checkpoint, an archive of the face
pack) so that what is *not* fetched is tested too. The CLI runs in a subprocess with HF_ENDPOINT pointed at the
fake hub and HF_HUB_OFFLINE=0; everything after it runs offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import FakeHub
from instantid import sources, weights
from instantid.tiny.face_pack import DETECTOR_FILE, RECOGNIZER_FILE

ROOT = Path(__file__).resolve().parents[2]
BASE, IID, FACE_REPO = sources.BASE_MODEL.hub_repo, sources.INSTANTID.hub_repo, sources.FACE_MODEL.hub_repo
FP16 = weights.base_weights("fp16")
FULL = weights.base_weights()


def fp16_copy(src: Path, dest: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k: v.half().contiguous() for k, v in load_file(src).items()}, dest)


@pytest.fixture(scope="module")
def hub_content(tiny_bundle, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Repo id -> files, shaped like the real repos."""
    variants = tmp_path_factory.mktemp("fp16")
    sdxl = {p.relative_to(tiny_bundle / "sdxl").as_posix(): p.read_bytes()
            for p in (tiny_bundle / "sdxl").rglob("*") if p.is_file()}
    for full, half in zip(FULL, FP16):
        fp16_copy(tiny_bundle / "sdxl" / full, variants / "w.safetensors")
        sdxl[half] = (variants / "w.safetensors").read_bytes()
    sdxl["sd_xl_base_1.0.safetensors"] = b"single-file checkpoint: never fetched" * 100
    sdxl["README.md"] = b"# SDXL\n"
    iid = {p.relative_to(tiny_bundle / "instantid").as_posix(): p.read_bytes()
           for p in (tiny_bundle / "instantid").rglob("*") if p.is_file()}
    iid["examples/0.png"] = b"not needed"
    pack = {p.name: p.read_bytes() for p in (tiny_bundle / "antelopev2").glob("*.onnx")}
    face = {**pack, "antelopev2.zip": b"an archive of the same pack: never fetched"}
    return {BASE: sdxl, IID: iid, FACE_REPO: face}


def new_hub(content: dict[str, dict[str, bytes]]) -> FakeHub:
    hub = FakeHub()
    for repo, files in content.items():
        hub.add_repo(repo, files)
    return hub


def cli_env(tmp: Path, hub: FakeHub | None) -> dict[str, str]:
    env = dict(os.environ, HF_HOME=str(tmp / "hf"), INSIGHTFACE_HOME=str(tmp / "insightface"),
               INSTANTID_CACHE=str(tmp / "instantid"), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_TOKEN", None)
    if hub is None:
        env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # closed port: any request fails
    else:
        env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url)
    return env


def download(tmp: Path, hub: FakeHub | None, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "instantid.cli", "download", *args], env=cli_env(tmp, hub),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def fetched_files(hub: FakeHub, repo: str) -> set[str]:
    marker = f"/{repo}/resolve/"
    return {p.split(marker, 1)[1].split("/", 1)[1] for p in hub.gets() if marker in p}


def snapshot(tmp: Path, repo: str) -> Path:
    snapshots = list((tmp / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
    assert len(snapshots) == 1
    return snapshots[0]


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch) -> Path:
    """Point this process's (offline) huggingface_hub at tmp_path/hf, as HF_HOME does for a new process."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "insightface"))
    return tmp_path / "hf" / "hub"


# -- the default configuration ----------------------------------------------------------------------------------
def test_download_fetches_the_fp16_default_configuration_then_everything_loads_offline(
        hub_content, tiny_bundle, tmp_path, hf_cache):
    with new_hub(hub_content) as hub:
        result = download(tmp_path, hub)
    assert result.returncode == 0, result.stderr

    # only what the float16 service loads: fp16 weights, configs, tokenizers; InstantID's two parts; the ONNX files
    base = fetched_files(hub, BASE)
    assert set(FP16) <= base and not base & set(FULL)
    assert "sd_xl_base_1.0.safetensors" not in base and "README.md" not in base
    assert fetched_files(hub, IID) == {"ControlNetModel/config.json",
                                       "ControlNetModel/diffusion_pytorch_model.safetensors", "ip-adapter.bin"}
    assert fetched_files(hub, FACE_REPO) == {DETECTOR_FILE, RECOGNIZER_FILE}
    # the named pack is installed where the service looks for it, as real files
    pack = tmp_path / "insightface" / "models" / "antelopev2"
    assert sorted(p.name for p in pack.iterdir()) == sorted([DETECTOR_FILE, RECOGNIZER_FILE])
    for name in (DETECTOR_FILE, RECOGNIZER_FILE):
        assert not (pack / name).is_symlink()
        assert (pack / name).read_bytes() == (tiny_bundle / "antelopev2" / name).read_bytes()
    # the terms of each default it fetched
    for source in sources.SOURCES:
        assert source.terms_url in result.stdout and source.role in result.stdout
    assert "fp16 weights" in result.stdout and "checked against the hub's" in result.stdout
    assert "Fetching" in result.stderr  # huggingface_hub's progress bars

    # a second run with the hub gone: everything is in the caches
    again = download(tmp_path, None)
    assert again.returncode == 0, again.stderr

    # and the library loads it all offline: the fp16 files, upcast to the CPU's float32; the installed pack
    from instantid.face import FaceModel
    from instantid.loading import load_pipeline

    path, variant = weights.resolve_base(BASE, "fp16")
    assert variant == "fp16" and path == snapshot(tmp_path, BASE)
    pipe = load_pipeline(device="cpu")  # the defaults, from the cache
    import torch
    from safetensors.torch import load_file

    half = load_file(path / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    name, tensor = next(iter(half.items()))
    assert pipe.unet.dtype == torch.float32
    assert torch.equal(pipe.unet.state_dict()[name], tensor.float())
    assert FaceModel().pack_dir == pack.resolve()
    assert weights.pipeline_weight_files(BASE, IID)  # prefetch finds the fp16 files it will read
    assert {p.name for p in weights.pipeline_weight_files(BASE, IID)} >= {"diffusion_pytorch_model.fp16.safetensors"}


def test_float32_fetches_the_full_precision_files_only(hub_content, tmp_path):
    with new_hub(hub_content) as hub:
        result = download(tmp_path, hub, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    base = fetched_files(hub, BASE)
    assert set(FULL) <= base and not base & set(FP16)
    assert "full-precision weights" in result.stdout


def test_a_repo_without_fp16_files_falls_back_to_full_precision(hub_content, tmp_path, hf_cache):
    finetune = {k: v for k, v in hub_content[BASE].items() if k not in FP16}
    with new_hub({**hub_content, "someone/sdxl-finetune": finetune}) as hub:
        result = download(tmp_path, hub, "--base-model", "someone/sdxl-finetune", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert set(FULL) <= fetched_files(hub, "someone/sdxl-finetune")
    # a model that is not a default: its terms are the publisher's to read
    assert "https://huggingface.co/someone/sdxl-finetune" in result.stdout
    assert weights.resolve_base("someone/sdxl-finetune", "fp16")[1] is None  # offline: loads the full files


def test_a_single_file_base_also_gets_the_configs_its_load_needs(hub_content, tmp_path, hf_cache):
    checkpoint = tmp_path / "finetune.safetensors"
    checkpoint.write_bytes(b"a single-file SDXL checkpoint")
    with new_hub(hub_content) as hub:
        result = download(tmp_path, hub, "--base-model", str(checkpoint))
    assert result.returncode == 0, result.stderr
    fetched = fetched_files(hub, BASE)
    assert "model_index.json" in fetched and "unet/config.json" in fetched
    assert not any(name.endswith(".safetensors") for name in fetched)  # configs only
    assert weights.resolve(BASE, allow_patterns=weights.SINGLE_FILE_CONFIG_PATTERNS)  # offline now


# -- resumable, verified ------------------------------------------------------------------------------------------
def test_a_dropped_connection_resumes_where_it_stopped(hub_content, tmp_path):
    # large enough that huggingface_hub writes a chunk (10 MiB) before the connection drops, as real weights are
    adapter = os.urandom(24 << 20)
    content = {**hub_content, IID: {**hub_content[IID], "ip-adapter.bin": adapter}}
    with new_hub(content) as hub:
        hub.truncate_once["ip-adapter.bin"] = 15 << 20
        result = download(tmp_path, hub)
    assert result.returncode == 0, result.stderr
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith("ip-adapter.bin")]
    assert len(ranges) == 2 and ranges[0] is None
    start = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= 15 << 20  # the rest only, from what it had written, not the file again
    assert (snapshot(tmp_path, IID) / "ip-adapter.bin").read_bytes() == adapter


def test_a_failed_run_keeps_what_it_completed_and_the_next_fetches_only_the_rest(hub_content, tmp_path):
    without_instantid = {k: v for k, v in hub_content.items() if k != IID}
    with new_hub(without_instantid) as hub:
        failed = download(tmp_path, hub)
    assert failed.returncode == 1 and "InstantX/InstantID" in failed.stderr
    assert set(FP16) <= fetched_files(hub, BASE)
    with new_hub(hub_content) as hub:
        result = download(tmp_path, hub)
    assert result.returncode == 0, result.stderr
    assert fetched_files(hub, BASE) == set() and fetched_files(hub, FACE_REPO) == set()  # nothing twice
    assert "ip-adapter.bin" in fetched_files(hub, IID)


def test_a_corrupted_file_is_refused_removed_and_fetched_again(hub_content, tmp_path):
    adapter = "ip-adapter.bin"
    with new_hub(hub_content) as hub:
        hub.corrupt.add(adapter)  # same size, one byte flipped: only a hash check sees it
        bad = download(tmp_path, hub)
        assert bad.returncode == 1
        assert "checksum mismatch for ip-adapter.bin" in bad.stderr and "Traceback" not in bad.stderr
        assert not (snapshot(tmp_path, IID) / adapter).exists()
        hub.corrupt.clear()
        good = download(tmp_path, hub)
    assert good.returncode == 0, good.stderr
    assert (snapshot(tmp_path, IID) / adapter).read_bytes() == hub_content[IID][adapter]


def test_an_unreachable_hub_is_one_line_and_exit_1(tmp_path):
    env = cli_env(tmp_path, None) | {"HF_HUB_OFFLINE": "0"}  # online, but the endpoint refuses connections
    result = subprocess.run([sys.executable, "-m", "instantid.cli", "download"], env=env, capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("instantid: error: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "insightface" / "models" / "antelopev2").exists()


# -- face packs by hub id, and packs InstantID cannot use ---------------------------------------------------------
def test_face_pack_by_hub_id_is_fetched_into_the_hub_cache_and_loads_offline(hub_content, tmp_path, hf_cache,
                                                                             face_photo):
    from instantid.face import FaceModel, load_image

    content = {**hub_content, "someone/antelopev2-copy": {f"antelopev2/{k}": v
                                                          for k, v in hub_content[FACE_REPO].items()}}
    with new_hub(content) as hub:
        result = download(tmp_path, hub, "--face-model", "someone/antelopev2-copy")
    assert result.returncode == 0, result.stderr
    assert fetched_files(hub, "someone/antelopev2-copy") == {f"antelopev2/{DETECTOR_FILE}",
                                                             f"antelopev2/{RECOGNIZER_FILE}"}
    assert not (tmp_path / "insightface" / "models").exists()  # a hub id stays in the hub cache
    analyzer = FaceModel("someone/antelopev2-copy")  # offline, nested folder found
    assert analyzer.pack_dir == snapshot(tmp_path, "someone/antelopev2-copy") / "antelopev2"
    image = load_image(face_photo)
    assert analyzer.largest_face(image, "t1").embedding.shape == (512,)


def test_a_pack_with_the_wrong_graphs_is_refused_and_not_installed(hub_content, tmp_path, wrong_packs):
    content = dict(hub_content)
    content[FACE_REPO] = {p.name: p.read_bytes() for p in wrong_packs["no_keypoints"].iterdir()}
    content["someone/small-embeddings"] = {p.name: p.read_bytes() for p in wrong_packs["256d"].iterdir()}
    with new_hub(content) as hub:
        named = download(tmp_path, hub)
        by_id = download(tmp_path, hub, "--face-model", "someone/small-embeddings")
    assert named.returncode == 1 and "no facial keypoints" in named.stderr
    assert not (tmp_path / "insightface" / "models" / "antelopev2").exists()  # nothing half-installed
    assert not list((tmp_path / "insightface" / "models").glob(".antelopev2*"))
    assert by_id.returncode == 1 and "512-d" in by_id.stderr and "antelopev2" in by_id.stderr
    assert not fetched_files(hub, BASE)  # refused before the large downloads


def test_unknown_pack_name_says_what_to_give(tmp_path):
    result = download(tmp_path, None, "--face-model", "buffalo_l")
    assert result.returncode == 1 and "no known source for face pack 'buffalo_l'" in result.stderr


# -- S3 ------------------------------------------------------------------------------------------------------------
def test_download_from_s3_fills_the_instantid_cache(tiny_bundle, s3_bucket, tmp_path):
    import boto3

    client = boto3.client("s3")
    for name in ("sdxl", "instantid", "antelopev2"):
        for path in (tiny_bundle / name).rglob("*"):
            if path.is_file():
                client.upload_file(str(path), s3_bucket, f"models/{name}/{path.relative_to(tiny_bundle / name)}")
    result = download(tmp_path, None, "--base-model", f"s3://{s3_bucket}/models/sdxl", "--weights",
                      f"s3://{s3_bucket}/models/instantid", "--face-model", f"s3://{s3_bucket}/models/antelopev2")
    assert result.returncode == 0, result.stderr
    cache = tmp_path / "instantid" / "s3" / s3_bucket / "models"
    for name in ("sdxl", "instantid", "antelopev2"):
        assert (cache / name / weights.MANIFEST).is_file()
    assert (cache / "sdxl" / "payload" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tiny_bundle / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert result.stdout.count("terms: those under which you obtained this copy") == 3


# -- scripts/demo --real -------------------------------------------------------------------------------------------
def test_demo_real_fetches_with_instantid_download_before_starting(tmp_path):
    env = cli_env(tmp_path, None) | {"INSTANTID_FACE_MODEL": str(tmp_path / "no-such-pack"), "INSTANTID_DEVICE": "cpu"}
    result = subprocess.run([str(ROOT / "scripts" / "demo"), "--real", "--port", "1"], env=env, capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    assert "instantid download --dtype float32" in result.stdout  # CPU: the dtype the app's "auto" picks there
    assert f"face model directory {tmp_path / 'no-such-pack'} does not exist" in result.stderr
    assert "starting the app" not in result.stdout  # nothing started on weights that are not there


# -- help and README ---------------------------------------------------------------------------------------------
def test_help_readme_and_deploy_guide_name_every_source_and_its_terms():
    from instantid.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    help_text = sub.choices["download"].format_help()
    readme = (ROOT / "README.md").read_text()
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    models_section = deploy[deploy.index("## Models and licences"):]
    for source in sources.SOURCES:
        for fact in (source.ref, f"https://huggingface.co/{source.hub_repo}", source.terms_url):
            assert fact in help_text, fact
            assert fact in readme, fact
            assert fact in models_section, fact
    for text in (readme, models_section):
        for terms in ("CreativeML Open RAIL++-M", "research purposes only", "non-commercial research"):
            assert terms in text, terms
    assert "instantid download" in readme and "Apache-2.0" in readme


def test_project_licence_is_apache_2():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"} or project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text


@pytest.fixture(scope="module")
def wrong_packs(tmp_path_factory, tiny_bundle) -> dict[str, Path]:
    from face_packs import pack_with_256d_recognizer, pack_without_keypoints

    root = tmp_path_factory.mktemp("wrong")
    return {"no_keypoints": pack_without_keypoints(tiny_bundle / "antelopev2", root / "nokps"),
            "256d": pack_with_256d_recognizer(tiny_bundle / "antelopev2", root / "256d")}



# -- everything a service configuration names (--config) --------------------------------------------------------
EXTRA = {"acme/controlnet-depth-sdxl": "controlnet-depth", "acme/controlnet-pose-sdxl": "controlnet-pose",
         "acme/pixel-lora": "lora", "acme/safety-checker": "safety", "acme/dpt": "dpt", "acme/dwpose": "dwpose"}
CONFIG = {"applications": [{"name": "instantid", "args": {
    "models": [{"name": "sdxl", "base_model": BASE,
                "controlnets": {"depth": "acme/controlnet-depth-sdxl", "pose": "acme/controlnet-pose-sdxl"},
                "loras": {"pixel": "acme/pixel-lora"}}],
    "safety": {"enabled": True, "model": "acme/safety-checker"},
    "preprocessors": {"depth": "acme/dpt", "pose": "acme/dwpose"}}}]}


def test_config_fetches_every_model_it_names_then_each_loads_offline(hub_content, tiny_bundle, tmp_path, hf_cache):
    import yaml

    content = dict(hub_content)
    for repo, folder in EXTRA.items():
        content[repo] = {p.relative_to(tiny_bundle / folder).as_posix(): p.read_bytes()
                         for p in (tiny_bundle / folder).rglob("*") if p.is_file()}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    with new_hub(content) as hub:
        result = download(tmp_path, hub, "--config", str(config))
    assert result.returncode == 0, result.stderr
    for repo, folder in EXTRA.items():
        assert fetched_files(hub, repo) == {p.relative_to(tiny_bundle / folder).as_posix()
                                            for p in (tiny_bundle / folder).rglob("*") if p.is_file()}, repo
    for role in ("ControlNet", "LoRA", "safety checker", "depth preprocessor", "pose preprocessor"):
        assert f"{role}: acme/" in result.stdout, role
    # the hub gone: a second run finds it all, and each loads as the replicas load it
    assert download(tmp_path, None, "--config", str(config)).returncode == 0
    from instantid.controls import DepthEstimator, PoseEstimator
    from instantid.safety import SafetyChecker

    SafetyChecker.load("acme/safety-checker")
    DepthEstimator.load("acme/dpt")
    PoseEstimator.load("acme/dwpose")
    assert weights.resolve("acme/controlnet-depth-sdxl", allow_patterns=weights.CONTROLNET_PATTERNS).is_dir()


def test_config_names_preprocessors_only_for_its_control_types_and_the_checker_only_when_on():
    from instantid.download import config_refs

    refs = {role: ref for role, _, ref in config_refs({"models": [{"name": "a", "base_model": "x/y",
                                                                   "controlnets": {"canny": "x/canny"}}]})}
    assert refs == {sources.FACE_MODEL.role: "antelopev2", sources.BASE_MODEL.role: "x/y",
                    sources.INSTANTID.role: "InstantX/InstantID", "ControlNet": "x/canny"}  # canny: no preprocessor
    roles = [role for role, _, _ in config_refs({"models": [{"name": "a", "base_model": "x/y"}]})]
    assert "safety checker" not in roles and not any("preprocessor" in r for r in roles)
    on = config_refs({"safety": {"enabled": True}, "models": [{"name": "a", "base_model": "x/y",
                                                               "controlnets": {"pose": "x/pose"}}]})
    assert ("safety checker", "safety.model", "CompVis/stable-diffusion-safety-checker") in on
    assert ("pose preprocessor", "preprocessors.pose", "yzd-v/DWPose") in on


def test_config_failure_names_the_field(tiny_bundle, tmp_path):
    import yaml

    config = tmp_path / "args.yaml"
    config.write_text(yaml.safe_dump({
        "face_model": str(tiny_bundle / "antelopev2"), "instantid": str(tiny_bundle / "instantid"), "models": [
        {"name": "a", "base_model": str(tiny_bundle / "sdxl")},
        {"name": "b", "base_model": str(tiny_bundle / "sdxl"), "loras": {"gone": "acme/no-such-lora"}}]}))
    result = download(tmp_path, None, "--config", str(config))
    assert result.returncode != 0
    assert "models[1].loras.gone (acme/no-such-lora)" in result.stderr, result.stderr
    both = download(tmp_path, None, "--config", str(config), "--face-model", "antelopev2")
    assert both.returncode != 0 and "not both" in both.stderr

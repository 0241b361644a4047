"""Building the pipeline from model references: local directories, s3:// prefixes on a loopback S3 server, the
official ip-adapter.bin key layout (strictly: no missing, no unexpected keys), malformed weights and bad
device/dtype choices."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from instantid.attention import IdentityAttnProcessor, identity_processors
from instantid.errors import InvalidParameterError, WeightsError
from instantid.identity import Pose
from instantid.loading import load_pipeline, pick_device, pick_dtype
from instantid.pipeline import GenerationRequest, InstantIDPipeline
from instantid.resampler import Resampler

KPS = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=float)


def latents(pipe, seed=3):
    request = GenerationRequest(face_embedding=np.random.RandomState(0).randn(512).astype(np.float32) * 10,
                                keypoint_image=Pose(KPS, (64, 64)).draw(), prompt="a person", seed=seed)
    return pipe.generate([request], width=64, height=64, steps=2, output_type="latent")[0]


def image_array(pipe, seed=3):
    request = GenerationRequest(face_embedding=np.random.RandomState(0).randn(512).astype(np.float32) * 10,
                                keypoint_image=Pose(KPS, (64, 64)).draw(), prompt="a person", seed=seed)
    return np.asarray(pipe.generate([request], width=64, height=64, steps=2)[0][0])


@pytest.fixture(scope="module")
def local_pipe(tiny_bundle):
    pipe = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def instantid_copy(tiny_bundle, tmp_path) -> Path:
    """A writable InstantID dir: ControlNetModel/ linked from the bundle, ip-adapter.bin copied."""
    directory = tmp_path / "instantid"
    directory.mkdir()
    (directory / "ControlNetModel").symlink_to(tiny_bundle / "instantid" / "ControlNetModel")
    shutil.copy(tiny_bundle / "instantid" / "ip-adapter.bin", directory / "ip-adapter.bin")
    return directory


def official_state(tiny_bundle) -> dict:
    return torch.load(tiny_bundle / "instantid" / "ip-adapter.bin", map_location="cpu", weights_only=True)


# --- loading ---------------------------------------------------------------------------------------------


def test_load_from_local_dirs(local_pipe, tiny_bundle):
    pipe = local_pipe
    assert isinstance(pipe, InstantIDPipeline)
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32 and pipe.controlnet.dtype == torch.float32
    assert isinstance(pipe.image_proj_model, Resampler) and pipe.image_proj_model.num_queries == 16
    assert pipe.watermark is None  # add_watermarker=False, as the reference
    out = pipe.generate([GenerationRequest(face_embedding=np.ones(512, np.float32), keypoint_image=Pose(
        KPS, (64, 64)).draw())], width=64, height=64, steps=2)[0]
    assert len(out) == 1 and out[0].size == (64, 64)


def test_extra_controlnets_and_loras_are_loaded_by_name(tiny_bundle):
    pipe = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu",
                         controlnets={"depth": str(tiny_bundle / "controlnet-extra")},
                         loras={"style": str(tiny_bundle / "lora" / "pytorch_lora_weights.safetensors"),
                                "dir": str(tiny_bundle / "lora")})
    assert list(pipe.extra_controlnets) == ["depth"]
    assert set(pipe.loras) == {"style", "dir"}
    pipe.set_loras({"style": 0.5})  # known names switch on; unknown ones are refused
    with pytest.raises(InvalidParameterError):
        pipe.set_loras({"nope": 1.0})


def _upload_dir(client, local: Path, bucket: str, prefix: str) -> int:
    count = 0
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
            count += 1
    return count


def test_load_from_s3_equals_local(tiny_bundle, local_pipe, s3_bucket, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("INSTANTID_CACHE", str(tmp_path / "cache"))
    client = boto3.client("s3")
    _upload_dir(client, tiny_bundle / "sdxl", s3_bucket, "models/sdxl")
    _upload_dir(client, tiny_bundle / "instantid", s3_bucket, "models/instantid")

    pipe = load_pipeline(f"s3://{s3_bucket}/models/sdxl", f"s3://{s3_bucket}/models/instantid", device="cpu")
    pipe.set_progress_bar_config(disable=True)

    # the weights really came through the cache, byte for byte
    mirrored = tmp_path / "cache" / "s3" / s3_bucket / "models" / "sdxl" / "payload"
    for path in (tiny_bundle / "sdxl").rglob("*"):
        if path.is_file():
            assert (mirrored / path.relative_to(tiny_bundle / "sdxl")).read_bytes() == path.read_bytes()
    assert torch.equal(latents(pipe), latents(local_pipe))
    np.testing.assert_array_equal(image_array(pipe), image_array(local_pipe))
    assert not np.array_equal(image_array(pipe, seed=4), image_array(local_pipe))


# --- the official ip-adapter.bin layout -------------------------------------------------------------------


def test_official_adapter_layout_loads_every_key(local_pipe, tiny_bundle):
    state = official_state(tiny_bundle)
    assert set(state) == {"image_proj", "ip_adapter"}
    # the official numbering: each processor's index in attn_processors order, self-attention slots included
    names = list(local_pipe.unet.attn_processors)
    cross = [i for i, name in enumerate(names) if name.endswith("attn2.processor")]
    expected = {f"{i}.{part}.weight" for i in cross for part in ("to_k_ip", "to_v_ip")}
    assert set(state["ip_adapter"]) == expected
    assert all(re.fullmatch(r"\d+\.to_[kv]_ip\.weight", key) for key in state["ip_adapter"])
    assert all(i % 2 == 1 for i in cross)  # attn1, attn2 alternate: cross-attention keys are odd, as SDXL's

    # every tensor landed where its key says (no missing, no unexpected, no silently random weights)
    processors = local_pipe.unet.attn_processors
    assert len(identity_processors(local_pipe.unet)) == len(cross)
    for i in cross:
        proc = processors[names[i]]
        assert isinstance(proc, IdentityAttnProcessor)
        assert torch.equal(proc.to_k_ip.weight, state["ip_adapter"][f"{i}.to_k_ip.weight"])
        assert torch.equal(proc.to_v_ip.weight, state["ip_adapter"][f"{i}.to_v_ip.weight"])
    for i, name in enumerate(names):
        if i not in cross:
            assert not isinstance(processors[name], IdentityAttnProcessor)
    resampler = local_pipe.image_proj_model.state_dict()
    assert set(resampler) == set(state["image_proj"])
    assert all(torch.equal(resampler[k], v) for k, v in state["image_proj"].items())


def _first_ip_key(state) -> str:
    return sorted(state["ip_adapter"], key=lambda k: (int(k.split(".")[0]), k))[0]


@pytest.mark.parametrize("part, change", [
    ("ip_adapter", "remove_k"),
    ("ip_adapter", "remove_v"),
    ("ip_adapter", "extra"),
    ("ip_adapter", "shape"),
    ("image_proj", "remove"),
    ("image_proj", "extra"),
    ("image_proj", "latents"),
    ("top", "no_image_proj"),
])
def test_adapter_with_a_missing_or_extra_key_is_a_weights_error(tiny_bundle, instantid_copy, part, change):
    state = official_state(tiny_bundle)
    ip, proj = state["ip_adapter"], state["image_proj"]
    key = _first_ip_key(state)
    index = key.split(".")[0]
    if (part, change) == ("ip_adapter", "remove_k"):
        del ip[f"{index}.to_k_ip.weight"]
    elif (part, change) == ("ip_adapter", "remove_v"):
        del ip[f"{index}.to_v_ip.weight"]
    elif (part, change) == ("ip_adapter", "extra"):
        ip["0.to_k_ip.weight"] = ip[key].clone()  # slot 0 is a self-attention layer: no adapter there
    elif (part, change) == ("ip_adapter", "shape"):
        ip[key] = torch.zeros(ip[key].shape[0] + 1, ip[key].shape[1])
    elif (part, change) == ("image_proj", "remove"):
        del proj["norm_out.weight"]
    elif (part, change) == ("image_proj", "extra"):
        proj["layers.0.0.extra.weight"] = torch.zeros(2, 2)
    elif (part, change) == ("image_proj", "latents"):
        del proj["latents"]
    else:
        del state["image_proj"]
    torch.save(state, instantid_copy / "ip-adapter.bin")

    with pytest.raises(WeightsError) as info:
        load_pipeline(str(tiny_bundle / "sdxl"), str(instantid_copy), device="cpu")
    assert "ip-adapter.bin" in str(info.value) and "\n" not in str(info.value)


def test_adapter_for_another_base_model_is_a_weights_error(tiny_bundle, instantid_copy):
    state = official_state(tiny_bundle)
    resampler = Resampler(dim=64, depth=1, heads=1, num_queries=16, embedding_dim=512, output_dim=32, ff_mult=1)
    state["image_proj"] = resampler.state_dict()  # 32-d tokens for a UNet attending over 64-d
    torch.save(state, instantid_copy / "ip-adapter.bin")
    with pytest.raises(WeightsError, match="not an adapter for this base model"):
        load_pipeline(str(tiny_bundle / "sdxl"), str(instantid_copy), device="cpu")


# --- malformed weights -------------------------------------------------------------------------------------


def test_instantid_dir_without_ip_adapter_fails_before_loading_the_base(tiny_bundle, instantid_copy, monkeypatch):
    (instantid_copy / "ip-adapter.bin").unlink()
    from instantid import loading

    def no_base(*args, **kwargs):
        raise AssertionError("the base model was loaded before the InstantID dir was checked")

    monkeypatch.setattr(loading, "load_base", no_base)
    with pytest.raises(WeightsError, match="missing ip-adapter.bin"):
        load_pipeline(str(tiny_bundle / "sdxl"), str(instantid_copy), device="cpu")


@pytest.mark.parametrize("extra", ["controlnets", "loras"])
def test_missing_extra_weights_fail_before_loading_the_base(tiny_bundle, tmp_path, monkeypatch, extra):
    from instantid import loading

    def no_base(*args, **kwargs):
        raise AssertionError("the base model was loaded before every reference was resolved")

    monkeypatch.setattr(loading, "load_base", no_base)
    with pytest.raises(WeightsError, match="does not exist"):
        load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu",
                      **{extra: {"x": str(tmp_path / "missing.safetensors")}})


def test_malformed_weights_are_weights_errors(tiny_bundle, tmp_path):
    sdxl, instantid = str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid")

    no_controlnet = tmp_path / "no-controlnet"
    no_controlnet.mkdir()
    shutil.copy(tiny_bundle / "instantid" / "ip-adapter.bin", no_controlnet / "ip-adapter.bin")
    with pytest.raises(WeightsError, match="missing config.json"):
        load_pipeline(sdxl, str(no_controlnet), device="cpu")

    as_file = tmp_path / "instantid.bin"
    shutil.copy(tiny_bundle / "instantid" / "ip-adapter.bin", as_file)
    with pytest.raises(WeightsError, match="must be a directory"):
        load_pipeline(sdxl, str(as_file), device="cpu")

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "ControlNetModel").symlink_to(tiny_bundle / "instantid" / "ControlNetModel")
    (garbage / "ip-adapter.bin").write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_pipeline(sdxl, str(garbage), device="cpu")

    no_index = tmp_path / "sdxl-no-index"
    shutil.copytree(tiny_bundle / "sdxl", no_index)
    (no_index / "model_index.json").unlink()
    with pytest.raises(WeightsError, match="missing model_index.json"):
        load_pipeline(str(no_index), instantid, device="cpu")

    no_unet_weights = tmp_path / "sdxl-no-unet"
    shutil.copytree(tiny_bundle / "sdxl", no_unet_weights)
    for f in (no_unet_weights / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(WeightsError):
        load_pipeline(str(no_unet_weights), instantid, device="cpu")

    with pytest.raises(WeightsError, match="does not exist"):
        load_pipeline(str(tmp_path / "missing-sdxl"), instantid, device="cpu")
    with pytest.raises(WeightsError, match="does not exist"):
        load_pipeline(sdxl, str(tmp_path / "missing-instantid"), device="cpu")
    with pytest.raises(WeightsError, match="missing config.json"):
        load_pipeline(sdxl, instantid, device="cpu", controlnets={"x": str(tmp_path)})


def test_pickled_code_in_ip_adapter_is_never_executed(tiny_bundle, instantid_copy, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"image_proj": Evil(), "ip_adapter": {}}, instantid_copy / "ip-adapter.bin")
    with pytest.raises(WeightsError, match="cannot read"):
        load_pipeline(str(tiny_bundle / "sdxl"), str(instantid_copy), device="cpu")
    assert not marker.exists()


# --- device and dtype --------------------------------------------------------------------------------------


def test_device_and_dtype_choices():
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("auto", "cuda") == torch.float16
    assert pick_dtype("float32", "cpu") == torch.float32
    assert pick_dtype("bfloat16", "cuda") == torch.bfloat16
    for dtype in ("float16", "bfloat16"):  # the GPU's numerics on the CPU: allowed, slow, with a warning
        with pytest.warns(UserWarning, match="slow"):
            assert pick_dtype(dtype, "cpu") == getattr(torch, dtype)
    with pytest.raises(InvalidParameterError, match="must be one of"):
        pick_dtype("float64", "cpu")
    with pytest.raises(InvalidParameterError, match="cpu, cuda or auto"):
        pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_loading(tmp_path):
    with pytest.raises(InvalidParameterError, match="no CUDA device"):
        pick_device("cuda")
    # refused before any weights are resolved: these paths do not even exist
    with pytest.raises(InvalidParameterError, match="no CUDA device"):
        load_pipeline(str(tmp_path / "a"), str(tmp_path / "b"), device="cuda")
    with pytest.raises(InvalidParameterError, match="vae_dtype"):
        load_pipeline(str(tmp_path / "a"), str(tmp_path / "b"), device="cpu", dtype="float32", vae_dtype="fp8")

"""A base model given as ONE ``.safetensors`` checkpoint in the original Stability/A1111 layout.

The tiny SDXL directory is written in that layout (tests/fixtures/single_file.py) and loaded through
``load_pipeline(<file>, base_config=<diffusers dir>)``, offline. It must rebuild exactly the directory's weights
and generate exactly the same latents; a file that is not such a checkpoint is a one-line WeightsError.

The tiny bundle's two text encoders have different widths (24 and 40, SDXL's 768:1280 ratio): diffusers tells
the two encoders apart in a single file by width. With equal widths the loader must refuse rather than run
half-random (``single_file.with_text_widths`` makes such a copy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from instantid.errors import WeightsError
from instantid.identity import Pose
from instantid.loading import load_pipeline
from instantid.pipeline import GenerationRequest, InstantIDPipeline
from tests.fixtures.single_file import (CLIP_L_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, with_text_widths,
                                        write_single_file)

KPS = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=float)
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl_dir(tiny_bundle):
    return tiny_bundle / "sdxl"


@pytest.fixture(scope="module")
def single_file(sdxl_dir, tmp_path_factory):
    return write_single_file(sdxl_dir, tmp_path_factory.mktemp("single") / "tiny-sdxl.safetensors")


@pytest.fixture(scope="module")
def dir_pipe(sdxl_dir, tiny_bundle):
    pipe = load_pipeline(str(sdxl_dir), str(tiny_bundle / "instantid"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def file_pipe(single_file, sdxl_dir, tiny_bundle):
    pipe = load_pipeline(str(single_file), str(tiny_bundle / "instantid"), device="cpu", base_config=str(sdxl_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe):
    request = GenerationRequest(face_embedding=np.random.RandomState(0).randn(512).astype(np.float32) * 10,
                                keypoint_image=Pose(KPS, (64, 64)).draw(), prompt="a person", seed=3)
    return pipe.generate([request], width=64, height=64, steps=2, output_type="latent")[0]


def test_file_is_in_the_original_layout(single_file):
    with safe_open(str(single_file), framework="pt") as handle:
        keys = set(handle.keys())
        projection = handle.get_tensor(OPEN_CLIP_PREFIX + "text_projection")
        qkv = handle.get_tensor(OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight")
        vae_q = handle.get_tensor(VAE_PREFIX + "encoder.mid.attn_1.q.weight")
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, OPEN_CLIP_PREFIX)
    assert all(k.startswith(prefixes) for k in keys)
    for expected in (UNET_PREFIX + "input_blocks.0.0.weight", UNET_PREFIX + "label_emb.0.0.weight",
                     UNET_PREFIX + "input_blocks.2.0.op.weight", UNET_PREFIX + "middle_block.1.proj_in.weight",
                     UNET_PREFIX + "output_blocks.1.2.conv.weight", UNET_PREFIX + "out.2.weight",
                     VAE_PREFIX + "decoder.up.3.upsample.conv.weight", VAE_PREFIX + "encoder.norm_out.weight",
                     CLIP_L_PREFIX + "text_model.embeddings.position_embedding.weight",
                     OPEN_CLIP_PREFIX + "positional_embedding", OPEN_CLIP_PREFIX + "ln_final.weight",
                     OPEN_CLIP_PREFIX + "transformer.resblocks.2.mlp.c_proj.bias"):
        assert expected in keys, expected
    assert projection.shape == (40, 40)  # OpenCLIP stores x @ text_projection: (width, projection_dim)
    assert qkv.shape == (3 * 40, 40)  # q, k and v fused
    assert vae_q.shape == (16, 16, 1, 1)  # the original VAE's attention projections are 1x1 convolutions
    # Only 3 text layers: diffusers' SDXL detection key (resblocks.9) is absent, and loading must not need it
    # because load_base always passes config= (a local directory).
    assert OPEN_CLIP_PREFIX + "transformer.resblocks.9.mlp.c_proj.bias" not in keys


def test_single_file_rebuilds_the_same_weights(dir_pipe, file_pipe):
    assert isinstance(file_pipe, InstantIDPipeline) and file_pipe.watermark is None
    for name in COMPONENTS:
        expected, loaded = getattr(dir_pipe, name).state_dict(), getattr(file_pipe, name).state_dict()
        assert set(loaded) == set(expected), name
        for key, tensor in expected.items():
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), f"{name}.{key}"
    assert dict(file_pipe.scheduler.config) == dict(dir_pipe.scheduler.config)
    assert file_pipe.tokenizer_2.get_vocab() == dir_pipe.tokenizer_2.get_vocab()


def own_memory(pipe) -> None:
    """Move every weight into freshly allocated memory (values unchanged)."""
    for name in COMPONENTS:
        for tensor in [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()]:
            tensor.data = tensor.data.clone()


def test_single_file_generates_the_same_latents(dir_pipe, file_pipe):
    expected, got = np.asarray(latents(dir_pipe)), np.asarray(latents(file_pipe))
    assert np.isfinite(expected).all()
    # As loaded, the directory's weights sit at unaligned offsets of the loaded safetensors buffers and the single
    # file's in fresh buffers; the CPU BLAS then picks differently rounding kernels (text_encoder_2's projection
    # differs in the last bit), so the two agree to float rounding ...
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    # ... and with the (bit-identical) weights in equally allocated memory, the latents are identical.
    own_memory(dir_pipe)
    own_memory(file_pipe)
    assert np.array_equal(np.asarray(latents(file_pipe)), np.asarray(latents(dir_pipe)))


@pytest.mark.parametrize("kind", ["random", "no_vae", "not_safetensors"])
def test_a_file_that_is_not_an_sdxl_checkpoint_is_a_weights_error(kind, single_file, sdxl_dir, tiny_bundle,
                                                                   tmp_path):
    bad = tmp_path / "model.safetensors"
    if kind == "random":
        save_file({"encoder.layer.0.weight": torch.randn(8, 8), "head.bias": torch.randn(8)}, bad)
    elif kind == "no_vae":
        save_file({k: v for k, v in load_file(single_file).items() if not k.startswith(VAE_PREFIX)}, bad)
    else:
        bad.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(WeightsError) as info:
        load_pipeline(str(bad), str(tiny_bundle / "instantid"), device="cpu", base_config=str(sdxl_dir))
    message = str(info.value)
    assert "\n" not in message and str(bad) in message
    expected = {"random": "no UNet, VAE, CLIP-L text encoder, OpenCLIP bigG text encoder weights",
                "no_vae": "no VAE weights", "not_safetensors": "not a safetensors file"}[kind]
    assert expected in message


def test_equal_width_text_encoders_are_refused_not_half_loaded(tiny_bundle, tmp_path):
    """Encoders of equal width (32/32): diffusers gives text_encoder_2 the CLIP-L tensors and leaves its
    projection unloaded; load_base must say so instead of returning a pipeline with missing weights."""
    equal = with_text_widths(tiny_bundle / "sdxl", tmp_path / "sdxl-32-32", widths=(32, 32))
    same_width = write_single_file(equal, tmp_path / "same-width.safetensors")
    with pytest.raises(WeightsError, match="does not fill text_encoder_2") as info:
        load_pipeline(str(same_width), str(tiny_bundle / "instantid"), device="cpu", base_config=str(equal))
    assert "\n" not in str(info.value)

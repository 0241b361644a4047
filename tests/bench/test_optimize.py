"""instantid.optimize on the CPU at tiny size: every optimisation but compilation leaves the numbers as they were
(float tolerance), scales still reach the graph, and the default loading path never applies any of it."""

import os

import numpy as np
import pytest
import torch

from instantid.attention import IdentityAttnProcessor, identity_processors
from instantid.identity import Pose
from instantid.loading import load_pipeline
from instantid.optimize import TensorScaleIdentityAttnProcessor, is_optimized, optimize
from instantid.pipeline import GenerationRequest

SIZE = 64
KPS = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=float)


def load(tiny_bundle):
    pipe = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def request(**overrides):
    fields = dict(face_embedding=np.random.RandomState(0).randn(512).astype(np.float32) * 10,
                  keypoint_image=Pose(KPS, (SIZE, SIZE)).draw(), prompt="a person", seed=7)
    fields.update(overrides)
    return GenerationRequest(**fields)


def latents(pipe, *requests):
    return [x.clone() for x in pipe.generate(list(requests), width=SIZE, height=SIZE, steps=3, output_type="latent")]


CASES = {
    "default": [request()],
    "other_scales_and_window": [request(ip_adapter_scale=0.3, controlnet_conditioning_scale=0.5,
                                        control_guidance_end=0.5)],
    "per_row_scales": [request(ip_adapter_scale=0.3), request(ip_adapter_scale=0.9, seed=8)],
}


@pytest.fixture(scope="module")
def plain_and_optimized(tiny_bundle):
    pipe = load(tiny_bundle)
    before = {name: latents(pipe, *reqs) for name, reqs in CASES.items()}
    image_before = pipe.generate([request()], width=SIZE, height=SIZE, steps=3, output_type="np")[0]
    applied = optimize(pipe, compile=False, channels_last=True, fuse_qkv=True, tensor_scales=True, fp16_vae="fp32")
    return pipe, before, image_before, applied


def test_the_default_cpu_path_is_not_optimized(tiny_bundle):
    pipe = load(tiny_bundle)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert not is_optimized(pipe.unet) and not is_optimized(pipe.controlnet)
    assert all(type(p) is IdentityAttnProcessor for p in identity_processors(pipe.unet))
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_everything_but_compile_keeps_the_float32_numbers(plain_and_optimized):
    pipe, before, image_before, applied = plain_and_optimized
    assert "channels_last" in applied and "tensor_scales" in applied and any(a.startswith("fuse_qkv") for a in applied)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for name, reqs in CASES.items():
        for a, b in zip(before[name], latents(pipe, *reqs)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)
    image = pipe.generate([request()], width=SIZE, height=SIZE, steps=3, output_type="np")[0]
    assert np.abs(image - image_before).max() < 1e-4


def test_scales_live_in_tensors(plain_and_optimized):
    pipe = plain_and_optimized[0]
    procs = identity_processors(pipe.unet)
    assert procs and all(isinstance(p, TensorScaleIdentityAttnProcessor) for p in procs)
    latents(pipe, request(ip_adapter_scale=0.25))
    scale = procs[0].scale
    assert isinstance(scale, torch.Tensor) and scale.ndim == 0 and float(scale) == pytest.approx(0.25)
    buffer = scale
    latents(pipe, request(ip_adapter_scale=0.6))
    assert procs[0].scale is buffer and float(buffer) == pytest.approx(0.6)  # filled in place: no new graph input


def test_fused_projections_add_no_memory(plain_and_optimized):
    pipe = plain_and_optimized[0]
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    fused = attn.to_qkv.weight
    start = fused.untyped_storage().data_ptr()
    end = start + fused.untyped_storage().nbytes()
    for part in (attn.to_q, attn.to_k, attn.to_v):
        assert start <= part.weight.data_ptr() < end


def test_bf16_vae_decode_is_close(tiny_bundle):
    pipe = load(tiny_bundle)
    ref = pipe.generate([request()], width=SIZE, height=SIZE, steps=2, output_type="np")[0]
    assert "vae=bf16" in optimize(pipe, compile=False, fp16_vae="bf16")
    assert pipe.vae.dtype == torch.bfloat16 and pipe.unet.dtype == torch.float32
    out = pipe.generate([request()], width=SIZE, height=SIZE, steps=2, output_type="np")[0]
    assert np.abs(out - ref).max() < 8 / 255  # bf16's 8 mantissa bits, on 8-bit pixels


def test_fp16_vae_is_refused_for_a_vae_that_overflows(tiny_bundle):
    pipe = load(tiny_bundle)
    with pytest.raises(ValueError, match="force_upcast"):
        optimize(pipe, compile=False, fp16_vae="fp16")
    with pytest.raises(ValueError):
        optimize(pipe, compile=False, fp16_vae="nope")


@pytest.mark.skipif(os.environ.get("INSTANTID_TEST_COMPILE") != "1",
                    reason="Inductor's first C++ build of the tiny UNet takes minutes on a 2-core CPU; "
                           "set INSTANTID_TEST_COMPILE=1 to run it")
def test_compiled_matches_eager_and_does_not_recompile_for_new_scales(tiny_bundle):
    import torch._dynamo.utils

    pipe = load(tiny_bundle)
    ref = {name: latents(pipe, *reqs) for name, reqs in CASES.items() if name != "per_row_scales"}
    optimize(pipe, compile=True, channels_last=False, fp16_vae="fp32", compile_vae=False)
    torch._dynamo.utils.counters.clear()
    for name, expected in ref.items():
        for a, b in zip(expected, latents(pipe, *CASES[name])):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # UNet + IdentityNet, once each

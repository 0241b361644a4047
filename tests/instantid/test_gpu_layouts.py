"""The GPU's production layouts, run on the CPU with the tiny bundle: every feature finishes with finite pixels
and stays within a stated tolerance of float32 on the same inputs.

Layouts (what ``load_pipeline`` gives on CUDA, see loading.pick_vae_dtype):
- ``fp16+fp32vae``: float16 models, SDXL's force_upcast VAE in float32 (the reference's layout);
- ``fp16+bf16vae``: float16 models, the VAE in bfloat16 (the default where the device has bfloat16);
- ``bf16``: everything in bfloat16.

Tolerances (TOL below; measured deviations and the margin are in docs/parity.md, "GPU layouts"): the latents'
relative L2 error against float32 and the largest pixel difference (0-255) of the decoded images. Random tiny
weights prove numerics and plumbing, never image quality.
"""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from instantid.identity import Pose
from instantid.loading import CpuHalfPrecisionWarning, load_pipeline
from instantid.people import Placement, place_people
from instantid.pipeline import ControlInput, GenerationRequest

SIZE = 64
KPS = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=float)
LAYOUTS = {
    "fp16+fp32vae": dict(dtype="float16", vae_dtype="float32"),
    "fp16+bf16vae": dict(dtype="float16", vae_dtype="bfloat16"),
    "bf16": dict(dtype="bfloat16", vae_dtype="auto"),
}
WANT = {"fp16+fp32vae": (torch.float16, torch.float32), "fp16+bf16vae": (torch.float16, torch.bfloat16),
        "bf16": (torch.bfloat16, torch.bfloat16)}
# layout -> (latent relative L2 error, largest pixel difference out of 255), against float32
# measured maxima over the features (CPU, torch 2.13): fp16+fp32vae 0.0035 / 2, fp16+bf16vae 0.0040 / 6,
# bf16 0.026 / 19 (img2img, which adds the VAE encoder's rounding); about twice that is allowed
TOL = {"fp16+fp32vae": (0.01, 4), "fp16+bf16vae": (0.01, 10), "bf16": (0.05, 32)}


def _load(bundle, **kw):
    p = load_pipeline(str(bundle / "sdxl"), str(bundle / "instantid"), device="cpu",
                      controlnets={"extra": str(bundle / "controlnet-extra")},
                      loras={"style": str(bundle / "lora" / "pytorch_lora_weights.safetensors")}, **kw)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def ref(tiny_bundle):
    return _load(tiny_bundle)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tiny_bundle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CpuHalfPrecisionWarning)
        return request.param, _load(tiny_bundle, **LAYOUTS[request.param])


def embedding(seed=0):
    return np.random.RandomState(seed).randn(512).astype(np.float32) * 10


def req(**overrides):
    fields = dict(face_embedding=embedding(), keypoint_image=Pose(KPS, (SIZE, SIZE)).draw(), prompt="a person",
                  seed=7)
    fields.update(overrides)
    return GenerationRequest(**fields)


def mask():
    m = PIL.Image.new("L", (SIZE, SIZE), 0)
    m.paste(255, (16, 12, 48, 52))
    return m.convert("RGB")


def two_people():
    a = np.array([[12, 20], [20, 20], [16, 25], [13, 29], [19, 29]], dtype=float)
    people, _ = place_people([embedding(0), embedding(1)], [Placement(keypoints=a), Placement(keypoints=a + [36, 24])],
                             SIZE, SIZE)
    return people


def init_image():
    rng = np.random.default_rng(3)
    return PIL.Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


# feature -> (requests, generate kwargs, LoRA scales)
FEATURES = {
    "txt2img": lambda: ([req(num_images=2)], {}, {}),
    "img2img": lambda: ([req(init_image=init_image(), strength=0.6)], {"steps": 4}, {}),
    "control_mask": lambda: ([req(control_mask=mask()), req(seed=2)], {}, {}),
    "lpw": lambda: ([req(prompt="(a person:1.3), " * 8, negative_prompt="[blurry]", prompt_weighting="lpw"),
                     req(prompt="a", prompt_weighting="lpw", seed=2)], {}, {}),
    "people": lambda: ([GenerationRequest(people=two_people(), prompt="two people", seed=4)], {}, {}),
    "extra_controlnet": lambda: ([req(controls=[ControlInput("extra", Pose(KPS, (SIZE, SIZE)).draw(), 0.8)])], {},
                                 {}),
    "lora": lambda: ([req()], {}, {"style": 0.8}),
    "lcm_no_cfg": lambda: ([req(guidance_scale=1.0)], {"scheduler": "lcm"}, {}),
    "scales_mixed": lambda: ([req(ip_adapter_scale=0.4, controlnet_conditioning_scale=0.6),
                              req(seed=2, ip_adapter_scale=1.1, control_guidance_end=0.5)], {}, {}),
}


def generate(pipe, requests, kw, loras, output_type, callback=None):
    pipe.set_loras(loras)
    try:
        return pipe.generate(requests, width=SIZE, height=SIZE, steps=kw.get("steps", 2),
                             scheduler=kw.get("scheduler", "default"), output_type=output_type, callback=callback)
    finally:
        pipe.set_loras({})


@torch.no_grad()
def decode(pipe, latents: list) -> list:
    return [im for x in latents for im in pipe._decode(x, "pil")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def pixel_diff(a: list, b: list) -> int:
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b))


def test_the_loader_gives_the_cuda_layout_on_the_cpu_with_a_warning(tiny_bundle, layout):
    name, pipe = layout
    models, vae = WANT[name]
    assert {m.dtype for m in (pipe.unet, pipe.controlnet, pipe.extra_controlnets["extra"], pipe.text_encoder,
                              pipe.text_encoder_2)} == {models}
    assert next(pipe.image_proj_model.parameters()).dtype == models
    assert pipe.vae.dtype == vae
    with pytest.warns(CpuHalfPrecisionWarning, match="slow"):
        from instantid.loading import pick_dtype
        pick_dtype(LAYOUTS[name]["dtype"], "cpu")


_REFERENCE: dict = {}  # feature -> float32 (latents, pixels), computed once for all three layouts


@pytest.mark.parametrize("feature", list(FEATURES))
def test_every_feature_is_finite_and_near_float32(ref, layout, feature):
    name, pipe = layout
    requests, kw, loras = FEATURES[feature]()
    if feature not in _REFERENCE:
        want = generate(ref, requests, kw, loras, "latent")
        _REFERENCE[feature] = want, decode(ref, want)
    want, want_px = _REFERENCE[feature]
    got = generate(pipe, requests, kw, loras, "latent")
    got_px = decode(pipe, got)
    errors = [rel(g, w) for g, w in zip(got, want)]
    print(f"\nPARITY {name} {feature} latent_rel={max(errors):.5f} pixel={pixel_diff(got_px, want_px)}")
    assert all(torch.isfinite(g).all() for g in got)
    assert max(errors) <= TOL[name][0]
    assert pixel_diff(got_px, want_px) <= TOL[name][1]
    assert pipe.vae.dtype == WANT[name][1]  # no request recasts the VAE


def test_dropped_rows_are_near_float32(ref, layout):
    name, pipe = layout
    requests = [req(seed=1, control_mask=mask(), num_images=2), req(seed=2, prompt="b " * 40, prompt_weighting="lpw"),
                req(seed=3, face_embedding=embedding(2))]
    drop = lambda step, total: [0, 2] if step >= 2 else None  # noqa: E731
    want = generate(ref, requests, {"steps": 4}, {}, "latent", drop)
    got = generate(pipe, requests, {"steps": 4}, {}, "latent", drop)
    assert got[1] is None and want[1] is None
    errors = [rel(got[k], want[k]) for k in (0, 2)]
    print(f"\nPARITY {name} dropped latent_rel={max(errors):.5f}")
    assert all(torch.isfinite(got[k]).all() for k in (0, 2)) and max(errors) <= TOL[name][0]


def test_safety_checker_and_identity_score_in_the_layouts_dtype(tiny_bundle, ref, layout):
    from instantid.face import FaceModel
    from instantid.safety import SafetyChecker
    from instantid.scoring import score_image

    name, pipe = layout
    models, _ = WANT[name]
    images = generate(pipe, [req(num_images=2)], {}, {}, "pil")[0]
    for checker, expected in (("safety", False), ("safety-flag-all", True)):
        half = SafetyChecker.load(str(tiny_bundle / checker), "cpu", models)
        assert next(half.model.parameters()).dtype == models
        assert half.check(images) == SafetyChecker.load(str(tiny_bundle / checker)).check(images) == [expected] * 2
    # the score analyses 8-bit pixels on the CPU (ONNX): the layout reaches it only through the images
    analyzer = FaceModel(str(tiny_bundle / "antelopev2"))
    reference = generate(ref, [req(num_images=2)], {}, {}, "pil")[0]
    for got, want in zip(images, reference):
        a, b = score_image(analyzer, got, embedding()), score_image(analyzer, want, embedding())
        assert a.face_found == b.face_found
        if a.face_found:
            assert abs(a.similarity - b.similarity) <= 0.05


def test_optimize_bf16_vae_survives_img2img(tiny_bundle):
    """optimize(fp16_vae='bf16') on the fp16 layout: img2img encodes and decodes in bfloat16 and leaves the VAE
    there (it used to recast the VAE to float16 on the first img2img request)."""
    from instantid.optimize import optimize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CpuHalfPrecisionWarning)
        pipe = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu",
                             dtype="float16", vae_dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    optimize(pipe, compile=False, fp16_vae="bf16", channels_last=False, fuse_qkv=False)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
             for m in (pipe.vae.encoder, pipe.vae.decoder)]
    try:
        out = pipe.generate([req(init_image=init_image(), strength=0.6)], width=SIZE, height=SIZE, steps=4)[0]
    finally:
        for h in hooks:
            h.remove()
    assert seen == [torch.bfloat16, torch.bfloat16] and pipe.vae.dtype == torch.bfloat16
    assert np.isfinite(np.asarray(out[0], np.float32)).all()


def test_a_float16_vae_that_needs_upcasting_runs_in_float32_and_stays_float16(tiny_bundle):
    """A float16 force_upcast VAE (from_pretrained in float16, without the loader): encode and decode run it
    in float32, as diffusers does, and put it back in float16."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CpuHalfPrecisionWarning)
        pipe = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu",
                             dtype="float16", vae_dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, next(m.parameters()).dtype)))
             for m in (pipe.vae.encoder, pipe.vae.decoder)]
    try:
        pipe.generate([req(init_image=init_image(), strength=0.6)], width=SIZE, height=SIZE, steps=4)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [(torch.float32, torch.float32)] * 2 and pipe.vae.dtype == torch.float16


def test_vae_dtype_float16_is_refused_for_a_vae_that_overflows(tiny_bundle):
    from instantid.errors import InvalidParameterError

    with warnings.catch_warnings(), pytest.raises(InvalidParameterError, match="overflows in float16"):
        warnings.simplefilter("ignore", CpuHalfPrecisionWarning)
        load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu", dtype="float16",
                      vae_dtype="float16")

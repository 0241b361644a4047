"""End-to-end generation on the tiny bundle: determinism, batching, and that every input is wired where it
belongs (the ID tokens reach only the adapter and IdentityNet; scales and windows switch paths off exactly)."""

import numpy as np
import pytest
import torch

from instantid.errors import InvalidParameterError
from instantid.identity import Pose
from instantid.loading import load_pipeline
from instantid.pipeline import ControlInput, GenerationRequest

SIZE = 64
KPS = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=float)


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    p = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu",
                      controlnets={"extra": str(tiny_bundle / "controlnet-extra")},
                      loras={"style": str(tiny_bundle / "lora" / "pytorch_lora_weights.safetensors")})
    p.set_progress_bar_config(disable=True)
    return p


def embedding(seed=0):
    return np.random.RandomState(seed).randn(512).astype(np.float32) * 10


def request(**overrides):
    fields = dict(face_embedding=embedding(), keypoint_image=Pose(KPS, (SIZE, SIZE)).draw(), prompt="a person",
                  seed=7)
    fields.update(overrides)
    return GenerationRequest(**fields)


def run(pipe, *requests, steps=3, scheduler="default", size=(SIZE, SIZE)):
    latents = pipe.generate(list(requests), width=size[0], height=size[1], steps=steps, scheduler=scheduler,
                            output_type="latent")
    return [x.clone() for x in latents]


def same(a, b):
    return torch.equal(a, b)


def test_images_have_the_requested_size_and_count(pipe):
    images = pipe.generate([request(num_images=2)], width=64, height=96, steps=2)[0]
    assert len(images) == 2 and all(im.size == (64, 96) for im in images)


def test_same_seed_same_image_other_seed_other_image(pipe):
    a, b, c = run(pipe, request()), run(pipe, request()), run(pipe, request(seed=8))
    assert same(a[0], b[0]) and not same(a[0], c[0])


def test_official_call_signature(pipe):
    out = pipe("a person", image_embeds=embedding(), image=Pose(KPS, (SIZE, SIZE)).draw(), num_inference_steps=2,
               generator=torch.Generator().manual_seed(7), output_type="latent")
    assert same(out.images[0], run(pipe, request(), steps=2)[0][0])


def test_batched_requests_equal_separate_runs(pipe):
    r1 = request(seed=1, prompt="a", ip_adapter_scale=0.5, controlnet_conditioning_scale=0.3, guidance_scale=3.0)
    r2 = request(seed=2, prompt="", face_embedding=embedding(1), num_images=2, ip_adapter_scale=1.2,
                 control_guidance_end=0.5)
    together = run(pipe, r1, r2)
    alone = run(pipe, r1) + run(pipe, r2)
    for t, a in zip(together, alone):
        torch.testing.assert_close(t, a, rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_karras", "euler", "lcm"])
def test_schedulers_are_per_request_and_reproducible(pipe, scheduler):
    r1, r2 = request(seed=1), request(seed=2, face_embedding=embedding(3))
    together = run(pipe, r1, r2, scheduler=scheduler)
    torch.testing.assert_close(together[0], run(pipe, r1, scheduler=scheduler)[0], rtol=1e-3, atol=2e-4)
    torch.testing.assert_close(together[1], run(pipe, r2, scheduler=scheduler)[0], rtol=1e-3, atol=2e-4)


def test_face_tokens_only_reach_the_adapter_and_identitynet(pipe):
    base = dict(ip_adapter_scale=0.0, controlnet_conditioning_scale=0.0)
    a = run(pipe, request(face_embedding=embedding(0), **base))
    b = run(pipe, request(face_embedding=embedding(1), **base))
    assert same(a[0], b[0])  # both paths off: the face has no other way in
    a = run(pipe, request(face_embedding=embedding(0), ip_adapter_scale=0.0))
    b = run(pipe, request(face_embedding=embedding(1), ip_adapter_scale=0.0))
    assert not same(a[0], b[0])  # IdentityNet alone carries it
    a = run(pipe, request(face_embedding=embedding(0), controlnet_conditioning_scale=0.0))
    b = run(pipe, request(face_embedding=embedding(1), controlnet_conditioning_scale=0.0))
    assert not same(a[0], b[0])  # the adapter alone carries it


def test_keypoints_matter_only_through_identitynet(pipe):
    moved = Pose(KPS + 8, (SIZE, SIZE)).draw()
    assert not same(run(pipe, request())[0], run(pipe, request(keypoint_image=moved))[0])
    off = dict(controlnet_conditioning_scale=0.0)
    assert same(run(pipe, request(**off))[0], run(pipe, request(keypoint_image=moved, **off))[0])


def test_control_window_outside_all_steps_equals_zero_scale(pipe):
    assert same(run(pipe, request(control_guidance_start=0.0, control_guidance_end=0.0))[0],
                run(pipe, request(controlnet_conditioning_scale=0.0))[0])
    assert not same(run(pipe, request(control_guidance_end=0.5))[0], run(pipe, request())[0])


def test_guidance_and_prompts_change_the_image(pipe):
    base = run(pipe, request())[0]
    assert not same(base, run(pipe, request(guidance_scale=1.0))[0])
    assert not same(base, run(pipe, request(prompt="someone else"))[0])
    assert not same(base, run(pipe, request(negative_prompt="blurry"))[0])
    assert not same(base, run(pipe, request(prompt=""))[0])


def test_lora_changes_the_image_and_switches_off_cleanly(pipe):
    base = run(pipe, request())[0]
    pipe.set_loras({"style": 0.8})
    try:
        styled = run(pipe, request())[0]
    finally:
        pipe.set_loras({})
    assert not same(base, styled)
    assert same(base, run(pipe, request())[0])
    with pytest.raises(InvalidParameterError, match="unknown LoRA"):
        pipe.set_loras({"nope": 1.0})


def test_extra_controlnet_adds_its_residuals(pipe):
    base = run(pipe, request())[0]
    control = Pose(KPS[::-1] + 4, (SIZE, SIZE)).draw()
    with_control = run(pipe, request(controls=[ControlInput("extra", control, scale=0.9)]))[0]
    zero = run(pipe, request(controls=[ControlInput("extra", control, scale=0.0)]))[0]
    assert not same(base, with_control)
    assert same(base, zero)


def test_bad_sizes_and_mixed_batches_are_refused(pipe):
    with pytest.raises(InvalidParameterError, match="width"):
        run(pipe, request(), size=(60, 64))
    with pytest.raises(InvalidParameterError, match="guidance"):
        run(pipe, request(), request(guidance_scale=1.0))
    with pytest.raises(InvalidParameterError, match="controls"):
        run(pipe, request(controls=[ControlInput("missing", Pose(KPS, (SIZE, SIZE)).draw())]))


def test_callback_drops_requests_rows_and_the_rest_go_on(pipe):
    """A request the step callback no longer wants leaves the batch (fewer UNet rows from the next step on, None
    in the result); the others end exactly as in a batch without it (up to batched-matmul rounding)."""
    r1 = request(seed=1, prompt="a", ip_adapter_scale=0.5, guidance_scale=3.0, num_images=2)
    r2 = request(seed=2, prompt="", face_embedding=embedding(1), ip_adapter_scale=1.2,
                 controlnet_conditioning_scale=0.5)
    r3 = request(seed=3, prompt="c", face_embedding=embedding(2), guidance_scale=2.0)
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda _, args: rows.append(int(args[0].shape[0])))
    try:
        dropped = pipe.generate([r1, r2, r3], width=SIZE, height=SIZE, steps=4, output_type="latent",
                                callback=lambda step, total: [0, 2] if step >= 2 else None)
    finally:
        hook.remove()
    assert dropped[1] is None
    assert rows == [2 * 4] * 2 + [2 * 3] * 2  # guided: two copies of (2 + 1 + 1) rows, then of (2 + 1)
    kept = run(pipe, r1, r2, r3, steps=4)
    for got, want in ((dropped[0], kept[0]), (dropped[2], kept[2])):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4)
    # nobody left: it stops at once and returns no images
    calls = []
    out = pipe.generate([r2], width=SIZE, height=SIZE, steps=5, callback=lambda step, total: calls.append(step) or [])
    assert out == [None] and calls == [1]


def test_dropping_rows_keeps_control_masks_and_text_padding_aligned(pipe):
    """Rows leaving the batch take their control-mask and text-padding rows with them: a masked request and a
    long-prompt request (padded text) in one batch, the middle one dropped, the others end as without the drop."""
    from PIL import Image

    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 12, 48, 52))
    r1 = request(seed=1, control_mask=mask.convert("RGB"), num_images=2)
    r2 = request(seed=2, prompt="a (very:1.3) detailed portrait, " * 20, face_embedding=embedding(1))
    r3 = request(seed=3, prompt="c", face_embedding=embedding(2))
    dropped = pipe.generate([r1, r2, r3], width=SIZE, height=SIZE, steps=4, output_type="latent",
                            callback=lambda step, total: [0, 2] if step >= 2 else None)
    assert dropped[1] is None
    kept = run(pipe, r1, r2, r3, steps=4)
    for got, want in ((dropped[0], kept[0]), (dropped[2], kept[2])):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4)

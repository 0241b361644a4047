"""Golden regression values for the tiny bundle: CI catches any numeric drift from the parity-checked pipeline.

The other pipeline tests compare the pipeline with itself (determinism, batched == separate, "an input changes
the image"), so a change that alters the semantics everywhere at once passes them — e.g. the CFG unconditional
branch fed the real face embedding instead of zeros. This file pins a small fingerprint (a few statistics and a
handful of values) of the first step's noise prediction (both CFG halves) and of the final latents, for fixed
requests on the tiny bundle, which ``make_tiny`` builds byte-identically from fixed seeds.

Tolerance: the pipeline runs in float32 on CPU (the only CPU dtype). Kernels may round differently on another
CPU or thread count (~1e-6 relative per op); 1e-4 relative + 1e-4 absolute leaves room for that over 3 steps,
while a semantic change moves these values by 1e-3 to 1e-1 (the mutation above: by 4e-3 to 0.17).

Re-record (``./scripts/test tests/instantid/test_golden.py --record-golden``, then commit the JSON) ONLY when
- a pinned dependency changes how the tiny bundle's random weights are drawn (torch's RNG, diffusers' or
  transformers' module order), which shows as the bundle's files changing; or
- the pipeline's numerics change on purpose, and ``bench/parity_official.py run`` (docs/parity.md) has just
  passed against the official InstantID code on the new version.
Never re-record to make a failing test pass without one of these reasons: a failure here means the pipeline
no longer computes what the official code computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from instantid.identity import Pose
from instantid.loading import load_pipeline
from instantid.pipeline import GenerationRequest

GOLDEN = Path(__file__).parent / "golden" / "tiny_pipeline.json"
KPS = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=float)
RTOL = ATOL = 1e-4
SAMPLES = 8  # values pinned per tensor, evenly spread over the flattened tensor

# Each case: request fields, then generate()'s keyword arguments. Defaults (guidance 5.0, both scales 0.8) first.
CASES = {
    "defaults-cfg": (dict(prompt="a person", seed=7), dict(steps=3)),
    "scales-window-negative-two-images": (
        dict(prompt="a person, portrait", negative_prompt="blurry", seed=11, num_images=2, ip_adapter_scale=0.5,
             controlnet_conditioning_scale=0.6, control_guidance_end=0.5, guidance_scale=3.0),
        dict(steps=3, scheduler="dpmpp_2m_karras")),
    "unguided": (dict(prompt="a person", seed=3, guidance_scale=1.0), dict(steps=2, scheduler="euler_a")),
    # each demo feature and mode (issue 30); the parity harness checks the same features against the official code
    "lpw-weighted": (dict(prompt="a (person:1.3), [blurry] (((portrait)))", negative_prompt="(ugly:1.2)",
                          prompt_weighting="lpw", seed=5), dict(steps=2)),
    "control-mask": (dict(prompt="a person", seed=6, control_mask="face-box"), dict(steps=2)),
    "img2img-default-strength": (dict(prompt="a person", seed=8, init_image=0), dict(steps=5)),
    "img2img-strength-0.3": (dict(prompt="a person", seed=8, init_image=0, strength=0.3), dict(steps=7)),
    "two-people": (dict(prompt="two people", seed=9, people="two"), dict(steps=2, width=96)),
    "guidance-window-0.3-0.7": (dict(prompt="a person", seed=4, control_guidance_start=0.3,
                                     control_guidance_end=0.7), dict(steps=3)),
    "seed-0": (dict(prompt="a person", seed=0), dict(steps=2)),
    "non-square-96x64": (dict(prompt="a person", seed=2, control_mask="face-box"), dict(steps=2, width=96)),
}
TWO_PEOPLE = [np.array([[10, 22], [22, 22], [16, 30], [11, 38], [21, 38]], dtype=float),
              np.array([[74, 22], [86, 22], [80, 30], [75, 38], [85, 38]], dtype=float)]


def build(fields: dict, width: int, height: int) -> dict:
    """Request fields with the named inputs built: a face-box control mask, a random init image, two people."""
    from PIL import Image

    from instantid.people import Placement, place_people

    fields = dict(fields)
    embedding = np.random.RandomState(0).randn(512).astype(np.float32) * 10
    pose = Pose(KPS, (64, 64), np.array([12, 10, 52, 56], dtype=float))
    if fields.get("control_mask") == "face-box":
        fields["control_mask"] = pose.face_mask(width, height)
    if "init_image" in fields:
        rng = np.random.RandomState(fields["init_image"])
        fields["init_image"] = Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))
    if fields.pop("people", None) == "two":
        second = np.random.RandomState(1).randn(512).astype(np.float32) * 10
        fields["people"], _ = place_people([embedding, second], [Placement(keypoints=k) for k in TWO_PEOPLE],
                                           width, height)
        return fields
    return dict(face_embedding=embedding, keypoint_image=pose.draw(width, height), **fields)


def fingerprint(tensor: torch.Tensor) -> dict:
    flat = tensor.detach().double().flatten()
    picks = torch.linspace(0, flat.numel() - 1, SAMPLES).round().long()
    return {"shape": list(tensor.shape), "mean": flat.mean().item(), "std": flat.std().item(),
            "abs_max": flat.abs().max().item(), "values": flat[picks].tolist()}


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    p = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def run_case(pipe, name: str) -> dict:
    fields, kwargs = CASES[name]
    kwargs = {"width": 64, "height": 64, **kwargs}
    request = GenerationRequest(**build(fields, kwargs["width"], kwargs["height"]))
    noise = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: noise.append(out[0].clone()))
    try:
        latents = pipe.generate([request], output_type="latent", **kwargs)[0]
    finally:
        hook.remove()
    # the first UNet call's output: rows [uncond..., cond...] under CFG, cond only without
    return {"first_noise_pred": fingerprint(noise[0]), "final_latents": fingerprint(latents)}


@pytest.fixture(scope="module")
def golden(request):
    if request.config.getoption("--record-golden"):
        return None
    assert GOLDEN.is_file(), f"{GOLDEN} is missing: record it with --record-golden (see this file's docstring)"
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def recorded(request):
    values: dict = {}
    yield values
    if request.config.getoption("--record-golden") and values:
        GOLDEN.parent.mkdir(exist_ok=True)
        old = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        GOLDEN.write_text(json.dumps({**old, **values}, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiny_pipeline_matches_golden_values(pipe, golden, recorded, name):
    got = run_case(pipe, name)
    if golden is None:
        recorded[name] = got
        pytest.skip(f"recorded {name} into {GOLDEN}")
    want = golden[name]
    for part in ("first_noise_pred", "final_latents"):
        assert got[part]["shape"] == want[part]["shape"], part
        for key in ("mean", "std", "abs_max", "values"):
            torch.testing.assert_close(torch.tensor(got[part][key], dtype=torch.float64),
                                       torch.tensor(want[part][key], dtype=torch.float64), rtol=RTOL, atol=ATOL,
                                       msg=lambda m, part=part, key=key: f"{name} {part} {key}: {m}")

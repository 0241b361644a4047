"""The output safety filter on diffusers' StableDiffusionSafetyChecker, in its real layout at toy width; the
thresholds of the tiny checkers make them flag every image or none, so each action is tested deterministically."""

import numpy as np
import PIL.Image
import pytest
import torch

from instantid.errors import WeightsError
from instantid.safety import SafetyChecker, blur


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]


def test_flags_follow_the_concept_thresholds(tiny_bundle, images):
    assert SafetyChecker.load(str(tiny_bundle / "safety")).check(images) == [False] * 3
    assert SafetyChecker.load(str(tiny_bundle / "safety-flag-all")).check(images) == [True] * 3


def test_flags_are_the_checkers_own_on_a_direct_diffusers_run(tiny_bundle, images):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    # a checker with one threshold set between two images' scores flags exactly the one above it
    model = StableDiffusionSafetyChecker.from_pretrained(tiny_bundle / "safety").eval()
    processor = CLIPImageProcessor.from_pretrained(tiny_bundle / "safety")
    pixels = processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = model.visual_projection(model.vision_model(pixels)[1])
        norm = torch.nn.functional.normalize
        cos = norm(embeds) @ norm(model.concept_embeds).T
    scores = cos[:, 0]
    order = scores.argsort()
    with torch.no_grad():
        model.concept_embeds_weights[0] = (scores[order[0]] + scores[order[1]]) / 2
    ours = SafetyChecker(model, processor).check(images)
    expected = [True] * 3
    expected[int(order[0])] = False
    assert ours == expected
    _, direct = model(images=[np.zeros((1, 1, 3))] * 3, clip_input=pixels)
    assert ours == [bool(f) for f in direct]


def test_actions(tiny_bundle, images):
    checker = SafetyChecker.load(str(tiny_bundle / "safety-flag-all"))
    blurred, flags = checker.apply(images, "blur")
    assert flags == [True] * 3
    for before, after in zip(images, blurred):
        assert after.size == before.size
        assert np.array(after).std() < np.array(before).std() / 4  # noise blurred away
        assert np.array_equal(np.array(after), np.array(blur(before)))
    kept, flags = checker.apply(images, "refuse")
    assert flags == [True] * 3 and all(a is b for a, b in zip(kept, images))
    clean, flags = SafetyChecker.load(str(tiny_bundle / "safety")).apply(images, "blur")
    assert flags == [False] * 3 and all(a is b for a, b in zip(clean, images))
    with pytest.raises(ValueError, match="blur"):
        checker.apply(images, "hide")


def test_missing_checker_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="config.json"):
        SafetyChecker.load(str(tmp_path))

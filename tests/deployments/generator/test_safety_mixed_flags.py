"""The safety policy with mixed flags in one batch (issue 30): the checker's flags, in one pass over every image of
the tasks that keep it on, go back to the right image of the right task. The checker here is a stub that flags a
chosen pattern (the CLIP checker itself is tested in tests/instantid/test_safety.py); what is tested is the
Generator's bookkeeping, which a misaligned index would get wrong silently."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deployments.generator.deployment import GeneratorCore
from deployments.messages import GenerationResult, GenerationTask
from deployments.tiny_profile import resolve_args
from instantid.safety import blur
from serve_helpers import app_args


class PatternChecker:
    def __init__(self, flags):
        self.flags, self.seen = list(flags), []

    def check(self, images):
        self.seen.append(len(images))
        assert len(images) == len(self.flags)
        return list(self.flags)


def task(n, on=True):
    return GenerationTask(model="tiny", embedding=np.ones(512, np.float32), kps=np.zeros((5, 2)), canvas=(64, 64),
                          width=64, height=64, steps=2, num_images=n, safety_checker=on)


def result(n, base):
    # distinct noisy images, so a blur or a swap shows
    rng = np.random.default_rng(base)
    return GenerationResult(images=[rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)], seed=base,
                            model="tiny", timings={})


@pytest.mark.parametrize("action", ["blur", "refuse"])
def test_mixed_flags_reach_the_right_images(tiny_bundle, action):
    core = GeneratorCore(resolve_args(app_args(tiny_bundle, safety={"enabled": True, "action": action})))
    # task 0: 2 images (flagged, clean); task 1: off; task 2: 1 image (flagged); task 3: 3 (clean, flagged, flagged)
    checker = PatternChecker([True, False, True, False, True, True])
    core.safety_checker = lambda: checker
    jobs = [task(2), task(2, on=False), task(1), task(3)]
    raw = [result(2, 1), result(2, 2), result(1, 3), result(3, 4)]
    originals = [[a.copy() for a in r.images] for r in raw]
    out = core.screen(jobs, raw)
    assert checker.seen == [6]  # one pass, the checked tasks' images only

    def blurred(a):
        return np.asarray(blur(Image.fromarray(a)))

    assert out[0].nsfw == [True, False]
    np.testing.assert_array_equal(out[0].images[0], blurred(originals[0][0]))
    np.testing.assert_array_equal(out[0].images[1], originals[0][1])
    assert out[1].nsfw is None and all(np.array_equal(a, b) for a, b in zip(out[1].images, originals[1]))
    if action == "refuse":  # every image of task 2 flagged: refused; the mixed tasks are blurred where flagged
        assert getattr(out[2], "status", None) == 422 and out[2].code == "unsafe_output"
    else:
        assert out[2].nsfw == [True]
        np.testing.assert_array_equal(out[2].images[0], blurred(originals[2][0]))
    assert out[3].nsfw == [False, True, True]
    np.testing.assert_array_equal(out[3].images[0], originals[3][0])
    for k in (1, 2):
        np.testing.assert_array_equal(out[3].images[k], blurred(originals[3][k]))

"""Every field of the Generator's batch key, each by a pair of tasks that differ only in it (issue 30). A field
the pipeline shares across a batch (size, steps, scheduler, guidance on/off, LoRA set, img2img strength, extra
ControlNets) must split the batch: dropped from the key, one task would silently get the other's. Fields the
pipeline keeps per request must not split it (that only costs throughput, and is tested too)."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.messages import GenerationTask
from serve_helpers import png_bytes


def task(**fields) -> GenerationTask:
    base = dict(model="m", embedding=np.ones(512, np.float32), kps=np.zeros((5, 2)), canvas=(64, 64), width=64,
                height=64, steps=4, seed=1)
    base.update(fields)
    return GenerationTask(**base)


CONTROL = {"name": "depth", "map": np.zeros((8, 8), np.uint8), "scale": 0.5, "start": 0.0, "end": 1.0}

# (field, base value, other value): tasks equal but for this field must NOT share a batch
SPLITS = [
    ("model", dict(model="m"), dict(model="n")),
    ("width", dict(width=64), dict(width=72)),
    ("height", dict(height=64), dict(height=72)),
    ("steps", dict(steps=4), dict(steps=5)),
    ("scheduler", dict(scheduler="default"), dict(scheduler="euler_a")),
    ("guided", dict(guidance_scale=5.0), dict(guidance_scale=1.0)),
    ("lora set", dict(loras={"a": 0.5}), dict(loras={"b": 0.5})),
    ("lora scale", dict(loras={"a": 0.5}), dict(loras={"a": 0.6})),
    ("strength", dict(init_image=png_bytes(), strength=0.5), dict(init_image=png_bytes(), strength=0.6)),
    ("img2img or not", dict(init_image=png_bytes(), strength=0.8), dict(strength=0.8)),
    ("control nets", dict(controls=[CONTROL]), dict(controls=[{**CONTROL, "name": "canny"}])),
    ("control count", dict(controls=[CONTROL]), dict(controls=[])),
    # combine "concat": 16 ID tokens per photo, so the attention's token count differs
    ("id token groups", dict(embedding=np.ones(512, np.float32)), dict(embedding=np.ones((2, 512), np.float32))),
]

# fields the pipeline takes per request: tasks differing only in these share a batch
SHARES = [
    ("prompt", dict(prompt="a"), dict(prompt="b")),
    ("negative_prompt", dict(negative_prompt=None), dict(negative_prompt="blurry")),
    ("seed", dict(seed=1), dict(seed=2)),
    ("num_images", dict(num_images=1), dict(num_images=3)),
    ("guidance_scale above 1", dict(guidance_scale=5.0), dict(guidance_scale=7.5)),
    ("ip_adapter_scale", dict(ip_adapter_scale=0.8), dict(ip_adapter_scale=0.3)),
    ("controlnet_conditioning_scale", dict(controlnet_conditioning_scale=0.8), dict(controlnet_conditioning_scale=0.2)),
    ("prompt_weighting", dict(prompt_weighting="lpw"), dict(prompt_weighting="none")),
    ("lora order", dict(loras={"a": 0.5, "b": 0.2}), dict(loras={"b": 0.2, "a": 0.5})),
    ("strength without init_image", dict(strength=0.5), dict(strength=0.6)),
    ("control scale", dict(controls=[CONTROL]), dict(controls=[{**CONTROL, "scale": 0.9, "end": 0.5}])),
    ("enhance_face_region", dict(enhance_face_region=False), dict(enhance_face_region=True, bbox=[1, 1, 9, 9])),
]


@pytest.mark.parametrize("name, a, b", SPLITS, ids=[s[0] for s in SPLITS])
def test_a_field_the_batch_shares_splits_it(name, a, b):
    assert task(**a).batch_key() != task(**b).batch_key()
    assert task(**a).batch_key() == task(**a).batch_key()


@pytest.mark.parametrize("name, a, b", SHARES, ids=[s[0] for s in SHARES])
def test_a_per_request_field_does_not_split_the_batch(name, a, b):
    assert task(**a).batch_key() == task(**b).batch_key()


def test_every_key_field_is_covered():
    """A new field in the key needs a pair above: the key's length is pinned here."""
    assert len(task().batch_key()) == 10

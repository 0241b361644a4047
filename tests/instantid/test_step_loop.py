"""The denoising loop makes no tensors from Python values: scales and windows become one (steps, rows) tensor per
batch, 0-d scale tensors are cached, masks are resized once per batch; so on a GPU no step waits for a host copy.
Counted on the CPU by wrapping torch.tensor and attributing each call to the file that made it."""

import sys

import numpy as np
import PIL.Image
import pytest
import torch

from instantid.identity import Pose
from instantid.loading import load_pipeline
from instantid.pipeline import GenerationRequest

KPS = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=float)


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    p = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def test_no_tensor_from_python_values_inside_the_step_loop(pipe, monkeypatch):
    mask = PIL.Image.new("RGB", (64, 64))
    mask.paste((255, 255, 255), (16, 12, 48, 52))
    emb = np.random.RandomState(0).randn(512).astype(np.float32)
    kps = Pose(KPS, (64, 64)).draw()
    requests = [GenerationRequest(face_embedding=emb, keypoint_image=kps, ip_adapter_scale=0.5, seed=1,
                                  control_mask=mask, control_guidance_end=0.5),
                GenerationRequest(face_embedding=emb, keypoint_image=kps, ip_adapter_scale=1.0, seed=2,
                                  controlnet_conditioning_scale=0.3)]
    real, made = torch.tensor, []

    def counting(*args, **kwargs):
        made.append(sys._getframe(1).f_code.co_filename)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting)
    per_step = []
    pipe.generate(requests, width=64, height=64, steps=4, output_type="latent",
                  callback=lambda step, total: per_step.append(sum("instantid" in f for f in made)))
    assert per_step[0] > 0  # the batch's tables are made before the first step ends
    assert per_step[1:] == [per_step[0]] * 3  # and nothing after: later steps make none

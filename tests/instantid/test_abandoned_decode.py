"""Abandoned work stops inside the VAE decode, not only between denoising steps (issue 30, finding 7: a 2048x2048
decode on CPU ran ~25 s past its 504). ``still_wanted()`` is asked before each of the decoder's blocks."""

from __future__ import annotations

import numpy as np
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


def request(seed):
    return GenerationRequest(face_embedding=np.random.RandomState(0).randn(512).astype(np.float32) * 10,
                             keypoint_image=Pose(KPS, (64, 64)).draw(), prompt="a person", seed=seed)


class BlockCounter:
    """Counts calls of the VAE decoder's up blocks and of its last conv, to see where a decode stopped."""

    def __init__(self, vae):
        self.up = self.out = 0
        self.handles = [b.register_forward_hook(self._up) for b in vae.decoder.up_blocks]
        self.handles.append(vae.decoder.conv_out.register_forward_hook(self._out))

    def _up(self, *_):
        self.up += 1

    def _out(self, *_):
        self.out += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def test_a_request_abandoned_during_its_decode_stops_within_it(pipe):
    asked = []

    def still_wanted():
        asked.append(1)
        return [] if len(asked) > 2 else None  # gone after the decoder's first blocks

    counter = BlockCounter(pipe.vae)
    try:
        out = pipe.generate([request(1)], width=64, height=64, steps=1, still_wanted=still_wanted)
    finally:
        counter.remove()
    assert out == [None]
    assert counter.out == 0 and counter.up < len(pipe.vae.decoder.up_blocks)  # stopped before the decode ended
    assert len(asked) == 3


def test_the_others_in_the_batch_still_get_their_images(pipe):
    alone = pipe.generate([request(2)], width=64, height=64, steps=1, output_type="np")[0]
    out = pipe.generate([request(1), request(2)], width=64, height=64, steps=1, output_type="np",
                        still_wanted=lambda: [1])
    assert out[0] is None
    np.testing.assert_allclose(out[1], alone, atol=1e-3)
    # wanted all along: nothing changes (the checks do not touch the numerics)
    again = pipe.generate([request(2)], width=64, height=64, steps=1, output_type="np", still_wanted=lambda: None)
    assert torch.equal(torch.from_numpy(again[0]), torch.from_numpy(alone))

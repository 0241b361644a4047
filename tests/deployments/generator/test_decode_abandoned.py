"""A job abandoned during its VAE decode stops within it (issue 30, finding 7: a 2048x2048 decode on CPU ran
~25 s past its 504): the Generator hands the pipeline ``still_wanted``, asked before each decoder block."""

from __future__ import annotations

import numpy as np

from deployments.errors import ServiceError
from deployments.generator.deployment import GeneratorCore, accept_task
from deployments.messages import GenerationResult, GenerationTask
from deployments.tiny_profile import resolve_args
from serve_helpers import app_args

KPS = [[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]]


def job(**fields) -> GenerationTask:
    return accept_task(GenerationTask(**{"model": "tiny", "embedding": np.ones(512, np.float32), "kps": KPS,
                                         "canvas": [64, 64], "width": 64, "height": 64, "steps": 1, "seed": 5,
                                         **fields}))


def test_a_job_cancelled_during_its_decode_stops_there(tiny_bundle):
    core = GeneratorCore(resolve_args(app_args(tiny_bundle)))
    model = core.load("tiny")
    decoder = model.pipe.vae.decoder
    gone, kept = job(seed=1), job(seed=2)
    ran = {"conv_out": 0}

    def cancel_first(*_):
        gone.cancelled = True  # the caller went away while the first job's decode was under way

    hook = decoder.up_blocks[0].register_forward_pre_hook(cancel_first)
    count = decoder.conv_out.register_forward_hook(lambda *_: ran.__setitem__("conv_out", ran["conv_out"] + 1))
    try:
        out = core.predict(model, [gone, kept])
    finally:
        hook.remove()
        count.remove()
    assert isinstance(out[0], ServiceError) and out[0].status == 504
    assert isinstance(out[1], GenerationResult) and len(out[1].images) == 1
    assert ran["conv_out"] == 1  # only the job still wanted finished its decode

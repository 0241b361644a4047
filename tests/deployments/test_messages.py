"""The typed messages between deployments: what decides whether a Generator call goes by value or by reference
(a job record's round trip of a task is in test_jobs.py)."""

from __future__ import annotations

import numpy as np

from deployments.ingress.backends import BY_VALUE_MAX_BYTES
from deployments.messages import GenerationTask


def _task(**fields) -> GenerationTask:
    fields = {"width": 64, "height": 64, **fields}
    return GenerationTask(model="sdxl", embedding=np.ones(512, np.float32), kps=np.zeros((5, 2)), canvas=(64, 64),
                          steps=1, **fields)


def test_a_large_upload_in_a_small_request_goes_by_reference():
    # a 64x64 result is 12 KB, but a phone-size img2img photo rides in the task: over gRPC's 4 MiB cap by value
    assert _task().message_bytes() == 64 * 64 * 3 <= BY_VALUE_MAX_BYTES
    assert _task(init_image=b"\xff" * 6_000_000).message_bytes() > BY_VALUE_MAX_BYTES
    maps = [{"name": "depth", "map": np.zeros((1024, 1024, 3), np.uint8), "scale": 0.5, "start": 0.0, "end": 1.0}]
    assert _task(controls=maps).message_bytes() == 1024 * 1024 * 3
    assert _task(num_images=4, width=1024, height=1024).message_bytes() == 4 * 1024 * 1024 * 3


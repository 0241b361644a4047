"""The typed messages between deployments: what decides by value or by reference, and a job record's round trip
of a task with every kind of field (people, control maps, an img2img upload)."""

from __future__ import annotations

import numpy as np

from deployments.backends import BY_VALUE_MAX_BYTES
from deployments.jobs import pack, unpack
from deployments.messages import GenerationTask, PersonPlacement
from deployments.service import PreparedGeneration


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


def test_a_job_record_keeps_people_controls_and_uploads():
    people = [PersonPlacement(embedding=np.full(512, k, np.float32), kps=np.arange(10.0).reshape(5, 2) + k,
                              region=(k * 32, 0, k * 32 + 32, 64)) for k in range(2)]
    maps = [{"name": "canny", "map": np.arange(64 * 64, dtype=np.uint8).reshape(64, 64), "scale": 0.3,
             "start": 0.0, "end": 1.0}]
    task = _task(people=people, controls=maps, init_image=b"\x89PNG...", seed=7)
    prepared = PreparedGeneration(task=task, face={"bbox": [1, 2, 3, 4]}, embedding=None, references=None,
                                  people=[{"face_index": 0}, {"face_index": 1}])
    back = unpack(pack(prepared))
    assert isinstance(back.task.people[0], PersonPlacement) and back.task.people[1].region == (32, 0, 64, 64)
    np.testing.assert_array_equal(back.task.people[1].embedding, people[1].embedding)
    np.testing.assert_array_equal(back.task.people[0].kps, people[0].kps)
    np.testing.assert_array_equal(back.task.controls[0]["map"], maps[0]["map"])
    assert back.task.init_image == b"\x89PNG..." and back.task.seed == 7
    assert back.people == prepared.people and back.face == prepared.face
    assert back.task.batch_key() == task.batch_key()

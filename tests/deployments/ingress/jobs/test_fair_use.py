"""Fair-use pieces with known answers: the result-size bound against real encoded images, the per-key slots, and
the views that embed a stored result as its text."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from deployments.errors import ServiceError
from deployments.ingress.http.auth import KeySlots
from deployments.ingress.jobs.fair_use import dumps_with_raw, image_bytes, result_bytes
from deployments.ingress.jobs.store import RawJSON


@pytest.mark.parametrize("size", [(64, 64), (256, 128), (512, 512)])
def test_the_image_bound_holds_for_the_worst_case_png(size):
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # incompressible
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    encoded = len(base64.b64encode(buf.getvalue()))
    assert encoded <= image_bytes(*size) <= encoded * 1.05 + 6000  # a bound, and a tight one


def test_result_bound_known_answers():
    one = image_bytes(2048, 2048)
    assert one == -(-(2048 * 2048 * 3 + 2048 + 4096) * 4 // 3)  # 16_780_630: 2048^2 RGB, base64
    assert result_bytes(2048, 2048, 2, inline=True, pose_image=False) == 64 * 1024 + 2 * one  # the 26 MB record
    assert result_bytes(2048, 2048, 2, inline=False, pose_image=False) == 64 * 1024  # s3: URLs only
    assert result_bytes(1024, 1024, 1, inline=False, pose_image=True) == 64 * 1024 + image_bytes(1024, 1024)


def test_key_slots_bound_each_key_alone():
    slots = KeySlots(2)
    slots.take("a")
    slots.take("a")
    with pytest.raises(ServiceError) as refused:
        slots.take("a")
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "2"
    assert "auth.max_in_flight" in refused.value.message
    slots.take("b")  # another key is not held up
    slots.give("a")
    slots.take("a")  # one ended: room again
    for _ in range(3):
        slots.give("a")
    assert "a" not in slots.held  # nothing left behind for a key that went quiet


def test_zero_means_no_bound():
    slots = KeySlots(0)
    for _ in range(100):
        slots.take("a")


def test_a_stored_result_is_embedded_as_its_text():
    stored = RawJSON(json.dumps({"images": ["QUJD"], "seed": 1, "note": "a \"quoted\" \u0000 value"}))
    view = {"id": "job_1", "status": "succeeded", "result": stored, "urls": {"get": "/v1/jobs/job_1"},
            "list": [stored]}
    text = dumps_with_raw(view)
    assert json.loads(text) == {**view, "result": json.loads(stored), "list": [json.loads(stored)]}
    assert stored in text  # copied in as is, not re-serialised

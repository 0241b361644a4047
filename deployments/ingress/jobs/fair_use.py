"""Fair use on the job path: how large a job's result may be, and views that embed a stored result without
parsing it (docs/jobs.md, "Fair use")."""

from __future__ import annotations

import json
import math

from deployments.ingress.jobs.store import RawJSON

# base64 of a PNG at most: raw RGB (8-bit PNG's worst case: stored deflate blocks, a filter byte per row, chunk
# headers) x 4/3
PNG_OVERHEAD_BYTES = 4096
JSON_OVERHEAD_BYTES = 64 * 1024  # the response's other fields (timings, seeds, scores, warnings)


def image_bytes(width: int, height: int) -> int:
    """The most bytes one base64 image of this size takes in a result (PNG's worst case; JPEG/WebP are less)."""
    return math.ceil((width * height * 3 + height + PNG_OVERHEAD_BYTES) * 4 / 3)


def result_bytes(width: int, height: int, num_images: int, inline: bool, pose_image: bool) -> int:
    """An upper bound of a job result's JSON size: the images when inline (S3 delivery: URLs), the pose image."""
    size = JSON_OVERHEAD_BYTES
    if inline:
        size += num_images * image_bytes(width, height)
    if pose_image:
        size += image_bytes(width, height)
    return size


_MARK = "\u0000raw{}\u0000"


def dumps_with_raw(view: dict) -> str:
    """``json.dumps(view)`` where RawJSON values (a stored result) are embedded as the text they are: the rest of
    the view is serialised, the result is only copied in (no parse, no re-serialisation of megabytes)."""
    raws: list[str] = []

    def mark(value):
        if isinstance(value, RawJSON):
            raws.append(value)
            return _MARK.format(len(raws) - 1)
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(view), separators=(",", ":"))
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(_MARK.format(i)), raw, 1)
    return text

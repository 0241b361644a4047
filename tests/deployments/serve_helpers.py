"""Helpers shared by the deployments tests (importable: tests/deployments is on sys.path under pytest)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

OUTPUT_BUCKET = "instantid-test-outputs"
IDENTITY_BUCKET = "instantid-test-identities"


def png_bytes(size=(256, 256), color=(128, 128, 128), fmt="PNG") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def app_args(tiny: Path, **overrides) -> dict:
    args = {
        "profile": "tiny",
        "tiny_dir": str(tiny),
        "models": [
            {"name": "tiny", "base_model": str(tiny / "sdxl"),
             "loras": {"tiny-lora": str(tiny / "lora" / "pytorch_lora_weights.safetensors")},
             "controlnets": {**{k: str(tiny / f"controlnet-{k}") for k in ("pose", "canny", "depth")},
                             "extra": str(tiny / "controlnet-extra")}},
            {"name": "tiny-b", "base_model": str(tiny / "sdxl")},
        ],
        "device": "cpu",
        "max_models_per_replica": 1,
        "batch": {"max_batch_size": 4, "batch_wait_timeout_s": 0.2},
        "request_timeout_s": 60,
        "safety": {"enabled": True},  # the tiny profile's checker, set to flag nothing: every image goes through it
        "limits": {"max_body_bytes": 1_500_000, "max_image_pixels": 1500 * 1500, "max_steps": 50,
                   "min_side": 64, "max_side": 512},
    }
    args.update(overrides)
    return args


def sse_events(resp) -> list[tuple[str | None, dict]]:
    """A Server-Sent Events response read to its end: (event name, JSON data) per event, in order."""
    import json

    events, name = [], None
    for line in resp.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line[5:])))
    return events


def assert_error(resp, status: int, code: str, field: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in resp.text
    if field is not None:
        assert body["error"].get("field") == field, body
    return body["error"]


# -- hostile and unusual images (issue 10) -----------------------------------------------------------------
def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a baseline/progressive JPEG as Pillow writes it."""
    import re
    import struct

    pos, out = 2, []
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append((marker, pos, pos + 2))
            return out
        end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if marker == 0xDA:
            end = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(data, end).start()
        out.append((marker, pos, end))
        pos = end
    return out


def progressive_jpeg(side: int, scans: int) -> bytes:
    """A valid progressive JPEG of a flat side x side picture whose last scan is repeated until the file has
    ``scans`` scans: tiny on the wire, each scan a pass over every pixel when decoded (libjpeg only warns)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(out, format="JPEG", progressive=True, quality=90)
    data = out.getvalue()
    segments = _jpeg_segments(data)
    sos = [s for s in segments if s[0] == 0xDA]
    i = segments.index(sos[-1])
    start = segments[i - 1][1] if segments[i - 1][0] == 0xC4 else sos[-1][1]
    return data[:segments[-1][1]] + data[start:sos[-1][2]] * (scans - len(sos)) + b"\xff\xd9"


def jpeg_with_comments(jpeg: bytes, count: int) -> bytes:
    """``jpeg`` with ``count`` empty COM segments after SOI (4 bytes each)."""
    return jpeg[:2] + b"\xff\xfe\x00\x02" * count + jpeg[2:]


def png_with_chunks(png: bytes, count: int) -> bytes:
    """``png`` with ``count`` empty unknown ancillary chunks after IHDR (12 bytes each)."""
    import struct
    import zlib

    chunk = struct.pack(">I", 0) + b"zzZz" + struct.pack(">I", zlib.crc32(b"zzZz") & 0xFFFFFFFF)
    ihdr_end = 8 + 25
    return png[:ihdr_end] + chunk * count + png[ihdr_end:]


def mpo_bytes(photo: bytes) -> bytes:
    """A two-frame MPO (what iPhones and Samsungs write) whose first frame is ``photo``."""
    from PIL import Image

    first = Image.open(io.BytesIO(photo)).convert("RGB")
    out = io.BytesIO()
    first.save(out, format="MPO", save_all=True, append_images=[first.resize((64, 64))], quality=95)
    return out.getvalue()


def png16_gray(photo: bytes) -> bytes:
    """``photo`` as a 16-bit grayscale PNG using the whole 0-65535 range."""
    import numpy as np
    from PIL import Image

    gray = np.asarray(Image.open(io.BytesIO(photo)).convert("L"), dtype=np.uint16) * 257
    out = io.BytesIO()
    Image.fromarray(gray).save(out, format="PNG")  # uint16 -> mode I;16, written as 16-bit gray
    return out.getvalue()

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
             "loras": {"tiny-lora": str(tiny / "lora" / "pytorch_lora_weights.safetensors")}},
            {"name": "tiny-b", "base_model": str(tiny / "sdxl")},
        ],
        "device": "cpu",
        "max_models_per_replica": 1,
        "batch": {"max_batch_size": 4, "batch_wait_timeout_s": 0.2},
        "request_timeout_s": 60,
        "limits": {"max_body_bytes": 1_500_000, "max_image_pixels": 1500 * 1500, "max_steps": 50,
                   "min_side": 64, "max_side": 512},
    }
    args.update(overrides)
    return args


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

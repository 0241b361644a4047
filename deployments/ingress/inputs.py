"""Client input as the request core checks it, whatever surface it came through: base64 fields decoded, and
image headers (format, pixel count, hostile framing) checked before anything is decoded in full. No FastAPI."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from deployments.errors import IMAGE_TOO_LARGE, INVALID_BASE64, INVALID_IMAGE


def decode_base64(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise INVALID_BASE64(f"{where} must be a base64 string", field=where)
    text = text.strip()
    if text.startswith("data:"):
        _, comma, text = text.partition(",")
        if not comma:
            raise INVALID_BASE64(f"{where} is a malformed data URL", field=where)
    text = "".join(text.split())
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise INVALID_BASE64(f"{where} is not valid base64", field=where) from None
    if not data:
        raise INVALID_IMAGE(f"{where} is empty", field=where)
    return data


def check_image(data: bytes, where: str, max_pixels: int) -> None:
    """Format and size from the header only: refuse non-images, oversized images and hostile framing (bounded
    work, ``instantid.image_limits``) before decoding. Blocking: callers run it off the event loop."""
    from instantid.errors import InvalidImageError
    from instantid.image_limits import ImageTooLarge, read_header

    try:
        read_header(data, where, max_pixels)
    except ImageTooLarge as exc:
        raise IMAGE_TOO_LARGE(str(exc), field=where) from None
    except InvalidImageError as exc:
        raise INVALID_IMAGE(str(exc), field=where) from None


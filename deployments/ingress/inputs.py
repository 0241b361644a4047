"""Client input as the request core checks it, whatever surface it came through: base64 fields decoded, and
image headers (format, pixel count, hostile framing) checked before anything is decoded in full. No FastAPI."""

from __future__ import annotations

import base64
import binascii
import io
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
    from PIL import Image

    from instantid.errors import InvalidImageError
    from instantid.image_limits import check_format, check_structure, unreadable

    try:
        check_structure(data, where)
        try:
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
        except Image.DecompressionBombError:
            raise IMAGE_TOO_LARGE(f"{where} has too many pixels", field=where) from None
        except Exception:
            raise unreadable(where) from None
        if width < 1 or height < 1:
            raise InvalidImageError(f"{where} claims a {width}x{height} size")
        check_format(fmt, where)
    except InvalidImageError as exc:
        raise INVALID_IMAGE(str(exc), field=where) from None
    if width * height > max_pixels:
        raise IMAGE_TOO_LARGE(f"{where} is {width}x{height}, more than {max_pixels} pixels", field=where)


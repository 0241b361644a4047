"""Delivery of generated images: one encoding each (PNG, JPEG or WebP), then base64 in the response or an S3
upload answered with presigned URLs."""

from __future__ import annotations

import base64
import io
import time

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(array, fmt: str) -> bytes:
    from PIL import Image

    image = Image.fromarray(array)
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, format="PNG", compress_level=4)
    elif fmt == "jpeg":
        image.save(out, format="JPEG", quality=95)
    else:
        image.save(out, format="WEBP", quality=95, method=4)
    return out.getvalue()


def encode_outputs(arrays: list, fmt: str, pose_array=None) -> tuple[list[bytes], bytes | None]:
    """The outputs in ``fmt`` and the pose image, if any, in PNG. Blocking: callers run it off the event loop."""
    return [encode_image(a, fmt) for a in arrays], (encode_image(pose_array, "png") if pose_array is not None
                                                    else None)


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class S3Delivery:
    """Uploads to ``output_bucket`` (s3://bucket/prefix) under prefix/YYYY/MM/DD/<request id>-<i>.<fmt>, answered
    with presigned GET URLs valid ``presign_expiry_s``."""

    def __init__(self, output_bucket: str, presign_expiry_s: int):
        self.output_bucket = output_bucket
        self.presign_expiry_s = presign_expiry_s
        self._s3 = None

    @property
    def client(self):
        if self._s3 is None:  # bounded waits: a black-holed S3 is a fast 503 storage_unavailable, not a 504
            from instantid.weights import s3_client

            self._s3 = s3_client()
        return self._s3

    def upload(self, encoded: list[bytes], fmt: str, request_id: str) -> list[str]:
        """Blocking: callers run it in a worker thread."""
        from instantid.weights import split_s3

        bucket, prefix = split_s3(self.output_bucket)
        day = time.strftime("%Y/%m/%d", time.gmtime())
        urls = []
        for i, data in enumerate(encoded):
            key = "/".join(p for p in (prefix, day, f"{request_id}-{i}.{fmt}") if p)
            self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=CONTENT_TYPES[fmt])
            urls.append(self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                        ExpiresIn=self.presign_expiry_s))
        return urls

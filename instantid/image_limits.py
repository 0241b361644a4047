"""What an uploaded image may cost before and while it is decoded (no torch; the Ingress uses it too).

Pillow's cost is not bounded by the pixel count alone: it walks every JPEG marker segment and PNG chunk one
Python step at a time (3.5M empty JPEG comments or 1M unknown PNG chunks take seconds), and a progressive
JPEG is decoded once per scan (a 234 KB 4096x4096 file with 3000 scans took ~40 s). ``check_structure``
walks the file's framing in bounded time and refuses those before Pillow sees them; ``load_bounded`` decodes
in small reads that stop at a deadline or when the caller says the request is gone.
"""

from __future__ import annotations

import io
import re
import struct
import time
from typing import Callable

from .errors import InvalidImageError

# MPO is the JPEG that phones write (a primary picture + depth/preview frames); Pillow opens its first frame.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP"})


def unreadable(label: str) -> InvalidImageError:
    return InvalidImageError(f"{label} is not a readable image (JPEG, PNG or WebP expected)")


def check_format(fmt: str | None, label: str) -> None:
    """Refuse what is not one of ACCEPTED_FORMATS, judged by decoded content (Pillow's ``format``), never by file
    name or declared content type. The library's decode and the service's header check both use it."""
    if fmt not in ACCEPTED_FORMATS:
        raise InvalidImageError(f"{label} is a {fmt} image; only JPEG, PNG and WebP are accepted")

# Encoders write ~10 progressive scans (libjpeg's default script), mozjpeg up to ~20: 100 leaves room for any
# real photo and caps a crafted one at 1/30 of the attack's cost. libjpeg-turbo's own scan limit is 500.
MAX_JPEG_SCANS = 100
# Marker segments of a JPEG's first frame (APPn, COM, DQT, DHT, SOF, SOS, ...): a camera file has ~20, a
# progressive one a DHT per scan on top.
MAX_JPEG_SEGMENTS = 1000
# PNG chunks other than IDAT (text, ICC, EXIF...): a real file has a handful. IDAT chunks are bounded by the
# body size only (8-64 KB each as encoders write them), so they are counted against MAX_PNG_CHUNKS.
MAX_PNG_ANCILLARY_CHUNKS = 256
MAX_PNG_CHUNKS = 20_000
# Pillow's decode read size here (its default is 64 KB): how often a decode looks at its deadline. A crafted
# progressive JPEG packs ~30 scans (0.4 s at 4096x4096) into 1 KB; a real 11 MP photo decodes ~20 % slower.
DECODE_BLOCK = 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# a marker inside entropy-coded data: 0xFF followed by neither a stuffed 0x00 nor a restart marker
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


class DecodeAborted(InvalidImageError):
    """A decode stopped at its deadline or because its request went away."""


def check_structure(data: bytes, label: str) -> None:
    """Refuse, in time linear in the file and bounded in Python steps, JPEGs and PNGs whose framing would make
    Pillow slow: too many marker segments, progressive scans or chunks. Other formats pass through."""
    if data[:2] == b"\xff\xd8":
        _check_jpeg(data, label)
    elif data[:8] == _PNG_SIGNATURE:
        _check_png(data, label)


def _check_jpeg(data: bytes, label: str) -> None:
    pos, segments, scans, end = 2, 0, 0, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            return  # garbage between segments: Pillow reports the file as broken itself
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            return
        marker = data[pos]
        pos += 1
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise InvalidImageError(f"{label} has more than {MAX_JPEG_SEGMENTS} JPEG marker segments")
        if marker == 0xD9:  # EOI: the first frame ends (an MPO's other frames follow; they are not decoded)
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            continue
        if pos + 2 > end:
            return
        pos += struct.unpack_from(">H", data, pos)[0]
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next real marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise InvalidImageError(f"{label} is a JPEG with more than {MAX_JPEG_SCANS} scans")
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                return
            pos = found.start()


def _check_png(data: bytes, label: str) -> None:
    pos, chunks, ancillary, end = 8, 0, 0, len(data)
    while pos + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        if kind != b"IDAT":
            ancillary += 1
        if ancillary > MAX_PNG_ANCILLARY_CHUNKS or chunks > MAX_PNG_CHUNKS:
            raise InvalidImageError(f"{label} is a PNG with too many chunks")
        if kind == b"IEND":
            return
        pos += 12 + length


class _DeadlineReader(io.BytesIO):
    """The upload as a file whose reads fail once the decode is past its deadline or told to stop."""

    def __init__(self, data: bytes, label: str, deadline: float, should_stop: Callable[[], bool] | None):
        super().__init__(data)
        self.label, self.deadline, self.should_stop = label, deadline, should_stop

    def read(self, size: int | None = -1) -> bytes:
        if self.should_stop is not None and self.should_stop():
            raise DecodeAborted(f"decoding {self.label} was abandoned: the request is gone")
        if time.monotonic() > self.deadline:
            raise DecodeAborted(f"{self.label} takes too long to decode")
        return super().read(size)


def open_bounded(data: bytes, label: str, timeout_s: float, should_stop: Callable[[], bool] | None = None):
    """``PIL.Image.open`` over a reader that stops at ``timeout_s`` or when ``should_stop()`` says so; the
    decode reads in ``DECODE_BLOCK`` pieces so it looks often."""
    from PIL import Image

    image = Image.open(_DeadlineReader(data, label, time.monotonic() + timeout_s, should_stop))
    image.decodermaxblock = DECODE_BLOCK
    return image

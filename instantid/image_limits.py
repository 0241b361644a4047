"""What an uploaded image may cost before and while it is decoded (no torch; the Ingress uses it too).

Pillow's cost is not bounded by the pixel count alone: it walks every JPEG marker segment and PNG chunk one
Python step at a time (3.5M empty JPEG comments or 1M unknown PNG chunks take seconds), and a progressive
JPEG is decoded once per scan (a 234 KB 4096x4096 file with 3000 scans took ~40 s). Two independent bounds:
``check_structure`` walks the file's framing in bounded time, skipping junk bytes exactly as libjpeg does, and
refuses those before Pillow sees them; ``open_bounded`` decodes in small reads that count the scans the decoder
is handed (scans x pixels bounded), refuse too many pixels, and stop at a deadline or when the caller says the
request is gone. ``read_header`` is the one way to read a format and size without decoding.
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
# What the decoder may spend on scans: scans x pixels, the cost of MAX_JPEG_SCANS scans at the service's pixel limit
# (4096x4096, ~1.2 s here). A 48 MP phone photo may have 35 scans (encoders write ~10).
MAX_SCAN_PIXELS = MAX_JPEG_SCANS * 4096 * 4096
# Pixels the library decodes by default (a 48 MP phone photo passes; the service sets its own, lower, limit).
MAX_DECODE_PIXELS = 64 * 1024 * 1024
# Pillow's decode read size here (its default is 64 KB): how often a decode looks at its deadline. A crafted
# progressive JPEG packs ~30 scans (0.4 s at 4096x4096) into 1 KB; a real 11 MP photo decodes ~20 % slower.
DECODE_BLOCK = 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# a marker inside entropy-coded data: 0xFF followed by neither a stuffed 0x00 nor a restart marker
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# outside a scan, what libjpeg's next_marker finds: it skips any bytes up to a 0xFF, then fill 0xFFs, and goes on
# past a stuffed FF00; any other byte after the 0xFFs is the marker (RSTn there is a parameterless marker)
_ANY_MARKER = re.compile(rb"\xff+[^\x00\xff]")
_SOS = b"\xff\xda"


class ImageTooLarge(InvalidImageError):
    """More pixels than allowed (the service answers 413)."""


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
    while True:
        # junk between segments (issue 30: one 0x00 after APP0 once ended this walk) is skipped, as libjpeg does
        found = _ANY_MARKER.search(data, pos)
        if found is None:
            return  # no more markers: Pillow reports a truncated file itself
        marker, pos = data[found.end() - 1], found.end()
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


class _BoundedReader(io.BytesIO):
    """The upload as a file whose reads fail once the decode is past its deadline, told to stop, or handed more
    JPEG scans than its picture may cost. Scans are counted as SOS marker bytes (FF DA) in what the decoder reads
    from where Pillow's header walk found the first scan on: libjpeg starts no scan without reading those two
    bytes, and 0xFF inside entropy-coded data is always followed by 0x00 or a marker, so this never undercounts
    whatever the framing walk thought (an EXIF thumbnail's scans, inside APP1 before it, are not counted)."""

    def __init__(self, data: bytes, label: str, deadline: float, should_stop: Callable[[], bool] | None):
        super().__init__(data)
        self.label, self.deadline, self.should_stop = label, deadline, should_stop
        self.scans_from: int | None = None  # set once the header is read
        self.max_scans = self.scans = self._counted_to = 0

    def read(self, size: int | None = -1) -> bytes:
        if self.should_stop is not None and self.should_stop():
            raise DecodeAborted(f"decoding {self.label} was abandoned: the request is gone")
        if time.monotonic() > self.deadline:
            raise DecodeAborted(f"{self.label} takes too long to decode")
        start = self.tell()
        chunk = super().read(size)
        if self.scans_from is not None and chunk:
            self._count_scans(start, start + len(chunk))
        return chunk

    def _count_scans(self, start: int, stop: int) -> None:
        # each byte pair is counted once, re-reads (Pillow seeks back to 0 to decode) included
        start = max(start, self._counted_to, self.scans_from)
        if stop <= start:
            return
        view = self.getbuffer()
        try:
            seen = bytes(view[max(start - 1, self.scans_from):stop]).count(_SOS)
        finally:
            view.release()
        self._counted_to = stop
        self.scans += seen
        if self.scans > self.max_scans:
            raise InvalidImageError(f"{self.label} is a JPEG with more than {self.max_scans} scans for its "
                                    f"size")


def _too_many_pixels(label: str, width: int, height: int, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(f"{label} is {width}x{height}, more than {max_pixels} pixels")


def open_bounded(data: bytes, label: str, timeout_s: float, should_stop: Callable[[], bool] | None = None,
                 max_pixels: int = MAX_DECODE_PIXELS):
    """``PIL.Image.open`` over a reader that stops at ``timeout_s``, when ``should_stop()`` says so, or past the
    JPEG scans its size may cost (``MAX_SCAN_PIXELS``); refuses more than ``max_pixels`` before decoding. The
    decode reads in ``DECODE_BLOCK`` pieces so it looks often."""
    from PIL import Image

    reader = _BoundedReader(data, label, time.monotonic() + timeout_s, should_stop)
    image = Image.open(reader)
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise _too_many_pixels(label, width, height, max_pixels)
    if image.format in ("JPEG", "MPO"):
        reader.scans_from = max(0, data.rfind(_SOS, 0, reader.tell()))  # Pillow's walk stops in the first SOS
        reader.max_scans = max(1, min(MAX_SCAN_PIXELS // max(1, width * height), 10 * MAX_JPEG_SCANS))
    image.decodermaxblock = DECODE_BLOCK
    return image


def read_header(data: bytes, label: str, max_pixels: int | None = None) -> tuple[str, tuple[int, int]]:
    """Format and size from the header only, after the bounded framing walk (what Pillow's own header walk costs
    is then bounded too): the one way the library and the service look at an image without decoding it.
    Refuses non-images, formats other than ACCEPTED_FORMATS, empty sizes and (ImageTooLarge) more pixels than
    ``max_pixels`` or Pillow's decompression-bomb limit."""
    from PIL import Image

    check_structure(data, label)
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{label} has too many pixels") from None
    except Exception:
        raise unreadable(label) from None
    if width < 1 or height < 1:
        raise InvalidImageError(f"{label} claims a {width}x{height} size")
    check_format(fmt, label)
    if max_pixels is not None and width * height > max_pixels:
        raise _too_many_pixels(label, width, height, max_pixels)
    return fmt, (width, height)

"""Decode bombs against the library's bounded decode (issue 30, finding 1): a JPEG's framing walk that junk bytes
cannot end early, and a decoder whose own work (scans read, pixels, time) is bounded even if the walk were fooled.

Every attack is built here at run time from a small Pillow-written progressive JPEG: its last scan (with the
Huffman table before it) repeated until the file has the wanted number of scans. libjpeg decodes each extra scan
as one more pass over every pixel and only warns."""

from __future__ import annotations

import io
import re
import struct
import time

import numpy as np
import pytest
from PIL import Image

from instantid import face as face_module
from instantid import image_limits
from instantid.errors import InvalidImageError
from instantid.face import load_image
from instantid.image_limits import MAX_JPEG_SCANS, check_structure


def _segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG as Pillow writes it (no junk, no fill bytes)."""
    pos, out = 2, []
    while data[pos + 1] != 0xD9:
        marker = data[pos + 1]
        end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if marker == 0xDA:
            end = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(data, end).start()
        out.append((marker, pos, end))
        pos = end
    return out


def many_scans(side: int, scans: int, height: int | None = None) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, height or side), (120, 130, 140)).save(out, format="JPEG", progressive=True)
    data = out.getvalue()
    segments = _segments(data)
    sos = [s for s in segments if s[0] == 0xDA]
    last = segments.index(sos[-1])
    start = segments[last - 1][1] if segments[last - 1][0] == 0xC4 else sos[-1][1]
    return data[:sos[-1][2]] + data[start:sos[-1][2]] * (scans - len(sos)) + b"\xff\xd9"


def scan_count_libjpeg_sees(data: bytes) -> int:
    """SOS markers as libjpeg finds them (jdmarker.c next_marker): junk bytes skipped, fill 0xFF skipped, FF00
    skipped; entropy-coded data after an SOS runs to the next marker that is not RSTn. Independent of the code."""
    return len(re.findall(rb"\xff+\xda", data))


def after_app0(data: bytes, junk: bytes) -> bytes:
    assert data[2:4] == b"\xff\xe0"
    end = 4 + struct.unpack_from(">H", data, 4)[0]
    return data[:end] + junk + data[end:]


def test_the_attack_file_is_what_the_issue_describes():
    data = after_app0(many_scans(4096, 6000), b"\x00")
    assert scan_count_libjpeg_sees(data) == 6000
    assert len(data) < 500_000  # the issue's file: 264 KB; small on the wire either way
    assert Image.open(io.BytesIO(data)).size == (4096, 4096)  # Pillow opens it: the junk does not stop libjpeg


@pytest.mark.parametrize("junk", [b"\x00", b"junk", b"\xff\x00", b"\x00\xff\x00\x17"],
                         ids=["one-zero", "text", "stuffed-ff00", "mixed"])
def test_junk_after_app0_does_not_end_the_framing_walk(junk):
    """Finding 1: one 0x00 after APP0 made the walk return and accept a 6000-scan file (8-10 s per photo)."""
    data = after_app0(many_scans(4096, 6000), junk)
    started = time.perf_counter()
    with pytest.raises(InvalidImageError, match=f"more than {MAX_JPEG_SCANS} scans"):
        check_structure(data, "face_images[0]")
    assert time.perf_counter() - started < 0.5


def test_junk_before_every_segment_is_skipped_as_libjpeg_does():
    clean = many_scans(512, 300)
    segments = _segments(clean)
    data = clean[:2] + b"".join(b"\x00\x01" + clean[s:e] for _, s, e in segments) + b"\xff\xd9"
    assert scan_count_libjpeg_sees(data) == 300
    with pytest.raises(InvalidImageError, match="scans"):
        check_structure(data, "x")


def test_a_junky_honest_jpeg_still_passes():
    out = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(out, format="JPEG", progressive=True)
    data = after_app0(out.getvalue(), b"\x00\x00")
    check_structure(data, "x")
    assert load_image(data).size == (300, 200)


# -- the decoder's own bounds, whatever the framing walk decided --------------------------------------------------
@pytest.fixture
def walk_fooled(monkeypatch):
    """The framing walk accepts everything: what is left is the decode's own bound."""
    monkeypatch.setattr(face_module, "check_structure", lambda data, label: None)


def test_the_decoder_counts_scans_itself(walk_fooled):
    data = after_app0(many_scans(1024, 3000), b"\x00")
    started = time.perf_counter()
    with pytest.raises(InvalidImageError, match="scans"):
        load_image(data, timeout_s=120)  # not the deadline: the scan count stops it
    assert time.perf_counter() - started < 10  # ~0.3 s here; generous for a loaded CI machine


def test_the_decoder_scan_bound_passes_an_honest_progressive_file(walk_fooled):
    data = many_scans(512, MAX_JPEG_SCANS)
    assert load_image(data).size == (512, 512)


def test_the_decoder_bounds_scans_times_pixels(walk_fooled, monkeypatch):
    """Each scan costs a pass over every pixel: the scans allowed shrink as the picture grows."""
    monkeypatch.setattr(image_limits, "MAX_SCAN_PIXELS", 20 * 256 * 256)
    assert load_image(many_scans(256, 20)).size == (256, 256)
    with pytest.raises(InvalidImageError, match="scans"):
        load_image(many_scans(256, 21))
    assert load_image(many_scans(128, 80)).size == (128, 128)  # 4x fewer pixels, 4x the scans
    with pytest.raises(InvalidImageError, match="scans"):
        load_image(many_scans(512, 6))  # 4x the pixels: 5 scans


def test_load_image_refuses_too_many_pixels_before_decoding():
    out = io.BytesIO()
    Image.new("RGB", (300, 200)).save(out, format="PNG")
    with pytest.raises(InvalidImageError, match="300x200.*more than 59999 pixels"):
        load_image(out.getvalue(), max_pixels=59_999)
    assert load_image(out.getvalue(), max_pixels=60_000).size == (300, 200)


def test_read_header_is_bounded_and_gives_format_and_size():
    """The header-only reads the service does (sizes, formats) go through the same framing walk."""
    assert image_limits.read_header(many_scans(64, 10, 32), "x") == ("JPEG", (64, 32))
    with pytest.raises(InvalidImageError, match="scans"):
        image_limits.read_header(after_app0(many_scans(4096, 6000), b"\x00"), "x")
    with pytest.raises(InvalidImageError, match="not a readable image"):
        image_limits.read_header(b"GIF89a" + b"\x00" * 40, "x")
    with pytest.raises(image_limits.ImageTooLarge, match="64x32, more than 2047 pixels"):
        image_limits.read_header(many_scans(64, 10, 32), "x", max_pixels=2047)


def test_the_scan_limit_is_exact():
    check_structure(many_scans(64, MAX_JPEG_SCANS), "x")
    with pytest.raises(InvalidImageError, match="scans"):
        check_structure(many_scans(64, MAX_JPEG_SCANS + 1), "x")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_png_data_chunks_are_not_counted_as_ancillary():
    """A PNG's pixels may come in many IDAT chunks (encoders write 8-64 KB each): 300 of them pass, 300 ancillary
    chunks do not."""
    import zlib

    from instantid.image_limits import MAX_PNG_ANCILLARY_CHUNKS

    noise = np.random.default_rng(0).integers(0, 256, (32, 96), dtype=np.uint8)  # incompressible 32x32 RGB
    raw = b"".join(b"\x00" + bytes(row) for row in noise)  # filter 0 per row
    packed = zlib.compress(raw)
    step = max(1, len(packed) // 300)
    idats = b"".join(_png_chunk(b"IDAT", packed[i:i + step]) for i in range(0, len(packed), step))
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0))
    many_data = head + idats + _png_chunk(b"IEND", b"")
    assert many_data.count(b"IDAT") > MAX_PNG_ANCILLARY_CHUNKS
    check_structure(many_data, "x")
    assert load_image(many_data).size == (32, 32)
    texts = _png_chunk(b"tEXt", b"k\x00v") * (MAX_PNG_ANCILLARY_CHUNKS + 1)
    many_text = head + texts + idats + _png_chunk(b"IEND", b"")
    with pytest.raises(InvalidImageError, match="too many chunks"):
        check_structure(many_text, "x")

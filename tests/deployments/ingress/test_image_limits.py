"""Images that cost more than their size says (issue 10, items 3, 7, 8, 9): bounded framing checks, decodes that
stop at a deadline or when the request is gone, a pixel budget per FaceAnalyzer replica, and phone photos
(MPO, 16-bit grayscale PNG) that must be accepted and read right."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from deployments.ingress import service as service_module
from deployments.errors import ServiceError
from deployments.face_analyzer.deployment import FaceAnalysisCore, PixelBudget
from deployments.ingress.http.app import build_http_app
from deployments.ingress.inputs import check_image
from instantid.errors import InvalidImageError
from instantid.face import load_image
from instantid.image_limits import MAX_JPEG_SCANS, DecodeAborted, check_structure
from serve_helpers import (b64, jpeg_with_comments, mpo_bytes, png16_gray, png_bytes, png_with_chunks,
                           progressive_jpeg)
from fakes import generate_request, make_client


@pytest.fixture(scope="module")
def face(face_photo) -> bytes:
    return face_photo.read_bytes()


# -- framing: refused in bounded time, before Pillow walks it ------------------------------------------------
def test_a_3000_scan_progressive_jpeg_is_refused_from_its_framing():
    data = progressive_jpeg(4096, 3000)  # the probe's attack: ~40 s of decoding in Pillow
    started = time.perf_counter()
    with pytest.raises(InvalidImageError, match="more than 100 scans"):
        check_structure(data, "face_images[0]")
    assert time.perf_counter() - started < 0.5
    with pytest.raises(ServiceError) as err:
        check_image(data, "face_images[0]", 4096 * 4096)
    assert (err.value.status, err.value.code, err.value.field) == (400, "invalid_image", "face_images[0]")


def test_real_progressive_jpegs_pass():
    check_structure(progressive_jpeg(512, MAX_JPEG_SCANS), "x")
    out = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(out, format="JPEG", progressive=True)
    check_structure(out.getvalue(), "x")
    load_image(out.getvalue())


@pytest.mark.parametrize("make", [lambda f: jpeg_with_comments(f, 3_500_000),
                                  lambda f: png_with_chunks(png_bytes(), 1_000_000)],
                         ids=["jpeg-3.5M-comments", "png-1M-chunks"])
def test_marker_and_chunk_floods_are_refused_fast(face, make):
    data = make(face)
    started = time.perf_counter()
    with pytest.raises(ServiceError) as err:
        check_image(data, "pose_image", 4096 * 4096)
    assert time.perf_counter() - started < 0.5  # Pillow alone took 3.4-4.7 s
    assert err.value.status == 400 and err.value.field == "pose_image"


def test_a_few_comments_and_chunks_are_fine(face):
    check_image(jpeg_with_comments(face, 20), "x", 4096 * 4096)
    check_image(png_with_chunks(png_bytes(), 20), "x", 4096 * 4096)


# -- decodes that can be abandoned ---------------------------------------------------------------------------
def test_a_slow_decode_stops_at_its_deadline():
    data = progressive_jpeg(4096, MAX_JPEG_SCANS)  # allowed framing, ~1.2 s to decode here
    started = time.perf_counter()
    with pytest.raises(DecodeAborted, match="too long"):
        load_image(data, timeout_s=0.05)
    assert time.perf_counter() - started < 0.8


def test_a_decode_stops_when_the_request_is_gone():
    data = progressive_jpeg(4096, MAX_JPEG_SCANS)
    gone = threading.Event()
    threading.Timer(0.05, gone.set).start()
    started = time.perf_counter()
    with pytest.raises(DecodeAborted, match="request is gone"):
        load_image(data, should_stop=gone.is_set)
    assert time.perf_counter() - started < 0.8


# -- phone photos ---------------------------------------------------------------------------------------------
def test_mpo_photos_are_accepted_first_frame(face):
    data = mpo_bytes(face)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    check_image(data, "face_images[0]", 4096 * 4096)
    image = load_image(data)
    assert image.size == Image.open(io.BytesIO(face)).size
    resp = make_client_for_images().post("/v1/generate", json=generate_request(face_images=[b64(data)]))
    assert resp.status_code == 200, resp.text


def test_16_bit_grayscale_png_is_scaled_not_clipped(face):
    data = png16_gray(face)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    got = np.asarray(load_image(data), dtype=np.float32)
    want = np.asarray(Image.open(io.BytesIO(face)).convert("L"), dtype=np.float32)
    assert got.shape[:2] == want.shape
    assert np.abs(got[..., 0] - want).max() <= 1.0  # Pillow's own conversion made it all 255


def make_client_for_images():
    import tempfile
    from pathlib import Path

    return make_client(Path(tempfile.mkdtemp()))


# -- off the event loop ---------------------------------------------------------------------------------------
def test_image_checks_do_not_hold_the_event_loop(tmp_path, monkeypatch):
    """A slow header check (here: made slow) must not delay /healthz on the same Ingress."""
    import httpx

    def slow_check(data, where, max_pixels):
        time.sleep(1.0)

    monkeypatch.setattr(service_module, "check_image", slow_check)
    client = make_client(tmp_path)
    app = client.app

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            slow = asyncio.ensure_future(ac.post("/v1/generate", json=generate_request()))
            await asyncio.sleep(0.1)
            started = time.perf_counter()
            health = await ac.get("/healthz")
            waited = time.perf_counter() - started
            await slow
            return health.status_code, waited

    status, waited = asyncio.run(run())
    assert status == 200 and waited < 0.5, waited


# -- FaceAnalyzer memory --------------------------------------------------------------------------------------
def test_pixel_budget_bounds_what_is_held_at_once():
    budget = PixelBudget(100)
    held, peak, lock = [0], [0], threading.Lock()

    def work(n):
        budget.acquire(n)
        with lock:
            held[0] += n
            peak[0] = max(peak[0], held[0])
        time.sleep(0.02)
        with lock:
            held[0] -= n
        budget.release(n)

    threads = [threading.Thread(target=work, args=(40,)) for _ in range(12)] + [
        threading.Thread(target=work, args=(250,))]  # alone over the budget: still runs, by itself
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert peak[0] <= 250 and budget.used == 0 and budget.peak <= 250
    assert PixelBudget(100).peak == 0


def test_face_analyzer_holds_at_most_its_pixel_budget(tiny_bundle, face):
    """16 concurrent 4-face + pose requests of large 16-bit PNGs, the probe's memory attack, on a replica with
    a budget of two photos' pixels: never more than that decoded at once, and every request answered."""
    big = png16_gray(face)  # 1280x886
    pixels = 1280 * 886
    core = FaceAnalysisCore(str(tiny_bundle / "antelopev2"), threads=1, max_decoded_pixels=2 * 5 * pixels)
    results, errors = [], []

    def one():
        try:
            results.append(core.predict([(f"face_images[{i}]", big) for i in range(4)], ("pose_image", big)))
        except Exception as exc:  # the tiny detector may find no face: that is an answer too
            errors.append(type(exc).__name__)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) + len(errors) == 16
    assert core.budget.peak <= 2 * 5 * pixels and core.budget.used == 0
    assert set(errors) <= {"NoFaceError"}


def test_face_analysis_stops_when_the_request_is_gone(tiny_bundle):
    core = FaceAnalysisCore(str(tiny_bundle / "antelopev2"), threads=1)
    data = progressive_jpeg(4096, MAX_JPEG_SCANS)
    started = time.perf_counter()
    with pytest.raises(DecodeAborted):
        core.predict([("face_images[0]", data)], should_stop=lambda: True)
    assert time.perf_counter() - started < 0.5


# -- real sizes: no false refusals at the documented limits ----------------------------------------------------
@pytest.mark.parametrize("size, progressive", [((4000, 2769), False), ((4000, 2769), True), ((4096, 4096), True)],
                         ids=["phone-4000x2769", "phone-progressive", "limit-4096-progressive"])
def test_real_size_photos_pass_the_bounds(size, progressive):
    """A phone-size photo of noise (the costliest content to decode: ~8 MB baseline) and a progressive one at the
    pixel limit pass the framing checks quickly and decode within the deadline."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).resize(size, Image.NEAREST).save(out, format="JPEG", quality=92, progressive=progressive)
    data = out.getvalue()
    started = time.perf_counter()
    check_image(data, "face_images[0]", 4096 * 4096)
    assert time.perf_counter() - started < 0.5
    image = load_image(data, timeout_s=10)
    assert image.size == size

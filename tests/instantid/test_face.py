"""Face analysis against a tiny random-weight pack that insightface loads through its own routing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from instantid.errors import InvalidImageError, InvalidParameterError, NoFaceError, WeightsError
from instantid.face import (
    Face,
    FaceModel,
    analysis_mapping,
    load_image,
    mean_embedding,
    resize_for_analysis,
    validate_embedding,
    validate_keypoints,
)
from instantid.tiny.face_pack import DETECTOR_FILE, RECOGNIZER_FILE, write_tiny_face_pack


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    return write_tiny_face_pack(tmp_path_factory.mktemp("face") / "antelopev2")


@pytest.fixture(scope="module")
def analyzer(pack) -> FaceModel:
    return FaceModel(str(pack))


@pytest.fixture()
def no_download(no_network, monkeypatch):
    """No network, and insightface's own downloader fails the test if anything calls it."""
    import insightface.utils.storage as storage

    def refuse(*args, **kwargs):
        raise AssertionError("insightface tried to download a model")

    monkeypatch.setattr(storage, "download", refuse)
    monkeypatch.setattr(storage, "download_file", refuse, raising=False)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


# --- the tiny pack ---------------------------------------------------------------------------------------


def test_pack_is_small_deterministic_and_routed_by_insightface(pack, tmp_path):
    from insightface.app import FaceAnalysis
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    assert sorted(p.name for p in pack.iterdir()) == sorted([DETECTOR_FILE, RECOGNIZER_FILE])
    assert all(p.stat().st_size < 1_000_000 for p in pack.iterdir())
    again = write_tiny_face_pack(tmp_path / "again")
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in pack.iterdir())

    app = FaceAnalysis(name=str(pack), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    det, rec = app.models["detection"], app.models["recognition"]
    assert isinstance(det, SCRFD) and isinstance(rec, ArcFaceONNX)
    # routed as SCRFD 10g with keypoints: 3 strides x 2 anchors; ArcFace 112x112 with 127.5 normalisation
    assert (det.use_kps, det.fmc, det._feat_stride_fpn, det._num_anchors) == (True, 3, [8, 16, 32], 2)
    assert rec.input_size == (112, 112) and rec.input_mean == 127.5


def test_insightface_itself_detects_and_embeds_on_the_photo(pack, face_photo):
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=str(pack), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    faces = app.get(cv2.imread(str(face_photo)))
    assert faces and all(f.kps.shape == (5, 2) and f.embedding.shape == (512,) for f in faces)


# --- analysis --------------------------------------------------------------------------------------------


def test_analyze_photo_returns_raw_embedding_and_keypoints_inside_the_box(analyzer, pack, face_photo):
    from insightface.app import FaceAnalysis

    image = load_image(face_photo)
    faces = analyzer.analyze(image)
    assert faces
    face = faces[0]
    x1, y1, x2, y2 = face.bbox
    w, h = image.size
    # the tiny detector's main face: x 30-70%, y 20-75% of the image
    np.testing.assert_allclose(face.bbox, [0.30 * w, 0.20 * h, 0.70 * w, 0.75 * h], atol=2.0)
    assert face.bbox.dtype == np.float32 and face.kps.dtype == np.float32 and face.embedding.dtype == np.float32
    assert face.kps.shape == (5, 2) and face.embedding.shape == (512,)
    assert np.all((face.kps[:, 0] > x1) & (face.kps[:, 0] < x2) & (face.kps[:, 1] > y1) & (face.kps[:, 1] < y2))
    # eyes above nose above mouth; left before right
    assert face.kps[0, 1] < face.kps[2, 1] < face.kps[3, 1] and face.kps[0, 0] < face.kps[1, 0]
    assert 0.5 <= face.score <= 1.0

    # the raw insightface embedding, not normed_embedding (InstantID is trained on the raw vector)
    app = FaceAnalysis(name=str(pack), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    reference = max(app.get(np.asarray(image)[:, :, ::-1].copy()),
                    key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
    np.testing.assert_array_equal(face.embedding, reference.embedding)
    np.testing.assert_array_equal(face.kps, reference.kps)
    assert abs(np.linalg.norm(face.embedding) - 1.0) > 0.5


def test_analyze_is_deterministic_and_accepts_arrays(analyzer, face_photo):
    image = load_image(face_photo)
    first, second = analyzer.analyze(image), analyzer.analyze(np.asarray(image))
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.bbox, b.bbox)
        np.testing.assert_array_equal(a.kps, b.kps)
        np.testing.assert_array_equal(a.embedding, b.embedding)


def test_different_images_give_different_embeddings(analyzer, face_photo):
    photo = analyzer.largest_face(load_image(face_photo), "photo").embedding
    other = analyzer.largest_face(noise(480, 640), "noise").embedding
    flipped = analyzer.largest_face(load_image(face_photo).transpose(Image.FLIP_LEFT_RIGHT), "flipped").embedding
    assert not np.allclose(photo, other) and not np.allclose(photo, flipped)


def test_channel_order_matters(analyzer, face_photo):
    # analyze takes RGB: swapping channels is a different image, so the conversion to BGR is exercised
    rgb = np.asarray(load_image(face_photo))
    a = analyzer.largest_face(rgb, "rgb").embedding
    b = analyzer.largest_face(np.ascontiguousarray(rgb[:, :, ::-1]), "bgr").embedding
    assert not np.allclose(a, b)


def test_faces_are_sorted_largest_first(analyzer):
    faces = analyzer.analyze(noise(480, 640))
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    # the small face sits in the top-left corner: x 4-16%, y 4-20%
    np.testing.assert_allclose(faces[1].bbox, [0.04 * 640, 0.04 * 480, 0.16 * 640, 0.20 * 480], atol=2.0)


def test_uniform_corner_reports_only_the_main_face(analyzer):
    image = noise(400, 400)
    image[:100, :100] = 90  # the small face's region is flat: no second face
    faces = analyzer.analyze(image)
    assert len(faces) == 1 and faces[0].bbox[0] > 100


@pytest.mark.parametrize("shape,color", [((300, 200), (0, 0, 0)), ((300, 500), (255, 255, 255)),
                                         ((256, 256), (128, 128, 128)), ((256, 256), (255, 0, 0)),
                                         ((200, 300), (30, 200, 90))])
def test_uniform_image_has_no_face(analyzer, shape, color):
    image = Image.new("RGB", (shape[1], shape[0]), color)
    assert analyzer.analyze(image) == []
    with pytest.raises(NoFaceError, match="blank.png") as info:
        analyzer.largest_face(image, "blank.png")
    assert info.value.source == "blank.png"


def test_analyze_rejects_non_rgb_arrays(analyzer):
    with pytest.raises(InvalidImageError):
        analyzer.analyze(np.zeros((64, 64), np.uint8))


def test_face_to_dict_and_mean_embedding(analyzer, face_photo):
    faces = analyzer.analyze(load_image(face_photo))
    data = json.loads(json.dumps(faces[0].to_dict()))
    assert set(data) == {"bbox", "score", "kps"} and len(data["kps"]) == 5 and len(data["bbox"]) == 4
    a = Face(np.zeros(4, np.float32), 0.9, np.zeros((5, 2), np.float32), np.full(512, 1.0, np.float32))
    b = Face(np.array([0, 0, 10, 20], np.float32), 0.9, np.zeros((5, 2), np.float32), np.full(512, 3.0, np.float32))
    assert b.area == 200.0 and a.area == 0.0
    mean = mean_embedding([a, b])
    assert mean.dtype == np.float32 and mean.shape == (512,) and np.all(mean == 2.0)


# --- model resolution ------------------------------------------------------------------------------------


def test_default_providers_are_cpu_without_cuda(analyzer):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert analyzer.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        assert analyzer.providers == ["CPUExecutionProvider"]


def test_named_pack_under_insightface_home(pack, tmp_path, monkeypatch, no_download):
    home = tmp_path / "home"
    write_tiny_face_pack(home / "models" / "antelopev2")
    monkeypatch.setenv("INSIGHTFACE_HOME", str(home))
    assert FaceModel().pack_dir == (home / "models" / "antelopev2").resolve()
    # an explicit root wins over the environment
    other = tmp_path / "other"
    write_tiny_face_pack(other / "models" / "mypack")
    assert FaceModel("mypack", root=str(other)).pack_dir == (other / "models" / "mypack").resolve()


def test_missing_pack_is_a_weights_error_without_download(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(WeightsError, match="antelopev2"):
        FaceModel()
    with pytest.raises(WeightsError, match="not found"):
        FaceModel("antelopev2", root=str(tmp_path))
    with pytest.raises(WeightsError, match="does not exist"):
        FaceModel(str(tmp_path / "missing" / "pack"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no .onnx"):
        FaceModel(str(tmp_path / "empty"))


def test_incomplete_or_corrupt_pack_is_a_weights_error(pack, tmp_path, no_download):
    only_detector = tmp_path / "det_only"
    only_detector.mkdir()
    (only_detector / DETECTOR_FILE).write_bytes((pack / DETECTOR_FILE).read_bytes())
    with pytest.raises(WeightsError, match="recognition"):
        FaceModel(str(only_detector))
    only_recognizer = tmp_path / "rec_only"
    only_recognizer.mkdir()
    (only_recognizer / RECOGNIZER_FILE).write_bytes((pack / RECOGNIZER_FILE).read_bytes())
    with pytest.raises(WeightsError, match="detector"):
        FaceModel(str(only_recognizer))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / DETECTOR_FILE).write_bytes(b"not an onnx model")
    with pytest.raises(WeightsError):
        FaceModel(str(corrupt))


def test_pack_from_s3(pack, s3_bucket, tmp_path, monkeypatch, face_photo):
    import boto3

    monkeypatch.setenv("INSTANTID_CACHE", str(tmp_path / "cache"))
    client = boto3.client("s3")
    for path in pack.iterdir():
        client.upload_file(str(path), s3_bucket, f"models/antelopev2/{path.name}")
    remote = FaceModel(f"s3://{s3_bucket}/models/antelopev2")
    assert remote.pack_dir.is_relative_to(tmp_path / "cache")
    local = FaceModel(str(pack))
    image = load_image(face_photo)
    np.testing.assert_array_equal(remote.largest_face(image, "p").embedding, local.largest_face(image, "p").embedding)


def test_s3_prefix_without_objects_is_a_weights_error(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANTID_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError):
        FaceModel(f"s3://{s3_bucket}/nothing/here")


# --- load_image ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_load_image_accepts_jpeg_png_webp(fmt):
    buf = io.BytesIO()
    Image.new("RGBA" if fmt == "PNG" else "RGB", (40, 30), (10, 200, 30)).save(buf, fmt)
    image = load_image(buf.getvalue(), name="upload")
    assert image.mode == "RGB" and image.size == (40, 30)


def test_load_image_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_bytes(Image.new("RGB", (60, 20), (255, 0, 0)), exif=exif))
    assert load_image(path).size == (20, 60)
    assert load_image(str(path)).size == (20, 60)


def test_load_image_rejects_text_bytes():
    with pytest.raises(InvalidImageError, match="selfie.jpg"):
        load_image(b"hello, this is not an image", name="selfie.jpg")


def test_load_image_rejects_truncated_jpeg(face_photo):
    data = face_photo.read_bytes()
    with pytest.raises(InvalidImageError, match="cut.jpg.*truncated"):
        load_image(data[: len(data) // 2], name="cut.jpg")


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_load_image_rejects_other_formats_by_content(fmt, tmp_path):
    path = tmp_path / "disguised.jpg"  # the extension lies; the content decides
    Image.new("RGB", (10, 10), (1, 2, 3)).save(path, fmt)
    with pytest.raises(InvalidImageError, match=f"disguised.jpg is a {fmt}"):
        load_image(path)


def test_load_image_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InvalidImageError, match="nope.png") as info:
        load_image(missing)
    assert "\n" not in str(info.value)


# --- resize_for_analysis ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size,expected", [
    ((1000, 800), (1280, 1024)),   # landscape: short side to 1024, then long side capped at 1280
    ((600, 900), (832, 1280)),     # portrait: 1024x1536 -> 853x1280 -> floor to 64: 832x1280
    ((100, 100), (1280, 1280)),    # small square: upscaled
    ((6000, 4000), (1280, 832)),   # huge: 1536x1024 -> 1280x853 -> 1280x832
    ((1280, 1024), (1280, 1024)),  # already the target
    ((500, 2000), (320, 1280)),    # very tall: 1024x4096 -> 320x1280
])
def test_resize_for_analysis_sizes(size, expected):
    assert resize_for_analysis(Image.new("RGB", size)).size == expected


def test_resize_for_analysis_is_the_references_first_step_then_a_centred_crop():
    """The demo's first resize (one scale), then a centred crop to its output size -- not its second,
    non-uniform resize to that size, which squashes the face (tests/instantid/test_aspect.py)."""
    image = Image.fromarray(noise(450, 700, seed=3))
    # reference steps for 700x450: 1024/450 -> 1593x1024; 1280/1593 -> 1280x823; floor to 64 -> 1280x768
    step = image.resize([1280, 823], Image.BILINEAR)
    expected = step.crop((0, 27, 1280, 27 + 768))  # (823 - 768) // 2 = 27 rows cut at the top, 28 at the bottom
    np.testing.assert_array_equal(np.asarray(resize_for_analysis(image)), np.asarray(expected))
    scale, offset = analysis_mapping(700, 450)
    assert scale == pytest.approx((700 / 1280, 450 / 823)) and offset == pytest.approx((0, 27 * 450 / 823))


def test_resize_for_analysis_rejects_degenerate_aspect():
    with pytest.raises(InvalidImageError):
        resize_for_analysis(Image.new("RGB", (1, 1000)))


# --- validation of caller-supplied embeddings and keypoints ----------------------------------------------


def test_validate_embedding():
    out = validate_embedding([0.5] * 512)
    assert out.dtype == np.float32 and out.shape == (512,)
    assert validate_embedding(np.ones((1, 512))).shape == (512,)
    for bad in ([0.0] * 511, [[0.0] * 512] * 2, ["0.1"] * 512, [float("nan")] + [0.0] * 511,
                [float("inf")] * 512, "abc", None, [[1.0], [2.0, 3.0]]):
        with pytest.raises(InvalidParameterError) as info:
            validate_embedding(bad)
        assert info.value.field == "face_embedding"


def test_validate_keypoints():
    points = [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]]
    out = validate_keypoints(points)
    assert out.dtype == np.float32 and out.shape == (5, 2)
    for bad in (points[:4], [p + [0] for p in points], [[10, 20]] * 4 + [[float("nan"), 1]], [1.0] * 10,
                [[True, False]] * 5, "points", None):
        with pytest.raises(InvalidParameterError) as info:
            validate_keypoints(bad)
        assert info.value.field == "face_kps"


def test_sessions_do_not_spin_and_respect_the_thread_cap(pack):
    analyzer = FaceModel(str(pack), threads=1)
    for model in analyzer.app.models.values():
        options = model.session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"

"""``instantid generate --person ...``: several people in one picture from the command line, on the tiny bundle.

The tiny detector finds two faces in t1.jpg (insightface's group photo): a small one near the top-left corner
(face 0, left to right) and a main one in the middle (face 1); see instantid/tiny_face.py."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from instantid.cli import main
from instantid.face import FaceModel, load_image, resize_for_analysis
from instantid.people import grown_region, sorted_left_to_right
from instantid.pipeline import InstantIDPipeline

W, H = 96, 64


@pytest.fixture(scope="module")
def photos(tmp_path_factory, face_photo):
    d = tmp_path_factory.mktemp("people_photos")
    photo = Image.open(face_photo).convert("RGB")
    paths = {"group": Path(face_photo), "a": d / "a.png", "b": d / "b.png"}
    photo.save(paths["a"])
    ImageOps.mirror(photo).save(paths["b"])
    return paths


@pytest.fixture()
def seen(monkeypatch):
    calls = []
    real = InstantIDPipeline.generate

    def spy(self, requests, **kwargs):
        calls.append((requests[0], kwargs))
        return real(self, requests, **kwargs)

    monkeypatch.setattr(InstantIDPipeline, "generate", spy)
    return calls


def args(bundle, output, *extra, size=(W, H)):
    return ["generate", "--base-model", str(bundle / "sdxl"), "--instantid", str(bundle / "instantid"),
            "--face-model", str(bundle / "antelopev2"), "--prompt", "two people", "--steps", "2", "--seed", "3",
            "--device", "cpu", "--dtype", "float32", "--output", str(output),
            *(["--width", str(size[0]), "--height", str(size[1])] if size else []), *extra]


def embedding_of(bundle, path):
    canvas = resize_for_analysis(load_image(path))
    return FaceModel(str(bundle / "antelopev2")).largest_face(canvas, str(path)).embedding


def test_people_from_a_group_photo_left_to_right(tiny_bundle, photos, tmp_path, capfd, seen):
    out = tmp_path / "group.png"
    code = main(args(tiny_bundle, out, "--pose", str(photos["group"]), "--person", f"{photos['a']}:1",
                     "--person", str(photos["b"]) + ":0", "--save-pose-image", str(tmp_path / "pose.png"),
                     size=None))
    captured = capfd.readouterr()
    assert code == 0, captured.err
    request, kwargs = seen[0]
    assert request.face_embedding is None and len(request.people) == 2
    np.testing.assert_array_equal(request.people[0].face_embedding, embedding_of(tiny_bundle, photos["a"]))
    np.testing.assert_array_equal(request.people[1].face_embedding, embedding_of(tiny_bundle, photos["b"]))
    # the default size is the group photo's analysed canvas; regions are its faces' boxes grown, face 1 for a
    canvas = resize_for_analysis(load_image(photos["group"]))
    faces = sorted_left_to_right(FaceModel(str(tiny_bundle / "antelopev2")).analyze(canvas))
    assert (kwargs["width"], kwargs["height"]) == canvas.size
    assert request.people[0].region == grown_region(faces[1].bbox, *canvas.size)
    assert request.people[1].region == grown_region(faces[0].bbox, *canvas.size)
    with Image.open(out) as image:
        assert image.size == canvas.size
    assert "person 1 " in captured.err and "person 2 " in captured.err  # a score line per person
    with Image.open(tmp_path / "pose.png") as pose:  # both people's keypoints on one canvas
        drawn = np.asarray(pose)
    assert all(drawn[y1:y2, x1:x2].max() > 0 for x1, y1, x2, y2 in (p.region for p in request.people))


def test_default_face_index_is_the_order_of_the_person_options(tiny_bundle, photos, tmp_path, capfd, seen):
    assert main(args(tiny_bundle, tmp_path / "x.png", "--pose", str(photos["group"]), "--person", str(photos["a"]),
                     "--person", str(photos["b"]), "--no-score")) == 0
    first, second = seen[0][0].people
    assert first.region[0] < second.region[0]  # a on face 0 (left), b on face 1


def test_boxes_and_keypoints_without_a_group_photo(tiny_bundle, photos, tmp_path, capfd, seen):
    kps = tmp_path / "k.json"
    kps.write_text(json.dumps([[64, 22], [76, 22], [70, 29], [65, 36], [75, 36]]))
    assert main(args(tiny_bundle, tmp_path / "x.png", "--person", f"{photos['a']}@4,10,32,50",
                     "--person", f"{photos['b']},{photos['a']}@{kps}", "--no-score")) == 0
    a, b = seen[0][0].people
    assert a.region == (0, 0, 39, 60)  # the box grown by 25% per side, clipped to the canvas
    mean = (embedding_of(tiny_bundle, photos["b"]) + embedding_of(tiny_bundle, photos["a"])) / 2
    np.testing.assert_allclose(b.face_embedding, mean, rtol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--person", "{a}:0", "--face", "{a}"], "--face: not with --person"),
    (["--person", "{a}:0", "--person", "{b}:5", "--pose", "{group}"], r"people[1].face_index: the pose photo has 2"),
    (["--person", "{a}"] * 5, "--person: at most 4 people"),
    (["--person", "{a}@10,10,40,50", "--person", "{b}@30,10,60,50"], "people: the regions of people[0] and people[1]"),
    (["--person", "{a}@10,10,140,50"], "people[0].box: must be x1 < x2"),
    (["--person", "{a}"], "--person: person 1 needs --pose"),
    (["--person", "{a}@1,2,3"], "is not a box"),
])
def test_bad_people_are_one_line_and_nothing_written(tiny_bundle, photos, tmp_path, capfd, extra, message):
    out = tmp_path / "bad.png"
    with pytest.raises(SystemExit) if "is not a box" in message else _nothing():
        code = main(args(tiny_bundle, out, *[e.format(**photos) for e in extra]))
        assert code == 1
    err = capfd.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

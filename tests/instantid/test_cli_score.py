"""``instantid score`` and the score ``generate`` prints next to each file it writes (tiny bundle)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from instantid.cli import main
from instantid.face import FaceModel, load_image
from instantid.identity import build_identity
from instantid.scoring import score_image


@pytest.fixture(scope="module")
def photos(tmp_path_factory, face_photo) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("photos")
    paths = {"a": d / "a.jpg", "b": d / "b.png", "grey": d / "grey.png"}
    shutil.copy(face_photo, paths["a"])
    ImageOps.mirror(Image.open(face_photo).convert("RGB")).save(paths["b"])
    Image.new("RGB", (1024, 1024), (128, 128, 128)).save(paths["grey"])
    return paths


@pytest.fixture(scope="module")
def analyzer(tiny_bundle) -> FaceModel:
    return FaceModel(str(tiny_bundle / "antelopev2"))


def direct_cosine(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def score(capfd, bundle, *args) -> tuple[int, list[str], str]:
    code = main(["score", "--face-model", str(bundle / "antelopev2"), *args])
    captured = capfd.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_score_prints_the_exact_cosine_per_image(tiny_bundle, photos, analyzer, capfd):
    code, lines, err = score(capfd, tiny_bundle, "--reference", str(photos["a"]), str(photos["a"]),
                             str(photos["grey"]))
    assert code == 0, err
    assert lines == [f"{photos['a']}\tsimilarity 1.0000", f"{photos['grey']}\tno face found"]

    identity = build_identity(analyzer, [("a", load_image(photos["a"])), ("b", load_image(photos["b"]))])
    emb_a, emb_b = (f.embedding for f in identity.faces)
    code, lines, err = score(capfd, tiny_bundle, "--reference", str(photos["a"]), "--reference", str(photos["b"]),
                             str(photos["b"]))
    assert code == 0, err
    expected = (f"{photos['b']}\tsimilarity {direct_cosine(emb_b, identity.embedding):.4f} "
                f"(per reference: {direct_cosine(emb_b, emb_a):.4f}, 1.0000)")
    assert lines == [expected]


def test_score_against_a_saved_embedding(tiny_bundle, photos, analyzer, tmp_path, capfd):
    emb = np.random.default_rng(3).standard_normal(512).astype(np.float32)
    np.save(tmp_path / "e.npy", emb)
    code, lines, err = score(capfd, tiny_bundle, "--face-embedding", str(tmp_path / "e.npy"), str(photos["a"]))
    assert code == 0, err
    face = build_identity(analyzer, [("a", load_image(photos["a"]))]).embedding
    assert lines == [f"{photos['a']}\tsimilarity {direct_cosine(face, emb):.4f}"]


@pytest.mark.parametrize("args", [[], ["--reference", "missing.jpg"]])
def test_score_bad_input_is_one_line_exit_1(tiny_bundle, photos, capfd, args):
    code, lines, err = score(capfd, tiny_bundle, *args, str(photos["a"]))
    assert code == 1 and lines == [] and err.startswith("instantid: error:") and len(err.splitlines()) == 1


def generate_args(bundle: Path, output: Path, *extra: str) -> list[str]:
    return ["generate", "--base-model", str(bundle / "sdxl"), "--instantid", str(bundle / "instantid"),
            "--face-model", str(bundle / "antelopev2"), "--prompt", "a person", "--width", "64", "--height", "64",
            "--steps", "1", "--seed", "1", "--device", "cpu", "--dtype", "float32", "--output", str(output), *extra]


def test_generate_prints_each_files_score_and_no_score_skips_it(tiny_bundle, photos, analyzer, tmp_path, capfd):
    output = tmp_path / "out.png"
    pose = tmp_path / "pose.png"
    code = main(generate_args(tiny_bundle, output, "--face", str(photos["a"]), "--face", str(photos["b"]),
                              "--num-images", "2", "--save-pose-image", str(pose)))
    captured = capfd.readouterr()
    assert code == 0, captured.err
    paths = [tmp_path / "out-1.png", tmp_path / "out-2.png"]
    assert captured.out.splitlines() == [str(p) for p in paths + [pose]]  # stdout: one path per line, for scripts
    assert f"{pose}: identity" not in captured.err  # the keypoint image is not an output
    identity = build_identity(analyzer, [("a", load_image(photos["a"])), ("b", load_image(photos["b"]))])
    for path in paths:
        expected = score_image(analyzer, load_image(path), identity.embedding, [f.embedding for f in identity.faces])
        if expected.face_found:
            line = (f"{path}: identity similarity {expected.similarity:.4f} (per reference: "
                    + ", ".join(f"{s:.4f}" for s in expected.per_reference) + ")")
        else:
            line = f"{path}: identity no face found"
        assert line in captured.err.splitlines()

    code = main(generate_args(tiny_bundle, output, "--face", str(photos["a"]), "--no-score"))
    captured = capfd.readouterr()
    assert code == 0 and "identity" not in captured.err


def _without_face_pack(args: list[str]) -> list[str]:
    """generate_args with --face-model back to the default named pack (absent under an empty INSIGHTFACE_HOME)."""
    args = list(args)
    args[args.index("--face-model") + 1] = "antelopev2"
    return args


def test_saved_identity_without_a_face_pack_writes_says_why_the_score_was_skipped_and_exits_0(
        tiny_bundle, tmp_path, capfd, monkeypatch):
    """A saved identity is how a user generates without the face pack: the image is the result, the score is
    extra. The README's rule holds both ways: no output on failure, no failure after a good output."""
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "empty-home"))  # no antelopev2 here
    np.save(tmp_path / "e.npy", np.random.default_rng(3).standard_normal(512).astype(np.float32))
    (tmp_path / "k.json").write_text("[[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]]")
    output = tmp_path / "out.png"
    code = main(_without_face_pack(generate_args(tiny_bundle, output, "--face-embedding", str(tmp_path / "e.npy"),
                                                 "--face-kps", str(tmp_path / "k.json"))))
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert captured.out.splitlines() == [str(output)] and Image.open(output).size == (64, 64)
    skipped = [line for line in captured.err.splitlines() if "identity score" in line]
    assert len(skipped) == 1, captured.err
    assert "skipped" in skipped[0] and "antelopev2" in skipped[0] and "not found" in skipped[0]
    assert "error" not in captured.err

    # a face photo needs the face model: that is bad input, refused before anything is written
    other = tmp_path / "other.png"
    code = main(_without_face_pack(generate_args(tiny_bundle, other, "--face", str(tmp_path / "k.json"))))
    captured = capfd.readouterr()
    assert code == 1 and not other.exists()


def test_a_failing_score_after_a_good_output_does_not_fail_the_command(tiny_bundle, photos, tmp_path, capfd,
                                                                        monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("onnxruntime went away")

    monkeypatch.setattr("instantid.scoring.score_image", broken)
    output = tmp_path / "out.png"
    code = main(generate_args(tiny_bundle, output, "--face", str(photos["a"])))
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert output.exists()
    assert [line for line in captured.err.splitlines() if "identity score" in line] == [
        "identity score skipped: RuntimeError: onnxruntime went away"]

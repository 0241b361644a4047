"""The ``instantid`` command on the tiny bundle: generate (every identity/pose/style/LoRA/ControlNet path),
analyze, make-tiny, and the error contract: one ``instantid: error:`` line on stderr, exit 1, nothing written.

Commands run in-process through ``main([...])`` (stdout/stderr captured at the file-descriptor level, so
output from native code or library handlers is seen too); one test runs the installed entry point.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from instantid.cli import main

SIZE = ("64", "64")
SIZE_INT = (64, 64)


# --- fixtures and helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory, face_photo) -> dict[str, Path]:
    """Reference photos and broken inputs, outside any output directory."""
    d = tmp_path_factory.mktemp("photos")
    photo = Image.open(face_photo).convert("RGB")
    w, h = photo.size
    paths = {"a": d / "a.jpg", "b": d / "b.png", "pose": d / "pose.png", "grey": d / "grey.png",
             "text": d / "text.jpg", "truncated": d / "truncated.jpg", "control": d / "control.png"}
    shutil.copy(face_photo, paths["a"])
    ImageOps.mirror(photo).save(paths["b"])  # another "person": other pixels in the face box
    # the same photo in the left part of a wider, black canvas: its face sits elsewhere on the canvas
    canvas = Image.new("RGB", (w * 2, h))
    canvas.paste(photo, (0, 0))
    canvas.save(paths["pose"])
    Image.new("RGB", (300, 240), (128, 128, 128)).save(paths["grey"])  # uniform: the tiny detector finds no face
    paths["text"].write_text("this is not an image\n")
    data = Path(face_photo).read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 3])
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    Image.fromarray(np.stack([gradient, gradient.T, 255 - gradient], axis=-1)).save(paths["control"])
    return paths


@pytest.fixture()
def out(tmp_path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def base_args(bundle: Path, output: Path, *, seed: int = 1) -> list[str]:
    return ["generate", "--base-model", str(bundle / "sdxl"), "--instantid", str(bundle / "instantid"),
            "--face-model", str(bundle / "antelopev2"), "--prompt", "a photo of a person",
            "--width", SIZE[0], "--height", SIZE[1], "--steps", "2", "--guidance-scale", "5",
            "--ip-adapter-scale", "0.8", "--controlnet-conditioning-scale", "0.8", "--seed", str(seed),
            "--device", "cpu", "--dtype", "float32", "--output", str(output)]


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def generate(capfd, bundle: Path, output: Path, *extra: str, seed: int = 1) -> np.ndarray:
    """Run generate in-process; assert success and return the written image as an array."""
    code = main(base_args(bundle, output, seed=seed) + list(extra))
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert captured.out.splitlines() == [str(output)]
    assert f"seed: {seed}" in captured.err
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    return read(output)


@pytest.fixture(scope="module")
def plain(tiny_bundle, photos, tmp_path_factory) -> Path:
    """The reference run: ``--face a.jpg --seed 1`` and nothing else; other runs are compared with it."""
    output = tmp_path_factory.mktemp("plain") / "plain.png"
    assert main(base_args(tiny_bundle, output) + ["--face", str(photos["a"])]) == 0
    return output


@pytest.fixture()
def seen(monkeypatch) -> list:
    """The GenerationRequests the CLI hands to the pipeline (the pipeline still runs)."""
    from instantid.pipeline import InstantIDPipeline

    calls = []
    real = InstantIDPipeline.generate

    def spy(self, requests, **kwargs):
        calls.append(requests[0])
        return real(self, requests, **kwargs)

    monkeypatch.setattr(InstantIDPipeline, "generate", spy)
    return calls


def save_embedding(path: Path, embedding: np.ndarray) -> Path:
    np.save(path, np.asarray(embedding, dtype=np.float32))
    return path


def analyzed(bundle: Path, photo: Path):
    """(largest face, analysed canvas size) exactly as the CLI's identity path computes them."""
    from instantid.face import FaceModel, load_image, resize_for_analysis

    canvas = resize_for_analysis(load_image(photo))
    return FaceModel(str(bundle / "antelopev2")).largest_face(canvas, str(photo)), canvas.size


# --- generate ----------------------------------------------------------------------------------------------


def test_generate_writes_png_of_requested_size_and_prints_a_reproducible_seed(tiny_bundle, photos, out, capfd):
    args = base_args(tiny_bundle, out / "portrait.png") + ["--height", "48", "--face", str(photos["a"])]
    i = args.index("--seed")
    del args[i:i + 2]  # no --seed: a random one is drawn and printed
    code = main(args)
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert captured.out.splitlines() == [str(out / "portrait.png")]
    assert sorted(p.name for p in out.iterdir()) == ["portrait.png"]  # no temporary files left behind
    with Image.open(out / "portrait.png") as image:
        assert image.format == "PNG" and image.size == (64, 48) and image.mode == "RGB"
    seed = int(re.search(r"seed: (\d+)", captured.err).group(1))

    assert main(args + ["--seed", str(seed), "--output", str(out / "again.png")]) == 0
    capfd.readouterr()
    assert (out / "again.png").read_bytes() == (out / "portrait.png").read_bytes()


def test_same_seed_same_bytes_other_seed_other_image(tiny_bundle, photos, plain, out, capfd):
    same = generate(capfd, tiny_bundle, out / "same.png", "--face", str(photos["a"]))
    other = generate(capfd, tiny_bundle, out / "other.png", "--face", str(photos["a"]), seed=2)
    assert (out / "same.png").read_bytes() == plain.read_bytes()
    np.testing.assert_array_equal(same, read(plain))
    assert not np.array_equal(other, read(plain))


def test_num_images_writes_numbered_files(tiny_bundle, photos, out, capfd):
    output = out / "many.webp"
    code = main(base_args(tiny_bundle, output) + ["--face", str(photos["a"]), "--num-images", "2"])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    expected = [out / "many-1.webp", out / "many-2.webp"]
    assert captured.out.splitlines() == [str(p) for p in expected]
    assert sorted(out.iterdir()) == expected
    images = []
    for path in expected:
        with Image.open(path) as image:
            assert image.format == "WEBP" and image.size == (64, 64)
            images.append(np.asarray(image.convert("RGB")))
    assert not np.array_equal(images[0], images[1])  # two samples, not one image twice


def test_face_embedding_and_kps_reproduce_the_face_path(tiny_bundle, photos, plain, out, tmp_path, capfd, seen):
    from instantid.identity import Pose
    from instantid.keypoints import draw_keypoints

    face, canvas = analyzed(tiny_bundle, photos["a"])
    embedding = save_embedding(tmp_path / "e.npy", face.embedding)
    kps = Pose(face.kps, canvas, face.bbox).keypoints_on(64, 64)  # the same points, now on the output canvas
    (tmp_path / "k.json").write_text(json.dumps(kps.tolist()))
    from_files = generate(capfd, tiny_bundle, out / "files.png", "--face-embedding", str(embedding),
                          "--face-kps", str(tmp_path / "k.json"))
    # bare keypoints know no face box: compare with the face path without its default face-region mask
    unmasked = generate(capfd, tiny_bundle, out / "unmasked.png", "--face", str(photos["a"]),
                        "--no-enhance-face-region")
    np.testing.assert_array_equal(from_files, unmasked)

    moved = kps + [[-14, 10]]  # the same face elsewhere on the canvas
    (tmp_path / "k2.json").write_text(json.dumps(moved.tolist()))
    elsewhere = generate(capfd, tiny_bundle, out / "moved.png", "--face-embedding", str(embedding),
                         "--face-kps", str(tmp_path / "k2.json"))
    np.testing.assert_array_equal(seen[0].face_embedding, face.embedding)
    # K.json is taken as points on the output canvas, drawn as IdentityNet's keypoint image
    np.testing.assert_array_equal(np.asarray(seen[2].keypoint_image), np.asarray(draw_keypoints(64, 64, moved)))
    assert not np.array_equal(elsewhere, read(plain))


def test_pose_photo_sets_the_keypoints(tiny_bundle, photos, plain, out, tmp_path, capfd, seen):
    same_photo = generate(capfd, tiny_bundle, out / "same.png", "--face", str(photos["a"]), "--pose",
                          str(photos["a"]))
    posed = generate(capfd, tiny_bundle, out / "posed.png", "--face", str(photos["a"]), "--pose",
                     str(photos["pose"]))
    face, canvas = analyzed(tiny_bundle, photos["a"])
    embedding = save_embedding(tmp_path / "e.npy", face.embedding)
    from_files = generate(capfd, tiny_bundle, out / "files.png", "--face-embedding", str(embedding), "--pose",
                          str(photos["pose"]))

    np.testing.assert_array_equal(same_photo, read(plain))  # the pose photo replaces exactly the keypoints
    # the pose photo's face sits elsewhere (its photo fills only the left half of a black canvas) ...
    pose_face, pose_canvas = analyzed(tiny_bundle, photos["pose"])
    assert not np.allclose(face.kps / canvas, pose_face.kps / pose_canvas, atol=0.05)
    # ... so IdentityNet gets another keypoint image, with the identity of --face unchanged ...
    assert not np.array_equal(np.asarray(seen[1].keypoint_image), np.asarray(seen[0].keypoint_image))
    np.testing.assert_array_equal(seen[1].face_embedding, seen[0].face_embedding)
    # ... and the image changes; --pose also completes --face-embedding (instead of --face-kps)
    assert not np.array_equal(posed, read(plain))
    np.testing.assert_array_equal(from_files, posed)


def test_several_faces_use_the_mean_embedding_and_the_first_pose(tiny_bundle, photos, plain, out, tmp_path, capfd,
                                                                 seen):
    # the per-photo embeddings, as `instantid analyze` saves them
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    assert main(["analyze", str(photos["a"]), str(photos["b"]), "--face-model", str(tiny_bundle / "antelopev2"),
                 "--output-dir", str(analysis)]) == 0
    report = json.loads(capfd.readouterr().out)
    emb_a, emb_b = (np.load(entry["faces"][0]["embedding"]) for entry in report)
    assert not np.allclose(emb_a, emb_b)
    mean = np.mean(np.stack([emb_a, emb_b]), axis=0)

    both = generate(capfd, tiny_bundle, out / "both.png", "--face", str(photos["a"]), "--face", str(photos["b"]))
    np.testing.assert_allclose(seen[0].face_embedding, mean, rtol=1e-6)
    # the mean embedding with the first photo's keypoints reproduces it exactly ...
    reference = generate(capfd, tiny_bundle, out / "ref.png", "--face-embedding",
                         str(save_embedding(tmp_path / "mean.npy", mean)), "--pose", str(photos["a"]))
    np.testing.assert_array_equal(both, reference)
    # ... and differs from either photo alone (b alone is posed like a, so only the identity differs)
    only_b = generate(capfd, tiny_bundle, out / "b.png", "--face", str(photos["b"]), "--pose", str(photos["a"]))
    assert not np.array_equal(both, read(plain)) and not np.array_equal(both, only_b)


def test_style_scales_and_scheduler_reach_the_request(tiny_bundle, photos, plain, out, capfd, seen):
    styled = generate(capfd, tiny_bundle, out / "styled.png", "--face", str(photos["a"]), "--style", "Watercolor",
                      "--negative-prompt", "blurry", "--guidance-scale", "3", "--ip-adapter-scale", "0.5",
                      "--controlnet-conditioning-scale", "0.6", "--control-guidance-end", "0.5")
    request = seen[0]
    assert request.prompt.startswith("watercolor painting, a photo of a person")
    assert request.negative_prompt.endswith("blurry") and len(request.negative_prompt) > len("blurry")
    assert (request.guidance_scale, request.ip_adapter_scale, request.controlnet_conditioning_scale,
            request.control_guidance_end, request.seed) == (3.0, 0.5, 0.6, 0.5, 1)
    assert not np.array_equal(styled, read(plain))

    # 'euler' is SDXL's own scheduler (the tiny model's default), so it reproduces the reference image
    euler = generate(capfd, tiny_bundle, out / "euler.png", "--face", str(photos["a"]), "--scheduler", "euler")
    np.testing.assert_array_equal(euler, read(plain))


def test_lora_with_scale_changes_the_image(tiny_bundle, photos, plain, out, capfd):
    lora = tiny_bundle / "lora" / "pytorch_lora_weights.safetensors"
    styled = generate(capfd, tiny_bundle, out / "lora.png", "--face", str(photos["a"]), "--lora", f"{lora}:0.8")
    off = generate(capfd, tiny_bundle, out / "off.png", "--face", str(photos["a"]), "--lora", f"{lora}:0")
    assert not np.array_equal(styled, read(plain))
    np.testing.assert_array_equal(off, read(plain))  # the scale after ':' is applied: 0 is no LoRA at all


def test_extra_controlnet_changes_the_image(tiny_bundle, photos, plain, out, capfd):
    extra = ["--controlnet", str(tiny_bundle / "controlnet-extra"), "--control-image", str(photos["control"])]
    controlled = generate(capfd, tiny_bundle, out / "cn.png", "--face", str(photos["a"]), *extra)
    zero = generate(capfd, tiny_bundle, out / "zero.png", "--face", str(photos["a"]), *extra, "--control-scale", "0")
    assert not np.array_equal(controlled, read(plain))
    np.testing.assert_array_equal(zero, read(plain))  # its residuals, scaled by --control-scale, are what changed


def test_control_type_derives_maps_from_the_photo_as_the_library(tiny_bundle, photos, plain, out, tmp_path, capfd,
                                                                   seen):
    from instantid.controls import DEFAULT_SCALES, Preprocessors
    from instantid.face import load_image, resize_for_analysis

    maps = tmp_path / "maps"
    maps.mkdir()
    pre = ["--depth-model", str(tiny_bundle / "dpt"), "--pose-model", str(tiny_bundle / "dwpose")]
    controls = ["--controlnet", str(tiny_bundle / "controlnet-pose"), "--control-type", "pose",
                "--controlnet", str(tiny_bundle / "controlnet-canny"), "--control-type", "canny",
                "--controlnet", str(tiny_bundle / "controlnet-depth"), "--control-type", "depth"]
    output = out / "controls.png"
    code = main(base_args(tiny_bundle, output) + ["--face", str(photos["a"]), *controls, *pre,
                                                  "--save-control-maps", str(maps)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    names = ["control0-pose.png", "control1-canny.png", "control2-depth.png"]
    assert captured.out.splitlines() == [str(output), *(str(maps / name) for name in names)]
    assert not np.array_equal(read(output), read(plain))
    # no --control-image: the maps come from the first face photo (no --pose), through the library, at 64x64
    library = Preprocessors(depth=str(tiny_bundle / "dpt"), pose=str(tiny_bundle / "dwpose"))
    photo = resize_for_analysis(load_image(str(photos["a"])))  # as the demo, the photo after its resize
    request = seen[-1]
    assert [(c.scale, c.start, c.end) for c in request.controls] == [(DEFAULT_SCALES[k], 0.0, 1.0)
                                                                      for k in ("pose", "canny", "depth")]
    for name, kind, control in zip(names, ("pose", "canny", "depth"), request.controls):
        expected = np.array(library.derive(kind, photo, SIZE_INT).convert("RGB"))
        np.testing.assert_array_equal(np.array(control.image), expected)
        np.testing.assert_array_equal(read(maps / name), expected)
    # a given photo for one type: its map differs from the face photo's
    pose_photo = ["--controlnet", str(tiny_bundle / "controlnet-canny"), "--control-type", "canny",
                  "--control-image", str(photos["pose"])]
    generate(capfd, tiny_bundle, out / "other.png", "--face", str(photos["a"]), *pose_photo)
    np.testing.assert_array_equal(np.array(seen[-1].controls[0].image),
                                  np.array(library.derive("canny", resize_for_analysis(load_image(str(
                                      photos["pose"]))), SIZE_INT).convert("RGB")))


# --- bad input: one line, exit 1, nothing written ------------------------------------------------------------


def _broken_instantid(bundle: Path, root: Path) -> Path:
    directory = root / "instantid-no-adapter"
    directory.mkdir()
    (directory / "ControlNetModel").symlink_to(bundle / "instantid" / "ControlNetModel")
    return directory


def _bad_cases(bundle: Path, photos: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments replacing/adding to a valid --face generate, text the message must contain)."""
    face = ["--face", str(photos["a"])]
    np.save(tmp / "e511.npy", np.ones(511, np.float32))
    np.save(tmp / "e512.npy", np.ones(512, np.float32))
    np.save(tmp / "e2x512.npy", np.ones((2, 512), np.float32))
    np.save(tmp / "estr.npy", np.array(["x"] * 512))
    (tmp / "enot.npy").write_text("not numpy")
    (tmp / "k5.json").write_text(json.dumps([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]]))
    (tmp / "k4.json").write_text(json.dumps([[1, 2]] * 4))
    (tmp / "k6.json").write_text(json.dumps([[1, 2]] * 6))
    (tmp / "k3d.json").write_text(json.dumps([[1, 2, 3]] * 5))
    (tmp / "kbad.json").write_text("[[1, 2], [3,")
    (tmp / "knan.json").write_text("[[1, 2], [3, 4], [5, 6], [7, 8], [NaN, 1]]")
    no_index = tmp / "sdxl-no-index"
    no_index.mkdir()
    (no_index / "unet").symlink_to(bundle / "sdxl" / "unet")
    emb = ["--face-embedding", str(tmp / "e512.npy")]
    return {
        "missing photo": (["--face", str(tmp / "nope.jpg")], "nope.jpg"),
        "directory as photo": (["--face", str(tmp)], str(tmp)),
        "text file as image": (["--face", str(photos["text"])], "text.jpg"),
        "truncated jpeg": (["--face", str(photos["truncated"])], "truncated"),
        "no face": (["--face", str(photos["grey"])], f"no face found in {photos['grey']}"),
        "no face in second photo": (face + ["--face", str(photos["grey"])], f"no face found in {photos['grey']}"),
        "no face in pose photo": (face + ["--pose", str(photos["grey"])], "grey.png"),
        "unreadable pose photo": (face + ["--pose", str(photos["text"])], "text.jpg"),
        "bad control image": (face + ["--controlnet", str(bundle / "controlnet-extra"), "--control-image",
                                      str(photos["truncated"])], "truncated"),
        "embedding of 511": (["--face-embedding", str(tmp / "e511.npy"), "--face-kps", str(tmp / "k5.json")],
                             "512"),
        "embedding 2x512": (["--face-embedding", str(tmp / "e2x512.npy"), "--pose", str(photos["a"])], "512"),
        "embedding of strings": (["--face-embedding", str(tmp / "estr.npy"), "--pose", str(photos["a"])],
                                 "face_embedding"),
        "embedding not npy": (["--face-embedding", str(tmp / "enot.npy"), "--pose", str(photos["a"])], "enot.npy"),
        "embedding missing": (["--face-embedding", str(tmp / "none.npy"), "--pose", str(photos["a"])], "none.npy"),
        "kps of 4": (emb + ["--face-kps", str(tmp / "k4.json")], "5 [x, y] points"),
        "kps of 6": (emb + ["--face-kps", str(tmp / "k6.json")], "5 [x, y] points"),
        "kps of 3-d points": (emb + ["--face-kps", str(tmp / "k3d.json")], "5 [x, y] points"),
        "kps not json": (emb + ["--face-kps", str(tmp / "kbad.json")], "kbad.json"),
        "kps not finite": (emb + ["--face-kps", str(tmp / "knan.json")], "finite"),
        "embedding without kps": (emb, "--face-kps"),
        "face and embedding": (face + emb + ["--face-kps", str(tmp / "k4.json")], "either"),
        "no identity": ([], "either"),
        "missing base model": (face + ["--base-model", str(tmp / "no-sdxl")], "no-sdxl"),
        "missing instantid": (face + ["--instantid", str(tmp / "no-instantid")], "no-instantid"),
        "missing face model": (face + ["--face-model", str(tmp / "no-pack")], "no-pack"),
        "instantid without ip-adapter.bin": (face + ["--instantid", str(_broken_instantid(bundle, tmp))],
                                             "ip-adapter.bin"),
        "sdxl without model_index.json": (face + ["--base-model", str(no_index)], "model_index.json"),
        "missing lora": (face + ["--lora", f"{tmp / 'nope.safetensors'}:0.5"], "nope.safetensors"),
        "missing extra controlnet": (face + ["--controlnet", str(tmp / "no-cn"), "--control-image",
                                             str(photos["control"])], "no-cn"),
        "controlnet without image": (face + ["--controlnet", str(bundle / "controlnet-extra")], "--control-image"),
        "control type per controlnet": (face + ["--controlnet", str(bundle / "controlnet-canny"), "--control-type",
                                                "canny", "--control-type", "depth"], "--control-type"),
        "control maps dir missing": (face + ["--controlnet", str(bundle / "controlnet-canny"), "--control-type",
                                             "canny", "--save-control-maps", str(tmp / "no-maps")], "no-maps"),
        "missing pose model": (face + ["--controlnet", str(bundle / "controlnet-pose"), "--control-type", "pose",
                                       "--pose-model", str(tmp / "no-dwpose")], "no-dwpose"),
        "width not multiple of 8": (face + ["--width", "60"], "--width"),
        "height zero": (face + ["--height", "0"], "--height"),
        "steps zero": (face + ["--steps", "0"], "--steps"),
        "num images zero": (face + ["--num-images", "0"], "--num-images"),
        "unknown scheduler": (face + ["--scheduler", "ddim-ish"], "--scheduler"),
        "unknown style": (face + ["--style", "No Such Style"], "No Such Style"),
        "unsupported extension": (face + ["--output", "OUT/x.gif"], ".gif"),
        "no extension": (face + ["--output", "OUT/x"], "--output"),
        "output dir missing": (face + ["--output", "OUT/missing/x.png"], "does not exist"),
        "cuda without a GPU": (face + ["--device", "cuda"], "no CUDA device"),
        "noise above 1": (face + ["--noise", "1.5"], "--noise"),
        "det size not a multiple of 32": (face + ["--det-size", "600"], "--det-size"),
        "det size too small": (face + ["--det-size", "64"], "--det-size"),
        "face index past the faces": (face + ["--face-index", "2"], "face_index"),
        "face index without face": (emb + ["--face-kps", str(tmp / "k5.json"), "--face-index", "0"],
                                    "--face-index"),
        "pose face index without pose": (face + ["--pose-face-index", "0"], "--pose-face-index"),
        "concat with people": (["--person", str(photos["a"]) + "@4,4,30,30", "--person",
                                str(photos["a"]) + "@34,34,60,60", "--combine", "concat"], "--combine"),
    }


BAD_CASE_NAMES = [
    "missing photo", "directory as photo", "text file as image", "truncated jpeg", "no face",
    "no face in second photo", "no face in pose photo", "unreadable pose photo", "bad control image",
    "embedding of 511", "embedding 2x512", "embedding of strings", "embedding not npy", "embedding missing",
    "kps of 4", "kps of 6", "kps of 3-d points", "kps not json", "kps not finite", "embedding without kps",
    "face and embedding", "no identity", "missing base model", "missing instantid", "missing face model",
    "instantid without ip-adapter.bin", "sdxl without model_index.json", "missing lora",
    "missing extra controlnet", "controlnet without image", "control type per controlnet",
    "control maps dir missing", "missing pose model", "width not multiple of 8", "height zero",
    "steps zero", "num images zero", "unknown scheduler", "unknown style", "unsupported extension",
    "no extension", "output dir missing", "cuda without a GPU",
    "noise above 1", "det size not a multiple of 32", "det size too small", "face index past the faces",
    "face index without face", "pose face index without pose", "concat with people",
]


@pytest.fixture(scope="module")
def bad_inputs(tiny_bundle, photos, tmp_path_factory):
    return _bad_cases(tiny_bundle, photos, tmp_path_factory.mktemp("bad"))


def test_bad_case_list_is_complete(bad_inputs):
    assert sorted(bad_inputs) == sorted(BAD_CASE_NAMES)


@pytest.mark.parametrize("case", BAD_CASE_NAMES)
def test_bad_input_is_one_line_exit_1_and_nothing_written(case, bad_inputs, tiny_bundle, out, capfd):
    extra, expected = bad_inputs[case]
    if case == "cuda without a GPU":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
    extra = [a.replace("OUT", str(out)) for a in extra]
    args = base_args(tiny_bundle, out / "result.png")
    # flags given in the case replace the valid defaults (argparse keeps the last value; --face appends)
    code = main(args + extra)
    captured = capfd.readouterr()

    assert code == 1, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("instantid: error: ")
    assert expected in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert list(out.iterdir()) == []  # nothing written, not even a temporary file


def test_output_that_cannot_be_written_leaves_nothing_behind(tiny_bundle, photos, out, capfd, monkeypatch):
    """A failure while saving the second image: neither image nor any temporary file remains."""
    calls = []
    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    code = main(base_args(tiny_bundle, out / "x.png") + ["--face", str(photos["a"]), "--num-images", "2"])
    captured = capfd.readouterr()
    assert code == 3  # an environment failure, not bad input
    assert "disk full" in captured.err.splitlines()[-1] and "Traceback" not in captured.err
    assert list(out.iterdir()) == []


# --- analyze -----------------------------------------------------------------------------------------------


def test_analyze_reports_faces_largest_first_and_saves_raw_embeddings(tiny_bundle, photos, tmp_path, capfd):
    from instantid.face import FaceModel, load_image, resize_for_analysis

    target = tmp_path / "emb"
    target.mkdir()
    code = main(["analyze", str(photos["a"]), str(photos["grey"]), "--face-model", str(tiny_bundle / "antelopev2"),
                 "--output-dir", str(target)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)  # stdout is pure JSON

    assert isinstance(report, list) and [r["image"] for r in report] == [str(photos["a"]), str(photos["grey"])]
    photo, grey = report
    assert grey["faces"] == [] and (grey["width"], grey["height"]) == (300, 240)
    image = load_image(photos["a"])
    assert (photo["width"], photo["height"]) == image.size
    faces = photo["faces"]
    assert len(faces) == 2  # the tiny detector's main face and its small face
    areas = [(f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]) for f in faces]
    assert areas == sorted(areas, reverse=True) and areas[0] > areas[1]
    from instantid.face import analysis_mapping, analysis_size

    # bbox and keypoints in the original photo's pixels (the tiny detector's main face: x 30-70%, y 20-75% of the
    # analysed canvas, a centred crop of the photo at one scale)
    (w, h), ((sx, sy), (ox, oy)) = analysis_size(*image.size), analysis_mapping(*image.size)
    np.testing.assert_allclose(faces[0]["bbox"], [0.30 * w * sx + ox, 0.20 * h * sy + oy, 0.70 * w * sx + ox,
                                                  0.75 * h * sy + oy], atol=3)
    assert oy > 20  # t1.jpg 1280x886 is cut to 1280x832: a mapping that forgets the crop is off by 27 pixels
    for face in faces:
        x1, y1, x2, y2 = face["bbox"]
        assert 0.5 <= face["score"] <= 1 and len(face["kps"]) == 5
        assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face["kps"])

    reference = FaceModel(str(tiny_bundle / "antelopev2")).analyze(resize_for_analysis(image))
    assert [f["embedding"] for f in faces] == [str(target / f"a.face{i}.npy") for i in range(2)]
    for face, expected in zip(faces, reference):
        saved = np.load(face["embedding"])
        assert saved.dtype == np.float32 and saved.shape == (512,)
        np.testing.assert_array_equal(saved, expected.embedding)  # the raw embedding, not normalised
    assert abs(float(np.linalg.norm(np.load(faces[0]["embedding"]))) - 1.0) > 0.5
    assert sorted(p.name for p in target.iterdir()) == ["a.face0.npy", "a.face1.npy"]


def test_analyze_refuses_photos_whose_embeddings_would_overwrite_each_other(tiny_bundle, photos, tmp_path, capfd):
    for sub, key in (("one", "a"), ("two", "b")):
        (tmp_path / sub).mkdir()
        shutil.copy(photos[key], tmp_path / sub / "photo.png")
    target = tmp_path / "emb"
    target.mkdir()
    code = main(["analyze", str(tmp_path / "one" / "photo.png"), str(tmp_path / "two" / "photo.png"),
                 "--face-model", str(tiny_bundle / "antelopev2"), "--output-dir", str(target)])
    captured = capfd.readouterr()
    assert code == 1 and captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("instantid: error: ")
    assert "photo.face<N>.npy" in captured.err
    assert list(target.iterdir()) == []

    # the same file twice is harmless: one set of embeddings
    assert main(["analyze", str(tmp_path / "one" / "photo.png"), str(tmp_path / "one" / "photo.png"),
                 "--face-model", str(tiny_bundle / "antelopev2"), "--output-dir", str(target)]) == 0
    first, second = json.loads(capfd.readouterr().out)
    assert first == {**second, "image": first["image"]}
    assert sorted(p.name for p in target.iterdir()) == ["photo.face0.npy", "photo.face1.npy"]


def test_analyze_bad_input_writes_nothing(tiny_bundle, photos, tmp_path, capfd):
    target = tmp_path / "emb"
    target.mkdir()
    code = main(["analyze", str(photos["a"]), str(photos["truncated"]), "--face-model",
                 str(tiny_bundle / "antelopev2"), "--output-dir", str(target)])
    captured = capfd.readouterr()
    assert code == 1 and captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("instantid: error: ")
    assert "truncated" in captured.err
    assert list(target.iterdir()) == []  # every image is read before any embedding is saved

    code = main(["analyze", str(photos["a"]), "--face-model", str(tiny_bundle / "antelopev2"),
                 "--output-dir", str(tmp_path / "missing")])
    captured = capfd.readouterr()
    assert code == 1 and captured.err.startswith("instantid: error: ") and "missing" in captured.err


# --- make-tiny ---------------------------------------------------------------------------------------------


def test_make_tiny_writes_the_real_layouts(tmp_path, capfd):
    root = tmp_path / "bundle"
    assert main(["make-tiny", str(root)]) == 0
    captured = capfd.readouterr()
    assert captured.out.strip() == str(root)

    for rel in ("sdxl/model_index.json", "sdxl/unet/config.json", "sdxl/vae/config.json",
                "sdxl/text_encoder/config.json", "sdxl/text_encoder_2/config.json", "sdxl/scheduler",
                "sdxl/tokenizer/vocab.json", "sdxl/tokenizer_2/merges.txt",
                "instantid/ControlNetModel/config.json", "instantid/ip-adapter.bin",
                "controlnet-extra/config.json", "lora/pytorch_lora_weights.safetensors",
                "controlnet-pose/config.json", "controlnet-canny/config.json", "controlnet-depth/config.json",
                "dpt/config.json", "dpt/preprocessor_config.json", "dpt/model.safetensors",
                "dwpose/yolox_l.onnx", "dwpose/dw-ll_ucoco_384.onnx", "safety/config.json",
                "safety/preprocessor_config.json", "safety-flag-all/model.safetensors"):
        assert (root / rel).exists(), rel
    assert sorted(p.name for p in (root / "antelopev2").glob("*.onnx")) == ["glintr100.onnx",
                                                                             "scrfd_10g_bnkps.onnx"]
    index = json.loads((root / "sdxl" / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"} <= set(index)
    import torch

    state = torch.load(root / "instantid" / "ip-adapter.bin", map_location="cpu", weights_only=True)
    assert set(state) == {"image_proj", "ip_adapter"}
    assert main(["make-tiny", str(root)]) == 0  # idempotent: a second run reuses the bundle
    assert capfd.readouterr().out.strip() == str(root)


def test_make_tiny_prints_generate_flags_that_work(tmp_path, capfd, face_photo):
    """The usage make-tiny prints points generate at every folder it wrote (the face pack included); run as
    printed (with the photo and the output filled in), it generates."""
    import shlex

    root = tmp_path / "my bundle"  # a space: the printed paths must be quoted
    assert main(["make-tiny", str(root)]) == 0
    usage = capfd.readouterr().err
    for folder in ("sdxl", "instantid", "antelopev2", "controlnet-extra", "lora/pytorch_lora_weights.safetensors"):
        assert shlex.quote(str(root / folder)) in usage, folder
    command = usage.split("  instantid generate ", 1)[1].split("\n  optional:")[0].replace("\\\n", " ")
    argv = shlex.split(command.replace("PHOTO.jpg", shlex.quote(str(face_photo)))
                       .replace("out.png", shlex.quote(str(tmp_path / "out.png"))))
    optional = shlex.split(usage.split("  optional: ", 1)[1].splitlines()[0].replace("IMG", shlex.quote(str(face_photo))))
    assert main(["generate", *argv, *optional, "--device", "cpu", "--no-score"]) == 0
    assert (tmp_path / "out.png").is_file()


# --- the installed entry point -----------------------------------------------------------------------------


def test_installed_entry_point(tiny_bundle, photos, plain, tmp_path):
    """The ``instantid`` script: a run writes the same image as in-process; an error is one stderr line."""
    script = Path(sys.executable).with_name("instantid")
    assert script.exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    runs = [
        subprocess.Popen([str(script)] + base_args(tiny_bundle, good / "x.png") + ["--face", str(photos["a"])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
        # an error found after the face model ran and the model libraries were imported
        subprocess.Popen([str(script)] + base_args(tiny_bundle, bad / "x.png") +
                         ["--face", str(photos["a"]), "--base-model", str(tmp_path / "missing-sdxl")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
    ]
    (ok_out, ok_err), (fail_out, fail_err) = (run.communicate(timeout=300) for run in runs)

    assert runs[0].returncode == 0, ok_err
    assert ok_out.splitlines() == [str(good / "x.png")]
    assert (good / "x.png").read_bytes() == plain.read_bytes()

    assert runs[1].returncode == 1 and fail_out == ""
    assert fail_err.splitlines() == [f"instantid: error: weights not found: {tmp_path / 'missing-sdxl'} "
                                     f"does not exist"]
    assert list(bad.iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_honour_the_umask(tiny_bundle, photos, out, capfd, umask, mode):
    """The atomic write's temporary file is created 0600; the output must get the mode any tool gives a new file
    (0666 less the umask), or a web server or a teammate cannot read it."""
    old = os.umask(umask)
    try:
        pose = out / "pose.png"
        code = main(base_args(tiny_bundle, out / "x.png") + ["--face", str(photos["a"]), "--num-images", "2",
                                                             "--save-pose-image", str(pose), "--no-score"])
    finally:
        os.umask(old)
    assert code == 0, capfd.readouterr().err
    for path in (out / "x-1.png", out / "x-2.png", pose):
        assert (path.stat().st_mode & 0o777) == mode, (path, oct(path.stat().st_mode))


def test_comfyui_controls_reach_the_request(tiny_bundle, photos, plain, out, tmp_path, capfd, seen):
    """--combine, --noise, --face-index, --pose-face-index, --det-size/--det-retry: ComfyUI_InstantID's controls,
    each checked against the library computing the same thing."""
    from instantid.face import FaceModel, load_image
    from instantid.identity import Detection, build_identity, build_pose, combine_embeddings

    analyzer = FaceModel(str(tiny_bundle / "antelopev2"))
    a, b = (("p", load_image(photos[k])) for k in ("a", "b"))
    faces = [f.embedding for f in build_identity(analyzer, [a, b]).faces]
    concat = generate(capfd, tiny_bundle, out / "concat.png", "--face", str(photos["a"]), "--face", str(photos["b"]),
                      "--combine", "concat")
    np.testing.assert_array_equal(seen[-1].face_embedding, np.stack(faces))
    generate(capfd, tiny_bundle, out / "norm.png", "--face", str(photos["a"]), "--face", str(photos["b"]),
             "--combine", "norm_average")
    np.testing.assert_allclose(seen[-1].face_embedding, combine_embeddings(faces, "norm_average"), rtol=1e-6)
    assert seen[-1].noise == 0.0  # the default: the demo's zero embedding
    noisy = generate(capfd, tiny_bundle, out / "noisy.png", "--face", str(photos["a"]), "--noise", "0.35")
    assert seen[-1].noise == 0.35 and not np.array_equal(noisy, read(plain))
    assert not np.array_equal(concat, read(plain))

    generate(capfd, tiny_bundle, out / "second.png", "--face", str(photos["a"]), "--face-index", "1",
             "--det-size", "320", "--det-retry")
    picked = build_identity(analyzer, [a], detection=Detection(det_size=320, retry=True, face_index=1))
    np.testing.assert_array_equal(seen[-1].face_embedding, picked.embedding)
    generate(capfd, tiny_bundle, out / "posed.png", "--face", str(photos["a"]), "--pose", str(photos["pose"]),
             "--pose-face-index", "1", "--no-enhance-face-region")
    pose = build_pose(analyzer, "pose", load_image(photos["pose"]), Detection(face_index=1))
    np.testing.assert_array_equal(np.asarray(seen[-1].keypoint_image), np.asarray(pose.draw(*SIZE_INT)))

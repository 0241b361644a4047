"""The CLI's demo features: photo-shaped default size, --save-pose-image, the face-region mask on by default,
--prompt-weighting, --control-mask and img2img, and their bad-input contract."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_cli import base_args, out, photos, read, seen  # noqa: F401 (fixtures)

from instantid.cli import main
from instantid.face import FaceModel, load_image, resize_for_analysis
from instantid.identity import build_identity


def without_size(args: list[str]) -> list[str]:
    for flag in ("--width", "--height"):
        i = args.index(flag)
        del args[i:i + 2]
    return args


def test_default_size_is_the_photos_canvas_with_pose_image_and_face_mask(tiny_bundle, photos, out, seen, capfd):
    # t1.jpg (1280x886) is analysed on 1280x832, as the demo's resize_img: the output takes that size
    args = without_size(base_args(tiny_bundle, out / "o.png")) + [
        "--face", str(photos["a"]), "--steps", "1", "--save-pose-image", str(out / "pose.png")]
    assert main(args) == 0, capfd.readouterr().err
    assert capfd.readouterr().out.splitlines() == [str(out / "o.png"), str(out / "pose.png")]
    assert Image.open(out / "o.png").size == (1280, 832)
    identity = build_identity(FaceModel(str(tiny_bundle / "antelopev2")), [("a", load_image(photos["a"]))])
    assert identity.pose.size == (1280, 832)
    np.testing.assert_array_equal(read(out / "pose.png"), np.asarray(identity.pose.draw()))
    request = seen[-1]
    np.testing.assert_array_equal(np.asarray(request.keypoint_image), read(out / "pose.png"))
    # enhance face region is on by default: the mask is the face box on the output canvas
    np.testing.assert_array_equal(np.asarray(request.control_mask), np.asarray(identity.pose.face_mask()))
    assert request.prompt_weighting == "lpw"


def test_no_enhance_face_region_and_explicit_mask(tiny_bundle, photos, out, seen, capfd):
    args = base_args(tiny_bundle, out / "o.png") + ["--face", str(photos["a"])]
    assert main(args + ["--no-enhance-face-region", "--prompt-weighting", "none"]) == 0
    assert seen[-1].control_mask is None and seen[-1].prompt_weighting == "none"
    assert main(args + ["--control-mask", str(photos["control"])]) == 0
    assert seen[-1].control_mask.size == (64, 64)
    capfd.readouterr()


def test_explicit_size_of_another_aspect_keeps_the_face_unstretched(tiny_bundle, photos, out, seen, capfd):
    args = without_size(base_args(tiny_bundle, out / "o.png")) + ["--face", str(photos["a"]), "--width", "64",
                                                                   "--height", "96", "--steps", "1"]
    assert main(args) == 0, capfd.readouterr().err
    identity = build_identity(FaceModel(str(tiny_bundle / "antelopev2")), [("a", load_image(photos["a"]))])
    np.testing.assert_array_equal(np.asarray(seen[-1].keypoint_image), np.asarray(identity.pose.draw(64, 96)))
    assert Image.open(out / "o.png").size == (64, 96)


def test_img2img_takes_the_init_images_size(tiny_bundle, photos, out, seen, capfd, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (96, 64), (200, 120, 40)).save(init)
    kps = tmp_path / "kps.json"
    kps.write_text("[[500, 300], [700, 300], [600, 420], [520, 540], [680, 540]]")
    emb = tmp_path / "e.npy"
    np.save(emb, np.ones(512, np.float32))
    args = without_size(base_args(tiny_bundle, out / "o.png")) + [
        "--face-embedding", str(emb), "--face-kps", str(kps), "--init-image", str(init), "--strength", "0.5",
        "--steps", "2"]
    assert main(args) == 0, capfd.readouterr().err
    size = resize_for_analysis(Image.open(init)).size
    assert size == (1280, 832) and Image.open(out / "o.png").size == size
    assert seen[-1].strength == 0.5 and seen[-1].init_image.size == (96, 64) and seen[-1].control_mask is None


@pytest.mark.parametrize("extra, field", [
    (["--control-mask", "{text}"], "--control-mask"),
    (["--init-image", "{text}"], "--init-image"),
    (["--init-image", "{a}", "--strength", "0"], "--strength"),
    (["--init-image", "{a}", "--strength", "1.5"], "--strength"),
    (["--save-pose-image", "{out}/pose.txt"], "--save-pose-image"),
])
def test_bad_demo_inputs_one_line_nothing_written(tiny_bundle, photos, out, capfd, extra, field):
    extra = [e.format(text=photos["text"], a=photos["a"], out=out) for e in extra]
    code = main(base_args(tiny_bundle, out / "o.png") + ["--face", str(photos["a"])] + extra)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("instantid: error:") and field in err[0]
    assert list(out.iterdir()) == []


def test_enhance_face_region_needs_a_face_box(tiny_bundle, out, capfd, tmp_path):
    emb = tmp_path / "e.npy"
    np.save(emb, np.ones(512, np.float32))
    kps = tmp_path / "kps.json"
    kps.write_text("[[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]]")
    code = main(base_args(tiny_bundle, out / "o.png") + ["--face-embedding", str(emb), "--face-kps", str(kps),
                                                         "--enhance-face-region"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1 and "--enhance-face-region" in err[0] and list(out.iterdir()) == []

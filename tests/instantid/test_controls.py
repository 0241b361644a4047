"""Control maps derived from a photo (canny, depth, pose) as the official multi-ControlNet demo derives them, on
tiny random preprocessors in the real layouts, and their effect through the pipeline."""

import cv2
import numpy as np
import PIL.Image
import pytest
import torch

from instantid.controls import (CONTROL_TYPES, DEFAULT_SCALES, ControlSpec, DepthEstimator, PoseEstimator,
                                Preprocessors, canny_map, prepare_controls)
from instantid.errors import InvalidParameterError, WeightsError
from instantid.face import load_image, resize_for_analysis


@pytest.fixture(scope="module")
def photo(face_photo):
    return load_image(str(face_photo))


@pytest.fixture(scope="module")
def preprocessors(tiny_bundle):
    return Preprocessors(depth=str(tiny_bundle / "dpt"), pose=str(tiny_bundle / "dwpose"))


def demo_canny(image, t1=100, t2=200):
    """gradio_demo/controlnet_util.py's get_canny_image, on its convert_from_image_to_cv2."""
    image = cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR)
    return PIL.Image.fromarray(cv2.Canny(image, t1, t2), "L")


def demo_depth(image, processor, model, size=(1024, 1024)):
    """The demo's get_depth_map on CPU (it runs the same under autocast on CUDA)."""
    pixels = processor(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        depth = model(pixels).predicted_depth
    depth = torch.nn.functional.interpolate(depth.unsqueeze(1), size=size, mode="bicubic", align_corners=False)
    low, high = torch.amin(depth, dim=[1, 2, 3], keepdim=True), torch.amax(depth, dim=[1, 2, 3], keepdim=True)
    depth = (depth - low) / (high - low)
    return torch.cat([depth] * 3, dim=1).permute(0, 2, 3, 1).numpy()[0]


def test_canny_equals_the_demo_function_exactly(photo):
    ours = canny_map(photo)
    assert ours.mode == "L" and ours.size == photo.size
    assert np.array_equal(np.array(ours), np.array(demo_canny(photo)))
    assert np.array(ours).any()  # a real photo has edges


def test_depth_equals_a_direct_transformers_run(tiny_bundle, photo):
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    model = DPTForDepthEstimation.from_pretrained(tiny_bundle / "dpt").eval()
    processor = DPTImageProcessor.from_pretrained(tiny_bundle / "dpt")
    reference = demo_depth(photo, processor, model)
    ours = np.array(DepthEstimator.load(str(tiny_bundle / "dpt"))(photo)).astype(np.float32) / 255.0
    assert ours.shape == (1024, 1024, 3)
    assert np.abs(ours - reference).max() <= 1 / 255 + 1e-6  # 8-bit rounding of the same floats
    assert ours.min() == 0.0 and ours.max() == 1.0  # min-max normalised


def test_pose_draws_the_estimators_body_keypoints(tiny_bundle, photo):
    from rtmlib import RTMPose, YOLOX

    pose = PoseEstimator.load(str(tiny_bundle / "dwpose"))
    keypoints, scores = pose.keypoints(photo)
    # the same two ONNX models run directly through rtmlib give the same people and points
    bgr = np.array(photo)[:, :, ::-1].copy()
    detector = YOLOX(str(tiny_bundle / "dwpose" / "yolox_l.onnx"), model_input_size=(64, 64))
    direct = RTMPose(str(tiny_bundle / "dwpose" / "dw-ll_ucoco_384.onnx"), model_input_size=(48, 64),
                     to_openpose=True)(bgr, bboxes=detector(bgr))
    assert keypoints.shape[1:] == (18, 2) and len(keypoints) >= 1
    np.testing.assert_allclose(keypoints, direct[0][:, :18])
    drawn = np.array(pose(photo))
    width, height = photo.size
    scale = 512 / min(width, height)  # drawn at OpenPose's 512 detect resolution
    assert drawn.shape[:2] == (round(height * scale), round(width * scale))
    assert drawn.any() and (drawn == 0).all(axis=-1).mean() > 0.3  # a skeleton on black
    other = np.array(pose(photo.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)))
    assert not np.array_equal(drawn, other)  # the map follows the photo


@pytest.mark.parametrize("kind", CONTROL_TYPES)
def test_maps_are_resized_to_the_canvas_and_deterministic(preprocessors, photo, kind):
    first = preprocessors.derive(kind, photo, (96, 64))
    assert first.size == (96, 64)
    assert np.array_equal(np.array(first), np.array(preprocessors.derive(kind, photo, (96, 64))))


def test_unknown_type_and_bad_specs_are_refused(preprocessors, photo):
    with pytest.raises(InvalidParameterError, match="segmentation"):
        preprocessors.derive("segmentation", photo)
    with pytest.raises(InvalidParameterError, match=r"controls\[0\]"):
        prepare_controls(preprocessors, [ControlSpec("canny")], (64, 64))
    with pytest.raises(InvalidParameterError, match=r"controls\[1\]"):
        prepare_controls(preprocessors, [ControlSpec("canny", photo=photo), ControlSpec("depth", photo=photo,
                                                                                         map=photo)], (64, 64))


def test_preprocessor_weights_are_checked_and_load_from_s3(tiny_bundle, tmp_path, s3_bucket, monkeypatch):
    import boto3

    with pytest.raises(WeightsError, match="dw-ll_ucoco_384.onnx"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "yolox_l.onnx").write_bytes((tiny_bundle / "dwpose" / "yolox_l.onnx").read_bytes())
        PoseEstimator.load(str(tmp_path / "half"))
    with pytest.raises(WeightsError, match="config.json"):
        DepthEstimator.load(str(tmp_path / "half"))
    monkeypatch.setenv("INSTANTID_CACHE", str(tmp_path / "cache"))
    client = boto3.client("s3")
    for path in (tiny_bundle / "dpt").iterdir():
        client.upload_file(str(path), s3_bucket, f"dpt/{path.name}")
    estimator = DepthEstimator.load(f"s3://{s3_bucket}/dpt")
    local = DepthEstimator.load(str(tiny_bundle / "dpt"))
    image = PIL.Image.new("RGB", (40, 30), (200, 10, 60))
    image.paste((10, 200, 60), (0, 0, 20, 30))
    assert np.array_equal(np.array(estimator(image)), np.array(local(image)))


def test_prepare_controls_defaults_and_ready_maps(preprocessors, photo):
    ready = PIL.Image.new("L", (10, 20), 255)
    inputs = prepare_controls(preprocessors, [ControlSpec("pose", photo=photo), ControlSpec("canny", map=ready),
                                              ControlSpec("depth", photo=photo, scale=0.9, start=0.1, end=0.8)],
                              (64, 48))
    assert [(c.name, c.scale, c.start, c.end) for c in inputs] == [
        ("pose", DEFAULT_SCALES["pose"], 0.0, 1.0), ("canny", DEFAULT_SCALES["canny"], 0.0, 1.0),
        ("depth", 0.9, 0.1, 0.8)]
    assert all(c.image.size == (64, 48) and c.image.mode == "RGB" for c in inputs)
    demo_sized = resize_for_analysis(photo)  # the demo derives its maps from the resized photo
    assert demo_sized.size != photo.size
    assert np.array_equal(np.array(inputs[0].image), np.array(preprocessors.derive("pose", demo_sized, (64, 48))))
    assert (np.array(inputs[1].image) == 255).all()


def test_derived_maps_change_the_image_through_their_controlnets(tiny_bundle, preprocessors, photo):
    from instantid.identity import Pose
    from instantid.loading import load_pipeline
    from instantid.pipeline import GenerationRequest

    pipe = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu",
                         controlnets={k: str(tiny_bundle / f"controlnet-{k}") for k in CONTROL_TYPES})
    pipe.set_progress_bar_config(disable=True)
    kps = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=float)

    def run(controls):
        request = GenerationRequest(face_embedding=np.ones(512, np.float32), keypoint_image=Pose(kps, (64, 64)).draw(),
                                    prompt="a person", seed=3, controls=controls)
        return pipe.generate([request], width=64, height=64, steps=2, output_type="latent")[0]

    base = run([])
    outputs = {}
    for kind in CONTROL_TYPES:
        outputs[kind] = run(prepare_controls(preprocessors, [ControlSpec(kind, photo=photo)], (64, 64)))
        assert not torch.equal(base, outputs[kind]), kind
    assert not torch.equal(outputs["pose"], outputs["canny"])
    both = run(prepare_controls(preprocessors, [ControlSpec("pose", photo=photo), ControlSpec("canny", photo=photo)],
                                (64, 64)))
    assert not torch.equal(both, outputs["pose"]) and not torch.equal(both, outputs["canny"])


def test_preload_loads_the_models_of_the_named_types_now_and_names_the_failure(tiny_bundle, tmp_path):
    """A replica loads the preprocessors its config offers at start (not on the first request that needs one), so
    a missing model makes it not ready, saying which."""
    from instantid.errors import WeightsError

    ready = Preprocessors(depth=str(tiny_bundle / "dpt"), pose=str(tiny_bundle / "dwpose"))
    assert ready.preload(["canny", "depth", "pose", "depth"]) == ["depth", "pose"]
    assert set(ready._loaded) == {"depth", "pose"}
    assert Preprocessors(depth=str(tmp_path / "none"), pose=str(tmp_path / "none")).preload(["canny"]) == []
    broken = Preprocessors(depth=str(tiny_bundle / "dpt"), pose=str(tmp_path / "no-dwpose"))
    with pytest.raises(WeightsError, match=r"pose preprocessor .*no-dwpose"):
        broken.preload(["depth", "pose"])

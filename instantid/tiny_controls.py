"""Tiny random-weight preprocessors and safety checker in the real on-disk layouts (tests and the tiny profile).

- ``write_tiny_depth(dir)``: a DPT depth model as ``DPTForDepthEstimation.save_pretrained`` writes it
  (config.json, model.safetensors) with its ``preprocessor_config.json`` (DPTImageProcessor), as
  Intel/dpt-hybrid-midas holds them; the ViT backbone at toy width (the real one is hybrid ViT+BiT).
- ``write_tiny_pose(dir)``: DWPose's two ONNX files under yzd-v/DWPose's names: ``yolox_l.onnx`` (YOLOX's raw head
  output, (1, anchors, 85) over strides 8/16/32, objectness and class scores after a sigmoid, as YOLOX exports it)
  and ``dw-ll_ucoco_384.onnx`` (RTMPose's SimCC outputs ``simcc_x`` (1, 133, 2W) and ``simcc_y`` (1, 133, 2H)),
  at a 64x64 detector input and a 48x64 pose input instead of 640x640 and 288x384. Random convolutions: the
  boxes and keypoints depend on the photo but mean nothing.
- ``write_tiny_safety_checker(dir, flag)``: diffusers' ``StableDiffusionSafetyChecker`` as
  CompVis/stable-diffusion-safety-checker holds it (config.json of a CLIPConfig, model.safetensors,
  preprocessor_config.json of a CLIPImageProcessor), toy width. Its concept thresholds are weights: ``flag=True``
  sets them so that every image is flagged, ``False`` so that none is (random weights would flag at random).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SEED = 20240130
POSE_KEYPOINTS = 133  # DWPose's whole-body COCO layout; the first 17 are COCO's body points
DETECTOR_SIZE = (64, 64)  # (height, width)
POSE_SIZE = (64, 48)


def write_tiny_depth(directory: Path) -> Path:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(SEED)
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
        head_in_index=-1, readout_type="project",
    )
    DPTForDepthEstimation(config).eval().save_pretrained(directory, safe_serialization=True)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False, do_normalize=True,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)
    return Path(directory)


def write_tiny_pose(directory: Path) -> Path:
    from .controls import POSE_DETECTOR_FILE, POSE_MODEL_FILE

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    _save(_detector(rng), directory / POSE_DETECTOR_FILE)
    _save(_pose_model(rng), directory / POSE_MODEL_FILE)
    return directory


def _save(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _tensor(name: str, array: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(array.astype(np.float32), name)


def _detector(rng):
    """YOLOX's head in miniature: per stride a strided conv to (4 box + 1 objectness + 80 classes) channels."""
    from onnx import TensorProto, helper

    height, width = DETECTOR_SIZE
    nodes, inits, parts = [], [], []
    for stride in (8, 16, 32):
        # YOLOX takes raw 0-255 pixels: outputs of order 0.5 over the 3 x stride^2 window
        w = rng.normal(0, 0.5 / (255 * stride * np.sqrt(3)), (85, 3, stride, stride))
        b = np.zeros(85)
        b[2:4] = np.log(4.0)  # boxes about four strides wide: a crop worth estimating a pose in
        b[4] = b[5] = 4.0  # objectness and "person" high: a few people survive the 0.7 score threshold and NMS
        inits += [_tensor(f"w{stride}", w), _tensor(f"b{stride}", b),
                  helper.make_tensor(f"shape{stride}", TensorProto.INT64, [3], [1, 85, -1])]
        nodes += [helper.make_node("Conv", ["input", f"w{stride}", f"b{stride}"], [f"c{stride}"],
                                   strides=[stride, stride], kernel_shape=[stride, stride]),
                  helper.make_node("Reshape", [f"c{stride}", f"shape{stride}"], [f"r{stride}"])]
        parts.append(f"r{stride}")
    inits.append(helper.make_tensor("split", TensorProto.INT64, [2], [4, 81]))
    nodes += [helper.make_node("Concat", parts, ["all"], axis=2),
              helper.make_node("Transpose", ["all"], ["raw"], perm=[0, 2, 1]),
              helper.make_node("Split", ["raw", "split"], ["box", "logits"], axis=2),
              helper.make_node("Sigmoid", ["logits"], ["scores"]),
              helper.make_node("Concat", ["box", "scores"], ["output"], axis=2)]
    anchors = sum((height // s) * (width // s) for s in (8, 16, 32))
    return helper.make_graph(nodes, "tiny_yolox", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, [1, 3, height, width])], [helper.make_tensor_value_info(
            "output", TensorProto.FLOAT, [1, anchors, 85])], inits)


def _pose_model(rng):
    """RTMPose's SimCC interface: a strided conv to one channel per keypoint, pooled along each axis and
    projected onto the 2x-split x and y bins."""
    from onnx import TensorProto, helper

    height, width = POSE_SIZE
    k, stride = POSE_KEYPOINTS, 8
    inits = [_tensor("w", rng.normal(0, 0.05, (k, 3, stride, stride))), _tensor("b", np.zeros(k)),
             _tensor("px", np.abs(rng.normal(0, 1, (width // stride, width * 2)))),
             _tensor("py", np.abs(rng.normal(0, 1, (height // stride, height * 2))))]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["features"], strides=[stride, stride],
                              kernel_shape=[stride, stride]),
             helper.make_node("Sigmoid", ["features"], ["act"]),
             helper.make_node("ReduceMean", ["act"], ["along_x"], axes=[2], keepdims=0),
             helper.make_node("ReduceMean", ["act"], ["along_y"], axes=[3], keepdims=0),
             helper.make_node("MatMul", ["along_x", "px"], ["simcc_x"]),
             helper.make_node("MatMul", ["along_y", "py"], ["simcc_y"])]
    return helper.make_graph(nodes, "tiny_rtmpose", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, [1, 3, height, width])], [
        helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, k, width * 2]),
        helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, k, height * 2])], inits)


def write_tiny_safety_checker(directory: Path, flag: bool = False) -> Path:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(SEED + 1)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 1,
                     "vocab_size": 99},
        vision_config={"hidden_size": 16, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        # the concept thresholds: a cosine similarity is in [-1, 1], so -2 flags every image and +2 none
        checker.concept_embeds_weights.fill_(-2.0 if flag else 2.0)
        checker.special_care_embeds_weights.fill_(-2.0 if flag else 2.0)
    checker.save_pretrained(directory, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return Path(directory)

"""Face packs InstantID cannot use, made from the tiny antelopev2 pack by editing its graphs' outputs.

Both still load in insightface (it routes them to a detector and a recogniser): only a check of what the graphs
give -- five keypoints, a 512-d embedding -- tells them apart from a usable pack.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper
import numpy as np

from instantid.tiny.face_pack import DETECTOR_FILE, RECOGNIZER_FILE


def pack_without_keypoints(pack: Path, dest: Path) -> Path:
    """SCRFD's six-output layout (scores and boxes per stride, no keypoint outputs): insightface's
    ``use_kps`` is False and faces come back without keypoints."""
    dest.mkdir(parents=True)
    shutil.copyfile(pack / RECOGNIZER_FILE, dest / RECOGNIZER_FILE)
    model = onnx.load(pack / DETECTOR_FILE)
    assert len(model.graph.output) == 9  # scores x3, boxes x3, keypoints x3
    del model.graph.output[6:]
    onnx.checker.check_model(model)
    onnx.save(model, dest / DETECTOR_FILE)
    return dest


def pack_with_256d_recognizer(pack: Path, dest: Path) -> Path:
    """A recogniser with ArcFace's input (112x112) but 256-d embeddings, like a smaller face model."""
    dest.mkdir(parents=True)
    shutil.copyfile(pack / DETECTOR_FILE, dest / DETECTOR_FILE)
    model = onnx.load(pack / RECOGNIZER_FILE)
    graph = model.graph
    old = graph.output[0]
    graph.initializer.extend([numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
                              (("cut/starts", [0]), ("cut/ends", [256]), ("cut/axes", [1]))])
    graph.node.append(helper.make_node("Slice", [old.name, "cut/starts", "cut/ends", "cut/axes"], ["embedding256"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("embedding256", TensorProto.FLOAT, ["batch", 256]))
    onnx.checker.check_model(model)
    onnx.save(model, dest / "w600k_small.onnx")
    return dest


def pack_with_68_keypoints(pack: Path, dest: Path) -> Path:
    """SCRFD's nine outputs, but keypoint rows of 136 values (68 points) instead of 10 (five points)."""
    dest.mkdir(parents=True)
    shutil.copyfile(pack / RECOGNIZER_FILE, dest / RECOGNIZER_FILE)
    model = onnx.load(pack / DETECTOR_FILE)
    graph = model.graph
    for i in range(6, 9):  # widen each keypoint output by tiling its 10 columns
        old = graph.output[i]
        reps = f"kps68/reps{i}"
        graph.initializer.append(numpy_helper.from_array(np.array([1, 14], dtype=np.int64), reps))
        tiled, cut = f"kps68/tiled{i}", f"kps68/out{i}"
        graph.node.append(helper.make_node("Tile", [old.name, reps], [tiled]))
        graph.initializer.extend([numpy_helper.from_array(np.array(v, dtype=np.int64), f"kps68/{n}{i}")
                                  for n, v in (("s", [0]), ("e", [136]), ("a", [1]))])
        graph.node.append(helper.make_node("Slice", [tiled, f"kps68/s{i}", f"kps68/e{i}", f"kps68/a{i}"], [cut]))
        dim0 = old.type.tensor_type.shape.dim[0].dim_param
        graph.output[i].CopyFrom(helper.make_tensor_value_info(cut, TensorProto.FLOAT, [dim0, 136]))
    onnx.checker.check_model(model)
    onnx.save(model, dest / DETECTOR_FILE)
    return dest

"""A tiny, random-weight, antelopev2-style face pack that insightface loads through its own model routing.

``write_tiny_face_pack(dir)`` writes two small ONNX graphs under the real antelopev2 file names:

``scrfd_10g_bnkps.onnx`` -- a detector with SCRFD's interface: input ``input.1`` (1x3xHxW, dynamic H/W) and
nine outputs (scores, box distances, keypoint distances for strides 8/16/32, two anchors per location), which
insightface routes to ``SCRFD`` with keypoints. It has no learned weights; it computes, in-graph:

* the *content extent*: from the top-left corner to the last row/column holding a pixel that is not pure black
  (SCRFD pads its letterboxed input with black; for an ordinary photo the extent is the whole image);
* a **main face**, box x in [0.30, 0.70] and y in [0.20, 0.75] of that extent, reported on one stride-32 anchor;
* a **small face**, box x in [0.04, 0.16] and y in [0.04, 0.20] of the extent, reported on one stride-16 anchor;
* each face's score is ``std / (std + 0.02)``, where ``std`` is the standard deviation of the normalised pixels
  ``(p - 127.5) / 128`` inside that face's box; with insightface's default threshold 0.5 a face is reported
  when that std is at least 0.02 (about 2.6 grey levels). A uniform image (solid black, white, any colour)
  therefore has no face, and a face whose box region is uniform is not reported;
* five keypoints per face at fixed positions inside its box, as fractions of the box (x, y): left eye
  (0.30, 0.38), right eye (0.70, 0.38), nose (0.50, 0.58), left mouth corner (0.34, 0.80), right mouth
  corner (0.66, 0.80).

``glintr100.onnx`` -- a recogniser with ArcFace's interface (input 1x3x112x112, one output of 512 floats):
strided conv -> tanh -> average pool -> two dense layers with fixed-seed random weights. Identical crops give
identical embeddings, different crops different ones; the output is a raw (not unit-norm) vector of norm ~10.

The weights come from a fixed seed, so the pack is byte-identical every time it is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"

OPSET = 17
IR_VERSION = 8  # the IR that shipped with opset 17; old enough for any onnxruntime that runs opset 17
SEED = 20240117

STRIDES = (8, 16, 32)
ANCHORS = 2  # SCRFD's 9-output layout: two anchors per feature-map location
PAD_VALUE = (0.0 - 127.5) / 128.0  # a black pixel after SCRFD's (p - 127.5) / 128 normalisation
STD_HALF_SCORE = 0.02  # the box std at which the score reaches 0.5 (insightface's default threshold)

# (stride that reports it, box as fractions of the content extent: x1, y1, x2, y2)
FACES = {32: (0.30, 0.20, 0.70, 0.75), 16: (0.04, 0.04, 0.16, 0.20)}
# keypoints as fractions of the face box: eyes above nose above mouth corners, image-left first
KPS = ((0.30, 0.38), (0.70, 0.38), (0.50, 0.58), (0.34, 0.80), (0.66, 0.80))


class _Graph:
    """Collects nodes and initializers, naming every node uniquely under a prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"{self.prefix}/{kind}_{self._count}"

    def const(self, value, dtype=np.float32) -> str:
        name = self._name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def model(self, inputs, outputs, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="instantid-tiny-face", producer_version="1")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def _detector() -> onnx.ModelProto:
    g = _Graph("det")
    x = "input.1"
    f = lambda v: g.const(v)  # noqa: E731  (float scalar constant)

    shape = g.op("Shape", x)
    h_int = g.op("Gather", shape, g.const(2, np.int64))
    w_int = g.op("Gather", shape, g.const(3, np.int64))
    h = g.op("Cast", h_int, to=TensorProto.FLOAT)
    w = g.op("Cast", w_int, to=TensorProto.FLOAT)
    xs = g.op("Range", f(0.0), w, f(1.0))  # [W] column coordinates
    ys = g.op("Range", f(0.0), h, f(1.0))  # [H] row coordinates

    # Content extent: SCRFD letterboxes into the top-left corner and pads with black, so faces are placed
    # relative to the last non-black row/column rather than to the padded detector input.
    deviation = g.op("ReduceMax", g.op("Abs", g.op("Sub", x, f(PAD_VALUE))), axes=[0, 1], keepdims=0)
    content = g.op("Cast", g.op("Greater", deviation, f(1e-3)), to=TensorProto.FLOAT)  # [H, W]
    cols = g.op("ReduceMax", content, axes=[0], keepdims=0)
    rows = g.op("ReduceMax", content, axes=[1], keepdims=0)
    extent_w = g.op("ReduceMax", g.op("Mul", cols, g.op("Add", xs, f(1.0))), keepdims=0)
    extent_h = g.op("ReduceMax", g.op("Mul", rows, g.op("Add", ys, f(1.0))), keepdims=0)

    faces = {}
    for stride, (rx1, ry1, rx2, ry2) in FACES.items():
        x1, x2 = g.op("Mul", extent_w, f(rx1)), g.op("Mul", extent_w, f(rx2))
        y1, y2 = g.op("Mul", extent_h, f(ry1)), g.op("Mul", extent_h, f(ry2))
        in_x = g.op("Cast", g.op("And", g.op("GreaterOrEqual", xs, x1), g.op("Less", xs, x2)), to=TensorProto.FLOAT)
        in_y = g.op("Cast", g.op("And", g.op("GreaterOrEqual", ys, y1), g.op("Less", ys, y2)), to=TensorProto.FLOAT)
        mask = g.op("Mul", g.op("Unsqueeze", in_y, g.const([1], np.int64)),
                    g.op("Unsqueeze", in_x, g.const([0], np.int64)))  # [H, W]
        # the score is the contrast inside the box: a two-pass std about each channel's own mean, so a uniform
        # box of any colour gives ~0 (not rounding noise, and not the spread between its channels)
        pixels = g.op("Add", g.op("ReduceSum", mask, keepdims=0), f(1e-6))
        channel_mean = g.op("Div", g.op("ReduceSum", g.op("Mul", x, mask), g.const([2, 3], np.int64), keepdims=1),
                            pixels)  # [1, 3, 1, 1]
        centred = g.op("Mul", g.op("Sub", x, channel_mean), mask)
        std = g.op("Sqrt", g.op("Div", g.op("ReduceSum", g.op("Mul", centred, centred), keepdims=0),
                                g.op("Mul", pixels, f(3.0))))
        score = g.op("Div", std, g.op("Add", std, f(STD_HALF_SCORE)))
        kps = []
        for kx, ky in KPS:
            kps.append((g.op("Add", x1, g.op("Mul", g.op("Sub", x2, x1), f(kx))),
                        g.op("Add", y1, g.op("Mul", g.op("Sub", y2, y1), f(ky)))))
        faces[stride] = (x1, y1, x2, y2, score, kps)

    score_outs, bbox_outs, kps_outs = [], [], []
    for stride in STRIDES:
        s = f(float(stride))
        grid_h = g.op("Cast", g.op("Div", h_int, g.const(stride, np.int64)), to=TensorProto.FLOAT)
        grid_w = g.op("Cast", g.op("Div", w_int, g.const(stride, np.int64)), to=TensorProto.FLOAT)
        n = g.op("Mul", g.op("Mul", grid_h, grid_w), f(float(ANCHORS)))
        index = g.op("Range", f(0.0), n, f(1.0))  # anchors in SCRFD's order: row-major locations, anchor fastest
        loc = g.op("Floor", g.op("Div", index, f(float(ANCHORS))))
        row = g.op("Floor", g.op("Div", loc, grid_w))
        col = g.op("Sub", loc, g.op("Mul", row, grid_w))
        first_anchor = g.op("Equal", index, g.op("Mul", loc, f(float(ANCHORS))))
        cx = g.op("Unsqueeze", g.op("Mul", col, s), g.const([1], np.int64))  # [N, 1] anchor centres
        cy = g.op("Unsqueeze", g.op("Mul", row, s), g.const([1], np.int64))
        names = (f"score_{stride}", f"bbox_{stride}", f"kps_{stride}")
        if stride not in faces:
            zero = g.op("Mul", cx, f(0.0))
            g.nodes.append(helper.make_node("Identity", [zero], [names[0]], name=f"det/{names[0]}"))
            g.nodes.append(helper.make_node("Concat", [zero] * 4, [names[1]], axis=1, name=f"det/{names[1]}"))
            g.nodes.append(helper.make_node("Concat", [zero] * 10, [names[2]], axis=1, name=f"det/{names[2]}"))
        else:
            x1, y1, x2, y2, score, kps = faces[stride]
            # one anchor fires: the first anchor of the location holding the box centre
            target_row = g.op("Min", g.op("Floor", g.op("Div", g.op("Mul", g.op("Add", y1, y2), f(0.5)), s)),
                              g.op("Sub", grid_h, f(1.0)))
            target_col = g.op("Min", g.op("Floor", g.op("Div", g.op("Mul", g.op("Add", x1, x2), f(0.5)), s)),
                              g.op("Sub", grid_w, f(1.0)))
            hit = g.op("And", g.op("And", g.op("Equal", row, target_row), g.op("Equal", col, target_col)),
                       first_anchor)
            hit_score = g.op("Mul", g.op("Cast", hit, to=TensorProto.FLOAT), score)
            g.nodes.append(helper.make_node("Unsqueeze", [hit_score, g.const([1], np.int64)], [names[0]],
                                            name=f"det/{names[0]}"))
            # SCRFD decodes box = centre -/+ distance * stride and kps = centre + offset * stride
            dist = lambda a, b: g.op("Div", g.op("Sub", a, b), s)  # noqa: E731
            g.nodes.append(helper.make_node("Concat", [dist(cx, x1), dist(cy, y1), dist(x2, cx), dist(y2, cy)],
                                            [names[1]], axis=1, name=f"det/{names[1]}"))
            offsets = [d for kx, ky in kps for d in (dist(kx, cx), dist(ky, cy))]
            g.nodes.append(helper.make_node("Concat", offsets, [names[2]], axis=1, name=f"det/{names[2]}"))
        score_outs.append(names[0])
        bbox_outs.append(names[1])
        kps_outs.append(names[2])

    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, "height", "width"])]
    widths = {"score": 1, "bbox": 4, "kps": 10}
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{name.split('_')[1]}",
                                                                          widths[name.split("_")[0]]])
               for name in score_outs + bbox_outs + kps_outs]
    return g.model(inputs, outputs, "tiny_scrfd")


def _recognizer(rng: np.random.Generator) -> onnx.ModelProto:
    # node names avoid the 'Sub'/'Mul' prefixes: insightface reads those as an mxnet model with in-graph
    # normalisation and would then skip its (p - 127.5) / 127.5 preprocessing
    g = _Graph("rec")
    conv_w = g.const(rng.normal(0.0, 1.0 / np.sqrt(3 * 8 * 8), (8, 3, 8, 8)))
    conv_b = g.const(rng.normal(0.0, 0.1, (8,)))
    fc1_w = g.const(rng.normal(0.0, 1.0 / np.sqrt(8 * 7 * 7), (8 * 7 * 7, 64)))
    fc1_b = g.const(rng.normal(0.0, 0.1, (64,)))
    fc2_w = g.const(rng.normal(0.0, 0.25, (64, 512)))
    fc2_b = g.const(rng.normal(0.0, 0.1, (512,)))

    hidden = g.op("Tanh", g.op("Conv", "input.1", conv_w, conv_b, kernel_shape=[8, 8], strides=[8, 8]))  # 14x14
    pooled = g.op("Flatten", g.op("AveragePool", hidden, kernel_shape=[2, 2], strides=[2, 2]), axis=1)  # 392
    dense = g.op("Tanh", g.op("Gemm", pooled, fc1_w, fc1_b))
    g.nodes.append(helper.make_node("Gemm", [dense, fc2_w, fc2_b], ["embedding"], name="rec/embedding"))

    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3, 112, 112])]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 512])]
    return g.model(inputs, outputs, "tiny_arcface")


def write_tiny_face_pack(directory: Path) -> Path:
    """Write the tiny detector and recogniser into ``directory`` (created if needed) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    (directory / DETECTOR_FILE).write_bytes(_detector().SerializeToString())
    (directory / RECOGNIZER_FILE).write_bytes(_recognizer(rng).SerializeToString())
    return directory

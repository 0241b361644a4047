"""Face analysis throughput of one FaceAnalyzer replica on the CPU (detector at det_size 640 + ArcFace).

    python bench/face_throughput.py --out face.json           # real-size antelopev2-shaped models (built here)
    python bench/face_throughput.py --tiny --out face.json    # instantid.tiny_face's toy pack (CI smoke)

The real antelopev2 pack cannot be downloaded here, so this builds, with the ONNX helper API and random weights,
two graphs with the real models' architecture and cost, under the real file names:

``glintr100.onnx``        ArcFace IResNet-100 (insightface's ``iresnet100``: 3x3 stem, 3/13/30/3 IBasicBlocks of
                          64/128/256/512 channels with BN-conv-BN-PReLU-conv-BN and 1x1 strided shortcuts, BN,
                          512x7x7 -> 512 fully connected, BN): ~65 M parameters, ~24 GFLOPs per 112x112 face.
``scrfd_10g_bnkps.onnx``  SCRFD-10G's network (ResNetV1e deep stem, BasicBlock stages 3/4/2/3 of 56/88/88/224
                          channels, PAFPN to 56 channels over strides 8/16/32, per-stride heads of 3 conv3x3 80-ch
                          layers with score/box/keypoint convolutions, 2 anchors; BatchNorm folded into the convs as
                          in a deployed graph). Random weights would report random faces, so the graph's outputs are
                          those of ``instantid.tiny_face``'s analytic detector (one face where a face is expected),
                          plus zero times a reduction of the real heads' outputs: the whole network runs on every
                          image, and insightface's decoding, NMS, alignment and recognition run on a fixed number
                          of faces.

FLOPs of the built graphs are counted from their convolutions and matrix products (2 per multiply-add) and
reported. Timing: ``FaceModel.analyze`` (instantid.face) on a real photo (a single-face photo shipped with insightface,
resized as the official demo does; its top-left corner is made uniform so that the analytic detector reports
one face), after warm-up; median of ``--repeats`` rounds of ``--images`` calls each.
Also the detector and the recogniser alone (onnxruntime sessions as insightface configures them).
ONNX Runtime uses its default thread pool (one thread per physical core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


class Builder:
    """Nodes + initializers with random weights; counts FLOPs for a nominal input size as it goes."""

    def __init__(self, prefix: str, seed: int, hw: tuple[int, int]):
        self.prefix, self.rng = prefix, np.random.default_rng(seed)
        self.nodes, self.inits, self.n, self.flops, self.params = [], [], 0, 0, 0
        self.hw = {}  # tensor name -> (channels, height, width) at the nominal input size
        self.nominal = hw

    def name(self, kind):
        self.n += 1
        return f"{self.prefix}/{kind}_{self.n}"

    def const(self, value):
        name = self.name("w")
        arr = np.asarray(value, dtype=np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        self.params += arr.size
        return name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x, cout, k=3, stride=1, bias=True, gain=1.0):
        cin, h, w = self.hw[x]
        weight = self.rng.normal(0, gain * np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k))
        inputs = [x, self.const(weight)] + ([self.const(np.zeros(cout))] if bias else [])
        out = self.node("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
        ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
        self.hw[out] = (cout, ho, wo)
        self.flops += 2 * cout * ho * wo * cin * k * k
        return out

    def same(self, op, x, *inputs, **attrs):
        out = self.node(op, [x, *inputs], **attrs)
        self.hw[out] = self.hw[x]
        return out

    def relu(self, x):
        return self.same("Relu", x)

    def bn(self, x):
        c = self.hw[x][0]
        return self.same("BatchNormalization", x, self.const(np.ones(c)), self.const(np.zeros(c)),
                         self.const(np.zeros(c)), self.const(np.ones(c)), epsilon=1e-5)

    def prelu(self, x):
        return self.same("PRelu", x, self.const(np.full((self.hw[x][0], 1, 1), 0.25)))

    def add(self, a, b):
        return self.same("Add", a, b)

    def model(self, inputs, outputs, name):
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="instantid-bench")
        m.ir_version = IR_VERSION
        return m


# -- ArcFace IResNet-100 ----------------------------------------------------------------------------------------
def iresnet100(seed: int = 1) -> tuple[onnx.ModelProto, dict]:
    b = Builder("rec", seed, (112, 112))
    x = "input.1"
    b.hw[x] = (3, 112, 112)
    h = b.prelu(b.bn(b.conv(x, 64, 3, bias=False)))
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 13), (256, 30), (512, 3)):
        for i in range(blocks):
            stride = 2 if i == 0 else 1
            out = b.bn(h)
            out = b.prelu(b.bn(b.conv(out, planes, 3, bias=False)))
            out = b.bn(b.conv(out, planes, 3, stride=stride, bias=False, gain=0.1))
            shortcut = h
            if stride != 1 or inplanes != planes:
                shortcut = b.bn(b.conv(h, planes, 1, stride=stride, bias=False))
            h = b.add(out, shortcut)
            inplanes = planes
    h = b.bn(h)
    c, hh, ww = b.hw[h]
    flat = b.node("Flatten", [h], axis=1)
    fc_w = b.const(b.rng.normal(0, np.sqrt(1.0 / (c * hh * ww)), (c * hh * ww, 512)))
    b.flops += 2 * c * hh * ww * 512
    fc = b.node("Gemm", [flat, fc_w, b.const(np.zeros(512))])
    scale, shift = b.const(np.ones(512)), b.const(np.zeros(512))
    b.nodes.append(helper.make_node("BatchNormalization", [fc, scale, shift, b.const(np.zeros(512)),
                                                           b.const(np.ones(512))], ["embedding"],
                                    name="rec/features", epsilon=1e-5))
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", 512])]
    return b.model(inputs, outputs, "iresnet100"), {"params": b.params, "gflops": b.flops / 1e9, "input": "112x112"}


# -- SCRFD-10G -------------------------------------------------------------------------------------------------
def scrfd_10g_heads(b: Builder, x: str) -> list[list[str]]:
    """Backbone + PAFPN + heads on input ``x``; returns, per stride 8/16/32, [score, bbox, kps] maps."""
    def basic(h, planes, stride):
        out = b.relu(b.conv(h, planes, 3, stride=stride))
        out = b.conv(out, planes, 3, gain=0.2)
        shortcut = h
        if stride != 1 or b.hw[h][0] != planes:
            if stride != 1:  # ResNetV1e: average-pool then 1x1 in the shortcut
                pooled = b.node("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2])
                c, hh, ww = b.hw[h]
                b.hw[pooled] = (c, hh // 2, ww // 2)
                h = pooled
            shortcut = b.conv(h, planes, 1)
        return b.relu(b.add(out, shortcut))

    # deep stem: 3 conv3x3 (28, 28, 56), the first strided, then a strided max-pool
    h = b.relu(b.conv(x, 28, 3, stride=2))
    h = b.relu(b.conv(h, 28, 3))
    h = b.relu(b.conv(h, 56, 3))
    pooled = b.node("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c, hh, ww = b.hw[h]
    b.hw[pooled] = (c, (hh + 1) // 2, (ww + 1) // 2)
    h = pooled
    feats = []
    for i, (planes, blocks) in enumerate(zip((56, 88, 88, 224), (3, 4, 2, 3))):
        for j in range(blocks):
            h = basic(h, planes, 2 if (j == 0 and i > 0) else 1)
        feats.append(h)
    levels = feats[1:]  # strides 8, 16, 32
    lat = [b.conv(f, 56, 1) for f in levels]
    for i in (2, 1):  # top-down
        up = b.node("Resize", [lat[i], "", b.const([1.0, 1.0, 2.0, 2.0])], mode="nearest")
        b.hw[up] = b.hw[lat[i - 1]]
        lat[i - 1] = b.add(lat[i - 1], up)
    outs = [b.conv(t, 56, 3) for t in lat]
    for i in (1, 2):  # bottom-up (PAFPN)
        outs[i] = b.add(outs[i], b.conv(outs[i - 1], 56, 3, stride=2))
    outs = [outs[0]] + [b.conv(t, 56, 3) for t in outs[1:]]
    heads = []
    for t in outs:  # strides_share=False: one head per stride
        for _ in range(3):
            t = b.relu(b.conv(t, 80, 3))
        heads.append([b.conv(t, 2, 3, gain=0.1), b.conv(t, 8, 3, gain=0.1), b.conv(t, 20, 3, gain=0.1)])
    return heads


def scrfd_10g(tiny_detector: onnx.ModelProto, seed: int = 2) -> tuple[onnx.ModelProto, dict]:
    """The analytic detector's graph with SCRFD-10G's network added on the same input (see the module doc)."""
    b = Builder("scrfd", seed, (640, 640))
    b.hw["input.1"] = (3, 640, 640)
    heads = scrfd_10g_heads(b, "input.1")
    graph = tiny_detector.graph
    renamed = {}
    for node in graph.node:
        for k, out in enumerate(node.output):
            if out.startswith("score_"):
                renamed[out] = out + "_analytic"
                node.output[k] = renamed[out]
    for node in graph.node:
        for k, inp in enumerate(node.input):
            if inp in renamed:
                node.input[k] = renamed[inp]
    zero = b.const(0.0)
    for stride, maps in zip((8, 16, 32), heads):
        total = None
        for m in maps:
            r = b.node("ReduceMean", [m], keepdims=0)
            total = r if total is None else b.node("Add", [total, r])
        bounded = b.node("Clip", [total, b.const(-1.0), b.const(1.0)])
        name = f"score_{stride}"
        b.nodes.append(helper.make_node("Add", [renamed[name], b.node("Mul", [bounded, zero])], [name],
                                        name=f"scrfd/{name}"))
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.inits)
    onnx.checker.check_model(tiny_detector)
    return tiny_detector, {"params": b.params, "gflops": b.flops / 1e9, "input": "640x640"}


def build_pack(directory: Path) -> dict:
    from instantid.tiny_face import DETECTOR_FILE, RECOGNIZER_FILE, write_tiny_face_pack

    write_tiny_face_pack(directory)
    det, det_info = scrfd_10g(onnx.load(str(directory / DETECTOR_FILE)))
    onnx.save(det, str(directory / DETECTOR_FILE))
    rec, rec_info = iresnet100()
    onnx.save(rec, str(directory / RECOGNIZER_FILE))
    return {"detector": det_info, "recognizer": rec_info}


# -- measuring -------------------------------------------------------------------------------------------------
def photo(tiny_faces: bool = False):
    import insightface
    from PIL import Image

    from instantid.face import resize_for_analysis

    path = Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png"
    image = resize_for_analysis(Image.open(path).convert("RGB"))
    if not tiny_faces:
        # the analytic detector also reports a small face in the top-left corner when that area has contrast;
        # a uniform grey corner leaves exactly one face, the usual InstantID reference photo
        w, h = image.size
        image.paste((128, 128, 128), (0, 0, int(0.2 * w), int(0.25 * h)))
    return image


def rounds(fn, images: int, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(images):
            fn()
        out.append((time.perf_counter() - t0) / images)
    return out


def spin_check(pack: Path, images: int, repeats: int) -> dict:
    """Detector then recogniser, alternately, as analyze() runs them: onnxruntime's default (worker threads
    spin-wait after a run) against ``session.intra_op.allow_spinning=0``. On few cores the idle session's
    spinning threads compete with the running one."""
    import onnxruntime as ort

    def sessions(spin: bool):
        options = ort.SessionOptions()
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return [ort.InferenceSession(str(pack / name), options, providers=["CPUExecutionProvider"])
                for name in sorted(p.name for p in pack.glob("*.onnx"))[::-1]]  # scrfd..., glintr100

    feeds = {}
    out = {}
    for spin in (True, False):
        det, rec = sessions(spin)
        for sess in (det, rec):
            dims = sess.get_inputs()[0].shape
            shape = [d if isinstance(d, int) else (1 if i == 0 else 640) for i, d in enumerate(dims)]
            feeds[sess] = {sess.get_inputs()[0].name: np.random.default_rng(0).random(shape, dtype=np.float32)}

        def both():
            det.run(None, feeds[det])
            rec.run(None, feeds[rec])

        both()
        out["spinning (default)" if spin else "no spinning"] = statistics.median(rounds(both, images, repeats))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the toy pack of instantid.tiny_face (CI smoke)")
    p.add_argument("--pack", help="an existing antelopev2-layout directory to measure instead")
    p.add_argument("--images", type=int, default=None, help="analyze() calls per round (default 10, tiny 3)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--two-faces", action="store_true",
                   help="leave the photo as is: the analytic detector then reports two faces")
    p.add_argument("--spin-check", action="store_true",
                   help="also time detector+recogniser sessions alternately with and without thread spinning")
    p.add_argument("--out")
    args = p.parse_args(argv)
    images = args.images or (3 if args.tiny else 10)

    from instantid.face import FaceModel

    res = {"tiny": args.tiny, "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="instantid-face-") as tmp:
        pack = Path(args.pack) if args.pack else Path(tmp) / "antelopev2"
        if not args.pack:
            t0 = time.perf_counter()
            if args.tiny:
                from instantid.tiny_face import write_tiny_face_pack

                write_tiny_face_pack(pack)
                res["models"] = "instantid.tiny_face toy pack (not real size)"
            else:
                res["models"] = build_pack(pack)
            res["build_s"] = time.perf_counter() - t0
        res["files_mb"] = {f.name: f.stat().st_size / 1e6 for f in sorted(pack.glob("*.onnx"))}
        t0 = time.perf_counter()
        analyzer = FaceModel(str(pack), providers=["CPUExecutionProvider"], det_size=(640, 640))
        res["init_s"] = time.perf_counter() - t0
        image = photo(tiny_faces=args.two_faces)
        faces = analyzer.analyze(image)
        res["image_size"], res["faces_per_image"] = list(image.size), len(faces)
        res["embedding_finite"] = bool(all(np.isfinite(f.embedding).all() for f in faces))
        analyzer.analyze(image)  # warm-up
        per_image = rounds(lambda: analyzer.analyze(image), images, args.repeats)
        res["analyze_s_per_image"] = per_image
        res["analyze_median_s"] = statistics.median(per_image)
        res["images_per_s"] = 1 / res["analyze_median_s"]

        det = analyzer.app.models["detection"]
        rec = analyzer.app.models["recognition"]
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        det_s = rounds(lambda: det.detect(bgr, input_size=(640, 640)), images, args.repeats)
        crop = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
        rec_s = rounds(lambda: rec.get_feat(crop), images, args.repeats)
        res["detector_median_s"], res["recognizer_median_s"] = statistics.median(det_s), statistics.median(rec_s)
        if args.spin_check:
            res["alternating_sessions"] = spin_check(pack, images, args.repeats)
        res["machine"]["load_avg_end"] = os.getloadavg()

    print(f"\nFaceAnalyzer on {res['machine']['cpus']} CPUs ({'tiny pack' if args.tiny else 'real-size graphs'}), "
          f"image {res['image_size'][0]}x{res['image_size'][1]}, det_size 640, {res['faces_per_image']} face(s)")
    print(f"{'what':<26}{'median s':>10}{'per s':>9}")
    for label, s in (("analyze (per image)", res["analyze_median_s"]), ("detector 640x640", res["detector_median_s"]),
                     ("recognizer (one face)", res["recognizer_median_s"])):
        print(f"{label:<26}{s:>10.4f}{1 / s:>9.2f}")
    for label, s in res.get("alternating_sessions", {}).items():
        print(f"{'det+rec, ' + label:<26}{s:>10.4f}{1 / s:>9.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()

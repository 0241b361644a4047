"""CPU cost of deriving control maps (canny, depth, pose) from a photo, and of the safety checker on a batch.

    python bench/control_maps.py --out controls.json            # tiny models (instantid.tiny_controls)
    python bench/control_maps.py --real-size --out controls.json

Tiny: the bundle's DPT, DWPose and safety checker (toy widths: the plumbing's cost, not a model's). --real-size:
random weights in real architectures where transformers builds them from a config: a DPT-large-shaped depth model
(ViT-L/16 at 384, heavier than dpt-hybrid-midas's ViT-B + ResNet hybrid, so an upper bound) and the safety checker's
CLIP ViT-L/14 at 224; pose stays tiny (YOLOX-L and RTMPose are ONNX graphs we cannot build without their weights).
The photo is the insightface sample photo, resized as the demo (min side 1024, max side 1280). Median of
``--repeats`` after one warm-up; torch's default threads unless ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _median(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _real_depth(directory: Path) -> Path:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       image_size=384, patch_size=16, backbone_out_indices=[5, 11, 17, 23],
                       neck_hidden_sizes=[256, 512, 1024, 1024])
    DPTForDepthEstimation(config).eval().save_pretrained(directory)
    DPTImageProcessor(size={"height": 384, "width": 384}, keep_aspect_ratio=False).save_pretrained(
        directory)
    return directory


def _real_safety(directory: Path) -> Path:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                       "num_hidden_layers": 24, "patch_size": 14, "image_size": 224},
                        projection_dim=768)
    StableDiffusionSafetyChecker(config).eval().save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(directory)
    return directory


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real-size", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=4, help="images per safety-check batch")
    p.add_argument("--side", type=int, default=1024, help="side of the generated images checked")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import insightface
    import numpy as np
    import PIL.Image
    import torch

    from instantid.controls import Preprocessors
    from instantid.face import load_image, resize_for_analysis
    from instantid.safety import SafetyChecker
    from instantid.tiny_controls import write_tiny_depth, write_tiny_pose, write_tiny_safety_checker

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-controls-"))
    depth = _real_depth(work / "dpt") if args.real_size else write_tiny_depth(work / "dpt")
    safety = _real_safety(work / "safety") if args.real_size else write_tiny_safety_checker(work / "safety")
    pre = Preprocessors(depth=str(depth), pose=str(write_tiny_pose(work / "dwpose")))
    photo = resize_for_analysis(load_image(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"))
    result = {"real_size": args.real_size, "photo": list(photo.size), "threads": torch.get_num_threads(),
              "repeats": args.repeats, "maps_s": {}}
    for kind in ("canny", "depth", "pose"):
        result["maps_s"][kind] = round(_median(lambda: pre.derive(kind, photo, (1024, 1024)), args.repeats), 4)
    checker = SafetyChecker.load(str(safety))
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (args.side, args.side, 3), dtype=np.uint8))
              for _ in range(args.images)]
    result["safety_check_s"] = {"images": args.images, "side": args.side,
                                "batch_s": round(_median(lambda: checker.check(images), args.repeats), 4)}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

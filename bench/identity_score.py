"""CPU cost of the identity score of one generated image (``instantid.scoring.score_image``: the demo's analysis
resize, detection at det_size 640, ArcFace on the largest face, cosine with the identity).

    python bench/identity_score.py --out score.json          # real-size antelopev2-shaped graphs (built here)
    python bench/identity_score.py --tiny --out score.json   # instantid.tiny_face's toy pack

The real-size pack is bench/face_throughput.py's (random weights, the real models' architecture and cost). The
"output" is a real photo at each ``--size`` (one face, as bench/face_throughput.py prepares it), scored against
its own embedding. Median of ``--repeats`` rounds of ``--images`` scores each, after warm-up; onnxruntime's
default thread pool unless ``--threads`` caps it (a FaceAnalyzer replica caps it to its num_cpus).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from face_throughput import build_pack, photo, rounds  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the toy pack of instantid.tiny_face")
    p.add_argument("--sizes", default="1024x1024,1280x768", help="output sizes WxH, comma separated")
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all)")
    p.add_argument("--out")
    args = p.parse_args(argv)

    from instantid.face import FaceModel
    from instantid.scoring import score_image

    res = {"tiny": args.tiny, "threads": args.threads,
           "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="instantid-score-") as tmp:
        pack = Path(tmp) / "antelopev2"
        if args.tiny:
            from instantid.tiny_face import write_tiny_face_pack

            write_tiny_face_pack(pack)
        else:
            build_pack(pack)
        analyzer = FaceModel(str(pack), providers=["CPUExecutionProvider"], threads=args.threads)
        base = photo()
        reference = analyzer.analyze(base)[0].embedding
        for size in args.sizes.split(","):
            w, h = (int(v) for v in size.lower().split("x"))
            image = base.resize((w, h))
            score = score_image(analyzer, image, reference)
            score_image(analyzer, image, reference)  # warm-up
            per_image = rounds(lambda: score_image(analyzer, image, reference), args.images, args.repeats)
            res["sizes"][size] = {"face_found": score.face_found, "similarity": score.similarity,
                                  "score_s_per_image": per_image, "median_s": statistics.median(per_image)}
    res["machine"]["load_avg_end"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()

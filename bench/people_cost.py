"""What several people in one picture cost: IdentityNet runs once per identity per step.

    python bench/people_cost.py --out people.json              # tiny model on the CPU, 1-4 people, + real FLOPs
    python bench/people_cost.py --size 512 --steps 2 --no-flops

Two measurements:

1. Wall time (``--size``, ``--steps``, guided, one image): ``InstantIDPipeline.generate`` on the tiny bundle
   (``instantid.tiny``) for 1, 2, 3 and 4 people placed side by side by keypoints, median of ``--repeats`` runs
   after a warm-up, with the time spent inside IdentityNet and inside the UNet (forward hooks) and their call
   counts. The tiny model's IdentityNet/UNet proportion is a toy's; the ratio is the plumbing's, not SDXL's.
2. FLOPs at the real architecture (``instantid.real_configs``: SDXL's UNet and IdentityNet = ControlNetModel
   .from_unet of it) of one UNet pass and one IdentityNet pass at ``--flops-size`` on PyTorch's meta device (shapes
   only: no weights, no arithmetic), counted by ``torch.utils.flop_counter``. Per step and identity count k the
   denoising work is UNet + k x IdentityNet, so the predicted ratio to one identity is
   (UNet + k x IdentityNet) / (UNet + IdentityNet): denoising dominates a generation, so this is the cost ratio
   on a GPU, up to the fixed part (text encoding, VAE decode) which does not grow with k.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _people(k: int, size: int):
    """k people by keypoints, evenly spaced along the middle row, regions that do not overlap."""
    from instantid.people import Placement, place_people

    step = size / k
    eye = min(step / 5.0, size / 10.0)  # face box = 2.5 x eye distance, grown 25% per side: 3.75 x eye < step
    placements = []
    for i in range(k):
        cx, cy = step * (i + 0.5), size / 2
        kps = np.array([[cx - eye / 2, cy - eye / 3], [cx + eye / 2, cy - eye / 3], [cx, cy + eye / 6],
                        [cx - eye / 3, cy + eye / 2], [cx + eye / 3, cy + eye / 2]])
        placements.append(Placement(keypoints=kps))
    embeddings = [np.random.RandomState(i).randn(512).astype(np.float32) * 10 for i in range(k)]
    return place_people(embeddings, placements, size, size)[0]


class _Timer:
    """Seconds spent inside a module's forward, and its calls (hooks; the CPU runs synchronously)."""

    def __init__(self, module):
        self.seconds, self.calls, self._t = 0.0, 0, None
        self.handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _start(self, *_):
        self._t = time.perf_counter()

    def _stop(self, *_):
        self.seconds += time.perf_counter() - self._t
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def wall_times(size: int, steps: int, repeats: int, max_people: int) -> dict:
    from instantid.loading import load_pipeline
    from instantid.pipeline import GenerationRequest
    from instantid.tiny import make_tiny

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as root:
        make_tiny(Path(root))
        pipe = load_pipeline(str(Path(root) / "sdxl"), str(Path(root) / "instantid"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for k in range(1, max_people + 1):
        request = GenerationRequest(people=_people(k, size), prompt="people", seed=1)
        run = lambda: pipe.generate([request], width=size, height=size, steps=steps, output_type="latent")  # noqa
        run()  # warm-up
        totals, identitynet, unet, calls = [], [], [], None
        for _ in range(repeats):
            cn, un = _Timer(pipe.controlnet), _Timer(pipe.unet)
            started = time.perf_counter()
            run()
            totals.append(time.perf_counter() - started)
            identitynet.append(cn.seconds), unet.append(un.seconds)
            calls = {"identitynet": cn.calls, "unet": un.calls}
            cn.remove(), un.remove()
        out[k] = {"seconds": statistics.median(totals), "identitynet_s": statistics.median(identitynet),
                  "unet_s": statistics.median(unet), "calls": calls}
        print(f"{k} people: {out[k]['seconds']:.3f}s (IdentityNet {out[k]['identitynet_s']:.3f}s in "
              f"{calls['identitynet']} calls, UNet {out[k]['unet_s']:.3f}s)", file=sys.stderr)
    one = out[1]["seconds"]
    for k in out:
        out[k]["ratio_to_one"] = round(out[k]["seconds"] / one, 3)
    return out


def real_flops(size: int) -> dict:
    """FLOPs of one UNet and one IdentityNet pass of the real architecture (guided: 2 rows), on the meta device."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from instantid import real_configs as rc

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(rc.SDXL_UNET)
        identitynet = ControlNetModel.from_unet(unet)
        rows, latent = 2, size // 8
        x = torch.randn(rows, 4, latent, latent)
        t = torch.tensor([500.0] * rows)
        context = torch.randn(rows, 77 + 16, 2048)
        ids = torch.randn(rows, 16, 2048)
        added = {"text_embeds": torch.randn(rows, 1280), "time_ids": torch.randn(rows, 6)}
        image = torch.randn(rows, 3, size, size)
        with FlopCounterMode(display=False) as counter:
            down, mid = identitynet(x, t, encoder_hidden_states=ids, controlnet_cond=image, added_cond_kwargs=added,
                                    return_dict=False)
        net = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid, return_dict=False)
        full = counter.get_total_flops()
    return {"size": size, "unet_tflops_per_step": round(full / 1e12, 3),
            "identitynet_tflops_per_step": round(net / 1e12, 3),
            "predicted_ratio_to_one": {k: round((full + k * net) / (full + net), 3) for k in range(1, 5)}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-people", type=int, default=4)
    p.add_argument("--flops-size", type=int, default=1024, help="output side for the real architecture's FLOPs")
    p.add_argument("--no-flops", dest="flops", action="store_false")
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "settings": {"size": args.size, "steps": args.steps, "repeats": args.repeats, "guided": True},
              "tiny_cpu": wall_times(args.size, args.steps, args.repeats, args.max_people)}
    if args.flops:
        result["real_architecture_flops"] = real_flops(args.flops_size)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()

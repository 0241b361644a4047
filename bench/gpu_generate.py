"""GPU denoising: a plain eager reference against our optimised pipeline, side by side in one run.

    python bench/gpu_generate.py --size 1024 --steps 30 --batch 1 4 --out gpu.json       # on a CUDA machine
    python bench/gpu_generate.py --tiny --out gpu-tiny.json                              # CI smoke, CPU, seconds

Models: full-size SDXL UNet, IdentityNet (``ControlNetModel.from_unet`` of it), both CLIP text encoders, the
VAE, InstantID's Resampler and the 70 ID-adapter projections, built from ``tests/fixtures/real_configs.py`` with random
weights directly on the device in the working dtype (``torch.device`` + default dtype: no CPU copy, no float32
detour). Compute does not depend on weight values, so timings are those of the real models. The tokenizers are
byte-level (``instantid.tiny``'s); text encoding is a negligible part of the time.

Two implementations on the same modules, the same inputs and the same settings (CFG 5, Euler, IdentityNet and
adapter scale 0.8):

(a) ``reference_eager``: the official InstantID pipeline's semantics written out plainly below -- text
    encoding, ID tokens for [uncond, cond], per step IdentityNet on the [uncond, cond] batch with the ID tokens,
    the UNet with [text; ID] tokens through the decoupled attention, CFG, an Euler step, and a float32 VAE decode
    (the official pipeline upcasts SDXL's VAE). Eager, no compile, default memory format, SDPA attention (what
    the official code uses on torch 2).
(b) ``ours``: ``InstantIDPipeline.generate`` after ``instantid.optimize.optimize`` (channels_last, fused QKV,
    tensor scales, torch.compile of UNet, IdentityNet and VAE decoder, bf16 VAE decode); a batch of N is N
    requests in one denoising batch (each with its own seed and scheduler), as the Serve app batches them.

Reported per batch size: seconds per batch and per image, images/s, peak GPU memory
(``torch.cuda.max_memory_allocated``, weights included), FLOPs counted by ``torch.utils.flop_counter`` (for the
eager models: one run with 1 step and one with 2 give the per-step and the fixed part; total = fixed + steps x
per step) and the achieved fraction of ``--peak-tflops`` (default 989: H100 SXM dense bf16/fp16; a measured
matmul ceiling, e.g. from ``--measure-peak``, is a fairer denominator). Also: the fp16/bf16 deviation from
float32 on the same weights and inputs at a small size, the deviation of (b) from (a), a memory-per-batch curve,
and, separately, quality-changing speed-ups (LCM scheduler with 4-8 steps, no CFG) -- never mixed into (b).

``--tiny`` runs the same code paths on the CPU with toy-size models in seconds (no compile unless
``--compile``): it checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures (the real models' configs)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
KPS = np.array([[0.35, 0.40], [0.66, 0.39], [0.51, 0.56], [0.38, 0.73], [0.63, 0.72]])


# ----------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------
@contextmanager
def _building(device, dtype):
    """Create parameters directly on ``device`` in ``dtype`` (random init runs there, in that dtype)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(saved)


def build_pipeline(tiny: bool, device: str, dtype: torch.dtype, seed: int = 0):
    """An InstantIDPipeline of random-weight models (full size from real_configs, or the tiny bundle's)."""
    from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.fixtures import real_configs as rc
    from instantid.tiny import bundle as tiny_mod
    from instantid.pipeline import InstantIDPipeline
    from instantid.resampler import Resampler

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="instantid-bench-tok-") as tokdir:
        tokenizer, tokenizer_2 = tiny_mod._tokenizer(Path(tokdir) / "a"), tiny_mod._tokenizer(Path(tokdir) / "b")
    with _building(device, dtype):
        if tiny:
            unet = tiny_mod.tiny_unet()
            te_cfg, te2_cfg = _tiny_text_configs(unet, len(tokenizer))
            resampler = Resampler(dim=64, depth=2, heads=2, num_queries=tiny_mod.NUM_TOKENS,
                                  embedding_dim=tiny_mod.EMBED_DIM, output_dim=unet.config.cross_attention_dim,
                                  ff_mult=2)
            controlnet = ControlNetModel.from_unet(unet)
        else:
            unet = UNet2DConditionModel(**rc.SDXL_UNET)
            controlnet = ControlNetModel(**rc.SDXL_IDENTITYNET)
            te_cfg, te2_cfg = CLIPTextConfig(**rc.SDXL_TEXT_ENCODER), CLIPTextConfig(**rc.SDXL_TEXT_ENCODER_2)
            resampler = Resampler(**rc.INSTANTID_RESAMPLER)
        text_encoder, text_encoder_2 = CLIPTextModel(te_cfg), CLIPTextModelWithProjection(te2_cfg)
        # IdentityNet's output convolutions start at zero; give them values so its residuals are not all zero
        with torch.no_grad():
            for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
                block.weight.normal_(0, 0.02)
                block.bias.normal_(0, 0.02)
        ip_adapter = {}
        for index, (name, _) in enumerate(unet.attn_processors.items()):
            if not name.endswith("attn1.processor"):
                for part in ("to_k_ip", "to_v_ip"):
                    ip_adapter[f"{index}.{part}.weight"] = torch.randn(
                        tiny_mod._hidden_size(unet, name), unet.config.cross_attention_dim) * 0.02
    with _building(device, torch.float32):  # the reference decodes in float32 (SDXL's VAE needs upcasting)
        if tiny:
            vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), norm_num_groups=8, latent_channels=4,
                                sample_size=64, down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True)
        else:
            vae = AutoencoderKL(**rc.SDXL_VAE)
    pipe = InstantIDPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, controlnet=controlnet,
        scheduler=EulerDiscreteScheduler(**rc.SDXL_SCHEDULER), add_watermarker=False,
    )
    pipe.load_identity_adapter({"image_proj": resampler.state_dict(), "ip_adapter": ip_adapter})
    pipe.set_progress_bar_config(disable=True)
    for module in (unet, controlnet, vae, text_encoder, text_encoder_2, pipe.image_proj_model):
        module.eval().requires_grad_(False)
    return pipe


def _tiny_text_configs(unet, vocab_size: int):
    """Two toy CLIP text encoders whose widths add up to the UNet's cross-attention width."""
    from transformers import CLIPTextConfig

    cross = unet.config.cross_attention_dim
    projection = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    common = dict(vocab_size=vocab_size, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                  max_position_embeddings=77, hidden_act="gelu", bos_token_id=vocab_size - 2,
                  eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return (CLIPTextConfig(hidden_size=cross // 2, projection_dim=cross // 2, **common),
            CLIPTextConfig(hidden_size=cross - cross // 2, projection_dim=projection, **common))


def parameter_counts(pipe) -> dict:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2", "image_proj_model")}


# ----------------------------------------------------------------------------------------------------------
# (a) the reference: the official pipeline's semantics, eager, written out
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_eager(m, *, prompt: str, face_embedding, keypoint_image, num_images: int, width: int, height: int,
                    steps: int, guidance_scale: float = 5.0, ip_adapter_scale: float = 0.8,
                    controlnet_conditioning_scale: float = 0.8, seed: int = 0, output_type: str = "pt"):
    from diffusers import EulerDiscreteScheduler

    from instantid.attention import set_identity_scale

    device, dtype = m.unet.device, m.unet.dtype
    # 1. text: penultimate hidden states of both CLIP encoders, pooled embedding of the second; the
    #    unconditional branch is zeros (SDXL's force_zeros_for_empty_prompt, no negative prompt)
    hidden, pooled = [], None
    for tok, enc in ((m.tokenizer, m.text_encoder), (m.tokenizer_2, m.text_encoder_2)):
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = enc(ids, output_hidden_states=True)
        pooled = out[0]
        hidden.append(out.hidden_states[-2])
    text = torch.cat(hidden, dim=-1).to(dtype).repeat(num_images, 1, 1)
    pooled = pooled.to(dtype).repeat(num_images, 1)
    text, pooled = torch.cat([torch.zeros_like(text), text]), torch.cat([torch.zeros_like(pooled), pooled])
    # 2. ID tokens: the Resampler on [zero embedding, face embedding]
    emb = torch.as_tensor(np.asarray(face_embedding, dtype=np.float32)).to(device, dtype).reshape(1, 1, -1)
    id_tokens = m.image_proj_model(torch.cat([torch.zeros_like(emb), emb])).repeat_interleave(num_images, dim=0)
    # 3. the keypoint image in [0, 1], for both branches
    kps = np.asarray(keypoint_image.convert("RGB").resize((width, height)), dtype=np.float32) / 255.0
    image = torch.from_numpy(kps).permute(2, 0, 1)[None].to(device, dtype).repeat(2 * num_images, 1, 1, 1)
    # 4. timesteps, initial latents from a seeded CPU generator, SDXL micro-conditioning
    scheduler = EulerDiscreteScheduler.from_config(m.scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((num_images, 4, height // 8, width // 8), generator=generator).to(device, dtype)
    latents = latents * scheduler.init_noise_sigma
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
    added = {"text_embeds": pooled, "time_ids": time_ids.repeat(2 * num_images, 1)}
    context = torch.cat([text, id_tokens], dim=1)
    set_identity_scale(m.unet, ip_adapter_scale)
    # 5. denoise
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        down, mid = m.controlnet(x, t, encoder_hidden_states=id_tokens, controlnet_cond=image,
                                 conditioning_scale=controlnet_conditioning_scale, added_cond_kwargs=added,
                                 return_dict=False)
        noise = m.unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid, added_cond_kwargs=added, return_dict=False)[0]
        uncond, cond = noise.chunk(2)
        latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents, return_dict=False)[0]
    if output_type == "latent":
        return latents
    # 6. decode in the VAE's dtype (float32 here, as the official pipeline upcasts)
    vae = m.vae
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (decoded / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# (b) ours
# ----------------------------------------------------------------------------------------------------------
def ours(pipe, *, prompt, face_embedding, keypoint_image, num_images, width, height, steps,
         guidance_scale=5.0, scheduler="euler", seed=0, output_type="pt"):
    from instantid.pipeline import GenerationRequest

    requests = [GenerationRequest(face_embedding=face_embedding, keypoint_image=keypoint_image, prompt=prompt,
                                  seed=seed + i, guidance_scale=guidance_scale,
                                  prompt_weighting="none")  # the reference is the basic pipeline's plain encoding
                for i in range(num_images)]
    return pipe.generate(requests, width=width, height=height, steps=steps, scheduler=scheduler,
                         output_type=output_type)


# ----------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clean(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device, repeats: int, warmup: int = 1) -> dict:
    """Warm-up runs (compilation, cuDNN autotuning), then ``repeats`` timed runs; peak memory over the timed."""
    started = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    warmup_s = time.perf_counter() - started
    _clean(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    return {"seconds": times, "median_s": statistics.median(times), "warmup_s": warmup_s,
            "peak_alloc_gb": peak / 2**30 if peak is not None else None,
            "peak_reserved_gb": reserved / 2**30 if reserved is not None else None}


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def rel_l2(x, ref) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def measure_peak_tflops(device, dtype, n: int = 8192, repeats: int = 20) -> float:
    """A dense n x n x n matmul's rate: the ceiling this GPU reaches in practice."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy-size models on the CPU (CI smoke)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float16 (float32 on CPU)")
    p.add_argument("--size", type=int, default=None, help="square image side (default 1024, tiny 64)")
    p.add_argument("--steps", type=int, default=None, help="default 30 (tiny 2)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 4; tiny 1 2)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case, median reported (default 3)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--vae", default="auto", choices=["auto", "bf16", "fp32", "fp16", "tiled"],
                   help="ours: VAE decode mode (instantid.optimize fp16_vae)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16/fp16 rate for the utilisation column (H100 SXM: 989)")
    p.add_argument("--measure-peak", action="store_true", help="also time a large matmul for a measured ceiling")
    p.add_argument("--skip-reference", action="store_true", help="time only ours (e.g. a second, cached run)")
    p.add_argument("--memory-curve", type=int, nargs="*", default=None,
                   help="batch sizes for ours' peak-memory curve (default 1 2 4 8; empty to skip)")
    p.add_argument("--lcm-steps", type=int, nargs="*", default=None,
                   help="quality-changing: ours with the LCM scheduler, no CFG (default 4 8; empty to skip)")
    p.add_argument("--precision-size", type=int, default=None, help="side for the fp32 deviation check "
                   "(default 512, tiny 64; 0 to skip)")
    p.add_argument("--precision-steps", type=int, default=10)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = torch.device(args.device or ("cuda" if cuda and not args.tiny else "cpu"))
    args.dtype = DTYPES[args.dtype or ("float16" if args.device.type == "cuda" else "float32")]
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 30)
    args.batch = args.batch or ([1, 2] if args.tiny else [1, 4])
    args.repeats = args.repeats or (1 if args.tiny else 3)
    if args.compile is None:
        args.compile = args.device.type == "cuda"
    if args.memory_curve is None:
        args.memory_curve = [1, 2] if args.tiny else [1, 2, 4, 8]
    if args.lcm_steps is None:
        args.lcm_steps = [2] if args.tiny else [4, 8]
    if args.precision_size is None:
        args.precision_size = 64 if args.tiny else 512
    if args.tiny:
        args.precision_steps = min(args.precision_steps, 2)
    if not args.tiny and args.device.type != "cuda":
        p.error("full size needs a CUDA device (use --tiny on the CPU)")
    return args


def main(argv=None) -> dict:
    from instantid.identity import Pose
    from instantid.optimize import optimize

    args = parse(argv)
    device, dtype = args.device, args.dtype
    res = {"config": {k: (str(v) if isinstance(v, (torch.device, torch.dtype)) else v) for k, v in vars(args).items()},
           "environment": _environment(device), "reference": {}, "ours": {}, "flops": {}, "speedup": {},
           "memory_curve": {}, "quality_changing": {}, "precision": {}}
    t0 = time.perf_counter()
    pipe = build_pipeline(args.tiny, device, dtype)
    res["build_s"] = time.perf_counter() - t0
    res["parameters"] = parameter_counts(pipe)
    print(f"built in {res['build_s']:.1f}s on {device} ({dtype}): "
          + ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in res["parameters"].items()), flush=True)
    size, steps = args.size, args.steps
    embedding = np.random.RandomState(0).randn(512).astype(np.float32) * 10
    kps_image = Pose(KPS * size, (size, size)).draw()
    common = dict(prompt="a photo of a person, studio light", face_embedding=embedding, keypoint_image=kps_image,
                  width=size, height=size)

    # FLOPs, counted on the eager models (compilation does not change the arithmetic)
    for b in args.batch:
        f1 = count_flops(lambda: reference_eager(pipe, num_images=b, steps=1, **common))
        f2 = count_flops(lambda: reference_eager(pipe, num_images=b, steps=2, **common))
        per_step, fixed = f2 - f1, f1 - (f2 - f1)
        res["flops"][b] = {"per_step": per_step, "fixed": fixed, "total": fixed + steps * per_step}
        print(f"batch {b}: {res['flops'][b]['total'] / 1e9:.4g} GFLOP per batch "
              f"({per_step / 1e9:.4g} per step)", flush=True)
    if args.measure_peak and device.type == "cuda":
        res["measured_peak_tflops"] = measure_peak_tflops(device, dtype)

    reference_latents = None
    if not args.skip_reference:
        for b in args.batch:
            _clean(device)
            r = timed(lambda: reference_eager(pipe, num_images=b, steps=steps, **common), device, args.repeats)
            res["reference"][b] = _rates(r, b, res["flops"][b]["total"], args.peak_tflops)
            print(f"reference batch {b}: {r['median_s']:.3f} s/batch", flush=True)
        reference_latents = reference_eager(pipe, num_images=1, steps=steps, output_type="latent", **common)

    if args.precision_size:
        res["precision"] = precision(pipe, args, common)
        print(f"precision: {res['precision']}", flush=True)

    _clean(device)
    t0 = time.perf_counter()
    res["optimizations"] = optimize(pipe, compile=args.compile, fp16_vae=args.vae, compile_mode=args.compile_mode)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    res["optimize_s"] = time.perf_counter() - t0
    print(f"ours: {', '.join(res['optimizations'])}", flush=True)
    for b in args.batch:
        _clean(device)
        # two warm-up calls: the first compiles, the second records CUDA graphs in the cudagraph modes
        r = timed(lambda: ours(pipe, num_images=b, steps=steps, guidance_scale=args.guidance, **common), device,
                  args.repeats, warmup=2 if args.compile else 1)
        res["ours"][b] = _rates(r, b, res["flops"][b]["total"], args.peak_tflops)
        if b in res["reference"]:
            res["speedup"][b] = res["reference"][b]["median_s"] / r["median_s"]
        print(f"ours batch {b}: {r['median_s']:.3f} s/batch (warm-up incl. compile {r['warmup_s']:.1f} s)",
              flush=True)
    if reference_latents is not None:
        mine = ours(pipe, num_images=1, steps=steps, output_type="latent", **common)[0]
        res["precision"]["ours_vs_reference_latents_rel_l2"] = rel_l2(mine, reference_latents)

    for steps_lcm in args.lcm_steps:
        _clean(device)
        r = timed(lambda: ours(pipe, num_images=1, steps=steps_lcm, guidance_scale=1.0, scheduler="lcm", **common),
                  device, args.repeats)
        res["quality_changing"][f"lcm_{steps_lcm}_steps_no_cfg_batch1"] = {
            "median_s": r["median_s"], "images_per_s": 1 / r["median_s"], "peak_alloc_gb": r["peak_alloc_gb"]}

    for b in args.memory_curve:
        _clean(device)
        try:
            ours(pipe, num_images=b, steps=2, guidance_scale=args.guidance, **common)
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            res["memory_curve"][b] = {"peak_alloc_gb": peak}
        except torch.cuda.OutOfMemoryError:
            res["memory_curve"][b] = {"peak_alloc_gb": None, "oom": True}
            _clean(device)

    res["total_s"] = time.perf_counter() - t0
    print_table(res, args)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    return res


def precision(pipe, args, common) -> dict:
    """Deviation from float32 on the same weights and inputs (eager reference path, small size): relative L2 of
    the final latents and the 0-255 pixel difference after a float32 decode; and the bf16 VAE decode's
    deviation from the float32 decode of the same latents."""
    from instantid.identity import Pose

    size = args.precision_size
    kw = {**common, "width": size, "height": size, "num_images": 1, "steps": args.precision_steps,
          "keypoint_image": Pose(KPS * size, (size, size)).draw()}
    out = {"size": size, "steps": args.precision_steps}
    names = ("unet", "controlnet", "text_encoder", "text_encoder_2", "image_proj_model")
    work = pipe.unet.dtype

    def pixels(vae, latents):
        x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round()

    with torch.no_grad():
        try:
            m32 = SimpleNamespace(**{n: copy.deepcopy(getattr(pipe, n)).float() for n in names}, vae=pipe.vae,
                                  tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, scheduler=pipe.scheduler)
            x32 = reference_eager(m32, output_type="latent", **kw)
            img32 = pixels(pipe.vae, x32)
            for dt in (torch.float16, torch.bfloat16):
                label = str(dt).removeprefix("torch.")
                if dt == work:
                    x = reference_eager(pipe, output_type="latent", **kw)
                else:
                    # from the working-dtype modules: their values are exactly those of the float32 copy
                    m = SimpleNamespace(**{n: copy.deepcopy(getattr(pipe, n)).to(dt) for n in names}, vae=pipe.vae,
                                        tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2,
                                        scheduler=pipe.scheduler)
                    x = reference_eager(m, output_type="latent", **kw)
                    del m
                out[f"{label}_finite"] = bool(torch.isfinite(x).all())
                out[f"{label}_latents_rel_l2"] = rel_l2(x.float(), x32.float())
                diff = (pixels(pipe.vae, x.float()) - img32).abs()
                out[f"{label}_pixels_max_abs"] = float(diff.max())
                out[f"{label}_pixels_mean_abs"] = float(diff.mean())
            vae16 = copy.deepcopy(pipe.vae).to(torch.bfloat16)
            diff = (pixels(vae16, x32) - img32).abs()
            out["bf16_vae_decode_pixels_max_abs"], out["bf16_vae_decode_pixels_mean_abs"] = float(diff.max()), float(
                diff.mean())
            del vae16, m32
        except torch.cuda.OutOfMemoryError:
            out["oom"] = True
    _clean(pipe.unet.device)
    return out


def _rates(r: dict, batch: int, flops: int, peak_tflops: float) -> dict:
    s = r["median_s"]
    return {**r, "s_per_image": s / batch, "images_per_s": batch / s, "tflops_per_s": flops / s / 1e12,
            "fraction_of_peak": flops / s / (peak_tflops * 1e12)}


def _environment(device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}")
    else:
        import os

        env.update(cpus=os.cpu_count(), load_avg=os.getloadavg())
    return env


def print_table(res: dict, args) -> None:
    print(f"\n{args.size}x{args.size}, {args.steps} steps, CFG {args.guidance}, {res['config']['dtype']}, "
          f"{res['environment'].get('gpu', res['environment']['device'])}; medians of {args.repeats} runs")
    print(f"{'impl':<10}{'batch':>6}{'s/batch':>10}{'s/image':>10}{'images/s':>10}{'peak GB':>9}"
          f"{'TFLOP/s':>9}{'of peak':>9}{'speedup':>9}")
    for impl in ("reference", "ours"):
        for b, r in res[impl].items():
            peak = f"{r['peak_alloc_gb']:.2f}" if r["peak_alloc_gb"] is not None else "-"
            speed = f"{res['speedup'][b]:.2f}x" if impl == "ours" and b in res["speedup"] else ""
            print(f"{impl:<10}{b:>6}{r['median_s']:>10.3f}{r['s_per_image']:>10.3f}{r['images_per_s']:>10.3f}"
                  f"{peak:>9}{r['tflops_per_s']:>9.1f}{r['fraction_of_peak'] * 100:>8.1f}%{speed:>9}")
    if res["memory_curve"]:
        cells = []
        for b, v in res["memory_curve"].items():
            peak = v["peak_alloc_gb"]
            cells.append(f"{b}: " + ("OOM" if v.get("oom") else "-" if peak is None else f"{peak:.2f}"))
        print("memory per batch (ours, GB): " + ", ".join(cells))
    for name, r in res["quality_changing"].items():
        print(f"quality-changing (separate): {name}: {r['median_s']:.3f} s, {r['images_per_s']:.2f} images/s")
    if res["precision"]:
        print("precision: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in res["precision"].items()))


if __name__ == "__main__":
    main()

"""GPU denoising: the eager reference against the SERVED configuration, headline first, in one run.

    python bench/gpu_generate.py --budget-s 520 --out gpu.json          # on a CUDA machine (docs/benchmarks.md)
    python bench/gpu_generate.py --tiny --out gpu-tiny.json             # CI smoke, CPU, seconds
    python bench/gpu_generate.py --estimate-memory --batch 1 4          # any machine: meta-device memory estimate

Models: full-size SDXL UNet, IdentityNet, both CLIP text encoders, the VAE, InstantID's Resampler and the 70
ID-adapter projections, built from ``tests/fixtures/real_configs.py`` with random weights directly on the device
in the working dtype (float16 on CUDA, as ``load_pipeline`` serves; the VAE in float32, as its force_upcast
loads). Compute does not depend on weight values, so timings are those of the real models. The tokenizers are
byte-level (``instantid.tiny``'s).

(a) ``reference_eager``: the official InstantID pipeline's semantics written out plainly below (CFG 5, Euler,
    IdentityNet and adapter scale 0.8, float32 VAE decode), eager, NCHW, SDPA.
(b) served: ``serve_compiled`` = what a Generator replica with ``compile.enabled`` does at start
    (``GeneratorCore.compile``: ``optimize(pipe, serving=ServingPlan(...))`` then ``warm_up``; a test checks the
    two agree), then ``InstantIDPipeline.generate`` with N requests in one denoising batch.

Phases, in order; the JSON is rewritten after each, so a run cut by a time limit keeps what it measured, and
``--budget-s`` skips a phase that would not fit (recorded under ``skipped``):
1. build; the reference at each batch size (before the served setup: ``optimize`` changes the modules in place);
2. the served setup for the first batch size's rows (a compile failure is reported under
   ``served_setup.compile_error`` and the pipeline serves eager, as a replica would), the served timing, and the
   headline (eager vs served s/image and peak ``torch.cuda.max_memory_allocated`` at the first batch size);
3. FLOPs counted by ``torch.utils.flop_counter`` on one IdentityNet + UNet step and one VAE decode (total = steps x
   step + decode), a measured bf16 8192^3 matmul rate, and the fraction of each;
4. the other batch sizes (their row bucket warmed first); 5. the served memory curve; 6. LCM (quality-changing,
   reported apart, eager: the plan does not warm it).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import weakref
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
    from instantid.pipeline import InstantIDPipeline
    from instantid.resampler import Resampler
    from instantid.tiny import bundle as tiny_mod

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
# the served configuration
# ----------------------------------------------------------------------------------------------------------
def warm_up_request(slots, text_length, guided):
    """The request the Generator warms each graph with (deployments/generator/deployment.py,
    ``GeneratorCore.compile``; tests/bench check that the two agree)."""
    from instantid.identity import Pose
    from instantid.pipeline import GenerationRequest

    kps = np.array([[0.35, 0.4], [0.65, 0.4], [0.5, 0.55], [0.38, 0.7], [0.62, 0.7]]) * 512
    return GenerationRequest(face_embedding=np.zeros(512, np.float32), prompt="warm-up",
                             keypoint_image=Pose(kps, (512, 512)).draw(), guidance_scale=5.0 if guided else 1.0)


def serve_compiled(pipe, *, batch_buckets, sizes, mode="default", backend="inductor", cache_dir=None,
                   schedulers=None) -> dict:
    """What a Generator replica with ``compile.enabled`` does at start: ``optimize`` with a ``ServingPlan``, then
    ``warm_up`` of every planned graph. A compile failure is reported, never raised: the pipeline then serves
    eager, as a replica would. ``schedulers`` narrows the plan's (each scheduler family is one more graph set; the
    bench times Euler only)."""
    from instantid.optimize import ServingPlan, optimize, warm_up

    extra = {"schedulers": tuple(schedulers)} if schedulers else {}
    plan = ServingPlan(batch_buckets=tuple(batch_buckets), sizes=tuple(map(tuple, sizes)), **extra)
    out = {"plan": {"batch_buckets": list(plan.batch_buckets), "sizes": [list(s) for s in plan.sizes],
                    "schedulers": list(plan.schedulers)}, "compile_error": None}
    started = time.perf_counter()
    try:
        out["applied"] = optimize(pipe, serving=plan, compile_mode=mode, backend=backend, cache_dir=cache_dir)
        out.update(warm_up(pipe, warm_up_request))
    except Exception as exc:  # noqa: BLE001 -- a broken compile is a result to report, not a crash
        import traceback

        out["compile_error"] = f"{type(exc).__name__}: {exc}"[:2000]
        out["traceback"] = traceback.format_exc()[-4000:]
        if getattr(pipe, "serving", None) is not None:
            pipe.serving.broken = pipe.serving.broken or out["compile_error"]
    state = getattr(pipe, "serving", None)
    if state is not None and state.broken and not out["compile_error"]:
        out["compile_error"] = state.broken  # caught by the served path itself (it then runs eager)
    out["warm_up_s"] = time.perf_counter() - started
    return out


def extend_plan(pipe, batch_buckets) -> dict:
    """Warm more row buckets on an already served pipeline (the graphs a plan with them would have built)."""
    from instantid.optimize import warm_up

    state = pipe.serving
    state.plan = dataclasses.replace(state.plan, batch_buckets=tuple(sorted(set(batch_buckets))))
    started = time.perf_counter()
    try:
        out = warm_up(pipe, warm_up_request)
    except Exception as exc:  # noqa: BLE001
        state.broken = state.broken or f"{type(exc).__name__}: {exc}"[:2000]
        out = {"broken": state.broken}
    out["warm_up_s"] = time.perf_counter() - started
    return out


# ----------------------------------------------------------------------------------------------------------
# FLOPs of one step, and the memory estimate on the meta device
# ----------------------------------------------------------------------------------------------------------
def _eager(module):
    return getattr(module, "_eager_forward", module.forward)  # optimize() keeps the eager forward


def step_inputs(pipe, batch: int, size: int, device, dtype, text_tokens: int = 77):
    """One CFG denoising step's inputs for IdentityNet and the UNet (2 x batch rows)."""
    rows, unet = 2 * batch, pipe.unet
    id_tokens = pipe.image_proj_model.num_queries if hasattr(pipe.image_proj_model, "num_queries") else 16
    cross = unet.config.cross_attention_dim
    pooled = pipe.text_encoder_2.config.projection_dim
    z = dict(device=device, dtype=dtype)
    return dict(
        x=torch.zeros(rows, 4, size // 8, size // 8, **z), t=torch.tensor(500.0, device=device),
        ids=torch.zeros(rows, id_tokens, cross, **z), context=torch.zeros(rows, text_tokens + id_tokens, cross, **z),
        image=torch.zeros(rows, 3, size, size, **z),
        added={"text_embeds": torch.zeros(rows, pooled, **z), "time_ids": torch.zeros(rows, 6, **z)})


def one_step(pipe, i) -> None:
    down, mid = _eager(pipe.controlnet)(i["x"], i["t"], encoder_hidden_states=i["ids"], controlnet_cond=i["image"],
                                         conditioning_scale=0.8, added_cond_kwargs=i["added"], return_dict=False)
    _eager(pipe.unet)(i["x"], i["t"], encoder_hidden_states=i["context"], down_block_additional_residuals=down,
                      mid_block_additional_residual=mid, added_cond_kwargs=i["added"], return_dict=False)


def decode(pipe, batch: int, size: int, device, dtype) -> None:
    vae = pipe.vae
    latents = torch.zeros(batch, 4, size // 8, size // 8, device=device, dtype=dtype)
    if vae.post_quant_conv is not None:
        latents = vae.post_quant_conv(latents)
    _eager(vae.decoder)(latents)


@torch.no_grad()
def step_flops(pipe, batch: int, size: int) -> dict:
    """FLOPs counted (``torch.utils.flop_counter``) on one IdentityNet + UNet step and one VAE decode."""
    from instantid.attention import set_identity_region, set_identity_scale, set_identity_tokens

    device, dtype = pipe.unet.device, pipe.unet.dtype
    # the served calls leave per-row scales and masks of their batch on the processors: plain ones for this count
    set_identity_scale(pipe.unet, 0.8)
    set_identity_region(pipe.unet, None)
    set_identity_tokens(pipe.unet, None)
    per_step = count_flops(lambda: one_step(pipe, step_inputs(pipe, batch, size, device, dtype)))
    vae = count_flops(lambda: decode(pipe, batch, size, device, pipe.vae.dtype))
    return {"per_step": per_step, "vae_decode": vae}


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of the storages that ops create and that are still referenced, and their peak: what a
    caching allocator would have to hold at least (no fragmentation, no cuDNN/cuBLAS workspaces)."""

    def __init__(self):
        super().__init__()
        self.live, self.refs, self.now, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.now += self.live[key]
                    self.peak = max(self.peak, self.now)
                self.refs[key] = self.refs.get(key, 0) + 1
                weakref.finalize(t, self._release, key)
        return out


@contextmanager
def flash_attention_memory():
    """On the meta device SDPA would take its math path and materialise the attention matrix; on an H100 it runs
    flash/memory-efficient kernels whose only large tensor is the output: model that."""
    import torch.nn.functional as F

    saved = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved


@torch.no_grad()
def estimate_memory(tiny: bool, size: int, batches, dtype=torch.float16) -> dict:
    """Peak GPU memory estimated on the meta device with the real models' shapes: the parameters by dtype, plus the
    largest live activations of one IdentityNet + UNet step (2 x batch rows) and of the VAE decode in bfloat16
    and in float32. Text encoding (77 tokens) is far smaller and runs before the step. An estimate until a GPU
    measures it: the caching allocator's fragmentation and the kernels' workspaces are not in it."""
    device = torch.device("meta")
    pipe = build_pipeline(tiny, device, dtype)
    gib = 2**30
    weights = {}
    for name in ("unet", "controlnet", "text_encoder", "text_encoder_2", "image_proj_model", "vae"):
        for p in [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()]:
            weights.setdefault(name, {}).setdefault(str(p.dtype).removeprefix("torch."), 0)
            weights[name][str(p.dtype).removeprefix("torch.")] += p.numel() * p.element_size()
    vae32 = sum(weights["vae"].values())
    other = sum(sum(v.values()) for k, v in weights.items() if k != "vae")
    out = {"device": "meta", "dtype": str(dtype).removeprefix("torch."), "size": size,
           "weights_gib": {k: {d: b / gib for d, b in v.items()} for k, v in weights.items()}, "batches": {}}
    for b in batches:
        with flash_attention_memory():
            with LiveBytes() as step:
                inputs = step_inputs(pipe, b, size, device, dtype)
                one_step(pipe, inputs)
                del inputs
            decoded = {}
            for label, vae_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                pipe.vae.to(vae_dtype)
                with LiveBytes() as dec:
                    decode(pipe, b, size, device, vae_dtype)
                decoded[label] = dec.peak
            pipe.vae.to(torch.float32)
        row = {"step_activations_gib": step.peak / gib}
        for label, peak in decoded.items():
            vae_bytes = vae32 // 2 if label == "bf16" else vae32
            row[f"vae_decode_{label}_activations_gib"] = peak / gib
            row[f"peak_gib_vae_{label}"] = (other + vae_bytes + max(step.peak, peak)) / gib
            # the text encoders stay resident in this count; offloaded after encoding they would leave it
            te = sum(sum(weights[n].values()) for n in ("text_encoder", "text_encoder_2"))
            row[f"peak_gib_vae_{label}_text_encoders_offloaded"] = (other - te + vae_bytes + max(step.peak, peak)) / gib
        out["batches"][b] = row
    return out


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy-size models on the CPU (CI smoke)")
    p.add_argument("--estimate-memory", action="store_true",
                   help="no run: the peak-memory estimate on the meta device (any machine), for --batch sizes")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: float16 on CUDA (what load_pipeline serves there), float32 on the CPU")
    p.add_argument("--size", type=int, default=None, help="square image side (default 1024, tiny 64)")
    p.add_argument("--steps", type=int, default=None, help="default 30 (tiny 2)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch sizes (default 1 4; tiny 1 2): the first is the headline, the rest if time remains")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case, median reported (default 3)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget: a phase that would not fit in what is left is skipped (recorded)")
    p.add_argument("--reserve-s", type=float, default=None,
                   help="budget kept for the served setup when deciding on later batches' reference runs "
                   "(default 360 with compile, else 0)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="served configuration compiled (default on CUDA); --no-compile: optimize() without compile")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--cache-dir", default=None, help="Inductor's kernel cache (default: TORCHINDUCTOR_CACHE_DIR)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's nominal dense bf16/fp16 rate (H100 SXM: 989); a measured matmul rate is "
                   "reported beside it")
    p.add_argument("--memory-curve", type=int, nargs="*", default=None,
                   help="batch sizes for the served peak-memory curve (default 1 2 4 8; empty to skip)")
    p.add_argument("--lcm-steps", type=int, nargs="*", default=None,
                   help="quality-changing: LCM scheduler, no CFG (default none; tiny 2; runs eager: unplanned)")
    p.add_argument("--precision-size", type=int, default=None, help="side for the fp32 deviation check, run "
                   "before the served setup (default 0 = skip; tiny 64)")
    p.add_argument("--precision-steps", type=int, default=10)
    p.add_argument("--out", help="write the results as JSON here (rewritten after every phase)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = torch.device(args.device or ("cuda" if cuda and not args.tiny and not args.estimate_memory
                                               else "cpu"))
    args.dtype = DTYPES[args.dtype or ("float16" if args.device.type == "cuda" or args.estimate_memory
                                       else "float32")]
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 30)
    args.batch = args.batch or ([1, 2] if args.tiny else [1, 4])
    args.repeats = args.repeats or (1 if args.tiny else 3)
    if args.compile is None:
        args.compile = args.device.type == "cuda"
    if args.reserve_s is None:
        args.reserve_s = 360.0 if args.compile else 0.0
    if args.memory_curve is None:
        args.memory_curve = [1, 2] if args.tiny else [1, 2, 4, 8]
    if args.lcm_steps is None:
        args.lcm_steps = [2] if args.tiny else []
    if args.precision_size is None:
        args.precision_size = 64 if args.tiny else 0
    if args.tiny:
        args.precision_steps = min(args.precision_steps, 2)
    if not args.tiny and not args.estimate_memory and args.device.type != "cuda":
        p.error("full size needs a CUDA device (use --tiny or --estimate-memory on the CPU)")
    return args


class Run:
    """The results, written to ``--out`` after every phase, and the time budget the phases share."""

    def __init__(self, args, res: dict):
        self.args, self.res, self.started = args, res, time.perf_counter()

    def left(self) -> float:
        return float("inf") if self.args.budget_s is None else self.args.budget_s - (time.perf_counter() - self.started)

    def fits(self, phase: str, needs_s: float) -> bool:
        if needs_s <= self.left():
            return True
        self.res["skipped"][phase] = f"needs ~{needs_s:.0f} s, {self.left():.0f} s left of --budget-s"
        print(f"skipped {phase}: {self.res['skipped'][phase]}", flush=True)
        self.save()
        return False

    @contextmanager
    def guard(self, phase: str):
        """A later phase that fails is recorded and the run goes on: the phases before it stay measured."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001
            import traceback

            self.res.setdefault("errors", {})[phase] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"phase {phase} failed: {traceback.format_exc()[-3000:]}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.save()

    def done(self, phase: str) -> None:
        self.res["phases_done"].append(phase)
        self.res["elapsed_s"] = time.perf_counter() - self.started
        self.save()

    def save(self) -> None:
        if self.args.out:
            tmp = Path(str(self.args.out) + ".tmp")
            tmp.write_text(json.dumps(self.res, indent=2, default=str))
            tmp.replace(self.args.out)  # a run cut mid-write keeps the previous phase's file


def main(argv=None) -> dict:
    from instantid.identity import Pose

    args = parse(argv)
    config = {k: (str(v) if isinstance(v, (torch.device, torch.dtype)) else v) for k, v in vars(args).items()}
    if args.estimate_memory:
        res = {"config": config, "estimate": estimate_memory(args.tiny, args.size, args.batch, args.dtype)}
        print(json.dumps(res["estimate"], indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2, default=str))
        return res
    device, dtype = args.device, args.dtype
    res = {"config": config, "environment": _environment(device), "phases_done": [], "skipped": {},
           "headline": {}, "reference": {}, "served": {}, "speedup": {}, "served_setup": {}, "flops": {},
           "memory_curve": {}, "quality_changing": {}, "precision": {}}
    run = Run(args, res)
    t0 = time.perf_counter()
    pipe = build_pipeline(args.tiny, device, dtype)
    res["build_s"] = time.perf_counter() - t0
    res["parameters"] = parameter_counts(pipe)
    print(f"built in {res['build_s']:.1f}s on {device} ({dtype}): "
          + ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in res["parameters"].items()), flush=True)
    run.done("build")
    size, steps, first, rest = args.size, args.steps, args.batch[0], args.batch[1:]
    embedding = np.random.RandomState(0).randn(512).astype(np.float32) * 10
    kps_image = Pose(KPS * size, (size, size)).draw()
    common = dict(prompt="a photo of a person, studio light", face_embedding=embedding, keypoint_image=kps_image,
                  width=size, height=size)

    # 1. the eager reference (before optimize(), which changes the modules in place); the headline batch first
    ref_s = None
    for b in args.batch:
        # the served setup (a first compile: minutes) must still fit after a later batch's reference
        if b != first and not run.fits(f"reference_batch{b}",
                                       (ref_s or 0) * b * (args.repeats + 1) * 1.2 + args.reserve_s):
            continue
        _clean(device)
        r = timed(lambda: reference_eager(pipe, num_images=b, steps=steps, **common), device, args.repeats)
        res["reference"][b] = _rates(r, b)
        ref_s = ref_s or r["median_s"] / b
        print(f"reference batch {b}: {r['median_s']:.3f} s/batch, peak {r['peak_alloc_gb']} GB", flush=True)
        run.done(f"reference_batch{b}")
    reference_latents = reference_eager(pipe, num_images=1, steps=steps, output_type="latent", **common)
    if args.precision_size:
        res["precision"] = precision(pipe, args, common)
        run.done("precision")

    # 2. the served configuration, warmed for the headline batch's rows, then timed
    rows = [2 * b if args.guidance > 1 else b for b in args.batch]
    _clean(device)
    if args.compile:
        res["served_setup"] = serve_compiled(pipe, batch_buckets=[rows[0]], sizes=[(size, size)],
                                             mode=args.compile_mode, backend=args.backend, cache_dir=args.cache_dir,
                                             schedulers=["euler"])
    else:
        from instantid.optimize import optimize

        res["served_setup"] = {"applied": optimize(pipe, compile=False), "compile_error": None, "warm_up_s": 0.0}
    print(f"served: {res['served_setup'].get('applied')}; warm-up {res['served_setup']['warm_up_s']:.1f} s; "
          f"compile error: {res['served_setup']['compile_error']}", flush=True)
    run.done("served_setup")
    serve_one = lambda b: ours(pipe, num_images=b, steps=steps, guidance_scale=args.guidance,  # noqa: E731
                               **common)
    _served_case(run, pipe, first, serve_one, device)
    mine = ours(pipe, num_images=1, steps=steps, guidance_scale=args.guidance, output_type="latent", **common)[0]
    res["precision"]["served_vs_reference_latents_rel_l2"] = rel_l2(mine, reference_latents)
    res["headline"] = _headline(res, first, args)
    run.done("headline")

    # 3. FLOPs of one step (counted on the eager forwards: compiling does not change the arithmetic) and a
    #    measured matmul ceiling
    if run.fits("flops", 30 + (ref_s or 0)):
        with run.guard("flops"):
            res["flops"] = {b: step_flops(pipe, b, size) for b in args.batch}
            for b, f in res["flops"].items():
                f["total"] = steps * f["per_step"] + f["vae_decode"]
            if device.type == "cuda":
                res["measured_matmul_tflops"] = measure_peak_tflops(device, torch.bfloat16)
            _utilisation(res, args)
            res["headline"] = _headline(res, first, args)
            run.done("flops")

    # 4. the other batch sizes: one more warm-up (compile) each, as a plan with their buckets would have
    warm_s = res["served_setup"]["warm_up_s"]
    for b, r in zip(rest, rows[1:]):
        if not run.fits(f"served_batch{b}", warm_s * 1.5 + (ref_s or 0) * b * (args.repeats + 2)):
            continue
        with run.guard(f"served_batch{b}"):
            if args.compile and getattr(pipe, "serving", None) is not None:
                res["served_setup"][f"extend_to_{r}_rows"] = extend_plan(pipe, [*pipe.serving.plan.batch_buckets, r])
            _served_case(run, pipe, b, serve_one, device)
            _utilisation(res, args)
            run.done(f"served_batch{b}")

    # 5. the memory curve (2 steps each; a batch whose rows have no bucket runs eager, as served)
    for b in args.memory_curve:
        if not run.fits(f"memory_curve_batch{b}", (ref_s or 0) * b * 4):
            break
        with run.guard(f"memory_curve_batch{b}"):
            _clean(device)
            before = dict(pipe.serving.eager_calls) if getattr(pipe, "serving", None) else {}
            try:
                ours(pipe, num_images=b, steps=2, guidance_scale=args.guidance, **common)
                _sync(device)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                res["memory_curve"][b] = {"peak_alloc_gb": peak, "eager_fallbacks": _fallbacks(pipe, before)}
            except torch.cuda.OutOfMemoryError:
                res["memory_curve"][b] = {"peak_alloc_gb": None, "oom": True}
                _clean(device)
            run.done(f"memory_curve_batch{b}")

    for steps_lcm in args.lcm_steps:
        if not run.fits(f"lcm_{steps_lcm}", (ref_s or 0) * 4):
            break
        with run.guard(f"lcm_{steps_lcm}"):
            _clean(device)
            r = timed(lambda: ours(pipe, num_images=1, steps=steps_lcm, guidance_scale=1.0, scheduler="lcm",
                                   **common), device, args.repeats)
            res["quality_changing"][f"lcm_{steps_lcm}_steps_no_cfg_batch1"] = {
                "median_s": r["median_s"], "images_per_s": 1 / r["median_s"], "peak_alloc_gb": r["peak_alloc_gb"]}
            run.done(f"lcm_{steps_lcm}")

    res["total_s"] = time.perf_counter() - run.started
    print_table(res, args)
    run.save()
    return res


def _fallbacks(pipe, before: dict) -> dict:
    state = getattr(pipe, "serving", None)
    if state is None:
        return {}
    return {k: v - before.get(k, 0) for k, v in state.eager_calls.items() if v - before.get(k, 0)}


def _served_case(run, pipe, b, serve_one, device) -> None:
    """Time the served pipeline at batch ``b``; record whether its calls ran the compiled graphs."""
    res = run.res
    _clean(device)
    before = dict(pipe.serving.eager_calls) if getattr(pipe, "serving", None) else {}
    r = timed(lambda: serve_one(b), device, run.args.repeats)
    res["served"][b] = {**_rates(r, b), "eager_fallbacks": _fallbacks(pipe, before)}
    if b in res["reference"]:
        res["speedup"][b] = res["reference"][b]["median_s"] / r["median_s"]
    print(f"served batch {b}: {r['median_s']:.3f} s/batch, peak {r['peak_alloc_gb']} GB, "
          f"eager fallbacks {res['served'][b]['eager_fallbacks']}", flush=True)


def _headline(res: dict, b: int, args) -> dict:
    ref, srv = res["reference"].get(b, {}), res["served"].get(b, {})
    return {"size": args.size, "steps": args.steps, "batch": b, "guidance": args.guidance, "dtype": str(args.dtype),
            "vae_decode": {"eager": "float32", "served": next((a for a in res["served_setup"].get("applied", [])
                                                               if a.startswith("vae=")), None)},
            "eager_s_per_image": ref.get("s_per_image"), "served_s_per_image": srv.get("s_per_image"),
            "speedup": res["speedup"].get(b),
            "eager_peak_alloc_gb": ref.get("peak_alloc_gb"), "served_peak_alloc_gb": srv.get("peak_alloc_gb"),
            "served_compiled": bool(args.compile) and not res["served_setup"].get("compile_error")
            and not srv.get("eager_fallbacks"),
            "compile_error": res["served_setup"].get("compile_error"),
            "fraction_of_measured_matmul": srv.get("fraction_of_measured_matmul")}


def _utilisation(res: dict, args) -> None:
    measured = res.get("measured_matmul_tflops")
    for impl in ("reference", "served"):
        for b, r in res[impl].items():
            if b not in res["flops"]:
                continue
            rate = res["flops"][b]["total"] / r["median_s"] / 1e12
            r["tflops_per_s"] = rate
            r["fraction_of_nominal_peak"] = rate / args.peak_tflops
            if measured:
                r["fraction_of_measured_matmul"] = rate / measured



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


def _rates(r: dict, batch: int) -> dict:
    s = r["median_s"]
    return {**r, "s_per_image": s / batch, "images_per_s": batch / s}


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
    h = res["headline"]
    print(f"\n{args.size}x{args.size}, {args.steps} steps, CFG {args.guidance}, {res['config']['dtype']}, "
          f"{res['environment'].get('gpu', res['environment']['device'])}; medians of {args.repeats} runs")
    if h:
        print(f"HEADLINE batch {h['batch']}: eager {h['eager_s_per_image']} s/image, served {h['served_s_per_image']}"
              f" s/image, speed-up {h['speedup']}; peak eager {h['eager_peak_alloc_gb']} GB, served "
              f"{h['served_peak_alloc_gb']} GB; compiled {h['served_compiled']}; compile error {h['compile_error']}")
    print(f"{'impl':<10}{'batch':>6}{'s/batch':>10}{'s/image':>10}{'images/s':>10}{'peak GB':>9}"
          f"{'TFLOP/s':>9}{'of mm':>8}{'speedup':>9}")
    for impl in ("reference", "served"):
        for b, r in res[impl].items():
            peak = f"{r['peak_alloc_gb']:.2f}" if r["peak_alloc_gb"] is not None else "-"
            rate = f"{r['tflops_per_s']:.1f}" if "tflops_per_s" in r else "-"
            frac = f"{r['fraction_of_measured_matmul'] * 100:.1f}%" if "fraction_of_measured_matmul" in r else "-"
            speed = f"{res['speedup'][b]:.2f}x" if impl == "served" and b in res["speedup"] else ""
            print(f"{impl:<10}{b:>6}{r['median_s']:>10.3f}{r['s_per_image']:>10.3f}{r['images_per_s']:>10.3f}"
                  f"{peak:>9}{rate:>9}{frac:>8}{speed:>9}")
    if res["memory_curve"]:
        cells = []
        for b, v in res["memory_curve"].items():
            peak = v["peak_alloc_gb"]
            cells.append(f"{b}: " + ("OOM" if v.get("oom") else "-" if peak is None else f"{peak:.2f}"))
        print("memory per batch (served, GB): " + ", ".join(cells))
    for name, r in res["quality_changing"].items():
        print(f"quality-changing (separate): {name}: {r['median_s']:.3f} s, {r['images_per_s']:.2f} images/s")
    if res["skipped"]:
        print("skipped: " + "; ".join(f"{k} ({v})" for k, v in res["skipped"].items()))
    if res["precision"]:
        print("precision: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in res["precision"].items()))


if __name__ == "__main__":
    main()

"""Opt-in inference optimisations for a loaded InstantIDPipeline (meant for GPUs; never applied by default).

``optimize(pipe)`` changes the pipeline in place and returns a list of what it applied:

- ``dtype``: optionally cast the denoising path (UNet, IdentityNet, extra ControlNets, text encoders, Resampler)
  to ``bfloat16`` or ``float16``.
- ``channels_last``: UNet, IdentityNet, extra ControlNets and the VAE in NHWC memory format (what cuDNN's and
  Triton's convolutions prefer on tensor-core GPUs).
- ``fuse_qkv``: one projection GEMM instead of three for every self-attention layer (UNet, IdentityNet) and one
  instead of two for IdentityNet's key/value; the old ``to_q``/``to_k``/``to_v`` weights become views of the
  fused weight, so no memory is added. The UNet's cross-attention keeps our IdentityAttnProcessor.
- ``tensor_scales``: the ID-adapter scale and IdentityNet's conditioning scale reach the compiled graphs as
  tensors, not Python floats: a float is baked into the graph, so every new ``ip_adapter_scale`` or
  ``controlnet_conditioning_scale`` (and the 0.0 outside a control window) would otherwise recompile.
- ``compile``: ``torch.compile`` (``dynamic=False``, ``fullgraph=True``) of the UNet, IdentityNet, extra
  ControlNets and the VAE decoder. Each (batch, size) compiles once; compiled code is cached on disk by
  Inductor (``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_$USER``; the FX graph cache and the
  autotuning cache are on by default, ``TORCHINDUCTOR_FX_GRAPH_CACHE=1`` forces the former). Point every
  replica at one persistent directory (``cache_dir=`` here or the env var) and only the first replica on a
  node compiles; the others load kernels in seconds.
- ``fp16_vae``: how the VAE decodes. SDXL's VAE overflows in float16 (activations beyond 65504, hence its
  ``force_upcast``), and the reference pipeline upcasts it to float32 for decoding. Options:
  ``"bf16"`` decodes in bfloat16: float32's exponent range, so no overflow, at half float32's memory and
  time (8 mantissa bits; the output is quantised to 8-bit pixels anyway: the deviation is measured by
  bench/gpu_generate.py); ``"fp32"`` keeps the reference's float32 decode; ``"fp16"`` decodes in float16 and is
  refused for a VAE that needs upcasting (use an fp16-fixed VAE); ``"tiled"`` keeps the VAE's dtype and decodes
  in tiles (less peak memory for large batches, small seams); ``"auto"`` = ``"bf16"`` where the device
  supports bfloat16, else ``"fp32"``.

The CPU float32 path never calls this module, so its parity with the reference is untouched.
"""

from __future__ import annotations

import os

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

from .attention import IdentityAttnProcessor

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, None: None}
VAE_MODES = ("auto", "bf16", "fp32", "fp16", "tiled")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def optimize(
    pipe,
    *,
    compile: bool = True,
    channels_last: bool = True,
    fp16_vae: str = "auto",
    dtype: str | torch.dtype | None = None,
    fuse_qkv: bool = True,
    tensor_scales: bool = True,
    compile_mode: str = "default",
    compile_vae: bool = True,
    cache_dir: str | os.PathLike | None = None,
    inductor_tuning: bool = True,
) -> list[str]:
    """Apply the optimisations to ``pipe`` in place; returns the names of those applied (see the module doc)."""
    if fp16_vae not in VAE_MODES:
        raise ValueError(f"fp16_vae must be one of {VAE_MODES}, got {fp16_vae!r}")
    if compile and compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    applied = []
    nets = [pipe.unet, pipe.controlnet, *getattr(pipe, "extra_controlnets", {}).values()]
    controlnets = nets[1:]

    target = DTYPES[dtype] if not isinstance(dtype, torch.dtype) else dtype
    if target is not None:
        for module in [*nets, pipe.text_encoder, pipe.text_encoder_2, pipe.image_proj_model]:
            if module is not None:
                module.to(dtype=target)
        applied.append(f"dtype={str(target).removeprefix('torch.')}")

    applied.append(f"vae={_set_vae(pipe.vae, fp16_vae)}")

    if channels_last:
        for module in [*nets, pipe.vae]:
            module.to(memory_format=torch.channels_last)
        applied.append("channels_last")

    if fuse_qkv:
        n = _fuse_self_attention(pipe.unet, cross_too=False)
        n += sum(_fuse_self_attention(net, cross_too=True) for net in controlnets)
        applied.append(f"fuse_qkv({n} layers)")

    if tensor_scales:
        for proc in pipe.unet.attn_processors.values():
            if isinstance(proc, IdentityAttnProcessor) and not isinstance(proc, TensorScaleIdentityAttnProcessor):
                _as_tensor_scale(proc)
        applied.append("tensor_scales")

    if compile:
        if cache_dir is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
        if inductor_tuning:
            _tune_inductor()
        kwargs = dict(mode=compile_mode, fullgraph=True, dynamic=False)
        _compile_forward(pipe.unet, **kwargs)
        for net in controlnets:
            _compile_forward(net, scalar_args=("conditioning_scale",) if tensor_scales else (), **kwargs)
        if compile_vae:
            _compile_forward(pipe.vae.decoder, **kwargs)
        applied.append(f"compile({compile_mode})")
    return applied


# -- VAE ------------------------------------------------------------------------------------------------
def _set_vae(vae, mode: str) -> str:
    device = next(vae.parameters()).device
    if mode == "auto":
        mode = "bf16" if _bf16_ok(device) else "fp32"
    if mode == "bf16":
        vae.to(torch.bfloat16)
    elif mode == "fp32":
        vae.to(torch.float32)
    elif mode == "fp16":
        if vae.config.force_upcast:
            raise ValueError("this VAE overflows in float16 (force_upcast); use fp16_vae='bf16' or an fp16-fixed VAE")
        vae.to(torch.float16)
    elif mode == "tiled":
        vae.enable_tiling()
    return mode


def _bf16_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


# -- attention ----------------------------------------------------------------------------------------------
def _fuse_self_attention(model, *, cross_too: bool) -> int:
    """Fuse Q/K/V of self-attention layers (and K/V of cross-attention if ``cross_too``) that use the stock
    SDPA processor; the unfused weights become views of the fused one."""
    fused = 0
    for module in model.modules():
        if not isinstance(module, Attention) or not isinstance(module.processor, AttnProcessor2_0):
            continue
        if module.is_cross_attention and not cross_too:
            continue
        with torch.no_grad():
            module.fuse_projections()
        parts = ["to_k", "to_v"] if module.is_cross_attention else ["to_q", "to_k", "to_v"]
        joint = module.to_kv if module.is_cross_attention else module.to_qkv
        _share(joint, [getattr(module, p) for p in parts])
        module.set_processor(FusedAttnProcessor2_0())
        fused += 1
    return fused


def _share(joint: torch.nn.Linear, linears: list[torch.nn.Linear]) -> None:
    start = 0
    for linear in linears:
        n = linear.out_features
        linear.weight = torch.nn.Parameter(joint.weight[start:start + n], requires_grad=False)
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(joint.bias[start:start + n], requires_grad=False)
        start += n


class TensorScaleIdentityAttnProcessor(IdentityAttnProcessor):
    """IdentityAttnProcessor whose ``scale`` lives in a tensor: setting a float fills it in place, so a compiled
    graph reads the new value instead of recompiling for it. Per-row tensors are stored as given."""

    @property
    def scale(self):
        return self._scale_tensor

    @scale.setter
    def scale(self, value):
        current = self.__dict__.get("_buffers", {}).get("_scale_tensor")
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if current is not None and current.shape == value.shape:
                current.copy_(value)
            else:
                self.register_buffer("_scale_tensor", value.clone(), persistent=False)
        elif current is not None and current.ndim == 0:
            current.fill_(float(value))
        else:
            like = self.to_k_ip.weight
            self.register_buffer("_scale_tensor", torch.tensor(float(value), device=like.device, dtype=like.dtype),
                                 persistent=False)


def _as_tensor_scale(proc: IdentityAttnProcessor) -> None:
    value = proc.__dict__.pop("scale", 1.0)
    proc.__class__ = TensorScaleIdentityAttnProcessor
    proc.scale = value


# -- compile ---------------------------------------------------------------------------------------------------
def _tune_inductor() -> None:
    """Inductor settings that help convolution-heavy diffusion models (the diffusers speed-up guide's)."""
    import torch._inductor.config as cfg

    cfg.conv_1x1_as_mm = True
    cfg.coordinate_descent_tuning = True
    cfg.coordinate_descent_check_all_directions = True
    cfg.epilogue_fusion = False


def _compile_forward(module, *, scalar_args: tuple[str, ...] = (), **kwargs) -> None:
    """Replace ``module.forward`` with its compiled version; Python scalars named in ``scalar_args`` become
    0-d tensors first (outside the compiled region), so their values are graph inputs, not constants."""
    if hasattr(module, "_eager_forward"):
        return
    eager = module.forward
    compiled = torch.compile(eager, **kwargs)

    def forward(*args, **kw):
        for name in scalar_args:
            value = kw.get(name)
            if value is not None and not isinstance(value, torch.Tensor):
                ref = args[0] if args else next(iter(kw.values()))
                kw[name] = torch.tensor(float(value), device=ref.device, dtype=ref.dtype)
        return compiled(*args, **kw)

    module._eager_forward = eager
    module.forward = forward


def is_optimized(module) -> bool:
    return hasattr(module, "_eager_forward")

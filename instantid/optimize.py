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

Serving (``serving=ServingPlan(...)``): compiled graphs are only safe under mixed traffic when their number is
bounded and they are all built before the first request. With a plan, ``generate`` pads every batch to a
batch-size bucket (pad rows are discarded), keeps a dropped request's rows in the batch (so the shape stays),
gives every request the same graph inputs (per-row scale tensors, a control-mask tensor of ones when there is
none, a text-padding mask, IdentityNet on every row of every identity slot), and each compiled module runs its
compiled graph only for input signatures that ``warm_up`` compiled; anything else (an unplanned size, LoRA,
more people or a longer prompt than planned) runs eager, and so does everything after a compile failure:
logged and counted in ``ServingState.eager_calls``, never a failed request.

diffusers 0.42 decorates ``UNet2DConditionModel.forward`` and ``ControlNetModel.forward`` with one
``apply_lora_scale`` wrapper: compiling the bound methods puts every module's graphs in one code object's cache,
so they share one recompile budget (``torch._dynamo.config.recompile_limit``, 8) and with ``fullgraph=True``
the 9th graph raises ``FailOnRecompileLimitHit``. Each module is therefore compiled through a function with its
own code object (its own cache and budget), and the budget is raised to the plan's graph count plus a margin.

The CPU float32 path never calls this module, so its parity with the reference is untouched.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import types
from dataclasses import dataclass, field

import PIL.Image
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

from .attention import IdentityAttnProcessor

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, None: None}
VAE_MODES = ("auto", "bf16", "fp32", "fp16", "tiled")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
log = logging.getLogger(__name__)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a broken compile raises (tracing, the backend, the recompile limit), as opposed to a model error."""
    from torch._dynamo import exc

    return exc.TorchDynamoException, exc.FailOnRecompileLimitHit


@dataclass(frozen=True)
class ServingPlan:
    """The graphs a serving replica compiles and warms before it reports ready.

    ``batch_buckets`` count denoising rows (classifier-free guidance doubles a request's images), so a guided
    request of one image and an unguided one of two share the 2-row graph. ``sizes`` are (width, height);
    ``text_lengths`` the encoded prompt lengths (77 per CLIP chunk; long weighted prompts encode longer);
    ``people_slots`` the identity-slot counts (1 = single identity)."""

    batch_buckets: tuple[int, ...] = (2, 4, 8)
    sizes: tuple[tuple[int, int], ...] = ((1024, 1024),)
    text_lengths: tuple[int, ...] = (77,)
    people_slots: tuple[int, ...] = (1,)
    # schedulers warmed: their timesteps are a graph input whose dtype differs (Euler's float32, DPM-Solver's and
    # LCM's int64); others with the same dtype share the graphs
    schedulers: tuple[str, ...] = ("euler", "dpmpp_2m_karras")
    steps: int = 2  # warm-up steps per graph set (a graph does not depend on the step count)

    def __post_init__(self):
        if not self.batch_buckets or any(b < 1 for b in self.batch_buckets):
            raise ValueError("batch_buckets must be positive row counts")
        if any(b % 2 and b != 1 for b in self.batch_buckets):
            raise ValueError("batch_buckets above 1 must be even (a guided request has two rows per image)")

    def bucket(self, rows: int) -> int | None:
        """The smallest bucket holding ``rows`` rows; None when none does (the batch runs eager)."""
        return min((b for b in self.batch_buckets if b >= rows), default=None)

    def text_bucket(self, tokens: int) -> int:
        """The planned text length a prompt of ``tokens`` is padded to (masked); its own when none is longer."""
        return min((n for n in self.text_lengths if n >= tokens), default=tokens)

    def graphs_per_module(self) -> int:
        return (len(self.batch_buckets) * len(self.sizes) * len(self.text_lengths) * len(self.people_slots)
                * len(self.schedulers))


RECOMPILE_MARGIN = 4  # guards beyond the planned signatures (a first-call specialisation) get a little room


@dataclass
class ServingState:
    """A compiled pipeline's serving state: the plan, the signatures warmed, and the eager fallbacks."""

    plan: ServingPlan
    cudagraphs: bool = False  # compile_mode reduce-overhead: generate marks each step's start
    warming: bool = False
    broken: str | None = None  # the first compile failure; everything runs eager after it
    warmed: set = field(default_factory=set)
    eager_calls: dict = field(default_factory=dict)  # reason -> count
    on_fallback: list = field(default_factory=list)  # callables(reason) (a metric); called once per fallback
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fallback(self, reason: str) -> None:
        with self.lock:
            self.eager_calls[reason] = self.eager_calls.get(reason, 0) + 1
        for hook in self.on_fallback:
            hook(reason)


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
    serving: ServingPlan | None = None,
    backend: str | object = "inductor",
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

    if serving is not None:
        if not (compile and tensor_scales):
            raise ValueError("serving= plans compiled graphs: it needs compile=True and tensor_scales=True")
        pipe.serving = ServingState(serving, cudagraphs=compile_mode == "reduce-overhead")
    if compile:
        if cache_dir is not None:
            set_cache_dir(cache_dir)
        if inductor_tuning and backend == "inductor":
            _tune_inductor()
        if serving is not None:
            budget = serving.graphs_per_module() + RECOMPILE_MARGIN
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, budget)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, budget * (len(nets) + 1))
        kwargs = dict(fullgraph=True, dynamic=False, backend=backend)
        if backend == "inductor":
            kwargs["mode"] = compile_mode
        state = getattr(pipe, "serving", None)
        # LoRA scales are Python floats in peft's layers (constants of a graph): an active LoRA is its own key
        unet_key = (lambda: (_identity_state(pipe.unet), pipe.__dict__.get("_active_loras", ()))) \
            if state is not None else None
        _compile_forward(pipe.unet, state=state, extra_key=unet_key, name="unet", **kwargs)
        for k, net in enumerate(controlnets):
            _compile_forward(net, scalar_args=("conditioning_scale",) if tensor_scales else (), state=state,
                             name=f"controlnet{k}", **kwargs)
        if compile_vae:
            _compile_forward(pipe.vae.decoder, state=state, name="vae_decoder", **kwargs)
        applied.append(f"compile({compile_mode if backend == 'inductor' else backend})")
    return applied


def set_cache_dir(cache_dir: str | os.PathLike) -> None:
    """Persist Inductor's compiled kernels (FX graph cache, autotuning results) in ``cache_dir``: on the model
    cache volume, the first replica of a node compiles and the others load kernels in seconds."""
    import torch._inductor.config as cfg

    os.makedirs(cache_dir, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)  # read by Inductor's cache at first use
    cfg.fx_graph_cache = True
    cfg.autotune_local_cache = True


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
        if any(hasattr(getattr(module, name, None), "base_layer") for name in ("to_q", "to_k", "to_v")):
            continue  # a LoRA (peft) wraps the projection: the fused GEMM would bypass it
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


def _own_code(fn, name: str):
    """``fn`` with a code object of its own: dynamo keeps compiled graphs (and counts recompiles) per code
    object, so each module compiled through its own copy has its own cache and budget."""
    code = fn.__code__.replace(co_name=f"compiled_{name}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _signature(value):
    """Shapes and dtypes of every tensor in ``value`` (nested lists, tuples, dicts): what a graph is keyed on."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in sorted(value.items()))
    return type(value).__name__ if value is not None else None


def _identity_state(unet):
    """What the identity processors add to the UNet's graph: the region's and the scale's shapes."""
    from .attention import identity_processors

    procs = identity_processors(unet)
    if not procs:
        return None
    first = procs[0]
    return _signature(first.region), _signature(first.scale)


_SCALARS: dict = {}


def scalar_tensor(value: float, device, dtype) -> torch.Tensor:
    """A 0-d tensor for a Python float, made once per (value, device, dtype): no host-to-device copy per call."""
    key = (float(value), torch.device(device), dtype)
    tensor = _SCALARS.get(key)
    if tensor is None:
        tensor = _SCALARS[key] = torch.tensor(float(value), device=device, dtype=dtype)
    return tensor


def _compile_forward(module, *, scalar_args: tuple[str, ...] = (), state: ServingState | None = None,
                     extra_key=None, name: str = "module", **kwargs) -> None:
    """Replace ``module.forward`` with its compiled version; Python scalars named in ``scalar_args`` become
    0-d tensors first (outside the compiled region), so their values are graph inputs, not constants.

    With a serving ``state``, the compiled graph runs only for signatures warmed (or while warming); others run
    eager, and a compile failure switches every module to eager for good: both logged and counted."""
    if hasattr(module, "_eager_forward"):
        return
    eager = module.forward

    def call(*args, **kw):
        return eager(*args, **kw)

    compiled = torch.compile(_own_code(call, name), **kwargs)
    errors = _compile_errors()

    def forward(*args, **kw):
        for arg in scalar_args:
            value = kw.get(arg)
            if value is not None and not isinstance(value, torch.Tensor):
                ref = args[0] if args else next(iter(kw.values()))
                kw[arg] = scalar_tensor(value, ref.device, ref.dtype)
        if state is None:
            return compiled(*args, **kw)
        if state.broken is not None:
            state.fallback("compile_failed")
            return eager(*args, **kw)
        key = (name, _signature(args), _signature(kw), extra_key() if extra_key else None)
        if not state.warming and key not in state.warmed:
            state.fallback("unplanned")
            log.info("%s: an unplanned input signature runs eager", name)
            log.debug("%s: unplanned signature %s; warmed %s", name, key, state.warmed)
            return eager(*args, **kw)
        try:
            out = compiled(*args, **kw)
        except errors as exc:
            state.broken = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.error("compile failed, serving eager from now on: %s", state.broken)
            state.fallback("compile_failed")
            return eager(*args, **kw)
        if state.warming:
            state.warmed.add(key)
        return out

    module._eager_forward = eager
    module.forward = forward


def warm_up(pipe, make_request) -> dict:
    """Compile and run every graph of ``pipe.serving.plan`` once: each size x batch bucket x text length x
    people-slot count x scheduler. ``make_request(slots, text_length, guided)`` builds one
    request (a face embedding and keypoint image at any size; the pipeline resizes them). Returns a summary:
    the signatures warmed, and the compile failure if there was one (then the pipeline serves eager)."""
    state: ServingState = pipe.serving
    plan = state.plan
    state.warming = True
    try:
        for (width, height), slots, text_len, bucket in itertools.product(
                plan.sizes, plan.people_slots, plan.text_lengths, plan.batch_buckets):
            for scheduler in plan.schedulers:
                if state.broken:
                    break
                from .pipeline import ControlInput

                guided = bucket % 2 == 0
                request = make_request(slots, text_len, guided)
                request.num_images = bucket // 2 if guided else bucket
                # every extra ControlNet at once: the UNet's inputs have the same shapes with or without them
                blank = PIL.Image.new("RGB", (width, height))
                request.controls = [ControlInput(name, blank) for name in pipe.extra_controlnets]
                pipe.generate([request], width=width, height=height, steps=plan.steps, scheduler=scheduler,
                              output_type="pil")  # decodes too: the VAE decoder's graph for that many images
    finally:
        state.warming = False
    return {"warmed": len(state.warmed), "broken": state.broken}


def is_optimized(module) -> bool:
    return hasattr(module, "_eager_forward")

"""Build an InstantIDPipeline from model references (hub id, local path, or s3://).

- ``base_model``: an SDXL diffusers directory/repo (any fine-tune), or a single ``.safetensors`` checkpoint
  (then ``base_config`` names the diffusers layout to read its configs from).
- ``instantid``: a directory/repo in the official layout: ``ControlNetModel/`` (IdentityNet) and
  ``ip-adapter.bin`` (``image_proj`` + ``ip_adapter``).
- ``controlnets`` / ``loras``: name -> reference, for extra spatial ControlNets and LoRA weights.
"""

from __future__ import annotations

import logging
import time
import warnings
import zipfile
from pathlib import Path

import torch
from diffusers import ControlNetModel

from . import sources
from .errors import InvalidParameterError, WeightsError
from .pipeline import InstantIDPipeline
from .weights import (BASE_PATTERNS, CONTROLNET_PATTERNS, INSTANTID_PATTERNS, SINGLE_FILE_CONFIG_PATTERNS, resolve,
                      resolve_base, variant_for_dtype)

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = sources.BASE_MODEL.ref
DEFAULT_INSTANTID = sources.INSTANTID.ref
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("device", "cuda requested but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise InvalidParameterError("device", f"must be cpu, cuda or auto, got {device!r}")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidParameterError("dtype", f"must be one of {sorted(DTYPES)} or auto, got {dtype!r}")
    if device == "cpu" and dtype != "float32":
        # Allowed for tests and for anyone without a GPU who wants the GPU's numerics: half-precision kernels on
        # the CPU are slow (many fall back to float32 internally), never a way to serve.
        warnings.warn(f"{dtype} on the CPU is slow: meant for tests of the GPU's numerics, not for serving",
                      CpuHalfPrecisionWarning, stacklevel=2)
    return DTYPES[dtype]


class CpuHalfPrecisionWarning(UserWarning):
    """float16/bfloat16 requested on the CPU (allowed, slow)."""


VAE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_vae_dtype(vae_dtype: str, dtype: torch.dtype, device: str, force_upcast: bool) -> torch.dtype:
    """The VAE's dtype in a pipeline whose other models are ``dtype``.

    ``auto``: the pipeline's dtype, except that a VAE that overflows in float16 (``force_upcast``, SDXL's own)
    runs in bfloat16 where the device has it (float32's exponent range, so no overflow, at half float32's memory
    and time; 8 mantissa bits, and its output is quantised to 8-bit pixels), else in float32 as the reference
    upcasts it. ``float16`` is refused for such a VAE."""
    if vae_dtype not in VAE_DTYPES:
        raise InvalidParameterError("vae_dtype", f"must be one of {list(VAE_DTYPES)}, got {vae_dtype!r}")
    if vae_dtype == "auto":
        if dtype != torch.float16 or not force_upcast:
            return dtype
        bf16 = device != "cuda" or torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if vae_dtype == "float16" and force_upcast:
        raise InvalidParameterError("vae_dtype", "this VAE overflows in float16 (force_upcast): use bfloat16, "
                                                 "float32 or an fp16-fixed VAE")
    return DTYPES[vae_dtype]


def load_controlnet(path: Path, dtype: torch.dtype) -> ControlNetModel:
    """A diffusers ControlNet directory: IdentityNet (``ControlNetModel/``) or an extra spatial ControlNet."""
    if not (path / "config.json").is_file():
        raise WeightsError(f"malformed ControlNet weights at {path}: missing config.json")
    try:
        return ControlNetModel.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"cannot load ControlNet from {path}: {exc}".splitlines()[0]) from exc


def load_adapter_state(instantid_dir: Path) -> dict:
    path = instantid_dir / "ip-adapter.bin"
    if not path.is_file():
        raise WeightsError(f"malformed InstantID weights at {instantid_dir}: missing ip-adapter.bin")
    try:
        # weights_only: the file is plain tensors in dicts; never execute pickled code from a checkpoint.
        # mmap: the tensors stay views of the page cache until the adapter converts them to the pipeline's dtype
        # and device, instead of first copying the whole float32 file (1.7 GB) into process memory. Only zip
        # files (torch.save's format since 1.6) can be mapped; a legacy file is read as before.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        raise WeightsError(f"cannot read {path}: {type(exc).__name__}") from exc


def load_base(base_model: str, identitynet: ControlNetModel, dtype: torch.dtype,
              base_config: str | None, variant: str | None = None) -> InstantIDPipeline:
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    path = resolve(base_model, allow_patterns=BASE_PATTERNS)
    try:
        if path.is_file():
            # One checkpoint in the original (Stability/A1111) layout. Configs, scheduler and tokenizers come from
            # base_config, resolved to a local directory first; diffusers then detects nothing and fetches nothing.
            config = str(resolve(base_config or DEFAULT_BASE_MODEL, allow_patterns=SINGLE_FILE_CONFIG_PATTERNS))
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    with safe_open(str(path), framework="pt") as handle:
                        keys = list(handle.keys())
                except Exception as exc:  # safetensors has its own error type for a file that is not one
                    raise WeightsError(f"cannot read {path}: not a safetensors file ({type(exc).__name__})") from exc
                parts = {"model.diffusion_model.": "UNet", "first_stage_model.": "VAE",
                         "conditioner.embedders.0.transformer.": "CLIP-L text encoder",
                         "conditioner.embedders.1.model.": "OpenCLIP bigG text encoder"}
                missing = [name for prefix, name in parts.items() if not any(k.startswith(prefix) for k in keys)]
                if missing:
                    raise WeightsError(f"{path} is not an SDXL checkpoint in the original single-file layout: "
                                       f"no {', '.join(missing)} weights")
            pipe = InstantIDPipeline.from_single_file(
                str(path), controlnet=identitynet, torch_dtype=dtype, config=config, local_files_only=True,
                add_watermarker=False,
            )
            # diffusers leaves weights it found no tensor for on the meta device instead of failing
            unloaded = [name for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                        if any(p.is_meta for p in getattr(pipe, name).parameters())]
            if unloaded:
                raise WeightsError(f"{path} does not fill {', '.join(unloaded)}: not an SDXL checkpoint "
                                   f"matching the configs at {config}")
            return pipe
        if not (path / "model_index.json").is_file():
            raise WeightsError(f"malformed SDXL weights at {path}: missing model_index.json")
        return InstantIDPipeline.from_pretrained(
            path, controlnet=identitynet, torch_dtype=dtype, add_watermarker=False, variant=variant
        )
    except WeightsError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SingleFileComponentError) as exc:
        raise WeightsError(f"cannot load SDXL base model from {path}: {exc}".splitlines()[0]) from exc


def load_pipeline(
    base_model: str = DEFAULT_BASE_MODEL,
    instantid: str = DEFAULT_INSTANTID,
    *,
    device: str = "auto",
    dtype: str = "auto",
    controlnets: dict[str, str] | None = None,
    loras: dict[str, str] | None = None,
    base_config: str | None = None,
    vae_dtype: str = "auto",
) -> InstantIDPipeline:
    """Load everything, move it to the device, and return a ready pipeline.

    Every model runs in ``dtype`` but the VAE, which runs in ``vae_dtype`` (see ``pick_vae_dtype``); the layout
    is the same on the CPU as on CUDA, so the CPU can test the GPU's numerics."""
    started = time.perf_counter()
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    if vae_dtype not in VAE_DTYPES:  # checked again with the VAE's config once loaded; a typo fails at once
        raise InvalidParameterError("vae_dtype", f"must be one of {list(VAE_DTYPES)}, got {vae_dtype!r}")
    # Resolve every reference (and open ip-adapter.bin) before loading any model: a typo or a missing
    # object fails in a moment, not after the base model has been loaded.
    instantid_dir = resolve(instantid, allow_patterns=INSTANTID_PATTERNS)
    if not instantid_dir.is_dir():
        raise WeightsError(f"InstantID weights must be a directory, got {instantid_dir}")
    base_path, variant = resolve_base(base_model, variant_for_dtype(str(torch_dtype)))
    control_paths = {name: resolve(ref, allow_patterns=CONTROLNET_PATTERNS)
                     for name, ref in (controlnets or {}).items()}
    lora_paths = {name: resolve(ref) for name, ref in (loras or {}).items()}
    adapter_state = load_adapter_state(instantid_dir)
    identitynet = load_controlnet(instantid_dir / "ControlNetModel", torch_dtype)
    pipe = load_base(str(base_path), identitynet, torch_dtype, base_config, variant)
    try:
        pipe.load_identity_adapter(adapter_state)
    except (ValueError, KeyError, RuntimeError) as exc:  # torch's strict loading raises RuntimeError
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise WeightsError(f"ip-adapter.bin at {instantid_dir}: {reason}") from exc
    del adapter_state
    for name, path in control_paths.items():
        pipe.add_controlnet(name, load_controlnet(path, torch_dtype))
    for name, path in lora_paths.items():
        pipe.load_lora(name, str(path))
    pipe.to(device)
    pipe.vae.to(pick_vae_dtype(vae_dtype, torch_dtype, device, bool(pipe.vae.config.force_upcast)))
    log.info("pipeline loaded in %.1fs (%s, %s, VAE %s)", time.perf_counter() - started, device, torch_dtype,
             pipe.vae.dtype)
    return pipe

"""Write an SDXL diffusers directory as ONE checkpoint file in the original Stability (sgm / A1111) key layout.

This is the layout of the ``.safetensors`` fine-tunes people download and hand to ``--base-model``:

- ``model.diffusion_model.*``                 the UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``);
- ``first_stage_model.*``                     the VAE (``encoder.down.N.block.M`` ..., attention as 1x1 convs);
- ``conditioner.embedders.0.transformer.*``   text_encoder (CLIP ViT-L), Hugging Face key names under
                                              ``text_model.``;
- ``conditioner.embedders.1.model.*``         text_encoder_2 (OpenCLIP ViT-bigG): ``transformer.resblocks.N``
                                              with a fused ``attn.in_proj_weight`` (q, k, v stacked),
                                              ``ln_1``/``ln_2``, ``mlp.c_fc``/``mlp.c_proj``, ``ln_final``,
                                              ``positional_embedding``, ``token_embedding`` and ``text_projection``
                                              stored transposed (``x @ text_projection``).

The rules are the inverse of diffusers' single-file conversion (``diffusers.loaders.single_file_utils``), so
``from_single_file(file, config=<the directory>)`` rebuilds exactly the directory's weights. Tests use it to
prove the single-file loading path with tiny random weights; it needs no hub and no real checkpoint.

Only the tensors are written: the scheduler, tokenizers and all configs come from ``config=`` at load time, as
for a real fine-tune.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def _split(key: str) -> tuple[str, str]:
    """``a.b.c.weight`` -> (``a.b.c``, ``weight``)."""
    module, _, leaf = key.rpartition(".")
    return module, leaf


def _rename_leading(module: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if module == old or module.startswith(old + "."):
            return new + module[len(old):]
    return module


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` keys -> ``input_blocks`` / ``middle_block`` / ``output_blocks``."""
    per_down = config["layers_per_block"]
    if not isinstance(per_down, int):
        raise ValueError("per-block layers_per_block lists have no single-file layout")
    per_up = per_down + 1  # up blocks hold one resnet more (the skip from the downsampler / conv_in)
    up_has_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, leaf = _split(key)
        parts = module.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            block, kind = int(parts[1]), parts[2]
            index = int(parts[3])
            rest = parts[4:]
            if parts[0] == "down_blocks":
                first = 1 + block * (per_down + 1)
                if kind == "downsamplers":  # downsamplers.0.conv -> input_blocks.K.0.op
                    new, rest = f"input_blocks.{first + per_down}.0.op", []
                else:
                    new = f"input_blocks.{first + index}.{0 if kind == 'resnets' else 1}"
            else:
                first = block * per_up
                if kind == "upsamplers":  # after the resnet (and the attention, in cross-attention blocks)
                    new = f"output_blocks.{first + per_up - 1}.{2 if up_has_attention[block] else 1}"
                else:
                    new = f"output_blocks.{first + index}.{0 if kind == 'resnets' else 1}"
            if kind == "resnets":
                rest = _rename_leading(".".join(rest), _RESNET_UNET).split(".")
            module = ".".join([new, *rest])
        elif parts[0] == "mid_block":
            kind, index = parts[1], int(parts[2])
            slot = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, index)]
            rest = ".".join(parts[3:])
            if kind == "resnets":
                rest = _rename_leading(rest, _RESNET_UNET)
            module = f"middle_block.{slot}.{rest}"
        else:
            renamed = _rename_leading(module, _UNET_TOP)
            if renamed == module:
                raise ValueError(f"no single-file name for UNet key {key}")
            module = renamed
        out[f"{UNET_PREFIX}{module}.{leaf}"] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys -> ``encoder.down.N.block.M`` / ``decoder.up.N`` (reversed order)."""
    num_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, leaf = _split(key)
        side, _, inner = module.partition(".")
        parts = inner.split(".")
        if side not in ("encoder", "decoder"):  # quant_conv / post_quant_conv keep their names
            out[VAE_PREFIX + key] = tensor
            continue
        if parts[0] in ("down_blocks", "up_blocks"):
            block, kind = int(parts[1]), parts[2]
            if parts[0] == "up_blocks":
                stage = f"up.{num_up - 1 - block}"  # diffusers' first up block is the original's last
            else:
                stage = f"down.{block}"
            if kind == "resnets":
                rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                inner = f"{stage}.block.{parts[3]}.{rest}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                inner = f"{stage}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{'.'.join(parts[4:])}"
        elif parts[0] == "mid_block":
            kind, index = parts[1], int(parts[2])
            rest = ".".join(parts[3:])
            if kind == "resnets":
                inner = f"mid.block_{index + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                inner = f"mid.attn_1.{_rename_leading(rest, _VAE_ATTN)}"
                if tensor.ndim == 2:  # the original's attention projections are 1x1 convolutions
                    tensor = tensor[:, :, None, None]
        else:
            inner = _rename_leading(inner, _VAE_TOP)
        out[f"{VAE_PREFIX}{side}.{inner}.{leaf}"] = tensor
    return out


def _hf_clip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP keys with the ``text_model.`` wrapper, whichever way transformers saved them."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in state.items() if not k.endswith("position_ids")}


def clip_l_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """text_encoder: the original keeps Hugging Face names under ``conditioner.embedders.0.transformer.``."""
    return {CLIP_L_PREFIX + k: v for k, v in _hf_clip_keys(state).items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """text_encoder_2 (``CLIPTextModelWithProjection``) -> OpenCLIP names; q/k/v fused into ``in_proj``."""
    state = _hf_clip_keys(state)
    top = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.final_layer_norm.weight": "ln_final.weight",
           "text_model.final_layer_norm.bias": "ln_final.bias"}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    layer_prefix = "text_model.encoder.layers."
    for key, tensor in state.items():
        if key in top:
            out[OPEN_CLIP_PREFIX + top[key]] = tensor
        elif key == "text_projection.weight":
            out[OPEN_CLIP_PREFIX + "text_projection"] = tensor.T.contiguous()
        elif key.startswith(layer_prefix):
            number, _, rest = key[len(layer_prefix):].partition(".")
            module, leaf = _split(rest)
            base = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{number}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault(f"{base}attn.in_proj_{leaf}", {})[module[-6]] = tensor
            else:
                renamed = _rename_leading(module, _OPEN_CLIP_LAYER)
                if renamed == module:
                    raise ValueError(f"no OpenCLIP name for text_encoder_2 key {key}")
                out[f"{base}{renamed}.{leaf}"] = tensor
        else:
            raise ValueError(f"no OpenCLIP name for text_encoder_2 key {key}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (directory / name).is_file():
            return load_file(directory / name)
    raise FileNotFoundError(f"no safetensors weights in {directory}")


def to_single_file_state(sdxl_dir: Path | str) -> dict[str, torch.Tensor]:
    """The whole single-file state dict for a diffusers SDXL directory (non-sharded safetensors)."""
    sdxl_dir = Path(sdxl_dir)
    unet_config = json.loads((sdxl_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((sdxl_dir / "vae" / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for part in (unet_to_ldm(_weights(sdxl_dir / "unet"), unet_config),
                 vae_to_ldm(_weights(sdxl_dir / "vae"), vae_config),
                 clip_l_to_ldm(_weights(sdxl_dir / "text_encoder")),
                 open_clip_to_ldm(_weights(sdxl_dir / "text_encoder_2"))):
        overlap = state.keys() & part.keys()
        if overlap:
            raise ValueError(f"two tensors map to {sorted(overlap)[0]}")
        state.update(part)
    return state


def write_single_file(sdxl_dir: Path | str, out: Path | str) -> Path:
    """Write ``sdxl_dir``'s UNet, VAE and both text encoders to ``out`` in the original single-file layout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in to_single_file_state(sdxl_dir).items()}
    save_file(state, out, metadata={"format": "pt"})
    return out


def with_text_widths(sdxl_dir: Path | str, out_dir: Path | str, widths: tuple[int, int] = (24, 40),
                     seed: int = 20240116) -> Path:
    """A copy of a tiny SDXL directory with its two text encoders rebuilt at the given widths.

    Real SDXL's encoders are 768 (CLIP-L) and 1280 (OpenCLIP bigG) wide, and diffusers' single-file loader
    relies on that: it picks the converter for each text encoder by comparing the width of the checkpoint's
    ``conditioner.embedders.0`` position embedding with the model's, and takes the CLIP-L weights for any encoder
    of the same width: with equal widths ``text_encoder_2`` would receive ``text_encoder``'s weights and keep its
    projection unloaded. The widths must sum to the UNet's cross-attention width; the pooled projection
    (``projection_dim``) is kept, so the UNet, VAE, scheduler, tokenizers and InstantID weights still fit.
    The tiny bundle itself is 24 + 40; tests use this to build an equal-width copy the loader must refuse.
    """
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sdxl_dir, out_dir = Path(sdxl_dir), Path(out_dir)
    unet_config = json.loads((sdxl_dir / "unet" / "config.json").read_text())
    if sum(widths) != unet_config["cross_attention_dim"]:
        raise ValueError(f"text encoder widths {widths} must sum to the UNet's {unet_config['cross_attention_dim']}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "scheduler", "tokenizer", "tokenizer_2"):
        shutil.copytree(sdxl_dir / name, out_dir / name, dirs_exist_ok=True)
    shutil.copy(sdxl_dir / "model_index.json", out_dir / "model_index.json")
    torch.manual_seed(seed)
    for name, cls, width in (("text_encoder", CLIPTextModel, widths[0]),
                             ("text_encoder_2", CLIPTextModelWithProjection, widths[1])):
        config = CLIPTextConfig.from_pretrained(sdxl_dir / name)
        config.hidden_size = width
        cls(config).save_pretrained(out_dir / name, safe_serialization=True)
    return out_dir

"""Tiny random-weight bundles in exactly the real on-disk layouts, built at run time (never committed).

``make_tiny(root)`` writes:
- ``sdxl/``        an SDXL diffusers directory (model_index.json, unet/, vae/, text_encoder{,_2}/,
                   tokenizer{,_2}/, scheduler/) with SDXL's architecture at toy width;
- ``instantid/``   the official InstantID layout: ``ControlNetModel/`` (IdentityNet) and ``ip-adapter.bin``
                   with ``image_proj`` (a Resampler) and ``ip_adapter`` (``{i}.to_k_ip.weight`` ...);
- ``antelopev2/``  an insightface pack of tiny ONNX models (see tiny_face.py);
- ``controlnet-extra/`` a second ControlNet (an extra spatial ControlNet),
- ``controlnet-{pose,canny,depth}/`` one ControlNet per control type, with the preprocessors ``dpt/`` (a DPT depth
  model) and ``dwpose/`` (DWPose's two ONNX files), see tiny_controls.py,
- ``safety/`` and ``safety-flag-all/`` diffusers' safety checker, flagging no image and every image, and
- ``lora/pytorch_lora_weights.safetensors`` a LoRA for the UNet.

Random weights prove plumbing and numerics, never image quality: tiny images are noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .resampler import Resampler

SEED = 20240115
# Text encoder widths in SDXL's ratio (768 : 1280); distinct widths also let single-file loaders tell them apart.
TEXT_WIDTH, TEXT_WIDTH_2 = 24, 40
CROSS_DIM = TEXT_WIDTH + TEXT_WIDTH_2  # the UNet attends over both encoders' hidden states, concatenated
EMBED_DIM = 512  # ArcFace embedding width, as the real adapter expects
NUM_TOKENS = 16


CLIP_BOS = 49406  # CLIP's start/end token ids, hard-coded by the demo's long-prompt weighting
CLIP_VOCAB = 49408


def _tokenizer_files(directory: Path, clip_ids: bool = False) -> None:
    """A byte-level CLIP BPE vocabulary with no merges: every character is a token. ``clip_ids``: unused
    filler entries put the start/end tokens at CLIP's own ids."""
    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    if clip_ids:
        vocab.update({f"<|unused{i}|>": i for i in range(len(vocab), CLIP_BOS)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id, as in CLIP: pooling picks it by argmax
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode alphabet: printable bytes stand for themselves, the rest shift past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _tokenizer(directory: Path, clip_ids: bool = False):
    """Write a tokenizer folder as SDXL's repos have it (vocab.json, merges.txt, configs) and load it."""
    from transformers import CLIPTokenizer

    _tokenizer_files(directory, clip_ids)
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **specials}))
    return CLIPTokenizer.from_pretrained(directory)


def _text_encoder_config(vocab_size: int, width: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def tiny_unet(sdxl_levels: bool = False):
    """Two levels, one layer each; ``sdxl_levels``: SDXL's three levels of two layers (nine down residuals at
    1/8, 1/16, 1/32, as the demo's control mask hard-codes)."""
    from diffusers import UNet2DConditionModel

    levels = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
    )
    if sdxl_levels:
        levels = dict(
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
        )
    return UNet2DConditionModel(
        sample_size=8,
        **levels,
        use_linear_projection=True,
        cross_attention_dim=CROSS_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH_2,  # time ids + pooled text_encoder_2
        norm_num_groups=32,
    )


def tiny_controlnet(unet):
    """A ControlNet shaped like IdentityNet for ``unet``, with its zero-initialised outputs randomised."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        # ControlNet zero-initialises these so training starts from the base model; random ones make the control
        # image and the residuals matter, which is what the tests need to see
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            block.weight.normal_(0, 0.05)
            block.bias.normal_(0, 0.05)
    return net


def write_sdxl(directory: Path, sdxl_facts: bool = False):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(SEED)
    tmp = directory / ".tokenizers"
    tokenizer, tokenizer_2 = _tokenizer(tmp / "a", sdxl_facts), _tokenizer(tmp / "b", sdxl_facts)
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 16, 16), norm_num_groups=8, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025, force_upcast=True,
    )
    # SDXL base's scheduler configuration
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(_text_encoder_config(len(tokenizer), TEXT_WIDTH)),
        text_encoder_2=CLIPTextModelWithProjection(_text_encoder_config(len(tokenizer), TEXT_WIDTH_2)),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=tiny_unet(sdxl_facts), scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    _prefix_text_model(directory / "text_encoder" / "model.safetensors")
    for name, source in (("tokenizer", tmp / "a"), ("tokenizer_2", tmp / "b")):
        _rmtree(directory / name)  # keep the hand-written files: the layout of SDXL's own repos
        source.rename(directory / name)
    _rmtree(tmp)
    return pipe


def _prefix_text_model(path: Path) -> None:
    """Store CLIP-L's weights under ``text_model.*`` as SDXL's repo does (transformers 5 saves them bare)."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    if not any(k.startswith("text_model.") for k in state):
        save_file({f"text_model.{k}": v for k, v in state.items()}, path, metadata={"format": "pt"})


def write_instantid(directory: Path, unet) -> None:
    """``ControlNetModel/`` and ``ip-adapter.bin`` for ``unet``, keyed exactly as the official checkpoint."""
    torch.manual_seed(SEED + 1)
    tiny_controlnet(unet).save_pretrained(directory / "ControlNetModel", safe_serialization=True)
    resampler = Resampler(dim=64, depth=2, heads=2, num_queries=NUM_TOKENS, embedding_dim=EMBED_DIM,
                          output_dim=unet.config.cross_attention_dim, ff_mult=2)
    ip_adapter = {}
    for index, (name, _) in enumerate(unet.attn_processors.items()):
        if name.endswith("attn1.processor"):
            continue  # self-attention slots hold no adapter weights but still take a number
        hidden = _hidden_size(unet, name)
        for part in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{index}.{part}.weight"] = torch.randn(hidden, unet.config.cross_attention_dim) * 0.1
    torch.save({"image_proj": resampler.state_dict(), "ip_adapter": ip_adapter}, directory / "ip-adapter.bin")


def _hidden_size(unet, name: str) -> int:
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    block = int(name.split(".")[1])
    return list(reversed(channels))[block] if name.startswith("up_blocks") else channels[block]


def write_lora(directory: Path, unet) -> Path:
    """A UNet LoRA (rank 4 on the attention projections) saved the way diffusers saves LoRAs."""
    import copy

    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(SEED + 2)
    model = copy.deepcopy(unet)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(directory, unet_lora_layers=get_peft_model_state_dict(model),
                                                safe_serialization=True)
    return directory / "pytorch_lora_weights.safetensors"


def write_control_models(root: Path, unet) -> None:
    """A ControlNet per control type, the depth and pose preprocessors, and the two safety checkers."""
    from .controls import CONTROL_TYPES
    from .tiny_controls import write_tiny_depth, write_tiny_pose, write_tiny_safety_checker

    for offset, kind in enumerate(CONTROL_TYPES):
        torch.manual_seed(SEED + 10 + offset)
        tiny_controlnet(unet).save_pretrained(root / f"controlnet-{kind}", safe_serialization=True)
    write_tiny_depth(root / "dpt")
    write_tiny_pose(root / "dwpose")
    write_tiny_safety_checker(root / "safety", flag=False)
    write_tiny_safety_checker(root / "safety-flag-all", flag=True)


def make_tiny(root: Path | str, sdxl_facts: bool = False) -> Path:
    """Write the whole tiny bundle under ``root``; idempotent and safe when several processes start at once.

    ``sdxl_facts``: the real SDXL facts the demo's pipelines hard-code (CLIP's start/end ids 49406/49407, three
    UNet levels); slower, used by the parity harness."""
    import fcntl
    import os
    import tempfile

    from .tiny_face import write_tiny_face_pack

    root = Path(root).expanduser()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process builds; the others wait and reuse it
        if (root / ".complete").exists():
            if not (root / "safety-flag-all").exists():  # a bundle from before control types and safety
                from diffusers import UNet2DConditionModel

                write_control_models(root, UNet2DConditionModel.from_pretrained(root / "sdxl" / "unet"))
            return root
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        try:
            pipe = write_sdxl(staging / "sdxl", sdxl_facts)
            write_instantid(staging / "instantid", pipe.unet)
            torch.manual_seed(SEED + 3)
            tiny_controlnet(pipe.unet).save_pretrained(staging / "controlnet-extra", safe_serialization=True)
            write_control_models(staging, pipe.unet)
            write_lora(staging / "lora", pipe.unet)
            write_tiny_face_pack(staging / "antelopev2")
            (staging / ".complete").write_text("ok\n")
            _rmtree(root)  # a partial bundle from a crashed build
            os.rename(staging, root)
        finally:
            _rmtree(staging)
    return root


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)

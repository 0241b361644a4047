"""The real models' architecture (configs only, no weights), for shape checks and full-size benchmarks
(bench/gpu_generate.py, bench/cold_start.py).

SDXL base's UNet config is stabilityai/stable-diffusion-xl-base-1.0 ``unet/config.json``; InstantID's
Resampler is width 1280, depth 4, 20 heads of 64, 16 queries, 512-d input, 2048-d output, feed-forward x4.
"""

SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

INSTANTID_RESAMPLER = {
    "dim": 1280, "depth": 4, "heads": 20, "num_queries": 16, "embedding_dim": 512, "output_dim": 2048, "ff_mult": 4,
}

# IdentityNet (InstantID's ``ControlNetModel/config.json``) is ``ControlNetModel.from_unet`` of SDXL base's UNet:
# the UNet's encoder half (2 down blocks with 2 + 10 transformer layers, the mid block) plus the conditioning
# embedding (16, 32, 96, 256) for the 3-channel keypoint image. About 1.25 B parameters.
SDXL_IDENTITYNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}

# SDXL base ``vae/config.json`` (AutoencoderKL, about 84 M parameters). Its decoder overflows float16 at real
# activations, hence ``force_upcast``.
SDXL_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# SDXL base ``text_encoder/config.json``: OpenAI CLIP ViT-L/14's text tower (CLIPTextModel, about 123 M).
SDXL_TEXT_ENCODER = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# SDXL base ``text_encoder_2/config.json``: OpenCLIP ViT-bigG/14's text tower (CLIPTextModelWithProjection,
# about 695 M).
SDXL_TEXT_ENCODER_2 = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# SDXL base ``scheduler/scheduler_config.json`` (EulerDiscreteScheduler).
SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

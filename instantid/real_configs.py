"""The real models' architecture (configs only, no weights), for shape checks and full-size benchmarks.

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

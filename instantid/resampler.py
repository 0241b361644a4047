"""The image adapter's projection: a perceiver Resampler turning one ArcFace embedding into ID tokens.

Layout and key names follow the ``image_proj`` part of InstantID's ``ip-adapter.bin``:
``latents`` (1, Q, D), ``proj_in`` (E -> D), ``layers.{i}.0`` cross-attention of the latents over
[x; latents], ``layers.{i}.1`` a pre-norm feed-forward, ``proj_out`` (D -> C) and ``norm_out``.
InstantID's is D=1280, depth 4, 20 heads of 64, feed-forward x4, Q=16, E=512, C=2048 (the UNet's
cross-attention width). ``Resampler.from_state_dict`` reads all of these from the tensor shapes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HEAD_DIM = 64  # the checkpoint format fixes the head width; the head count follows from to_q's width


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int = HEAD_DIM):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm1 = nn.LayerNorm(dim)  # applied to the image features
        self.norm2 = nn.LayerNorm(dim)  # applied to the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        # Scale both factors by d^-1/4 before the product (not the product by d^-1/2): it keeps fp16 in range,
        # and it is what the checkpoint was trained with, so the rounding matches too.
        s = 1.0 / math.sqrt(math.sqrt(self.head_dim))
        weights = (q * s) @ (k * s).transpose(-2, -1)
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


def feed_forward(dim: int, mult: float) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class Resampler(nn.Module):
    def __init__(
        self,
        dim: int = 1280,
        depth: int = 4,
        heads: int = 20,
        num_queries: int = 16,
        embedding_dim: int = 512,
        output_dim: int = 2048,
        ff_mult: float = 4,
    ):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    @property
    def num_queries(self) -> int:
        return self.latents.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, n, embedding_dim) -> (batch, num_queries, output_dim)."""
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))

    @staticmethod
    def config_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
        """Hyper-parameters implied by the tensor shapes of an ``image_proj`` state dict."""
        try:
            _, num_queries, dim = state["latents"].shape
            depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
            inner = state["layers.0.0.to_q.weight"].shape[0]
            ff_inner = state["layers.0.1.1.weight"].shape[0]
            return dict(
                dim=dim,
                depth=depth,
                heads=inner // HEAD_DIM,
                num_queries=num_queries,
                embedding_dim=state["proj_in.weight"].shape[1],
                output_dim=state["proj_out.weight"].shape[0],
                ff_mult=ff_inner / dim,
            )
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"not an InstantID image_proj state dict (missing or malformed {exc})") from exc

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "Resampler":
        with torch.device("meta"):  # no random init of weights that are replaced right away
            model = cls(**cls.config_from_state_dict(state))
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

"""Decoupled cross-attention: the UNet attends to the text tokens and, separately, to the ID tokens.

The UNet's ``encoder_hidden_states`` carry the text tokens followed by the ``num_tokens`` ID tokens. Each
cross-attention layer computes ``attn(q, K_text, V_text) + scale * attn(q, to_k_ip(id), to_v_ip(id))`` and
then applies the layer's own output projection. Self-attention layers are left untouched.

``ip-adapter.bin['ip_adapter']`` numbers its tensors by each processor's position in the UNet's
``attn_processors`` order, self-attention slots included (so SDXL's keys are ``1.to_k_ip.weight``,
``3.to_k_ip.weight``, ...): ``install_identity_adapter`` reproduces that numbering.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn


class IdentityAttnProcessor(nn.Module):
    """Cross-attention processor with the extra ID-token branch (keys ``to_k_ip``, ``to_v_ip``).

    ``scale`` is a float, or a tensor of one value per batch row so that requests with different
    ``ip_adapter_scale`` can share one denoising batch.

    ``region`` (the official full pipeline's control mask, "enhance non-face region") is None or a
    (rows, H, W) tensor of per-row masks on the output canvas, 1 = face: the identity output is multiplied by it,
    resized (nearest) to the layer's resolution exactly as the reference does. Rows without a mask hold ones.
    With several people (people.py) it is (rows, people, H, W), one mask per identity, and the context carries
    ``people`` groups of ``num_tokens`` ID tokens, one per identity in the same order.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int = 16):
        super().__init__()
        self.num_tokens = num_tokens
        self.scale: float | torch.Tensor = 1.0
        self.region: torch.Tensor | None = None
        self.identity_tokens: int | None = None  # ID tokens of one identity when not num_tokens (concatenated)
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    @staticmethod
    def _attend(attn, query, key, value, mask=None):
        b = query.shape[0]
        head_dim = key.shape[-1] // attn.heads

        def split(x):
            return x.view(b, -1, attn.heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)

    def _attend_people(self, attn, query, ids, people: int) -> torch.Tensor:
        """Several identities' tokens in one attention call. Each position attends only to the tokens of the
        identity whose region holds it (regions do not overlap), so its softmax runs over those tokens alone:
        exactly ``region_i * attn(q, K_i, V_i)`` summed over identities. Positions in no region attend to the
        first identity and are zeroed by their (zero) region value."""
        b, tokens = query.shape[0], query.shape[1]
        masks = self._region_at(tokens).view(b, people, tokens)
        owner = masks.argmax(dim=1)  # (rows, positions); all-zero positions -> 0
        weight = masks.gather(1, owner[:, None]).view(b, tokens, 1)
        token_owner = torch.arange(people * self.num_tokens, device=query.device) // self.num_tokens
        allowed = (owner[:, :, None] == token_owner)[:, None]  # (rows, 1 head, positions, people x tokens)
        out = self._attend(attn, query, self.to_k_ip(ids), self.to_v_ip(ids), allowed)
        return out * weight.to(out.dtype)

    def _region_at(self, tokens: int) -> torch.Tensor:
        """The region at a layer of ``tokens`` positions: from the levels set_identity_region made once per
        batch (a step re-interpolates nothing), else computed."""
        levels = getattr(self, "region_levels", None)
        if levels is not None and tokens in levels:
            return levels[tokens]
        return region_at(self.region if self.region.ndim == 3 else self.region.flatten(0, 1), tokens)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if encoder_hidden_states is None:
            raise ValueError("IdentityAttnProcessor is for cross-attention layers only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        people = self.region.shape[1] if self.region is not None and self.region.ndim == 4 else 1
        split = encoder_hidden_states.shape[1] - people * (self.identity_tokens or self.num_tokens)
        text, ids = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
        if attention_mask is not None:  # a padding mask over [text; ID tokens] (prompts of unequal length)
            attention_mask = attention_mask[..., :split]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)

        out = self._attend(attn, query, attn.to_k(text), attn.to_v(text), attention_mask)
        if people > 1:
            id_out = self._attend_people(attn, query, ids, people)
        else:
            id_out = self._attend(attn, query, self.to_k_ip(ids), self.to_v_ip(ids))
            if self.region is not None:
                id_out = id_out * self._region_at(id_out.shape[1]).to(id_out.dtype)
        scale = self.scale
        if isinstance(scale, torch.Tensor):
            scale = scale.to(device=id_out.device, dtype=id_out.dtype).view(-1, 1, 1)
        out = out + scale * id_out

        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def region_at(region: torch.Tensor, tokens: int) -> torch.Tensor:
    """(rows, H, W) latent-sized masks at a layer of ``tokens`` positions, as (rows, tokens, 1): nearest, as the
    reference. The layer's grid is found by halving (H, W) rounding up, as the UNet's stride-2 downsamplers do:
    the reference's scale factor sqrt(H * W / tokens) rounds down, one row short when a side is odd."""
    h, w = region.shape[-2:]
    while h * w > tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise ValueError(f"no UNet level of a {tuple(region.shape[-2:])} latent has {tokens} positions")
    mask = F.interpolate(region[:, None], size=(h, w), mode="nearest")
    return mask.reshape(region.shape[0], -1, 1)


def install_identity_adapter(unet, state_dict: dict[str, torch.Tensor], num_tokens: int) -> None:
    """Give every cross-attention layer of ``unet`` an IdentityAttnProcessor loaded from ``state_dict``.

    ``state_dict`` is ``ip-adapter.bin['ip_adapter']``. Missing or unexpected keys raise ValueError: a
    partially loaded adapter would silently produce wrong images.
    """
    processors, expected = {}, set()
    device, dtype = unet.device, unet.dtype  # each lookup walks the whole UNet: once, not per layer
    for index, (name, _) in enumerate(unet.attn_processors.items()):
        if name.endswith("attn1.processor"):  # self-attention keeps the stock SDPA processor
            processors[name] = AttnProcessor2_0()
            continue
        key, value_key = f"{index}.to_k_ip.weight", f"{index}.to_v_ip.weight"
        for needed in (key, value_key):
            if needed not in state_dict:
                raise ValueError(f"ip_adapter weights lack {needed!r} (for {name}); not an adapter for this UNet")
        hidden_size, cross_dim = state_dict[key].shape
        with torch.device("meta"):  # no random init of weights that are replaced right away
            proc = IdentityAttnProcessor(hidden_size, cross_dim, num_tokens)
        proc.load_state_dict({"to_k_ip.weight": state_dict[key], "to_v_ip.weight": state_dict[value_key]},
                             assign=True)
        expected.update({key, value_key})
        processors[name] = proc.to(device=device, dtype=dtype)
    unexpected = set(state_dict) - expected
    if unexpected:
        raise ValueError(f"ip_adapter weights have keys this UNet has no slot for: {sorted(unexpected)[:4]}")
    unet.set_attn_processor(processors)


def identity_processors(unet) -> list[IdentityAttnProcessor]:
    return [p for p in unet.attn_processors.values() if isinstance(p, IdentityAttnProcessor)]


def set_identity_scale(unet, scale: float | torch.Tensor) -> None:
    for proc in identity_processors(unet):
        proc.scale = scale


def set_identity_tokens(unet, tokens: int | None) -> None:
    """The number of ID tokens per identity at the end of the context (None: the Resampler's num_tokens); a
    concatenated identity (combine "concat") has num_tokens per photo."""
    for proc in identity_processors(unet):
        proc.identity_tokens = tokens


def set_identity_region(unet, region: torch.Tensor | None) -> None:
    """Per-row face-region masks (rows, H, W) -- or (rows, people, H, W) -- for the identity branch, or None
    for none. The masks at every UNet level are made here, once, and shared by all layers and steps."""
    levels = None
    if region is not None:
        flat = region if region.ndim == 3 else region.flatten(0, 1)
        levels, (h, w) = {}, flat.shape[-2:]
        while True:
            levels[h * w] = region_at(flat, h * w)
            if h * w == 1:
                break
            h, w = (h + 1) // 2, (w + 1) // 2
    for proc in identity_processors(unet):
        proc.region = region
        proc.region_levels = levels

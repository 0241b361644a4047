"""The Resampler against a direct re-computation of its math, and the checkpoint format's shapes."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures.real_configs import INSTANTID_RESAMPLER
from instantid.resampler import Resampler


def reference_forward(state: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The perceiver resampler written out from its definition, reading raw tensors from the state dict."""

    def ln(t, prefix):
        return F.layer_norm(t, t.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"])

    def split(t):
        b, n, w = t.shape
        return t.reshape(b, n, heads, w // heads).permute(0, 2, 1, 3)

    lat = state["latents"].repeat(x.shape[0], 1, 1)
    x = x @ state["proj_in.weight"].T + state["proj_in.bias"]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    for i in range(depth):
        p = f"layers.{i}"
        xn, ln_lat = ln(x, f"{p}.0.norm1"), ln(lat, f"{p}.0.norm2")
        q = split(ln_lat @ state[f"{p}.0.to_q.weight"].T)
        kv = torch.cat([xn, ln_lat], dim=1) @ state[f"{p}.0.to_kv.weight"].T
        k, v = (split(t) for t in kv.chunk(2, dim=-1))
        d = q.shape[-1]
        w = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d), dim=-1)
        out = (w @ v).permute(0, 2, 1, 3).reshape(lat.shape[0], lat.shape[1], -1)
        lat = out @ state[f"{p}.0.to_out.weight"].T + lat
        h = ln(lat, f"{p}.1.0") @ state[f"{p}.1.1.weight"].T
        lat = F.gelu(h) @ state[f"{p}.1.3.weight"].T + lat
    lat = lat @ state["proj_out.weight"].T + state["proj_out.bias"]
    return ln(lat, "norm_out")


def test_matches_direct_computation():
    torch.manual_seed(0)
    model = Resampler(dim=128, depth=3, heads=2, num_queries=16, embedding_dim=512, output_dim=96, ff_mult=2)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, not the default ones and zeros
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 1, 512)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    ours = model(x)
    ref = reference_forward(state, x, heads=2)
    assert ours.shape == (3, 16, 96)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_hyperparameters_read_from_checkpoint_shapes():
    with torch.device("meta"):
        official = Resampler(**INSTANTID_RESAMPLER)
    config = Resampler.config_from_state_dict(official.state_dict())
    assert config == INSTANTID_RESAMPLER


def test_official_key_names():
    with torch.device("meta"):
        keys = set(Resampler(**INSTANTID_RESAMPLER).state_dict())
    assert {"latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "norm_out.weight",
            "layers.3.0.norm1.weight", "layers.3.0.norm2.bias", "layers.3.0.to_q.weight", "layers.3.0.to_kv.weight",
            "layers.3.0.to_out.weight", "layers.3.1.0.weight", "layers.3.1.1.weight", "layers.3.1.3.weight"} <= keys
    # per layer: 2 norms (weight+bias each), to_q, to_kv, to_out; feed-forward norm (2), two linears
    assert len([k for k in keys if k.startswith("layers.")]) == 4 * 11
    assert not any(k.startswith("layers.4") for k in keys)


def test_smaller_checkpoint_round_trips():
    small = Resampler(dim=64, depth=2, heads=1, num_queries=4, embedding_dim=512, output_dim=32, ff_mult=4)
    loaded = Resampler.from_state_dict(small.state_dict())
    x = torch.randn(2, 1, 512)
    torch.testing.assert_close(loaded(x), small(x))


def test_malformed_state_dict_is_refused():
    with pytest.raises(ValueError, match="image_proj"):
        Resampler.from_state_dict({"latents": torch.zeros(1, 16, 64)})

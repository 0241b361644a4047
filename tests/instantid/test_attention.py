"""Decoupled cross-attention against its formula, and the official ip_adapter key numbering on SDXL."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from instantid.attention import IdentityAttnProcessor, install_identity_adapter, set_identity_scale
from tests.fixtures.real_configs import SDXL_UNET


def _softmax_attention(q, k, v, heads):
    def split(t):
        b, n, w = t.shape
        return t.reshape(b, n, heads, w // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = w @ v
    return out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3])


@pytest.fixture()
def layer():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, bias=False, out_bias=True)
    proc = IdentityAttnProcessor(hidden_size=32, cross_attention_dim=24, num_tokens=4)
    attn.set_processor(proc)
    return attn, proc


def test_output_is_text_attention_plus_scaled_id_attention(layer):
    attn, proc = layer
    proc.scale = 0.7
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7 + 4, 24)
    text, ids = context[:, :7], context[:, 7:]
    q = x @ attn.to_q.weight.T
    expected = _softmax_attention(q, text @ attn.to_k.weight.T, text @ attn.to_v.weight.T, 2) + 0.7 * \
        _softmax_attention(q, ids @ proc.to_k_ip.weight.T, ids @ proc.to_v_ip.weight.T, 2)
    expected = expected @ attn.to_out[0].weight.T + attn.to_out[0].bias
    torch.testing.assert_close(attn(x, encoder_hidden_states=context), expected, rtol=1e-5, atol=1e-5)


def test_zero_scale_is_plain_text_attention(layer):
    attn, proc = layer
    x, context = torch.randn(1, 10, 32), torch.randn(1, 11, 24)
    proc.scale = 0.0
    with_ids = attn(x, encoder_hidden_states=context)
    # changing the ID tokens must not matter at scale 0
    context[:, 7:] = torch.randn(1, 4, 24)
    torch.testing.assert_close(attn(x, encoder_hidden_states=context), with_ids)


def test_per_row_scale_equals_separate_runs(layer):
    attn, proc = layer
    x, context = torch.randn(3, 10, 32), torch.randn(3, 11, 24)
    proc.scale = torch.tensor([0.2, 0.8, 1.3])
    batched = attn(x, encoder_hidden_states=context)
    for row, s in enumerate([0.2, 0.8, 1.3]):
        proc.scale = s
        torch.testing.assert_close(batched[row:row + 1], attn(x[row:row + 1], encoder_hidden_states=context[row:row + 1]))


def _official_numbering(unet):
    """The checkpoint's rule, written out: every processor takes a number; cross-attention ones hold weights."""
    channels = SDXL_UNET["block_out_channels"]
    keys = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        for part in ("to_k_ip", "to_v_ip"):
            keys[f"{index}.{part}.weight"] = (hidden, SDXL_UNET["cross_attention_dim"])
    return keys


@pytest.fixture(scope="module")
def sdxl_unet():
    with torch.device("meta"):  # the real architecture, without allocating 10 GB of weights
        return UNet2DConditionModel(**SDXL_UNET)


def _sdxl_shaped_unet():
    """SDXL's blocks, layers and transformer depths (so the same 140 attention slots in the same order) at toy
    width, on CPU: the weights installed into it can be read back."""
    config = {**SDXL_UNET, "block_out_channels": (32, 64, 64), "attention_head_dim": (1, 2, 2),
              "cross_attention_dim": 8, "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 32}
    return UNet2DConditionModel(**config)


def test_sdxl_numbering_is_odd_slots():
    """The official checkpoint numbers every attention processor in the UNet's order and stores weights for the
    cross-attention ones only: ``1``, ``3``, ... ``139``. Each key is tagged with its number; the product's
    installer must put it on the layer the checkpoint meant."""
    unet = _sdxl_shaped_unet()
    state = {f"{i}.{part}.weight": torch.full((1, 1), float(i)) for i in range(1, 140, 2)
             for part in ("to_k_ip", "to_v_ip")}
    install_identity_adapter(unet, state, num_tokens=16)
    installed = {name: int(p.to_k_ip.weight.item()) for name, p in unet.attn_processors.items()
                 if isinstance(p, IdentityAttnProcessor)}
    assert sorted(installed.values()) == list(range(1, 140, 2))  # 70 cross-attention layers after 70 self-attention
    assert all(name.endswith("attn2.processor") for name in installed)
    assert all(int(p.to_v_ip.weight.item()) == installed[name] for name, p in unet.attn_processors.items()
               if isinstance(p, IdentityAttnProcessor))
    # down_blocks.1 (2 x 2 layers) and .2 (2 x 10) hold slots 0-47; up_blocks.0 (3 x 10) 48-107, up_blocks.1
    # (3 x 2) 108-119; the UNet registers up_blocks before mid_block, so the mid block (10) takes 120-139
    assert installed["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"] == 1
    assert installed["down_blocks.2.attentions.1.transformer_blocks.9.attn2.processor"] == 47
    assert installed["up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] == 49
    assert installed["up_blocks.1.attentions.2.transformer_blocks.1.attn2.processor"] == 119
    assert installed["mid_block.attentions.0.transformer_blocks.9.attn2.processor"] == 139


def test_official_layout_loads_without_missing_or_unexpected_keys(sdxl_unet):
    state = {k: torch.empty(shape, device="meta") for k, shape in _official_numbering(sdxl_unet).items()}
    install_identity_adapter(sdxl_unet, state, num_tokens=16)
    procs = [p for p in sdxl_unet.attn_processors.values() if isinstance(p, IdentityAttnProcessor)]
    assert len(procs) == 70
    set_identity_scale(sdxl_unet, 0.5)
    assert all(p.scale == 0.5 for p in procs)


@pytest.mark.parametrize("corrupt", ["missing", "unexpected"])
def test_incomplete_or_foreign_adapter_is_refused(sdxl_unet, corrupt):
    state = {k: torch.empty(shape, device="meta") for k, shape in _official_numbering(sdxl_unet).items()}
    if corrupt == "missing":
        del state["71.to_v_ip.weight"]
    else:
        state["140.to_k_ip.weight"] = torch.empty(640, 2048, device="meta")
    with pytest.raises(ValueError):
        install_identity_adapter(sdxl_unet, state, num_tokens=16)


def test_region_follows_the_unets_grid_on_odd_latent_sides():
    from instantid.attention import region_at

    region = torch.zeros(2, 41, 64)
    region[:, :20] = 1.0
    for tokens, (h, w) in ((41 * 64, (41, 64)), (21 * 32, (21, 32)), (11 * 16, (11, 16))):  # stride 2 rounds up
        mask = region_at(region, tokens)
        assert mask.shape == (2, tokens, 1)
        assert mask.view(2, h, w)[:, 0].eq(1).all() and mask.view(2, h, w)[:, -1].eq(0).all()

"""The official demo's features on the tiny bundle: long-prompt weighting, the control mask ("enhance non-face
region") and img2img, each batched with other requests."""

import numpy as np
import pytest
import torch
from PIL import Image

from instantid.errors import InvalidParameterError
from instantid.identity import Pose
from instantid.pipeline import GenerationRequest
from instantid.prompt_weighting import chunk_tokens, encode_weighted_prompt, parse_weighted_prompt

SIZE = 64
KPS = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=float)
BOX = np.array([12, 10, 52, 56], dtype=float)


def request(**overrides):
    fields = dict(face_embedding=np.random.RandomState(0).randn(512).astype(np.float32) * 10,
                  keypoint_image=Pose(KPS, (SIZE, SIZE)).draw(), prompt="a person", seed=7)
    fields.update(overrides)
    return GenerationRequest(**fields)


def run(pipe, *requests, steps=3):
    return [x.clone() for x in pipe.generate(list(requests), width=SIZE, height=SIZE, steps=steps,
                                             output_type="latent")]


# -- prompt weighting ---------------------------------------------------------------------------------------
def test_parsing_follows_the_reference_examples():
    assert parse_weighted_prompt("normal text") == [("normal text", 1.0)]
    assert parse_weighted_prompt("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_weighted_prompt("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_weighted_prompt(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_weighted_prompt("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    got = parse_weighted_prompt("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    want = [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
            (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]
    assert [t for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in want])
    assert parse_weighted_prompt("") == [("", 1.0)]
    assert parse_weighted_prompt("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]


def test_chunks_of_75_between_start_and_end_tokens():
    ids = list(range(160))
    chunks = chunk_tokens(ids, [1.0] * 160, 900, 901)
    assert [len(c) for c, _ in chunks] == [77, 77, 12]
    assert all(c[0] == 900 and c[-1] == 901 for c, _ in chunks)
    assert [len(c) for c, _ in chunk_tokens(list(range(75)), [1.0] * 75, 900, 901)] == [77, 2]


def test_weighted_long_prompt_is_not_truncated_and_weights_move_embeddings(pipe):
    long = "(a photo:1.3) of a person, " * 8  # well over 77 tokens with the tiny character-level vocabulary
    pe, ne, pp, npool = encode_weighted_prompt(pipe, long, "blurry", "cpu")
    assert pe.shape[1] > 77 and pe.shape == ne.shape  # the negative prompt is padded to the prompt's length
    plain, _, plain_pooled, _ = encode_weighted_prompt(pipe, long.replace("(", "").replace(":1.3)", ""), "", "cpu")
    assert pe.shape == plain.shape and not torch.equal(pe, plain)
    # weight 1 everywhere: the embedding of a chunk is the encoders' own output
    neutral, _, _, _ = encode_weighted_prompt(pipe, "a person", None, "cpu")
    ids = pipe.tokenizer("a person").input_ids
    expected = torch.cat([pipe.text_encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2],
                          pipe.text_encoder_2(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2]], -1)
    torch.testing.assert_close(neutral, expected)


def test_lpw_changes_the_image_and_batches_with_other_lengths(pipe):
    weighted = request(prompt="(a person:1.4), " * 6, negative_prompt="[blurry]", prompt_weighting="lpw", seed=1)
    short = request(prompt="a", prompt_weighting="lpw", seed=2, num_images=2)
    plain = request(prompt="(a person:1.4), " * 6, negative_prompt="[blurry]", prompt_weighting="none", seed=1)
    together = run(pipe, weighted, short, plain)
    alone = run(pipe, weighted) + run(pipe, short) + run(pipe, plain)
    for t, a in zip(together, alone):
        torch.testing.assert_close(t, a, rtol=1e-3, atol=2e-4)
    assert not torch.allclose(alone[0], alone[2], atol=1e-3)


def test_unknown_prompt_weighting_is_refused(pipe):
    with pytest.raises(InvalidParameterError) as err:
        run(pipe, request(prompt_weighting="sd"))
    assert err.value.field == "prompt_weighting"


# -- control mask -------------------------------------------------------------------------------------------
def mask(value=None, box=BOX, size=(SIZE, SIZE)):
    if value is not None:
        return Image.new("RGB", size, (value,) * 3)
    return Pose(KPS, (SIZE, SIZE), box).face_mask(*size)


def test_white_mask_changes_nothing_black_mask_removes_identity_and_pose(pipe):
    base = run(pipe, request())[0]
    assert torch.equal(run(pipe, request(control_mask=mask(255)))[0], base)
    black = run(pipe, request(control_mask=mask(0)))[0]
    off = run(pipe, request(ip_adapter_scale=0.0, controlnet_conditioning_scale=0.0))[0]
    torch.testing.assert_close(black, off, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(black, base, atol=1e-3)


def test_masks_per_request_in_one_batch(pipe):
    a = request(control_mask=mask(), seed=1)
    b = request(seed=2, num_images=2)  # no mask
    c = request(control_mask=mask(box=np.array([0, 0, 30, 30.0])), seed=3, guidance_scale=3.0)
    together = run(pipe, a, b, c)
    alone = run(pipe, a) + run(pipe, b) + run(pipe, c)
    for t, x in zip(together, alone):
        torch.testing.assert_close(t, x, rtol=1e-3, atol=2e-4)
    assert not torch.allclose(alone[0], run(pipe, request(seed=1))[0], atol=1e-3)


def test_mask_of_another_size_is_resized_to_the_canvas(pipe):
    small = mask(size=(32, 32))
    big = small.resize((SIZE, SIZE), Image.BILINEAR)
    torch.testing.assert_close(run(pipe, request(control_mask=small))[0], run(pipe, request(control_mask=big))[0])


# -- img2img ------------------------------------------------------------------------------------------------
def init_image(seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def test_strength_cuts_the_schedule_and_the_init_image_matters(pipe):
    calls = []
    pipe.generate([request(init_image=init_image(), strength=0.5)], steps=6, output_type="latent",
                  callback=lambda i, n: calls.append(n))
    assert calls[-1] == 3 and len(calls) == 3
    a = run(pipe, request(init_image=init_image(0), strength=0.5), steps=6)[0]
    b = run(pipe, request(init_image=init_image(1), strength=0.5), steps=6)[0]
    again = run(pipe, request(init_image=init_image(0), strength=0.5), steps=6)[0]
    assert torch.equal(a, again) and not torch.allclose(a, b, atol=1e-3)


def test_img2img_batches_per_strength(pipe):
    a = request(init_image=init_image(0), strength=0.6, seed=1, control_mask=mask())
    b = request(init_image=init_image(1), strength=0.6, seed=2, num_images=2, prompt_weighting="none")
    together = run(pipe, a, b, steps=5)
    alone = run(pipe, a, steps=5) + run(pipe, b, steps=5)
    for t, x in zip(together, alone):
        torch.testing.assert_close(t, x, rtol=1e-3, atol=2e-4)
    with pytest.raises(InvalidParameterError) as err:
        run(pipe, a, request(init_image=init_image(1), strength=0.7))
    assert err.value.field == "strength"
    with pytest.raises(InvalidParameterError) as err:
        run(pipe, a, request())
    assert err.value.field == "init_image"
    for bad in (0.0, 1.5):
        with pytest.raises(InvalidParameterError) as err:
            run(pipe, request(init_image=init_image(), strength=bad))
        assert err.value.field == "strength"


def test_mask_at_a_size_whose_latent_sides_are_odd(pipe):
    """The server allows any multiple of 8 (e.g. a photo's shape scaled into max_side: 512x328, latent 64x41): the
    identity-attention mask follows the UNet's grid, which rounds odd sides up (it was one row short: a 500)."""
    size = (SIZE + 8, SIZE - 8)  # latent sides odd
    out = pipe.generate([request(control_mask=mask(size=size))], width=size[0], height=size[1], steps=2,
                        output_type="latent")
    assert out[0].shape[-2:] == (size[1] // 8, size[0] // 8)
